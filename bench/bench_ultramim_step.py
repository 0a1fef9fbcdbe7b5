"""UltraMIM training step vs plain MAE step on the same model: what do MIC + TGM cost?

Four timings, interleaved per repeat (so load drift hits all alike), median of ``--steps``
timed steps after ``--warmup``:

  plain      uniform random mask, no corruption, forward/backward/AdamW      (the baseline)
  ultramim   TGM mask from precomputed texture scores + model on a corrupted input -> clean
             target: what ``train_local`` pays per step (MIC and texture scores are computed
             in the DataLoader workers in our design)
  ultramim+  the same plus MIC corruption of every image and texture scores of the batch on
             the main thread: the cost if the workers did not exist

and, with ``--decoders params,paper``, the plain step with the params.yaml decoder vs the
paper's 8 x 512 decoder on the same encoder preset.

    python bench/bench_ultramim_step.py                                   # ViT-tiny 96 px, batch 64
    python bench/bench_ultramim_step.py --preset base --img-size 224 --batch 8 --steps 3 --decoders params
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ultrafed.config import load_config  # noqa: E402
from ultrafed.data.datasets import mic_kwargs  # noqa: E402
from ultrafed.engine.device import select_device  # noqa: E402
from ultrafed.engine.pretrain import build_optimizer, draw_mask, train_step  # noqa: E402
from ultrafed.models.mae import build_mae, count_params  # noqa: E402
from ultrafed.ultramim.mic import corrupt  # noqa: E402
from ultrafed.ultramim.tgm import texture_scores  # noqa: E402

PAPER_DECODER = {"decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clean_batch(n: int, size: int, seed: int) -> torch.Tensor:
    """Ultrasound-like clean images: synthetic cohort frames resized to ``size`` (speckle, lesions, fans)."""
    import tempfile

    import cv2

    from ultrafed.data.io import read_gray
    from ultrafed.data.synth import make_cohort

    with tempfile.TemporaryDirectory() as tmp:
        folders = make_cohort(tmp, sites=2, per_site=max(2, min(n, 32) // 2), seed=seed, size=max(size, 96), progress=None)
        frames = [cv2.resize(read_gray(p), (size, size), interpolation=cv2.INTER_AREA)
                  for f in folders for p in sorted((f / "images").glob("*.png"))]
    imgs = np.stack([frames[i % len(frames)] for i in range(n)]).astype(np.float32) / 255.0
    return torch.from_numpy(imgs).unsqueeze(1)  # [N, 1, S, S]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="encoder preset (default: params.yaml)")
    ap.add_argument("--img-size", type=int, default=None, help="default: params.yaml model.img_size")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--decoders", default="params,paper", help="'params', or 'params,paper' to compare decoders")
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); 1 makes the cpu-time column robust to other jobs")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    cfg = load_config()
    mc = cfg.model
    preset, size = args.preset or mc.preset, args.img_size or mc.img_size
    device = select_device(args.device)
    mic = mic_kwargs(cfg.ultramim.mic) or {"p": 0.5, "p_each": 0.5, "motion_kernel": 24, "gauss_sigma": 1.1, "sp_amount": 0.05}
    strength = cfg.ultramim.tgm.strength
    params_decoder = {"decoder_dim": mc.decoder_dim, "decoder_depth": mc.decoder_depth, "decoder_heads": mc.decoder_heads}
    decoders = {"params": params_decoder, "paper": PAPER_DECODER}
    wanted = [d.strip() for d in args.decoders.split(",") if d.strip()]

    models = {name: build_mae(preset, size, mc.patch_size, mc.in_chans, mask_ratio=mc.mask_ratio,
                              norm_pix_loss=mc.norm_pix_loss, seed=args.seed, **decoders[name]).to(device).train()
              for name in wanted}
    opts = {name: build_optimizer(m, 1e-4, 0.05, (0.9, 0.95)) for name, m in models.items()}
    main_model, main_opt = models["params"], opts["params"]

    clean = clean_batch(args.batch, size, args.seed)
    texture = texture_scores(clean, mc.patch_size)
    rng = np.random.default_rng(args.seed)
    corrupted = torch.stack([torch.from_numpy(corrupt(c[0].numpy(), rng, **mic)).unsqueeze(0) for c in clean])
    gen = torch.Generator().manual_seed(args.seed)
    load0 = os.getloadavg()[0]

    def plain(model=main_model, opt=main_opt) -> None:
        batch = {"input": clean, "target": clean}
        train_step(model, opt, batch, draw_mask(model, batch, None, gen), device=device)

    def ultramim() -> None:  # what train_local pays: workers delivered input, target and texture
        batch = {"input": corrupted, "target": clean, "texture": texture}
        train_step(main_model, main_opt, batch, draw_mask(main_model, batch, strength, gen), device=device)

    def ultramim_main_thread() -> None:  # MIC and texture scores on the main thread as well
        inp = torch.stack([torch.from_numpy(corrupt(c[0].numpy(), rng, **mic)).unsqueeze(0) for c in clean])
        batch = {"input": inp, "target": clean, "texture": texture_scores(clean, mc.patch_size)}
        train_step(main_model, main_opt, batch, draw_mask(main_model, batch, strength, gen), device=device)

    variants = {"plain": plain, "ultramim": ultramim, "ultramim+": ultramim_main_thread}
    for name in wanted[1:]:
        variants[f"plain/{name}-decoder"] = lambda m=models[name], o=opts[name]: plain(m, o)
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}  # this process's CPU seconds: less sensitive to other jobs
    for i in range(args.warmup + args.steps):
        for name, fn in variants.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}

    print(f"device {device} ({torch.get_num_threads()} torch threads, {os.cpu_count()} cpus, load avg {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f}); ViT-{preset} {size} px, batch {args.batch}, {args.steps} timed steps after {args.warmup} warmup")
    print(f"encoder {count_params(main_model.encoder) / 1e6:.2f}M params; decoder params.yaml "
          f"{params_decoder['decoder_depth']}x{params_decoder['decoder_dim']} "
          f"({(count_params(main_model) - count_params(main_model.encoder)) / 1e6:.2f}M)")
    for k, v in med.items():
        print(f"  {k:<24} median {v * 1000:9.1f} ms/step  {args.batch / v:8.1f} img/s   (min {min(times[k]) * 1000:.1f}, "
              f"max {max(times[k]) * 1000:.1f}; cpu median {cmed[k] * 1000:.1f} ms)")
    print(f"ratio ultramim / plain (step only, as trained)       = {med['ultramim'] / med['plain']:.3f} wall, "
          f"{cmed['ultramim'] / cmed['plain']:.3f} cpu  (target <= 1.10)")
    print(f"ratio ultramim+ / plain (incl. MIC+texture on main)  = {med['ultramim+'] / med['plain']:.3f} wall, "
          f"{cmed['ultramim+'] / cmed['plain']:.3f} cpu")
    for name in wanted[1:]:
        k = f"plain/{name}-decoder"
        print(f"ratio {name} decoder {decoders[name]['decoder_depth']}x{decoders[name]['decoder_dim']} / params.yaml decoder "
              f"(plain step) = {med[k] / med['plain']:.2f}  ({args.batch / med[k]:.1f} vs {args.batch / med['plain']:.1f} img/s)")


if __name__ == "__main__":
    main()
