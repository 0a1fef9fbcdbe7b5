"""One federated round as a Prefect flow run: :func:`ultrafed.federated.round.run_round` with
the Prefect site runner and MLflow tracking (DESIGN.md, "One round").

check_site (per site) -> train_site (per site, on its pool) -> aggregate -> validate_global
(per site) -> register, each a task of the round's DAG. The flow's parameters and result are
references (artifact URIs, sha256 digests, a server-state file), never tensors: the
coordinator's copy of the global model comes from the state cache the round filled.
"""
from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.runner import PrefectRunner, coordinator_step


def manifest_paths(sites: list[dict], mode: str) -> dict[str, str]:
    """Embedded mode knows where a site keeps its manifest (for ``lineage --verify``); federation never does."""
    if mode != "embedded":
        return {}
    from ultrafed.federated.client import site_manifest_path

    return {s["id"]: str(site_manifest_path(s["id"], s["root"], s.get("work_dir"))) for s in sites}


@flow(name="federated-round", flow_run_name="round-{round_idx}")
def federated_round(cfg: dict, sites: list[dict], *, mode: str, round_idx: int, global_uri: str,
                    global_sha256: str, server_state_path: str | None, parent_version: int | None,
                    parent_run_id: str, run_dir: str, code_commit: str, params_hash: str) -> dict[str, Any]:
    """Run one round; returns its summary, the new global model's reference and the server-state file."""
    from pathlib import Path

    import torch

    from ultrafed.config import from_dict
    from ultrafed.federated.round import ModelRef, RoundInputs, run_round
    from ultrafed.tracking.round_tracking import MlflowRoundTracker

    c = from_dict(cfg)
    tracker = MlflowRoundTracker(c, parent_run_id)
    server_state = torch.load(server_state_path, weights_only=True) if server_state_path else {}
    inputs = RoundInputs(round_idx=round_idx, global_state=tracker.store.get(global_uri, global_sha256),
                         global_ref=ModelRef(global_uri, global_sha256), server_state=server_state,
                         parent_version=parent_version, run_key=parent_run_id, code_commit=code_commit,
                         params_hash=params_hash, mode=mode, manifest_paths=manifest_paths(sites, mode))
    rec = run_round(c, [s["id"] for s in sites], inputs, PrefectRunner(c, sites, mode), tracker,
                    step=coordinator_step)
    ss_path = None
    if rec.server_state:
        ss_path = str(Path(run_dir) / f"server-state-{round_idx:04d}.pt")
        torch.save(rec.server_state, ss_path)
    return {**rec.summary(), "global_uri": rec.global_ref.uri, "global_sha256": rec.global_ref.sha256,
            "server_state_path": ss_path, "lineage": rec.lineage.to_dict(), "phases": rec.phases}
