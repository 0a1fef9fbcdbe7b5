"""Coordinator-side round logic that needs no orchestrator: screening, aggregation, checkpoints.

The coordinator handles weights only through references (artifact URIs + sha256) and keeps
its own resumable state (global weights, server-optimiser state, history) in a checkpoint
per completed round, so a crashed coordinator resumes exactly where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import Tensor

from ultrafed.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

State = dict[str, Tensor]


class RoundFailed(RuntimeError):
    """Fewer than ``min_sites`` usable updates: the round must not produce a model."""


class HorizonError(ValueError):
    """The LR horizon is negative, or a resume asks for another one than the run started with (one line)."""


@dataclass
class CoordinatorState:
    """Everything needed to continue after round ``round_idx`` (-1 = nothing done yet)."""

    round_idx: int
    global_state: State
    server_state: dict[str, Any] = field(default_factory=dict)
    registered_version: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    parent_run_id: str | None = None
    lr_horizon_rounds: int = 0  # the run's federated.lr_horizon_rounds, fixed when it started


def checkpoint_path(run_dir: Path, round_idx: int) -> Path:
    return Path(run_dir) / f"round-{round_idx:04d}.ckpt"


def save_round(run_dir: Path, st: CoordinatorState) -> Path:
    """Atomic checkpoint of the coordinator after a completed round."""
    path = checkpoint_path(run_dir, st.round_idx)
    save_checkpoint(path, {"round_idx": st.round_idx, "global_state": st.global_state,
                           "server_state": st.server_state, "registered_version": st.registered_version,
                           "history": st.history, "parent_run_id": st.parent_run_id,
                           "lr_horizon_rounds": st.lr_horizon_rounds})
    return path


def load_latest(run_dir: Path) -> CoordinatorState | None:
    """The newest loadable round checkpoint in ``run_dir`` (a half-written one is skipped, not fatal)."""
    for path in sorted(Path(run_dir).glob("round-*.ckpt"), reverse=True):
        try:
            d = load_checkpoint(path)
        except CheckpointError as e:
            print(f"warning: {e}; trying the previous round")
            continue
        return CoordinatorState(round_idx=d["round_idx"], global_state=d["global_state"],
                                server_state=d.get("server_state") or {}, registered_version=d.get("registered_version"),
                                history=d.get("history") or [], parent_run_id=d.get("parent_run_id"),
                                lr_horizon_rounds=int(d.get("lr_horizon_rounds") or 0))  # older checkpoints: 0
    return None


def run_lr_horizon(state: CoordinatorState | None, requested: int, run_name: str) -> int:
    """The run's LR horizon (``federated.lr_horizon_rounds``): this call's for a new run
    (``state`` None), else the one recorded when the run started.

    On resume ``requested`` 0 means "keep the run's"; any other value must equal it, since a new
    horizon mid-run would bend the schedule the earlier rounds already followed.
    """
    if requested < 0:
        raise HorizonError(f"run {run_name}: federated.lr_horizon_rounds must be >= 0 (0 = the rounds of each call), "
                           f"got {requested}")
    if state is None:
        return requested
    recorded = state.lr_horizon_rounds
    if requested and requested != recorded:
        was = f"{recorded} (the rounds of each call)" if recorded == 0 else str(recorded)
        raise HorizonError(f"run {run_name}: federated.lr_horizon_rounds={requested} given, but the run was started "
                              f"with {was}; resume keeps the run's horizon: drop the setting or start a new --run-name")
    return recorded


def require_quorum(accepted: Sequence[str], min_sites: int, excluded: Mapping[str, str]) -> None:
    """k-of-n: fail loudly, naming every excluded site and why."""
    if len(accepted) < min_sites:
        why = "; ".join(f"{s}: {r}" for s, r in sorted(excluded.items())) or "no site reported"
        raise RoundFailed(f"only {len(accepted)} usable site update(s), need at least {min_sites} ({why})")
