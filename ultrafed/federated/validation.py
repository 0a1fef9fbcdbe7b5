"""Screening of site updates before they may touch the global model.

One broken or hostile site must not poison a round: a NaN spreads through every average, a
renamed key silently keeps stale weights, and a scaled update drags FedAvg wherever it points.
Each check returns one-line reasons instead of raising, so the round can exclude the site,
record why (lineage), and go on with the others.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

import torch

from ultrafed.federated.metrics import state_norm, update_norm
from ultrafed.federated.strategies import SiteUpdate, State

_MAX_NAMES = 5  # keys named in one reason line before "..."


def _names(keys: Sequence[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_NAMES])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_NAMES else "")


def validate_update(update: Mapping[str, Any], reference: State) -> list[str]:
    """Reasons (one line each; empty = ok) why ``update`` cannot be averaged into ``reference``:
    missing or extra keys, non-tensors, wrong shapes or dtypes, non-finite values."""
    if not isinstance(update, Mapping):
        return [f"update is a {type(update).__name__}, not a state dict"]
    reasons: list[str] = []
    missing = [k for k in reference if k not in update]
    extra = [k for k in update if k not in reference]
    if missing:
        reasons.append(f"missing key(s) {_names(missing)}")
    if extra:
        reasons.append(f"unexpected key(s) {_names(extra)}")
    for k, ref in reference.items():
        if k not in update:
            continue
        t = update[k]
        if not isinstance(t, torch.Tensor):
            reasons.append(f"{k!r} is a {type(t).__name__}, not a tensor")
            continue
        if tuple(t.shape) != tuple(ref.shape):
            reasons.append(f"{k!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
            continue
        if t.dtype != ref.dtype:
            reasons.append(f"{k!r} has dtype {t.dtype}, expected {ref.dtype}")
            continue
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            reasons.append(f"{k!r} has non-finite values ({n_nan} NaN, {n_inf} Inf)")
    return reasons


def norm_outliers(delta_norms: Mapping[str, float], bound: float, *, global_norm: float | None = None,
                  max_rel_global: float = 1.0) -> dict[str, str]:
    """Sites whose update norm ``||w_site - w_global||`` is implausibly large (site -> reason).

    3+ sites: reject a norm above ``bound`` x the median norm of all sites (robust: one outlier
    cannot move the median). With 1-2 sites a median cannot tell the outlier from the honest
    site (with 2, neither exceeds 2x the median), so the absolute rule applies instead: reject a
    norm above ``max_rel_global`` x ``||w_global||``: one round of local training moves weights
    by a small fraction of their norm, a scaled or replaced model by more than all of it. That
    rule needs ``global_norm``; with ``global_norm == 0`` (an all-zero model) nothing can be judged
    and no site is rejected by norm.
    """
    if bound <= 0:
        raise ValueError(f"norm_outliers: bound must be > 0, got {bound}")
    out: dict[str, str] = {}
    finite = {s: float(v) for s, v in delta_norms.items() if math.isfinite(v)}
    for s, v in delta_norms.items():
        if not math.isfinite(v):
            out[s] = f"update norm is {v} (non-finite)"
    if len(finite) >= 3:
        med = statistics.median(finite.values()) if finite else math.nan
        for s, v in finite.items():
            if v > bound * med:
                out[s] = f"update norm {v:.4g} exceeds {bound:g} x median {med:.4g} (= {bound * med:.4g})"
        return out
    if global_norm is None:
        raise ValueError("norm_outliers: with fewer than 3 sites pass global_norm (median rule is meaningless)")
    if global_norm > 0:
        for s, v in finite.items():
            if v > max_rel_global * global_norm:
                out[s] = (f"update norm {v:.4g} exceeds {max_rel_global:g} x global weights norm "
                          f"{global_norm:.4g} (fewer than 3 sites: absolute rule)")
    return out


def screen_updates(global_state: State, updates: Sequence[SiteUpdate], norm_bound: float, *,
                   max_rel_global: float = 1.0) -> tuple[list[SiteUpdate], dict[str, str]]:
    """Split a round's updates into (accepted, rejected: site -> one-line reason).

    Structure and finiteness first (``validate_update``), an image count > 0, then the norm
    rule of :func:`norm_outliers` among the structurally valid updates. Two updates from one
    site are a caller bug and raise.
    """
    sites = [u.site for u in updates]
    dup = sorted({s for s in sites if sites.count(s) > 1})
    if dup:
        raise ValueError(f"screen_updates: more than one update for site(s) {dup}")
    rejected: dict[str, str] = {}
    valid: list[SiteUpdate] = []
    for u in updates:
        reasons = validate_update(u.state, global_state)
        if isinstance(u.n, bool) or not isinstance(u.n, int) or u.n <= 0:
            reasons.append(f"image count n={u.n!r} (need an integer > 0)")
        if reasons:
            rejected[u.site] = "; ".join(reasons)
        else:
            valid.append(u)
    if valid:
        norms = {u.site: update_norm(u.state, global_state) for u in valid}
        g_norm = state_norm(global_state) if len(valid) < 3 else None  # only the 1-2 site rule needs it
        rejected.update(norm_outliers(norms, norm_bound, global_norm=g_norm, max_rel_global=max_rel_global))
    accepted = [u for u in valid if u.site not in rejected]
    return accepted, rejected
