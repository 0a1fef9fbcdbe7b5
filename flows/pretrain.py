"""Federated UltraMIM pretraining: R rounds of :func:`flows.round.federated_round`, resumable.

The coordinator checkpoints after every completed round (global weights, server-optimiser
state, history, LR horizon); ``resume=True`` continues from the newest checkpoint and, because
every random stream is derived from (seed, round, site), ends with the same weights as an
uninterrupted run. With ``federated.lr_horizon_rounds`` set, a run continued in chunks (a larger
``rounds`` on resume, ``ultrafed schedule``) follows the same learning-rate schedule as well.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.round import federated_round
from flows.settings import REPO_ROOT


def _glibc(name: str):
    """A glibc function via ctypes, or a no-op elsewhere (musl, macOS)."""
    import ctypes

    return getattr(ctypes.CDLL(None), name, lambda *_: 0)


def _limit_malloc_arenas() -> None:
    """Sites train in threads; glibc gives each thread its own arena and keeps freed tensor
    memory there, so RSS grew ~20% over 10 rounds (tests/flows/test_memory.py). Two arenas
    keep it flat at no measured cost."""
    _glibc("mallopt")(-8, 2)  # M_ARENA_MAX


def runs_home() -> Path:
    return Path(os.environ.get("ULTRAFED_HOME", REPO_ROOT / ".ultrafed")) / "runs"


def resolve_run_dir(run_name: str | None, resume: bool) -> Path:
    home = runs_home()
    if run_name:
        return home / run_name
    if resume:
        existing = sorted((d for d in home.glob("*") if d.is_dir()), key=lambda d: d.stat().st_mtime)
        if not existing:
            raise FileNotFoundError(f"nothing to resume under {home}")
        return existing[-1]
    return home / datetime.now(timezone.utc).strftime("pretrain-%Y%m%d-%H%M%S")


def _print_table(history: list[dict[str, Any]]) -> None:
    print(f"\n{'round':>5} {'sites':>5} {'excl':>4} {'train_loss':>10} {'val_loss':>9} {'spread':>7} {'version':>7} {'sec':>6}")
    for h in history:
        m = h["metrics"]
        print(f"{h['round']:>5} {int(m['sites_accepted']):>5} {int(m['sites_excluded']):>4} {m['train_loss']:>10.4f} "
              f"{m['global_val_loss']:>9.4f} {m.get('val_loss_spread_max_min', float('nan')):>7.4f} "
              f"{h['version']:>7} {m['seconds']:>6.1f}")


@flow(name="federated-pretrain")
def federated_pretrain(cfg: dict, sites: list[dict], *, mode: str = "embedded", rounds: int | None = None,
                       resume: bool = False, run_name: str | None = None) -> dict[str, Any]:
    """Run (or resume) federated pretraining; returns the final model URI and the round history."""
    import mlflow
    import psutil
    import torch

    from ultrafed.config import from_dict
    from ultrafed.federated.coordinator import CoordinatorState, load_latest, run_lr_horizon, save_round
    from ultrafed.models.mae import mae_from_config
    from ultrafed.tracking.runs import end_run, log_metrics, start_parent_run
    from ultrafed.tracking.store import put_state, state_sha256

    c = from_dict(cfg)
    rounds = rounds or c.federated.rounds
    run_dir = resolve_run_dir(run_name, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = load_latest(run_dir) if resume else None
    if state is None and any(run_dir.glob("round-*.ckpt")):
        raise RuntimeError(f"{run_dir} already holds rounds; pass --resume or another --run-name")
    horizon = run_lr_horizon(state, c.federated.lr_horizon_rounds, run_dir.name)  # a resume keeps the run's
    c = c.replace(**{"federated.lr_horizon_rounds": horizon})
    if state is None:
        parent = start_parent_run(c.replace(**{"federated.rounds": rounds}), run_name=run_dir.name,
                                  tags={"ultrafed.mode": mode, "ultrafed.sites": ",".join(s["id"] for s in sites)})
        init = mae_from_config(c.model, seed=c.seed).state_dict()
        state = CoordinatorState(round_idx=-1, global_state=init, parent_run_id=parent, lr_horizon_rounds=horizon)
        print(f"federated pretraining: {len(sites)} site(s) [{', '.join(s['id'] for s in sites)}], {rounds} round(s), "
              f"strategy {c.federated.strategy}, preset {c.model.preset} @ {c.model.img_size}px, mode {mode}; run dir {run_dir}"
              + (f"; LR schedule over {horizon} rounds" if horizon else ""))
    else:
        print(f"resuming {run_dir.name} after round {state.round_idx} (version {state.registered_version})"
              + (f", LR schedule over {horizon} rounds" if horizon else ""))
    parent_run_id = state.parent_run_id
    global_uri = put_state(state.global_state, parent_run_id, f"global-start-{state.round_idx + 1:04d}")
    global_sha = state_sha256(state.global_state)
    server_state_path = None
    if state.server_state:
        server_state_path = str(run_dir / f"server-state-{state.round_idx:04d}.pt")
        torch.save(state.server_state, server_state_path)
    from ultrafed.tracking.runs import code_commit

    commit, phash = code_commit(), c.params_hash()
    c_dict = c.to_dict()
    c_dict["federated"]["rounds"] = rounds
    round_flow = federated_round.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max(1, c.federated.max_concurrency)))
    for r in range(state.round_idx + 1, rounds):
        rec = round_flow(c_dict, sites, mode=mode, round_idx=r, global_uri=global_uri, global_sha256=global_sha,
                              server_state_path=server_state_path, parent_version=state.registered_version,
                              parent_run_id=parent_run_id, run_dir=str(run_dir),
                              code_commit=commit, params_hash=phash)
        from ultrafed.tracking.store import get_state

        new_global = get_state(rec["global_uri"], expected_sha256=rec["global_sha256"])
        server_state = torch.load(rec["server_state_path"], weights_only=True) if rec["server_state_path"] else {}
        state = CoordinatorState(round_idx=r, global_state=new_global, server_state=server_state,
                                 registered_version=rec["version"], history=state.history + [
                                     {k: rec[k] for k in ("round", "metrics", "excluded", "weights", "version", "model_uri")}],
                                 parent_run_id=parent_run_id, lr_horizon_rounds=horizon)
        save_round(run_dir, state)
        _glibc("malloc_trim")(0)  # hand the round's freed buffers back to the OS (glibc keeps freed arena pages in RSS)
        rss_mb = psutil.Process().memory_info().rss / 2**20
        log_metrics(parent_run_id, {"coordinator_rss_mb": rss_mb}, step=r)
        state.history[-1]["rss_mb"] = rss_mb
        global_uri, global_sha, server_state_path = rec["global_uri"], rec["global_sha256"], rec["server_state_path"]
        m = rec["metrics"]
        excl = "; ".join(f"{s}: {w}" for s, w in rec["excluded"].items()) or "none"
        print(f"round {r + 1}/{rounds}: {int(m['sites_accepted'])} site(s) aggregated, train loss {m['train_loss']:.4f}, "
              f"global val loss {m['global_val_loss']:.4f}, registered {rec['model_uri']} ({m['seconds']:.1f} s); excluded: {excl}")
    if state.history:
        from ultrafed.tracking.pictures import log_loss_curves

        log_loss_curves(parent_run_id)
    end_run(parent_run_id)
    _print_table(state.history)
    final = state.history[-1]["model_uri"] if state.history else None
    print(f"\nfinal global encoder: {final}; MLflow: {mlflow.get_tracking_uri()} (parent run {parent_run_id})")
    return {"model_uri": final, "version": state.registered_version, "history": state.history,
            "run_dir": str(run_dir), "parent_run_id": parent_run_id, "global_uri": global_uri}


def run_pretrain(cfg: dict, sites: list[dict], *, mode: str, rounds: int | None, resume: bool,
                 run_name: str | None) -> dict[str, Any]:
    """Entry for the CLI; in embedded mode concurrent sites split this machine's cores."""
    import torch

    _limit_malloc_arenas()
    conc = max(1, int(cfg["federated"]["max_concurrency"]))
    if mode == "embedded":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // min(conc, len(sites))))
    return federated_pretrain(cfg, sites, mode=mode, rounds=rounds, resume=resume, run_name=run_name)
