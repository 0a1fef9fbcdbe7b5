"""Names the runs, the registry, lineage and promotion share: tag keys, artifact paths, ``models:/`` URIs.

A leaf (nothing of the project imported), so :mod:`ultrafed.tracking.lineage` and
:mod:`ultrafed.tracking.registry` both read one spelling without importing each other.
"""
from __future__ import annotations

import json
from typing import Any

DEFAULT_ENCODER_NAME = "ultrafed-encoder"
LINEAGE_FILE = "lineage.json"
LINEAGE_ARTIFACT = f"extra_files/{LINEAGE_FILE}"  # where MLflow puts extra_files in a model dir
GATE_PASSED = "passed"  # a site's quality-gate outcome in a lineage record ("failed" otherwise)

# Tag keys shared by runs and model versions.
TAG_CODE_COMMIT = "ultrafed.code_commit"
TAG_PARAMS_HASH = "ultrafed.params_hash"
TAG_KIND = "ultrafed.kind"  # runs: pretraining | round | site_update | finetune | result; versions: encoder | task
TAG_ROUND = "ultrafed.round"
TAG_SITE = "ultrafed.site"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag (the UI draws the tree from it)

# Version tag keys.
TAG_WEIGHTS_SHA = "ultrafed.weights_sha256"
TAG_LINEAGE_SHA = "ultrafed.lineage_sha256"
TAG_FILES_SHA = "ultrafed.files_sha256"  # JSON {relative path: sha256} of the version's files
TAG_PARENT = "ultrafed.parent_version"
TAG_ENCODER_URI = "ultrafed.encoder_uri"
METRIC_TAG_PREFIX = "metric."


def tag_value(v: Any) -> str:
    """A tag's text: strings as they are, anything else as sorted JSON; cut to fit MLflow's 5,000 characters."""
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 4900 else s[:4897] + "..."


def parse_models_uri(uri: str) -> tuple[str, str]:
    """``models:/name/3`` -> (name, "3"); ``models:/name@alias`` -> (name, "@alias")."""
    if not uri.startswith("models:/"):
        raise ValueError(f"{uri}: not a models:/ URI")
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, "@" + alias
    name, _, ver = rest.rpartition("/")
    if not name or not ver:
        raise ValueError(f"{uri}: expected models:/<name>/<version> or models:/<name>@<alias>")
    return name, ver


def resolve_version(uri: str) -> tuple[str, int]:
    """A models:/ URI (version or alias) -> (name, concrete version number), asked of the registry."""
    from mlflow import MlflowClient

    name, ref = parse_models_uri(uri)
    client = MlflowClient()
    if ref.startswith("@"):
        return name, int(client.get_model_version_by_alias(name, ref[1:]).version)
    return name, int(client.get_model_version(name, ref).version)
