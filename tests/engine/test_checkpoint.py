"""Checkpoints: atomic writes with a sha256, and one-line errors for every broken file."""
from __future__ import annotations

import hashlib

import pytest
import torch

from ultrafed.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def payload() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3)},
            "optimizer": {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "round": 3, "metrics": {"loss": 0.5}, "site": "site-0", "betas": (0.9, 0.95)}


def assert_one_line(err: CheckpointError, path, words: str) -> None:
    msg = str(err)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    assert words in msg


def test_round_trip_and_sha256(tmp_path):
    p = tmp_path / "sub" / "ckpt.pt"
    sha = save_checkpoint(p, payload())
    assert sha == hashlib.sha256(p.read_bytes()).hexdigest()
    got = load_checkpoint(p, sha256=sha)
    assert torch.equal(got["model"]["w"], payload()["model"]["w"])
    assert got["round"] == 3 and got["metrics"] == {"loss": 0.5} and tuple(got["betas"]) == (0.9, 0.95)
    assert got["optimizer"]["state"][0]["step"].item() == 2.0
    assert sorted(x.name for x in p.parent.iterdir()) == ["ckpt.pt"]  # no temporary file left behind


def test_failed_write_keeps_previous_file(tmp_path):
    p = tmp_path / "ckpt.pt"
    save_checkpoint(p, payload())
    before = p.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(p, {"bad": lambda x: x})  # cannot be serialised
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["ckpt.pt"]


def test_missing(tmp_path):
    p = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert_one_line(e.value, p, "not found")


def test_truncated(tmp_path):
    p = tmp_path / "ckpt.pt"
    save_checkpoint(p, payload())
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # half-written
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert_one_line(e.value, p, "truncated or corrupt")


def test_garbage(tmp_path):
    p = tmp_path / "ckpt.pt"
    p.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert_one_line(e.value, p, "not a checkpoint")


def test_zero_bytes(tmp_path):
    p = tmp_path / "ckpt.pt"
    p.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert_one_line(e.value, p, "zero bytes")


def test_directory(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    assert_one_line(e.value, tmp_path, "directory")


def test_sha256_mismatch(tmp_path):
    p = tmp_path / "ckpt.pt"
    save_checkpoint(p, payload())
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, sha256="0" * 64)
    assert_one_line(e.value, p, "sha256 mismatch")


def test_torch_file_that_is_not_a_dict(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert_one_line(e.value, p, "payload is list")


class Arbitrary:  # an object a checkpoint must never unpickle (code execution risk)
    pass


def test_arbitrary_objects_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"x": Arbitrary()}, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert_one_line(e.value, p, "refused")


def test_save_rejects_non_dict(tmp_path):
    with pytest.raises(TypeError, match="dict"):
        save_checkpoint(tmp_path / "x.pt", [1, 2])
