"""Manifest scan speed: cold scan (no stat cache) in parallel vs one process, and incremental.

Images: ../shared/data/busi (780 PNGs, longest side 256 px, with masks) when present, else a
synthetic cohort at 256 px. Every scan reads, hashes and measures each image and its mask.
"Cold" means no stat cache; the OS file cache is warm after the first pass (as on a site that
scans its disk twice). Target: >= 200 images/s. Prints medians of 3 and the ratio.

    .venv/bin/python bench/bench_scan.py [--root DIR] [--repeats 3] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET = 200.0


def _images(root: str | None, tmp: Path) -> tuple[Path, str]:
    from ultrafed.data.sites import find_shared_data

    if root:
        return Path(root), Path(root).name
    shared = find_shared_data()
    if shared is not None:
        return shared / "busi", "busi (real, 780 images + masks)"
    from ultrafed.data.synth import make_cohort

    make_cohort(tmp, sites=1, per_site=400, seed=0, size=256, progress=None)
    return tmp / "site-0", "synthetic (400 images + masks, 256 px)"


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="site folder to scan (default: busi, else synthetic)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="parallel workers (default: CPU cores)")
    args = ap.parse_args()

    from ultrafed.data.manifest import _default_workers, scan_site, write_manifest

    workers = args.workers or _default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        root, what = _images(args.root, Path(tmp))
        n = len(scan_site(root, "bench", workers=1).rows)  # also warms the OS file cache
        serial, parallel = [], []
        for _ in range(args.repeats):  # interleaved: load from other processes hits both alike
            serial.append(_time(lambda: scan_site(root, "bench", workers=1)))
            parallel.append(_time(lambda: scan_site(root, "bench", workers=workers)))
        out = Path(tmp) / "m.csv"
        write_manifest(scan_site(root, "bench", workers=workers), out)
        incr = [_time(lambda: scan_site(root, "bench", previous=out, workers=workers)) for _ in range(args.repeats)]

    s, p, i = statistics.median(serial), statistics.median(parallel), statistics.median(incr)
    print(f"scan of {what}: {n} images, {os.cpu_count()} CPUs, {workers} workers, median of {args.repeats}")
    print(f"  cold, 1 process   : {s:6.2f} s  {n / s:7.0f} images/s   runs {', '.join(f'{t:.2f}' for t in serial)}")
    runs = ", ".join(f"{t:.2f}" for t in parallel)
    print(f"  cold, {workers} processes: {p:6.2f} s  {n / p:7.0f} images/s   runs {runs}  (x{s / p:.2f} vs 1 process)")
    print(f"  incremental       : {i:6.2f} s  {n / i:7.0f} images/s   (nothing changed: x{s / i:.1f} vs cold)")
    best = n / min(s, p)
    print(f"target >= {TARGET:.0f} images/s cold: {'met' if best >= TARGET else 'NOT met'} ({best:.0f})")
    return 0


if __name__ == "__main__":  # required: the parallel scan starts worker processes (forkserver)
    sys.exit(main())
