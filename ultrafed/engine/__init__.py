"""Engine: local UltraMIM training, checkpoints and device choice (pure torch, no orchestration)."""
from ultrafed.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ultrafed.engine.device import select_device
from ultrafed.engine.pretrain import (
    LocalResult,
    NonFiniteLossError,
    build_optimizer,
    lr_at,
    pretrain_single_site,
    scaled_lr,
    train_local,
)

__all__ = [
    "CheckpointError", "LocalResult", "NonFiniteLossError", "build_optimizer", "load_checkpoint",
    "lr_at", "pretrain_single_site", "save_checkpoint", "scaled_lr", "select_device", "train_local",
]
