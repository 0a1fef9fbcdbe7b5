"""Read everything a coordinator's server stored and say what came from a site's data.

A store is a folder a server writes (MLflow: its sqlite file and artifacts; Prefect: its
home with the sqlite database). Every file under it is read: sqlite databases cell by cell
(text, JSON, bytes), other files whole. A finding is one line naming the file, the table or
artifact and what was found: a site path, a site file name, an image file, an image-like array.
"""
from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP",
               b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
# charts the coordinator draws itself from numbers it holds (loss curves, per-site bars)
COORDINATOR_CHARTS = ("pictures/loss_curves.png", "pictures/sites/")


def site_file_names(roots: Iterable[Path]) -> set[str]:
    """Names (with and without extension) of every image and mask file of the sites."""
    out: set[str] = set()
    for root in roots:
        for p in Path(root).rglob("*"):
            if p.is_file() and p.parent.name in ("images", "masks"):
                out |= {p.name, p.stem}
    return out


def _image_kind(blob: bytes) -> str | None:
    if blob[128:132] == b"DICM":
        return "DICOM"
    return next((kind for magic, kind in IMAGE_MAGIC.items() if blob.startswith(magic)), None)


def _arrays(blob: bytes) -> Iterator[tuple[str, np.ndarray]]:
    """Arrays inside a torch / numpy file (nothing for other files)."""
    import torch

    if blob.startswith(b"\x93NUMPY"):
        yield "npy", np.load(io.BytesIO(blob), allow_pickle=False)
        return
    if not blob.startswith(b"PK"):
        return
    try:
        obj = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - a zip that is not a torch file
        return
    stack = [("", obj)]
    while stack:
        key, o = stack.pop()
        if isinstance(o, torch.Tensor):
            yield key, o.detach().float().numpy() if o.dtype == torch.bfloat16 else o.detach().numpy()
        elif isinstance(o, dict):
            stack += [(f"{key}.{k}", v) for k, v in o.items()]
        elif isinstance(o, (list, tuple)):
            stack += [(f"{key}[{i}]", v) for i, v in enumerate(o)]


def _image_like(a: np.ndarray, img_size: int) -> bool:
    """A uint8 / bool picture, or any array whose last two axes have the sites' image size."""
    if a.ndim < 2:
        return False
    return a.dtype in (np.uint8, np.bool_) and min(a.shape[-2:]) >= 16 or a.shape[-2:] == (img_size, img_size)


def _text_findings(where: str, text: str, site_dirs: Sequence[str], names: set[str]) -> list[str]:
    out = [f"{where}: site path {d}" for d in site_dirs if d in text]
    tokens = set(text.replace("\\", "/").replace("/", " ").replace('"', " ").replace("'", " ").replace(",", " ").split())
    out += [f"{where}: site file name {n}" for n in sorted(names & tokens)]
    return out


def _blob_findings(where: str, artifact: str, blob: bytes, site_dirs: Sequence[str], names: set[str],
                   img_size: int) -> list[str]:
    kind = _image_kind(blob)
    if kind and not any(c in artifact for c in COORDINATOR_CHARTS):
        return [f"{where}: {kind} image"]
    out = [f"{where}: image-like array {k} {a.dtype} {a.shape}" for k, a in _arrays(blob) if _image_like(a, img_size)]
    return out + _text_findings(where, blob.decode("utf-8", "replace"), site_dirs, names)


def _sqlite_findings(path: Path, site_dirs: Sequence[str], names: set[str], img_size: int) -> list[str]:
    out: list[str] = []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for t in tables:
            for i, row in enumerate(con.execute(f'SELECT * FROM "{t}"')):
                for j, cell in enumerate(row):
                    where = f"{path.name}:{t}[{i}][{j}]"
                    if isinstance(cell, bytes):
                        out += _blob_findings(where, "", cell, site_dirs, names, img_size)
                    elif isinstance(cell, str):
                        out += _text_findings(where, cell, site_dirs, names)
    finally:
        con.close()
    return out


def audit_store(store: Path, site_dirs: Sequence[str], names: set[str], img_size: int) -> list[str]:
    """Every finding in every file under ``store`` (one line each)."""
    out: list[str] = []
    for p in sorted(Path(store).rglob("*")):
        if not p.is_file() or p.suffix in (".log", ".pid") or p.name.endswith(("-wal", "-shm", "-journal")):
            continue  # the servers' own process logs and sqlite side files (their content is in the db)
        blob = p.read_bytes()
        if blob.startswith(b"SQLite format 3\x00"):
            out += _sqlite_findings(p, site_dirs, names, img_size)
        else:
            rel = str(p.relative_to(store))
            out += _blob_findings(rel, rel, blob, site_dirs, names, img_size)
    return out


def quarantine_seen(mlflow_store: Path, *, site: str, check: str) -> bool:
    """Whether a site's check answer at the coordinator counts images quarantined by ``check``."""
    for p in Path(mlflow_store).rglob("check.json"):
        answer = json.loads(p.read_text())
        if answer.get("site") == site and answer.get("quarantine_by_check", {}).get(check, 0) >= 1:
            return True
    return False
