"""The flow each site's worker runs (federation mode): one site action on local data.

The data root is the worker's own ``$ULTRAFED_SITE_ROOT``; the coordinator sends only the
action name and JSON parameters, and reads the small result the site logs to MLflow.
"""
from __future__ import annotations

from typing import Any

import flows  # noqa: F401  (runtime env)
from prefect import flow

from ultrafed.federated.client import run_for_coordinator


@flow(name="ultrafed-site", persist_result=True, flow_run_name="{action}-{site_id}")
def site_job(action: str, site_id: str, params: dict[str, Any], result_run_id: str | None = None) -> dict[str, Any]:
    """check | train | validate at this site; returns (and logs) counts, metrics, URIs, hashes.

    Site policy, not the coordinator's: pictures of this site's images are written to its own
    work dir, and answers and errors leave without file names or paths
    (:func:`~ultrafed.federated.client.run_for_coordinator`).
    """
    extra = {"pictures_at_site": True} if action == "validate" else {}
    return run_for_coordinator(action, site_id, {k: v for k, v in params.items() if k != "pictures_at_site"},
                               result_run_id=result_run_id, extra=extra)
