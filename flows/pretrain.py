"""Federated UltraMIM pretraining as a Prefect flow: the library's coordinator loop
(:func:`ultrafed.federated.coordinator.pretrain_rounds`) with each round a
:func:`flows.round.federated_round` flow run and MLflow tracking.

The loop checkpoints after every completed round; ``resume=True`` continues from the newest
checkpoint and ends with the same weights as an uninterrupted run. With
``federated.lr_horizon_rounds`` set, a run continued in chunks (a larger ``rounds`` on resume,
``ultrafed schedule``) follows the same learning-rate schedule as well.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.round import federated_round, manifest_paths
from ultrafed.config import Config
from ultrafed.federated.round import RoundInputs, RoundRecord


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
    from ultrafed.paths import ultrafed_home

    return ultrafed_home() / "runs"


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


def _round_player(sites: list[dict], mode: str, run_dir: Path) -> Callable[[Config, RoundInputs], RoundRecord]:
    """Play a round as a :func:`flows.round.federated_round` flow run (references in, references out)."""
    import torch

    from ultrafed.federated.round import ModelRef, RoundRecord
    from ultrafed.tracking.lineage import Lineage
    from ultrafed.tracking.store import get_state

    def play(cfg: Config, inputs: RoundInputs) -> RoundRecord:
        ss_path = None
        if inputs.server_state:
            ss_path = str(run_dir / f"server-state-{inputs.round_idx - 1:04d}.pt")
            torch.save(dict(inputs.server_state), ss_path)
        round_flow = federated_round.with_options(
            task_runner=ThreadPoolTaskRunner(max_workers=max(1, cfg.federated.max_concurrency)))
        out = round_flow(cfg.to_dict(), sites, mode=mode, round_idx=inputs.round_idx,
                         global_uri=inputs.global_ref.uri, global_sha256=inputs.global_ref.sha256,
                         server_state_path=ss_path, parent_version=inputs.parent_version,
                         parent_run_id=inputs.run_key, run_dir=str(run_dir), code_commit=inputs.code_commit,
                         params_hash=inputs.params_hash)
        ref = ModelRef(out["global_uri"], out["global_sha256"])
        server_state = torch.load(out["server_state_path"], weights_only=True) if out["server_state_path"] else {}
        return RoundRecord(round_idx=out["round"], metrics=out["metrics"], excluded=out["excluded"],
                           weights=out["weights"], global_state=get_state(ref.uri, expected_sha256=ref.sha256),
                           global_ref=ref, server_state=server_state, version=out["version"],
                           model_uri=out["model_uri"], lineage=Lineage.from_dict(out["lineage"]),
                           phases=out["phases"])

    return play


def _after_round(rounds: int, parent_run_id: str) -> Callable[[RoundRecord, Any], None]:
    import psutil

    from ultrafed.tracking.runs import log_metrics
    from ultrafed.tracking.store import retain

    def after(rec: RoundRecord, state: Any) -> None:
        retain({rec.global_ref.sha256})  # the next round needs only the new global model
        _glibc("malloc_trim")(0)  # hand the round's freed buffers back to the OS (glibc keeps freed arena pages in RSS)
        rss_mb = psutil.Process().memory_info().rss / 2**20
        log_metrics(parent_run_id, {"coordinator_rss_mb": rss_mb}, step=rec.round_idx)
        state.history[-1]["rss_mb"] = rss_mb
        m = rec.metrics
        excl = "; ".join(f"{s}: {w}" for s, w in rec.excluded.items()) or "none"
        print(f"round {rec.round_idx + 1}/{rounds}: {int(m['sites_accepted'])} site(s) aggregated, train loss "
              f"{m['train_loss']:.4f}, global val loss {m['global_val_loss']:.4f}, registered {rec.model_uri} "
              f"({m['seconds']:.1f} s); excluded: {excl}", flush=True)

    return after


@flow(name="federated-pretrain")
def federated_pretrain(cfg: dict, sites: list[dict], *, mode: str = "embedded", rounds: int | None = None,
                       resume: bool = False, run_name: str | None = None) -> dict[str, Any]:
    """Run (or resume) federated pretraining; returns the final model URI and the round history."""
    import mlflow

    from ultrafed.config import from_dict
    from ultrafed.federated.coordinator import RunHooks, load_latest, pretrain_rounds
    from ultrafed.tracking.round_tracking import MlflowStateStore
    from ultrafed.tracking.runs import code_commit, end_run, start_parent_run

    c = from_dict(cfg)
    rounds = rounds if rounds is not None else c.federated.rounds
    run_dir = resolve_run_dir(run_name, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = load_latest(run_dir) if resume else None
    if previous is None:
        print(f"federated pretraining: {len(sites)} site(s) [{', '.join(s['id'] for s in sites)}], {rounds} round(s), "
              f"strategy {c.federated.strategy}, preset {c.model.preset} @ {c.model.img_size}px, mode {mode}; "
              f"run dir {run_dir}" + (f"; LR schedule over {c.federated.lr_horizon_rounds} rounds"
                                      if c.federated.lr_horizon_rounds else ""))
    else:
        print(f"resuming {run_dir.name} after round {previous.round_idx} (version {previous.registered_version})"
              + (f", LR schedule over {previous.lr_horizon_rounds} rounds" if previous.lr_horizon_rounds else ""))
    parent: list[str] = [previous.parent_run_id] if previous and previous.parent_run_id else []

    def start_run(round_cfg: Config) -> str:
        parent.append(start_parent_run(round_cfg, run_name=run_dir.name,
                                       tags={"ultrafed.mode": mode, "ultrafed.sites": ",".join(s["id"] for s in sites)}))
        return parent[-1]

    player = _round_player(sites, mode, run_dir)
    hooks = RunHooks(store=MlflowStateStore(), start_run=start_run, play_round=player,
                     after_round=lambda rec, st: _after_round(rounds, st.parent_run_id)(rec, st))
    state = pretrain_rounds(c, run_dir=run_dir, rounds=rounds, resume=resume, hooks=hooks, code_commit=code_commit(),
                            mode=mode, manifest_paths=manifest_paths(sites, mode))
    parent_run_id = state.parent_run_id
    if state.history:
        from ultrafed.tracking.pictures import log_loss_curves

        log_loss_curves(parent_run_id)
    end_run(parent_run_id)
    _print_table(state.history)
    final = state.history[-1]["model_uri"] if state.history else None
    print(f"\nfinal global encoder: {final}; MLflow: {mlflow.get_tracking_uri()} (parent run {parent_run_id})")
    return {"model_uri": final, "version": state.registered_version, "history": state.history,
            "run_dir": str(run_dir), "parent_run_id": parent_run_id}


def run_pretrain(cfg: dict, sites: list[dict], *, mode: str, rounds: int | None, resume: bool,
                 run_name: str | None) -> dict[str, Any]:
    """Entry for the CLI; in embedded mode concurrent sites split this machine's cores."""
    import torch

    _limit_malloc_arenas()
    conc = max(1, int(cfg["federated"]["max_concurrency"]))
    if mode == "embedded":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // min(conc, len(sites))))
    return federated_pretrain(cfg, sites, mode=mode, rounds=rounds, resume=resume, run_name=run_name)
