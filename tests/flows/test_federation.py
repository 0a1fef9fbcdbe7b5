"""Real federation on 127.0.0.1: Prefect server, MLflow server with artifact proxying, one
process worker per site. 2 sites x 2 rounds; the coordinator never opens a site's file.

The coordinator runs in its own process (as it would at a hospital network's hub): Prefect
keeps its API URL for the life of a process, and the other flow tests use the ephemeral API.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.federation, pytest.mark.slow]

COORDINATOR = r"""
import json, os, sys
opened, watching = [], [False]
roots = json.loads(os.environ["SITE_ROOTS"])
def audit(event, args):
    if watching[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if any(path.startswith(r) for r in roots):
            opened.append(path)
sys.addaudithook(audit)
import flows
from flows.pretrain import federated_pretrain
from ultrafed.tracking.runs import configure_tracking
import mlflow
configure_tracking(os.environ["MLFLOW_TRACKING_URI"])
cfg = json.loads(os.environ["FLOW_CFG"])
sites = [{"id": os.path.basename(r)} for r in roots]  # ids only: federation mode
watching[0] = True
out = federated_pretrain(cfg, sites, mode="federation", rounds=2, run_name="federation-it")
enc = mlflow.pytorch.load_model(out["model_uri"])  # the registered model, through the server
watching[0] = False
json.dump({"history": [{"round": h["round"], "accepted": h["metrics"]["sites_accepted"]} for h in out["history"]],
           "opened": opened, "model_uri": out["model_uri"], "n_params": sum(p.numel() for p in enc.parameters())},
          open(os.environ["RESULT_FILE"], "w"))
"""


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


def test_two_sites_two_rounds_through_real_workers(federation, flow_cfg, tmp_path):
    info, roots = federation
    result = tmp_path / "coordinator.json"
    env = dict(os.environ, PREFECT_API_URL=info["prefect_api_url"], MLFLOW_TRACKING_URI=info["mlflow_tracking_uri"],
               SITE_ROOTS=json.dumps([str(r) for r in roots]), FLOW_CFG=json.dumps(flow_cfg), RESULT_FILE=str(result))
    proc = subprocess.run([sys.executable, "-c", COORDINATOR], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(result.read_text())
    assert [h["round"] for h in out["history"]] == [0, 1]
    assert all(h["accepted"] == 2 for h in out["history"])
    assert out["opened"] == [], f"the coordinator opened site files: {out['opened'][:3]}"
    assert out["n_params"] > 0


def test_status_lists_every_process(federation):
    from flows import federation as fed

    st = fed.status()
    assert set(st["running"]) == set(st["info"]["pids"])
    assert {"prefect-server", "mlflow-server"} <= set(st["running"])
