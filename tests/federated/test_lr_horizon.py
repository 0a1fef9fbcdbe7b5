"""``federated.lr_horizon_rounds``: one warmup+cosine over the planned rounds, however the run is split
into calls (``--resume`` with more rounds, ``ultrafed schedule``); 0 keeps the per-call schedule."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ultrafed.config import ConfigError, load_config
from ultrafed.engine.checkpoint import load_checkpoint, save_checkpoint
from ultrafed.engine.pretrain import lr_at, scaled_lr
from ultrafed.federated.client import round_lr_schedule, site_train, steps_per_epoch
from ultrafed.federated.coordinator import (
    CoordinatorState, HorizonError, checkpoint_path, load_latest, run_lr_horizon, save_round)

N = 6          # planned rounds of the run
PER_ROUND = 3  # optimiser steps per round
MIN_LR = 1e-7  # a floor that differs from 0, so "stays at min_lr" is visible


def _cfg(base, rounds: int, horizon: int, **more):
    return base.replace(**{"federated.rounds": rounds, "federated.lr_horizon_rounds": horizon,
                           "pretrain.warmup_epochs": 1, "pretrain.min_lr": MIN_LR, **more})


def _round_lrs(cfg, per_round: int, r: int) -> list[float]:
    """The LR of each step of round ``r``: train_local's ``lr_at(step_offset + i)`` on site_train's schedule."""
    s = round_lr_schedule(cfg, per_round, r)
    peak = scaled_lr(cfg.pretrain.base_lr, cfg.pretrain.batch_size)
    return [lr_at(s["step_offset"] + i, peak_lr=peak, warmup_steps=s["warmup_steps"], total_steps=s["total_steps"],
                  min_lr=cfg.pretrain.min_lr) for i in range(per_round)]


def _run_lrs(base, calls: list[int], horizon: int) -> list[float]:
    """Every step's LR of a run made of calls ending at ``calls`` (federated_pretrain sets
    ``federated.rounds`` to the target of the call)."""
    out, done = [], 0
    for target in calls:
        cfg = _cfg(base, target, horizon)
        for r in range(done, target):
            out += _round_lrs(cfg, PER_ROUND, r)
        done = target
    return out


def test_params_yaml_declares_the_horizon():
    assert load_config().federated.lr_horizon_rounds == 0  # today's behaviour by default
    assert load_config(overrides={"federated.lr_horizon_rounds": 12}).federated.lr_horizon_rounds == 12
    with pytest.raises(ConfigError, match="lr_horizon_rounds' must be an integer"):
        load_config(overrides={"federated.lr_horizon_rounds": 2.5})


def test_chunks_follow_one_schedule_given_the_horizon(tiny_cfg):
    one = _run_lrs(tiny_cfg, [N], N)
    for calls in ([2, 4, 6], [1, 5, 6], [3, 6]):
        assert _run_lrs(tiny_cfg, calls, N) == one, calls
    peak = scaled_lr(tiny_cfg.pretrain.base_lr, tiny_cfg.pretrain.batch_size)
    assert one[PER_ROUND - 1] == pytest.approx(peak)  # one round of warmup
    cosine = one[PER_ROUND - 1:]
    assert all(a > b for a, b in zip(cosine, cosine[1:]))  # never rises again
    assert MIN_LR < one[-1] < MIN_LR + 0.05 * (peak - MIN_LR)  # the last step is near the floor


def test_horizon_zero_keeps_the_per_call_schedule(tiny_cfg):
    assert _run_lrs(tiny_cfg, [N], 0) == _run_lrs(tiny_cfg, [N], N)  # one call: nothing changes
    chunked = _run_lrs(tiny_cfg, [2, 4, 6], 0)
    assert chunked != _run_lrs(tiny_cfg, [N], N)
    for end in (2, 4):  # each call stretches the cosine: the LR jumps back up where a call starts
        assert chunked[end * PER_ROUND] > chunked[end * PER_ROUND - 1]
    cfg = _cfg(tiny_cfg, 4, 0)
    assert round_lr_schedule(cfg, PER_ROUND, 3) == {"warmup_steps": PER_ROUND, "total_steps": 4 * PER_ROUND,
                                                   "step_offset": 3 * PER_ROUND}


def test_rounds_past_the_horizon_stay_at_min_lr(tiny_cfg):
    cfg = _cfg(tiny_cfg, N + 2, N)
    assert _round_lrs(cfg, PER_ROUND, N - 1)[-1] > MIN_LR
    assert _round_lrs(cfg, PER_ROUND, N) + _round_lrs(cfg, PER_ROUND, N + 1) == [MIN_LR] * (2 * PER_ROUND)
    with pytest.raises(ValueError, match="lr_horizon_rounds must be >= 0, got -1"):
        round_lr_schedule(_cfg(tiny_cfg, N, -1), PER_ROUND, 0)


# -- the real site_train: the LR it left in its saved AdamW state -----------------------------
@pytest.fixture
def store(tmp_path: Path):
    """A real MLflow store (sqlite + artifact folder) in tmp_path: weights travel through it."""
    import mlflow

    from ultrafed.tracking.runs import configure_tracking

    prev = mlflow.get_tracking_uri()
    configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"))
    yield
    mlflow.set_tracking_uri(prev)
    mlflow.set_registry_uri(prev)


def test_site_train_uses_one_schedule_across_calls(tmp_path: Path, store, tiny_cfg):
    from ultrafed.data.synth import make_cohort
    from ultrafed.models.mae import mae_from_config
    from ultrafed.tracking.runs import start_parent_run
    from ultrafed.tracking.store import get_state, put_state, state_sha256

    make_cohort(tmp_path / "cohort", sites=1, per_site=12, seed=3, size=64, progress=None)
    base = tiny_cfg.replace(**{"model.img_size": 32, "model.decoder_dim": 32, "model.decoder_heads": 1,
                               "pretrain.batch_size": 4, "federated.local_epochs": 1})
    parent = start_parent_run(base, experiment="lr-horizon")
    init = mae_from_config(base.model, seed=0).state_dict()
    uri = put_state(init, parent, "global")
    r = 2  # the third round: the middle of a 4-round horizon, and the last round of a call to 3 rounds

    def train(rounds: int, horizon: int, key: str) -> tuple[float, dict, int]:
        cfg = _cfg(base, rounds, horizon)
        res = site_train("site-0", cfg, round_idx=r, global_uri=uri, global_sha256=state_sha256(init),
                         update_run_id=parent, run_key=key, root=tmp_path / "cohort" / "site-0",
                         work_dir=tmp_path / "work")
        opt = load_checkpoint(tmp_path / "work" / "optimizer" / key / f"round-{r:04d}.pt")["optimizer"]
        per_round = steps_per_epoch(res["n_images"], 4)
        assert _round_lrs(cfg, per_round, r)[-1] == opt["param_groups"][0]["lr"]  # the schedule is the one it used
        return opt["param_groups"][0]["lr"], get_state(res["update_uri"]), per_round

    lr_one, w_one, per_round = train(4, 4, "one-call")  # rounds 0..3 in one call
    lr_chunk, w_chunk, _ = train(3, 4, "chunked")       # the call that continues a run to 3 rounds
    lr_old, _, _ = train(3, 0, "per-call")              # the same call without a horizon
    assert per_round > 1
    assert lr_chunk == lr_one and lr_old < lr_one       # the old call squeezes the cosine into 3 rounds
    assert all(torch.equal(w_one[k], w_chunk[k]) for k in w_one)


# -- resume keeps the run's horizon --------------------------------------------------------------
def _state(round_idx: int = 0, horizon: int = 0) -> CoordinatorState:
    return CoordinatorState(round_idx=round_idx, global_state={"w": torch.ones(2)}, lr_horizon_rounds=horizon)


def test_checkpoint_records_the_horizon(tmp_path: Path):
    save_round(tmp_path / "run", _state(1, horizon=N))
    assert load_latest(tmp_path / "run").lr_horizon_rounds == N
    # a checkpoint written before the setting existed: the run used the per-call schedule
    save_checkpoint(checkpoint_path(tmp_path / "old", 0), {"round_idx": 0, "global_state": {"w": torch.ones(2)}})
    assert load_latest(tmp_path / "old").lr_horizon_rounds == 0


def test_resume_keeps_the_run_horizon():
    assert run_lr_horizon(None, N, "fresh") == N           # a new run takes this call's
    assert run_lr_horizon(_state(horizon=N), 0, "nightly") == N  # 0 on resume: keep the run's
    assert run_lr_horizon(_state(horizon=N), N, "nightly") == N
    assert run_lr_horizon(_state(horizon=0), 0, "legacy") == 0


@pytest.mark.parametrize("recorded, given", [(N, 8), (0, 8)])
def test_resume_with_another_horizon_fails_in_one_line(recorded: int, given: int):
    with pytest.raises(HorizonError) as e:
        run_lr_horizon(_state(horizon=recorded), given, "nightly")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("run nightly: ")
    assert f"lr_horizon_rounds={given} given" in msg and f"started with {recorded}" in msg


def test_negative_horizon_is_refused_before_a_run_starts():
    with pytest.raises(HorizonError, match="run fresh: federated.lr_horizon_rounds must be >= 0"):
        run_lr_horizon(None, -3, "fresh")
