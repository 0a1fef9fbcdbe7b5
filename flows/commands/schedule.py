"""``ultrafed schedule``: run federated rounds unattended on a cron schedule (needs a Prefect server)."""
from __future__ import annotations

import argparse
import os

from flows.commands.common import add_config_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="create/update a cron-scheduled deployment that adds rounds to one run",
                       description="Each scheduled run resumes run NAME from its last checkpoint and trains "
                                   "--rounds-per-run more rounds, up to --total-rounds, under one learning-rate "
                                   "schedule over the total; two runs never overlap (concurrency limit 1). "
                                   "Needs PREFECT_API_URL and a worker: prefect worker start --pool POOL --type process")
    p.add_argument("--cron", required=True, help='cron expression, e.g. "0 2 * * *" (02:00 every day)')
    p.add_argument("--rounds-per-run", type=int, required=True, help="rounds each scheduled run adds")
    p.add_argument("--total-rounds", type=int, default=None,
                   help="planned rounds of the run: the LR warmup+cosine spans them and no run trains past them "
                        "(default: params federated.lr_horizon_rounds if > 0, else federated.rounds)")
    p.add_argument("--sites", help="sites.yaml (default: the synthetic cohort under params data.root)")
    p.add_argument("--name", default="scheduled", help="deployment name = run folder name (default: scheduled)")
    p.add_argument("--pool", default=None, help="process work pool (default: ultrafed-coordinator; created if missing)")
    p.add_argument("--timezone", default=None, help="IANA time zone of the cron expression (default: UTC)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI the runs use (default: $MLFLOW_TRACKING_URI, "
                                          "else params tracking.tracking_uri)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flows.commands.common import load_cfg, parse_overrides, tracking_uri
    from ultrafed.config import ConfigError
    from ultrafed.federated.sitesfile import SitesFileError, check_sites, load_sites_file

    try:  # fail now, not at 2 am: the params, overrides and sites file must load and fit together
        overrides = parse_overrides(args.set)
        cfg = load_cfg(args)
        if args.sites:
            check_sites(load_sites_file(args.sites)[1], source=args.sites, min_sites=cfg.federated.min_sites)
    except (ConfigError, SitesFileError) as e:
        raise SystemExit(f"ultrafed schedule: {e}") from None
    from flows.schedule import DEFAULT_POOL, ScheduleError, deploy_schedule, planned_total

    pool = args.pool or DEFAULT_POOL
    try:
        total = planned_total(cfg, args.total_rounds)
        deployment_id = deploy_schedule(cron=args.cron, rounds_per_run=args.rounds_per_run, name=args.name,
                                        sites_file=args.sites, params_file=args.params, overrides=overrides,
                                        pool=pool, timezone=args.timezone, tracking_uri=tracking_uri(args, cfg),
                                        total_rounds=total)
    except ScheduleError as e:
        raise SystemExit(f"ultrafed schedule: {e}") from None
    url = os.environ["PREFECT_API_URL"]
    print(f"deployment scheduled-pretrain/{args.name} ({deployment_id}): cron '{args.cron}' "
          f"({args.timezone or 'UTC'}), +{args.rounds_per_run} round(s) per run up to {total} (one LR schedule "
          f"over {total} rounds), at most one run at a time, pool {pool} on {url}")
    print(f"runs need a worker:  PREFECT_API_URL={url} prefect worker start --pool {pool} --type process")
    return 0
