"""Paper-size UltraMIM pretraining step on a GPU: images/s and peak memory (issue 6, section 5).

ViT-B/16 at 224 px with the paper's 8 x 512 decoder, AdamW, bf16 autocast -- the step that
``ultrafed.engine.pretrain.train_local`` runs (``draw_mask`` + ``train_step``). Batches are made
once on the host (pinned) and copied every step, as a loader would hand them over, so the
number is the model step's, not the augmentation pipeline's; ``--loader`` also times the real
``UltraMIMDataset`` pipeline (SMAT + MIC + texture scores) on a data folder.

Baseline in the same process: plain MAE (uniform masks, same model). Printed: median step
time, images/s, peak allocated and reserved memory per batch size, and the ratio
UltraMIM / MAE images/s.

    python bench/bench_gpu_pretrain.py                      # on the GPU machine
    python bench/bench_gpu_pretrain.py --preset tiny --img-size 64 --decoder 1x64 --batch 8 --steps 3   # CPU check
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ultrafed.engine.pretrain import build_optimizer, draw_mask, train_step  # noqa: E402
from ultrafed.models.mae import build_mae  # noqa: E402
from ultrafed.ultramim.tgm import texture_scores  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_bench(preset: str, img: int, dec_depth: int, dec_dim: int, batch: int, steps: int, warmup: int,
               tgm: bool, device: torch.device) -> dict[str, float]:
    """Median time of ``steps`` optimiser steps after ``warmup``; peak memory of the whole run."""
    model = build_mae(preset, img, 16, 1, dec_dim, dec_depth, max(1, dec_dim // 32), seed=0).to(device)
    opt = build_optimizer(model, 1.5e-4, 0.05, (0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, img, img, generator=gen)
    batch_d = {"input": x, "target": x, "texture": texture_scores(x, 16)}
    if device.type == "cuda":
        batch_d = {k: v.pin_memory() for k, v in batch_d.items()}
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        mask = draw_mask(model, batch_d, 1.0 if tgm else None, gen)
        train_step(model, opt, batch_d, mask, device=device, step=i)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"median_step_s": med, "img_per_s": batch / med, "batch": float(batch)}
    if device.type == "cuda":
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def loader_bench(data: Path, img: int, workers: int, batch: int, batches: int) -> dict[str, float]:
    """Images/s of the real UltraMIM input pipeline (SMAT copies cached, MIC and texture per item)."""
    from ultrafed.config import load_config
    from ultrafed.data.datasets import dataset_from_config, make_loader
    from ultrafed.data.sites import load_site

    cfg = load_config(None, {"model.img_size": img})
    recs = [r for s in ("busi", "ddti", "hc18") for r in load_site(data / s, s).select(("train", "unlabeled"))]
    t0 = time.perf_counter()
    ds = dataset_from_config(recs, cfg, 0)
    build_s = time.perf_counter() - t0
    loader = make_loader(ds, batch, workers, 0)
    it = iter(loader)
    next(it)  # workers started
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            n += next(it)["target"].shape[0]
        except StopIteration:
            break
    s = time.perf_counter() - t0
    return {"loader_img_per_s": n / s, "workers": float(workers), "dataset_build_s": build_s, "items": float(len(ds))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--decoder", default="8x512", help="depth x width of the MAE decoder")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--loader", default=None, help="a data folder with busi/ddti/hc18 to time the input pipeline")
    ap.add_argument("--loader-workers", type=int, default=12)
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    depth, dim = (int(v) for v in a.decoder.split("x"))
    print(f"bench_gpu_pretrain: ViT-{a.preset}/16 {a.img_size} px, decoder {depth}x{dim}, bf16 autocast on {name}, "
          f"torch {torch.__version__}; median of {a.steps} steps after {a.warmup}")
    rows = []
    for b in a.batch:
        for tgm in (False, True):
            r = step_bench(a.preset, a.img_size, depth, dim, b, a.steps, a.warmup, tgm, device)
            r["masking"] = "tgm (UltraMIM)" if tgm else "uniform (MAE)"
            rows.append(r)
            mem = (f", peak alloc {r['peak_alloc_gib']:.2f} GiB, reserved {r['peak_reserved_gib']:.2f} GiB"
                   if "peak_alloc_gib" in r else "")
            print(f"  batch {b:4d} {r['masking']:15s}: {r['median_step_s'] * 1e3:8.1f} ms/step, "
                  f"{r['img_per_s']:8.1f} img/s{mem}", flush=True)
        mae, umim = rows[-2]["img_per_s"], rows[-1]["img_per_s"]
        print(f"  batch {b:4d} ratio UltraMIM / MAE images/s: {umim / mae:.3f}", flush=True)
    if a.loader:
        lr = loader_bench(Path(a.loader), a.img_size, a.loader_workers, 64, 60)
        rows.append(lr)
        best = max(r["img_per_s"] for r in rows if r.get("masking", "").startswith("tgm"))
        print(f"  input pipeline ({a.loader_workers} workers, {int(lr['items'])} items incl. SMAT copies): "
              f"{lr['loader_img_per_s']:.0f} img/s (dataset build {lr['dataset_build_s']:.1f} s); "
              f"ratio loader / best model step: {lr['loader_img_per_s'] / best:.3f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
