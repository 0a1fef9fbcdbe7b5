"""Per-site, per-round seeds derived from one base seed.

A hash (not ``base + round``) keeps streams of different sites and rounds independent, and
makes a resumed run draw exactly what an uninterrupted one would have drawn.
"""
from __future__ import annotations

import hashlib


def derive_seed(base: int, purpose: str, round_idx: int, site: str = "") -> int:
    """A 31-bit seed for (base, purpose, round, site); stable across processes and machines."""
    key = f"{base}|{purpose}|{round_idx}|{site}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF
