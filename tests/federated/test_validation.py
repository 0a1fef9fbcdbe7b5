"""Update screening: each bad case yields a one-line reason naming the problem."""
from __future__ import annotations

import math

import pytest
import torch

from ultrafed.federated import SiteUpdate, norm_outliers, screen_updates, validate_update

from ._states import A, B, C, F64, st, zeros


def one_line(reasons):
    assert reasons and all("\n" not in r for r in reasons)


def test_a_good_update_has_no_reasons():
    assert validate_update(A.state, zeros()) == []


@pytest.mark.parametrize("value, expected", [
    (math.nan, "'w' has non-finite values (1 NaN, 0 Inf)"),
    (math.inf, "'w' has non-finite values (0 NaN, 1 Inf)"),
    (-math.inf, "'w' has non-finite values (0 NaN, 1 Inf)"),
])
def test_non_finite_values_name_the_tensor(value, expected):
    bad = st([1.0, value], [0.0])
    assert validate_update(bad, zeros()) == [expected]


def test_missing_key():
    bad = {k: v for k, v in A.state.items() if k != "b"}
    assert validate_update(bad, zeros()) == ["missing key(s) 'b'"]


def test_extra_key():
    bad = {**A.state, "head.weight": torch.zeros(3)}
    assert validate_update(bad, zeros()) == ["unexpected key(s) 'head.weight'"]


def test_wrong_shape():
    bad = {**A.state, "w": torch.zeros(3, dtype=F64)}
    assert validate_update(bad, zeros()) == ["'w' has shape (3,), expected (2,)"]


def test_wrong_dtype():
    bad = {**A.state, "w": torch.zeros(2, dtype=torch.float16)}
    assert validate_update(bad, zeros()) == ["'w' has dtype torch.float16, expected torch.float64"]


def test_not_a_tensor_and_not_a_dict():
    assert validate_update({**A.state, "w": [1.0, 2.0]}, zeros()) == ["'w' is a list, not a tensor"]
    assert validate_update([1, 2], zeros()) == ["update is a list, not a state dict"]


def test_many_missing_keys_stay_on_one_line():
    ref = {f"k{i}": torch.zeros(1) for i in range(8)}
    reasons = validate_update({}, ref)
    one_line(reasons)
    assert reasons == ["missing key(s) 'k0', 'k1', 'k2', 'k3', 'k4', ... (8 in all)"]


def test_norm_outlier_against_the_median():
    # median of (1, 2, 50) is 2; bound 10 -> limit 20: only c is out
    out = norm_outliers({"a": 1.0, "b": 2.0, "c": 50.0}, bound=10.0)
    assert list(out) == ["c"]
    assert out["c"] == "update norm 50 exceeds 10 x median 2 (= 20)"
    assert norm_outliers({"a": 1.0, "b": 2.0, "c": 19.9}, bound=10.0) == {}


def test_two_sites_use_the_global_norm():
    # median of 2 values can never be exceeded 2x: the absolute rule (<= 1 x ||w_global||) applies
    out = norm_outliers({"a": 0.5, "b": 400.0}, bound=10.0, global_norm=20.0)
    assert list(out) == ["b"] and "global weights norm 20" in out["b"]
    with pytest.raises(ValueError, match="pass global_norm"):
        norm_outliers({"a": 0.5, "b": 400.0}, bound=10.0)
    assert norm_outliers({"a": 0.5, "b": 400.0}, bound=10.0, global_norm=0.0) == {}


def test_non_finite_norm_is_rejected():
    out = norm_outliers({"a": 1.0, "b": 1.0, "c": 1.0, "d": math.inf}, bound=10.0)
    assert list(out) == ["d"]


def test_screen_updates_splits_and_explains():
    # Prepare: global g; honest sites move by ~1; one NaN; one scaled by 1000; one wrong shape
    g = st([1.0, 1.0], [1.0])
    honest = [SiteUpdate(s, st([1.0 + d, 1.0], [1.0]), 5) for s, d in (("h1", 1.0), ("h2", 0.5), ("h3", 2.0))]
    nan = SiteUpdate("nan", st([math.nan, 1.0], [1.0]), 5)
    big = SiteUpdate("big", st([1001.0, 1.0], [1.0]), 5)
    shape = SiteUpdate("shape", {**g, "w": torch.zeros(3, dtype=F64)}, 5)
    empty = SiteUpdate("empty", st([1.5, 1.0], [1.0]), 0)
    # Execute
    accepted, rejected = screen_updates(g, honest + [nan, big, shape, empty], norm_bound=10.0)
    # Assert: the median of (1, 0.5, 2, 1000) is 1.5 -> limit 15
    assert [u.site for u in accepted] == ["h1", "h2", "h3"]
    assert set(rejected) == {"nan", "big", "shape", "empty"}
    assert "non-finite" in rejected["nan"] and "'w'" in rejected["nan"]
    assert rejected["big"].startswith("update norm 1000 exceeds 10 x median 1.5")
    assert "shape (3,)" in rejected["shape"]
    assert "n=0" in rejected["empty"]
    one_line(list(rejected.values()))


def test_screen_updates_with_two_sites():
    accepted, rejected = screen_updates(zeros(), [A, B], norm_bound=10.0)
    # ||zeros|| = 0: the absolute rule cannot judge, both structurally fine sites pass
    assert [u.site for u in accepted] == ["A", "B"] and rejected == {}
    g = st([3.0, 4.0], [0.0])  # ||g|| = 5
    near = SiteUpdate("near", st([3.0, 5.0], [0.0]), 1)  # norm 1
    far = SiteUpdate("far", st([30.0, 4.0], [0.0]), 1)   # norm 27 > 5
    accepted, rejected = screen_updates(g, [near, far], norm_bound=10.0)
    assert [u.site for u in accepted] == ["near"] and list(rejected) == ["far"]


def test_screen_updates_refuses_duplicate_sites():
    with pytest.raises(ValueError, match=r"more than one update for site\(s\) \['A'\]"):
        screen_updates(zeros(), [A, C, A], norm_bound=10.0)
