"""MLflow behind :func:`ultrafed.federated.round.run_round`: runs, metrics, weights, the registry.

One child run per round under the pretraining's parent run and one per site under it (sites
log their own results there); the round's metrics go to both the round run and, by step, the
parent run; the new global encoder is registered with the round's lineage.
"""
from __future__ import annotations

import math
from typing import Any, Collection, Mapping, Sequence

from torch import Tensor

from ultrafed.config import Config
from ultrafed.federated.round import RoundContext
from ultrafed.tracking.lineage import Lineage


class MlflowStateStore:
    """Weights as run artifacts (:mod:`ultrafed.tracking.store`), checked by sha256 on every read."""

    def put(self, state: Mapping[str, Tensor], run_id: str | None, name: str, *,
            meta: Mapping[str, Any] | None = None) -> str:
        from ultrafed.tracking.store import put_state

        if run_id is None:
            raise ValueError(f"MlflowStateStore.put({name!r}): needs a run to log the state under")
        return put_state(state, run_id, name, meta=meta)

    def get(self, uri: str, sha256: str | None) -> dict[str, Tensor]:
        from ultrafed.tracking.store import get_state

        return get_state(uri, expected_sha256=sha256)


class MlflowRoundTracker:
    """Records rounds of one pretraining (``parent_run_id``) in MLflow and registers each global encoder."""

    def __init__(self, cfg: Config, parent_run_id: str, *, pictures: bool = True) -> None:
        self.cfg, self.parent_run_id, self.pictures = cfg, parent_run_id, pictures
        self.store = MlflowStateStore()

    def start_round(self, round_idx: int, sites: Sequence[str], run_key: str) -> RoundContext:
        from ultrafed.tracking.runs import start_round_run, start_site_run

        run = start_round_run(self.parent_run_id, round_idx)
        return RoundContext(round_idx=round_idx, run_id=run, run_key=run_key,
                            site_run_ids={s: start_site_run(run, s, round_idx) for s in sites})

    def log_round(self, ctx: RoundContext, metrics: Mapping[str, float]) -> None:
        from ultrafed.tracking.runs import log_metrics

        assert ctx.run_id is not None
        log_metrics(ctx.run_id, metrics)
        log_metrics(self.parent_run_id, metrics, step=ctx.round_idx)
        if self.pictures:
            from ultrafed.tracking.pictures import log_site_bars

            for name in ("val_loss", "train_loss"):
                per_site = {k.split(".", 1)[1]: v for k, v in metrics.items()
                            if k.startswith(f"{name}.") and math.isfinite(v)}
                if per_site:
                    log_site_bars(ctx.run_id, per_site, metric=name, round_idx=ctx.round_idx)

    def register(self, ctx: RoundContext, state: dict[str, Tensor], lineage: Lineage,
                 metrics: Mapping[str, float]) -> tuple[int | None, str | None]:
        from ultrafed.models.mae import blank_mae
        from ultrafed.tracking.registry import register_encoder

        assert ctx.run_id is not None
        model = blank_mae(self.cfg.model)
        model.load_state_dict(state)
        v = register_encoder(model.encoder, name=self.cfg.tracking.registered_model, run_id=ctx.run_id,
                             lineage=lineage, metrics=dict(metrics))
        return int(v.version), v.uri

    def end_round(self, ctx: RoundContext, failed_sites: Collection[str], ok: bool) -> None:
        """Close every run of the round: FAILED for an excluded site, and for the round if it failed."""
        from ultrafed.tracking.runs import end_run

        for site, rid in ctx.site_run_ids.items():
            if rid:
                end_run(rid, "FAILED" if site in failed_sites else "FINISHED")
        if ctx.run_id:
            end_run(ctx.run_id, "FINISHED" if ok else "FAILED")
