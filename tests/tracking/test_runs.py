"""Tracking URIs, experiments under concurrency, parent/round/site runs, code commit."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ultrafed.tracking import runs
from ultrafed.tracking.runs import (
    code_commit, ensure_experiment, log_metrics, resolve_tracking_uri, run_scope, start_parent_run,
    start_round_run, start_site_run)


def test_resolve_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{runs.REPO_ROOT / 'mlflow' / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///mlflow/mlflow.db") == f"sqlite:///{runs.REPO_ROOT}/mlflow/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri() == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"  # explicit wins
    assert runs.default_artifact_root("sqlite:////abs/x.db") == "file:///abs/artifacts"
    assert runs.default_artifact_root("http://127.0.0.1:5999") is None


def test_experiment_created_once_by_racing_threads(store, tmp_path):
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.append(ensure_experiment("race"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 6 and len(set(ids)) == 1
    exp = MlflowClient().get_experiment(ids[0])
    assert exp.artifact_location == (tmp_path / "artifacts" / "race").as_uri()


@pytest.mark.slow
def test_fresh_store_configured_by_racing_processes(tmp_path):
    code = ("import sys; from ultrafed.tracking.runs import configure_tracking, ensure_experiment\n"
            "configure_tracking(sys.argv[1]); print(ensure_experiment('race'))\n")
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-800:] for o in outs]
    assert len({o[0].strip().splitlines()[-1] for o in outs}) == 1


def test_parent_round_site_runs_are_nested_with_config_and_metrics(store, tiny_cfg):
    client = MlflowClient()
    parent = start_parent_run(tiny_cfg, experiment="runs")
    rnd = start_round_run(parent, 0)
    site = start_site_run(rnd, "site-a", 0)
    log_metrics(site, {"train_loss": 0.5})
    log_metrics(parent, {"global_val_loss": 0.9, "site/site-a/val_loss": 0.8}, step=0)
    log_metrics(parent, {"global_val_loss": 0.7}, step=1)
    p = client.get_run(parent)
    assert p.data.params["model.img_size"] == "64" and p.data.params["params_hash"] == tiny_cfg.params_hash()
    assert p.data.params["federated.strategy"] == tiny_cfg.federated.strategy
    assert p.data.tags[runs.TAG_CODE_COMMIT] == code_commit()
    assert [(m.step, m.value) for m in client.get_metric_history(parent, "global_val_loss")] == [(0, 0.9), (1, 0.7)]
    r, s = client.get_run(rnd), client.get_run(site)
    assert r.data.tags[runs.PARENT_TAG] == parent and r.data.tags[runs.TAG_ROUND] == "0"
    assert s.data.tags[runs.PARENT_TAG] == rnd and s.data.tags[runs.TAG_SITE] == "site-a"
    assert s.info.run_name == "round-000-site-a" and s.data.metrics["train_loss"] == 0.5
    assert [a.path for a in client.list_artifacts(parent, "config")] == ["config/params.resolved.yaml"]


def test_run_scope_marks_failure_and_success(store):
    client = MlflowClient()
    exp = ensure_experiment("scope")
    ok, bad = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    with run_scope(ok):
        pass
    with pytest.raises(RuntimeError):
        with run_scope(bad):
            raise RuntimeError("site crashed")
    assert client.get_run(ok).info.status == "FINISHED" and client.get_run(bad).info.status == "FAILED"


def test_code_commit_clean_dirty_and_not_a_repo(tmp_path):
    assert code_commit(tmp_path) == "unknown"
    repo = tmp_path / "r"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    (repo / "f.txt").write_text("a")
    subprocess.run(git + ["add", "f.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    head = subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert code_commit(repo) == head
    (repo / "f.txt").write_text("b")
    code_commit.cache_clear()
    assert code_commit(Path(repo)) == f"{head}-dirty"
