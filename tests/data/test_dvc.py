"""DVC: the repo's dvc.yaml runs, re-runs only what changed, shows metrics; manifests round-trip
through a remote; data.dvc pins the default synthetic cohort. All in temporary repositories:
the project's own .dvc is never touched."""
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


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


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
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(REPO / "ultrafed" / "data", repo / "ultrafed" / "data",
                    ignore=shutil.ignore_patterns("__pycache__"))  # the stages' code deps
    sites = yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"][0]["sites"]
    for k, s in enumerate(sites):  # small sites, in the synth layout the pipeline expects
        write_site(repo / "data" / "synth" / s, n=9, seed=k)
    # the data stages only: pretrain/finetune need the whole project and minutes of training
    data_stages = ("--glob", "check@*")
    first = _dvc(repo, "repro", *data_stages)
    assert _ran(first) == {f"{st}@{s}" for st in ("scan", "check") for s in sites}
    # nothing changed: nothing runs
    assert _ran(_dvc(repo, "repro", *data_stages)) == set()
    # one image of one site changes: only that site's scan and check run again
    changed = sites[1]
    write_png(repo / "data" / "synth" / changed / "images" / "img_004.png", speckle(4242))
    assert _ran(_dvc(repo, "repro", *data_stages)) == {f"scan@{changed}", f"check@{changed}"}
    # the lock's md5 of each manifest is its data version
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
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


def test_data_dvc_pins_the_default_synthetic_cohort(tmp_path):
    """`ultrafed data synth` with params.yaml's defaults reproduces the version in data.dvc."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    shutil.copy(REPO / "data.dvc", repo / "data.dvc")
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    proc = subprocess.run([str(BIN / "ultrafed"), "--params", "params.yaml", "data", "synth"], cwd=repo,
                          env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    pinned = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    _dvc(repo, "commit", "-f", "data.dvc")  # re-hash what was just generated ...
    now = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]
    assert (now["path"], now["md5"], now["nfiles"]) == ("data/synth", pinned["md5"], pinned["nfiles"])
    assert "up to date" in _dvc(repo, "status", "data.dvc")  # ... it is the pinned version
