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


def neutral(text: str) -> str:
    """``text`` (a command, an error, a path) with this checkout's paths made relative: ``<repo>/x`` becomes
    ``x`` and a folder beside the repository ``../shared/data``, so a committed document names no folder of
    the machine that wrote it."""
    for base, rel in ((REPO_ROOT, ""), (REPO_ROOT.parent, "../")):
        text = text.replace(f"{base}/", rel)
    return text
