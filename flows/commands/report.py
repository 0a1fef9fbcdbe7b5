"""``ultrafed report``: docs/RESULTS.md and its plots from the result runs in MLflow."""
from __future__ import annotations

import argparse
import sys

from ultrafed.protocol import EXPERIMENT


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write docs/RESULTS.md (tables, plots) from the MLflow result runs")
    p.add_argument("--out", default="docs/RESULTS.md", help="markdown file; plots go to results/ beside it")
    p.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment holding the result runs")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else .ultrafed/results/mlflow.db)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from mlflow import MlflowClient

    from ultrafed.paths import RESULTS_TRACKING_URI, neutral
    from ultrafed.report import write_report
    from ultrafed.tracking.runs import configure_tracking

    uri = configure_tracking(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or RESULTS_TRACKING_URI)
    cmd = "ultrafed report --out " + neutral(args.out) + ("" if args.experiment == EXPERIMENT else f" --experiment {args.experiment}")
    try:
        written = write_report(MlflowClient(uri), args.experiment, args.out, tracking_uri=uri, report_command=cmd)
    except LookupError as e:
        print(f"ultrafed report: {uri}: {e}", file=sys.stderr)
        return 1
    for p in written:
        print(f"wrote {p}")
    return 0
