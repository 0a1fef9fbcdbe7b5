"""Site manifests: one CSV row per image (hash, size, stats, labels), never a pixel.

A manifest is what leaves a site: auditors trace "which images trained which round" by its
sha256 column, and its DVC md5 is the site's data version. So it holds relative paths only,
no absolute paths or pixel data, and it is byte-reproducible: the same images give the same
file on any machine (no mtimes, fixed float precision, sorted rows).

Scanning is parallel (a process pool in chunks) and incremental: a stat cache next to the
manifest (``<manifest>.stat.json``, not versioned) keys each file on size + mtime, so an
unchanged file is not read again on the next scan.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import cv2
import numpy as np
import pandas as pd

from ultrafed.data.io import ImageReadError, decode_image, list_images, load_image, read_file_bytes, relpath_key

MANIFEST_COLUMNS: tuple[str, ...] = (
    "site", "relpath", "sha256", "size_bytes", "readable", "error",
    "width", "height", "bit_depth", "channels",
    "probe", "probe_source",
    "mean", "std", "frac_black", "frac_saturated", "sharpness", "caliper_marks",
    "dhash", "phash", "dup_group", "dup_group_size",
    "label", "mask_relpath", "mask_width", "mask_height", "mask_fraction", "mask_error",
    "split", "name_flag",
)
_INT_COLUMNS = ("size_bytes", "width", "height", "bit_depth", "channels", "caliper_marks", "dup_group",
                "dup_group_size", "mask_width", "mask_height")
_FLOAT_DECIMALS = {"mean": 3, "std": 3, "frac_black": 5, "frac_saturated": 5, "sharpness": 3,
                   "mask_fraction": 5}
_STR_COLUMNS = tuple(c for c in MANIFEST_COLUMNS if c not in _INT_COLUMNS and c not in _FLOAT_DECIMALS
                     and c != "readable")

BLACK_MAX = 4         # a pixel at or below this is "black" (background, not tissue)
SATURATED_MIN = 251   # a pixel at or above this is "saturated" (clipped gain)
CALIPER_CONTRAST = 40  # a "+" mark's arms exceed everything around them by this many grey levels
# Near-duplicates: dHash within NEAR_DUP_BITS and pHash within NEAR_DUP_PHASH_BITS. Calibrated
# on BUSI's own duplicate groups (../shared/data/busi/labels.csv `group`): most of its
# same-group pairs found (211 of 253), no pair across groups; none in the synthetic cohort.
NEAR_DUP_BITS = 8
NEAR_DUP_PHASH_BITS = 8
LABEL_KEYS = ("label", "malignant")  # the class-label column: 'label' (BUSI, synthetic), 'malignant' (DDTI)
SCAN_VERSION = 4      # bump when a per-file statistic changes meaning: invalidates stat caches
_IMAGE_FIELDS = ("sha256", "width", "height", "bit_depth", "channels", "mean", "std", "frac_black",
                 "frac_saturated", "sharpness", "caliper_marks", "dhash", "phash")  # of a readable image
_PARALLEL_MIN = 48    # below this many files a process pool costs more than it saves

# File names that look like they carry a patient identifier (flagged, never rewritten).
_NAME_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("long digit run", re.compile(r"\d{7,}")),
    ("date", re.compile(r"(?<!\d)(19|20)\d\d[-_.]?(0[1-9]|1[0-2])[-_.]?(0[1-9]|[12]\d|3[01])(?!\d)")),
    ("identifier word", re.compile(r"(?i)(?<![a-z])(patient|pat|mrn|dob|nhs|ssn|name|surname|geb)(?![a-z])")),
    ("person-name pattern", re.compile(r"[A-Z][a-z]{2,}[_ ,^][A-Z][a-z]{2,}|\^")),
)


class ManifestError(ValueError):
    """A manifest file that cannot be read; ``str()`` is one line ``path: reason``."""


@dataclass
class ScanResult:
    """What :func:`scan_site` found: rows in manifest order, one problem line per bad file."""

    site: str
    rows: pd.DataFrame                      # MANIFEST_COLUMNS, sorted by relpath
    problems: list[str] = field(default_factory=list)  # "relpath: reason"
    n_reused: int = 0                       # files taken from the stat cache, not re-read
    n_read: int = 0                         # files read in this scan
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # stat cache to persist


# ----------------------------------------------------------------------------------------------
# Per-file work (runs in worker processes: top-level, picklable arguments and results).

def perceptual_hashes(gray: np.ndarray) -> tuple[str, str]:
    """64-bit dHash and pHash as 16 hex digits each: re-exported or re-cropped copies of an
    image differ from it in few bits of both. The definitions of ``imagehash`` (dHash: signs
    of horizontal steps in a 9x8 thumbnail; pHash: 8x8 low-frequency DCT of a 32x32 thumbnail
    against its median), computed with OpenCV area resampling (10x faster than via PIL), on
    the image with its black background (a convex fan's corners) filled with the median
    tissue level: otherwise every fan of a site hashes alike."""
    black = gray <= BLACK_MAX
    n_black = int(np.count_nonzero(black))
    if 0.05 * gray.size < n_black < 0.98 * gray.size:
        hist = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel()
        hist[: BLACK_MAX + 1] = 0
        gray = gray.copy()
        gray[black] = int(np.searchsorted(np.cumsum(hist), hist.sum() / 2))
    small = cv2.resize(gray, (64, 64), interpolation=cv2.INTER_AREA)
    thumb = cv2.resize(small, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    dbits = (thumb[:, 1:] > thumb[:, :-1]).ravel()
    low = cv2.dct(cv2.resize(small, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32))[:8, :8]
    pbits = (low > np.median(low)).ravel()
    return (f"{int(np.packbits(dbits).view('>u8')[0]):016x}", f"{int(np.packbits(pbits).view('>u8')[0]):016x}")


def image_stats(gray: np.ndarray) -> dict[str, float]:
    """Intensity and texture summary of one uint8 gray image."""
    hist = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel()
    n = float(gray.size)
    mean, std = cv2.meanStdDev(gray)
    # Texture as in TGM: mean |Laplacian| (3x3); blur and blank frames score near zero.
    lap = cv2.Laplacian(gray, cv2.CV_16S, ksize=1)
    return {
        "mean": float(mean[0, 0]), "std": float(std[0, 0]),
        "frac_black": float(hist[: BLACK_MAX + 1].sum() / n),
        "frac_saturated": float(hist[SATURATED_MIN:].sum() / n),
        "sharpness": float(cv2.norm(lap, cv2.NORM_L1) / n),
    }


def caliper_marks(gray: np.ndarray) -> int:
    """Number of small "+" marks (measurement calipers) burnt into the image.

    A pixel is a mark centre when it and all four arms (2-3 px up, down, left, right) are
    brighter by ``CALIPER_CONTRAST`` than every off-axis neighbour around it: thin bright
    crosses, which tissue (lines, blobs, speckle) does not form. Calipers are a label leak
    (they mark lesions), so they are reported; they do not stop self-supervised training.
    """
    h, w = gray.shape
    f = np.pad(gray.astype(np.int16), 3, mode="edge")

    def at(dy: int, dx: int) -> np.ndarray:
        return f[3 + dy:3 + dy + h, 3 + dx:3 + dx + w]

    arm = lambda a, b: at(*a) + at(*b)  # noqa: E731  (sum of one arm's two pixels)
    arms = np.minimum(np.minimum(arm((0, -2), (0, -3)), arm((0, 2), (0, 3))),
                      np.minimum(arm((-2, 0), (-3, 0)), arm((2, 0), (3, 0)))) // 2
    around = at(-2, -2)
    for dy, dx in ((-2, 2), (2, -2), (2, 2), (-1, -2), (-1, 2), (1, -2), (1, 2), (-2, -1), (-2, 1), (2, -1), (2, 1)):
        around = np.maximum(around, at(dy, dx))
    resp = (np.minimum(arms, at(0, 0)) - around).astype(np.float32)
    peaks = (resp > CALIPER_CONTRAST) & (resp == cv2.dilate(resp, np.ones((9, 9), np.uint8)))
    return int(np.count_nonzero(peaks))


def _detect_probe(gray: np.ndarray) -> str | None:
    try:
        from ultrafed.ultramim.smat import detect_probe
    except ImportError:
        return None
    try:
        return detect_probe(gray)
    except ValueError:
        return None


def _read_image(path: str, detect: bool) -> dict[str, Any]:
    """Per-file statistics; the file is read once (bounded, never blocking) and hashed from
    those bytes, so a FIFO or device named like an image can not hang the scan."""
    try:
        data = read_file_bytes(path)
    except ImageReadError as e:
        return {"sha256": "", "readable": False, "error": e.reason}
    out: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest()}
    try:
        img = decode_image(data, path, allow_constant=True)  # blank frames are judged by the suite, not here
    except ImageReadError as e:
        out.update(readable=False, error=e.reason)
        return out
    g = img.gray
    out.update(readable=True, error="", width=int(g.shape[1]), height=int(g.shape[0]),
               bit_depth=img.bit_depth, channels=img.channels, caliper_marks=caliper_marks(g),
               **dict(zip(("dhash", "phash"), perceptual_hashes(g))), **image_stats(g))
    if img.notes:
        out["notes"] = list(img.notes)
    if detect:
        out["probe_detected"] = _detect_probe(g)
    return out


def _read_mask(path: str) -> dict[str, Any]:
    try:
        img = load_image(path, allow_constant=True)
    except ImageReadError as e:
        return {"mask_error": e.reason}
    m = img.gray
    return {"mask_width": int(m.shape[1]), "mask_height": int(m.shape[0]),
            "mask_fraction": float(np.count_nonzero(m) / m.size), "mask_error": ""}


def _scan_chunk(jobs: Sequence[tuple[str, str, bool]]) -> list[dict[str, Any]]:
    """``jobs``: (kind, path, detect) with kind 'image' or 'mask'."""
    return [_read_image(p, d) if kind == "image" else _read_mask(p) for kind, p, d in jobs]


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; nested OpenCV threads only contend


# ----------------------------------------------------------------------------------------------
# Site listing

@dataclass(frozen=True)
class _Entry:
    image: Path
    mask: Path | None
    split: str
    probe: str
    label: str


def relkey(path: Path, root: Path) -> str:
    """The manifest's ``relpath`` of ``path``: POSIX, relative to ``root``; bytes that are not
    UTF-8 (and control characters) are shown as ``\\xNN`` (so the CSV stays valid UTF-8 and
    every message one line). Training must match quarantined images by this key."""
    return relpath_key(path, root)


def name_flags(path: Path, root: Path) -> str:
    """Why the file name may carry a patient identifier ('' if it does not look like one)."""
    rel = Path(os.path.relpath(path, root)).as_posix()
    flags = [] if os.fsencode(rel).decode("utf-8", "replace") == rel else ["non-UTF-8 name"]
    flags += [what for what, pat in _NAME_PATTERNS if pat.search(rel)]
    return "; ".join(flags)


def _label(labels: Mapping[str, str]) -> str:
    for key in LABEL_KEYS:
        if key in labels:
            return labels[key] or ""
    return ""


def list_site(root: str | Path, site_id: str) -> tuple[list[_Entry], list[str]]:
    """Images of a site folder (via :mod:`ultrafed.data.sites`) and one problem line per file
    or labels.csv row that was left out. Paths in problems are relative to ``root``."""
    from ultrafed.data.sites import SiteError, load_site

    root = Path(root)
    problems: list[str] = []
    try:
        site = load_site(root, site_id)
    except SiteError as e:
        msg = str(e).replace(str(root), site_id)
        if (root / "labels.csv").is_file() and root.is_dir():
            # A broken labels.csv: list the files (none may train: split 'unknown') so nothing
            # disappears silently from the audit trail.
            problems.append(msg)
            files = [p for p in list_images(root) if root / "masks" not in p.parents]
            return [_Entry(p, None, "unknown", "unknown", "") for p in files], problems
        return [], [msg]
    problems.extend(site.problems)  # already relative to the site folder
    entries = [_Entry(r.image, r.mask, r.split, r.probe, _label(r.labels)) for r in site.records]
    return entries, problems


# ----------------------------------------------------------------------------------------------
# Scan

def _stat_key(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def stat_cache_path(manifest: str | Path) -> Path:
    """Where the incremental-scan cache of ``manifest`` lives (next to it, not versioned)."""
    m = Path(manifest)
    return m.with_name(m.name + ".stat.json")


def _load_cache(previous: str | Path | None, site_id: str) -> dict[str, Any]:
    if previous is None:
        return {}
    try:
        data = json.loads(stat_cache_path(previous).read_text())
    except (OSError, ValueError):
        return {}
    if data.get("version") != SCAN_VERSION or data.get("site") != site_id:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _run_jobs(jobs: list[tuple[str, str, bool]], workers: int, progress: bool) -> list[dict[str, Any]]:
    if workers <= 1 or len(jobs) < _PARALLEL_MIN:
        return _scan_chunk(jobs)
    size = max(8, min(64, math.ceil(len(jobs) / (workers * 6))))
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    # forkserver: safe from a multi-threaded parent (Prefect, MLflow), and with this module
    # preloaded in the server each worker starts in ~0.1 s instead of re-importing.
    if sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:
        ctx = multiprocessing.get_context("spawn")
    out: list[dict[str, Any]] = []
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx,
                                 initializer=_init_worker) as pool:
            results = pool.map(_scan_chunk, chunks)
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(chunks), desc="scan", unit="chunk", file=sys.stderr)
            for part in results:
                out.extend(part)
    except (BrokenProcessPool, OSError) as e:  # e.g. an unguarded __main__, no /dev/shm
        warnings.warn(f"scan: process pool unavailable ({e.__class__.__name__}); scanning in-process",
                      RuntimeWarning, stacklevel=2)
        return _scan_chunk(jobs)
    return out


def _dup_groups(dhashes: Sequence[int], phashes: Sequence[int]) -> np.ndarray:
    """Connected components (union-find via scipy) of the near-duplicate graph: an edge where
    both hash distances are small. Numbered in row order."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    d = np.asarray(dhashes, dtype=np.uint64)
    p = np.asarray(phashes, dtype=np.uint64)
    n = len(d)
    if n == 0:
        return np.zeros(0, np.int64)
    rows, cols = [], []
    step = max(1, 4_000_000 // n)  # bounded memory: a block of rows against all
    for i in range(0, n, step):
        near = ((np.bitwise_count(d[i:i + step, None] ^ d[None, :]) <= NEAR_DUP_BITS)
                & (np.bitwise_count(p[i:i + step, None] ^ p[None, :]) <= NEAR_DUP_PHASH_BITS))
        r, c = np.nonzero(near)
        rows.append(r + i)
        cols.append(c)
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    first: dict[int, int] = {}
    return np.array([first.setdefault(int(k), len(first)) for k in comp], np.int64)


def scan_site(root: str | Path, site_id: str, *, previous: str | Path | None = None,
              workers: int | None = None, progress: bool = False) -> ScanResult:
    """Scan the site folder ``root`` into manifest rows.

    ``previous``: an earlier manifest of this site; files whose size and mtime match its stat
    cache are not read again. Unreadable files become rows with ``readable=False`` and an
    ``error`` (plus a line in ``problems``): the quality gate decides, nothing is dropped here.
    """
    root = Path(root)
    entries, problems = list_site(root, site_id)
    return scan_entries(root, site_id, entries, problems, previous=previous, workers=workers,
                        progress=progress)


def scan_entries(root: Path, site_id: str, entries: Iterable[_Entry], problems: list[str] | None = None, *,
                 previous: str | Path | None = None, workers: int | None = None,
                 progress: bool = False) -> ScanResult:
    """Second half of :func:`scan_site`: read (or reuse) every listed file. Files may vanish
    between listing and reading; they become unreadable rows ("file not found")."""
    root = Path(root)
    entries = list(entries)
    problems = list(problems or [])
    old = _load_cache(previous, site_id)
    cache: dict[str, Any] = {}
    jobs: list[tuple[str, str, bool]] = []
    slots: list[tuple[str, str]] = []  # (relpath, kind) of each job
    results: dict[tuple[str, str], dict[str, Any]] = {}
    n_reused = 0
    for e in entries:
        detect = e.probe not in ("linear", "convex")
        for kind, path in (("image", e.image), ("mask", e.mask)):
            if path is None:
                continue
            rel = relkey(path, root)
            key = _stat_key(path)
            hit = old.get(rel)
            res = hit.get("result", {}) if isinstance(hit, dict) else {}
            needed = _IMAGE_FIELDS + (("probe_detected",) if detect else ()) if kind == "image" else ()
            stale = bool(res.get("readable")) and any(k not in res for k in needed)
            if key is not None and hit and hit.get("kind") == kind and hit.get("stat") == key and not stale:
                results[(rel, kind)] = hit["result"]
                cache[rel] = hit
                n_reused += kind == "image"
            else:
                jobs.append((kind, str(path), detect))
                slots.append((rel, kind))
    fresh = _run_jobs(jobs, workers or _default_workers(), progress)
    for (rel, kind), res, (_, p, _d) in zip(slots, fresh, jobs):
        results[(rel, kind)] = res
        key = _stat_key(Path(p))
        if key is not None:
            cache[rel] = {"kind": kind, "stat": key, "result": res}

    rows = []
    for e in entries:
        rel = relkey(e.image, root)
        img = results[(rel, "image")]
        row: dict[str, Any] = {c: None for c in MANIFEST_COLUMNS}
        row.update({k: v for k, v in img.items() if k in MANIFEST_COLUMNS})
        row.update(site=site_id, relpath=rel, split=e.split, label=e.label, name_flag=name_flags(e.image, root))
        key = _stat_key(e.image)
        row["size_bytes"] = key[0] if key else None
        if e.probe in ("linear", "convex"):
            row.update(probe=e.probe, probe_source="site")
        elif img.get("probe_detected"):
            row.update(probe=img["probe_detected"], probe_source="detected")
        else:
            row.update(probe="unknown", probe_source="none")
        if not img.get("readable"):
            problems.append(f"{rel}: {img.get('error')}")
        problems.extend(f"{rel}: {note}" for note in img.get("notes") or ())
        if e.mask is not None:
            mrel = relkey(e.mask, root)
            row["mask_relpath"] = mrel
            row.update(results[(mrel, "mask")])
            if row.get("mask_error"):
                problems.append(f"{mrel}: {row['mask_error']}")
        if row["name_flag"]:
            problems.append(f"{rel}: file name may carry an identifier ({row['name_flag']})")
        rows.append(row)

    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    df = df.sort_values("relpath", kind="stable").reset_index(drop=True)
    ok = df["readable"].eq(True).to_numpy()
    df["dup_group"] = pd.array([pd.NA] * len(df), dtype="Int64")
    df["dup_group_size"] = pd.array([0] * len(df), dtype="Int64")
    if ok.any():
        groups = _dup_groups([int(h, 16) for h in df.loc[ok, "dhash"]],
                             [int(h, 16) for h in df.loc[ok, "phash"]])
        sizes = np.bincount(groups)
        df.loc[ok, "dup_group"] = groups
        df.loc[ok, "dup_group_size"] = sizes[groups]
    df = _normalise(df)
    return ScanResult(site=site_id, rows=df, problems=problems, n_reused=n_reused, n_read=len(jobs),
                      cache=cache)


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Fixed dtypes and precision: what makes the CSV byte-reproducible."""
    df = df.copy()
    for c in _INT_COLUMNS:
        df[c] = pd.array(pd.to_numeric(df[c], errors="coerce").round(), dtype="Int64")
    for c, nd in _FLOAT_DECIMALS.items():
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64").round(nd)
    df["readable"] = df["readable"].eq(True).astype(bool)
    for c in _STR_COLUMNS:
        df[c] = df[c].astype("object").where(df[c].notna() & df[c].astype(str).ne(""), None)
    return df[list(MANIFEST_COLUMNS)]


# ----------------------------------------------------------------------------------------------
# Files

def manifest_md5(path: str | Path) -> str:
    """md5 of the file's bytes: what DVC records for it, i.e. the site's data version."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(out: Path, data: bytes) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def manifest_bytes(rows: pd.DataFrame) -> bytes:
    """The CSV text of ``rows`` exactly as :func:`write_manifest` stores it."""
    df = _normalise(rows)
    fmt = df.copy()
    for c, nd in _FLOAT_DECIMALS.items():
        fmt[c] = [("" if pd.isna(v) else f"{v:.{nd}f}") for v in df[c]]
    return fmt.to_csv(index=False, lineterminator="\n").encode("utf-8")


def write_manifest(result: ScanResult, out: str | Path) -> str:
    """Write the manifest CSV atomically (tmp + rename) and its stat cache; returns the file's
    md5 (the site's data version)."""
    out = Path(out)
    data = manifest_bytes(result.rows)
    _atomic_write(out, data)
    cache = {"version": SCAN_VERSION, "site": result.site, "files": result.cache}
    _atomic_write(stat_cache_path(out), json.dumps(cache, sort_keys=True).encode())
    return hashlib.md5(data).hexdigest()


def read_manifest(path: str | Path) -> pd.DataFrame:
    """A manifest as a DataFrame with the dtypes :func:`scan_site` produces (empty text -> None)."""
    p = Path(path)
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{p}: manifest not found") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as e:
        raise ManifestError(f"{p}: not a readable CSV ({e.__class__.__name__})") from None
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{p}: empty file (not even a header)") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{p}: not a manifest (missing columns: {', '.join(missing)})")
    df["readable"] = df["readable"].map({"True": True, "False": False})
    if df["readable"].isna().any():
        raise ManifestError(f"{p}: column 'readable' must be True/False")
    return _normalise(df)
