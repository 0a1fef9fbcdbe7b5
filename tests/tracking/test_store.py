"""Weights as run artifacts: round trip, checksums, damaged files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from ultrafed.tracking.runs import ensure_experiment
from ultrafed.tracking.store import StateIntegrityError, get_meta, get_state, put_state, state_sha256


@pytest.fixture
def run_id(store):
    return MlflowClient().create_run(ensure_experiment("store")).info.run_id


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3), "n": torch.tensor(7, dtype=torch.int64)}


def _local(uri: str, run_id: str) -> Path:
    art = MlflowClient().get_run(run_id).info.artifact_uri
    return Path(art[len("file://"):]) / uri.split(f"runs:/{run_id}/", 1)[1]


def test_round_trip_is_bit_exact_and_meta_holds_sha(run_id):
    s = _state()
    uri = put_state(s, run_id, "round-000/site-a", meta={"site": "a", "n_images": 12})
    assert uri == f"runs:/{run_id}/round-000/site-a/state.pt"
    back = get_state(uri)
    assert back.keys() == s.keys() and all(torch.equal(back[k], s[k]) for k in s)
    meta = get_meta(uri)
    assert meta["sha256"] == state_sha256(s) and meta["site"] == "a" and meta["n_elements"] == 12 + 3 + 1


def test_sha_depends_on_values_names_dtypes_not_insertion_order():
    s = _state()
    assert state_sha256(s) == state_sha256(dict(reversed(list(s.items()))))
    changed = {**s, "w": s["w"].clone()}
    changed["w"][2, 1] += 1e-6
    assert state_sha256(changed) != state_sha256(s)
    assert state_sha256({**s, "b": s["b"].double()}) != state_sha256(s)
    assert state_sha256({"x": s["w"]}) != state_sha256({"y": s["w"]})
    with pytest.raises(TypeError, match="state entry 'k' is int"):
        state_sha256({"k": 3})


def test_wrong_expected_sha_is_one_line_naming_uri(run_id):
    uri = put_state(_state(), run_id, "g")
    with pytest.raises(StateIntegrityError) as e:
        get_state(uri, expected_sha256=state_sha256(_state(seed=1)))
    assert str(e.value).startswith(f"{uri}: sha256 mismatch") and "\n" not in str(e.value)


def test_half_written_file_is_caught(run_id):
    uri = put_state(_state(), run_id, "g")
    f = _local(uri, run_id)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(StateIntegrityError, match=r"not a readable torch state") as e:
        get_state(uri)
    assert str(e.value).startswith(uri) and "\n" not in str(e.value)


def test_altered_values_are_caught_via_meta_sha(run_id):
    uri = put_state(_state(), run_id, "g")
    torch.save(_state(seed=3), _local(uri, run_id))  # a valid file, other weights
    with pytest.raises(StateIntegrityError, match="sha256 mismatch"):
        get_state(uri)


def test_missing_state_is_one_line(run_id):
    with pytest.raises(StateIntegrityError, match=r"runs:/.*/nothing/state.pt: meta.json unreadable"):
        get_state(f"runs:/{run_id}/nothing/state.pt")
