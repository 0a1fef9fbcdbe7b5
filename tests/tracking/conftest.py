"""Real MLflow stores for the tracking tests: a sqlite file and artifact folder in tmp_path."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def _schema_db(tmp_path_factory) -> Path:
    """MLflow's schema migrations take seconds; run them once and copy the empty database."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-schema") / "empty.db"
    MlflowClient(f"sqlite:///{db}").search_experiments(max_results=1)
    return db


@pytest.fixture
def store(tmp_path: Path, _schema_db: Path):
    """A fresh embedded store (sqlite + artifact folder) used through the real MLflow client."""
    import mlflow

    from ultrafed.tracking.runs import configure_tracking

    prev = mlflow.get_tracking_uri()
    shutil.copy(_schema_db, tmp_path / "mlflow.db")
    uri = configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"))
    yield uri
    mlflow.set_tracking_uri(prev)
    mlflow.set_registry_uri(prev)


@pytest.fixture
def parent_run(store, tiny_cfg):
    """A pretraining parent run (config params, commit, params hash) to register under."""
    from ultrafed.tracking.runs import start_parent_run

    return start_parent_run(tiny_cfg, experiment="tests")
