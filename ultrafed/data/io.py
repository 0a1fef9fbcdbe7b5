"""One image reader for every site folder.

Ultrasound exports come as PNG, JPEG, BMP or TIFF, 8- or 16-bit, gray, RGB or RGBA. Everything
downstream wants one uint8 gray channel, so reading, converting and rejecting unusable files
happen here, once. A bad file raises :class:`ImageReadError` naming the file and the reason;
callers that walk a folder collect those and go on (a run never dies on one file).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MIN_SIDE = 8  # smaller than one useful patch: not an ultrasound frame


class ImageReadError(ValueError):
    """A file that cannot serve as an image; ``str()`` is one line: ``path: reason``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        # Printable on one line even for non-UTF-8 names (lone surrogates) or names with newlines.
        shown = self.path.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("\n", "\\n")
        super().__init__(f"{shown}: {reason}")


@dataclass(frozen=True)
class LoadedImage:
    gray: np.ndarray  # [H, W] uint8
    bit_depth: int    # of the file as stored (8 or 16)
    channels: int     # of the file as stored (1, 3 or 4)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        # Scale by the full 16-bit range: keeps relative brightness between files.
        return (img.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return np.clip((np.nan_to_num(img, nan=lo) - lo) * scale, 0, 255).astype(np.uint8)
    info = np.iinfo(img.dtype)
    return ((img.astype(np.float64) - info.min) * (255.0 / (info.max - info.min))).astype(np.uint8)


def _to_gray(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] == 1:
        return img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)  # alpha dropped: scanners export it opaque
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    raise ValueError(f"unsupported array shape {img.shape}")


def load_image(path: str | Path, *, allow_constant: bool = False) -> LoadedImage:
    """Read ``path`` as one uint8 gray channel, or raise :class:`ImageReadError`."""
    p = Path(path)
    if p.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ImageReadError(p, f"unsupported format '{p.suffix or '(none)'}' (expected {', '.join(IMAGE_EXTENSIONS)})")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(p, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(p, "is a directory") from None
    except OSError as e:
        raise ImageReadError(p, f"cannot read ({e.strerror or e})") from None
    if not data:
        raise ImageReadError(p, "zero-byte file")
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ImageReadError(p, "not a decodable image (corrupt, truncated or another format)")
    if p.suffix.lower() == ".png" and not data.rstrip().endswith(b"IEND\xaeB`\x82"):
        # libpng decodes a cut-off PNG into a partly grey image without complaint.
        raise ImageReadError(p, "truncated PNG (no IEND chunk)")
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    bit_depth = raw.dtype.itemsize * 8
    try:
        gray = _to_uint8(_to_gray(raw))
    except ValueError as e:
        raise ImageReadError(p, str(e)) from None
    h, w = gray.shape
    if min(h, w) < MIN_SIDE:
        raise ImageReadError(p, f"too small ({w}x{h} px; need at least {MIN_SIDE} px a side)")
    if not allow_constant and int(gray.max()) == int(gray.min()):
        raise ImageReadError(p, f"blank: every pixel is {int(gray.min())}")
    return LoadedImage(gray=np.ascontiguousarray(gray), bit_depth=bit_depth, channels=channels)


def read_gray(path: str | Path) -> np.ndarray:
    """``[H, W]`` uint8 gray image of ``path``; raises :class:`ImageReadError`."""
    return load_image(path).gray


def read_mask(path: str | Path) -> np.ndarray:
    """``[H, W]`` bool lesion mask (any non-zero pixel); an empty (all-zero) mask is valid."""
    return load_image(path, allow_constant=True).gray > 0


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted, symlink loops not followed)."""
    root = Path(root)
    out: list[Path] = []
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError:
            continue  # vanished or a broken/looping link
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = list(d.iterdir())
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir():
                    stack.append(e)
                elif e.suffix.lower() in IMAGE_EXTENSIONS:
                    out.append(e)
            except OSError:
                continue
    return sorted(out)
