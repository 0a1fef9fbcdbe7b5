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
import time
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


SECRET = "patient-4711-mrn-0042"  # a file name a hospital might use: it must never reach the coordinator


@pytest.fixture(scope="module")
def federation(flow_home: Path, tmp_path_factory):
    from flows import federation as fed
    from ultrafed.data.synth import make_cohort

    # the sites' data lives where only the workers are told (the coordinator gets ids only)
    data = tmp_path_factory.mktemp("hospital-data")
    roots = make_cohort(data, sites=2, per_site=10, seed=1, size=96, progress=None)
    # one unreadable image named like a patient record: quarantined at the site, named only there
    (roots[0] / "images" / f"{SECRET}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with open(roots[0] / "labels.csv", "a") as f:
        f.write(f"{SECRET},benign,linear,train,96,96\n")
    info = fed.up({p.name: str(p) for p in roots})
    try:
        yield info, roots
    finally:
        stopped = fed.down()
        assert "prefect-server" in stopped and "mlflow-server" in stopped


@pytest.fixture(scope="module")
def coordinator_run(federation, flow_cfg, tmp_path_factory) -> dict:
    info, roots = federation
    result = tmp_path_factory.mktemp("coordinator") / "coordinator.json"
    env = dict(os.environ, PREFECT_API_URL=info["prefect_api_url"], MLFLOW_TRACKING_URI=info["mlflow_tracking_uri"],
               SITE_ROOTS=json.dumps([str(r) for r in roots]), FLOW_CFG=json.dumps(flow_cfg), RESULT_FILE=str(result))
    proc = subprocess.run([sys.executable, "-c", COORDINATOR], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(result.read_text())


def test_two_sites_two_rounds_through_real_workers(coordinator_run):
    out = coordinator_run
    assert [h["round"] for h in out["history"]] == [0, 1]
    assert all(h["accepted"] == 2 for h in out["history"])
    assert out["opened"] == [], f"the coordinator opened site files: {out['opened'][:3]}"
    assert out["n_params"] > 0


def test_status_lists_every_process(federation):
    from flows import federation as fed

    st = fed.status()
    assert set(st["running"]) == set(st["info"]["pids"])
    assert {"prefect-server", "mlflow-server"} <= set(st["running"])


def test_the_coordinator_received_no_pixel_name_or_path_of_a_site(federation, coordinator_run):
    """Everything the coordinator's servers hold (MLflow: every table and artifact; Prefect:
    every table: flow-run parameters, states, logs, events) is read and searched."""
    import _audit

    info, roots = federation
    time.sleep(3)  # the workers ship their logs to the Prefect API in batches
    from flows.federation import state_dir

    site_dirs = [str(r) for r in roots] + [str(state_dir() / f"site-{r.name}") for r in roots]
    names = _audit.site_file_names(roots)
    assert f"{SECRET}.png" in names
    img_size = 96
    findings = _audit.audit_store(state_dir() / "mlflow", site_dirs, names, img_size)
    findings += _audit.audit_store(state_dir() / "prefect-server", site_dirs, names, img_size)
    assert not findings, "\n".join(findings[:20])
    # and the coordinator still learnt that a file was quarantined, and by which check
    assert _audit.quarantine_seen(state_dir() / "mlflow", site=roots[0].name, check="unreadable")
