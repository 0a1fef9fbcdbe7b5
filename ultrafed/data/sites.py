"""One reader for a "site folder": a hospital's images, masks, labels and splits.

Layout (that of ``../shared/data/<name>`` and of the synthetic cohort)::

    <root>/images/<id>.png      one image per id (any extension ultrafed.data.io reads)
    <root>/masks/<id>.png       optional lesion masks
    <root>/labels.csv           id, split, any other labels; optional probe, image, mask columns
    <root>/unlabeled/*.png      optional images with no labels (split "unlabeled")

Real folders are messy, so a broken row or file never stops the rest from loading: each is
recorded in ``Site.problems`` as one line ``path: reason``. Only a folder that cannot be read
as a site at all (missing, or labels.csv without an ``id`` column) raises :class:`SiteError`.
Pixels are not read here (that is ``ultrafed.data.io``'s job, at use time).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

from ultrafed.config import REPO_ROOT
from ultrafed.data.io import IMAGE_EXTENSIONS, list_images

PROBES: tuple[str, ...] = ("linear", "convex", "unknown")
KNOWN_PROBES: dict[str, str] = {"busi": "linear", "ddti": "linear", "hc18": "convex"}  # dataset defaults
UNLABELED = "unlabeled"
_RESERVED = ("id", "split", "probe", "image", "mask")  # labels.csv columns that are not labels


class SiteError(ValueError):
    """A folder that cannot be read as a site; ``str()`` is one line ``path: reason``."""


@dataclass(frozen=True)
class SiteRecord:
    site: str
    id: str
    image: Path
    mask: Path | None
    split: str        # train | val | test | unlabeled (or whatever labels.csv says)
    probe: str        # one of PROBES
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)  # other labels.csv columns


@dataclass(frozen=True)
class Site:
    id: str
    root: Path
    records: tuple[SiteRecord, ...]
    problems: tuple[str, ...]  # one line "path: reason" each

    def select(self, splits: Iterable[str] | str) -> list[SiteRecord]:
        """Records whose split is in ``splits`` (a single name is accepted too)."""
        wanted = {splits} if isinstance(splits, str) else set(splits)
        return [r for r in self.records if r.split in wanted]

    def splits(self) -> dict[str, int]:
        """Split name -> number of records."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r.split] = out.get(r.split, 0) + 1
        return out


def _index(folder: Path) -> dict[str, Path]:
    """Relative path without extension -> file, for image files under ``folder``."""
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    out: dict[str, Path] = {}
    for p in list_images(folder):
        key = p.relative_to(folder).with_suffix("").as_posix()
        if key not in out or rank[p.suffix.lower()] < rank[out[key].suffix.lower()]:
            out[key] = p  # a.png and a.jpg: prefer the lossless one
    return out


def _read_labels(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) pairs of labels.csv; raises SiteError on an unreadable file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if "id" not in header:
                raise SiteError(f"{path}: no 'id' column (columns: {', '.join(header) or 'none'})")
            reader.fieldnames = header
            rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None})
                    for row in reader]
    except UnicodeDecodeError:
        raise SiteError(f"{path}: not UTF-8 text") from None
    except csv.Error as e:
        raise SiteError(f"{path}: not valid CSV ({e})") from None
    except OSError as e:
        raise SiteError(f"{path}: cannot read ({e.strerror or e})") from None
    return header, rows


def _probe(value: str, default: str, where: str, problems: list[str]) -> str:
    if not value:
        return default
    if value.lower() in PROBES:
        return value.lower()
    problems.append(f"{where}: unknown probe {value!r} (expected {', '.join(PROBES)}); using 'unknown'")
    return "unknown"


def load_site(root: str | Path, site_id: str | None = None) -> Site:
    """Read the site folder ``root``; ``site_id`` defaults to the folder's name.

    Without labels.csv every image under ``images/`` (or the root) is listed with split
    ``train``. Rows without a ``split`` value are ``train`` too.
    """
    root = Path(root)
    if not root.is_dir():
        raise SiteError(f"{root}: site folder not found")
    sid = site_id or root.name
    default_probe = KNOWN_PROBES.get(root.name.lower(), "unknown")
    problems: list[str] = []
    records: list[SiteRecord] = []
    images_dir, masks_dir = root / "images", root / "masks"
    labels_csv = root / "labels.csv"

    if images_dir.is_dir():
        images = _index(images_dir)
    else:  # a flat folder: images directly under the root
        skip = {root / "masks", root / UNLABELED}
        images = {k: p for k, p in _index(root).items() if not any(d in p.parents for d in skip)}
    masks = _index(masks_dir) if masks_dir.is_dir() else {}

    if labels_csv.is_file():
        header, rows = _read_labels(labels_csv)
        label_cols = [h for h in header if h not in _RESERVED and h]
        first_line: dict[str, int] = {}
        for line, row in rows:
            where = f"{labels_csv}:{line}"
            rid = row.get("id", "")
            if not rid:
                problems.append(f"{where}: empty id")
                continue
            if rid in first_line:
                problems.append(f"{where}: duplicate id {rid!r} (first on line {first_line[rid]}); row ignored")
                continue
            first_line[rid] = line
            if row.get("image"):
                image: Path | None = root / row["image"]
                image = image if image.is_file() else None
            else:
                image = images.get(rid)
            if image is None:
                shown = row.get("image") or f"{images_dir.name}/{rid}.png"
                problems.append(f"{where}: image for id {rid!r} not found ({shown}); row ignored")
                continue
            if row.get("mask"):
                mask: Path | None = root / row["mask"]
                if not mask.is_file():
                    problems.append(f"{where}: mask {row['mask']!r} for id {rid!r} not found")
                    mask = None
            else:
                mask = masks.get(rid)
                if mask is None and masks:
                    problems.append(f"{where}: no mask for id {rid!r} in {masks_dir}")
            records.append(SiteRecord(
                site=sid, id=rid, image=image, mask=mask, split=row.get("split") or "train",
                probe=_probe(row.get("probe", ""), default_probe, where, problems),
                labels=MappingProxyType({c: row.get(c, "") for c in label_cols}),
            ))
        listed = {os.path.realpath(r.image) for r in records}  # realpath: no RuntimeError on a symlink loop
        for key, p in sorted(images.items()):
            if os.path.realpath(p) not in listed and key not in first_line:
                problems.append(f"{p}: image has no row in labels.csv; ignored")
    else:
        for key, p in sorted(images.items()):
            records.append(SiteRecord(site=sid, id=key, image=p, mask=masks.get(key), split="train",
                                      probe=default_probe, labels=MappingProxyType({})))

    unlabeled_dir = root / UNLABELED
    if unlabeled_dir.is_dir():
        for key, p in sorted(_index(unlabeled_dir).items()):
            # prefixed: unlabeled images may reuse labelled ids (hc18 does)
            records.append(SiteRecord(site=sid, id=f"{UNLABELED}/{key}", image=p, mask=None, split=UNLABELED,
                                      probe=default_probe, labels=MappingProxyType({})))
    return Site(id=sid, root=root, records=tuple(records), problems=tuple(problems))


def find_shared_data(path: str | Path | None = None) -> Path | None:
    """The real-data folder: ``path`` if given, else $ULTRAFED_SHARED_DATA, else
    ``<repo>/../shared/data``; None when it is absent (callers skip with a message)."""
    if path is not None:
        candidates = [Path(path)]
    elif os.environ.get("ULTRAFED_SHARED_DATA"):
        candidates = [Path(os.environ["ULTRAFED_SHARED_DATA"])]
    else:
        candidates = [REPO_ROOT.parent / "shared" / "data"]
    for cand in candidates:
        if shared_sites(cand):
            return cand
    return None


def shared_sites(root: Path) -> dict[str, Path]:
    """``{"busi": ..., "ddti": ..., "hc18": ...}``: those of the known data sets present under ``root``."""
    root = Path(root)
    return {name: root / name for name in KNOWN_PROBES if (root / name / "labels.csv").is_file()}
