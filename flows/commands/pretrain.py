"""``ultrafed pretrain``: federated UltraMIM pretraining (embedded by default)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# load_cfg, parse_overrides and resolve_sites live in common.py; named here too for demo.py,
# flows/schedule.py and the tests that import them from this module.
from flows.commands.common import add_config_args, load_cfg, parse_overrides, resolve_sites, tracking_uri
from ultrafed.config import ENCODER_PRESETS

__all__ = ["add_parser", "load_cfg", "parse_overrides", "resolve_sites", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="federated UltraMIM pretraining over the sites of a sites.yaml")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--sites", help="sites.yaml (default: the synthetic cohort under params data.root)")
    src.add_argument("--data", help="real data folder with busi/ddti/hc18 (e.g. ../shared/data): three sites")
    p.add_argument("--rounds", type=int,
                   help="rounds (default: params federated.rounds); with --resume, the run's new total")
    p.add_argument("--preset", choices=ENCODER_PRESETS, help="encoder preset")
    p.add_argument("--strategy", help="aggregation strategy (fedavg, fedavg_uniform, fedprox, fedavgm, fedadam, median, trimmed_mean, qfedavg)")
    p.add_argument("--resume", action="store_true", help="continue the run (default: the latest) from its last completed round")
    p.add_argument("--run-name", help="name of the run folder under .ultrafed/runs")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else params tracking.tracking_uri)")
    p.add_argument("--metrics-out", help="write the final model URI and metrics as JSON (for dvc metrics)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)  # every check (params, --rounds, sites against min_sites) before any work
    mode, sites = resolve_sites(args, cfg)
    from flows.pretrain import run_pretrain
    from ultrafed.federated.coordinator import HorizonError, RoundFailed
    from ultrafed.tracking.runs import configure_tracking

    if mode == "federation":  # talk to the rehearsal's servers unless the user points elsewhere
        import os

        from flows.commands.common import federation_env

        for k, v in federation_env().items():
            os.environ.setdefault(k, v)
        if "PREFECT_API_URL" not in os.environ:
            raise SystemExit("ultrafed: federation mode needs PREFECT_API_URL (or `ultrafed federation up`)")
    uri = tracking_uri(args, cfg)
    configure_tracking(uri)
    cfg = cfg.replace(**{"tracking.tracking_uri": uri})  # the run's params say where it logs (not in its hash)
    try:
        out = run_pretrain(cfg.to_dict(), sites, mode=mode, rounds=args.rounds, resume=args.resume, run_name=args.run_name)
    except RoundFailed as e:
        print(f"ultrafed pretrain: round failed: {e}", file=sys.stderr)
        return 1
    except HorizonError as e:
        print(f"ultrafed pretrain: {e}", file=sys.stderr)
        return 1
    if args.metrics_out and out.get("model_uri"):
        import json

        last = out["history"][-1]
        Path(args.metrics_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics_out).write_text(json.dumps({"model_uri": out["model_uri"], "rounds": len(out["history"]),
                                                      **{k: v for k, v in last["metrics"].items() if "." not in k}},
                                                     indent=2))
    return 0 if out.get("model_uri") else 1
