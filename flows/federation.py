"""Local federation rehearsal: Prefect server, MLflow server and one worker per site on 127.0.0.1.

Every process is started in its own session with a PID file under ``<home>/federation``
(``$ULTRAFED_HOME``, else ``.ultrafed``) and stopped by that PID (never by name). The MLflow
server is started and stopped by :mod:`ultrafed.tracking.server` (its files in
``<home>/federation/mlflow``). A hospital runs only the worker part on its own machine (see
docs/FEDERATION.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from ultrafed.paths import REPO_ROOT, ultrafed_home
from ultrafed.procs import group_exists, stop_group
from ultrafed.tracking.server import free_port, start_server, stop_server

BIN = Path(sys.executable).parent
MLFLOW = "mlflow-server"  # the MLflow server's name among the rehearsal's processes


def state_dir() -> Path:
    d = ultrafed_home() / "federation"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{log}: process exited with {proc.returncode} before {url} answered: "
                               + (log.read_text()[-300:].strip().splitlines() or [""])[-1])
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s (log: {log})")


def start_process(name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` in a new session, logging to ``<state>/<name>.log``, PID in ``<name>.pid``."""
    d = state_dir()
    log = open(d / f"{name}.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, cwd=REPO_ROOT, start_new_session=True)
    (d / f"{name}.pid").write_text(str(proc.pid))
    return proc


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"})
    return env


def start_prefect_server(port: int) -> tuple[subprocess.Popen, str]:
    env = base_env()
    env["PREFECT_HOME"] = str(state_dir() / "prefect-server")
    env["PREFECT_SERVER_API_HOST"] = "127.0.0.1"
    env["PREFECT_UI_ENABLED"] = "false"
    proc = start_process("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                            "--port", str(port), "--analytics-off"], env)
    url = f"http://127.0.0.1:{port}/api"
    _wait_http(f"{url}/health", 180, proc, state_dir() / "prefect-server.log")
    return proc, url


def start_mlflow_server(port: int) -> tuple[int, str]:
    """The rehearsal's MLflow server (sqlite, artifact proxying); (pid of its process group, URL)."""
    handle = start_server(state_dir() / "mlflow", port=port)
    return handle.pid, handle.url


def deploy_site(site_id: str, api_url: str) -> None:
    """Work pool ``site-<id>`` (process type) and the site flow deployed to it."""
    env = base_env()
    env["PREFECT_API_URL"] = api_url
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", f"site-{site_id}", "--type", "process", "--overwrite"],
                   env=env, check=True, capture_output=True, cwd=REPO_ROOT, timeout=120)
    code = ("import flows; from flows.site import site_job; "
            f"site_job.from_source(source={str(REPO_ROOT)!r}, entrypoint='flows/site.py:site_job')"
            f".deploy(name='site-{site_id}', work_pool_name='site-{site_id}', print_next_steps=False, build=False, push=False)")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, cwd=REPO_ROOT, timeout=180)


def start_worker(site_id: str, api_url: str, mlflow_url: str, data_root: str, work_dir: str) -> subprocess.Popen:
    """A site's worker: the ONLY process that knows the site's data root."""
    env = base_env()
    env.update({"PREFECT_API_URL": api_url, "MLFLOW_TRACKING_URI": mlflow_url, "ULTRAFED_SITE_ROOT": data_root,
                "ULTRAFED_SITE_WORKDIR": work_dir, "PREFECT_HOME": str(state_dir() / f"worker-{site_id}")})
    return start_process(f"worker-{site_id}", [str(BIN / "prefect"), "worker", "start", "--pool", f"site-{site_id}",
                                               "--type", "process", "--limit", "2"], env)


def up(sites: dict[str, str], *, prefect_port: int | None = None, mlflow_port: int | None = None) -> dict[str, Any]:
    """Start everything for a local rehearsal; ``sites`` maps site id -> that site's data root."""
    if (state_dir() / "federation.json").exists() and status()["running"]:
        raise RuntimeError("a federation is already up (ultrafed federation down first)")
    prefect_proc, api = start_prefect_server(prefect_port or free_port())
    mlflow_pid, ml = start_mlflow_server(mlflow_port or free_port())
    info: dict[str, Any] = {"prefect_api_url": api, "mlflow_tracking_uri": ml,
                            "pids": {"prefect-server": prefect_proc.pid, MLFLOW: mlflow_pid}, "sites": []}
    (state_dir() / "federation.json").write_text(json.dumps(info, indent=2))
    for sid, root in sites.items():
        deploy_site(sid, api)
        w = start_worker(sid, api, ml, root, str(state_dir() / f"site-{sid}"))
        info["pids"][f"worker-{sid}"] = w.pid
        info["sites"].append(sid)
        (state_dir() / "federation.json").write_text(json.dumps(info, indent=2))
    return info


def status() -> dict[str, Any]:
    f = state_dir() / "federation.json"
    if not f.exists():
        return {"running": {}, "info": None}
    info = json.loads(f.read_text())
    running = {}
    for name, pid in info["pids"].items():
        if group_exists(pid, eperm="gone"):
            running[name] = pid
    return {"running": running, "info": info}


def down() -> list[str]:
    """Stop every process of the rehearsal by its PID (workers first: they need two SIGINTs).

    A bare PID file is our only record of the Prefect server and the workers, so a group we may
    not signal is someone else's (reused PID) and is left alone: ``eperm="gone"`` (see
    :mod:`ultrafed.procs`). The MLflow server is stopped by :func:`ultrafed.tracking.server.stop_server`,
    which checks the server's identity first.
    """
    st = status()
    if st["info"] is None:
        return []
    stopped = []
    for name, pid in sorted(st["info"]["pids"].items(), key=lambda kv: not kv[0].startswith("worker")):
        if name == MLFLOW:
            done = stop_server(state_dir() / "mlflow")
        else:
            done = stop_group(pid, eperm="gone", interrupts=2 if name.startswith("worker") else 1)
        if done:
            stopped.append(name)
    (state_dir() / "federation.json").unlink(missing_ok=True)
    return stopped
