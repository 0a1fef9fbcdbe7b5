"""One reader for a "site folder": a hospital's images, masks, labels and splits.

Layout (that of ``../shared/data/<name>`` and of the synthetic cohort)::

    <root>/images/<id>.png      one image per id (any extension ultrafed.data.io reads)
    <root>/masks/<id>.png       optional lesion masks
    <root>/labels.csv           id, split, any other labels; optional probe, image, mask columns
    <root>/unlabeled/*.png      optional images with no labels (split "unlabeled")

Real folders are messy, so a broken row or file never stops the rest from loading: each is
recorded in ``Site.problems`` as one line ``relpath: reason`` (relative to the site folder, so
it may leave the site). Only a folder that cannot be read
as a site at all (missing, or labels.csv without an ``id`` column) raises :class:`SiteError`.
Pixels are not read here (that is ``ultrafed.data.io``'s job, at use time).
"""
from __future__ import annotations

import csv
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

from ultrafed.config import REPO_ROOT
from ultrafed.data.io import (
    IMAGE_EXTENSIONS, SUPPORTED_FORMATS, file_kind, has_control_chars, inside, is_image_name, printable, read_head,
    relpath_key, scan_folder, sniff, unsupported_reason,
)

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
    root: Path | None = field(default=None, compare=False, repr=False)  # the site folder

    @property
    def relpath(self) -> str:
        """The image's manifest ``relpath`` (io.relpath_key): the quarantine key and how every
        message names the file ('' without a root)."""
        return relpath_key(self.image, self.root) if self.root is not None else ""


@dataclass(frozen=True)
class Site:
    id: str
    root: Path
    records: tuple[SiteRecord, ...]
    problems: tuple[str, ...]  # one line "relpath: reason" each, relative to the site folder

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


def _index(folder: Path, root: Path, refused: dict[Path, str]) -> dict[str, Path]:
    """Relative path without extension -> file, for image files under ``folder``; entries the
    walk would not take (links out of ``root``, FIFOs, unreadable folders, ...) go to ``refused``."""
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    listing = scan_folder(folder, boundary=root)
    refused.update(listing.refused)
    out: dict[str, Path] = {}
    for p in listing.files:
        key = p.relative_to(folder).with_suffix("").as_posix()
        if key not in out or rank[p.suffix.lower()] < rank[out[key].suffix.lower()]:
            out[key] = p  # a.png and a.jpg: prefer the lossless one
    return out


def _read_labels(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) pairs of labels.csv; raises SiteError on an unreadable file."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise SiteError(f"{path}: is {file_kind(st.st_mode)}, not a regular file")
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


def _unusable(path: Path) -> str:
    """Why ``path`` cannot be an image ('' when it may be read: its content decides then)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "not found"
    except OSError as e:  # a link loop: reading it says so in the manifest
        return "" if is_image_name(path.name) else f"cannot read ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if not stat.S_ISREG(st.st_mode):
        return f"is {file_kind(st.st_mode)}, not a regular file"
    if is_image_name(path.name):
        return ""
    head = read_head(path)
    return "" if sniff(head) in SUPPORTED_FORMATS else "is " + unsupported_reason(head)


def _column_path(root: Path, value: str) -> tuple[Path | None, str]:
    """The file a labels.csv ``image``/``mask`` cell names, or why it is refused: it must stay
    inside the site folder (no absolute path, no ``..`` or link out of it)."""
    if has_control_chars(value):
        return None, "holds a control character; refused"
    if os.path.isabs(value):
        return None, "is an absolute path; only paths inside the site folder are read"
    path = root / value
    if not inside(path, root):
        return None, "resolves outside the site folder; refused"
    why = _unusable(path)
    return (None, why) if why else (path, "")


def _what_is_there(folder: Path, rid: str, refused: Mapping[Path, str]) -> tuple[Path, str] | None:
    """For an id with no readable image: the entry ``folder/<id>.*`` that is there instead and
    what it is (a DICOM file, a folder named x.png, a FIFO), or None when there is none."""
    parent, stem = (folder / rid).parent, Path(rid).name
    try:
        names = sorted(n for n in os.listdir(parent) if n.startswith(stem + "."))
    except OSError:
        return None
    for n in names:
        path = parent / n
        return path, refused.get(path) or _unusable(path) or "not read"
    return None


def _labelled_records(root: Path, sid: str, default_probe: str, images: dict[str, Path], masks: dict[str, Path],
                      refused: dict[Path, str], problems: list[str]) -> list[SiteRecord]:
    """Records of labels.csv rows (one problem line per row left out or half-usable)."""
    images_dir, masks_dir = root / "images", root / "masks"
    header, rows = _read_labels(root / "labels.csv")
    label_cols = [h for h in header if h not in _RESERVED and h]
    first_line: dict[str, int] = {}
    records: list[SiteRecord] = []
    for line, row in rows:
        where = f"labels.csv:{line}"
        rid = row.get("id", "")
        if not rid:
            problems.append(f"{where}: empty id")
            continue
        if rid in first_line:
            problems.append(f"{where}: duplicate id {rid!r} (first on line {first_line[rid]}); row ignored")
            continue
        first_line[rid] = line
        if row.get("image"):
            image, why = _column_path(root, row["image"])
            if image is None:
                problems.append(f"{where}: image {row['image']!r} for id {rid!r} {why}; row ignored")
                continue
        else:
            image = images.get(rid)
            if image is None:
                problems.append(f"{where}: {_missing(images_dir, rid, root, refused)}; row ignored")
                continue
        if row.get("mask"):
            mask, why = _column_path(root, row["mask"])
            if mask is None:
                problems.append(f"{where}: mask {row['mask']!r} for id {rid!r} {why}")
        else:
            mask = masks.get(rid)
            if mask is None and masks:
                problems.append(f"{where}: no mask for id {rid!r} in {masks_dir.name}/")
        records.append(SiteRecord(
            site=sid, id=rid, image=image, mask=mask, split=row.get("split") or "train",
            probe=_probe(row.get("probe", ""), default_probe, where, problems),
            labels=MappingProxyType({c: row.get(c, "") for c in label_cols}), root=root,
        ))
    listed = {os.path.realpath(r.image) for r in records}  # realpath: no RuntimeError on a symlink loop
    for key, p in sorted(images.items()):
        if os.path.realpath(p) not in listed and key not in first_line:
            problems.append(f"{relpath_key(p, root)}: image has no row in labels.csv; ignored")
    return records


def _missing(images_dir: Path, rid: str, root: Path, refused: dict[Path, str]) -> str:
    """'image for id ... not found' or, where something else has its name, what that is."""
    found = _what_is_there(images_dir, rid, refused)
    if found is None:
        return f"image for id {rid!r} not found ({images_dir.name}/{printable(rid)}.png)"
    path, why = found
    refused.pop(path, None)  # said here, once
    return f"image for id {rid!r} not usable ({relpath_key(path, root)}: {why})"


def load_site(root: str | Path, site_id: str | None = None) -> Site:
    """Read the site folder ``root``; ``site_id`` defaults to the folder's name.

    Without labels.csv every image under ``images/`` (or the root) is listed with split
    ``train``. Rows without a ``split`` value are ``train`` too. Nothing outside ``root`` is
    listed (links and labels.csv paths that leave it are refused); problems name files
    relative to ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise SiteError(f"{root}: site folder not found")
    sid = site_id or root.name
    default_probe = KNOWN_PROBES.get(root.name.lower(), "unknown")
    problems: list[str] = []
    refused: dict[Path, str] = {}
    images_dir, masks_dir = root / "images", root / "masks"
    labels_csv = root / "labels.csv"

    if images_dir.is_dir():
        images = _index(images_dir, root, refused)
    else:  # a flat folder: images directly under the root
        skip = {root / "masks", root / UNLABELED}
        images = {k: p for k, p in _index(root, root, refused).items() if not any(d in p.parents for d in skip)}
    masks = _index(masks_dir, root, refused) if masks_dir.is_dir() else {}

    if os.path.lexists(labels_csv):
        if not inside(labels_csv, root):
            raise SiteError(f"{labels_csv}: symbolic link that resolves outside the site folder; refused")
        records = _labelled_records(root, sid, default_probe, images, masks, refused, problems)
    else:
        records = [SiteRecord(site=sid, id=key, image=p, mask=masks.get(key), split="train", probe=default_probe,
                              labels=MappingProxyType({}), root=root)
                   for key, p in sorted(images.items())]

    unlabeled_dir = root / UNLABELED
    if unlabeled_dir.is_dir():
        for key, p in sorted(_index(unlabeled_dir, root, refused).items()):
            # prefixed: unlabeled images may reuse labelled ids (hc18 does)
            records.append(SiteRecord(site=sid, id=f"{UNLABELED}/{key}", image=p, mask=None, split=UNLABELED,
                                      probe=default_probe, labels=MappingProxyType({}), root=root))
    problems += [f"{relpath_key(p, root)}: {why}" for p, why in sorted(refused.items())]
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
