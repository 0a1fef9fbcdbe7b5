"""The federated round DAG in embedded mode: real Prefect (ephemeral), real MLflow (sqlite)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def _run(cfg: dict, sites: list[dict], run_name: str, **kw):
    from flows.pretrain import run_pretrain

    return run_pretrain(cfg, sites, mode="embedded", rounds=kw.pop("rounds", None), resume=kw.pop("resume", False),
                        run_name=run_name)


def test_two_rounds_register_two_versions_with_lineage(flow_cfg, cohort):
    import mlflow

    out = _run(flow_cfg, cohort[:2], "two-rounds")
    assert [h["round"] for h in out["history"]] == [0, 1]
    v1, v2 = (h["version"] for h in out["history"])
    assert v2 == v1 + 1
    m = out["history"][-1]["metrics"]
    assert m["sites_accepted"] == 2 and np.isfinite(m["global_val_loss"]) and np.isfinite(m["train_loss"])
    weights = out["history"][-1]["weights"]
    assert set(weights) == {s["id"] for s in cohort[:2]} and sum(weights.values()) == pytest.approx(1.0)
    # the registered encoder loads with plain MLflow and embeds an image
    enc = mlflow.pytorch.load_model(out["model_uri"])
    tokens = enc(torch.rand(1, 1, 64, 64))
    assert tokens.shape[0] == 1 and torch.isfinite(tokens).all()


def test_broken_site_is_excluded_with_reason(flow_cfg, cohort, flow_home: Path):
    broken = flow_home / "broken-site"
    (broken / "images").mkdir(parents=True, exist_ok=True)
    for i in range(3):  # unreadable files only: the gate must fail this site, not the round
        (broken / "images" / f"x{i}.png").write_bytes(b"not a png")
    sites = cohort[:2] + [{"id": "broken", "root": str(broken)}]
    out = _run(dict(flow_cfg, federated={**flow_cfg["federated"], "rounds": 1}), sites, "broken-site")
    rec = out["history"][0]
    assert "broken" in rec["excluded"] and "quality gate failed" in rec["excluded"]["broken"]
    assert rec["metrics"]["sites_accepted"] == 2


def test_quorum_fails_loudly_below_min_sites(flow_cfg, cohort, flow_home: Path):
    from ultrafed.federated.coordinator import RoundFailed

    empty = flow_home / "empty-site"
    empty.mkdir(exist_ok=True)
    cfg = dict(flow_cfg, federated={**flow_cfg["federated"], "rounds": 1, "min_sites": 2})
    with pytest.raises(RoundFailed, match="need at least 2"):
        _run(cfg, cohort[:1] + [{"id": "empty", "root": str(empty)}], "quorum")


def test_resume_after_crash_gives_identical_weights(flow_cfg, cohort, flow_home: Path):
    from ultrafed.federated.coordinator import load_latest
    from flows.pretrain import runs_home

    cfg = dict(flow_cfg, federated={**flow_cfg["federated"], "rounds": 3})
    sites_a = [dict(s, work_dir=str(flow_home / "wa" / s["id"])) for s in cohort[:2]]
    sites_b = [dict(s, work_dir=str(flow_home / "wb" / s["id"])) for s in cohort[:2]]
    full = _run(cfg, sites_a, "resume-full")
    # crash: stop after round 1 by running only 2 rounds, then delete the last checkpoint to mimic a kill
    _run(cfg, sites_b, "resume-cut", rounds=2)
    (runs_home() / "resume-cut" / "round-0001.ckpt").write_bytes(b"half-written")  # torn checkpoint
    resumed = _run(cfg, sites_b, "resume-cut", resume=True)
    a = load_latest(Path(full["run_dir"])).global_state
    b = load_latest(Path(resumed["run_dir"])).global_state
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"
    assert [h["round"] for h in resumed["history"]] == [0, 1, 2]
    shutil.rmtree(flow_home / "wa", ignore_errors=True)


def test_site_whose_training_crashes_is_excluded_and_round_goes_on(flow_cfg, cohort, monkeypatch):
    from ultrafed.federated import client

    real_train = client.ACTIONS["train"]

    def crashing_train(site_id, **kw):  # fault injection: this site's worker dies mid-training
        if site_id == cohort[2]["id"]:
            raise MemoryError("simulated crash of the site's training process")
        return real_train(site_id, **kw)

    monkeypatch.setitem(client.ACTIONS, "train", crashing_train)
    out = _run(dict(flow_cfg, federated={**flow_cfg["federated"], "rounds": 1}), cohort, "crashing-site")
    rec = out["history"][0]
    assert rec["excluded"] == {cohort[2]["id"]: "training failed: MemoryError: simulated crash of the site's training process"}
    assert rec["metrics"]["sites_accepted"] == 2
    assert set(rec["weights"]) == {s["id"] for s in cohort[:2]}
