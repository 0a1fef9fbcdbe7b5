"""Mixed image corruption (MIC): degrade the encoder's *input*, never the target.

Real scanners blur (probe motion, focus) and drop or saturate pixels; an encoder that must
reconstruct the clean image from such an input learns to see through them. With probability
``p`` an image is corrupted; then motion blur, Gaussian blur and salt-and-pepper noise are each
applied with probability ``p_each`` (at least one of them). The caller keeps the clean image as
the reconstruction target.

Lengths (motion kernel, Gaussian sigma) are given at ``ref_size`` px (the paper's 224) and scale
with the image, so a 96-px image is degraded as its 224-px original would have been. Each call
draws from the generator it is given; there is no global random state.
"""
from __future__ import annotations

from typing import TypeVar

import cv2
import numpy as np
import torch

ImageT = TypeVar("ImageT", np.ndarray, torch.Tensor)
OPS: tuple[str, ...] = ("motion_blur", "gaussian_blur", "salt_pepper")


def motion_blur(img: np.ndarray, length: int, angle_deg: float) -> np.ndarray:
    """Average along a ``length``-px line at ``angle_deg`` (float32 ``[H, W]`` in and out)."""
    k = max(int(length), 1) | 1  # odd, so the blur does not shift the image by half a pixel
    kernel = np.zeros((k, k), np.float32)
    kernel[k // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D((k // 2, k // 2), float(angle_deg), 1.0)
    kernel = cv2.warpAffine(kernel, rot, (k, k), flags=cv2.INTER_LINEAR)
    return cv2.filter2D(img, cv2.CV_32F, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT_101)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT_101)


def salt_pepper(img: np.ndarray, amount: float, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """Set a fraction ``amount`` of pixels to ``lo`` (pepper) and another ``amount`` to ``hi`` (salt)."""
    u = rng.random(img.shape)
    out = img.copy()
    out[u < amount] = lo
    out[u >= 1.0 - amount] = hi
    return out


def _numpy_rng(generator: np.random.Generator | torch.Generator) -> np.random.Generator:
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):  # derive a child stream; advances the torch generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        return np.random.default_rng(seed)
    raise TypeError(f"corrupt: generator must be a numpy Generator or torch.Generator, got {type(generator).__name__}")


def _as_plane(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 ``[H, W]`` copy of a ``[H, W]`` or ``[1, H, W]`` image."""
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        arr = (t.float() if t.dtype.is_floating_point else t).numpy()  # bfloat16 has no numpy twin
    elif isinstance(img, np.ndarray):
        arr = img
    else:
        raise TypeError(f"corrupt: expected a numpy array or torch Tensor, got {type(img).__name__}")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"corrupt: expected a single-channel image [H, W] or [1, H, W], got shape {tuple(img.shape)}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"corrupt: unsupported dtype {arr.dtype}")
    out = arr.astype(np.float32)  # always a copy: the caller's image is never touched
    if not np.isfinite(out).all():
        raise ValueError("corrupt: image contains NaN or inf")
    return out


def _int_range(img: np.ndarray | torch.Tensor) -> tuple[float, float] | None:
    """The integer dtype's (min, max), or None for a float image."""
    if isinstance(img, torch.Tensor):
        if img.dtype.is_floating_point:
            return None
        info = torch.iinfo(img.dtype)
    elif np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
    else:
        return None
    return float(info.min), float(info.max)


def _restore(plane: np.ndarray, like: ImageT) -> ImageT:
    """Back to the input's type, dtype, shape (and device); integers are rounded and clipped."""
    rng = _int_range(like)
    if rng is not None:
        plane = np.clip(np.rint(plane), *rng)
    if isinstance(like, torch.Tensor):
        return torch.from_numpy(plane.reshape(tuple(like.shape))).to(device=like.device, dtype=like.dtype)
    return plane.reshape(like.shape).astype(like.dtype)


def corrupt_ops(img: ImageT, generator: np.random.Generator | torch.Generator, *, p: float = 0.5,
                p_each: float = 0.5, motion_kernel: int = 24, gauss_sigma: float = 1.1,
                sp_amount: float = 0.05, ref_size: int = 224,
                value_range: tuple[float, float] | None = None) -> tuple[ImageT, tuple[str, ...]]:
    """:func:`corrupt`, also returning the names of the corruptions applied (in order).

    ``value_range`` gives the pepper and salt values; by default the integer dtype's range, or
    the image's own min and max for float images (which may be [0, 1] or standardised).
    """
    for name, v in (("p", p), ("p_each", p_each)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"corrupt: {name} must be in [0, 1], got {v}")
    if not 0.0 <= sp_amount <= 0.5 or motion_kernel < 1 or gauss_sigma <= 0 or ref_size <= 0:
        raise ValueError("corrupt: need 0 <= sp_amount <= 0.5, motion_kernel >= 1, gauss_sigma > 0, ref_size > 0")
    rng = _numpy_rng(generator)
    plane = _as_plane(img)                                               # [H, W] float32 copy
    if rng.random() >= p:
        return _restore(plane, img), ()
    chosen = rng.random(len(OPS)) < p_each
    if not chosen.any():
        chosen[rng.integers(len(OPS))] = True
    scale = (plane.shape[0] + plane.shape[1]) / (2.0 * ref_size)
    if value_range is None:
        value_range = _int_range(img) or (float(plane.min()), float(plane.max()))
    applied: list[str] = []
    if chosen[0]:
        plane = motion_blur(plane, max(1, round(motion_kernel * scale)), rng.uniform(0.0, 180.0))
        applied.append(OPS[0])
    if chosen[1]:
        plane = gaussian_blur(plane, gauss_sigma * scale)
        applied.append(OPS[1])
    if chosen[2]:  # last, so the noise itself is not blurred
        plane = salt_pepper(plane, sp_amount, rng, *value_range)
        applied.append(OPS[2])
    return _restore(plane, img), tuple(applied)


def corrupt(img: ImageT, generator: np.random.Generator | torch.Generator, *, p: float = 0.5,
            p_each: float = 0.5, motion_kernel: int = 24, gauss_sigma: float = 1.1,
            sp_amount: float = 0.05, ref_size: int = 224) -> ImageT:
    """Randomly corrupted copy of ``img`` (numpy or torch; same type, dtype and shape)."""
    return corrupt_ops(img, generator, p=p, p_each=p_each, motion_kernel=motion_kernel,
                       gauss_sigma=gauss_sigma, sp_amount=sp_amount, ref_size=ref_size)[0]
