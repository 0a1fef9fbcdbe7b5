"""Helpers for the tracking tests: tiny real encoders, manifests, lineage records, a chain of rounds."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ultrafed.models.mae import ViTEncoder


def small_encoder(seed: int = 0, img_size: int = 32) -> ViTEncoder:
    """A real ViTEncoder at the smallest useful size (2x2 patches, one block)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTEncoder(img_size=img_size, patch_size=16, in_chans=1, embed_dim=32, depth=1, num_heads=2).eval()


def write_manifest(folder: Path, site: str, n: int) -> tuple[str, str]:
    """A small manifest file; returns (path, md5 of its bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{site}.json"
    p.write_text(json.dumps({"site": site, "images": [f"img{i}.png" for i in range(n)]}))
    return str(p), hashlib.md5(p.read_bytes()).hexdigest()


def round_lineage(tmp: Path, round_idx: int, parent: int | None, *, sites=(("a", 30), ("b", 10)),
                  gate: dict[str, str] | None = None, excluded: dict[str, str] | None = None) -> dict[str, Any]:
    """A lineage record like the round flow writes: volume weights, manifests on disk."""
    total = sum(n for _, n in sites)
    recs = []
    for site, n in sites:
        path, md5 = write_manifest(tmp / "manifests", site, n)
        recs.append({"site": site, "n_images": n, "manifest_md5": md5, "manifest_path": path,
                     "weight": n / total, "gate_status": (gate or {}).get(site, "passed"),
                     "gate_reasons": [], "metrics": {"train_loss": 0.9 - 0.1 * round_idx}})
    return {"round": round_idx, "parent_version": parent, "strategy": "fedavg", "strategy_params": {},
            "sites": recs, "excluded": excluded or {}, "seed": 0}


def register_chain(parent_run: str, tmp: Path, n: int = 3, *, name: str = "ultrafed-encoder",
                   val_losses=None, gate_by_round=None) -> list:
    """Register ``n`` rounds as versions 1..n, each round's parent the previous version."""
    from ultrafed.tracking.registry import register_encoder
    from ultrafed.tracking.runs import end_run, start_round_run

    out = []
    parent = None
    for r in range(n):
        rid = start_round_run(parent_run, r)
        lin = round_lineage(tmp, r, parent, gate=(gate_by_round or {}).get(r))
        loss = (val_losses or [0.9 - 0.1 * i for i in range(n)])[r]
        v = register_encoder(small_encoder(seed=r), name=name, run_id=rid, lineage=lin,
                             metrics={"global_val_loss": loss})
        end_run(rid)
        out.append(v)
        parent = v.version
    return out
