"""The Prefect :class:`~ultrafed.federated.round.SiteRunner`: each site action is a task run.

Embedded mode runs the tasks on the flow's thread pool in this process; federation mode has
each task dispatch the action to the site's own work pool (``tasks/dispatch.py``). A task's
retries are on its decorator (``tasks/sites.py``); the round waits ``federated.site_timeout_s``
for each site, and a crash or timeout becomes that site's :class:`SiteFailure`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from prefect.futures import PrefectFuture

from tasks.sites import check_site, train_site, validate_global
from ultrafed.config import Config
from ultrafed.federated.round import (GateOutcome, ModelRef, RoundContext, SiteFailure, UpdateRef, ValOutcome,
                                      first_line)


def collect(futures: Mapping[str, PrefectFuture], timeout_s: float,
            wrap: Callable[[Mapping[str, Any]], Any]) -> dict[str, Any]:
    """Each future's result wrapped, or a :class:`SiteFailure` with its one-line reason; never raises."""
    out: dict[str, Any] = {}
    for site, fut in futures.items():
        try:
            out[site] = wrap(fut.result(timeout=timeout_s))
        except Exception as e:  # noqa: BLE001 - every failure becomes a recorded exclusion reason
            out[site] = SiteFailure(first_line(e))
    return out


class PrefectRunner:
    """Submits check / train / validate per site as Prefect tasks (``mode``: embedded | federation)."""

    def __init__(self, cfg: Config, sites: Sequence[Mapping[str, Any]], mode: str) -> None:
        self.cfg_dict, self.mode = cfg.to_dict(), mode
        self.sites = {s["id"]: dict(s) for s in sites}
        self.timeout_s = float(cfg.federated.site_timeout_s)

    def check(self, ctx: RoundContext, sites: Sequence[str]) -> dict[str, GateOutcome | SiteFailure]:
        futs = {s: check_site.submit(self.sites[s], mode=self.mode, timeout_s=self.timeout_s,
                                     run_id=ctx.site_run_ids.get(s)) for s in sites}
        return collect(futs, self.timeout_s, GateOutcome.from_result)

    def train(self, ctx: RoundContext, sites: Sequence[str], model: ModelRef) -> dict[str, UpdateRef | SiteFailure]:
        futs = {s: train_site.submit(self.sites[s], self.cfg_dict, round_idx=ctx.round_idx, global_uri=model.uri,
                                     global_sha256=model.sha256, run_id=ctx.site_run_ids.get(s), run_key=ctx.run_key,
                                     mode=self.mode, timeout_s=self.timeout_s) for s in sites}
        return collect(futs, self.timeout_s, UpdateRef.from_result)

    def validate(self, ctx: RoundContext, sites: Sequence[str], model: ModelRef) -> dict[str, ValOutcome | SiteFailure]:
        futs = {s: validate_global.submit(self.sites[s], self.cfg_dict, global_uri=model.uri,
                                          global_sha256=model.sha256, mode=self.mode, timeout_s=self.timeout_s,
                                          run_id=ctx.site_run_ids.get(s), round_idx=ctx.round_idx) for s in sites}
        return collect(futs, self.timeout_s, ValOutcome.from_result)


def coordinator_step(name: str, fn: Callable[[], Any]) -> Any:
    """Run a coordinator step of the round (aggregate, register) as a task of the round's DAG."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(name=name, cache_policy=NO_CACHE)(fn)()
