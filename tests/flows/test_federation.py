"""Real federation on 127.0.0.1: Prefect server, MLflow server with artifact proxying, one
process worker per site. 2 sites x 2 rounds; the coordinator never opens a site's file."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.federation, pytest.mark.slow]


@pytest.fixture(scope="module")
def federation(flow_home: Path, tmp_path_factory):
    from flows import federation as fed
    from ultrafed.data.synth import make_cohort

    # the sites' data lives where only the workers are told (the coordinator gets ids only)
    data = tmp_path_factory.mktemp("hospital-data")
    roots = make_cohort(data, sites=2, per_site=10, seed=1, size=96, progress=None)
    info = fed.up({p.name: str(p) for p in roots})
    try:
        yield info, roots
    finally:
        stopped = fed.down()
        assert "prefect-server" in stopped and "mlflow-server" in stopped


def test_two_sites_two_rounds_through_real_workers(federation, flow_cfg, monkeypatch):
    info, roots = federation
    monkeypatch.setenv("ULTRAFED_TEST_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("PREFECT_API_URL", info["prefect_api_url"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", info["mlflow_tracking_uri"])
    from ultrafed.tracking.runs import configure_tracking

    configure_tracking(info["mlflow_tracking_uri"])
    opened: list[str] = []
    watching = {"on": False}
    site_roots = [str(r) for r in roots]

    def audit(event: str, args: tuple) -> None:
        if watching["on"] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if any(path.startswith(r) for r in site_roots):
                opened.append(path)

    sys.addaudithook(audit)
    from flows.pretrain import federated_pretrain

    sites = [{"id": p.name} for p in roots]  # no roots: federation mode
    watching["on"] = True
    try:
        out = federated_pretrain(flow_cfg, sites, mode="federation", rounds=2, run_name="federation-it")
        import mlflow

        enc = mlflow.pytorch.load_model(out["model_uri"])  # the registered model, through the server
    finally:
        watching["on"] = False
        configure_tracking(os.environ["ULTRAFED_TEST_TRACKING_URI"])  # later tests use the embedded store
    assert [h["round"] for h in out["history"]] == [0, 1]
    assert all(h["metrics"]["sites_accepted"] == 2 for h in out["history"])
    assert opened == [], f"the coordinator opened site files: {opened[:3]}"
    assert sum(p.numel() for p in enc.parameters()) > 0


def test_status_lists_every_process(federation):
    from flows import federation as fed

    st = fed.status()
    assert set(st["running"]) == set(st["info"]["pids"])
    assert {"prefect-server", "mlflow-server"} <= set(st["running"])
