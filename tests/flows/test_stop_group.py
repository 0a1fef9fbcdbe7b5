"""``ultrafed.procs.stop_group`` on real child processes, each in its own session (process group)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ultrafed.procs import group_exists, group_running, stop_group

# Logs the signals it gets; exits on the ``need``-th SIGINT (never if 0), ignores SIGTERM.
WORKER = """
import signal, sys, time, pathlib
log, need, got = pathlib.Path(sys.argv[1]), int(sys.argv[2]), []
def on(sig, _):
    got.append(signal.Signals(sig).name)
    log.write_text(" ".join(got))
    if need and got.count("SIGINT") >= need:
        sys.exit(0)
signal.signal(signal.SIGINT, on)
signal.signal(signal.SIGTERM, on)
log.write_text("ready")
while True:
    time.sleep(0.05)
"""
# Starts a grandchild in the same group, writes its pid, then sleeps.
PARENT = """
import subprocess, sys, time, pathlib
gc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
pathlib.Path(sys.argv[1]).write_text(str(gc.pid))
time.sleep(60)
"""
@pytest.fixture
def spawn():
    """Start ``python -c code *args`` in a new session; SIGKILL any group still left at teardown."""
    started: list[subprocess.Popen] = []

    def start(code: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", code, *args], start_new_session=True)
        started.append(p)
        return p

    yield start
    for p in started:
        if group_exists(p.pid, eperm="gone"):
            os.killpg(p.pid, signal.SIGKILL)
        try:
            p.wait(timeout=5)
        except ChildProcessError:
            pass


def _wait_for(path: Path, text: str | None = None, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text() and (text is None or path.read_text() == text):
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path}: not written within {timeout_s} s")


def test_sigterm_stops_the_whole_group_and_reaps_it(spawn, tmp_path):
    p = spawn(PARENT, str(tmp_path / "gc.pid"))
    gc = int(_wait_for(tmp_path / "gc.pid"))
    assert os.getpgid(gc) == p.pid and group_running(p.pid, eperm="gone")
    t0 = time.monotonic()
    assert stop_group(p.pid, eperm="present", timeout_s=10) is True
    assert time.monotonic() - t0 < 5  # SIGTERM was enough: no wait for the SIGKILL timeout
    assert not group_exists(p.pid, eperm="present")  # grandchild too, and the leader reaped (no zombie)
    assert not psutil.pid_exists(gc) or psutil.Process(gc).status() == psutil.STATUS_ZOMBIE
    assert stop_group(p.pid, eperm="present") is False and stop_group(p.pid, eperm="gone") is False


@pytest.mark.parametrize("need, interrupts, expected, escalated", [
    (2, 2, "SIGINT SIGINT", False),  # a Prefect worker: the second SIGINT ends it
    (2, 1, "SIGINT SIGTERM", True),  # one SIGINT is not enough for it: SIGTERM ignored, SIGKILL
    (0, 1, "SIGINT SIGTERM", True),  # ignores everything it can: SIGKILL after timeout_s
])
def test_interrupts_then_sigterm_then_sigkill(spawn, tmp_path, need, interrupts, expected, escalated):
    log = tmp_path / "signals.log"
    p = spawn(WORKER, str(log), str(need))
    _wait_for(log, "ready")
    t0 = time.monotonic()
    assert stop_group(p.pid, eperm="gone", interrupts=interrupts, timeout_s=1.5) is True
    took = time.monotonic() - t0
    assert log.read_text() == expected
    assert not group_exists(p.pid, eperm="gone")
    if escalated:
        assert took >= 1.5
    else:
        assert took < 1.5


def test_zombie_group_counts_as_there_but_not_running(spawn):
    p = spawn("pass")
    deadline = time.monotonic() + 20
    while psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "child did not exit"
        time.sleep(0.05)
    assert group_exists(p.pid, eperm="gone") and not group_running(p.pid, eperm="gone")
    t0 = time.monotonic()
    assert stop_group(p.pid, eperm="gone", interrupts=1, timeout_s=10) is True  # ours: stopped = reaped
    assert time.monotonic() - t0 < 2
    assert not group_exists(p.pid, eperm="gone")


def _probe_as_nobody(pgid: int, mode: str) -> dict:
    """In a forked child that dropped root: what the probes and stop_group say about ``pgid``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = {"exists": group_exists(pgid, eperm=mode), "running": group_running(pgid, eperm=mode)}
            try:
                out["stop"] = stop_group(pgid, eperm=mode, timeout_s=0.5, reap_s=0.2)
            except PermissionError:
                out["stop"] = "PermissionError"
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    assert text, "the unprivileged child wrote nothing"
    return json.loads(text)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a group that an unprivileged prober "
                                              "may not signal")
@pytest.mark.parametrize("mode, expected", [
    ("gone", {"exists": False, "running": False, "stop": False}),  # a reused PID: not ours, left alone
    ("present", {"exists": True, "running": True, "stop": "PermissionError"}),  # identity checked: still there
])
def test_group_we_may_not_signal(spawn, mode, expected):
    p = spawn("import time; time.sleep(60)")
    assert _probe_as_nobody(p.pid, mode) == expected
    assert p.poll() is None and group_running(p.pid, eperm="present")  # nothing was signalled
