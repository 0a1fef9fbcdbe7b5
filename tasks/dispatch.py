"""Run a site action where the site's data lives.

Embedded mode calls the library in this process with the site's root from sites.yaml.
Federation mode asks the site's own work pool (``site-<id>``) to run the ``ultrafed-site``
deployment; the coordinator passes only the action and JSON parameters and reads back the
small result the site logged to MLflow. It never sees a data path.
"""
from __future__ import annotations

from typing import Any, Mapping

SITE_FLOW_NAME = "ultrafed-site"


def deployment_name(site_id: str) -> str:
    return f"{SITE_FLOW_NAME}/site-{site_id}"


class SiteDispatchError(RuntimeError):
    """The site's run did not complete (crash, timeout, cancelled); one line, names the site."""


def call_site(site: Mapping[str, Any], action: str, params: Mapping[str, Any], *, mode: str,
              timeout_s: float, result_run_id: str | None) -> dict[str, Any]:
    """Run ``action`` (check | train | validate) for ``site`` and return its small result dict."""
    from ultrafed.federated.client import read_result, run_action

    if mode == "embedded":
        return run_action(action, site["id"], params, root=site["root"], work_dir=site.get("work_dir"),
                          result_run_id=result_run_id)
    if mode != "federation":
        raise ValueError(f"unknown mode '{mode}' (embedded | federation)")
    if not result_run_id:
        raise ValueError("federation mode needs an MLflow run for the site's result")
    from prefect.deployments import run_deployment

    fr = run_deployment(deployment_name(site["id"]), timeout=timeout_s, poll_interval=1, as_subflow=True,
                        parameters={"action": action, "site_id": site["id"], "params": dict(params),
                                    "result_run_id": result_run_id},
                        flow_run_name=f"{action}-{site['id']}")
    state = fr.state
    if state is None or not state.is_completed():
        what = "timed out" if state is not None and not state.is_final() else f"ended {state.name if state else 'without a state'}"
        msg = (state.message or "").splitlines()[0] if state is not None and state.message else ""
        raise SiteDispatchError(f"site {site['id']}: {action} run {fr.id} {what} {msg}".strip())
    return read_result(action, result_run_id)
