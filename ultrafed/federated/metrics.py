"""Client-drift and communication metrics of one round.

Non-IID sites pull the model apart; these numbers show by how much, per site, so a round's
lineage can explain a bad global model (one site far from the rest, or pointing elsewhere):

* update norm ``||w_site - w_global||`` (float tensors only, summed in float64);
* cosine between the site's delta and the mean delta (the same weighting as the aggregation);
* bytes the site sent (payload of the encoded transfer);
* fairness spread (max - min, population std) of any per-site metric.

All work tensor by tensor, so memory stays at a few tensors whatever the model size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ultrafed.federated.strategies import SiteUpdate, State, fedavg_weights
from ultrafed.federated.transfer import encoded_nbytes

_ACC = torch.float64


def _delta(a: Tensor, b: Tensor) -> Tensor:
    return a.to(_ACC) - b.to(_ACC)


def update_norm(state: Mapping[str, Tensor], global_state: Mapping[str, Tensor]) -> float:
    """L2 norm of ``state - global_state`` over the float tensors both hold."""
    sq = 0.0
    for k, g in global_state.items():
        if g.is_floating_point() and k in state:
            sq += float(_delta(state[k], g).square().sum())
    return math.sqrt(sq)


def state_norm(state: Mapping[str, Tensor]) -> float:
    """L2 norm of the float tensors (the scale an update norm is compared with)."""
    return math.sqrt(sum(float(t.to(_ACC).square().sum()) for t in state.values() if t.is_floating_point()))


def update_norms(global_state: State, updates: Sequence[SiteUpdate]) -> dict[str, float]:
    return {u.site: update_norm(u.state, global_state) for u in updates}


def cosine_to_mean(global_state: State, updates: Sequence[SiteUpdate], weighted: bool = True) -> dict[str, float]:
    """Cosine between each site's delta and the (n-weighted, or uniform) mean delta.

    1 = the site pulls where the federation goes; <= 0 = it pulls against it. A zero delta (or
    zero mean) has no direction and is reported as 0.
    """
    w = fedavg_weights([u.n for u in updates], weighted)
    dots = [0.0] * len(updates)
    sq = [0.0] * len(updates)
    mean_sq = 0.0
    for k, g in global_state.items():
        if not g.is_floating_point():
            continue
        deltas = [_delta(u.state[k], g) for u in updates]
        mean = torch.zeros_like(deltas[0])
        for wi, d in zip(w, deltas):
            mean.add_(d, alpha=wi)
        mean_sq += float(mean.square().sum())
        for i, d in enumerate(deltas):
            dots[i] += float((d * mean).sum())
            sq[i] += float(d.square().sum())
    out: dict[str, float] = {}
    for u, dot, s in zip(updates, dots, sq):
        den = math.sqrt(s) * math.sqrt(mean_sq)
        out[u.site] = dot / den if den > 0 else 0.0
    return out


@dataclass(frozen=True)
class SiteDrift:
    update_norm: float
    cosine_to_mean: float
    bytes_sent: int


def site_drift(global_state: State, updates: Sequence[SiteUpdate], *, weighted: bool = True,
               transfer_dtype: str = "float32") -> dict[str, SiteDrift]:
    """Per-site drift and traffic of one round (``transfer_dtype``: how updates were encoded)."""
    norms = update_norms(global_state, updates)
    cos = cosine_to_mean(global_state, updates, weighted)
    return {u.site: SiteDrift(norms[u.site], cos[u.site], encoded_nbytes(u.state, transfer_dtype))
            for u in updates}


def spread(per_site: Mapping[str, float]) -> dict[str, float]:
    """Fairness spread of a per-site metric: ``max_min`` (max - min) and ``std`` (population,
    ddof 0: the sites are the whole federation, not a sample). Empty input gives NaNs."""
    vals = [float(v) for v in per_site.values()]
    if not vals:
        return {"max_min": math.nan, "std": math.nan}
    mean = sum(vals) / len(vals)
    return {"max_min": max(vals) - min(vals),
            "std": math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))}
