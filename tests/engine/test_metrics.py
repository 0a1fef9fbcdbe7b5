"""Metrics against hand-computed cases (AUROC by pair counting, Dice by pixel counting, HD95 by geometry)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ultrafed.engine.metrics import (
    bootstrap_ci,
    classification_metrics,
    dice,
    hd95,
    macro_auroc,
    per_image_dice,
    segmentation_metrics,
)


def square(size: int = 64, top: int = 20, left: int = 20, side: int = 20) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[top:top + side, left:left + side] = True
    return m


# -- AUROC ---------------------------------------------------------------------------------------

def test_binary_auroc_perfect_inverse_and_pair_count():
    y = np.array([0, 0, 1, 1])
    perfect = np.array([0.1, 0.2, 0.8, 0.9])
    assert macro_auroc(y, np.stack([1 - perfect, perfect], 1)) == 1.0
    assert macro_auroc(y, np.stack([perfect, 1 - perfect], 1)) == 0.0
    # positives 0.4, 0.9 vs negatives 0.1, 0.6: 3 of 4 pairs ordered correctly
    s = np.array([0.1, 0.6, 0.4, 0.9])
    assert macro_auroc(y, s) == pytest.approx(0.75)  # 1-D scores = positive-class column


def test_multiclass_auroc_perfect_and_inverse():
    y = np.array([0, 0, 1, 1, 2, 2])
    right = np.full((6, 3), 0.1)
    right[np.arange(6), y] = 0.8
    assert macro_auroc(y, right) == 1.0
    wrong = np.full((6, 3), 0.45)
    wrong[np.arange(6), y] = 0.1  # every class scores lowest on its own cases
    assert macro_auroc(y, wrong) == 0.0


def test_multiclass_auroc_with_absent_class_averages_present_ones():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1]])
    # class 0 scores: pos 0.6, 0.2 vs neg 0.3, 0.5 -> pairs (0.6>0.3, 0.6>0.5, 0.2<0.3, 0.2<0.5) = 2/4
    # class 1 scores: pos 0.6, 0.4 vs neg 0.3, 0.5 -> (0.6>0.3, 0.6>0.5, 0.4>0.3, 0.4<0.5) = 3/4
    assert macro_auroc(y, p) == pytest.approx((0.5 + 0.75) / 2)


def test_multiclass_auroc_agrees_with_sklearn_ovr_macro():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert macro_auroc(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_auroc_single_class_is_nan():
    assert math.isnan(macro_auroc(np.array([1, 1, 1]), np.array([0.2, 0.5, 0.9])))


def test_classification_metrics_hand_case():
    y = np.array([0, 1, 2, 2])
    p = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.6, 0.3], [0.1, 0.2, 0.7]])
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(0.75)
    # F1: class 0 = 1, class 1 (P 1/2, R 1) = 2/3, class 2 (P 1, R 1/2) = 2/3
    assert m["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert 0.0 <= m["auroc"] <= 1.0


@pytest.mark.parametrize("y, p, match", [
    (np.array([0, 1]), np.zeros((3, 2)), "2 cases"),
    (np.array([0, 3]), np.full((2, 3), 1 / 3), r"labels must lie in \[0, 3\)"),
    (np.array([0, 1]), np.zeros((2, 1)), "C >= 2"),
])
def test_classification_bad_input_is_one_clear_error(y, p, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, p)


# -- Dice ----------------------------------------------------------------------------------------

def test_dice_empty_masks_both_ways():
    empty, lesion = np.zeros((8, 8), bool), square(8, 2, 2, 3)
    assert dice(empty, empty) == 1.0
    assert dice(empty, empty, empty_value=0.0) == 0.0
    assert dice(empty, lesion) == 0.0   # missed lesion
    assert dice(lesion, empty) == 0.0   # lesion hallucinated on a normal image


def test_dice_hand_counted_overlap():
    a = np.zeros((6, 6), bool); a[1:3, 1:3] = True   # 4 px
    b = np.zeros((6, 6), bool); b[1:3, 1:4] = True   # 6 px, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / (4 + 6))
    assert dice(a, a) == 1.0


def test_dice_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not match"):
        dice(np.zeros((4, 4)), np.zeros((4, 5)))


# -- HD95 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 7])
def test_hd95_of_square_shifted_by_k_is_k(k):
    a = square()
    assert hd95(a, square(left=20 + k)) == pytest.approx(k)
    assert hd95(square(top=20 + k), a) == pytest.approx(k)


def test_hd95_identical_is_zero_and_spacing_scales():
    a = square()
    assert hd95(a, a) == 0.0
    assert hd95(a, square(left=24), spacing=0.5) == pytest.approx(2.0)


def test_hd95_nan_when_either_empty():
    empty = np.zeros((64, 64), bool)
    assert math.isnan(hd95(empty, square()))
    assert math.isnan(hd95(square(), empty))
    assert math.isnan(hd95(empty, empty))


def test_segmentation_metrics_with_and_without_empty_ground_truth():
    empty, les = np.zeros((64, 64), bool), square()
    preds, gts = [empty, les, empty], [empty, les, les]
    m = segmentation_metrics(preds, gts)
    # dice 1 (empty-empty), 1, 0 ; hd95 only defined on the middle case (0)
    assert m == {"dice": pytest.approx(2 / 3), "hd95": 0.0, "n": 3, "n_hd95": 1}
    m = segmentation_metrics(preds, gts, include_empty=False)
    assert m["dice"] == pytest.approx(0.5) and m["n"] == 2
    assert per_image_dice(preds, gts).tolist() == [1.0, 1.0, 0.0]


# -- bootstrap -------------------------------------------------------------------------------------

def test_bootstrap_contains_point_and_narrows_with_more_cases():
    few = np.array([0.0, 1.0] * 10)
    many = np.array([0.0, 1.0] * 200)
    p1, lo1, hi1 = bootstrap_ci(np.mean, few, n_boot=500, seed=1)
    p2, lo2, hi2 = bootstrap_ci(np.mean, many, n_boot=500, seed=1)
    assert p1 == p2 == 0.5
    assert lo1 <= p1 <= hi1 and lo2 <= p2 <= hi2
    # standard error of a mean of 0/1 cases: 0.5/sqrt(n); the interval follows it
    assert (hi2 - lo2) < 0.5 * (hi1 - lo1)
    assert (hi2 - lo2) == pytest.approx(2 * 1.96 * 0.5 / math.sqrt(400), rel=0.25)


def test_bootstrap_is_seeded_and_resamples_cases_jointly():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 15)
    s = y + rng.normal(0, 0.8, 30)
    a = bootstrap_ci(macro_auroc, y, s, n_boot=200, seed=3)
    assert a == bootstrap_ci(macro_auroc, y, s, n_boot=200, seed=3)
    assert a[1] <= a[0] <= a[2] and a[2] <= 1.0
    # masks of different sizes go through as lists
    masks = [square(32, 4, 4, 8), square(48, 4, 4, 8), np.zeros((40, 40), bool)]
    pt, lo, hi = bootstrap_ci(lambda p, g: per_image_dice(p, g).mean(), masks, masks, n_boot=50)
    assert pt == lo == hi == 1.0


def test_bootstrap_length_mismatch_raises():
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_ci(macro_auroc, np.zeros(3), np.zeros(4))
