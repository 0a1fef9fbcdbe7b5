"""Weights travel as MLflow run artifacts: tasks pass URIs, never tensors.

A site pulls the global state and pushes its update through the tracking server's artifact
proxy (federation mode) or the local artifact folder (embedded mode) with the same calls.
Each state is stored as ``state.pt`` (``torch.save`` of a plain state dict, loadable with
``weights_only=True``) beside ``meta.json`` holding its sha256, so a reader detects a
truncated or altered file before using it.
"""
from __future__ import annotations

import io
import json
import tempfile
import threading
from pathlib import Path
from typing import Mapping

import mlflow
import torch
from mlflow import MlflowClient
from torch import Tensor

from ultrafed.federated.transfer import state_sha256  # noqa: F401  (re-exported: the one weights digest)

STATE_FILE = "state.pt"
META_FILE = "meta.json"

# States this process put or fetched, by sha256. Weights are content-addressed, so a hit is
# the same tensors a download would give; in embedded mode every in-process site and the
# coordinator share one copy of the round's global model instead of re-reading it from the
# store. The coordinator calls :func:`retain` each round, so the cache holds one round at most.
_CACHE: dict[str, dict[str, Tensor]] = {}
_CACHE_LOCK = threading.Lock()


def _remember(sha: str, state: Mapping[str, Tensor]) -> None:
    with _CACHE_LOCK:
        _CACHE[sha] = dict(state)


def retain(shas: set[str] | frozenset[str] = frozenset()) -> None:
    """Forget every cached state but ``shas`` (call once per round)."""
    with _CACHE_LOCK:
        for k in [k for k in _CACHE if k not in shas]:
            del _CACHE[k]


class StateIntegrityError(RuntimeError):
    """A stored state is missing, unreadable or does not match its recorded checksum."""


def put_state(state: Mapping[str, Tensor], run_id: str, artifact_path: str, *,
              meta: Mapping | None = None) -> str:
    """Log ``state`` (+ ``meta.json`` with its sha256) under ``artifact_path`` of ``run_id``.

    Returns ``runs:/<run_id>/<artifact_path>/state.pt``, fetchable by any process that can
    reach the same tracking store or server.
    """
    sha = state_sha256(state)
    client = MlflowClient()
    with tempfile.TemporaryDirectory(prefix="ultrafed-state-") as tmp:
        sd = {k: v.detach().cpu() for k, v in state.items()}
        torch.save(sd, Path(tmp) / STATE_FILE)
        record = {**(meta or {}), "sha256": sha, "n_tensors": len(sd),
                  "n_elements": int(sum(v.numel() for v in sd.values()))}
        (Path(tmp) / META_FILE).write_text(json.dumps(record, sort_keys=True, default=str))
        # The state first, its meta last: a reader that finds meta.json finds a complete state.pt.
        client.log_artifact(run_id, str(Path(tmp) / STATE_FILE), artifact_path)
        client.log_artifact(run_id, str(Path(tmp) / META_FILE), artifact_path)
        _remember(sha, sd)
    return f"runs:/{run_id}/{artifact_path.strip('/')}/{STATE_FILE}"


def _meta_uri(uri: str) -> str:
    return uri.rsplit("/", 1)[0] + "/" + META_FILE


def get_meta(uri: str) -> dict:
    """The ``meta.json`` logged beside a state URI."""
    with tempfile.TemporaryDirectory(prefix="ultrafed-meta-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=_meta_uri(uri), dst_path=tmp)
            return json.loads(Path(path).read_text())
        except Exception as e:  # noqa: BLE001 - any failure is one clear line
            raise StateIntegrityError(f"{uri}: meta.json unreadable ({_short(e)})") from None


def _short(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]


def get_state(uri: str, *, expected_sha256: str | None = None) -> dict[str, Tensor]:
    """Download and load a state logged by :func:`put_state`, checking its sha256.

    The expected checksum defaults to the one in ``meta.json``; any mismatch, truncation or
    unreadable file raises :class:`StateIntegrityError` with a one-line message naming ``uri``.
    """
    with _CACHE_LOCK:
        hit = _CACHE.get(expected_sha256 or "")
    if hit is not None:
        return dict(hit)  # tensors are shared read-only: every consumer copies (load_state_dict) or makes new ones
    expected = expected_sha256 or get_meta(uri).get("sha256")
    with tempfile.TemporaryDirectory(prefix="ultrafed-state-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            data = Path(path).read_bytes()
        except Exception as e:  # noqa: BLE001
            raise StateIntegrityError(f"{uri}: cannot download ({_short(e)})") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - half-written or corrupted archive
        raise StateIntegrityError(f"{uri}: not a readable torch state ({_short(e)})") from None
    if not isinstance(state, dict):
        raise StateIntegrityError(f"{uri}: holds {type(state).__name__}, not a state dict")
    try:
        got = state_sha256(state)
    except TypeError as e:
        raise StateIntegrityError(f"{uri}: {e}") from None
    if expected and got != expected:
        raise StateIntegrityError(f"{uri}: sha256 mismatch (expected {expected[:12]}, got {got[:12]})")
    _remember(got, state)
    return state
