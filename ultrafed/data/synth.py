"""Synthetic ultrasound cohort: the embedded default data and the test fixture.

Real patient images cannot ship with the project, yet every stage (quality gate, UltraMIM,
federated rounds, fine-tuning) needs images that behave like ultrasound: speckle, dark lesions
with shadows, sector fans, and sites that differ from each other (non-IID). So images are made
by a small imaging model rather than drawn as shapes:

    tissue reflectivity (layers, fibres, lesion) x random scatterers
    -> round-trip attenuation (lesions shadow or enhance what lies behind them)
    -> separable point-spread function, demodulated to I/Q (envelope = |I + iQ|)
    -> receiver noise, time-gain compensation -> log compression to 8 bit
    -> convex probes: scan conversion from (depth, angle) to a fan with ``cv2.remap``.

Speckle is then the natural result of interfering scatterers, not a texture painted on.
Pixel sizes of the point-spread function are those of the *displayed* image (small), not of a
transducer; the model is for realism of appearance, not for acoustic accuracy.
"""
from __future__ import annotations

import csv
import hashlib
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

LABELS: tuple[str, ...] = ("normal", "benign", "malignant")
SYNTH_PROBES: tuple[str, ...] = ("linear", "convex")
CSV_COLUMNS: tuple[str, ...] = ("id", "label", "probe", "split", "height", "width")
SPLIT_FRACTIONS: tuple[tuple[str, float], ...] = (("train", 0.7), ("val", 0.1), ("test", 0.2))
ATTEN_DB_PER_CM_MHZ = 0.5  # soft-tissue average, one way
_TOP_DB = 25.0  # display: envelope level (dB re mean tissue echo) that maps to white at 0 dB gain


@dataclass(frozen=True)
class SiteStyle:
    """How one site's scanner, organ and patients look; sites differ in all of these."""

    name: str                      # organ-like texture family, for humans
    depth_cm: float                # imaging depth: with the frequency sets the attenuation
    freq_mhz: float
    tgc: float                     # fraction of the mean attenuation the gain curve undoes
    gain_db: float                 # overall display gain
    dynamic_range_db: float        # log-compression window
    noise: float                   # receiver noise RMS, relative to the mean tissue echo
    density: float                 # scatterers per pixel: 1 = fully developed speckle, < 1 grainy
    psf_axial: float               # pulse sigma along depth, px of a 128-px image
    psf_lateral: float             # beam sigma across lines, px of a 128-px image
    layers: int                    # tissue layers with specular boundaries (0 = homogeneous organ)
    fibres: float                  # strength of laterally stretched fibrous texture
    p_convex: float                # share of convex-probe images (probe mix)
    class_mix: tuple[float, float, float]  # normal, benign, malignant shares
    lesion_size: tuple[float, float] = (0.08, 0.16)  # lesion half-width, fraction of the width
    sector_deg: float = 60.0       # convex fan opening
    r_min_frac: float = 0.15       # convex: apex dead zone, fraction of the image height

    @property
    def attenuation_np(self) -> float:
        """Round-trip amplitude attenuation over the full depth, in nepers."""
        return ATTEN_DB_PER_CM_MHZ * self.freq_mhz * 2.0 * self.depth_cm / 8.686


_BASE_STYLES: tuple[SiteStyle, ...] = (
    # Breast-like: high-frequency linear probe, shallow, layered fat/gland/muscle, fine speckle.
    SiteStyle(name="breast", depth_cm=4.0, freq_mhz=10.0, tgc=0.9, gain_db=0.0, dynamic_range_db=55.0,
              noise=0.002, density=0.7, psf_axial=1.0, psf_lateral=1.8, layers=4, fibres=0.35,
              p_convex=0.1, class_mix=(0.3, 0.4, 0.3), lesion_size=(0.12, 0.22)),
    # Abdominal/obstetric-like: low-frequency convex probe, deep, homogeneous organ, coarse speckle.
    SiteStyle(name="abdomen", depth_cm=14.0, freq_mhz=3.5, tgc=0.8, gain_db=-5.0, dynamic_range_db=60.0,
              noise=0.0015, density=1.0, psf_axial=1.4, psf_lateral=2.6, layers=1, fibres=0.0,
              p_convex=0.9, class_mix=(0.5, 0.35, 0.15), lesion_size=(0.08, 0.15), sector_deg=70.0),
    # Thyroid-like: both probes, granular sparse scatterers, bright, more malignant nodules.
    SiteStyle(name="thyroid", depth_cm=4.5, freq_mhz=12.0, tgc=0.95, gain_db=5.0, dynamic_range_db=50.0,
              noise=0.001, density=0.3, psf_axial=1.1, psf_lateral=2.0, layers=2, fibres=0.15,
              p_convex=0.5, class_mix=(0.2, 0.3, 0.5), lesion_size=(0.12, 0.22)),
)


def site_style(site_index: int) -> SiteStyle:
    """Style of site ``site_index``: three distinct base styles, later sites are jittered copies."""
    if site_index < 0:
        raise ValueError(f"site_index must be >= 0, got {site_index}")
    base = _BASE_STYLES[site_index % len(_BASE_STYLES)]
    if site_index < len(_BASE_STYLES):
        return base
    rng = np.random.default_rng([7919, site_index])  # fixed per index: a site keeps its look

    def j(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    mix = np.asarray(base.class_mix) * rng.uniform(0.6, 1.4, 3)
    return SiteStyle(
        name=f"{base.name}-{site_index}", depth_cm=base.depth_cm * j(0.8, 1.25), freq_mhz=base.freq_mhz,
        tgc=min(1.0, base.tgc * j(0.9, 1.08)), gain_db=base.gain_db + j(-3, 3),
        dynamic_range_db=base.dynamic_range_db + j(-5, 5), noise=base.noise * j(0.5, 2.0),
        density=min(1.0, base.density * j(0.7, 1.3)), psf_axial=base.psf_axial * j(0.85, 1.2),
        psf_lateral=base.psf_lateral * j(0.85, 1.2), layers=base.layers, fibres=base.fibres * j(0.5, 1.5),
        p_convex=float(np.clip(base.p_convex + j(-0.2, 0.2), 0.0, 1.0)),
        class_mix=tuple(float(v) for v in mix / mix.sum()), lesion_size=base.lesion_size,
        sector_deg=base.sector_deg, r_min_frac=base.r_min_frac,
    )


# ----------------------------------------------------------------------------------------------
# Tissue model, in acquisition coordinates: rows = depth (0 at the probe), columns = scan lines.

def _tissue(n: int, style: SiteStyle, rng: np.random.Generator) -> np.ndarray:
    """[n, n] float32 amplitude reflectivity of lesion-free tissue (mean about 1)."""
    z = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, n, dtype=np.float32)[None, :]
    refl = np.ones((n, n), np.float32)
    if style.layers:
        bounds = np.sort(rng.uniform(0.06, 0.85, style.layers))
        levels = rng.uniform(0.45, 1.5, style.layers + 1).astype(np.float32)
        index = np.zeros((n, n), np.int64)
        edges = []
        for b in bounds:  # wavy boundary: tissue planes are rarely flat
            f, ph, amp = rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi), rng.uniform(0.005, 0.04)
            edge = (b + amp * np.sin(2 * np.pi * f * x + ph)).astype(np.float32)
            index += z > edge
            edges.append(edge)
        refl = levels[index]
        width = 0.8 / n
        for edge in edges:  # specular interface: a thin bright line
            refl += rng.uniform(1.0, 2.5) * np.exp(-((z - edge) / width) ** 2)
    # organ-scale brightness drift and fibres stretched along the interfaces
    drift = cv2.resize(rng.standard_normal((5, 5)).astype(np.float32), (n, n), interpolation=cv2.INTER_CUBIC)
    refl *= np.exp(0.15 * drift)
    if style.fibres > 0:
        f = cv2.GaussianBlur(rng.standard_normal((n, n)).astype(np.float32), (0, 0),
                             sigmaX=n / 12.0, sigmaY=max(0.6, n / 160.0))
        refl *= np.exp(style.fibres * f / (f.std() + 1e-6))
    return refl


@dataclass(frozen=True)
class _Lesion:
    soft: np.ndarray   # [n, n] float32 in [0, 1]: 1 inside, soft edge
    inside: np.ndarray  # [n, n] bool: the mask
    contrast: float    # reflectivity factor inside (< 1: hypoechoic)
    atten: float       # extra round-trip attenuation across the lesion, nepers (< 0: enhancement)
    capsule: float     # bright rim strength


def _lesion(n: int, label: str, style: SiteStyle, rng: np.random.Generator) -> _Lesion:
    """Benign: smooth wider-than-tall oval (solid, or an anechoic cyst); malignant: irregular,
    spiculated, taller-than-wide, attenuating: the classic sonographic signs."""
    z = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, n, dtype=np.float32)[None, :]
    cz, cx = rng.uniform(0.38, 0.6), rng.uniform(0.32, 0.68)
    a = rng.uniform(*style.lesion_size)  # half-width (lateral)
    malignant = label == "malignant"
    b = a * (rng.uniform(0.9, 1.3) if malignant else rng.uniform(0.55, 0.85))  # half-height (depth)
    dx, dz = (x - cx) / a, (z - cz) / b
    rho = np.sqrt(dx * dx + dz * dz)
    # Margin radius as a function of angle, tabulated once (cheap) and looked up per pixel.
    ang = np.linspace(-np.pi, np.pi, 721)
    margin = np.ones_like(ang)
    if malignant:
        for k in range(3, 8):  # lobulated margin
            margin += rng.uniform(0.0, 0.07) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
        for _ in range(int(rng.integers(5, 10))):  # spicules
            d = np.angle(np.exp(1j * (ang - rng.uniform(-np.pi, np.pi))))
            margin += rng.uniform(0.25, 0.6) * np.exp(-0.5 * (d / 0.07) ** 2)
        edge = 0.04
    else:
        margin += 0.04 * np.cos(2 * ang + rng.uniform(0, 2 * np.pi))
        edge = 0.12
    index = np.rint((np.arctan2(dz, dx) + np.pi) * (720 / (2 * np.pi))).astype(np.intp)
    radius = margin.astype(np.float32)[index]
    depth_in = radius - rho  # > 0 inside
    soft = np.clip(depth_in / edge + 0.5, 0.0, 1.0).astype(np.float32)
    inside = depth_in > 0
    thickness = 2.0 * b  # fraction of depth the beam crosses
    if malignant:
        return _Lesion(soft, inside, float(rng.uniform(0.12, 0.3)), float(rng.uniform(1.0, 1.8)), 0.0)
    if rng.random() < 0.35:  # simple cyst: anechoic, fluid barely attenuates -> posterior enhancement
        return _Lesion(soft, inside, 0.02, -style.attenuation_np * thickness * 0.9, 1.2)
    return _Lesion(soft, inside, float(rng.uniform(0.22, 0.42)), 0.0, 0.6)


def _reflectivity(n: int, label: str, style: SiteStyle, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reflectivity, per-row attenuation map (nepers per depth sample) and lesion mask."""
    refl = _tissue(n, style, rng)
    atten = np.full((n, n), style.attenuation_np / n, np.float32)
    mask = np.zeros((n, n), bool)
    if label != "normal":
        les = _lesion(n, label, style, rng)
        mask = les.inside
        inner = 1.0 + les.soft * (les.contrast - 1.0)
        if label == "malignant":  # heterogeneous interior echoes
            inner *= np.exp(0.35 * cv2.GaussianBlur(rng.standard_normal((n, n)).astype(np.float32), (0, 0), 1.5))
        rim = les.capsule * les.soft * (1.0 - les.soft) * 4.0
        refl = refl * inner + rim
        rows = les.inside.sum(axis=0, keepdims=True).clip(min=1)
        atten += les.soft * (les.atten / rows)  # spread the lesion's total over its own rows
    return refl, np.maximum(atten, 0.0), mask


# ----------------------------------------------------------------------------------------------
# Imaging: PSF, envelope, gain curve, log compression, scan conversion.

@lru_cache(maxsize=64)
def _psf(size: int, sig_ax: float, sig_lat: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Axial in-phase and quadrature kernels (Gaussian-modulated cos/sin), lateral Gaussian,
    and the envelope RMS a unit-power scatterer field produces (to normalise it away)."""
    s = size / 128.0
    sa, sl = max(0.5, sig_ax * s), max(0.5, sig_lat * s)
    t = np.arange(-int(np.ceil(3 * sa)), int(np.ceil(3 * sa)) + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / sa) ** 2)
    f0 = min(0.35, 0.55 / sa)  # carrier: about two cycles per pulse, below Nyquist
    kz_i, kz_q = g * np.cos(2 * np.pi * f0 * t), g * np.sin(2 * np.pi * f0 * t)
    u = np.arange(-int(np.ceil(3 * sl)), int(np.ceil(3 * sl)) + 1, dtype=np.float64)
    kx = np.exp(-0.5 * (u / sl) ** 2)
    rms = float(np.sqrt((g ** 2).sum() * (kx ** 2).sum()))
    return kz_i.astype(np.float32), kz_q.astype(np.float32), kx.astype(np.float32), rms


@lru_cache(maxsize=16)
def _fan_maps(size: int, sector_deg: float, r_min_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.remap`` maps from the output image to (line, depth) samples of a fan whose apex is
    at the top centre: depth r in [r_min, size), angle within +-sector/2; outside maps to -1."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cx = (size - 1) / 2.0
    r = np.hypot(xx - cx, yy)
    theta = np.arctan2(xx - cx, yy)  # 0 straight down
    half = np.deg2rad(sector_deg) / 2.0
    r0, r1 = r_min_frac * size, float(size)
    row = (r - r0) / (r1 - r0) * (size - 1)
    col = (theta + half) / (2 * half) * (size - 1)
    outside = (r < r0) | (r > r1) | (np.abs(theta) > half)
    row[outside], col[outside] = -1.0, -1.0
    return col.astype(np.float32), row.astype(np.float32)


def sector_mask(size: int, sector_deg: float = 60.0, r_min_frac: float = 0.15) -> np.ndarray:
    """[size, size] bool: pixels inside the convex fan (the rest is black in the image)."""
    map_x, _ = _fan_maps(size, float(sector_deg), float(r_min_frac))
    return map_x >= 0


def synth_image(size: int, probe: str, style: SiteStyle, label: str, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """One B-mode image and its lesion mask: uint8 ``[size, size]`` each, mask 0/255
    (all zero for ``normal``)."""
    if probe not in SYNTH_PROBES:
        raise ValueError(f"probe must be one of {SYNTH_PROBES}, got {probe!r}")
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    if size < 32:
        raise ValueError(f"size must be >= 32 px, got {size}")
    n = size
    refl, atten, mask = _reflectivity(n, label, style, rng)
    # Scatterers: Gaussian amplitudes, thinned to the site's density (power kept at 1).
    scat = rng.standard_normal((n, n), dtype=np.float32)
    if style.density < 1.0:
        scat *= (rng.random((n, n), dtype=np.float32) < style.density) / np.float32(np.sqrt(style.density))
    if label == "malignant" and rng.random() < 0.5:  # microcalcifications: a few punctate echoes
        ys, xs = np.nonzero(mask)
        pick = rng.choice(len(ys), size=min(len(ys), int(rng.integers(1, 5))), replace=False)
        scat[ys[pick], xs[pick]] = rng.uniform(4.0, 7.0, len(pick)) / refl[ys[pick], xs[pick]]
    # Round-trip attenuation: what lies behind an attenuating lesion is shadowed.
    field = refl * scat * np.exp(-np.cumsum(atten, axis=0))
    kz_i, kz_q, kx, rms = _psf(size, style.psf_axial, style.psf_lateral)
    i = cv2.sepFilter2D(field, cv2.CV_32F, kx, kz_i, borderType=cv2.BORDER_REFLECT)
    q = cv2.sepFilter2D(field, cv2.CV_32F, kx, kz_q, borderType=cv2.BORDER_REFLECT)
    noise = np.float32(style.noise * rms)
    i += noise * rng.standard_normal((n, n), dtype=np.float32)
    q += noise * rng.standard_normal((n, n), dtype=np.float32)
    env = np.sqrt(i * i + q * q) / np.float32(rms)
    # Time-gain compensation amplifies signal and receiver noise alike, deeper = more.
    depth = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    env *= np.exp(np.float32(style.tgc * style.attenuation_np) * depth)
    db = 20.0 * np.log10(env + np.float32(1e-6))
    floor = _TOP_DB - style.gain_db - style.dynamic_range_db
    img = (db - floor) * np.float32(255.0 / style.dynamic_range_db)
    mask_u8 = mask.astype(np.uint8) * 255
    if probe == "convex":
        map_x, map_y = _fan_maps(size, float(style.sector_deg), float(style.r_min_frac))
        img = cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        img[map_x < 0] = 0
        mask_u8 = cv2.remap(mask_u8, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=0)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), mask_u8


# ----------------------------------------------------------------------------------------------
# Cohort on disk, in the layout of ../shared/data/<name> (readable by ultrafed.data.sites).

def _quota(n: int, shares: tuple[float, ...]) -> list[int]:
    """Largest-remainder counts summing to ``n``: the site's mix, exactly, at any ``n``."""
    w = np.asarray(shares, np.float64)
    w = w / w.sum()
    base = np.floor(w * n).astype(int)
    rest = np.argsort(-(w * n - base), kind="stable")[: n - int(base.sum())]
    base[rest] += 1
    return [int(v) for v in base]


def assign_splits(ids: list[str], seed: int) -> dict[str, str]:
    """Deterministic train/val/test (70/10/20) by rank of sha256(seed, id): stable when a site
    grows, and every split non-empty whenever ``len(ids) >= 3`` (at 10 ids: 7/1/2)."""
    order = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}/{i}".encode()).hexdigest())
    n = len(order)
    n_val = round(0.1 * n)
    n_test = round(0.2 * n)
    if n >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    out = {i: "train" for i in order[: n - n_val - n_test]}
    out.update({i: "val" for i in order[n - n_val - n_test: n - n_test]})
    out.update({i: "test" for i in order[n - n_test:]})
    return out


def _is_synth_site(folder: Path) -> bool:
    try:
        with open(folder / "labels.csv", newline="") as f:
            return next(csv.reader(f), None) == list(CSV_COLUMNS)
    except OSError:
        return False


def _write_png(path: Path, img: np.ndarray) -> None:
    if not cv2.imwrite(str(path), img):
        raise OSError(f"{path}: could not write PNG")


def make_site(folder: str | Path, site_index: int, n_images: int, seed: int, size: int = 128) -> dict[str, int]:
    """Write one synthetic site into ``folder`` (replacing an earlier synthetic one, atomically);
    returns per-label image counts."""
    folder = Path(folder)
    if folder.exists() and not _is_synth_site(folder) and any(folder.iterdir()):
        raise FileExistsError(f"{folder}: exists and is not a synthetic site folder; refusing to overwrite")
    style = site_style(site_index)
    site_rng = np.random.default_rng([seed, site_index])
    labels = [lab for lab, c in zip(LABELS, _quota(n_images, style.class_mix)) for _ in range(c)]
    probes = ["convex"] * _quota(n_images, (style.p_convex, 1.0 - style.p_convex))[0]
    probes += ["linear"] * (n_images - len(probes))
    labels = [labels[i] for i in site_rng.permutation(n_images)]
    probes = [probes[i] for i in site_rng.permutation(n_images)]
    ids = [f"s{site_index}_{i:05d}" for i in range(n_images)]
    splits = assign_splits(ids, seed)

    tmp = folder.parent / f".{folder.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks").mkdir()
    rows = []
    for i, (id_, label, probe) in enumerate(zip(ids, labels, probes)):
        rng = np.random.default_rng([seed, site_index, i])  # per image: independent of order
        img, mask = synth_image(size, probe, style, label, rng)
        _write_png(tmp / "images" / f"{id_}.png", img)
        _write_png(tmp / "masks" / f"{id_}.png", mask)
        rows.append((id_, label, probe, splits[id_], size, size))
    with open(tmp / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        w.writerows(rows)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return {lab: labels.count(lab) for lab in LABELS}


def make_cohort(out: str | Path, sites: int, per_site: int, seed: int, size: int = 128,
                progress: Callable[[str], None] | None = print) -> list[Path]:
    """Write ``out/site-<k>`` for k < ``sites`` (images/, masks/, labels.csv with
    id,label,probe,split,height,width); the same arguments give byte-identical files on the same
    machine. Another CPU may round a few pixels differently (NumPy and OpenCV pick float kernels
    by CPU features: docs/DATA.md, DVC), so no hash of a cohort is pinned anywhere."""
    if sites < 1 or per_site < 1:
        raise ValueError(f"need sites >= 1 and per_site >= 1, got sites={sites}, per_site={per_site}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    for k in range(sites):
        t0 = time.perf_counter()
        folder = out / f"site-{k}"
        counts = make_site(folder, k, per_site, seed, size)
        folders.append(folder)
        if progress:
            mix = ", ".join(f"{lab} {c}" for lab, c in counts.items())
            progress(f"site-{k} ({site_style(k).name}): {per_site} images ({mix}) "
                     f"in {time.perf_counter() - t0:.1f}s -> {folder}")
    return folders
