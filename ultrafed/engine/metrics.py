"""Task metrics: AUROC / accuracy / F1 for diagnosis, Dice / HD95 for segmentation, bootstrap CIs.

Classification metrics come from scikit-learn (the reference implementation people compare
against); surface distances from SciPy's exact Euclidean distance transform. Conventions that
change reported numbers are explicit arguments, not hidden choices:

- Dice of an empty prediction on an empty mask is ``empty_value`` (1.0: the model correctly
  found nothing, as BUSI's "normal" images require).
- HD95 is undefined when either mask is empty; it is ``nan`` there and averages skip it
  (``n_hd95`` says how many images it covers).
- Confidence intervals are percentile bootstraps over cases (images), the unit that was sampled.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score


def _check_cls(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:  # binary scores for the positive class
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must be [N, C] with C >= 2, got shape {np.shape(probs)}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} cases but probs has {p.shape[0]}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1]}), got range [{y.min()}, {y.max()}]")
    return y, p


def macro_auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUROC; ``nan`` when fewer than two classes occur in ``y_true``.

    Two columns: the plain binary AUROC of column 1. All classes present: sklearn's
    ``multi_class="ovr", average="macro"``. Some classes absent (a small split, a bootstrap
    resample): the mean of the per-class one-vs-rest AUROCs over the present classes, which is
    the same definition restricted to where it is defined.
    """
    y, p = _check_cls(y_true, probs)
    present = np.unique(y)
    if present.size < 2:
        return math.nan
    c = p.shape[1]
    if c == 2:
        return float(roc_auc_score(y, p[:, 1]))
    if present.size == c:
        # sklearn insists that ovr scores sum to one; softmax outputs do up to rounding.
        p = p / p.sum(axis=1, keepdims=True)
        return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=np.arange(c)))
    return float(np.mean([roc_auc_score(y == k, p[:, k]) for k in present]))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``auroc`` (macro OvR), ``accuracy`` and ``f1_macro`` (over all classes; absent ones count 0)."""
    y, p = _check_cls(y_true, probs)
    pred = p.argmax(axis=1)
    return {
        "auroc": macro_auroc(y, p),
        "accuracy": float(accuracy_score(y, pred)),
        "f1_macro": float(f1_score(y, pred, labels=np.arange(p.shape[1]), average="macro", zero_division=0)),
    }


def _check_masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"prediction shape {a.shape} does not match ground-truth shape {b.shape}")
    return a, b


def dice(pred: np.ndarray, gt: np.ndarray, empty_value: float = 1.0) -> float:
    """``2|P & G| / (|P| + |G|)``; ``empty_value`` when both masks are empty."""
    a, b = _check_masks(pred, gt)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return float(empty_value)
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels: in the mask with a 4-neighbour outside it (the image edge counts as outside)."""
    inner = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)
    return mask & ~inner


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: float | Sequence[float] = 1.0) -> np.ndarray:
    """All distances from each surface pixel of one mask to the nearest surface pixel of the
    other, both directions pooled (as medpy's ``hd95``); empty when either mask is empty."""
    a, b = _check_masks(pred, gt)
    if not a.any() or not b.any():
        return np.empty(0)
    sa, sb = _surface(a), _surface(b)
    d_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    d_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return np.concatenate([d_to_b[sa], d_to_a[sb]])


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: float | Sequence[float] = 1.0) -> float:
    """95th percentile of the symmetric surface distances (units of ``spacing``); ``nan`` when
    either mask is empty, where a distance between surfaces does not exist."""
    d = surface_distances(pred, gt, spacing)
    return float(np.percentile(d, 95)) if d.size else math.nan


def per_image_dice(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], empty_value: float = 1.0) -> np.ndarray:
    """``[N]`` Dice per image (the case values that bootstraps resample)."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions but {len(gts)} ground-truth masks")
    return np.array([dice(p, g, empty_value) for p, g in zip(preds, gts)], dtype=np.float64)


def segmentation_metrics(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], *, include_empty: bool = True,
                         spacing: float = 1.0, empty_value: float = 1.0) -> dict[str, float]:
    """Mean per-image ``dice`` and ``hd95`` (nan-skipping), with the counts behind them.

    ``include_empty=False`` drops images whose ground truth is empty (BUSI "normal"): the
    "lesion images only" number. With them, an empty-on-empty prediction scores ``empty_value``.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions but {len(gts)} ground-truth masks")
    pairs = [(p, g) for p, g in zip(preds, gts) if include_empty or np.asarray(g).any()]
    if not pairs:
        return {"dice": math.nan, "hd95": math.nan, "n": 0, "n_hd95": 0}
    d = [dice(p, g, empty_value) for p, g in pairs]
    h = np.array([hd95(p, g, spacing) for p, g in pairs])
    finite = np.isfinite(h)
    return {"dice": float(np.mean(d)), "hd95": float(h[finite].mean()) if finite.any() else math.nan,
            "n": len(pairs), "n_hd95": int(finite.sum())}


def _take(arr: Any, idx: np.ndarray) -> Any:
    if isinstance(arr, np.ndarray):
        return arr[idx]
    return [arr[i] for i in idx]


def bootstrap_ci(metric_fn: Callable[..., float], *arrays: Any, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(point, lo, hi)``: ``metric_fn(*arrays)`` and its percentile bootstrap interval.

    Every array (ndarray or list, e.g. masks of different sizes) is indexed by the same
    resampled cases. Resamples where the metric is undefined (``nan``, or a ``ValueError`` such
    as a single class for AUROC) are dropped; the bounds are ``nan`` if none is left.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array of cases")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"bootstrap_ci: arrays differ in length ({[len(a) for a in arrays]})")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    point = float(metric_fn(*arrays))
    if n == 0 or n_boot < 1:
        return point, math.nan, math.nan
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        try:
            v = float(metric_fn(*(_take(a, idx) for a in arrays)))
        except ValueError:
            continue
        if math.isfinite(v):
            stats.append(v)
    if not stats:
        return point, math.nan, math.nan
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lo), float(hi)
