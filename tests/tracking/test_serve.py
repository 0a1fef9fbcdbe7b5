"""A promoted task model served by ``mlflow models serve`` answers a real HTTP request."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from ultrafed.tracking.promotion import promote
from ultrafed.tracking.registry import register_task_model
from ultrafed.tracking.runs import start_round_run
from ultrafed.tracking.server import free_port

from ._helpers import register_chain, small_encoder

pytestmark = [pytest.mark.federation, pytest.mark.slow]


class ClsTokenHead(torch.nn.Module):
    """Smallest classifier on the encoder: linear layer on the cls token (pickled by value)."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(dim, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(tokens[:, 0])


def _wait_ping(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url}/ping not answering after {timeout_s} s")


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the serve process group we started, SIGKILL it if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    try:  # workers of the group may outlive the leader by a moment
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_promoted_classifier_serves_class_probabilities(parent_run, tmp_path, store):
    import cloudpickle

    # Prepare: encoder versions, a small classifier on the encoder, registered and promoted
    register_chain(parent_run, tmp_path, 1)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    torch.manual_seed(0)
    clf = torch.nn.Sequential(small_encoder(seed=0), ClsTokenHead(32, 3)).eval()
    v = register_task_model(clf, name="busi-classifier", encoder_uri="models:/ultrafed-encoder/1",
                            run_id=start_round_run(parent_run, 1), metrics={"val_auroc": 0.8},
                            task="busi-classification", class_names=["normal", "benign", "malignant"],
                            img_size=32)
    promote(v.name, v.version, "production", reason="serving test")
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.softmax(clf(images), dim=-1)
    # Execute: plain `mlflow models serve` on loopback, a real HTTP POST
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_DISABLE_TELEMETRY": "true",
           # --env-manager local runs `uvicorn` from PATH: the venv's, as in an activated shell
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/busi-classifier@production",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        _wait_ping(f"http://127.0.0.1:{port}", proc, 240)
        body = json.dumps({"inputs": images.numpy().tolist()}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"HTTP {e.code}: {json.loads(e.read()).get('stack_trace', '')[-1500:]}") from None
    finally:
        _stop_group(proc)
        log.close()
    # Assert: one probability row per image, summing to 1, equal to the local model's
    probs = torch.tensor(answer["predictions"])
    assert probs.shape == (2, 3)
    assert torch.allclose(probs.sum(1), torch.ones(2), atol=1e-5)
    assert torch.allclose(probs, expected, atol=1e-5)
