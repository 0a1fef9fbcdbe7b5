"""Stop a process group we started, by its leader's PID (never by name).

One implementation for the MLflow server (:mod:`ultrafed.tracking.server`, which also starts the
server of ``ultrafed federation up``) and the Prefect server / workers of ``ultrafed federation
up|down`` (``flows/federation.py``). Each is started
with ``start_new_session=True``, so its PID is also the id of its own process group and
``killpg`` reaches every process it spawned.

What ``killpg`` raising PermissionError (EPERM) means is the caller's to say, and every function
here makes it say so (``eperm``, no default); the two callers differ and must keep differing:

* ``eperm="gone"`` (federation's Prefect server and workers): a bare PID in a pid file is its only
  record of what it started.
  EPERM means that PID now leads someone else's group (the PID was reused), so the group is not
  ours: report it as not there, never signal it, never escalate.
* ``eperm="present"`` (MLflow server): the server's identity was checked first (psutil: command
  line and start time), so the group is ours. EPERM then means a member still exists that we
  cannot signal: keep counting it as there, wait, escalate, and let the escalation's
  PermissionError propagate instead of reporting a stop that did not happen.

One rule for both changes one caller's behaviour (a merge that did so was reverted).

Zombies: :func:`group_exists` counts them (the kernel keeps the group until they are reaped),
:func:`group_running` does not, so a stop waits only for what still runs, then for the reaping.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Literal

import psutil

Eperm = Literal["gone", "present"]


def group_exists(pgid: int, *, eperm: Eperm) -> bool:
    """The kernel still has process group ``pgid`` (zombies awaiting reaping count)."""
    probe = _probe(pgid)
    return probe == "ours" or (probe == "eperm" and eperm == "present")


def group_running(pgid: int, *, eperm: Eperm) -> bool:
    """Some member of process group ``pgid`` still runs (zombies awaiting reaping do not count)."""
    probe = _probe(pgid)
    if probe == "eperm":
        return eperm == "present"  # its members cannot be inspected either
    return probe == "ours" and any(_runs(p) for p in psutil.process_iter() if _pgid(p.pid) == pgid)


def stop_group(pgid: int, *, eperm: Eperm, interrupts: int = 0, timeout_s: float = 20.0,
               reap_s: float = 5.0) -> bool:
    """Stop the group led by ``pgid``: SIGINT ``interrupts`` times, then SIGTERM, then SIGKILL.

    Each of the ``interrupts + 1`` gentle signals gets ``timeout_s / (interrupts + 1)`` to take
    the group down (a Prefect worker needs two SIGINTs: the first starts a graceful shutdown).
    After the last one, up to ``reap_s`` for the exits to be collected (by us or by init).
    Returns False if there was no group of ours to stop, True otherwise.
    """
    if not group_exists(pgid, eperm=eperm):
        return False
    step_s = timeout_s / (interrupts + 1)
    for sig in [signal.SIGINT] * interrupts + [signal.SIGTERM]:
        if not _signal(pgid, sig) or _wait(lambda: not group_running(pgid, eperm=eperm), pgid, step_s):
            break
    else:
        _signal(pgid, signal.SIGKILL)
    _wait(lambda: not group_exists(pgid, eperm=eperm), pgid, reap_s)
    return True


def _probe(pgid: int) -> Literal["gone", "eperm", "ours"]:
    """Signal 0 to the group: no such group, one we may not signal, or one we may."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "eperm"
    return "ours"


def _signal(pgid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to the group; False if the group is gone already."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _wait(done: Callable[[], bool], leader: int, seconds: float) -> bool:
    """Poll ``done`` for up to ``seconds``, reaping the leader if it is our child; its final answer."""
    deadline = time.monotonic() + seconds
    while True:
        _reap(leader)
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _reap(pid: int) -> None:
    """Collect our child's exit status so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _runs(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # cannot tell: count it as running
        return True


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
