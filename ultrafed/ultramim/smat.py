"""Scanning-mode augmentation (SMAT): show every site both probe geometries.

A linear probe images a rectangle: rows are depth, columns are lateral position. A convex probe
images a fan: depth is the distance from an apex above the skin, lateral position an angle.
Sites that own only one kind of probe make the federated encoder geometry-biased; resampling
linear frames into a fan (and fans into rectangles) removes the bias.

Physics fixes the orientation: the apex is at the top, the near field (top rows of a linear
frame) lies on the inner arc next to the apex, the far field on the outer arc. (The official
code puts the near field on the outer arc.) Both directions are one ``cv2.remap`` over maps
cached per (shape, geometry), so a conversion costs one interpolation pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from scipy.ndimage import median_filter
from scipy.stats import theilslopes

PROBES: tuple[str, ...] = ("linear", "convex")
_REMAP_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)


@dataclass(frozen=True)
class ScanGeometry:
    """A fan in the frame of the convex image, in fractions so one geometry fits any size.

    Pixel-centre coordinates: x in [0, W-1], y in [0, H-1]; radii are fractions of H-1. The fan is
    symmetric about the vertical through the apex. ``apex_y_frac < 0`` puts the apex above a
    cropped frame (as in HC18). On frames taller than wide a wide fan is clipped at the sides.
    """
    angle_deg: float = 60.0   # full opening angle
    r_min_frac: float = 0.15  # inner arc (near field); the apex dead zone
    r_max_frac: float = 1.0   # outer arc (far field)
    apex_x_frac: float = 0.5
    apex_y_frac: float = 0.0

    def __post_init__(self) -> None:
        vals = (self.angle_deg, self.r_min_frac, self.r_max_frac, self.apex_x_frac, self.apex_y_frac)
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"ScanGeometry: non-finite value in {self}")
        if not 0.0 < self.angle_deg < 180.0:
            raise ValueError(f"ScanGeometry: angle_deg must be in (0, 180), got {self.angle_deg}")
        if not 0.0 <= self.r_min_frac < self.r_max_frac:
            raise ValueError(f"ScanGeometry: need 0 <= r_min_frac < r_max_frac, "
                             f"got {self.r_min_frac}, {self.r_max_frac}")

    def pixels(self, shape: tuple[int, int]) -> tuple[float, float, float, float, float]:
        """(apex x, apex y, r_min, r_max, half angle in radians) for an ``[H, W]`` frame."""
        h, w = shape
        return (self.apex_x_frac * (w - 1), self.apex_y_frac * (h - 1), self.r_min_frac * (h - 1),
                self.r_max_frac * (h - 1), math.radians(self.angle_deg) / 2.0)


def _polar(shape: tuple[int, int], g: ScanGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Radius, angle from the downward vertical (right = positive) and inside-fan flag per pixel."""
    h, w = shape
    ax, ay, r0, r1, half = g.pixels(shape)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.hypot(x - ax, y - ay)
    theta = np.arctan2(x - ax, y - ay)
    inside = (np.abs(theta) <= half) & (r >= r0) & (r <= r1)
    return r, theta, inside


@lru_cache(maxsize=64)
def _maps(shape: tuple[int, int], g: ScanGeometry, to_convex: bool) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.remap`` maps (read-only float32 ``[H, W]``) for one shape, geometry and direction."""
    h, w = shape
    ax, ay, r0, r1, half = g.pixels(shape)
    if to_convex:  # each fan pixel looks up (depth row, lateral column) in the linear frame
        r, theta, _ = _polar(shape, g)
        # A 1-px apron outside the fan repeats its edge, so resampling back does not blend in black.
        apron = (np.abs(theta) <= half + 1.0 / np.maximum(r, 1.0)) & (r >= r0 - 1.0) & (r <= r1 + 1.0)
        mx = np.where(apron, np.clip((theta + half) / (2 * half), 0.0, 1.0) * (w - 1), -1e4)
        my = np.where(apron, np.clip((r - r0) / (r1 - r0), 0.0, 1.0) * (h - 1), -1e4)
    else:  # each linear pixel (column = angle, row = depth) looks up its point in the fan
        v, u = np.mgrid[0:h, 0:w].astype(np.float64)
        theta = -half + u / max(w - 1, 1) * 2 * half
        r = r0 + v / max(h - 1, 1) * (r1 - r0)
        mx, my = ax + r * np.sin(theta), ay + r * np.cos(theta)
    maps = (mx.astype(np.float32), my.astype(np.float32))
    for m in maps:
        m.flags.writeable = False
    return maps


def _remap(img: np.ndarray, geometry: ScanGeometry | None, to_convex: bool, interpolation: int) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise ValueError(f"smat: expected a 2-D image [H, W] of at least 2x2 px, got shape {arr.shape}")
    is_bool = arr.dtype == bool
    work = arr.astype(np.uint8) if is_bool else arr
    if work.dtype.type not in _REMAP_DTYPES:
        raise ValueError(f"smat: unsupported dtype {arr.dtype} (use uint8, uint16, int16, float32 or float64)")
    mx, my = _maps(tuple(arr.shape), geometry or ScanGeometry(), to_convex)
    out = cv2.remap(work, mx, my, interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.astype(bool) if is_bool else out


def linear_to_convex(img: np.ndarray, geometry: ScanGeometry | None = None, *,
                     interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """``[H, W]`` linear frame -> ``[H, W]`` fan (zero outside); the top row lands on the inner arc."""
    return _remap(img, geometry, True, interpolation)


def convex_to_linear(img: np.ndarray, geometry: ScanGeometry | None = None, *,
                     interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """``[H, W]`` fan -> ``[H, W]`` rectangle; inner arc -> top row.

    ``geometry=None`` estimates the fan from the image's footprint (:func:`estimate_geometry`;
    HC18-like crops of a sector), falling back to the default fan.
    """
    if geometry is None:
        geometry = estimate_geometry(img) or ScanGeometry()
    return _remap(img, geometry, False, interpolation)


def sector_mask(shape: tuple[int, int], geometry: ScanGeometry | None = None) -> np.ndarray:
    """``[H, W]`` bool, True inside the fan."""
    return _polar(tuple(shape), geometry or ScanGeometry())[2]


def _footprint(img: np.ndarray) -> np.ndarray:
    """``[H, W]`` bool: the largest non-black region, with rulers, text and speckle holes removed."""
    gray = np.asarray(img)
    if gray.dtype != np.uint8:  # other ranges: black is the image's minimum
        f = gray.astype(np.float32)
        lo, hi = float(f.min()), float(f.max())
        gray = np.zeros(f.shape, np.uint8) if hi <= lo else ((f - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    fg = (cv2.medianBlur(gray, 5) > 8).astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (max(3, min(gray.shape) // 40 | 1),) * 2)
    fg = cv2.morphologyEx(cv2.morphologyEx(fg, cv2.MORPH_OPEN, k), cv2.MORPH_CLOSE, k)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return np.zeros(gray.shape, bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _fan_edge(xs: np.ndarray, ys: np.ndarray, w: int) -> tuple[float, float, float] | None:
    """(outward shift px, slope dx/dy, intercept) of one side if it is a straight, diverging edge.

    ``xs`` is the side's boundary column per footprint row, oriented so that outward is smaller.
    The edge runs from the top of the footprint to the row where the boundary is outermost
    within the upper half (a crop lets it run into the frame). A rectangular notch (a black
    text box) shifts the boundary in one step, which the straight fit cannot explain: rejected.
    """
    n = len(xs)
    upper = xs[: max(n // 2, 1)]
    end = int(np.argmin(upper))                                        # first outermost row
    shift = float(np.median(xs[: max(2, n // 30)]) - upper[end])
    if shift < 0.02 * w or end < 4:
        return None
    slope, icpt = theilslopes(xs[: end + 1], ys[: end + 1])[:2]
    if slope >= 0 or abs(-slope * (ys[end] - ys[0]) - shift) > 0.5 * shift:
        return None
    return shift, float(slope), float(icpt)


def estimate_geometry(img: np.ndarray) -> ScanGeometry | None:
    """The fan of a convex frame from its footprint, or None when the footprint is no fan.

    A fan's footprint widens with depth along straight side edges. With both edges seen, the
    apex is where they meet; with one (the other cut by a crop), the fan is taken as centred
    in the frame. Radii come from the footprint's pixels inside the fan.
    """
    arr = np.asarray(img)
    if arr.ndim != 2 or min(arr.shape) < 8:
        raise ValueError(f"smat: expected a 2-D image of at least 8x8 px, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError("smat: image contains NaN or inf")
    fp = _footprint(arr)
    h, w = fp.shape
    rows = np.flatnonzero(fp.any(axis=1))
    if len(rows) < max(8, h // 4):
        return None
    ys = rows.astype(np.float64)
    left = median_filter(fp[rows].argmax(axis=1).astype(np.float64), size=5, mode="nearest")
    right = median_filter((w - 1 - fp[rows, ::-1].argmax(axis=1)).astype(np.float64), size=5, mode="nearest")
    lf, rf = _fan_edge(left, ys, w), _fan_edge((w - 1) - right, ys, w)  # right side mirrored
    if sum(e[0] for e in (lf, rf) if e is not None) < 0.05 * w:
        return None
    if lf is not None and rf is not None:
        bl, al, br, ar = lf[1], lf[2], -rf[1], (w - 1) - rf[2]
        ay = (al - ar) / (br - bl)                                     # where the two edges meet
        ax = al + bl * ay
        half = (math.atan(br) - math.atan(bl)) / 2.0
    else:
        slope, icpt = lf[1:] if lf is not None else rf[1:]             # mirrored: same formula
        ax = (w - 1) / 2.0
        ay = (ax - icpt) / slope if lf is not None else ((w - 1) - ax - icpt) / slope
        half = math.atan(-slope)
    yy, xx = np.nonzero(fp)
    r, theta = np.hypot(xx - ax, yy - ay), np.arctan2(xx - ax, yy - ay)
    in_fan, central = np.abs(theta) <= half, np.abs(theta) <= half / 3
    if not (0 < 2 * half < math.radians(179)) or not central.any():
        return None
    r0, r1 = float(np.percentile(r[in_fan], 0.5)), float(np.percentile(r[central], 99.5))
    if r1 <= r0 + 0.2 * (h - 1):
        return None
    # Pull the outer arc and the sides 1.5 px inward: sampling a hair inside the fan beats
    # sampling the black just outside it (footprint edges are only pixel-accurate).
    r1, half = r1 - 1.5, half - 1.5 / r1
    return ScanGeometry(angle_deg=round(math.degrees(2 * half), 1), r_min_frac=round(r0 / (h - 1), 3),
                        r_max_frac=round(r1 / (h - 1), 3), apex_x_frac=round(ax / (w - 1), 3),
                        apex_y_frac=round(ay / (h - 1), 3))  # rounded: similar crops share cached maps


def detect_probe(img: np.ndarray) -> str:
    """``"convex"`` when the image's footprint is a fan, else ``"linear"`` (a full rectangle)."""
    return "convex" if estimate_geometry(img) is not None else "linear"


def smat_convert(img: np.ndarray, probe: str, mask: np.ndarray | None = None,
                 geometry: ScanGeometry | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample ``img`` (and its mask, nearest-neighbour) into the other probe geometry.

    ``probe="unknown"`` detects it first. For a convex input without ``geometry`` the fan is
    estimated from the footprint (default geometry where that fails).
    """
    estimated = None
    if probe == "unknown":
        estimated = estimate_geometry(img)
        probe = "linear" if estimated is None else "convex"
    if probe not in PROBES:
        raise ValueError(f"smat: probe must be 'linear', 'convex' or 'unknown', got {probe!r}")
    if mask is not None and np.shape(mask) != np.shape(img):
        raise ValueError(f"smat: mask shape {np.shape(mask)} differs from image shape {np.shape(img)}")
    if probe == "linear":
        convert, geom = linear_to_convex, geometry or ScanGeometry()
    else:  # the mask must follow the fan estimated from the image, not its own footprint
        convert, geom = convex_to_linear, geometry or estimated or estimate_geometry(img) or ScanGeometry()
    out = convert(img, geom)
    return out, (None if mask is None else convert(mask, geom, interpolation=cv2.INTER_NEAREST))
