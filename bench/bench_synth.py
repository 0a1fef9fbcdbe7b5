"""Speed of the synthetic cohort (``make_cohort``) against pure PNG writing, same run.

Baseline: writing the same number of image + mask PNG pairs of random noise with cv2.imwrite
(what the cohort would cost if synthesis were free). The ratio is the price of the imaging
model over I/O. Median of repeats; target >= 100 img/s at 128 px on a 2-core machine.

    python bench/bench_synth.py [--sites 3] [--per-site 48] [--size 128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from ultrafed.data.synth import make_cohort

TARGET_IMG_S = 100.0


def baseline(out: Path, sites: int, per_site: int, size: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for k in range(sites):
        (out / f"site-{k}" / "images").mkdir(parents=True)
        (out / f"site-{k}" / "masks").mkdir()
        for i in range(per_site):
            cv2.imwrite(str(out / f"site-{k}" / "images" / f"{i}.png"), rng.integers(0, 256, (size, size), np.uint8))
            cv2.imwrite(str(out / f"site-{k}" / "masks" / f"{i}.png"), np.zeros((size, size), np.uint8))
    return time.perf_counter() - t0


def synth(out: Path, sites: int, per_site: int, size: int, seed: int) -> float:
    t0 = time.perf_counter()
    make_cohort(out, sites=sites, per_site=per_site, seed=seed, size=size, progress=None)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--per-site", type=int, default=48)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    n = a.sites * a.per_site
    times: dict[str, list[float]] = {"baseline": [], "synth": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):  # interleaved, so machine load hits both alike
            times["baseline"].append(baseline(Path(tmp) / f"b{r}", a.sites, a.per_site, a.size, r))
            times["synth"].append(synth(Path(tmp) / f"s{r}", a.sites, a.per_site, a.size, r))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"bench_synth: {n} images ({a.sites} sites x {a.per_site}) at {a.size} px, median of {a.repeats}")
    print(f"  baseline (noise PNG pairs, cv2.imwrite): {med['baseline']:.3f}s  {n / med['baseline']:.0f} img/s")
    print(f"  make_cohort (synthesis + PNG pairs):     {med['synth']:.3f}s  {n / med['synth']:.0f} img/s")
    print(f"  ratio make_cohort / baseline time: {med['synth'] / med['baseline']:.2f}x")
    speed = n / med["synth"]
    verdict = "meets" if speed >= TARGET_IMG_S else "BELOW"
    print(f"  {verdict} the target of {TARGET_IMG_S:.0f} img/s ({speed:.0f} img/s)")


if __name__ == "__main__":
    main()
