"""Per-site tasks of a round: quality gate, local training, validation of the global model."""
from __future__ import annotations

from typing import Any, Mapping

from prefect import task

from tasks.dispatch import call_site


@task(name="check_site", task_run_name="check-{site[id]}", retries=1, retry_delay_seconds=2)
def check_site(site: Mapping[str, Any], *, mode: str, timeout_s: float, run_id: str | None) -> dict[str, Any]:
    """Manifest + Great Expectations gate at the site; a failing site is excluded, not fatal."""
    return call_site(site, "check", {}, mode=mode, timeout_s=timeout_s, result_run_id=run_id)


@task(name="train_site", task_run_name="train-{site[id]}-r{round_idx}", retries=1, retry_delay_seconds=5)
def train_site(site: Mapping[str, Any], cfg: Mapping[str, Any], *, round_idx: int, global_uri: str,
               global_sha256: str, run_id: str, run_key: str, mode: str, timeout_s: float) -> dict[str, Any]:
    """Local UltraMIM epochs at the site; returns (site, n_images, metrics, update_uri, hashes)."""
    params = {"cfg": dict(cfg), "round_idx": round_idx, "global_uri": global_uri,
              "global_sha256": global_sha256, "update_run_id": run_id, "run_key": run_key}
    return call_site(site, "train", params, mode=mode, timeout_s=timeout_s, result_run_id=run_id)


@task(name="validate_global", task_run_name="validate-{site[id]}", retries=1, retry_delay_seconds=2)
def validate_global(site: Mapping[str, Any], cfg: Mapping[str, Any], *, global_uri: str, global_sha256: str,
                    mode: str, timeout_s: float, run_id: str | None, round_idx: int = 0) -> dict[str, Any]:
    """Reconstruction loss of the new global model on the site's val split (+ a reconstruction picture)."""
    params = {"cfg": dict(cfg), "global_uri": global_uri, "global_sha256": global_sha256,
              "picture_run_id": run_id, "round_idx": round_idx}
    return call_site(site, "validate", params, mode=mode, timeout_s=timeout_s, result_run_id=run_id)
