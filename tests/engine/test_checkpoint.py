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


def _saved(tmp_path):
    p = tmp_path / "ckpt.pt"
    save_checkpoint(p, payload())
    return p


def _halved(tmp_path):  # half-written
    p = _saved(tmp_path)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p


def _written(name: str, data: bytes):
    def make(tmp_path):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name
    return make


def _torch_list(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    return tmp_path / "list.pt"


class Arbitrary:  # an object a checkpoint must never unpickle (code execution risk)
    pass


def _arbitrary(tmp_path):
    torch.save({"x": Arbitrary()}, tmp_path / "evil.pt")
    return tmp_path / "evil.pt"


@pytest.mark.parametrize("make, sha256, words", [
    (lambda tmp: tmp / "nope.pt", None, "not found"),
    (_halved, None, "truncated or corrupt"),
    (_written("ckpt.pt", b"this is not a checkpoint\n" * 10), None, "not a checkpoint"),
    (_written("ckpt.pt", b""), None, "zero bytes"),
    (lambda tmp: tmp, None, "directory"),
    (_saved, "0" * 64, "sha256 mismatch"),
    (_torch_list, None, "payload is list"),
    (_arbitrary, None, "refused"),
], ids=["missing", "truncated", "garbage", "zero-bytes", "directory", "sha256-mismatch", "not-a-dict", "arbitrary-objects"])
def test_broken_checkpoint_is_one_line(tmp_path, make, sha256, words):
    p = make(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, sha256=sha256)
    assert_one_line(e.value, p, words)


def test_save_rejects_non_dict(tmp_path):
    with pytest.raises(TypeError, match="dict"):
        save_checkpoint(tmp_path / "x.pt", [1, 2])
