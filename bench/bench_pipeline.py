"""Can the data pipeline feed the training step? Loader throughput vs step consumption.

The loader does, per image and in its workers: decode (``cache=False``: from disk every time),
SMAT conversion for the copies, random resized crop + flip, MIC corruption, texture scores.
The step does: TGM mask + MAE forward/backward/AdamW (``train_step``, as ``train_local``).
Both at the same preset, batch size and image size; both medians of ``--repeats`` timed runs
after a warmup. The ratio pipeline img/s / step img/s must be >= 1.5 so the step never waits.
(Measured separately, each with the whole machine: on 2 cores the workers and the step share
the cores in real training; ``--e2e`` also times ``train_local`` through the loader.)

Data: busi's train split when ``find_shared_data()`` finds it, else a synthetic cohort.

    python bench/bench_pipeline.py                  # params.yaml: ViT-tiny 96 px, batch 32, 1 worker
    python bench/bench_pipeline.py --workers 2 --e2e
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ultrafed.config import load_config  # noqa: E402
from ultrafed.data.datasets import dataset_from_config, make_loader  # noqa: E402
from ultrafed.data.sites import find_shared_data, load_site  # noqa: E402
from ultrafed.data.synth import make_cohort  # noqa: E402
from ultrafed.engine.pretrain import build_optimizer, draw_mask, train_local, train_step  # noqa: E402
from ultrafed.models.mae import mae_from_config  # noqa: E402


def records(tmp: str, n_synth: int):
    shared = find_shared_data()
    if shared is not None and (shared / "busi").is_dir():
        return load_site(shared / "busi").select(["train"]), f"busi train ({shared / 'busi'})"
    folder = make_cohort(tmp, sites=1, per_site=n_synth, seed=0, size=256, progress=None)[0]
    return list(load_site(folder).records), f"synthetic cohort, {n_synth} images of 256 px (no shared data found)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None, help="default: params.yaml pretrain.batch_size")
    ap.add_argument("--workers", type=int, default=None, help="default: params.yaml pretrain.num_workers")
    ap.add_argument("--batches", type=int, default=6, help="batches per timed loader pass")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", action="store_true", help="decoded frames and SMAT copies cached in memory")
    ap.add_argument("--e2e", action="store_true", help="also time train_local through the loader")
    ap.add_argument("--synth-images", type=int, default=96)
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the main process (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    cfg = load_config()
    bs = args.batch or cfg.pretrain.batch_size
    workers = cfg.pretrain.num_workers if args.workers is None else args.workers
    cfg = cfg.replace(**{"pretrain.cache_images": bool(args.cache), "pretrain.batch_size": bs, "pretrain.num_workers": workers})
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        recs, source = records(tmp, args.synth_images)
        t0 = time.perf_counter()
        ds = dataset_from_config(recs, cfg)
        build_s = time.perf_counter() - t0
        loader = make_loader(ds, bs, workers, seed=0)
        if len(loader) < args.batches:
            raise SystemExit(f"only {len(loader)} batches per epoch; lower --batch or --batches")

        # -- pipeline: images/s through the loader (the first pass warms the workers up) --------
        pipe: list[float] = []
        epoch = 0
        for r in range(args.repeats + 1):
            ds.set_epoch(epoch)
            epoch += 1
            it = iter(loader)
            first = next(it)  # worker start-up and prefetch latency are not throughput
            t0 = time.perf_counter()
            n = 0
            for _ in range(args.batches - 1):
                n += next(it)["target"].shape[0]
            dt = time.perf_counter() - t0
            del it
            if r > 0:
                pipe.append(n / dt)
        del first

        # -- step: images/s the training step consumes (same preset, batch, real batches) ------
        model = mae_from_config(cfg.model, seed=0).train()
        opt = build_optimizer(model, 1e-4, cfg.pretrain.weight_decay, cfg.pretrain.betas)
        batch = next(iter(make_loader(ds, bs, 0, seed=1)))
        gen = torch.Generator().manual_seed(0)
        strength = cfg.ultramim.tgm.strength if cfg.ultramim.tgm.enabled else None
        step: list[float] = []
        for i in range(2 + args.repeats):
            t0 = time.perf_counter()
            train_step(model, opt, batch, draw_mask(model, batch, strength, gen), device=torch.device("cpu"))
            if i >= 2:
                step.append(bs / (time.perf_counter() - t0))

        e2e = None
        if args.e2e:
            runs = []
            for r in range(3):
                ds.set_epoch(100 + r)
                steps = min(len(loader), args.batches)
                res = train_local(model, _take(loader, steps), epochs=1, peak_lr=1e-4, weight_decay=0.05,
                                  betas=(0.9, 0.95), warmup_steps=0, total_steps=10 * steps, seed=r)
                runs.append(res.metrics["img_per_s"])
            e2e = statistics.median(runs)
    p, s = statistics.median(pipe), statistics.median(step)
    print(f"data: {source}: {ds.n_images} files -> {len(ds)} images with SMAT; dataset built in {build_s:.1f}s; "
          f"{len(ds.problems)} unreadable skipped")
    print(f"ViT-{cfg.model.preset} {cfg.model.img_size} px, decoder {cfg.model.decoder_depth}x{cfg.model.decoder_dim}, "
          f"batch {bs}, {workers} worker(s), cache {'on' if args.cache else 'off'}, MIC {'on' if cfg.ultramim.mic.enabled else 'off'}; "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cpus, load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"  pipeline (decode+SMAT+crop+MIC+texture, DataLoader) median {p:8.1f} img/s   runs {[round(x, 1) for x in pipe]}")
    print(f"  training step (TGM mask + MAE fwd/bwd/AdamW)         median {s:8.1f} img/s   runs {[round(x, 1) for x in step]}")
    if e2e is not None:
        print(f"  train_local through the loader (end to end)         median {e2e:8.1f} img/s   (/step = {e2e / s:.2f})")
    print(f"ratio pipeline / step = {p / s:.2f}  (target >= 1.5)")


class _take:
    """The first ``k`` batches of a loader, with a length (train_local needs ``len``) and its dataset."""

    def __init__(self, loader, k: int) -> None:
        self.loader, self.k, self.dataset = loader, k, None  # epoch set by the caller

    def __len__(self) -> int:
        return self.k

    def __iter__(self):
        it = iter(self.loader)
        for _ in range(self.k):
            yield next(it)


if __name__ == "__main__":
    main()
