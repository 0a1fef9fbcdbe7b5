"""A real ``mlflow server`` on 127.0.0.1 (sqlite, artifact proxying, basic auth), stopped by PID."""
from __future__ import annotations

import base64
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from ultrafed.tracking.lineage import chain, verify
from ultrafed.tracking.promotion import promote
from ultrafed.tracking.runs import configure_tracking, ensure_experiment, start_parent_run
from ultrafed.tracking.server import (
    ServerError, auth_available, group_running, server_status, start_server, stop_server)
from ultrafed.tracking.store import get_state, put_state, state_sha256

from ._helpers import register_chain

pytestmark = [pytest.mark.federation, pytest.mark.slow]


def _get(url: str, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(url)
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture
def server(tmp_path):
    handle = start_server(tmp_path / "srv")
    prev = mlflow.get_tracking_uri()
    try:
        yield handle
    finally:
        stop_server(handle)
        mlflow.set_tracking_uri(prev)
        mlflow.set_registry_uri(prev)


def test_server_proxy_registry_verify_and_stop_by_pid(server, tmp_path, tiny_cfg):
    h = server
    # Prepare: a site and the coordinator talk to the server only (artifacts proxied)
    configure_tracking(h.url)
    exp = ensure_experiment("federation")
    assert MlflowClient().get_experiment(exp).artifact_location.startswith("mlflow-artifacts:")
    parent = start_parent_run(tiny_cfg, experiment="federation")
    site_run = MlflowClient().create_run(exp).info.run_id
    update = {"w": torch.arange(6.0).reshape(2, 3)}
    # Execute
    uri = put_state(update, site_run, "round-000/site-a")
    assert state_sha256(get_state(uri)) == state_sha256(update)
    assert len(list(Path(h.artifacts).rglob("state.pt"))) == 1  # written into the server's destination
    register_chain(parent, tmp_path, 2)
    promote("ultrafed-encoder", 2, "production", reason="server test", by="tester")
    # Assert: alias, chain, verification through the proxy; a tampered file on the server is caught
    assert int(MlflowClient().get_model_version_by_alias("ultrafed-encoder", "production").version) == 2
    assert [link.version for link in chain("models:/ultrafed-encoder@production")] == [2, 1]
    assert not [c for c in verify("models:/ultrafed-encoder@production") if c.failed]
    lineage_files = sorted(Path(h.artifacts).rglob("extra_files/lineage.json"))
    assert len(lineage_files) == 2
    for f in lineage_files:
        f.write_text(f.read_text().replace('"strategy": "fedavg"', '"strategy": "median"'))
    failed = {(c.version, c.what) for c in verify("models:/ultrafed-encoder@production") if c.failed}
    assert failed == {(f"ultrafed-encoder v{v}", what) for v in (1, 2)
                      for what in ("artifact extra_files/lineage.json", "lineage.json vs tag")}
    # stop by PID takes the whole process group down and removes the pid file
    status = server_status(h.root)
    assert status["alive"] and status["healthy"]
    with pytest.raises(ServerError, match="already running"):
        start_server(h.root)
    assert stop_server(h) is True
    assert server_status(h.root) is None and not Path(h.pid_file).exists()
    assert not group_running(h.pid)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{h.url}/health", timeout=3)
    assert stop_server(h) is False  # nothing of ours left to stop


def _as(monkeypatch, user: str, password: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


@pytest.mark.skipif(not auth_available(), reason="MLflow basic auth needs the mlflow[auth] extra (Flask-WTF), "
                                                  "not installed in this environment")
def test_basic_auth_site_credentials(tmp_path, monkeypatch):
    h = start_server(tmp_path / "srv", auth=True, admin_password="admin-pass-for-tests-1")
    prev = mlflow.get_tracking_uri()
    try:
        api = f"{h.url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _get(api) == 401
        assert _get(api, "admin", "admin-pass-for-tests-1") == 200
        _as(monkeypatch, "admin", "admin-pass-for-tests-1")
        configure_tracking(h.url)
        exp = ensure_experiment("federation")
        from mlflow.server import get_app_client

        auth = get_app_client("basic-auth", tracking_uri=h.url)
        auth.create_user("site-a", "site-a-pass-123456")
        auth.grant_user_permission("site-a", "experiment", exp, "EDIT")
        _as(monkeypatch, "site-a", "site-a-pass-123456")
        rid = MlflowClient().create_run(exp).info.run_id
        uri = put_state({"w": torch.ones(2)}, rid, "u")
        assert torch.equal(get_state(uri)["w"], torch.ones(2))
        _as(monkeypatch, "site-a", "wrong-password")
        with pytest.raises(Exception, match="401|nauthorized|credentials"):
            MlflowClient().create_run(exp)
    finally:
        stop_server(h)
        mlflow.set_tracking_uri(prev)
        mlflow.set_registry_uri(prev)


def test_auth_refuses_to_start_without_password_or_extra(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    with pytest.raises(ServerError, match="admin password"):
        start_server(tmp_path, auth=True)
    if not auth_available():
        with pytest.raises(ServerError, match=r"pip install 'mlflow\[auth\]'"):
            start_server(tmp_path, auth=True, admin_password="x")
    assert not (tmp_path / "server.json").exists()
