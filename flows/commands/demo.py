"""``ultrafed demo``: the whole pipeline on the embedded default (or ``--data`` real sites)."""
from __future__ import annotations

import argparse
from pathlib import Path

SYNTH_STAGE, SYNTH_OUT = "synth", "data/synth"  # dvc.yaml's stage that makes the default cohort


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline end to end (synthetic sites by default)")
    p.add_argument("--data", help="real data folder with busi/ddti/hc18 (e.g. ../shared/data) instead of synthetic sites")
    p.add_argument("--sites", help="a sites.yaml instead of the synthetic cohort")
    p.add_argument("--rounds", type=int, help="federated rounds (default: params federated.rounds)")
    p.add_argument("--no-promote", action="store_true", help="stop before promotion")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the embedded store under mlflow/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params.yaml value")
    p.set_defaults(func=run)


def needs_synth_stage(args: argparse.Namespace, cfg, root: str | Path, repo: Path) -> bool:
    """Whether the demo should make its cohort with the ``synth`` stage: it reads the synthetic
    cohort at ``repo/data/synth``, which does not exist yet, with the synth section of the repo's
    params.yaml (no ``--params`` file or ``--set`` that changes it)."""
    from ultrafed.config import load_config
    from ultrafed.federated.sitesfile import cohort_sites

    return (not (args.data or args.sites) and Path(root).resolve() == (repo / SYNTH_OUT).resolve()
            and cfg.synth == load_config(repo / "params.yaml").synth and not cohort_sites(root))


def synth_stage(repo: Path) -> bool:
    """Make the default cohort as dvc.yaml's ``synth`` stage (``dvc repro synth`` in ``repo``), so
    that dvc.lock records it and ``dvc status`` calls it up to date. False, with the reason
    printed, where DVC cannot (no DVC project, no ``dvc``, the stage failed): the caller then
    writes the same cohort without DVC."""
    import os
    import shutil
    import subprocess
    import sys

    bindir = Path(sys.executable).parent
    dvc = str(bindir / "dvc") if (bindir / "dvc").exists() else shutil.which("dvc")
    if not (dvc and (repo / "dvc.yaml").is_file() and (repo / ".dvc").is_dir()):
        return False
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")  # the stage calls `ultrafed`
    print(f"making the synthetic cohort in {repo / SYNTH_OUT}: dvc repro {SYNTH_STAGE}")
    proc = subprocess.run([dvc, "repro", SYNTH_STAGE], cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()[-1]
        print(f"dvc repro {SYNTH_STAGE} failed ({last}); writing the cohort without DVC")
        return False
    return True


def run(args: argparse.Namespace) -> int:
    import os

    from flows.commands.common import load_cfg, resolve_sites, tracking_uri
    from flows.pipeline import pipeline
    from ultrafed.config import REPO_ROOT
    from ultrafed.tracking.runs import configure_tracking

    cfg = load_cfg(args)
    configure_tracking(tracking_uri(args, cfg))
    root = cfg.data.root if os.path.isabs(cfg.data.root) else str(REPO_ROOT / cfg.data.root)
    if needs_synth_stage(args, cfg, root, REPO_ROOT):
        synth_stage(REPO_ROOT)  # else (or where DVC cannot) resolve_sites writes the cohort
    mode, sites = resolve_sites(args, cfg)
    if args.data:
        tasks = [("busi-cls", args.data), ("busi-seg", args.data), ("ddti-seg", args.data), ("hc18-seg", args.data)]
    else:
        tasks = [("synth-cls", root), ("synth-seg", root)]
    if mode == "embedded":
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // min(max(1, cfg.federated.max_concurrency), len(sites))))
    pipeline(cfg.to_dict(), sites, tasks=tasks, mode=mode, rounds=args.rounds, promote=not args.no_promote)
    return 0
