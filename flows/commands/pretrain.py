"""``ultrafed pretrain``: federated UltraMIM pretraining (embedded by default)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="federated UltraMIM pretraining over the sites of a sites.yaml")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--sites", help="sites.yaml (default: the synthetic cohort under params data.root)")
    src.add_argument("--data", help="real data folder with busi/ddti/hc18 (e.g. ../shared/data): three sites")
    p.add_argument("--rounds", type=int,
                   help="rounds (default: params federated.rounds); with --resume, the run's new total")
    p.add_argument("--preset", choices=["tiny", "small", "base"], help="encoder preset")
    p.add_argument("--strategy", help="aggregation strategy (fedavg, fedavg_uniform, fedprox, fedavgm, fedadam, median, trimmed_mean, qfedavg)")
    p.add_argument("--resume", action="store_true", help="continue the run (default: the latest) from its last completed round")
    p.add_argument("--run-name", help="name of the run folder under .ultrafed/runs")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the embedded store)")
    p.add_argument("--metrics-out", help="write the final model URI and metrics as JSON (for dvc metrics)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params.yaml value, e.g. --set model.img_size=64 (YAML value)")
    p.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"ultrafed: --set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def resolve_sites(args: argparse.Namespace, cfg) -> tuple[str, list[dict]]:
    """(mode, sites) from --sites / --data, else the synthetic cohort (made on first use)."""
    from ultrafed.config import REPO_ROOT
    from ultrafed.federated.sitesfile import cohort_sites, load_sites_file, shared_data_sites

    if getattr(args, "sites", None):
        return load_sites_file(args.sites)
    if getattr(args, "data", None):
        sites = shared_data_sites(args.data)
        if not sites:
            raise SystemExit(f"ultrafed: {args.data}: no busi/ddti/hc18 folders with labels.csv")
        return "embedded", sites
    root = Path(cfg.data.root)
    root = root if root.is_absolute() else REPO_ROOT / root
    if not cohort_sites(root):
        from ultrafed.data.synth import make_cohort

        print(f"making the synthetic cohort in {root} ({cfg.synth.sites} sites x {cfg.synth.per_site} images)")
        make_cohort(root, cfg.synth.sites, cfg.synth.per_site, cfg.synth.seed, cfg.synth.size)
    return "embedded", cohort_sites(root)


def load_cfg(args: argparse.Namespace):
    from ultrafed.config import load_config

    over = parse_overrides(getattr(args, "set", []))
    if getattr(args, "preset", None):
        over["model.preset"] = args.preset
    if getattr(args, "strategy", None):
        over["federated.strategy"] = args.strategy
    if getattr(args, "tracking_uri", None):
        over["tracking.tracking_uri"] = args.tracking_uri
    return load_config(args.params, over)


def run(args: argparse.Namespace) -> int:
    from flows.pretrain import run_pretrain
    from ultrafed.federated.coordinator import HorizonError, RoundFailed
    from ultrafed.tracking.runs import configure_tracking

    cfg = load_cfg(args)
    mode, sites = resolve_sites(args, cfg)
    if mode == "federation":  # talk to the rehearsal's servers unless the user points elsewhere
        import os

        from flows.commands.federation import federation_env

        for k, v in federation_env().items():
            os.environ.setdefault(k, v)
        if "PREFECT_API_URL" not in os.environ:
            raise SystemExit("ultrafed: federation mode needs PREFECT_API_URL (or `ultrafed federation up`)")
    configure_tracking(args.tracking_uri)
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
