"""run_round and the coordinator loop with a fake site runner: no Prefect, no MLflow, milliseconds.

Prepare (sites that behave or fail in one stated way) / Execute (a round, or a run that is
killed and resumed) / Assert (exclusions, weights, metrics, lineage, closed runs, equal weights).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from ultrafed.config import load_config
from ultrafed.federated.coordinator import RunDirError, RunHooks, load_latest, pretrain_rounds
from ultrafed.federated.local import JsonlRoundTracker, MemoryStateStore
from ultrafed.federated.round import (GateOutcome, ModelRef, RoundContext, RoundFailed, RoundInputs, SiteFailure,
                                      UpdateRef, ValOutcome, round_metrics, run_round)
from ultrafed.federated.runners import InProcessRunner, LocalSite
from ultrafed.federated.transfer import state_sha256

N_IMAGES = {"a": 10, "b": 30, "c": 60}


def _state(v: float = 0.0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), float(v)), "b": torch.full((2,), float(v) / 2), "steps": torch.tensor(3)}


class FakeRunner:
    """Each site's "training" adds a delta fixed by (site, round); ``fail`` maps (action, site) to how it fails."""

    def __init__(self, store: MemoryStateStore, fail: dict[tuple[str, str], str] | None = None,
                 fail_rounds: set[int] | None = None) -> None:
        self.store, self.fail = store, dict(fail or {})
        self.fail_rounds = fail_rounds  # None: every round
        self.calls: list[tuple[str, int, tuple[str, ...]]] = []

    def _how(self, action: str, site: str, r: int) -> str | None:
        if self.fail_rounds is not None and r not in self.fail_rounds:
            return None
        return self.fail.get((action, site))

    def check(self, ctx: RoundContext, sites):
        self.calls.append(("check", ctx.round_idx, tuple(sites)))
        out = {}
        for s in sites:
            how = self._how("check", s, ctx.round_idx)
            if how == "crash":
                out[s] = SiteFailure("OSError: disk gone")
            else:
                out[s] = GateOutcome(site=s, status="fail" if how == "gate" else "pass",
                                     reasons=("3 unreadable file(s)",) if how == "gate" else (),
                                     n_images=N_IMAGES[s], manifest_md5=f"md5-{s}")
        return out

    def train(self, ctx: RoundContext, sites, model: ModelRef):
        self.calls.append(("train", ctx.round_idx, tuple(sites)))
        g = self.store.get(model.uri, model.sha256)
        out = {}
        for s in sites:
            how = self._how("train", s, ctx.round_idx)
            if how == "crash":
                out[s] = SiteFailure("RuntimeError: CUDA out of memory")
                continue
            if how == "timeout":
                out[s] = SiteFailure("TimeoutError: no answer within 5 s")
                continue
            delta = 0.1 * (ord(s) - ord("a") + 1) * (ctx.round_idx + 1)
            new = {k: (v + delta if v.is_floating_point() else v) for k, v in g.items()}
            if how == "nan":
                new["w"] = torch.full((4,), math.nan)
            uri = self.store.put(new, None, f"update-{s}")
            out[s] = UpdateRef(site=s, n_images=N_IMAGES[s], update_uri=uri, update_sha256=state_sha256(new),
                               metrics={"loss": 1.0 + delta})
        return out

    def validate(self, ctx: RoundContext, sites, model: ModelRef):
        self.calls.append(("validate", ctx.round_idx, tuple(sites)))
        g = self.store.get(model.uri, model.sha256)
        return {s: (SiteFailure("ConnectionError: site went away") if self._how("validate", s, ctx.round_idx)
                    else ValOutcome(site=s, val_loss=float(g["w"].mean()) + ord(s) % 3, n_val=N_IMAGES[s] // 10))
                for s in sites}


@pytest.fixture
def cfg():
    return load_config(overrides={"federated.min_sites": 2, "federated.strategy": "fedavg"})


def _inputs(store: MemoryStateStore, r: int = 0) -> RoundInputs:
    g = _state()
    return RoundInputs(round_idx=r, global_state=g, global_ref=ModelRef(store.put(g, None, "g"), state_sha256(g)),
                       run_key="run-1", code_commit="abc", params_hash="ph")


def _round(cfg, fail=None, sites=("a", "b", "c")):
    store = MemoryStateStore()
    tracker = JsonlRoundTracker(None, "t", store=store)
    runner = FakeRunner(store, fail)
    return run_round(cfg, list(sites), _inputs(store), runner, tracker), tracker, runner


def test_healthy_round_weights_by_images_and_records_lineage(cfg):
    rec, tracker, _ = _round(cfg)
    assert rec.excluded == {}
    assert rec.weights == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    # FedAvg of deltas 0.1/0.2/0.3 weighted 0.1/0.3/0.6 -> 0.25; integer buffers come through unchanged
    assert torch.allclose(rec.global_state["w"], torch.full((4,), 0.25)) and int(rec.global_state["steps"]) == 3
    # train loss weighted by training images, val loss by val images (one definition: round_metrics)
    assert rec.metrics["train_loss"] == pytest.approx((10 * 1.1 + 30 * 1.2 + 60 * 1.3) / 100)
    vals = {s: 0.25 + ord(s) % 3 for s in "abc"}
    assert rec.metrics["global_val_loss"] == pytest.approx((1 * vals["a"] + 3 * vals["b"] + 6 * vals["c"]) / 10)
    assert rec.metrics["sites_accepted"] == 3 and rec.metrics["sites_val_missing"] == 0
    lin = rec.lineage
    assert lin.round == 0 and lin.strategy == "fedavg" and lin.code_commit == "abc" and lin.params_hash == "ph"
    assert [s.site for s in lin.sites] == ["a", "b", "c"] and lin.sites[2].manifest_md5 == "md5-c"
    assert lin.sites[1].metrics["train_loss"] == pytest.approx(1.2) and lin.sites[1].gate_status == "passed"
    assert lin.extra["global_sha256"] == rec.global_ref.sha256 == state_sha256(rec.global_state)
    assert tracker.rounds[0]["status"] == "ok" and tracker.rounds[0]["failed_sites"] == []


@pytest.mark.parametrize("fail, site, reason", [
    ({("train", "b"): "crash"}, "b", "training failed: RuntimeError: CUDA out of memory"),
    ({("check", "b"): "gate"}, "b", "quality gate failed: 3 unreadable file(s)"),
    ({("check", "b"): "crash"}, "b", "quality check crashed: OSError: disk gone"),
    ({("train", "b"): "timeout"}, "b", "training failed: TimeoutError: no answer within 5 s"),
    ({("train", "b"): "nan"}, "b", "update rejected: "),
])
def test_a_failing_site_is_excluded_with_its_reason_and_the_rest_aggregate(cfg, fail, site, reason):
    rec, tracker, runner = _round(cfg, fail)
    assert set(rec.excluded) == {site} and rec.excluded[site].startswith(reason)
    assert set(rec.weights) == {"a", "c"} and sum(rec.weights.values()) == pytest.approx(1.0)
    assert {s.site for s in rec.lineage.sites} == {"a", "c"} and rec.lineage.excluded == rec.excluded
    assert rec.metrics["sites_excluded"] == 1 and tracker.rounds[0]["failed_sites"] == [site]
    if ("check", "b") in fail:  # a site that fails its gate is neither trained nor validated
        assert ("train", 0, ("a", "c")) in runner.calls and ("validate", 0, ("a", "c")) in runner.calls
    assert torch.isfinite(rec.global_state["w"]).all()


def test_a_missed_validation_is_recorded_not_silent(cfg):
    rec, _, _ = _round(cfg, {("validate", "c"): "gone"})
    assert rec.excluded == {} and rec.metrics["sites_val_missing"] == 1 and rec.metrics["sites_validated"] == 2
    assert rec.lineage.extra["val_missing"] == {"c": "validation failed: ConnectionError: site went away"}
    assert "val_loss.c" not in rec.metrics


def test_below_quorum_fails_loudly_registers_nothing_and_closes_the_round(cfg):
    with pytest.raises(RoundFailed, match=r"only 1 usable site update\(s\), need at least 2 \(a: training failed"):
        _round(cfg, {("train", "a"): "crash", ("check", "b"): "gate"})
    store = MemoryStateStore()
    tracker = JsonlRoundTracker(None, "t", store=store)
    with pytest.raises(RoundFailed):
        run_round(cfg, ["a", "b"], _inputs(store), FakeRunner(store, {("train", "a"): "crash"}), tracker)
    assert tracker.rounds == [{"kind": "round", "run": "t", "round": 0, "status": "failed", "failed_sites": ["a"]}]


def test_all_sites_excluded_names_every_one(cfg):
    fail = {("check", "a"): "gate", ("train", "b"): "crash", ("train", "c"): "nan"}
    with pytest.raises(RoundFailed) as e:
        _round(cfg, fail)
    msg = str(e.value)
    assert "only 0 usable" in msg and all(f"{s}: " in msg for s in "abc") and "\n" not in msg


def test_round_metrics_ignore_sites_without_val_images():
    refs = [UpdateRef("a", 10, "u", "s", {"loss": 2.0}), UpdateRef("b", 30, "u", "s", {"loss": 1.0})]
    m = round_metrics(refs, {"a": ValOutcome("a", 4.0, 0), "b": ValOutcome("b", 1.0, 5)}, n_excluded=0,
                      val_missing=(), drift={})
    assert m["train_loss"] == pytest.approx(1.25) and m["global_val_loss"] == pytest.approx(1.0)


def test_in_process_runner_turns_a_hung_site_into_a_timeout(cfg):
    runner = InProcessRunner(cfg, [LocalSite("a"), LocalSite("b")], MemoryStateStore(), timeout_s=0.3)
    t0 = time.perf_counter()
    out = runner._many(["a", "b"], lambda st: time.sleep(5) if st.id == "a" else {"site": "b"}, dict)
    assert time.perf_counter() - t0 < 2
    assert isinstance(out["a"], SiteFailure) and out["a"].reason.startswith("TimeoutError") and out["b"] == {"site": "b"}


# -- the loop: checkpoints and exact resume after each kind of failure ----------------------------
class Killed(BaseException):
    """The coordinator process dying mid-run (not an Exception: nothing may swallow it)."""


def _run(cfg, run_dir: Path, rounds: int, fail: dict, fail_rounds: set[int], *, kill_at: int | None = None,
         resume: bool = False):
    store = MemoryStateStore()
    runner = FakeRunner(store, fail, fail_rounds)

    def play(c, inputs: RoundInputs):
        if kill_at is not None and inputs.round_idx == kill_at:
            raise Killed()
        return run_round(c, ["a", "b", "c"], inputs, runner, JsonlRoundTracker(None, "t", store=store))

    hooks = RunHooks(store=store, start_run=lambda c: "parent-1", play_round=play)
    return pretrain_rounds(cfg, run_dir=run_dir, rounds=rounds, resume=resume, hooks=hooks, code_commit="abc",
                           init_state=_state(5.0), say=lambda _m: None)


@pytest.mark.parametrize("fail", [{("train", "b"): "crash"}, {("check", "c"): "gate"}, {("train", "a"): "timeout"},
                                  {("train", "b"): "nan"}, {("validate", "a"): "gone"}],
                         ids=["crash", "gate", "timeout", "rejected", "missed-validation"])
def test_resume_after_a_round_with_a_failure_equals_an_uninterrupted_run(cfg, tmp_path, fail):
    reference = _run(cfg, tmp_path / "ref", 4, fail, {1})
    with pytest.raises(Killed):
        _run(cfg, tmp_path / "killed", 4, fail, {1}, kill_at=2)
    assert load_latest(tmp_path / "killed").round_idx == 1
    resumed = _run(cfg, tmp_path / "killed", 4, fail, {1}, resume=True)
    assert resumed.round_idx == reference.round_idx == 3
    assert all(torch.equal(resumed.global_state[k], reference.global_state[k]) for k in reference.global_state)
    assert [h["excluded"] for h in resumed.history] == [h["excluded"] for h in reference.history]


@pytest.mark.parametrize("fail", [{("train", "a"): "crash", ("train", "b"): "crash"},
                                  {("check", "a"): "gate", ("check", "b"): "gate", ("check", "c"): "gate"}],
                         ids=["below-quorum", "all-excluded"])
def test_resume_after_a_failed_round_continues_from_the_last_good_one(cfg, tmp_path, fail):
    reference = _run(cfg, tmp_path / "ref", 3, {}, set())
    with pytest.raises(RoundFailed):
        _run(cfg, tmp_path / "run", 3, fail, {1})
    assert load_latest(tmp_path / "run").round_idx == 0  # the failed round left no checkpoint
    resumed = _run(cfg, tmp_path / "run", 3, {}, set(), resume=True)  # the sites are back
    assert all(torch.equal(resumed.global_state[k], reference.global_state[k]) for k in reference.global_state)


def test_a_run_folder_with_rounds_needs_resume_and_rounds_must_be_positive(cfg, tmp_path):
    _run(cfg, tmp_path / "r", 1, {}, set())
    with pytest.raises(RunDirError, match="already holds rounds; pass --resume"):
        _run(cfg, tmp_path / "r", 2, {}, set())
    with pytest.raises(RunDirError, match="rounds must be >= 1, got 0"):
        _run(cfg, tmp_path / "new", 0, {}, set())
