"""Small site folders for the manifest / quality-gate tests (images written with OpenCV)."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

LABELS = ("normal", "benign", "malignant")


def speckle(seed: int, size: int = 64, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A uint8 speckle-like image (Rayleigh noise, lightly blurred, depth gradient): distinct per
    seed, mean about 100, std about 30: passes every default expectation."""
    rng = np.random.default_rng(seed)
    h, w = shape or (size, size)
    x = rng.rayleigh(1.0, (h, w)).astype(np.float32)
    x = cv2.GaussianBlur(x, (0, 0), 0.8)
    x *= np.linspace(1.2, 0.8, h, dtype=np.float32)[:, None]
    return np.clip(x / x.mean() * 100.0, 0, 250).astype(np.uint8)


def write_png(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img), path
    return path


def write_site(root: Path, n: int = 10, size: int = 64, *, seed: int = 0, masks: bool = True,
               labels_csv: bool = True, extra_rows: list[dict] | None = None) -> Path:
    """``root/images/img_NNN.png`` (+ masks, labels.csv with id,label,split) for n images."""
    rows = []
    for i in range(n):
        rid = f"img_{i:03d}"
        write_png(root / "images" / f"{rid}.png", speckle(seed * 1000 + i, size))
        if masks:
            m = np.zeros((size, size), np.uint8)
            m[size // 4: size // 2, size // 4: size // 2] = 255 if i % 2 else 0
            write_png(root / "masks" / f"{rid}.png", m)
        rows.append({"id": rid, "label": LABELS[i % 3], "split": "train" if i < n - 2 else "val"})
    rows += extra_rows or []
    if labels_csv:
        with open(root / "labels.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "label", "split"], lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    root.mkdir(parents=True, exist_ok=True)
    return root


def add_row(root: Path, rid: str, label: str = "benign", split: str = "train") -> None:
    """Append a labels.csv row (for a file a test writes itself)."""
    with open(root / "labels.csv", "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow([rid, label, split])
