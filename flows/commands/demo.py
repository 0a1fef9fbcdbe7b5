"""``ultrafed demo``: the whole pipeline on the embedded default (or ``--data`` real sites)."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline end to end (synthetic sites by default)")
    p.add_argument("--data", help="real data folder with busi/ddti/hc18 (e.g. ../shared/data) instead of synthetic sites")
    p.add_argument("--sites", help="a sites.yaml instead of the synthetic cohort")
    p.add_argument("--rounds", type=int, help="federated rounds (default: params federated.rounds)")
    p.add_argument("--no-promote", action="store_true", help="stop before promotion")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the embedded store under mlflow/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params.yaml value")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from flows.commands.pretrain import load_cfg, resolve_sites
    from flows.pipeline import pipeline
    from ultrafed.config import REPO_ROOT
    from ultrafed.tracking.runs import configure_tracking

    cfg = load_cfg(args)
    configure_tracking(args.tracking_uri)
    mode, sites = resolve_sites(args, cfg)
    if args.data:
        tasks = [("busi-cls", args.data), ("busi-seg", args.data), ("ddti-seg", args.data), ("hc18-seg", args.data)]
    else:
        root = cfg.data.root if os.path.isabs(cfg.data.root) else str(REPO_ROOT / cfg.data.root)
        tasks = [("synth-cls", root), ("synth-seg", root)]
    if mode == "embedded":
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // min(max(1, cfg.federated.max_concurrency), len(sites))))
    pipeline(cfg.to_dict(), sites, tasks=tasks, mode=mode, rounds=args.rounds, promote=not args.no_promote)
    return 0
