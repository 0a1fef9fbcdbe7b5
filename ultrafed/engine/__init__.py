"""Engine: local UltraMIM training, checkpoints and device choice (pure torch, no orchestration)."""
from ultrafed.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ultrafed.engine.device import select_device
from ultrafed.engine.pretrain import (
    LocalResult,
    NonFiniteLossError,
    build_optimizer,
    draw_mask,
    lr_at,
    pretrain_single_site,
    scaled_lr,
    train_local,
    train_step,
)

__all__ = [
    "CheckpointError", "LocalResult", "NonFiniteLossError", "build_optimizer", "draw_mask", "load_checkpoint",
    "lr_at", "pretrain_single_site", "save_checkpoint", "scaled_lr", "select_device", "train_local",
    "train_step",
]
