"""DVC: the repo's dvc.yaml runs, re-runs only what changed, shows metrics; manifests round-trip
through a remote; the synthetic cohort is the `synth` stage (its params are its deps, it
regenerates byte-identically on this machine; no committed file pins its hash, which another
CPU may compute differently); a fresh clone plans the whole chain; the demo's cohort is that
stage's output. All in temporary repositories: the project's own .dvc is never touched."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _gate_sites import speckle, write_png, write_site
from ultrafed.data.manifest import manifest_md5, scan_site, write_manifest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_TERMINAL_PROMPT="0")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # stages call `ultrafed`
    env["HOME"] = str(home)  # a remote under ~ resolves inside the test's tmp folder
    env["DVC_SITE_CACHE_DIR"] = str(home / "dvc-site-cache")
    env["PYTHONPATH"] = str(REPO)  # stages run this checkout's code, wherever the venv points
    return env


def _dvc(cwd: Path, *args: str) -> str:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=_env(cwd.parent / "home"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _git_dvc_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    _dvc(path, "init", "-q")
    _dvc(path, "config", "core.analytics", "false")
    return path


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _fresh_clone(path: Path) -> Path:
    """What a clone of this checkout holds (its tracked and not-ignored files, as they are now),
    in a new git repository: no data, no manifests, no dvc.lock, no DVC cache."""
    ls = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        cwd=REPO, capture_output=True, text=True)
    if ls.returncode != 0:
        pytest.skip(f"{REPO} is not a git checkout: {ls.stderr.strip()}")
    for rel in filter(None, ls.stdout.split("\0")):
        src = REPO / rel
        if src.is_file() and "__pycache__" not in src.parts:
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, path / rel)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    return path


def _set_params(repo: Path, **sections: dict) -> dict:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for name, values in sections.items():
        params[name].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def _lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def _status(repo: Path, *targets: str) -> dict:
    return json.loads(_dvc(repo, "status", "--json", *targets).strip().splitlines()[-1])


def test_push_pull_round_trip(tmp_path):
    repo = _git_dvc_repo(tmp_path / "repo")
    site = write_site(repo / "data" / "site-a", n=4)
    write_manifest(scan_site(site, "site-a", workers=1), repo / "manifests" / "site-a.csv")
    _dvc(repo, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    _dvc(repo, "add", "data", "manifests/site-a.csv")
    before = {p.relative_to(repo): p.read_bytes() for p in [*(repo / "data").rglob("*.png"),
                                                             repo / "manifests" / "site-a.csv"]}
    _dvc(repo, "push")
    shutil.rmtree(repo / "data")
    (repo / "manifests" / "site-a.csv").unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    _dvc(repo, "pull")
    after = {p: (repo / p).read_bytes() for p in before}
    assert after == before and len(before) == 9  # 4 images + 4 masks + the manifest
    # the md5 DVC records for the manifest is the one write_manifest returned: the data version
    out = yaml.safe_load((repo / "manifests" / "site-a.csv.dvc").read_text())["outs"][0]
    assert out["md5"] == manifest_md5(repo / "manifests" / "site-a.csv")


def test_repo_pipeline_reruns_only_what_changed(tmp_path):
    """scan/check on site folders a site wrote itself (data.root points at them, as it would at
    real sites): the synth stage is not upstream of them then, and never runs."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(REPO / "ultrafed" / "data", repo / "ultrafed" / "data",
                    ignore=shutil.ignore_patterns("__pycache__"))  # the stages' code deps
    _set_params(repo, data={"root": "data/sites"})
    sites = yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"][0]["sites"]
    for k, s in enumerate(sites):  # small sites, in the layout the pipeline expects
        write_site(repo / "data" / "sites" / s, n=9, seed=k)
    # the data stages only: pretrain/finetune need the whole project and minutes of training
    data_stages = ("--glob", "check@*")
    first = _dvc(repo, "repro", *data_stages)
    assert set(_ran(first)) == {f"{st}@{s}" for st in ("scan", "check") for s in sites}
    # nothing changed: nothing runs
    assert _ran(_dvc(repo, "repro", *data_stages)) == []
    # one image of one site changes: only that site's scan and check run again
    changed = sites[1]
    write_png(repo / "data" / "sites" / changed / "images" / "img_004.png", speckle(4242))
    assert _ran(_dvc(repo, "repro", *data_stages)) == [f"scan@{changed}", f"check@{changed}"]
    # the lock's md5 of each manifest is its data version
    lock = _lock(repo)
    assert "synth" not in lock
    for s in sites:
        (out,) = lock[f"scan@{s}"]["outs"]
        assert out["md5"] == manifest_md5(repo / "manifests" / f"{s}.csv")
    # dvc metrics show prints the gate of every site
    # (stderr may follow the JSON: the not-yet-run training stages' metrics are reported missing)
    metrics, _ = json.JSONDecoder().raw_decode(_dvc(repo, "metrics", "show", "--json"))
    data = next(iter(metrics.values()))["data"]
    for s in sites:
        m = data[f"metrics/quality/{s}.json"]["data"]
        assert m["status"] == "pass" and m["n_images"] == 9
        assert m["manifest_md5"] == manifest_md5(repo / "manifests" / f"{s}.csv")
    table = _dvc(repo, "metrics", "show")
    assert all(f"metrics/quality/{s}.json" in table for s in sites)
    assert (repo / "reports" / "quality" / f"{sites[0]}.md").read_text().startswith("# Data quality")


def test_synth_stage_and_its_params_match_params_yaml():
    """Every key of params.yaml's synth section reaches the stage's command and is a params dep;
    the sites the later stages loop over are the ones synth.sites makes."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stage = pipeline["stages"]["synth"]
    assert stage["params"] == ["synth"] and stage["outs"] == ["data/synth"]
    assert stage["cmd"].startswith("ultrafed data synth --out data/synth ")
    for key in params["synth"]:
        assert f"--{key.replace('_', '-')} ${{synth.{key}}}" in stage["cmd"], key
    assert {"ultrafed/data/synth.py", "flows/commands/data_synth.py"} <= set(stage["deps"])
    assert pipeline["vars"][0]["sites"] == [f"site-{k}" for k in range(params["synth"]["sites"])]
    # the stages that read the cohort depend on data.root (= data/synth by default)
    assert params["data"]["root"] == "data/synth"
    for name in ("scan", "pretrain", "finetune"):
        st = pipeline["stages"][name]
        deps = (st.get("do") or st)["deps"]
        assert any(d.startswith("${data.root}") for d in deps), name
    # nothing committed pins a hash of generated data
    assert not (REPO / "data.dvc").exists()


def test_synth_stage_regenerates_the_same_version_and_follows_its_params(tmp_path):
    """`dvc repro synth` writes the cohort and its md5 to dvc.lock; forced again on this machine
    it writes the same bytes (the lock does not change, `dvc status` stays clean); a changed
    synth param makes the stage out of date. (No test compares with a hash from elsewhere.)"""
    repo = _fresh_clone(tmp_path / "repo")
    params = _set_params(repo, synth={"per_site": 8, "size": 64})  # small: seconds, not tens
    assert _ran(_dvc(repo, "repro", "synth")) == ["synth"]
    entry = _lock(repo)["synth"]
    assert entry["params"]["params.yaml"]["synth"] == params["synth"]
    (out,) = entry["outs"]
    n = params["synth"]["sites"]
    assert (out["path"], out["nfiles"]) == ("data/synth", n * 8 * 2 + n)  # images, masks, labels.csv
    assert _status(repo, "synth") == {}
    assert _ran(_dvc(repo, "repro", "--force", "synth")) == ["synth"]
    assert _lock(repo)["synth"] == entry  # byte-identical regeneration: same md5
    assert _status(repo, "synth") == {}
    _set_params(repo, synth={"seed": params["synth"]["seed"] + 1})
    changed = _status(repo, "synth")["synth"]
    assert {"changed deps": {"params.yaml": {"synth": "modified"}}} in changed


def test_fresh_clone_plans_the_whole_chain(tmp_path):
    """`dvc repro --dry --force` on a fresh clone: every stage, each after what it reads."""
    repo = _fresh_clone(tmp_path / "repo")
    planned = _ran(_dvc(repo, "repro", "--dry", "--force"))
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    sites = pipeline["vars"][0]["sites"]
    tasks = pipeline["stages"]["finetune"]["foreach"]
    expected = ["synth", *(f"scan@{s}" for s in sites), *(f"check@{s}" for s in sites), "pretrain",
                *(f"finetune@{t}" for t in tasks)]
    assert sorted(planned) == sorted(expected)
    at = {name: i for i, name in enumerate(planned)}
    for s in sites:
        assert at["synth"] < at[f"scan@{s}"] < at[f"check@{s}"] < at["pretrain"]
    assert all(at["pretrain"] < at[f"finetune@{t}"] for t in tasks)
    assert not (repo / "data").exists() and not (repo / "dvc.lock").exists()  # a plan, nothing ran


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="DVC 3.67.1: a dry run looks each stage up in the run cache, which hashes its "
                          "deps, so it stops at the first stage whose deps an earlier stage makes "
                          "(fixed in DVC's source after 3.67.1, not yet released). When this passes, plain "
                          "`dvc repro --dry` works: say so in docs/DATA.md and dvc.yaml, drop the xfail")
def test_plain_dry_run_on_a_fresh_clone(tmp_path):
    repo = _fresh_clone(tmp_path / "repo")
    _dvc(repo, "repro", "--dry")


def test_demo_makes_its_cohort_as_the_synth_stage(tmp_path, monkeypatch):
    """What `make demo` leaves for DVC: the cohort is the synth stage's output, recorded in
    dvc.lock, so `dvc status` calls synth up to date and lists the stages DVC has not run (the
    demo's gate, pretraining and fine-tuning are tracked by MLflow, not by dvc.lock); git sees
    one new file, dvc.lock."""
    from flows.commands.demo import SYNTH_OUT, SYNTH_STAGE, synth_stage

    repo = _fresh_clone(tmp_path / "repo")
    _set_params(repo, synth={"per_site": 8, "size": 64})
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"],
                   cwd=repo, check=True)
    for k, v in _env(tmp_path / "home").items():
        monkeypatch.setenv(k, v)
    assert synth_stage(repo)
    assert len(list((repo / SYNTH_OUT).glob("site-*/images/*.png"))) == 3 * 8
    status = _status(repo)
    assert SYNTH_STAGE not in status
    assert set(status) == set(_lock_free_stages(repo))
    porcelain = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                               text=True, check=True).stdout
    assert porcelain.splitlines() == ["?? dvc.lock"]


def _lock_free_stages(repo: Path) -> list[str]:
    """Every stage of dvc.yaml but synth, by the names DVC gives them."""
    out = _dvc(repo, "stage", "list", "--name-only")
    return [name for name in out.split() if name != "synth"]


def test_demo_leaves_the_cohort_to_resolve_sites_without_dvc(tmp_path, capsys):
    """Outside a DVC project (a tarball, say) the demo does not try DVC: it writes the cohort itself."""
    from flows.commands.demo import synth_stage

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # a dvc.yaml but no .dvc/
    assert not synth_stage(tmp_path)
    assert not (tmp_path / "data").exists() and capsys.readouterr().out == ""


def test_demo_uses_the_synth_stage_only_for_the_cohort_that_stage_makes(tmp_path):
    """The stage makes data/synth from the repo's params.yaml: the demo runs it only where it would
    make exactly that cohort itself (none yet, no real data, no other synth params or data.root)."""
    from argparse import Namespace

    from flows.commands.demo import needs_synth_stage
    from ultrafed.config import load_config

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")

    def needs(*, data=None, sites=None, **over) -> bool:
        cfg = load_config(tmp_path / "params.yaml", over)
        args = Namespace(data=data, sites=sites)
        return needs_synth_stage(args, cfg, tmp_path / cfg.data.root, tmp_path)

    assert needs()
    assert not needs(**{"synth.seed": 5}) and not needs(**{"synth.per_site": 4})
    assert not needs(**{"data.root": "data/sites"})
    assert not needs(data=str(tmp_path / "shared")) and not needs(sites="sites.yaml")
    (tmp_path / "data" / "synth" / "site-0").mkdir(parents=True)  # a cohort is there: use it
    assert not needs()
