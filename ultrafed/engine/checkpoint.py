"""Checkpoints that are either complete or absent.

A round's checkpoint is what a crashed coordinator resumes from, so a half-written file must
never look like a good one: we write to a temporary file in the same folder, fsync it and
``os.replace`` it over the target (atomic on POSIX), and return the file's sha256 (the single-site
Quick start records it in ``metrics.json``; :func:`load_checkpoint` checks it when given).
Loading never unpickles arbitrary objects (``weights_only=True``) and turns every failure into
one line, ``path: reason``.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ultrafed.files import read_reason

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive


class CheckpointError(RuntimeError):
    """A file that cannot serve as a checkpoint; ``str()`` is one line: ``path: reason``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> str:
    """Atomically write ``payload`` (tensors, numbers, strings, containers) to ``path``; returns sha256."""
    if not isinstance(payload, dict):
        raise TypeError(f"save_checkpoint: payload must be a dict, got {type(payload).__name__}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the file itself is synced
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(path: str | Path, *, sha256: str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on CPU) or raise :class:`CheckpointError`.

    ``sha256``, when given (e.g. from the lineage), must match the file's digest.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        reason = read_reason(e, missing="checkpoint not found", directory="is a directory, not a checkpoint file")
        raise CheckpointError(p, reason) from None
    if not data:
        raise CheckpointError(p, "empty file (zero bytes): an interrupted write?")
    if not data.startswith(_ZIP_MAGIC):
        raise CheckpointError(p, "not a checkpoint (no torch archive header)")
    actual = hashlib.sha256(data).hexdigest() if sha256 is not None else ""
    if sha256 is not None and actual != sha256.lower():
        raise CheckpointError(p, f"sha256 mismatch (expected {sha256[:12]}..., file is {actual[:12]}...)")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refuses code objects and foreign classes
        raise CheckpointError(p, "refused: holds objects other than tensors and plain data") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(p, f"truncated or corrupt checkpoint ({first[:160]})") from None
    except Exception as e:  # unpickling errors of every kind, incl. disallowed globals
        raise CheckpointError(p, f"unreadable checkpoint ({e.__class__.__name__})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(p, f"not an UltraFed checkpoint (payload is {type(payload).__name__}, expected dict)")
    return payload
