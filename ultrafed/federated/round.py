"""One federated round, written once, for every caller: Prefect flows, benchmarks, the GPU protocol.

After Flower's ``Server.fit_round`` and NVFlare's ``ScatterAndGather``: :func:`run_round` is a
plain function over a :class:`SiteRunner` (who runs the site actions: this process, or each
site's Prefect work pool) and a :class:`RoundTracker` (where the round is recorded and weights
are stored: MLflow, or JSON lines). The coordinator holds the global model in memory for the
whole round; sites receive only a :class:`ModelRef` (URI + sha256) and answer with small
records, never tensors or paths.

    check (every site) -> train (eligible) -> screen updates -> quorum -> aggregate
    -> validate the new global model (eligible) -> metrics -> register -> close the round

A site that fails its gate, crashes, times out or sends a rejected update is excluded with a
one-line reason; fewer than ``federated.min_sites`` accepted updates raise :class:`RoundFailed`
and nothing is registered. Whatever happens, the round's tracking runs are closed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence

from torch import Tensor

from ultrafed.config import Config
from ultrafed.federated.metrics import site_drift, spread
from ultrafed.federated.strategies import SiteUpdate, aggregate, resolve_params
from ultrafed.federated.validation import screen_updates
from ultrafed.tracking.lineage import Lineage, SiteRecord

State = dict[str, Tensor]
GATE_FAIL = "fail"
GATE_SKIPPED = "skipped"  # the runner ran no gate (recorded as such in the lineage)


class RoundFailed(RuntimeError):
    """Fewer than ``min_sites`` usable updates: the round must not produce a model."""


# -- what sites answer ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteFailure:
    """A site action that produced no result (crash, timeout, refusal); ``reason`` is one line."""

    reason: str


@dataclass(frozen=True)
class GateOutcome:
    """A site's quality gate: ``pass`` / ``warn`` / ``fail``, or ``skipped`` when no gate ran."""

    site: str
    status: str
    reasons: tuple[str, ...] = ()
    n_images: int = 0
    n_quarantined: int = 0
    manifest_md5: str = ""

    @property
    def passed(self) -> bool:
        return self.status != GATE_FAIL

    @classmethod
    def from_result(cls, d: Mapping[str, Any]) -> "GateOutcome":
        """From the small dict a site's ``check`` action returns."""
        return cls(site=str(d["site"]), status=str(d["status"]), reasons=tuple(str(r) for r in d.get("reasons", ())),
                   n_images=int(d.get("n_images", 0)), n_quarantined=int(d.get("n_quarantined", 0)),
                   manifest_md5=str(d.get("manifest_md5") or ""))


@dataclass(frozen=True)
class UpdateRef:
    """Where a site left its update, how many images it trained on, and its local metrics."""

    site: str
    n_images: int
    update_uri: str
    update_sha256: str
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def strategy_loss(self) -> float | None:
        """The global model's loss at the site before training (q-FedAvg), else the training loss."""
        return self.metrics.get("loss_before", self.metrics.get("loss"))

    @classmethod
    def from_result(cls, d: Mapping[str, Any]) -> "UpdateRef":
        return cls(site=str(d["site"]), n_images=int(d["n_images"]), update_uri=str(d["update_uri"]),
                   update_sha256=str(d["update_sha256"]),
                   metrics={k: float(v) for k, v in (d.get("metrics") or {}).items()})


@dataclass(frozen=True)
class ValOutcome:
    """Masked-reconstruction loss of the new global model on a site's val split."""

    site: str
    val_loss: float
    n_val: int

    @classmethod
    def from_result(cls, d: Mapping[str, Any]) -> "ValOutcome":
        return cls(site=str(d["site"]), val_loss=float(d["val_loss"]), n_val=int(d.get("n_val", 0)))


@dataclass(frozen=True)
class ModelRef:
    """A global model as a site sees it: where to fetch it, and the sha256 to check it against."""

    uri: str
    sha256: str


@dataclass(frozen=True)
class RoundContext:
    """The tracking handles of one round (``None`` ids where the tracker keeps no runs)."""

    round_idx: int
    run_id: str | None
    site_run_ids: Mapping[str, str | None]
    run_key: str  # scopes each site's saved optimizer state to this pretraining


# -- who runs site actions, where the round goes -------------------------------------------------
class SiteRunner(Protocol):
    """Runs one action at many sites (concurrently where it can); never raises for a site's failure."""

    def check(self, ctx: RoundContext, sites: Sequence[str]) -> Mapping[str, GateOutcome | SiteFailure]: ...

    def train(self, ctx: RoundContext, sites: Sequence[str],
              model: ModelRef) -> Mapping[str, UpdateRef | SiteFailure]: ...

    def validate(self, ctx: RoundContext, sites: Sequence[str],
                 model: ModelRef) -> Mapping[str, ValOutcome | SiteFailure]: ...


class StateStore(Protocol):
    """Content-checked weight storage shared by the coordinator and the sites."""

    def put(self, state: Mapping[str, Tensor], run_id: str | None, name: str, *,
            meta: Mapping[str, Any] | None = None) -> str: ...

    def get(self, uri: str, sha256: str | None) -> State: ...


class RoundTracker(Protocol):
    """Records a round: runs, metrics, the registered model. ``store`` moves weights."""

    store: StateStore

    def start_round(self, round_idx: int, sites: Sequence[str], run_key: str) -> RoundContext: ...

    def log_round(self, ctx: RoundContext, metrics: Mapping[str, float]) -> None: ...

    def register(self, ctx: RoundContext, state: State, lineage: Lineage,
                 metrics: Mapping[str, float]) -> tuple[int | None, str | None]: ...

    def end_round(self, ctx: RoundContext, failed_sites: Collection[str], ok: bool) -> None: ...


# -- inputs and the record -----------------------------------------------------------------------
@dataclass(frozen=True)
class RoundInputs:
    """What the coordinator knows before a round: the global model (held once, in memory)."""

    round_idx: int
    global_state: State
    global_ref: ModelRef
    server_state: Mapping[str, Any] = field(default_factory=dict)
    parent_version: int | None = None
    run_key: str = "default"
    code_commit: str = "unknown"
    params_hash: str = ""
    mode: str = "embedded"
    manifest_paths: Mapping[str, str] = field(default_factory=dict)  # embedded only, for lineage --verify


@dataclass(frozen=True)
class RoundRecord:
    """The outcome of one completed round (its lineage is what the registered version carries)."""

    round_idx: int
    metrics: dict[str, float]
    excluded: dict[str, str]
    weights: dict[str, float]
    global_state: State
    global_ref: ModelRef
    server_state: dict[str, Any]
    version: int | None
    model_uri: str | None
    lineage: Lineage
    updates: tuple[UpdateRef, ...] = ()  # the accepted updates (their sites' full local metrics)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per step of the round

    def summary(self) -> dict[str, Any]:
        """The JSON-able part kept in the coordinator's history."""
        return {"round": self.round_idx, "metrics": dict(self.metrics), "excluded": dict(self.excluded),
                "weights": dict(self.weights), "version": self.version, "model_uri": self.model_uri}


# -- small pure helpers --------------------------------------------------------------------------
def first_line(e: BaseException) -> str:
    """``Type: first line of the message``: what a recorded exclusion reason says."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def split_outcomes(outcomes: Mapping[str, Any], what: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(results, site -> ``"<what>: <reason>"``) from a runner's answer."""
    ok = {s: o for s, o in outcomes.items() if not isinstance(o, SiteFailure)}
    failed = {s: f"{what}: {o.reason}" for s, o in outcomes.items() if isinstance(o, SiteFailure)}
    return ok, failed


def gate_exclusions(gates: Mapping[str, GateOutcome], max_reasons: int = 5) -> dict[str, str]:
    """Sites whose gate failed, with the first reasons."""
    return {s: "quality gate failed: " + "; ".join(g.reasons[:max_reasons]) for s, g in gates.items() if not g.passed}


def require_quorum(accepted: Sequence[str], min_sites: int, excluded: Mapping[str, str]) -> None:
    """k-of-n: fail loudly, naming every excluded site and why."""
    if len(accepted) < min_sites:
        why = "; ".join(f"{s}: {r}" for s, r in sorted(excluded.items())) or "no site reported"
        raise RoundFailed(f"only {len(accepted)} usable site update(s), need at least {min_sites} ({why})")


def weighted_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Mean of the finite ``values`` weighted by ``weights`` (image counts); NaN when none."""
    pairs = [(v, float(weights.get(s, 0))) for s, v in values.items() if math.isfinite(v) and weights.get(s, 0) > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else math.nan


def round_metrics(refs: Sequence[UpdateRef], vals: Mapping[str, ValOutcome], *, n_excluded: int,
                  val_missing: Collection[str], drift: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The one definition of a round's metrics.

    ``train_loss`` and ``global_val_loss`` are means over sites weighted by the images each
    used (train images incl. SMAT copies; val images), as FedAvg weighs the sites; the spread
    is unweighted, since fairness is per site. Per-site values use ``name.<site>`` keys.
    """
    train = {r.site: float(r.metrics.get("loss", math.nan)) for r in refs}
    val = {s: v.val_loss for s, v in vals.items()}
    m: dict[str, float] = {
        "global_val_loss": weighted_mean(val, {s: v.n_val for s, v in vals.items()}),
        "train_loss": weighted_mean(train, {r.site: r.n_images for r in refs}),
        "sites_accepted": float(len(refs)), "sites_excluded": float(n_excluded),
        "sites_validated": float(sum(1 for v in val.values() if math.isfinite(v))),
        "sites_val_missing": float(len(val_missing)),
        "site_train_seconds": float(sum(r.metrics.get("seconds", 0.0) for r in refs)),  # inside the training loops
    }
    m.update({f"val_loss_spread_{k}": v for k, v in spread({s: v for s, v in val.items() if math.isfinite(v)}).items()})
    m.update({f"train_loss.{s}": v for s, v in train.items()})
    m.update({f"val_loss.{s}": v for s, v in val.items()})
    for s, d in drift.items():
        m.update({f"{k}.{s}": float(v) for k, v in d.items()})
    return m


def top_level(metrics: Mapping[str, float]) -> dict[str, float]:
    """The finite round-level metrics (no per-site ``name.<site>`` keys): lineage and registry tags."""
    return {k: v for k, v in metrics.items() if "." not in k and math.isfinite(v)}


def build_lineage(cfg: Config, inputs: RoundInputs, ctx: RoundContext, refs: Sequence[UpdateRef],
                  gates: Mapping[str, GateOutcome], weights: Mapping[str, float], metrics: Mapping[str, float],
                  excluded: Mapping[str, str], val_missing: Mapping[str, str], new_ref: ModelRef) -> Lineage:
    """The registered version's lineage: who took part with what data, how it was aggregated."""
    fed, mdl = cfg.federated, cfg.model

    def site_record(r: UpdateRef) -> SiteRecord:
        g = gates[r.site]
        per_site = {k.split(".", 1)[0]: v for k, v in metrics.items() if k.endswith(f".{r.site}") and math.isfinite(v)}
        per_site["n_quarantined"] = float(g.n_quarantined)
        return SiteRecord(site=r.site, n_images=r.n_images, manifest_md5=g.manifest_md5,
                          weight=float(weights.get(r.site, 0.0)),
                          gate_status={"pass": "passed", "warn": "passed"}.get(g.status, g.status),
                          gate_reasons=[f"{g.status}: {x}" for x in g.reasons], metrics=per_site,
                          manifest_path=inputs.manifest_paths.get(r.site), update_sha256=r.update_sha256)

    return Lineage(kind="encoder", round=inputs.round_idx, parent_version=inputs.parent_version,
                   strategy=fed.strategy, strategy_params=resolve_params(fed.strategy, fed.strategy_params),
                   sites=[site_record(r) for r in refs], excluded=dict(excluded), code_commit=inputs.code_commit,
                   params_hash=inputs.params_hash, run_id=ctx.run_id, parent_run_id=inputs.run_key,
                   seed=cfg.seed, metrics=top_level(metrics),
                   model={"preset": mdl.preset, "img_size": mdl.img_size, "patch_size": mdl.patch_size,
                          "in_chans": mdl.in_chans},
                   extra={"global_uri": new_ref.uri, "global_sha256": new_ref.sha256, "mode": inputs.mode,
                          "gates": {s: g.status for s, g in gates.items()}, "val_missing": dict(val_missing)})


def load_updates(store: StateStore, refs: Sequence[UpdateRef]) -> tuple[list[SiteUpdate], dict[str, str]]:
    """Each update fetched once (checked against its sha256); an unreadable one excludes its site."""
    updates, failed = [], {}
    for r in refs:
        try:
            updates.append(SiteUpdate(site=r.site, state=store.get(r.update_uri, r.update_sha256), n=r.n_images,
                                      loss=r.strategy_loss))
        except Exception as e:  # noqa: BLE001 - a missing or altered update is that site's exclusion
            failed[r.site] = f"update unreadable: {first_line(e)}"
    return updates, failed


# -- the round -----------------------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.t0


StepRunner = Callable[[str, Callable[[], Any]], Any]


def _call(_name: str, fn: Callable[[], Any]) -> Any:
    return fn()


def run_round(cfg: Config, sites: Sequence[str], inputs: RoundInputs, runner: SiteRunner,
              tracker: RoundTracker, *, progress: Callable[[str], None] | None = None,
              step: StepRunner = _call) -> RoundRecord:
    """Run one round over ``sites`` and return its record; raises :class:`RoundFailed` below quorum.

    ``step(name, fn)`` runs each coordinator step (``aggregate``, ``register``); an orchestrator
    passes one that makes each a task of its DAG. ``progress`` receives one line per phase.
    """
    from ultrafed.federated.transfer import state_sha256

    fed, say = cfg.federated, progress or (lambda _msg: None)
    clock = _Clock()
    r = inputs.round_idx
    ctx = tracker.start_round(r, sites, inputs.run_key)
    excluded: dict[str, str] = {}
    ok = False
    try:
        gates, failed = split_outcomes(runner.check(ctx, sites), "quality check crashed")
        excluded.update(failed)
        excluded.update(gate_exclusions(gates))
        eligible = [s for s in sites if s not in excluded]
        clock.lap("check")
        say(f"round {r}: {len(eligible)}/{len(sites)} site(s) passed the gate; training")

        refs_by_site, failed = split_outcomes(runner.train(ctx, eligible, inputs.global_ref) if eligible else {},
                                              "training failed")
        excluded.update(failed)
        refs = [refs_by_site[s] for s in eligible if s in refs_by_site]
        clock.lap("train")

        def screen_and_aggregate() -> tuple[Any, ModelRef, dict[str, dict[str, float]], list[UpdateRef]]:
            updates, failed = load_updates(tracker.store, refs)
            excluded.update(failed)
            accepted, rejected = screen_updates(inputs.global_state, updates, fed.norm_bound)
            excluded.update({s: f"update rejected: {why}" for s, why in rejected.items()})
            require_quorum([u.site for u in accepted], fed.min_sites, excluded)
            agg = aggregate(fed.strategy, inputs.global_state, accepted, inputs.server_state,
                            **dict(fed.strategy_params))
            ref = ModelRef(tracker.store.put(agg.state, ctx.run_id, "global", meta={"round": r, "strategy": fed.strategy}),
                           state_sha256(agg.state))
            drift = {s: {"update_norm": d.update_norm, "cosine_to_mean": d.cosine_to_mean,
                         "bytes_sent": float(d.bytes_sent)} for s, d in site_drift(inputs.global_state, accepted).items()}
            ok_sites = {u.site for u in accepted}
            return agg, ref, drift, [x for x in refs if x.site in ok_sites]

        agg, new_ref, drift, accepted_refs = step("aggregate", screen_and_aggregate)
        clock.lap("screen+aggregate")
        say(f"round {r}: aggregated {len(accepted_refs)} update(s) ({fed.strategy}); validating")

        vals, val_missing = split_outcomes(runner.validate(ctx, eligible, new_ref) if eligible else {},
                                           "validation failed")
        clock.lap("validate")
        metrics = round_metrics(accepted_refs, vals, n_excluded=len(excluded), val_missing=val_missing, drift=drift)
        metrics["seconds"] = clock.total()
        tracker.log_round(ctx, {k: v for k, v in metrics.items() if math.isfinite(v)})
        lineage = build_lineage(cfg, inputs, ctx, accepted_refs, gates, agg.weights, metrics, excluded, val_missing,
                                new_ref)
        clock.lap("metrics")
        version, model_uri = step("register", lambda: tracker.register(ctx, agg.state, lineage, top_level(metrics)))
        clock.lap("register")
        ok = True
    finally:
        tracker.end_round(ctx, failed_sites=set(excluded), ok=ok)
    return RoundRecord(round_idx=r, metrics=metrics, excluded=excluded, weights=dict(agg.weights),
                       global_state=agg.state, global_ref=new_ref, server_state=dict(agg.server_state),
                       version=version, model_uri=model_uri, lineage=lineage, updates=tuple(accepted_refs),
                       phases=clock.phases)
