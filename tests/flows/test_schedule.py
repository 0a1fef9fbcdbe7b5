"""``ultrafed schedule``: a cron deployment on a real Prefect server whose runs never overlap and
each continue the same run. Bad input fails with one line before anything is deployed."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

TINY = ["model.img_size=32", "model.decoder_depth=1", "model.decoder_dim=32", "model.decoder_heads=1",
        "pretrain.batch_size=4", "federated.local_epochs=1", "federated.min_sites=2"]
SET_ARGS = [a for kv in TINY for a in ("--set", kv)]


def _cli_error(argv: list[str]) -> str:
    from flows.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert "\n" not in msg.strip(), msg
    return msg


@pytest.mark.parametrize("argv, env, expected", [
    (["--cron", "0 2 * * *", "--rounds-per-run", "1"], None, "set PREFECT_API_URL"),
    (["--cron", "0 2 * * *", "--rounds-per-run", "1"], "http://127.0.0.1:9/api", "not reachable"),
    (["--cron", "0 25 * * *", "--rounds-per-run", "1"], None, "Invalid cron string"),
    (["--cron", "0 2 * * *", "--rounds-per-run", "0"], None, "--rounds-per-run must be >= 1"),
    (["--cron", "0 2 * * *", "--rounds-per-run", "1", "--name", "../etc"], None, "--name '../etc'"),
    (["--cron", "0 2 * * *", "--rounds-per-run", "1", "--timezone", "Mars/Base"], None, "Invalid timezone"),
    (["--cron", "0 2 * * *", "--rounds-per-run", "1", "--sites", "/nonexistent/sites.yaml"], None,
     "/nonexistent/sites.yaml: sites file not found"),
    (["--cron", "0 2 * * *", "--rounds-per-run", "1", "--set", "model.no_such_key=1"], None, "unknown key"),
    (["--cron", "0 2 * * *", "--rounds-per-run", "1", "--total-rounds", "0"], None, "--total-rounds must be >= 1"),
    (["--cron", "0 2 * * *", "--rounds-per-run", "1", "--total-rounds", "5", "--set", "federated.lr_horizon_rounds=4"],
     None, "--total-rounds 5 and federated.lr_horizon_rounds=4 disagree"),
])
def test_bad_input_is_one_line_before_deploying(monkeypatch, argv, env, expected):
    if env:
        monkeypatch.setenv("PREFECT_API_URL", env)
    else:
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
    msg = _cli_error(["schedule", *argv])
    assert msg.startswith("ultrafed schedule: ") and expected in msg, msg


# -- one LR schedule over the planned total ------------------------------------------------------
def test_total_rounds_defaults_to_the_horizon_then_the_rounds():
    from flows.schedule import planned_total
    from ultrafed.config import load_config

    cfg = load_config(overrides={"federated.rounds": 4})
    assert planned_total(cfg, None) == 4 and planned_total(cfg, 9) == 9
    assert planned_total(cfg.replace(**{"federated.lr_horizon_rounds": 7}), None) == 7


@pytest.mark.parametrize("done, per_run, total, target", [(0, 2, 5, 2), (4, 2, 5, 5), (5, 2, 5, 5), (3, 2, None, 5)])
def test_a_scheduled_run_never_trains_past_the_total(done, per_run, total, target):
    from flows.schedule import chunk_target

    assert chunk_target(done, per_run, total) == target


def _run_with_horizon(name: str, horizon: int) -> None:
    import torch

    from flows.pretrain import runs_home
    from ultrafed.federated.coordinator import CoordinatorState, save_round

    save_round(runs_home() / name, CoordinatorState(round_idx=0, global_state={"w": torch.ones(1)}, registered_version=1,
                                                    history=[{"model_uri": "models:/m/1"}], lr_horizon_rounds=horizon))


@pytest.mark.parametrize("name, recorded, expected", [
    ("kept-6", 6, "run kept-6 ("), ("legacy-0", 0, "no fixed LR horizon (federated.lr_horizon_rounds 0)")])
def test_another_total_for_an_existing_run_fails_before_deploying(monkeypatch, name, recorded, expected):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    _run_with_horizon(name, recorded)
    argv = ["schedule", "--cron", "0 2 * * *", "--rounds-per-run", "1", "--name", name, "--total-rounds"]
    msg = _cli_error([*argv, "8"])
    assert msg.startswith("ultrafed schedule: --total-rounds 8: ") and expected in msg and "another --name" in msg, msg
    if recorded:  # the run's own total passes this check (and stops at the missing server)
        msg = _cli_error([*argv, "6"])
        assert "set PREFECT_API_URL" in msg, msg


@pytest.mark.timeout(300)
def test_a_run_with_all_its_rounds_trains_no_more(flow_home: Path):
    from flows.schedule import scheduled_pretrain
    from ultrafed.federated.coordinator import load_latest

    _run_with_horizon("all-done", 1)
    out = scheduled_pretrain(sites_file="/nonexistent/sites.yaml", rounds_per_run=2, run_name="all-done",
                             total_rounds=1)  # no sites file: it must not get that far
    assert out["rounds_before"] == out["rounds_after"] == 1 and out["model_uri"] == "models:/m/1"
    assert load_latest(flow_home / "runs" / "all-done").round_idx == 0


# -- the real thing: server, deployment, scheduler, one process worker -------------------------
def _cron_far_from_now(offset_h: int) -> tuple[str, int, int]:
    """A daily cron ``offset_h`` hours away, so the worker never picks its runs during the test."""
    now = datetime.now(timezone.utc)
    hour, minute = (now.hour + offset_h) % 24, 17
    return f"{minute} {hour} * * *", hour, minute


def _poll(fn, timeout_s: float, what: str, every: float = 0.5):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        out = fn()
        if out:
            return out
        time.sleep(every)
    raise TimeoutError(f"{what} within {timeout_s:.0f} s")


@pytest.mark.federation
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_schedule_deploys_cron_and_runs_never_overlap(flow_home: Path, tmp_path: Path, monkeypatch):
    from flows import federation as fed
    from ultrafed.data.synth import make_cohort
    from ultrafed.procs import stop_group

    make_cohort(tmp_path / "cohort", sites=2, per_site=8, seed=5, size=64, progress=None)
    sites_yaml = tmp_path / "sites.yaml"
    sites_yaml.write_text("sites:\n  - id: site-0\n    root: cohort/site-0\n  - id: site-1\n    root: cohort/site-1\n")
    tracking = f"sqlite:///{tmp_path / 'sched-mlflow.db'}"
    name = "sched-it"
    # a waiting run retries its slot every 2 s (default 30 s), the scheduler fills new deployments within ~5 s
    monkeypatch.setenv("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "2")
    server, url = fed.start_prefect_server(fed.free_port())
    worker = None
    try:
        env = fed.base_env()
        env.update({"PREFECT_API_URL": url, "ULTRAFED_HOME": str(flow_home),
                    "PREFECT_HOME": str(tmp_path / "prefect-cli")})
        cron_a, _, _ = _cron_far_from_now(9)
        cli = subprocess.run([sys.executable, "-m", "flows.cli", "schedule", "--cron", cron_a, "--rounds-per-run", "1",
                              "--sites", str(sites_yaml), "--name", name, "--tracking-uri", tracking, *SET_ARGS],
                             env=env, capture_output=True, text=True, timeout=300, cwd=fed.REPO_ROOT)
        assert cli.returncode == 0, cli.stderr[-2000:]
        assert f"scheduled-pretrain/{name}" in cli.stdout

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.settings import PREFECT_API_URL, temporary_settings

        monkeypatch.setenv("PREFECT_API_URL", url)
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(f"scheduled-pretrain/{name}")
            assert [s.schedule.cron for s in dep.schedules] == [cron_a]
            assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
            assert dep.work_pool_name == "ultrafed-coordinator" and dep.parameters["rounds_per_run"] == 1
            assert dep.parameters["total_rounds"] == 4  # params federated.rounds: the runs' one LR schedule
            assert dep.job_variables["env"]["ULTRAFED_HOME"] == str(flow_home)

            # `schedule` again with another cron updates the same deployment (no second schedule)
            from flows.commands.pretrain import parse_overrides
            from flows.schedule import deploy_schedule

            cron_b, hour_b, minute_b = _cron_far_from_now(13)
            assert deploy_schedule(cron=cron_b, rounds_per_run=1, name=name, sites_file=str(sites_yaml),
                                   overrides=parse_overrides(TINY), tracking_uri=tracking) == dep.id
            dep = client.read_deployment_by_name(f"scheduled-pretrain/{name}")
            assert [s.schedule.cron for s in dep.schedules] == [cron_b]

            def runs():
                return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))

            # the server's scheduler creates the upcoming runs of the new cron (and drops the old ones)
            auto = _poll(lambda: [r for r in runs() if r.auto_scheduled] or None, 60, "no scheduled runs")
            now = datetime.now(timezone.utc)
            for r in auto:
                t = r.expected_start_time
                assert r.state.is_scheduled() and t > now and (t.hour, t.minute) == (hour_b, minute_b), (r.name, t)

            # two runs right now, one worker: they must queue, never run side by side
            from prefect.deployments import run_deployment

            ids = [run_deployment(f"scheduled-pretrain/{name}", timeout=0).id for _ in range(2)]
            wenv = dict(env, PREFECT_HOME=str(tmp_path / "prefect-worker"), PREFECT_WORKER_QUERY_SECONDS="1")
            worker = fed.start_process("coordinator-worker", [str(fed.BIN / "prefect"), "worker", "start", "--pool",
                                                              "ultrafed-coordinator", "--type", "process"], wenv)
            seen: set[tuple[str, str]] = set()

            def both_final():
                states = [client.read_flow_run(i).state for i in ids]
                pair = tuple(f"{s.type.value}/{s.name}" for s in states)
                seen.add(pair)
                assert [s.type.value for s in states].count("RUNNING") <= 1, f"two runs at once: {pair}"
                return all(s.is_final() for s in states)

            _poll(both_final, 420, "the two runs did not finish", every=0.3)
            first, second = sorted((client.read_flow_run(i) for i in ids), key=lambda r: r.start_time)
            assert first.state.is_completed() and second.state.is_completed(), (first.state, second.state)
            assert second.start_time >= first.end_time, "the second run started before the first ended"
            waiting = {p for p in seen if "RUNNING/Running" in p and "SCHEDULED/AwaitingConcurrencySlot" in p}
            assert waiting, f"never saw one run wait for the other's slot: {sorted(seen)}"
            assert all(r.state.is_scheduled() for r in runs() if r.auto_scheduled)  # cron runs untouched
    finally:
        if worker is not None:
            stop_group(worker.pid, eperm="gone", interrupts=2)
        stop_group(server.pid, eperm="gone", interrupts=1)

    # each run added one round to the SAME run: round 0 then round 1, one MLflow parent run
    from ultrafed.federated.coordinator import load_latest

    st = load_latest(flow_home / "runs" / name)
    assert st is not None and st.round_idx == 1 and st.lr_horizon_rounds == 4
    assert [h["round"] for h in st.history] == [0, 1]
    assert st.history[1]["version"] == st.history[0]["version"] + 1 == st.registered_version
