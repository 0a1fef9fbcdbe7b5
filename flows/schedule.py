"""Unattended federated pretraining: a cron-scheduled deployment that adds rounds to one run.

Every scheduled run resumes the same run folder (``<ULTRAFED_HOME>/runs/<run_name>``) from its
newest round checkpoint and trains ``rounds_per_run`` more rounds, up to ``total_rounds``: the
planned length of the run and its ``federated.lr_horizon_rounds``, so the chunks follow ONE
warmup+cosine learning-rate schedule (a run with all its rounds trains no more). The checkpoint
is written right after the round's global model is registered, so "continue from the latest
registered global model" means: from the version recorded in the run's last checkpoint (``ultrafed
models`` shows it as the newest version whose lineage names this run). The deployment has
``concurrency_limit=1`` (collision strategy ENQUEUE): a run that fires while the previous one
still trains waits in ``AwaitingConcurrencySlot`` instead of training the same folder twice.

Scheduling needs a real Prefect server (``$PREFECT_API_URL``); the ephemeral API of embedded
runs lives only as long as one command and has no scheduler.
"""
from __future__ import annotations

import os
import re
import urllib.request
from pathlib import Path
from typing import Any
from uuid import UUID

import flows  # noqa: F401  (runtime env before Prefect/MLflow imports)
from prefect import flow, get_run_logger

from flows.pretrain import run_pretrain, runs_home
from ultrafed.config import Config
from ultrafed.paths import REPO_ROOT

FLOW_NAME = "scheduled-pretrain"
ENTRYPOINT = "flows/schedule.py:scheduled_pretrain"
DEFAULT_POOL = "ultrafed-coordinator"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ScheduleError(RuntimeError):
    """The schedule cannot be created; the message is one line naming the problem."""


def planned_total(cfg: Config, total_rounds: int | None) -> int:
    """The rounds a scheduled run spans: ``--total-rounds``, else ``federated.lr_horizon_rounds``
    when set, else ``federated.rounds``. It becomes the run's LR horizon, so both must agree."""
    if total_rounds is not None and total_rounds < 1:
        raise ScheduleError(f"--total-rounds must be >= 1, got {total_rounds}")
    horizon = cfg.federated.lr_horizon_rounds
    total = total_rounds or horizon or cfg.federated.rounds
    if horizon and horizon != total:
        raise ScheduleError(f"--total-rounds {total} and federated.lr_horizon_rounds={horizon} disagree (the total is "
                            f"the LR horizon of the scheduled run); give one of them")
    return total


def check_run_horizon(run_name: str, total: int) -> None:
    """A run with rounds keeps the LR horizon it started with: refuse another total now, not at 2 am."""
    from ultrafed.federated.coordinator import load_latest

    st = load_latest(runs_home() / run_name)
    if st is not None and st.lr_horizon_rounds != total:
        was = "no fixed LR horizon (federated.lr_horizon_rounds 0)" if st.lr_horizon_rounds == 0 else \
            f"an LR horizon of {st.lr_horizon_rounds} rounds"
        raise ScheduleError(f"--total-rounds {total}: run {run_name} ({runs_home() / run_name}) was started with "
                            f"{was}, which a resume keeps; use that total or another --name")


def chunk_target(done: int, rounds_per_run: int, total_rounds: int | None) -> int:
    """Rounds the run has after this scheduled run: ``rounds_per_run`` more, never past the planned total."""
    target = done + rounds_per_run
    return min(target, total_rounds) if total_rounds else target


@flow(name=FLOW_NAME, flow_run_name="{run_name}+{rounds_per_run}")
def scheduled_pretrain(sites_file: str | None, rounds_per_run: int, run_name: str, params_file: str | None = None,
                       overrides: dict[str, Any] | None = None, tracking_uri: str | None = None,
                       total_rounds: int | None = None) -> dict[str, Any]:
    """Train ``rounds_per_run`` more rounds of run ``run_name`` (resuming its last checkpoint).

    ``total_rounds`` (None in deployments made before it existed: no cap, the config's horizon)
    is the run's LR horizon and its last round.
    """
    from ultrafed.config import load_config
    from ultrafed.federated.coordinator import load_latest
    from ultrafed.federated.sitesfile import resolve_sites
    from ultrafed.tracking.registry import latest_version
    from ultrafed.tracking.runs import configure_tracking

    log = get_run_logger()
    if rounds_per_run < 1:
        raise ValueError(f"rounds_per_run must be >= 1, got {rounds_per_run}")
    horizon = {"federated.lr_horizon_rounds": total_rounds} if total_rounds else {}
    cfg = load_config(params_file, {**(overrides or {}), **horizon})
    st = load_latest(runs_home() / run_name)
    done = 0 if st is None else st.round_idx + 1
    target = chunk_target(done, rounds_per_run, total_rounds)
    if target <= done:
        log.info(f"run {run_name}: all {total_rounds} planned round(s) done; nothing to train")
        return {"run_name": run_name, "rounds_before": done, "rounds_after": done,
                "model_uri": st.history[-1]["model_uri"], "version": st.registered_version,
                "run_dir": str(runs_home() / run_name)}
    mode, sites = resolve_sites(cfg, sites_file=sites_file)
    configure_tracking(tracking_uri)
    reg = latest_version(cfg.tracking.registered_model)
    if st is not None and reg is not None and reg.version != st.registered_version:
        # Another run registered versions of the same model, or this run crashed between
        # registering and checkpointing a round (that round is trained and registered again).
        log.warning(f"{cfg.tracking.registered_model}: registry at v{reg.version}, run {run_name} checkpointed "
                    f"v{st.registered_version}; continuing from the checkpoint (round {st.round_idx})")
    log.info(f"run {run_name}: {done} round(s) done, training rounds {done + 1}..{target}"
             + (f" of {total_rounds}" if total_rounds else ""))
    out = run_pretrain(cfg.to_dict(), sites, mode=mode, rounds=target, resume=True, run_name=run_name)
    return {"run_name": run_name, "rounds_before": done, "rounds_after": len(out["history"]),
            "model_uri": out["model_uri"], "version": out["version"], "run_dir": out["run_dir"]}


# -- deployment ------------------------------------------------------------------------------
def api_url() -> str:
    """$PREFECT_API_URL of a reachable server, else :class:`ScheduleError`."""
    url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not url:
        raise ScheduleError("scheduling needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api "
                            "after `prefect server start`); the ephemeral API of embedded runs has no scheduler")
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            if r.status >= 400:
                raise OSError(f"HTTP {r.status}")
    except (OSError, ValueError) as e:
        raise ScheduleError(f"PREFECT_API_URL={url}: Prefect server not reachable ({getattr(e, 'reason', e)})") from None
    return url


def validate_cron(cron: str, timezone: str | None) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone or "UTC")
    except ValueError as e:
        errors = getattr(e, "errors", lambda: [{"msg": str(e)}])()
        raise ScheduleError(f"--cron {cron!r}: {errors[0]['msg'].removeprefix('Value error, ')}") from None


def ensure_process_pool(pool: str) -> None:
    """Create work pool ``pool`` (type process) unless it exists; refuse a pool of another type."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            wp = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            return
    if wp.type != "process":
        raise ScheduleError(f"work pool {pool!r} is of type {wp.type!r}; scheduled pretraining needs a 'process' pool")


def deploy_schedule(*, cron: str, rounds_per_run: int, name: str, sites_file: str | None = None,
                    params_file: str | None = None, overrides: dict[str, Any] | None = None,
                    pool: str = DEFAULT_POOL, timezone: str | None = None, tracking_uri: str | None = None,
                    total_rounds: int | None = None) -> UUID:
    """Create or update deployment ``scheduled-pretrain/<name>`` (cron, at most one run at a time).

    The run folder and MLflow store are pinned in the deployment's environment as resolved
    here, so a worker started with other settings still continues the same run; so is the
    planned total (:func:`planned_total`), which every scheduled run uses as its LR horizon.
    """
    from prefect.schedules import Cron

    from ultrafed.config import load_config
    from ultrafed.tracking.runs import resolve_tracking_uri

    if not RUN_NAME.match(name):
        raise ScheduleError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (it names the run folder)")
    if rounds_per_run < 1:
        raise ScheduleError(f"--rounds-per-run must be >= 1, got {rounds_per_run}")
    total = planned_total(load_config(params_file, overrides or {}), total_rounds)
    check_run_horizon(name, total)
    validate_cron(cron, timezone)
    api_url()
    env = {"ULTRAFED_HOME": str(runs_home().parent), "MLFLOW_TRACKING_URI": resolve_tracking_uri(tracking_uri)}
    params = {"sites_file": str(Path(sites_file).resolve()) if sites_file else None, "rounds_per_run": rounds_per_run,
              "run_name": name, "params_file": str(Path(params_file).resolve()) if params_file else None,
              "overrides": dict(overrides or {}), "tracking_uri": env["MLFLOW_TRACKING_URI"], "total_rounds": total}
    ensure_process_pool(pool)
    source = scheduled_pretrain.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
    return source.deploy(name=name, work_pool_name=pool, schedules=[Cron(cron, timezone=timezone or "UTC")],
                         concurrency_limit=1, parameters=params, job_variables={"env": env},
                         description=f"{rounds_per_run} more federated round(s) of run {name} per scheduled run, "
                                     f"up to {total} (one LR schedule over {total} rounds)",
                         build=False, push=False, print_next_steps=False, ignore_warnings=True)
