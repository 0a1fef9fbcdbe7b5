"""``ultrafed data synth``: write the synthetic ultrasound cohort (the embedded default data)."""
from __future__ import annotations

import argparse
import sys


def _at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value
    return parse


def add_parser(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser("synth", help="write a synthetic multi-site ultrasound cohort",
                        description="Write <out>/site-<k>/{images,masks,labels.csv}; defaults from "
                                    "params.yaml (synth section, data.root).")
    p.add_argument("--out", default=None, help="output folder (default: params data.root)")
    p.add_argument("--sites", type=_at_least(1), default=None, help="number of sites (default: synth.sites)")
    p.add_argument("--per-site", type=_at_least(1), default=None, help="images per site (default: synth.per_site)")
    p.add_argument("--seed", type=_at_least(0), default=None, help="base seed (default: synth.seed)")
    p.add_argument("--size", type=_at_least(32), default=None, help="image side in px (default: synth.size)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from flows.commands.common import load_cfg
    from ultrafed.data.sites import load_site
    from ultrafed.data.synth import LABELS, make_cohort

    cfg = load_cfg(args)  # a bad params file: one line, exit 2 (flows/cli.py)
    out = args.out or cfg.data.root
    sites = args.sites if args.sites is not None else cfg.synth.sites
    per_site = args.per_site if args.per_site is not None else cfg.synth.per_site
    seed = args.seed if args.seed is not None else cfg.synth.seed
    size = args.size if args.size is not None else cfg.synth.size

    t0 = time.perf_counter()
    try:
        folders = make_cohort(out, sites=sites, per_site=per_site, seed=seed, size=size)
    except (OSError, ValueError) as e:
        print(f"ultrafed data synth: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0

    counts = {lab: 0 for lab in LABELS}
    splits: dict[str, int] = {}
    for folder in folders:  # read back through the site reader: what users will load
        for rec in load_site(folder).records:
            counts[rec.labels["label"]] += 1
            splits[rec.split] = splits.get(rec.split, 0) + 1
    total = sites * per_site
    print(f"synthetic cohort: {sites} sites x {per_site} images ({size} px, seed {seed}) -> {out}")
    print("labels: " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + " | splits: " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
    print(f"{total} images in {seconds:.1f}s ({total / max(seconds, 1e-9):.0f} img/s)")
    return 0
