"""Server-side aggregation strategies as pure functions.

Each strategy maps (global state, site updates, server-optimiser state) to an
:class:`AggregationResult`. Nothing is mutated: a round can be replayed from its inputs, and
the server-optimiser state (FedAvgM momentum, FedAdam moments) is *returned* so the caller
persists it next to the model and feeds it back next round.

Conventions shared by every strategy:

* An update is the site's **full** local state after training, never a delta; strategies that
  need deltas form ``update - global`` themselves.
* Only floating-point tensors are aggregated. Integer/bool buffers (step counters, index
  tables) have no meaningful average; they are copied from the update with the **largest n**
  (the first such update on ties).
* Results keep the updates' dtype. FedAvg sums in float32 (float64 inputs in float64), as Flower
  and DDP do: a float32 sum of K updates is within ~K x 1e-7 relative of the exact mean, and an
  in-place mixed float32->float64 add is ~15x slower on CPU (see bench/bench_aggregation.py).
  Per-tensor strategies (median, trimmed mean, q-FedAvg) compute in float64.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

State = dict[str, Tensor]

_ACC = torch.float64  # per-tensor arithmetic of the non-streaming strategies


@dataclass(frozen=True)
class SiteUpdate:
    """One site's contribution to a round.

    ``loss`` is the site's training loss of the *global* model on its own data before local
    training, F_k(w^t); only q-FedAvg uses it.
    """
    site: str
    state: State
    n: int
    loss: float | None = None


@dataclass(frozen=True)
class AggregationResult:
    """The new global state, the server-optimiser state to persist ({} when stateless), and the
    weight each site's state received (keys: site ids)."""
    state: State
    server_state: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# FedAvg: the streaming core every averaging strategy builds on
# --------------------------------------------------------------------------------------------

def _check_n(n: Any, index: int) -> float:
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
        raise ValueError(f"fedavg: update {index} has invalid image count n={n!r} (need a number >= 0)")
    return float(n)


def fedavg(updates: Iterable[tuple[State, int]], weighted: bool = True) -> State:
    """Average of the updates' float tensors, weighted by n (``weighted``) or uniform.

    Streaming: one accumulator per tensor (float32, or the input's dtype if wider) that becomes
    the result in place, and one update held at a time, so any iterable (e.g. a generator that
    loads updates one by one) aggregates in one model of extra memory plus the update being read,
    at any number of sites. Non-float buffers come from the update with the largest n.
    """
    acc: dict[str, Tensor] = {}
    spec: dict[str, tuple[torch.dtype, torch.Size]] = {}
    keys: list[str] = []
    others: State = {}
    best_n = -1.0
    total = 0.0
    count = 0
    it: Iterator[tuple[State, int]] = iter(updates)
    while True:
        try:
            state, n = next(it)
        except StopIteration:
            break
        nf = _check_n(n, count)
        w = nf if weighted else 1.0
        if count == 0:
            keys = list(state)
        elif len(state) != len(keys) or any(k not in state for k in keys):
            missing = [k for k in keys if k not in state]
            extra = [k for k in state if k not in set(keys)]
            raise ValueError(f"fedavg: update {count} keys differ from update 0 "
                             f"(missing {missing[:3]}, extra {extra[:3]})")
        t: Tensor | None = None
        for k in keys:
            t = state[k]
            if count == 0:
                if t.is_floating_point():
                    spec[k] = (t.dtype, t.shape)
                    acc[k] = t.to(torch.promote_types(t.dtype, torch.float32)).mul(w)  # new tensor, one pass
            elif k in spec:
                if (t.dtype, t.shape) != spec[k]:
                    raise ValueError(f"fedavg: update {count} tensor {k!r} is {t.dtype} {tuple(t.shape)}, "
                                     f"update 0 had {spec[k][0]} {tuple(spec[k][1])}")
                acc[k].add_(t, alpha=w)
            elif t.is_floating_point():
                raise ValueError(f"fedavg: update {count} tensor {k!r} is {t.dtype}, update 0 had a non-float buffer")
        if nf > best_n:
            best_n = nf
            others = {k: state[k].clone() for k in keys if not state[k].is_floating_point()}
        total += w
        count += 1
        del state, t  # release this update (last tensor too) before the next one is produced
    if count == 0:
        raise ValueError("fedavg: no updates to aggregate")
    if total <= 0:
        raise ValueError("fedavg: every update reports n=0 images; nothing to weight by")
    out: State = {}
    for k in keys:
        if k in acc:
            out[k] = acc.pop(k).div_(total).to(spec[k][0])  # in place; a bf16 input frees its sum per tensor
        else:
            out[k] = others[k]
    return out


def fedavg_weights(ns: Sequence[float], weighted: bool = True) -> list[float]:
    """The normalised weight :func:`fedavg` gives each update."""
    if not ns:
        return []
    if not weighted:
        return [1.0 / len(ns)] * len(ns)
    total = float(sum(ns))
    if total <= 0:
        raise ValueError("fedavg: every update reports n=0 images; nothing to weight by")
    return [float(n) / total for n in ns]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _largest(updates: Sequence[SiteUpdate]) -> SiteUpdate:
    """The update with the largest n, first on ties (the source of non-float buffers)."""
    return max(updates, key=lambda u: u.n)  # max() returns the first maximal element


def _check_updates(global_state: Mapping[str, Tensor], updates: Sequence[SiteUpdate]) -> None:
    _require(len(updates) > 0, "aggregate: no updates to aggregate")
    seen: set[str] = set()
    for u in updates:
        _require(isinstance(u, SiteUpdate), f"aggregate: expected SiteUpdate items, got {type(u).__name__}")
        _require(u.site not in seen, f"aggregate: two updates for site {u.site!r}")
        seen.add(u.site)
        missing = [k for k in global_state if k not in u.state]
        extra = [k for k in u.state if k not in global_state]
        _require(not missing and not extra, f"aggregate: site {u.site!r} keys differ from the global "
                                            f"state (missing {missing[:3]}, extra {extra[:3]})")


def _float_keys(state: Mapping[str, Tensor]) -> list[str]:
    return [k for k, t in state.items() if t.is_floating_point()]


def _server_buffers(server_state: Mapping[str, Any], fills: Mapping[str, float], global_state: State,
                    who: str) -> dict[str, State]:
    """Fed-back optimiser buffers, or fresh ones (``fills``: buffer name -> initial value)."""
    names = tuple(fills)
    if not server_state:
        return {b: {k: torch.full_like(global_state[k], fills[b]) for k in _float_keys(global_state)}
                for b in names}
    _require(set(server_state) == set(names),
             f"{who}: server_state has keys {sorted(server_state)}, expected {sorted(names)} "
             "(state from another strategy?)")
    out: dict[str, State] = {}
    for b in names:
        buf = server_state[b]
        for k in _float_keys(global_state):
            _require(k in buf and tuple(buf[k].shape) == tuple(global_state[k].shape),
                     f"{who}: server_state[{b!r}] does not match the model at tensor {k!r}")
        out[b] = {k: buf[k].to(global_state[k].dtype) for k in _float_keys(global_state)}
    return out


def _mean_delta(global_state: State, updates: Sequence[SiteUpdate], weighted: bool) -> tuple[State, State]:
    """(fedavg of the updates, its delta against the global state) for the float tensors."""
    avg = fedavg(((u.state, u.n) for u in updates), weighted=weighted)
    delta = {k: avg[k] - global_state[k] for k in _float_keys(global_state)}
    return avg, delta


def _site_weights(updates: Sequence[SiteUpdate], weighted: bool) -> dict[str, float]:
    return dict(zip((u.site for u in updates), fedavg_weights([u.n for u in updates], weighted)))


# --------------------------------------------------------------------------------------------
# strategies: (global_state, updates, server_state, **params) -> AggregationResult
# --------------------------------------------------------------------------------------------

def strategy_fedavg(global_state: State, updates: Sequence[SiteUpdate], server_state: Mapping[str, Any],
                    ) -> AggregationResult:
    """McMahan et al. 2017, volume-weighted: the paper's (UltraFedFM's) default."""
    state = fedavg(((u.state, u.n) for u in updates), weighted=True)
    return AggregationResult(state, {}, _site_weights(updates, True))


def strategy_fedavg_uniform(global_state: State, updates: Sequence[SiteUpdate],
                            server_state: Mapping[str, Any]) -> AggregationResult:
    """Every site counts the same, whatever its size (a small hospital is not drowned out)."""
    state = fedavg(((u.state, u.n) for u in updates), weighted=False)
    return AggregationResult(state, {}, _site_weights(updates, False))


def strategy_fedprox(global_state: State, updates: Sequence[SiteUpdate], server_state: Mapping[str, Any],
                     *, mu: float = 0.01) -> AggregationResult:
    """Li et al. 2020: the server side is FedAvg; ``mu`` is the client's proximal weight (see
    :func:`proximal_term`), accepted here so one ``strategy_params`` serves both sides."""
    _require(mu >= 0, f"fedprox: mu must be >= 0, got {mu}")
    return strategy_fedavg(global_state, updates, server_state)


def strategy_fedavgm(global_state: State, updates: Sequence[SiteUpdate], server_state: Mapping[str, Any],
                     *, server_lr: float = 1.0, momentum: float = 0.9) -> AggregationResult:
    """Hsu et al. 2019, server momentum on the averaged delta D = fedavg - w:
    ``m <- momentum * m + D``; ``w <- w + server_lr * m`` (m = 0 before round 1; server_lr 1 and
    momentum 0 is FedAvg). Returns ``server_state = {"momentum": m}``."""
    _require(server_lr > 0, f"fedavgm: server_lr must be > 0, got {server_lr}")
    _require(0 <= momentum < 1, f"fedavgm: momentum must be in [0, 1), got {momentum}")
    _check_updates(global_state, updates)
    avg, delta = _mean_delta(global_state, updates, weighted=True)
    m = _server_buffers(server_state, {"momentum": 0.0}, global_state, "fedavgm")["momentum"]
    new_m = {k: m[k].mul(momentum).add_(delta[k]) for k in delta}
    state = {k: (global_state[k] + server_lr * new_m[k]) if k in new_m else avg[k] for k in global_state}
    return AggregationResult(state, {"momentum": new_m}, _site_weights(updates, True))


def strategy_fedadam(global_state: State, updates: Sequence[SiteUpdate], server_state: Mapping[str, Any],
                     *, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99,
                     tau: float = 1e-3) -> AggregationResult:
    """Reddi et al. 2021 (Algorithm 2, FedAdam), on the volume-weighted delta D:
    ``m <- b1 m + (1-b1) D``; ``v <- b2 v + (1-b2) D^2``; ``w <- w + lr m / (sqrt(v) + tau)``,
    with m = 0 and v = tau^2 before round 1 and no bias correction, as in the paper.
    Returns ``server_state = {"m": m, "v": v}``."""
    _require(server_lr > 0, f"fedadam: server_lr must be > 0, got {server_lr}")
    _require(0 <= beta1 < 1 and 0 <= beta2 < 1, f"fedadam: beta1, beta2 must be in [0, 1), got {beta1}, {beta2}")
    _require(tau > 0, f"fedadam: tau must be > 0, got {tau}")
    _check_updates(global_state, updates)
    avg, delta = _mean_delta(global_state, updates, weighted=True)
    bufs = _server_buffers(server_state, {"m": 0.0, "v": tau * tau}, global_state, "fedadam")
    m = {k: bufs["m"][k].mul(beta1).add_(delta[k], alpha=1 - beta1) for k in delta}
    v = {k: bufs["v"][k].mul(beta2).addcmul_(delta[k], delta[k], value=1 - beta2) for k in delta}
    state = {k: (global_state[k] + server_lr * m[k] / (v[k].sqrt() + tau)) if k in m else avg[k]
             for k in global_state}
    return AggregationResult(state, {"m": m, "v": v}, _site_weights(updates, True))


def _float_wise(global_state: State, updates: Sequence[SiteUpdate],
                combine: Callable[[str, Tensor], Tensor]) -> State:
    """``combine(key, global tensor)`` for every float tensor, cast back to its dtype, one key at a time;
    non-float buffers (counters, index tables) are copied from the update with the largest n."""
    largest = _largest(updates)
    return {k: combine(k, g).to(g.dtype) if g.is_floating_point() else largest.state[k].clone()
            for k, g in global_state.items()}


def _coordinatewise(global_state: State, updates: Sequence[SiteUpdate],
                    reduce: Callable[[Tensor], Tensor]) -> State:
    """Apply ``reduce`` to each float tensor stacked over sites ([K, *shape]); one tensor at a time,
    so extra memory is K copies of the largest tensor, not of the model."""
    return _float_wise(global_state, updates, lambda k, _g: reduce(torch.stack([u.state[k] for u in updates])))


def _median0(x: Tensor) -> Tensor:
    srt = x.sort(dim=0).values
    k = x.shape[0]
    if k % 2:
        return srt[k // 2]
    return (srt[k // 2 - 1].to(_ACC) + srt[k // 2].to(_ACC)) / 2  # numpy's convention for even K


def strategy_median(global_state: State, updates: Sequence[SiteUpdate], server_state: Mapping[str, Any],
                    ) -> AggregationResult:
    """Yin et al. 2018, coordinate-wise median (unweighted; even K averages the two middle values).
    ``weights`` reports the nominal 1/K: no single weight per site exists for a median."""
    _check_updates(global_state, updates)
    state = _coordinatewise(global_state, updates, _median0)
    return AggregationResult(state, {}, _site_weights(updates, False))


def strategy_trimmed_mean(global_state: State, updates: Sequence[SiteUpdate],
                          server_state: Mapping[str, Any], *, beta: float = 0.1) -> AggregationResult:
    """Yin et al. 2018, coordinate-wise trimmed mean: drop floor(beta*K) lowest and highest values
    per coordinate, average the rest uniformly. ``weights`` reports the nominal 1/K."""
    _require(0 <= beta < 0.5, f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
    _check_updates(global_state, updates)
    k_cut = math.floor(beta * len(updates) + 1e-9)  # + eps: 0.29 * 100 must give 29, not 28

    def trimmed(x: Tensor) -> Tensor:
        srt = x.sort(dim=0).values
        return srt[k_cut: x.shape[0] - k_cut].to(_ACC).mean(dim=0)

    state = _coordinatewise(global_state, updates, trimmed)
    return AggregationResult(state, {}, _site_weights(updates, False))


def strategy_qfedavg(global_state: State, updates: Sequence[SiteUpdate], server_state: Mapping[str, Any],
                     *, q: float = 0.2, lipschitz: float = 10.0) -> AggregationResult:
    """Li et al. 2020 (q-FFL, Algorithm 2 q-FedAvg): sites with a higher loss F_k get more weight.

    With dw_k = L (w - w_k): ``D_k = F_k^q dw_k``, ``h_k = q F_k^(q-1) ||dw_k||^2 + L F_k^q``,
    ``w <- w - sum D_k / sum h_k`` = ``w + sum c_k (w_k - w)`` with ``c_k = L F_k^q / sum h``
    (reported as the site weights; they sum to <= 1, the rest stays on w). Uniform over the
    participating sites as in the paper; q = 0 is uniform FedAvg. L is the inverse of the local
    step size in the paper; the defaults are Flower's (q 0.2, L 1/0.1). F_k is clamped at 1e-10
    so F^(q-1) stays finite.
    """
    _require(q >= 0, f"qfedavg: q must be >= 0, got {q}")
    _require(lipschitz > 0, f"qfedavg: lipschitz must be > 0, got {lipschitz}")
    _check_updates(global_state, updates)
    for u in updates:
        _require(u.loss is not None and math.isfinite(u.loss) and u.loss >= 0,
                 f"qfedavg: site {u.site!r} needs a finite loss >= 0 of the global model, got {u.loss!r}")
    fkeys = _float_keys(global_state)
    hs: list[float] = []
    for u in updates:
        f = max(float(u.loss), 1e-10)  # type: ignore[arg-type]
        sq = sum(float((u.state[k].to(_ACC) - global_state[k].to(_ACC)).square().sum()) for k in fkeys)
        hs.append(q * f ** (q - 1) * lipschitz ** 2 * sq + lipschitz * f ** q)
    h_total = sum(hs)
    coef = [lipschitz * max(float(u.loss), 1e-10) ** q / h_total for u in updates]  # type: ignore[arg-type]

    def step(k: str, g: Tensor) -> Tensor:  # w + sum_k c_k (w_k - w), accumulated in float64
        g64 = g.to(_ACC)
        acc = g64.clone()
        for c, u in zip(coef, updates):
            acc.add_(u.state[k].to(_ACC) - g64, alpha=c)
        return acc

    state = _float_wise(global_state, updates, step)
    return AggregationResult(state, {}, {u.site: c for u, c in zip(updates, coef)})


StrategyFn = Callable[..., AggregationResult]

STRATEGIES: dict[str, StrategyFn] = {
    "fedavg": strategy_fedavg,
    "fedavg_uniform": strategy_fedavg_uniform,
    "fedprox": strategy_fedprox,
    "fedavgm": strategy_fedavgm,
    "fedadam": strategy_fedadam,
    "median": strategy_median,
    "trimmed_mean": strategy_trimmed_mean,
    "qfedavg": strategy_qfedavg,
}


def resolve_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The strategy's full settings (defaults filled in): what lineage records for a round.

    Unknown strategy names and parameters fail here with one line naming what is allowed.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown aggregation strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    sig = inspect.signature(STRATEGIES[name])
    allowed = {p.name: p.default for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(params or {}) - set(allowed))
    if unknown:
        raise ValueError(f"strategy {name!r}: unknown parameter(s) {unknown}; allowed: {sorted(allowed) or 'none'}")
    return {**allowed, **(params or {})}


def aggregate(name: str, global_state: State, updates: Sequence[SiteUpdate],
              server_state: Mapping[str, Any] | None = None, **params: Any) -> AggregationResult:
    """Run the strategy ``name`` (``federated.strategy``) with ``params``
    (``federated.strategy_params``) over the accepted updates of one round."""
    resolved = resolve_params(name, params)
    updates = list(updates)
    _check_updates(global_state, updates)
    return STRATEGIES[name](global_state, updates, dict(server_state or {}), **resolved)


def proximal_term(params: Iterable[tuple[str, Tensor]], global_state: Mapping[str, Tensor],
                  mu: float) -> Tensor:
    """FedProx's client-side penalty ``(mu/2) * sum ||w - w_global||^2`` over the named parameters
    (e.g. ``model.named_parameters()``), differentiable in ``w``; the training loop adds it to the
    loss. Parameters absent from ``global_state`` (a local head) are not penalised."""
    _require(mu >= 0, f"proximal_term: mu must be >= 0, got {mu}")
    total: Tensor | None = None
    for name, w in params:
        g = global_state.get(name)
        if g is None:
            continue
        term = (w - g.to(device=w.device, dtype=w.dtype)).square().sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total * (mu / 2)
