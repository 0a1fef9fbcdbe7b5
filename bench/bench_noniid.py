"""Non-IID stress: one site holds 90% of the training images. Which aggregation strategy serves
the small sites? (The UltraFedFM paper leaves strategies under skew open.)

    .venv/bin/python bench/bench_noniid.py [--rounds 6] [--train 54 3 3] [--val 5]

Sites are synthetic (``ultrafed.data.synth.make_site``: each site its own scanner style and
probe mix); site-0 gets 90% of the training images, every site the same number of val images
so per-site validation losses compare. Each strategy runs the real embedded round flow
(``flows.pretrain.run_pretrain``) from the same initial weights and seed, with its own site
work dirs (no optimizer state shared between strategies). Reported per strategy: the global
val loss (unweighted mean over sites, as the round flow logs it) per round, each site's val
loss after the last round, the spread max - min, and site-0's aggregation weight.

Note: ``ultrafed/federated/round.py`` gives q-FedAvg each site's mean TRAIN loss of its local epoch,
not the loss of the incoming global model on the site's data that q-FFL prescribes; the
local loss is lower for sites that fit quickly, so q-FedAvg re-weights less than it should.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STRATEGIES: list[tuple[str, str, dict[str, Any]]] = [
    ("fedavg", "fedavg", {}),
    ("fedavg_uniform", "fedavg_uniform", {}),
    ("fedprox mu=0.01", "fedprox", {"mu": 0.01}),
    ("qfedavg q=1", "qfedavg", {"q": 1.0}),
]


def make_skewed_sites(root: Path, train: list[int], n_val: int, seed: int, size: int) -> list[dict[str, str]]:
    """Site k: ``train[k]`` train + ``n_val`` val images (its first ``n_val`` ids by name are val)."""
    from ultrafed.data.synth import make_site

    sites = []
    for k, n_train in enumerate(train):
        folder = root / f"site-{k}"
        make_site(folder, k, n_train + n_val, seed, size)
        with open(folder / "labels.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for i, row in enumerate(sorted(rows, key=lambda r: r["id"])):
            row["split"] = "val" if i < n_val else "train"
        with open(folder / "labels.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(sorted(rows, key=lambda r: r["id"]))
        sites.append({"id": folder.name, "root": str(folder)})
    return sites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--train", type=int, nargs="+", default=[54, 3, 3], help="train images per site (site-0 first)")
    ap.add_argument("--val", type=int, default=5, help="val images per site (train + val >= 8, the quality gate minimum)")
    ap.add_argument("--size", type=int, default=64, help="image and model size in px")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="ultrafed-bench-noniid-"))
    os.environ.update({"ULTRAFED_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
                       "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"})
    import flows  # noqa: F401  (runtime env)
    from flows.pretrain import run_pretrain
    from ultrafed.config import load_config
    from ultrafed.tracking.runs import configure_tracking

    configure_tracking(os.environ["MLFLOW_TRACKING_URI"])
    sites = make_skewed_sites(home / "sites", args.train, args.val, args.seed, args.size)
    share = args.train[0] / sum(args.train)
    print(f"{len(sites)} sites, train images {args.train} (site-0 holds {share:.0%}), {args.val} val each, "
          f"{args.size} px, {args.rounds} rounds, seed {args.seed}")
    results = []
    t_all = time.perf_counter()
    for label, strategy, params in STRATEGIES:
        cfg = load_config(overrides={
            "seed": args.seed, "model.img_size": args.size, "model.decoder_depth": 1, "model.decoder_dim": 64,
            "model.decoder_heads": 2, "pretrain.batch_size": 8, "federated.local_epochs": 1,
            "federated.rounds": args.rounds, "federated.min_sites": len(sites), "federated.strategy": strategy,
            "federated.strategy_params": params, "federated.site_timeout_s": 900}).to_dict()
        run_sites = [dict(s, work_dir=str(home / "work" / strategy / s["id"])) for s in sites]
        t0 = time.perf_counter()
        out = run_pretrain(cfg, run_sites, mode="embedded", rounds=args.rounds, resume=False,
                           run_name=f"noniid-{strategy}")
        hist = out["history"]
        last = hist[-1]["metrics"]
        per_site = {s["id"]: last[f"val_loss.{s['id']}"] for s in sites}
        results.append({"label": label, "curve": [h["metrics"]["global_val_loss"] for h in hist], "per_site": per_site,
                        "spread": max(per_site.values()) - min(per_site.values()),
                        "w0": hist[-1]["weights"].get("site-0", float("nan")), "seconds": time.perf_counter() - t0})

    ids = [s["id"] for s in sites]
    print(f"\nglobal val loss per round (mean over sites), {time.perf_counter() - t_all:.0f} s in all\n")
    head = "| strategy | " + " | ".join(f"r{i + 1}" for i in range(args.rounds)) + " | " + \
        " | ".join(f"{i} val" for i in ids) + " | spread | worst | site-0 weight | s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        ps = r["per_site"]
        print(f"| {r['label']} | " + " | ".join(f"{v:.4f}" for v in r["curve"]) + " | " +
              " | ".join(f"{ps[i]:.4f}" for i in ids) + f" | {r['spread']:.4f} | {max(ps.values()):.4f} | "
              f"{r['w0']:.3f} | {r['seconds']:.0f} |")
    best = min(results, key=lambda r: r["curve"][-1])
    fair = min(results, key=lambda r: r["spread"])
    print(f"\nlowest final global val loss: {best['label']} ({best['curve'][-1]:.4f}); "
          f"smallest per-site spread: {fair['label']} ({fair['spread']:.4f}); "
          f"median spread {statistics.median(r['spread'] for r in results):.4f}")


if __name__ == "__main__":
    main()
