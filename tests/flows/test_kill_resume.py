"""The real crash: SIGKILL ``ultrafed pretrain`` after its second round, resume it, and get
bit-identical global weights to a run that was never interrupted. A run continued in chunks
keeps the LR horizon it started with, and so matches a run done in one call."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

pytestmark = pytest.mark.slow

TINY = ["model.img_size=32", "model.decoder_depth=1", "model.decoder_dim=32", "model.decoder_heads=1",
        "pretrain.batch_size=4", "federated.local_epochs=1", "federated.min_sites=2", "federated.max_concurrency=2"]
ROUNDS = 3


def _sites(folder: Path) -> Path:
    """Two synthetic sites (identical bytes for the same arguments) and a sites.yaml naming them."""
    from ultrafed.data.synth import make_cohort

    make_cohort(folder / "cohort", sites=2, per_site=8, seed=11, size=64, progress=None)
    f = folder / "sites.yaml"
    f.write_text("sites:\n  - id: site-0\n    root: cohort/site-0\n  - id: site-1\n    root: cohort/site-1\n")
    return f


def _cli(sites_yaml: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "pretrain", "--sites", str(sites_yaml), "--run-name", "crashy",
            "--rounds", str(ROUNDS), *(a for kv in TINY for a in ("--set", kv)), *extra]


def _kill_when(path: Path, proc: subprocess.Popen, out: dict, timeout_s: float = 420) -> None:
    """SIGKILL ``proc``'s process group the moment ``path`` exists (watcher thread)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s and proc.poll() is None:
        if path.exists():
            out["descendants"] = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)  # the group led by the CLI's own PID (new session)
            out["killed"] = True
            return
        time.sleep(0.05)
    out["killed"] = False


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(900)
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path):
    from flows.commands.pretrain import parse_overrides
    from flows.pretrain import run_pretrain
    from ultrafed.config import load_config
    from ultrafed.federated.coordinator import load_latest
    from ultrafed.federated.sitesfile import load_sites_file
    from ultrafed.tracking.runs import configure_tracking

    home = tmp_path / "home"
    env = dict(os.environ, ULTRAFED_HOME=str(home), PREFECT_HOME=str(home / "prefect"), PYTHONUNBUFFERED="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    env.pop("PREFECT_API_URL", None)  # embedded: each CLI run starts (and owns) an ephemeral Prefect server
    crashed_sites = _sites(tmp_path / "b")  # the crashed run and the reference keep separate site work dirs
    run_dir = home / "runs" / "crashy"
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen(_cli(crashed_sites), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=Path(__file__).resolve().parents[2])
    kill: dict = {}
    watcher = threading.Thread(target=_kill_when, args=(run_dir / "round-0001.ckpt", proc, kill), daemon=True)
    watcher.start()
    try:
        # meanwhile, in this process: the same config and seed, never interrupted
        _, ref_sites = load_sites_file(_sites(tmp_path / "a"))
        cfg = load_config(overrides=parse_overrides(TINY)).to_dict()
        configure_tracking(os.environ["MLFLOW_TRACKING_URI"])
        reference = run_pretrain(cfg, ref_sites, mode="embedded", rounds=ROUNDS, resume=False, run_name="never-killed")
        watcher.join(timeout=600)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        while any(_alive(p) for p in kill.get("descendants", [])) and time.monotonic() - t0 < 10:
            time.sleep(0.2)
        leftovers = [p for p in kill.get("descendants", []) if _alive(p)]
        for p in leftovers:  # anything that left the group (none expected); stopped by its own PID
            p.kill()
        log.close()
    assert kill.get("killed"), "run ended before round 2 was checkpointed: " + (tmp_path / "killed.log").read_text()[-800:]
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "round-0002.ckpt").exists(), "the killed run finished its last round anyway"
    # the killed CLI's ephemeral Prefect server (and any other child) died with it
    assert kill["descendants"], "the CLI had no child processes (expected its ephemeral Prefect server)"
    assert not leftovers, f"processes outlived the killed run: {[p.pid for p in leftovers]}"

    resumed = subprocess.run(_cli(crashed_sites, "--resume"), env=env, capture_output=True, text=True, timeout=600,
                             cwd=Path(__file__).resolve().parents[2])
    assert resumed.returncode == 0, resumed.stdout[-1500:] + resumed.stderr[-1500:]
    assert "resuming crashy after round 1" in resumed.stdout

    a = load_latest(Path(reference["run_dir"]))
    b = load_latest(run_dir)
    assert a.round_idx == b.round_idx == ROUNDS - 1 and [h["round"] for h in b.history] == list(range(ROUNDS))
    assert a.global_state.keys() == b.global_state.keys()
    diverged = [k for k in a.global_state if not torch.equal(a.global_state[k], b.global_state[k])]
    assert not diverged, f"resumed run diverged from the uninterrupted one in {len(diverged)} tensor(s), e.g. {diverged[:3]}"


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(900)
def test_chunks_keep_the_run_lr_horizon_and_match_one_call(tmp_path: Path, capsys):
    """Rounds 0-1, then a resume to 3 rounds whose config has no horizon: the run's 4 is kept, so
    the weights after round 2 equal those of one call to 3 rounds with the same horizon (without
    it the resumed call would squeeze the cosine into 3 rounds). Another horizon on resume stops."""
    from flows.cli import main
    from flows.commands.pretrain import parse_overrides
    from flows.pretrain import run_pretrain
    from ultrafed.config import load_config
    from ultrafed.federated.coordinator import load_latest
    from ultrafed.federated.sitesfile import load_sites_file
    from ultrafed.tracking.runs import configure_tracking

    configure_tracking(os.environ["MLFLOW_TRACKING_URI"])

    def cfg(horizon: int) -> dict:
        return load_config(overrides={**parse_overrides(TINY), "federated.lr_horizon_rounds": horizon}).to_dict()

    _, one_sites = load_sites_file(_sites(tmp_path / "a"))
    chunk_yaml = _sites(tmp_path / "b")
    _, chunk_sites = load_sites_file(chunk_yaml)
    one = run_pretrain(cfg(4), one_sites, mode="embedded", rounds=3, resume=False, run_name="lr-one-call")
    run_pretrain(cfg(4), chunk_sites, mode="embedded", rounds=2, resume=False, run_name="lr-chunked")
    chunked = run_pretrain(cfg(0), chunk_sites, mode="embedded", rounds=3, resume=True, run_name="lr-chunked")
    a, b = load_latest(Path(one["run_dir"])), load_latest(Path(chunked["run_dir"]))
    assert a.round_idx == b.round_idx == 2 and a.lr_horizon_rounds == b.lr_horizon_rounds == 4
    assert _weights_equal(a.global_state, b.global_state), "the chunked run left the one-call LR schedule"

    capsys.readouterr()
    rc = main(["pretrain", "--sites", str(chunk_yaml), "--run-name", "lr-chunked", "--resume", "--rounds", "4",
               *(x for kv in [*TINY, "federated.lr_horizon_rounds=6"] for x in ("--set", kv))])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and err == ("ultrafed pretrain: run lr-chunked: federated.lr_horizon_rounds=6 given, but the run "
                               "was started with 4; resume keeps the run's horizon: drop the setting or start a new "
                               "--run-name"), err
    assert load_latest(Path(chunked["run_dir"])).round_idx == 2  # nothing trained
