"""``ultrafed finetune``: fine-tune a registered encoder on a task and register the task model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from flows.commands.common import add_config_args

if TYPE_CHECKING:
    from ultrafed.config import Config


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ultrafed.data.tasks import TASKS

    p = sub.add_parser("finetune", help="fine-tune an encoder on a diagnosis or segmentation task")
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="task (synth-* use the synthetic cohort)")
    p.add_argument("--encoder", help="encoder model URI (models:/ultrafed-encoder/3, ...@production); omit for scratch")
    p.add_argument("--encoder-from", help="read the encoder URI from this JSON (`ultrafed pretrain --metrics-out`)")
    p.add_argument("--metrics-out", help="write val/test metrics as JSON (for dvc metrics)")
    p.add_argument("--data", help="data root (default: $ULTRAFED_SHARED_DATA, else params data.shared_root for real "
                                  "tasks; params data.root for synth-*)")
    p.add_argument("--test", action="store_true", help="also evaluate on the test split (report once)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else params tracking.tracking_uri)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from flows.commands.common import load_cfg, tracking_uri
    from tasks.finetune import finetune_and_register
    from ultrafed.tracking.runs import configure_tracking

    cfg = load_cfg(args)
    root = args.data or default_data_root(args.task, cfg)
    if root is None:
        print(f"ultrafed finetune: no data for {args.task} (pass --data, set $ULTRAFED_SHARED_DATA or "
              f"params data.shared_root)", file=sys.stderr)
        return 2
    encoder = args.encoder
    if args.encoder_from:
        try:
            encoder = json.loads(Path(args.encoder_from).read_text())["model_uri"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"ultrafed finetune: --encoder-from {args.encoder_from}: no model_uri to read "
                  f"({type(e).__name__}: {e})", file=sys.stderr)
            return 2
    uri = tracking_uri(args, cfg)
    configure_tracking(uri)
    cfg = cfg.replace(**{"tracking.tracking_uri": uri})  # the run's params say where it logs (not in its hash)
    out = finetune_and_register(cfg.to_dict(), args.task, str(root), encoder, evaluate_test=args.test, progress=True)
    summary = {k: out[k] for k in ("task", "val", "test", "model_uri", "wall_s")}
    print(json.dumps(summary, indent=2, default=float))
    if args.metrics_out:
        Path(args.metrics_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics_out).write_text(json.dumps(summary, indent=2, default=float))
    return 0


def default_data_root(task: str, cfg: Config) -> str | None:
    """synth-* tasks: params data.root. Real tasks: $ULTRAFED_SHARED_DATA, else params
    data.shared_root (relative paths from the repo root); None when neither holds the data."""
    import os

    from ultrafed.config import REPO_ROOT
    from ultrafed.data.sites import find_shared_data

    if task.startswith("synth"):
        return str(REPO_ROOT / cfg.data.root)
    shared = Path(os.environ.get("ULTRAFED_SHARED_DATA") or cfg.data.shared_root)
    found = find_shared_data(shared if shared.is_absolute() else REPO_ROOT / shared)
    return None if found is None else str(found)
