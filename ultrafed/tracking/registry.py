"""MLflow Model Registry adapter: register global encoders and task models with their lineage.

Versions are ordinary MLflow models (``pytorch`` flavour, loadable with
``mlflow.pytorch.load_model("models:/ultrafed-encoder/3")`` or ``...@production``). Logging is
kept fast for ViT-B: pickle format (``torch.export`` tracing takes many seconds), explicit
pip requirements (no inference subprocess) and an explicit tensor signature instead of an
input example (an example makes MLflow reload and run the model once more at log time).
Promotion (aliases behind gates) is :mod:`ultrafed.tracking.promotion`.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import logging
import os
import tempfile
import urllib.parse
from dataclasses import dataclass
from importlib import metadata as _md
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec
from torch import nn

from ultrafed.files import files_sha256
from ultrafed.tracking.lineage import Lineage
from ultrafed.tracking.names import (
    DEFAULT_ENCODER_NAME,
    LINEAGE_FILE,
    METRIC_TAG_PREFIX,
    TAG_CODE_COMMIT,
    TAG_ENCODER_URI,
    TAG_FILES_SHA,
    TAG_KIND,
    TAG_LINEAGE_SHA,
    TAG_PARAMS_HASH,
    TAG_PARENT,
    TAG_ROUND,
    TAG_WEIGHTS_SHA,
    resolve_version,
    tag_value,
)
from ultrafed.tracking.runs import code_commit
from ultrafed.tracking.store import state_sha256


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    uri: str  # models:/<name>/<version>
    sha256: str  # state_sha256 of the registered weights


def _requirements() -> list[str]:
    """Pinned versions of what loading the model needs (no pip inference)."""
    out = []
    for pkg in ("torch", "timm", "numpy", "cloudpickle"):
        try:
            out.append(f"{pkg}=={_md.version(pkg)}")
        except _md.PackageNotFoundError:
            out.append(pkg)
    return out


@contextlib.contextmanager
def _quiet_pickle_warning() -> Iterator[None]:
    """MLflow warns on every pickle-format save; we chose pickle knowingly (see module doc)."""
    log = logging.getLogger("mlflow.pytorch")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def _cpu_copy(model: nn.Module) -> nn.Module:
    """The model on CPU in eval mode, without moving the caller's instance."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    m = model if on_cpu else copy.deepcopy(model).cpu()
    return m.eval()


def lineage_tags(lin: Lineage) -> dict[str, str]:
    """Flat, searchable version tags summarising a lineage record."""
    tags: dict[str, str] = {
        TAG_KIND: lin.kind,
        TAG_CODE_COMMIT: lin.code_commit or "",
        TAG_PARAMS_HASH: lin.params_hash or "",
        TAG_WEIGHTS_SHA: lin.weights_sha256 or "",
        "ultrafed.run_id": lin.run_id or "",
    }
    if lin.kind == "task":
        tags[TAG_ENCODER_URI] = lin.encoder_uri or ""
        if lin.task:
            tags["ultrafed.task"] = lin.task
    else:
        tags.update({
            TAG_ROUND: "" if lin.round is None else str(lin.round),
            TAG_PARENT: "" if lin.parent_version is None else str(lin.parent_version),
            "ultrafed.strategy": lin.strategy or "",
            "ultrafed.strategy_params": tag_value(lin.strategy_params),
            "ultrafed.sites": ",".join(s.site for s in lin.sites),
            "ultrafed.excluded": tag_value(lin.excluded),
        })
        for s in lin.sites:
            p = f"site.{s.site}."
            tags.update({p + "n_images": str(s.n_images), p + "manifest_md5": s.manifest_md5 or "",
                         p + "weight": f"{s.weight:.6g}", p + "gate": s.gate_status or ""})
    for k, v in lin.metrics.items():
        tags[METRIC_TAG_PREFIX + k] = f"{float(v):.6g}"
    return tags


def _encoder_signature(encoder: nn.Module) -> ModelSignature:
    """One unnamed tensor in, one out: served models then take ``{"inputs": [N, C, H, W]}``
    (a named spec would reach the pytorch flavour as a dict, which it rejects)."""
    c, s = int(encoder.in_chans), int(encoder.img_size)
    tokens, dim = 1 + int(encoder.num_patches), int(encoder.embed_dim)
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, s, s))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, tokens, dim))]))


def _local_dir(uri: str) -> Path | None:
    """The directory behind a ``file://`` (or plain path) artifact location, else None."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "" and uri.startswith("/"):
        return Path(uri)
    return None


def _upload_model_dir(client: MlflowClient, model_id: str, artifact_location: str, src: Path) -> None:
    """Put a saved model dir into the logged model's artifact location.

    Local stores get a rename (the weights are written once, on the same disk); remote ones
    (server with artifact proxying) an upload through MLflow's artifact repository.
    """
    dest = _local_dir(artifact_location)
    if dest is not None and src.parent == dest.parent:
        if dest.exists():
            dest.rmdir()  # created empty by initialize_logged_model; non-empty -> OSError, never overwrite
        os.replace(src, dest)
        return
    client.log_model_artifacts(model_id, str(src))


def _log_and_register(model: nn.Module, *, name: str, run_id: str, lin: Lineage,
                      signature: ModelSignature, artifact_name: str) -> RegisteredVersion:
    """Save ``model`` as an MLflow model with ``lineage.json`` inside, register it, tag the version.

    Equivalent to ``mlflow.pytorch.log_model(..., registered_model_name=...)`` but (1) the
    logged model lands in the run's experiment, (2) every file's sha256 is taken before the
    upload and kept as a version tag for ``ultrafed lineage --verify``, and (3) a local store
    receives the files by rename instead of a second copy of the weights.
    """
    client = MlflowClient()
    tags = lineage_tags(lin)
    tags[TAG_LINEAGE_SHA] = lin.sha256()
    exp_id = client.get_run(run_id).info.experiment_id
    logged = mlflow.initialize_logged_model(name=artifact_name, source_run_id=run_id,
                                            experiment_id=exp_id, tags={TAG_KIND: lin.kind})
    try:
        dest = _local_dir(logged.artifact_location)
        parent = dest.parent if dest is not None else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".ultrafed-model-", dir=parent) as tmp:
            (Path(tmp) / LINEAGE_FILE).write_text(lin.canonical_json())
            local = Path(tmp) / "model"
            mlflow_model = Model(artifact_path=logged.artifact_location, run_id=run_id,
                                 model_uuid=logged.model_id, model_id=logged.model_id)
            with _quiet_pickle_warning():
                mlflow.pytorch.save_model(
                    model, str(local), mlflow_model=mlflow_model, signature=signature,
                    pip_requirements=_requirements(), serialization_format="pickle",
                    extra_files=[str(Path(tmp) / LINEAGE_FILE)],
                    metadata={"ultrafed_weights_sha256": lin.weights_sha256, "ultrafed_kind": lin.kind},
                )
            tags[TAG_FILES_SHA] = json.dumps(files_sha256(local), sort_keys=True)
            if parent is not None:  # keep the rename on one filesystem
                local_final = parent / f".{logged.model_id}-staged"
                os.replace(local, local_final)
                local = local_final
            _upload_model_dir(client, logged.model_id, logged.artifact_location, local)
    except BaseException:
        mlflow.finalize_logged_model(logged.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=int(lin.round or 0))])
    mv = mlflow.register_model(f"models:/{logged.model_id}", name, tags=tags, await_registration_for=60)
    client.update_model_version(name, mv.version, description=_describe(lin))
    return RegisteredVersion(name, int(mv.version), f"models:/{name}/{mv.version}", lin.weights_sha256 or "")


def _describe(lin: Lineage) -> str:
    if lin.kind == "task":
        return f"task {lin.task or '?'} fine-tuned from {lin.encoder_uri}"
    return (f"round {lin.round}, parent v{lin.parent_version}, strategy {lin.strategy}, "
            f"sites {','.join(s.site for s in lin.sites)}"
            + (f", excluded {','.join(sorted(lin.excluded))}" if lin.excluded else ""))


def _fill_common(lin: Lineage, run_id: str, weights_sha: str) -> Lineage:
    lin.run_id = lin.run_id or run_id
    lin.code_commit = lin.code_commit or code_commit()
    lin.weights_sha256 = weights_sha
    lin.created_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if not lin.params_hash:
        run = MlflowClient().get_run(run_id)
        lin.params_hash = run.data.tags.get(TAG_PARAMS_HASH) or run.data.params.get("params_hash")
    return lin


def register_encoder(encoder: nn.Module, *, name: str = DEFAULT_ENCODER_NAME, run_id: str,
                     lineage: Lineage | Mapping[str, Any],
                     metrics: Mapping[str, float] | None = None) -> RegisteredVersion:
    """Register one round's global encoder as a new version of ``name`` with its lineage.

    The weights are logged under ``run_id`` (the round's run); ``metrics`` (global validation
    metrics) are merged into the lineage and set as ``metric.<name>`` version tags, which the
    promotion gates read.
    """
    lin = Lineage.coerce(lineage)
    lin.kind = "encoder"
    lin.metrics = {**lin.metrics, **{k: float(v) for k, v in (metrics or {}).items()}}
    lin.model = lin.model or {k: int(getattr(encoder, k)) for k in
                              ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")}
    model = _cpu_copy(encoder)
    lin = _fill_common(lin, run_id, state_sha256(model.state_dict()))
    return _log_and_register(model, name=name, run_id=run_id, lin=lin,
                             signature=_encoder_signature(model), artifact_name="encoder")


def _version_number(mv: Any) -> int:
    return int(mv.version)


def latest_version(name: str = DEFAULT_ENCODER_NAME) -> RegisteredVersion | None:
    """The highest version of ``name`` (None if nothing is registered): resume point."""
    try:
        versions = MlflowClient().search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    if not versions:
        return None
    mv = max(versions, key=_version_number)
    return RegisteredVersion(name, int(mv.version), f"models:/{name}/{mv.version}",
                             mv.tags.get(TAG_WEIGHTS_SHA, ""))


def load_encoder(model_uri: str) -> nn.Module:
    """Load a registered encoder (``models:/name/3``, ``models:/name@production``) on CPU."""
    model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    from ultrafed.models.mae import ViTEncoder

    if not isinstance(model, ViTEncoder):
        raise TypeError(f"{model_uri}: holds {type(model).__name__}, not a ViTEncoder")
    return model.eval()


# -- task models (fine-tuned classifiers / segmenters) ----------------------------------------
class ProbabilityModel(nn.Module):
    """Logits model -> class probabilities, so a served model answers with probabilities."""

    def __init__(self, model: nn.Module, class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.model = model
        self.class_names = list(class_names or [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=-1)


def register_task_model(model: nn.Module, *, name: str, encoder_uri: str, run_id: str,
                        metrics: Mapping[str, float] | None = None, task: str | None = None,
                        class_names: Sequence[str] | None = None, img_size: int | None = None,
                        in_chans: int = 1, probabilities: bool = True,
                        lineage: Lineage | Mapping[str, Any] | None = None) -> RegisteredVersion:
    """Register a fine-tuned task model under its own name, pointing at its encoder version.

    Classifiers are wrapped in :class:`ProbabilityModel` (``probabilities=True``) so
    ``mlflow models serve`` answers a ``{"inputs": [N,C,H,W] floats}`` request with class
    probabilities. ``encoder_uri`` may use an alias; the concrete version is recorded.
    """
    enc_name, enc_version = resolve_version(encoder_uri)
    lin = Lineage.coerce(lineage or {})
    lin.kind = "task"
    lin.encoder_uri = f"models:/{enc_name}/{enc_version}"
    lin.task = task or lin.task
    lin.metrics = {**lin.metrics, **{k: float(v) for k, v in (metrics or {}).items()}}
    if class_names:
        lin.extra["class_names"] = list(class_names)
    wrapped = ProbabilityModel(model, class_names) if probabilities else model
    wrapped = _cpu_copy(wrapped)
    lin = _fill_common(lin, run_id, state_sha256(wrapped.state_dict()))
    size = img_size or int(getattr(getattr(model, "encoder", None), "img_size", 0) or 0)
    if not size:
        raise ValueError("register_task_model: pass img_size (the model has no .encoder.img_size)")
    with torch.no_grad():
        out = wrapped(torch.zeros(1, in_chans, size, size))
    sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, in_chans, size, size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *out.shape[1:]))]))
    return _log_and_register(wrapped, name=name, run_id=run_id, lin=lin, signature=sig,
                             artifact_name="task_model")


# -- listing ----------------------------------------------------------------------------------
def list_versions(name: str | None = None) -> list[dict[str, Any]]:
    """Registered versions (all models, or one) with aliases and key metrics, newest first."""
    client = MlflowClient()
    names = [name] if name else [m.name for m in client.search_registered_models()]
    rows: list[dict[str, Any]] = []
    for n in names:
        try:
            versions = client.search_model_versions(f"name='{n}'")
            # search results carry no aliases; the registered model holds alias -> version
            by_version: dict[int, list[str]] = {}
            for alias, ver in (client.get_registered_model(n).aliases or {}).items():
                by_version.setdefault(int(ver), []).append(alias)
        except MlflowException:
            continue
        for mv in sorted(versions, key=_version_number, reverse=True):
            t = mv.tags
            aliases = sorted(by_version.get(int(mv.version), []))
            rows.append({
                "name": n, "version": int(mv.version), "aliases": aliases,
                "kind": t.get(TAG_KIND, ""), "round": t.get(TAG_ROUND, ""),
                "parent": t.get(TAG_PARENT, ""), "encoder": t.get(TAG_ENCODER_URI, ""),
                "sites": t.get("ultrafed.sites", ""), "excluded": sorted(json.loads(t.get("ultrafed.excluded") or "{}")),
                "metrics": {k[len(METRIC_TAG_PREFIX):]: float(v) for k, v in t.items() if k.startswith(METRIC_TAG_PREFIX)},
                "created": _dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, _dt.timezone.utc)
                .isoformat(timespec="seconds"),
                "code_commit": t.get(TAG_CODE_COMMIT, ""),
                "promoted": {a: t.get(f"promotion.{a}.at", "") for a in aliases},
            })
    return rows
