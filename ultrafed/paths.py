"""Where the repository and UltraFed's working folder are: one answer for every module.

The home folder (``$ULTRAFED_HOME``, else ``<repo>/.ultrafed``) holds run folders, site work
folders, Prefect's embedded state and the servers of ``ultrafed federation up``. It is read at
each call, never at import, so a launcher or a test that sets the variable later is obeyed.
Standard library only: ``bench/gpu_protocol.py`` imports it on a machine without MLflow.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HOME = REPO_ROOT / ".ultrafed"
# The evaluation protocols' own store and run folders (bench/run_protocol.py), apart from the demos'.
RESULTS_HOME = DEFAULT_HOME / "results"
RESULTS_TRACKING_URI = f"sqlite:///{RESULTS_HOME / 'mlflow.db'}"


def ultrafed_home() -> Path:
    """``$ULTRAFED_HOME`` when set (and not empty), else ``<repo>/.ultrafed``."""
    return Path(os.environ.get("ULTRAFED_HOME") or DEFAULT_HOME)


def repo_path(path: str | Path) -> Path:
    """A path as params.yaml and sites files write it: absolute as is, relative to the repo root otherwise."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def shown(path: str | Path) -> str:
    """``path`` as a committed document may print it: relative to the repo root where it lies inside
    the repository or beside it (``../shared/data``), else as given."""
    p = Path(os.path.abspath(path))
    for base, prefix in ((REPO_ROOT, ""), (REPO_ROOT.parent, "../")):
        if p == base or base in p.parents:
            rel = p.relative_to(base).as_posix()
            return prefix + rel if rel != "." else (prefix.rstrip("/") or ".")
    return str(path)
