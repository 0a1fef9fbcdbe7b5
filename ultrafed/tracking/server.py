"""Start and stop a local ``mlflow server`` (federation mode) by PID, never by name.

The one launcher of an MLflow server: ``ultrafed federation up`` (``flows/federation.py``) starts
its server here too.

The server keeps runs and the registry in sqlite and proxies artifacts (``--serve-artifacts``),
so sites push updates and pull global weights over HTTP without seeing the coordinator's disk.
It runs in its own session (process group); :func:`stop_server` signals exactly that group.
Optional basic auth uses MLflow's own ``basic-auth`` app (see ``mlflow/README.md``).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ultrafed import procs
from ultrafed.paths import ultrafed_home

PID_FILE = "server.json"
LOG_FILE = "server.log"


class ServerError(RuntimeError):
    """The server did not start, or a pid file does not describe a server we started."""


@dataclass(frozen=True)
class ServerHandle:
    url: str  # http://127.0.0.1:<port>
    pid: int  # leader of the server's own process group
    root: str  # folder with server.db, artifacts/, server.json, server.log
    backend_uri: str
    artifacts: str
    auth: bool
    started_at: float

    @property
    def pid_file(self) -> Path:
        return Path(self.root) / PID_FILE


def default_root() -> Path:
    """``<home>/mlflow-server``: the server's folder when the caller names none (home read now, not at import)."""
    return ultrafed_home() / "mlflow-server"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def auth_available() -> bool:
    """MLflow's basic-auth app needs the ``mlflow[auth]`` extra (Flask-WTF for CSRF)."""
    import importlib.util

    return importlib.util.find_spec("flask_wtf") is not None


def _auth_config(root: Path, default_permission: str) -> Path:
    """MLflow basic-auth ini: users live in their own sqlite beside the tracking db."""
    ini = root / "basic_auth.ini"
    ini.write_text("[mlflow]\n"
                   f"default_permission = {default_permission}\n"
                   f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
                   "admin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return ini


def start_server(root: str | Path | None = None, *, host: str = "127.0.0.1", port: int | None = None,
                 auth: bool = False, admin_password: str | None = None,
                 default_permission: str = "READ", timeout_s: float = 180.0) -> ServerHandle:
    """Start ``mlflow server`` with a sqlite backend and artifact proxying; wait until healthy.

    ``auth=True`` enables basic auth; the admin password comes from ``admin_password`` or
    ``$MLFLOW_AUTH_ADMIN_PASSWORD`` and is passed through the environment, never written.
    Refuses to start a second server on the same ``root`` while the first one is alive.
    """
    rootp = Path(root) if root else default_root()
    rootp.mkdir(parents=True, exist_ok=True)
    existing = read_handle(rootp)
    if existing is not None and _alive(existing):
        raise ServerError(f"{rootp / PID_FILE}: a server is already running (pid {existing.pid}, {existing.url})")
    port = port or free_port(host)
    backend = f"sqlite:///{rootp / 'server.db'}"
    artifacts = rootp / "artifacts"
    artifacts.mkdir(exist_ok=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", backend, "--serve-artifacts", "--artifacts-destination", str(artifacts),
           "--workers", "1"]
    if auth:
        password = admin_password or os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
        if not password:
            raise ServerError("basic auth needs an admin password (admin_password= or $MLFLOW_AUTH_ADMIN_PASSWORD)")
        if not auth_available():
            raise ServerError("basic auth needs MLflow's auth extra (Flask-WTF): pip install 'mlflow[auth]'")
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(_auth_config(rootp, default_permission))
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = password
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", os.urandom(16).hex())
        cmd += ["--app-name", "basic-auth"]
    log = open(rootp / LOG_FILE, "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=rootp,
                            start_new_session=True)
    log.close()
    handle = ServerHandle(f"http://{host}:{port}", proc.pid, str(rootp), backend, str(artifacts), auth, time.time())
    (rootp / PID_FILE).write_text(json.dumps(asdict(handle), indent=2))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _log_tail(rootp)
            (rootp / PID_FILE).unlink(missing_ok=True)
            raise ServerError(f"mlflow server exited with code {proc.returncode}: {tail}")
        if _healthy(handle.url):
            return handle
        time.sleep(0.5)
    stop_server(handle)
    raise ServerError(f"mlflow server at {handle.url} not healthy after {timeout_s:.0f} s (log: {rootp / LOG_FILE})")


def _log_tail(root: Path) -> str:
    try:
        lines = [ln for ln in (root / LOG_FILE).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "empty log"


def read_handle(root: str | Path | None = None) -> ServerHandle | None:
    """The handle recorded in ``<root>/server.json`` (None if there is none or it is unreadable)."""
    p = (Path(root) if root else default_root()) / PID_FILE
    try:
        return ServerHandle(**json.loads(p.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _alive(handle: ServerHandle) -> bool:
    """The recorded pid still runs and is our mlflow server (guards against pid reuse)."""
    import psutil

    try:
        p = psutil.Process(handle.pid)
        cmd = " ".join(p.cmdline())
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE and "mlflow" in cmd and "server" in cmd \
            and p.create_time() <= handle.started_at + 5
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def server_status(root: str | Path | None = None) -> dict | None:
    """Recorded handle plus liveness and health, or None if no server was started here."""
    h = read_handle(root)
    if h is None:
        return None
    alive = _alive(h)
    return {**asdict(h), "alive": alive, "healthy": alive and _healthy(h.url)}


def stop_server(handle: ServerHandle | str | Path | None = None, timeout_s: float = 20.0) -> bool:
    """SIGTERM the server's process group, SIGKILL it after ``timeout_s``; remove the pid file.

    Accepts a handle or a root folder. Returns False if nothing of ours was running.
    The group counts as ours once :func:`_alive` has checked the server's identity, so a group
    we may not signal counts as still there (``eperm="present"``, see :mod:`ultrafed.procs`).
    """
    h = handle if isinstance(handle, ServerHandle) else read_handle(handle)
    if h is None:
        return False
    running = _alive(h)
    if running:
        if os.getpgid(h.pid) != h.pid:  # start_new_session made the server its group leader; else not ours
            raise ServerError(f"pid {h.pid} is not the leader of its process group; refusing to signal it")
        procs.stop_group(h.pid, eperm="present", timeout_s=timeout_s)
    h.pid_file.unlink(missing_ok=True)
    return running


def group_running(pgid: int) -> bool:
    """Some member of process group ``pgid`` still runs (zombies awaiting reaping do not count)."""
    return procs.group_running(pgid, eperm="present")
