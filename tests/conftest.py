"""Shared fixtures: the real data folder (skipped where absent) and a tiny config."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

REPO = Path(__file__).resolve().parent.parent


def _shared_root() -> Path | None:
    env = os.environ.get("ULTRAFED_SHARED_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (cand / "busi" / "labels.csv").is_file():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $ULTRAFED_SHARED_DATA); the test is skipped where it is absent."""
    root = _shared_root()
    if root is None:
        pytest.skip("real ultrasound data not found (../shared/data or $ULTRAFED_SHARED_DATA): skipped")
    return root


@pytest.fixture(scope="session")
def tiny_cfg():
    """ViT-tiny at 64 px with a one-block decoder: the size every CPU test trains at."""
    from ultrafed.config import load_config

    return load_config(overrides={
        "model.img_size": 64, "model.decoder_depth": 1, "model.decoder_dim": 64,
        "model.decoder_heads": 2, "pretrain.batch_size": 8, "pretrain.num_workers": 0,
        "synth.per_site": 12, "synth.size": 96,
    })
