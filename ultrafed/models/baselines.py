"""Baselines trained from scratch on the same splits, to say what pretraining is worth.

- ResNet-18 (torchvision, ``weights=None``), first conv for one gray channel: the CNN a
  hospital would try first.
- A small U-Net (Ronneberger et al., 2015; BatchNorm, transposed-conv upsampling).
- Hand-crafted texture/intensity features + logistic regression: what radiomics-style
  pipelines get without any deep learning.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models import resnet18

from ultrafed.models.heads import ConvBlock


def build_resnet18(num_classes: int, in_chans: int = 1) -> nn.Module:
    """torchvision ResNet-18, random init, ``in_chans`` input channels, ``num_classes`` outputs."""
    m = resnet18(weights=None, num_classes=num_classes)
    if in_chans != 3:
        m.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(m.conv1.weight, mode="fan_out", nonlinearity="relu")
    return m


class UNet(nn.Module):
    """``[N, C, H, W]`` -> logits ``[N, num_classes, H, W]``; H and W divisible by ``2**depth``."""

    def __init__(self, in_chans: int = 1, num_classes: int = 1, base: int = 16, depth: int = 4) -> None:
        super().__init__()
        chans = [base * 2 ** i for i in range(depth + 1)]
        self.depth = depth
        self.downs = nn.ModuleList([ConvBlock(in_chans, chans[0])] + [ConvBlock(chans[i], chans[i + 1]) for i in range(depth)])
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth)))
        self.blocks = nn.ModuleList(ConvBlock(2 * chans[i], chans[i]) for i in reversed(range(depth)))
        self.out = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        k = 2 ** self.depth
        if x.shape[-1] % k or x.shape[-2] % k:
            raise ValueError(f"UNet input {tuple(x.shape[-2:])} must be divisible by {k}")
        skips = []
        for i, down in enumerate(self.downs):
            x = down(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.ups, self.blocks):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return self.out(x)


# -- hand-crafted features ---------------------------------------------------------------------

_GLCM_OFFSETS: tuple[tuple[int, int], ...] = ((0, 1), (1, 0), (1, 1), (1, -1))


def _shift_pairs(img: np.ndarray, dy: int, dx: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel pairs ``(p, q)`` with ``q`` at offset ``(dy, dx)`` of ``p``, both inside the image."""
    h, w = img.shape
    ys, ye = max(0, -dy), h - max(0, dy)
    xs, xe = max(0, -dx), w - max(0, dx)
    return img[ys:ye, xs:xe], img[ys + dy:ye + dy, xs + dx:xe + dx]


def glcm_features(gray: np.ndarray, levels: int = 8) -> np.ndarray:
    """Haralick contrast, homogeneity, energy, correlation, entropy for 4 directions (symmetric GLCM)."""
    q = (gray.astype(np.int64) * levels) // 256
    i, j = np.indices((levels, levels))
    out = []
    for dy, dx in _GLCM_OFFSETS:
        a, b = _shift_pairs(q, dy, dx)
        m = np.bincount((a * levels + b).ravel(), minlength=levels * levels).reshape(levels, levels).astype(np.float64)
        m = m + m.T
        p = m / m.sum()
        mu = (i * p).sum()
        var = ((i - mu) ** 2 * p).sum()
        nz = p[p > 0]
        out += [((i - j) ** 2 * p).sum(), (p / (1.0 + np.abs(i - j))).sum(), (p ** 2).sum(),
                (((i - mu) * (j - mu) * p).sum() / var) if var > 0 else 0.0, -(nz * np.log2(nz)).sum()]
    return np.asarray(out)


def lbp_histogram(gray: np.ndarray, radius: int = 1) -> np.ndarray:
    """Rotation-invariant uniform LBP (8 neighbours at ``radius``, square ring): 10-bin histogram."""
    g = gray.astype(np.int16)
    c = g[radius:-radius, radius:-radius]
    h, w = c.shape
    r = radius
    ring = [(-r, -r), (-r, 0), (-r, r), (0, r), (r, r), (r, 0), (r, -r), (0, -r)]  # clockwise
    bits = np.stack([g[r + dy:r + dy + h, r + dx:r + dx + w] >= c for dy, dx in ring])  # [8, h, w]
    transitions = (bits != np.roll(bits, 1, axis=0)).sum(axis=0)
    code = np.where(transitions <= 2, bits.sum(axis=0), 9)
    hist = np.bincount(code.ravel(), minlength=10).astype(np.float64)
    return hist / hist.sum()


def orientation_histograms(gray: np.ndarray, cells: int = 4, bins: int = 9) -> np.ndarray:
    """HOG-like shape code: per cell of a ``cells x cells`` grid, a histogram of unsigned gradient
    orientation weighted by magnitude, each cell L2-normalised (``cells * cells * bins`` values)."""
    x = gray.astype(np.float64)
    gx = cv2.Sobel(x, cv2.CV_64F, 1, 0, ksize=3)
    gy = cv2.Sobel(x, cv2.CV_64F, 0, 1, ksize=3)
    mag = np.hypot(gx, gy)
    b = np.minimum((np.mod(np.arctan2(gy, gx), np.pi) / np.pi * bins).astype(np.int64), bins - 1)
    h, w = x.shape
    cy = np.minimum(np.arange(h) * cells // h, cells - 1)[:, None]
    cx = np.minimum(np.arange(w) * cells // w, cells - 1)[None, :]
    idx = ((cy * cells + cx) * bins + b).ravel()
    hist = np.bincount(idx, weights=mag.ravel(), minlength=cells * cells * bins).reshape(cells * cells, bins)
    return (hist / (np.linalg.norm(hist, axis=1, keepdims=True) + 1e-8)).ravel()


def handcrafted_features(gray: np.ndarray, size: int = 128) -> np.ndarray:
    """One feature vector per image: intensity histogram and moments, gradient statistics,
    GLCM, LBP and a coarse HOG. The frame is squashed to ``size x size`` first."""
    g = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    x = g.astype(np.float64) / 255.0
    mu, sd = x.mean(), x.std() + 1e-8
    z = (x - mu) / sd
    intensity = np.concatenate([
        np.histogram(x, bins=16, range=(0.0, 1.0))[0] / x.size,
        [mu, sd, (z ** 3).mean(), (z ** 4).mean()], np.percentile(x, [5, 25, 50, 75, 95]),
    ])
    gx = cv2.Sobel(x, cv2.CV_64F, 1, 0, ksize=3)
    gy = cv2.Sobel(x, cv2.CV_64F, 0, 1, ksize=3)
    mag = np.hypot(gx, gy)
    lap = cv2.Laplacian(x, cv2.CV_64F)
    gradient = np.concatenate([[mag.mean(), mag.std(), lap.var()],
                               np.histogram(mag, bins=8, range=(0.0, 2.0))[0] / mag.size])
    # the centre holds the lesion far more often than the rim: contrast between them
    c = size // 4
    centre = x[c:-c, c:-c]
    regional = [centre.mean() - mu, centre.std(), (centre < np.percentile(x, 20)).mean()]
    hog = orientation_histograms(cv2.resize(g, (32, 32), interpolation=cv2.INTER_AREA))
    return np.concatenate([intensity, gradient, regional, glcm_features(g), lbp_histogram(g, 1),
                           lbp_histogram(g, 2), hog]).astype(np.float64)
