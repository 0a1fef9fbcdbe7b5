"""Whole-file helpers the library shares: why a read failed, in one line, and file digests.

Standard library only, so any module may import it without pulling in torch or MLflow.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def read_reason(error: OSError, *, missing: str = "file not found", directory: str = "is a directory") -> str:
    """The one-line reason an ``open``/``read_bytes`` failed, worded for the kind of file expected."""
    if isinstance(error, FileNotFoundError):
        return missing
    if isinstance(error, IsADirectoryError):
        return directory
    return f"cannot read ({error.strerror or error})"


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks (``md5`` is what DVC 3 records for a file)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()


def files_sha256(root: str | Path) -> dict[str, str]:
    """sha256 of every file under ``root`` keyed by its relative POSIX path, in path order."""
    base = Path(root)
    return {f.relative_to(base).as_posix(): file_digest(f) for f in sorted(p for p in base.rglob("*") if p.is_file())}
