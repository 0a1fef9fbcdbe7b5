"""Coordinator tasks: screen site updates, then aggregate the accepted ones."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from prefect import task


def _load_updates(refs: Sequence[Mapping[str, Any]]):
    from ultrafed.federated import SiteUpdate
    from ultrafed.tracking.store import get_state

    return [SiteUpdate(site=r["site"], state=get_state(r["update_uri"], expected_sha256=r["update_sha256"]),
                       n=int(r["n_images"]), loss=_site_loss(r)) for r in refs]


def _site_loss(ref: Mapping[str, Any]) -> float | None:
    """The global model's loss at the site before training (q-FedAvg), else its training loss."""
    m = ref.get("metrics", {})
    return m.get("loss_before", m.get("loss"))


@task(name="validate_updates")
def validate_updates(global_uri: str, global_sha256: str, refs: Sequence[Mapping[str, Any]],
                     norm_bound: float) -> dict[str, Any]:
    """Finite values, expected keys and shapes, norm bound; returns accepted refs, reasons, drift."""
    from ultrafed.federated.metrics import site_drift
    from ultrafed.federated.validation import screen_updates
    from ultrafed.tracking.store import get_state

    global_state = get_state(global_uri, expected_sha256=global_sha256)
    updates = _load_updates(refs)
    accepted, rejected = screen_updates(global_state, updates, norm_bound)
    ok = {u.site for u in accepted}
    drift = {site: {"update_norm": d.update_norm, "cosine_to_mean": d.cosine_to_mean, "bytes_sent": float(d.bytes_sent)}
             for site, d in (site_drift(global_state, accepted) if accepted else {}).items()}
    return {"accepted": [r for r in refs if r["site"] in ok], "rejected": dict(rejected), "drift": drift}


@task(name="aggregate")
def aggregate(global_uri: str, global_sha256: str, refs: Sequence[Mapping[str, Any]], *, strategy: str,
              strategy_params: Mapping[str, Any], server_state_path: str | None, round_run_id: str,
              out_dir: str, round_idx: int) -> dict[str, Any]:
    """Strategy over accepted updates; the new global model goes to MLflow, server state to disk."""
    import torch

    from ultrafed.federated.strategies import aggregate as run_strategy
    from ultrafed.tracking.store import get_state, put_state, state_sha256

    global_state = get_state(global_uri, expected_sha256=global_sha256)
    server_state = torch.load(server_state_path, weights_only=True) if server_state_path else None
    res = run_strategy(strategy, global_state, _load_updates(refs), server_state, **dict(strategy_params))
    uri = put_state(res.state, round_run_id, "global", meta={"round": round_idx, "strategy": strategy})
    ss_path = None
    if res.server_state:
        ss_path = str(Path(out_dir) / f"server-state-{round_idx:04d}.pt")
        torch.save(res.server_state, ss_path)
    return {"global_uri": uri, "global_sha256": state_sha256(res.state), "weights": dict(res.weights),
            "server_state_path": ss_path}
