"""Where tracking goes (embedded sqlite or a server) and the run hierarchy of a pretraining.

One parent run per pretraining (resolved config as params, code commit, params hash), one
child run per round and, under it, one per site update. Runs are created through
``MlflowClient`` with explicit ids, never the fluent "active run", because rounds, sites and
threads log concurrently and must not share hidden global state.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ultrafed.paths import REPO_ROOT, repo_path
from ultrafed.tracking.names import PARENT_TAG, TAG_CODE_COMMIT, TAG_KIND, TAG_PARAMS_HASH, TAG_ROUND, TAG_SITE

DEFAULT_DB = REPO_ROOT / "mlflow" / "mlflow.db"
DEFAULT_ARTIFACTS = REPO_ROOT / "mlflow" / "artifacts"

_artifact_root: str | None = None  # remembered by configure_tracking for ensure_experiment


if TYPE_CHECKING:
    from ultrafed.config import Config


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths are relative to the repo)."""
    if not uri.startswith("sqlite:///"):
        return None
    return repo_path(uri[len("sqlite:///"):])


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """Explicit URI > ``$MLFLOW_TRACKING_URI`` > embedded ``sqlite:///<repo>/mlflow/mlflow.db``.

    Relative sqlite paths (as written in params.yaml) are anchored at the repo root so the
    CLI works from any working directory.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    db = _sqlite_path(uri)
    return f"sqlite:///{db}" if db is not None else uri


def default_artifact_root(tracking_uri: str) -> str | None:
    """Embedded stores keep artifacts in ``artifacts/`` beside the database; servers decide themselves."""
    db = _sqlite_path(tracking_uri)
    if db is None:
        return None
    return (db.parent / "artifacts").as_uri() if db != DEFAULT_DB else DEFAULT_ARTIFACTS.as_uri()


def _as_location(artifact_root: str) -> str:
    """A plain path (absolute or repo-relative) becomes a ``file://`` URI; URIs pass through."""
    if "://" in artifact_root or artifact_root.startswith("mlflow-artifacts:"):
        return artifact_root
    return repo_path(artifact_root).as_uri()


@contextlib.contextmanager
def _store_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise first-time schema creation and experiment creation on one sqlite file.

    Two processes opening a fresh sqlite store at once both run MLflow's migrations and one
    fails; an OS file lock makes that step one-at-a-time. Servers
    serialise on their own, so nothing is locked for http URIs.
    """
    db = _sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    # The lock file lives in the temp dir (keyed by the database's path), not beside the
    # database, so the repo's mlflow/ folder gains no stray files.
    key = hashlib.sha256(str(db.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"ultrafed-mlflow-{key}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def configure_tracking(tracking_uri: str | None = None, artifact_root: str | None = None) -> str:
    """Point MLflow (tracking and registry) at the store and make sure its schema exists.

    Safe to call from several processes or threads at once. Returns the resolved URI.
    """
    global _artifact_root
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in logs
    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _artifact_root = _as_location(artifact_root) if artifact_root else default_artifact_root(uri)
    with _store_lock(uri):
        MlflowClient(uri).search_experiments(max_results=1)  # creates/migrates the sqlite schema once
    return uri


def ensure_experiment(name: str, artifact_root: str | None = None) -> str:
    """Id of experiment ``name``, created (with the configured artifact location) if missing.

    Concurrent creators race; the loser finds the winner's experiment instead of failing.
    """
    uri = mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    location = _as_location(artifact_root) if artifact_root else _artifact_root
    with _store_lock(uri):
        for attempt in range(5):
            exp = client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    client.restore_experiment(exp.experiment_id)
                return exp.experiment_id
            try:
                loc = f"{location.rstrip('/')}/{name}" if location else None
                return client.create_experiment(name, artifact_location=loc)
            except MlflowException as e:  # created meanwhile by another process (server mode)
                if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
                    raise
                time.sleep(0.1 * (attempt + 1))
    raise RuntimeError(f"{uri}: could not create or find experiment '{name}'")


@functools.lru_cache(maxsize=4)
def code_commit(repo: Path = REPO_ROOT) -> str:
    """``git rev-parse HEAD`` (+ ``-dirty`` when tracked files changed), else ``unknown``."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."  # MLflow's param value limit


def start_parent_run(cfg: "Config", *, experiment: str | None = None, run_name: str | None = None,
                     tags: Mapping[str, str] | None = None) -> str:
    """Create the pretraining's parent run: resolved config as params + artifact, commit, hash.

    ``cfg`` is an :class:`ultrafed.config.Config`. Returns the run id (the run stays RUNNING
    until :func:`end_run`).
    """
    client = MlflowClient()
    exp_id = ensure_experiment(experiment or cfg.tracking.experiment)
    all_tags = {TAG_KIND: "pretraining", TAG_CODE_COMMIT: code_commit(),
                TAG_PARAMS_HASH: cfg.params_hash(), **(tags or {})}
    run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
    rid = run.info.run_id
    from mlflow.entities import Param

    params = [Param(k, _param_value(v)) for k, v in sorted(cfg.flat().items())]
    params.append(Param("params_hash", cfg.params_hash()))
    for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
        client.log_batch(rid, params=params[i:i + 100])
    client.log_dict(rid, cfg.to_dict(), "config/params.resolved.yaml")
    return rid


def start_child_run(parent_run_id: str, *, kind: str, run_name: str,
                    tags: Mapping[str, str] | None = None) -> str:
    """A run nested under ``parent_run_id`` (same experiment), tagged with its kind."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    all_tags = {PARENT_TAG: parent_run_id, TAG_KIND: kind,
                TAG_CODE_COMMIT: parent.data.tags.get(TAG_CODE_COMMIT, code_commit()),
                TAG_PARAMS_HASH: parent.data.tags.get(TAG_PARAMS_HASH, ""), **(tags or {})}
    return client.create_run(parent.info.experiment_id, tags=all_tags, run_name=run_name).info.run_id


def start_round_run(parent_run_id: str, round_idx: int) -> str:
    """Child run of the pretraining for one federated round."""
    return start_child_run(parent_run_id, kind="round", run_name=f"round-{round_idx:03d}",
                           tags={TAG_ROUND: str(round_idx)})


def start_site_run(round_run_id: str, site: str, round_idx: int) -> str:
    """Child run of a round for one site's local update (sites log their own metrics here)."""
    return start_child_run(round_run_id, kind="site_update", run_name=f"round-{round_idx:03d}-{site}",
                           tags={TAG_ROUND: str(round_idx), TAG_SITE: site})


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log a flat dict of metrics in one call (``site/<name>/<metric>`` keys for per-site values)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()]
    for i in range(0, len(batch), 1000):
        MlflowClient().log_batch(run_id, metrics=batch[i:i + 1000])


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Close a run (``FINISHED``, ``FAILED`` or ``KILLED``)."""
    MlflowClient().set_terminated(run_id, status=status)


@contextlib.contextmanager
def run_scope(run_id: str) -> Iterator[str]:
    """End ``run_id`` FINISHED on success, FAILED on an exception (which propagates)."""
    try:
        yield run_id
    except Exception:
        end_run(run_id, "FAILED")
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit
        end_run(run_id, "KILLED")
        raise
    end_run(run_id, "FINISHED")
