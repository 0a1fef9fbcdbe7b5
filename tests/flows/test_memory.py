"""The coordinator's memory stays flat over rounds: nothing per round (states, futures, MLflow
clients, Prefect results) may pile up in the process that runs them all."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_rss_after_round_10_within_10_percent_of_round_2(flow_cfg, cohort, flow_home: Path):
    from flows.pretrain import run_pretrain

    cfg = dict(flow_cfg, federated={**flow_cfg["federated"], "rounds": 10, "local_epochs": 1})
    sites = [dict(s, work_dir=str(flow_home / "mem" / s["id"])) for s in cohort[:2]]
    out = run_pretrain(cfg, sites, mode="embedded", rounds=10, resume=False, run_name="memory-flat")
    rss = [h["rss_mb"] for h in out["history"]]
    assert len(rss) == 10 and all(r > 0 for r in rss)
    growth = (rss[9] - rss[1]) / rss[1]
    print("rss per round (MB): " + ", ".join(f"{r:.0f}" for r in rss) + f"; round 10 vs 2: {growth:+.1%}")
    assert abs(growth) <= 0.10, f"RSS went from {rss[1]:.0f} MB (round 2) to {rss[9]:.0f} MB (round 10)"
