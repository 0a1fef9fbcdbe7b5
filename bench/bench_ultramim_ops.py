"""Micro-benchmark of the UltraMIM operations, each against a baseline measured in the same run.

- SMAT: ``linear_to_convex`` with cached remap maps vs rebuilding the maps on every call.
- TGM: vectorised Gumbel-top-k over ``[N, L]`` vs a per-image ``torch.multinomial`` loop
  (the same distribution: kept patches drawn without replacement, probability ~ exp(-z)).
- TGM: ``texture_scores`` as five shifted adds vs ``F.conv2d`` with the 3x3 kernel.
- MIC: cost per image (all three corruptions), for scale; no speed claim.

Run: ``.venv/bin/python bench/bench_ultramim_ops.py``; prints medians of repeats and ratios
(single-threaded, so both sides of each ratio see the same CPU).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ultrafed.ultramim import corrupt, linear_to_convex, texture_scores, tgm_mask
from ultrafed.ultramim.smat import ScanGeometry, _maps


def median_s(fn: Callable[[], object], repeats: int = 15, inner: int = 5) -> float:
    fn()  # warm-up (fills caches, loads kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def smat_uncached(img: np.ndarray, g: ScanGeometry) -> np.ndarray:
    mx, my = _maps.__wrapped__(img.shape, g, True)
    return cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def texture_scores_conv2d(images: torch.Tensor, patch: int) -> torch.Tensor:
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    lap = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel)
    return F.avg_pool2d(lap.abs(), patch).flatten(1)


def tgm_loop(scores: torch.Tensor, mask_ratio: float, gen: torch.Generator) -> torch.Tensor:
    n, length = scores.shape
    n_keep = length - int(length * mask_ratio)
    mask = torch.ones(n, length, dtype=torch.bool)
    for i, s in enumerate(scores):
        z = (s - s.mean()) / s.std(unbiased=False).clamp_min(1e-12)
        keep = torch.multinomial(torch.exp(-z), n_keep, replacement=False, generator=gen)
        mask[i, keep] = False
    return mask


def main() -> None:
    # One thread: on a shared CPU, intra-op threads thrash and bury the ratios in noise.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (224, 224), dtype=np.uint8)
    g = ScanGeometry()
    assert np.array_equal(linear_to_convex(img, g), smat_uncached(img, g))
    cached, uncached = median_s(lambda: linear_to_convex(img, g)), median_s(lambda: smat_uncached(img, g))
    print(f"SMAT 224px  cached maps {cached * 1e3:7.3f} ms | rebuilt maps {uncached * 1e3:7.3f} ms "
          f"| speed-up x{uncached / cached:.1f}")

    batch = torch.rand(256, 1, 224, 224)
    scores = texture_scores(batch, 16)                                          # [256, 196]
    gen = torch.Generator().manual_seed(0)
    vec = median_s(lambda: tgm_mask(scores, 0.75, 1.0, gen))
    loop = median_s(lambda: tgm_loop(scores, 0.75, gen), repeats=7, inner=1)
    print(f"TGM  256x196 vectorised {vec * 1e3:7.3f} ms | per-image multinomial {loop * 1e3:7.3f} ms "
          f"| speed-up x{loop / vec:.1f}")
    assert torch.allclose(texture_scores(batch, 16), texture_scores_conv2d(batch, 16), atol=1e-5)
    ts = median_s(lambda: texture_scores(batch, 16), repeats=7, inner=1)
    ts_conv = median_s(lambda: texture_scores_conv2d(batch, 16), repeats=7, inner=1)
    print(f"TGM  texture_scores 256x224px stencil {ts * 1e3:7.1f} ms | conv2d {ts_conv * 1e3:7.1f} ms "
          f"| speed-up x{ts_conv / ts:.1f}")

    mic = median_s(lambda: corrupt(img, rng, p=1.0, p_each=1.0))
    print(f"MIC  224px all three corruptions {mic * 1e3:7.3f} ms per image")


if __name__ == "__main__":
    main()
