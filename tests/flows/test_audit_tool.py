"""The federation audit (tests/flows/_audit.py) finds what it looks for: it can fail."""
from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import numpy as np
import torch

import _audit


def _store(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    (store / "artifacts" / "run1" / "quality").mkdir(parents=True)
    (store / "artifacts" / "run1" / "pictures" / "sites").mkdir(parents=True)
    con = sqlite3.connect(store / "server.db")
    con.execute("CREATE TABLE params (key TEXT, value TEXT, blob BLOB)")
    con.execute("INSERT INTO params VALUES ('data.root', 'data/synth', NULL)")
    con.commit()
    con.close()
    return store


def test_a_clean_store_has_no_findings(tmp_path: Path):
    store = _store(tmp_path)
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 20
    (store / "artifacts" / "run1" / "pictures" / "sites" / "train_loss-round-000.png").write_bytes(png)  # a chart
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(192, 1, 16, 16)}, buf)
    (store / "artifacts" / "run1" / "state.pt").write_bytes(buf.getvalue())
    assert _audit.audit_store(store, ["/hospital/a"], {"s0_00001.png", "s0_00001"}, 96) == []


def test_each_kind_of_leak_is_found(tmp_path: Path):
    store = _store(tmp_path)
    con = sqlite3.connect(store / "server.db")
    con.execute("INSERT INTO params VALUES ('root', '/hospital/a/images', NULL)")
    con.execute("INSERT INTO params VALUES ('log', 'quarantined images/s0_00001.png', NULL)")
    con.commit()
    con.close()
    run = store / "artifacts" / "run1"
    (run / "quality" / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(4, 1, 96, 96)}, buf)
    (run / "batch.pt").write_bytes(buf.getvalue())
    np.save(run / "frame.npy", np.zeros((64, 64), np.uint8))
    found = "\n".join(_audit.audit_store(store, ["/hospital/a"], {"s0_00001.png", "s0_00001"}, 96))
    assert "site path /hospital/a" in found and "site file name s0_00001.png" in found
    assert "quality/grid.png: PNG image" in found
    assert "batch.pt: image-like array" in found and "frame.npy: image-like array" in found
