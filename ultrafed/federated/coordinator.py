"""The coordinator's loop: rounds of :func:`ultrafed.federated.round.run_round`, checkpoints, exact resume.

The coordinator keeps its own resumable state (global weights, server-optimiser state,
history, LR horizon) in a checkpoint per completed round, so a crashed coordinator resumes
exactly where it stopped; because every random stream derives from (seed, round, site), a
resumed run ends with the same weights as an uninterrupted one. How a round is played
(Prefect flow, in-process) and recorded (MLflow, JSON lines) is the caller's choice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import Tensor

from ultrafed.config import Config
from ultrafed.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ultrafed.federated.round import ModelRef, RoundFailed, RoundInputs, RoundRecord, StateStore, require_quorum

State = dict[str, Tensor]
__all__ = ["CoordinatorState", "HorizonError", "RoundFailed", "RunDirError", "load_latest", "pretrain_rounds",
           "require_quorum", "run_lr_horizon", "save_round"]


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked (holds rounds without --resume, nothing to resume); one line."""


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


@dataclass(frozen=True)
class RunHooks:
    """What the loop needs from its caller: where weights go, how a run starts, how a round is played."""

    store: StateStore
    start_run: Callable[[Config], str]  # a new pretraining's tracking run id (the history's parent)
    play_round: Callable[[Config, RoundInputs], RoundRecord]
    after_round: Callable[[RoundRecord, "CoordinatorState"], None] = lambda rec, st: None


def pretrain_rounds(cfg: Config, *, run_dir: Path, rounds: int, resume: bool, hooks: RunHooks,
                    code_commit: str, mode: str = "embedded", manifest_paths: Mapping[str, str] | None = None,
                    init_state: State | None = None, say: Callable[[str], None] = print) -> CoordinatorState:
    """Play rounds ``last done + 1 .. rounds - 1`` and checkpoint after each; returns the final state.

    A new run (``resume`` False, no checkpoint in ``run_dir``) starts from ``init_state`` (default:
    the model of ``cfg.model`` at ``cfg.seed``); ``resume`` continues from the newest checkpoint.
    Each round's config has ``federated.rounds = rounds`` (the LR schedule's default span) and the
    run's LR horizon.
    """
    from ultrafed.models.mae import mae_from_config
    from ultrafed.federated.transfer import state_sha256

    if rounds < 1:
        raise RunDirError(f"run {run_dir.name}: rounds must be >= 1, got {rounds}")
    state = load_latest(run_dir) if resume else None
    if state is None and any(Path(run_dir).glob("round-*.ckpt")):
        raise RunDirError(f"{run_dir} already holds rounds; pass --resume or another --run-name")
    horizon = run_lr_horizon(state, cfg.federated.lr_horizon_rounds, Path(run_dir).name)
    cfg = cfg.replace(**{"federated.lr_horizon_rounds": horizon})
    params_hash = cfg.params_hash()
    round_cfg = cfg.replace(**{"federated.rounds": rounds})
    if state is None:
        parent = hooks.start_run(round_cfg)
        init = init_state if init_state is not None else mae_from_config(cfg.model, seed=cfg.seed).state_dict()
        state = CoordinatorState(round_idx=-1, global_state=dict(init), parent_run_id=parent, lr_horizon_rounds=horizon)
    assert state.parent_run_id is not None
    ref = ModelRef(hooks.store.put(state.global_state, state.parent_run_id, f"global-start-{state.round_idx + 1:04d}"),
                   state_sha256(state.global_state))
    for r in range(state.round_idx + 1, rounds):
        inputs = RoundInputs(round_idx=r, global_state=state.global_state, global_ref=ref,
                             server_state=state.server_state, parent_version=state.registered_version,
                             run_key=state.parent_run_id, code_commit=code_commit, params_hash=params_hash,
                             mode=mode, manifest_paths=dict(manifest_paths or {}))
        rec = hooks.play_round(round_cfg, inputs)
        state = CoordinatorState(round_idx=r, global_state=rec.global_state, server_state=rec.server_state,
                                 registered_version=rec.version, history=state.history + [rec.summary()],
                                 parent_run_id=state.parent_run_id, lr_horizon_rounds=horizon)
        save_round(run_dir, state)
        ref = rec.global_ref
        hooks.after_round(rec, state)
    return state
