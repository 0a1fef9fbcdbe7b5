"""``ultrafed finetune``: fine-tune a registered encoder on a task and register the task model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ultrafed.data.tasks import TASKS

    p = sub.add_parser("finetune", help="fine-tune an encoder on a diagnosis or segmentation task")
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="task (synth-* use the synthetic cohort)")
    p.add_argument("--encoder", help="encoder model URI (models:/ultrafed-encoder/3, ...@production); omit for scratch")
    p.add_argument("--encoder-from", help="read the encoder URI from this JSON (`ultrafed pretrain --metrics-out`)")
    p.add_argument("--metrics-out", help="write val/test metrics as JSON (for dvc metrics)")
    p.add_argument("--data", help="data root (default: ../shared/data for real tasks, params data.root for synth-*)")
    p.add_argument("--test", action="store_true", help="also evaluate on the test split (report once)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the embedded store)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params.yaml value")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from flows.commands.pretrain import load_cfg
    from tasks.finetune import finetune_and_register
    from ultrafed.config import REPO_ROOT
    from ultrafed.data.sites import find_shared_data
    from ultrafed.tracking.runs import configure_tracking

    cfg = load_cfg(args)
    configure_tracking(args.tracking_uri)
    root = args.data
    if root is None:
        root = str(REPO_ROOT / cfg.data.root) if args.task.startswith("synth") else find_shared_data()
        if root is None:
            print(f"ultrafed finetune: no data for {args.task} (pass --data or provide ../shared/data)", file=sys.stderr)
            return 2
    encoder = args.encoder
    if args.encoder_from:
        encoder = json.loads(Path(args.encoder_from).read_text())["model_uri"]
    out = finetune_and_register(cfg.to_dict(), args.task, str(root), encoder, evaluate_test=args.test, progress=True)
    summary = {k: out[k] for k in ("task", "val", "test", "model_uri", "wall_s")}
    print(json.dumps(summary, indent=2, default=float))
    if args.metrics_out:
        Path(args.metrics_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics_out).write_text(json.dumps(summary, indent=2, default=float))
    return 0
