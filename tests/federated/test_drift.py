"""Drift and traffic metrics against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from ultrafed.federated import (SiteUpdate, cosine_to_mean, decode_state, encode_state, encoded_nbytes,
                                site_drift, spread, state_nbytes, update_norm)


def st(w):
    return {"w": torch.tensor(w, dtype=torch.float32), "steps": torch.tensor(1, dtype=torch.int64)}


G = st([0.0, 0.0])


def test_update_norm_ignores_integer_buffers():
    assert update_norm(st([3.0, 4.0]), G) == pytest.approx(5.0)


def test_cosine_to_mean_orthogonal_sites():
    # deltas [1,0] and [0,1], uniform mean [0.5,0.5]: cos = 0.5 / (1 * sqrt(0.5)) = 1/sqrt(2)
    a, b = SiteUpdate("a", st([1.0, 0.0]), 1), SiteUpdate("b", st([0.0, 1.0]), 1)
    assert cosine_to_mean(G, [a, b]) == pytest.approx({"a": 1 / math.sqrt(2), "b": 1 / math.sqrt(2)})


def test_cosine_to_mean_weighted_and_opposed():
    # deltas [1,0] (n=3) and [-1,0] (n=1): weighted mean [0.5,0] -> a: +1, b: -1; zero delta -> 0
    a, b = SiteUpdate("a", st([1.0, 0.0]), 3), SiteUpdate("b", st([-1.0, 0.0]), 1)
    z = SiteUpdate("z", st([0.0, 0.0]), 1)
    assert cosine_to_mean(G, [a, b, z]) == pytest.approx({"a": 1.0, "b": -1.0, "z": 0.0})
    # uniform: mean [0,0] has no direction -> every cosine 0
    assert cosine_to_mean(G, [a, b], weighted=False) == {"a": 0.0, "b": 0.0}


def test_site_drift_and_bytes():
    a = SiteUpdate("a", st([3.0, 4.0]), 1)
    d = site_drift(G, [a], transfer_dtype="bfloat16")["a"]
    assert d.update_norm == pytest.approx(5.0) and d.cosine_to_mean == pytest.approx(1.0)
    assert d.bytes_sent == 2 * 2 + 8  # two bf16 values + one int64 buffer
    assert site_drift(G, [a])["a"].bytes_sent == 2 * 4 + 8


def test_spread():
    s = spread({"a": 1.0, "b": 3.0, "c": 2.0})
    assert s["max_min"] == pytest.approx(2.0)
    assert s["std"] == pytest.approx(math.sqrt(2 / 3))  # population std of (1, 2, 3)
    assert all(math.isnan(v) for v in spread({}).values())


def test_bf16_transfer_halves_bytes_and_round_trips():
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64, 32, generator=g), "steps": torch.tensor(7)}
    enc = encode_state(state, "bfloat16")
    assert enc["w"].dtype == torch.bfloat16 and enc["steps"].dtype == torch.int64
    assert state_nbytes(enc) == encoded_nbytes(state, "bfloat16") == 64 * 32 * 2 + 8
    dec = decode_state(enc)
    assert dec["w"].dtype == torch.float32 and int(dec["steps"]) == 7
    rel = ((dec["w"] - state["w"]).abs() / state["w"].abs()).max()
    assert float(rel) <= 2 ** -8  # bf16 keeps 8 significant bits (round to nearest)


def test_delta_encoding_keeps_small_updates_that_weight_encoding_loses():
    # weights ~0.02, one round moves them by ~1e-4: bf16 of the weights (step 2^-8 relative, ~8e-5)
    # destroys the update, bf16 of the delta keeps it to 2^-8 of its size
    g = torch.Generator().manual_seed(1)
    ref = {"w": 0.02 * torch.randn(4096, generator=g)}
    upd = {"w": ref["w"] + 1e-4 * torch.randn(4096, generator=g)}
    true_delta = upd["w"] - ref["w"]
    plain = decode_state(encode_state(upd, "bfloat16"))
    delta = decode_state(encode_state(upd, "bfloat16", reference=ref), reference=ref)
    err_plain = float((plain["w"] - upd["w"]).norm() / true_delta.norm())
    err_delta = float((delta["w"] - upd["w"]).norm() / true_delta.norm())
    assert err_delta < 0.01 < 0.1 < err_plain


def test_transfer_bad_input_one_line():
    with pytest.raises(ValueError, match="transfer dtype 'float8' not supported"):
        encode_state(st([1.0, 2.0]), "float8")
    with pytest.raises(ValueError, match="reference state lacks 1 key"):
        encode_state(st([1.0, 2.0]), "bfloat16", reference={"steps": torch.tensor(1)})
    with pytest.raises(ValueError, match="not a float dtype"):
        decode_state(st([1.0, 2.0]), "int8")
