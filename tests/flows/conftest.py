"""Flow tests run Prefect in ephemeral mode with state, MLflow store and runs in a temp dir."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="ultrafed-flowtests-"))
os.environ["ULTRAFED_HOME"] = str(_HOME)
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_HOME / 'mlflow.db'}"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


@pytest.fixture(scope="session", autouse=True)
def _remove_flow_home():
    """The flow tests write GBs (stores, artifacts, site work dirs): remove them at the end of the
    session, so repeated runs do not fill the disk. ``ULTRAFED_KEEP_TEST_HOME=1`` keeps them to debug."""
    yield
    if os.environ.get("ULTRAFED_KEEP_TEST_HOME") != "1":
        shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def flow_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def cohort(flow_home: Path) -> list[dict]:
    """Three tiny synthetic sites (12 images each, 96 px) as embedded sites."""
    from ultrafed.data.synth import make_cohort
    from ultrafed.federated.sitesfile import cohort_sites

    root = flow_home / "cohort"
    make_cohort(root, sites=3, per_site=12, seed=0, size=96)
    return cohort_sites(root)


@pytest.fixture(scope="session")
def flow_cfg(tiny_cfg) -> dict:
    """Tiny model, one local epoch, two sites concurrently."""
    from ultrafed.tracking.runs import configure_tracking

    configure_tracking(os.environ["MLFLOW_TRACKING_URI"])
    return tiny_cfg.replace(**{"federated.rounds": 2, "federated.local_epochs": 1, "federated.min_sites": 2,
                               "federated.max_concurrency": 2, "pretrain.batch_size": 8,
                               "federated.site_timeout_s": 600}).to_dict()
