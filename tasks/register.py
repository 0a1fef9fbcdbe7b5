"""Register a round's global encoder in the MLflow Model Registry with its lineage."""
from __future__ import annotations

from typing import Any, Mapping

from prefect import task


@task(name="register", retries=2, retry_delay_seconds=2)
def register(cfg: Mapping[str, Any], *, global_uri: str, global_sha256: str, run_id: str,
             lineage: Mapping[str, Any], metrics: Mapping[str, float]) -> dict[str, Any]:
    """A new version of the encoder model; returns its name, version and URI."""
    from ultrafed.config import from_dict
    from ultrafed.models.mae import mae_from_config
    from ultrafed.tracking.registry import register_encoder
    from ultrafed.tracking.store import get_state

    c = from_dict(cfg)
    model = mae_from_config(c.model)
    model.load_state_dict(get_state(global_uri, expected_sha256=global_sha256))
    v = register_encoder(model.encoder, name=c.tracking.registered_model, run_id=run_id,
                         lineage=dict(lineage), metrics=dict(metrics))
    return {"name": v.name, "version": int(v.version), "uri": v.uri, "sha256": v.sha256}
