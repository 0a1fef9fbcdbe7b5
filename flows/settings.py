"""Runtime environment for Prefect and MLflow, applied before they are imported.

Defaults only (``setdefault``): a user's own environment always wins.
"""
from __future__ import annotations

import os
from pathlib import Path

from ultrafed.paths import ultrafed_home


def apply_runtime_env(state_dir: Path | None = None) -> None:
    """Embedded mode keeps Prefect's state under the UltraFed home (``.ultrafed/``) and silences telemetry."""
    state = Path(state_dir) if state_dir else ultrafed_home()
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    try:
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # Prefect reports it; a read-only home only matters to ephemeral mode
    # The ephemeral API server starts in a subprocess; on 2 cores it can take > 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import logging

    for noisy in ("great_expectations", "mlflow.store.db.utils", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
