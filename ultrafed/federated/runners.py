"""Site actions run in this process: the :class:`~ultrafed.federated.round.SiteRunner` of the
benchmarks and the GPU protocol (the Prefect runner, for the flows, lives in ``tasks/``).

Each action goes through :func:`ultrafed.federated.client.run_action`, the same entry a
site's Prefect worker calls, on a thread pool of ``federated.max_concurrency`` workers; a
crash or a missed deadline becomes that site's :class:`SiteFailure`, never the round's.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ultrafed.config import Config
from ultrafed.federated.round import (GATE_SKIPPED, GateOutcome, ModelRef, RoundContext, SiteFailure, StateStore,
                                      UpdateRef, ValOutcome, first_line)


@dataclass(frozen=True)
class LocalSite:
    """A site whose data this process can read. ``train``/``val`` replace its own splits when given
    (a pooled "central" site, a capped smoke run)."""

    id: str
    root: str | None = None
    work_dir: str | None = None
    train: tuple | None = None
    val: tuple | None = None


class InProcessRunner:
    """Runs check / train / validate for local sites on a thread pool, with a deadline per action.

    ``gate=False`` runs no quality gate (a machine without Great Expectations); every site's
    outcome is then ``skipped`` and the lineage says so.
    """

    def __init__(self, cfg: Config, sites: Sequence[LocalSite], store: StateStore, *, gate: bool = True,
                 timeout_s: float | None = None, max_workers: int | None = None) -> None:
        self.cfg, self.store, self.gate = cfg, store, gate
        self.sites = {s.id: s for s in sites}
        self.timeout_s = float(timeout_s if timeout_s is not None else cfg.federated.site_timeout_s)
        self.max_workers = max(1, max_workers or cfg.federated.max_concurrency)

    def _many(self, sites: Sequence[str], call: Callable[[LocalSite], Any],
              wrap: Callable[[Mapping[str, Any]], Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if not sites:
            return out
        pool = ThreadPoolExecutor(max_workers=min(self.max_workers, len(sites)), thread_name_prefix="site")
        try:
            futs = {s: pool.submit(call, self.sites[s]) for s in sites}
            for s, fut in futs.items():
                try:
                    out[s] = wrap(fut.result(timeout=self.timeout_s))
                except FutureTimeout:
                    out[s] = SiteFailure(f"TimeoutError: no answer within {self.timeout_s:g} s")
                except Exception as e:  # noqa: BLE001 - a site's crash is its exclusion reason
                    out[s] = SiteFailure(first_line(e))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # a hung site must not hold the round
        return out

    def _action(self, action: str, site: LocalSite, ctx: RoundContext, params: Mapping[str, Any],
                extra: Mapping[str, Any]) -> dict[str, Any]:
        from ultrafed.federated.client import run_action

        return run_action(action, site.id, params, root=site.root, work_dir=site.work_dir,
                          result_run_id=ctx.site_run_ids.get(site.id), extra=extra)

    def check(self, ctx: RoundContext, sites: Sequence[str]) -> dict[str, GateOutcome | SiteFailure]:
        if not self.gate:
            return {s: GateOutcome(site=s, status=GATE_SKIPPED, reasons=("no quality gate on this machine",))
                    for s in sites}
        return self._many(sites, lambda st: self._action("check", st, ctx, {}, {}), GateOutcome.from_result)

    def train(self, ctx: RoundContext, sites: Sequence[str], model: ModelRef) -> dict[str, UpdateRef | SiteFailure]:
        params = {"round_idx": ctx.round_idx, "global_uri": model.uri, "global_sha256": model.sha256,
                  "run_key": ctx.run_key}

        def call(st: LocalSite) -> dict[str, Any]:
            extra: dict[str, Any] = {"cfg": self.cfg, "store": self.store}
            if st.train is not None:
                extra["records"] = st.train
            return self._action("train", st, ctx, {**params, "update_run_id": ctx.site_run_ids.get(st.id)}, extra)

        return self._many(sites, call, UpdateRef.from_result)

    def validate(self, ctx: RoundContext, sites: Sequence[str], model: ModelRef) -> dict[str, ValOutcome | SiteFailure]:
        def call(st: LocalSite) -> dict[str, Any]:
            extra: dict[str, Any] = {"cfg": self.cfg, "store": self.store}
            if st.val is not None:
                extra["records"] = st.val
            return self._action("validate", st, ctx, {"global_uri": model.uri, "global_sha256": model.sha256,
                                                      "picture_run_id": ctx.site_run_ids.get(st.id),
                                                      "round_idx": ctx.round_idx}, extra)

        return self._many(sites, call, ValOutcome.from_result)
