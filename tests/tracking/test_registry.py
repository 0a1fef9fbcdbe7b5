"""Registry against a real sqlite store: register, alias, lineage chain, verify, promotion."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ._helpers import register_chain, round_lineage, small_encoder
from ultrafed.tracking.lineage import Lineage, chain, chain_problems, verify
from ultrafed.tracking.names import TAG_FILES_SHA
from ultrafed.tracking.promotion import PromotionRefused, evaluate_gates, load_gates, promote
from ultrafed.tracking.registry import latest_version, list_versions, load_encoder, register_encoder, register_task_model
from ultrafed.tracking.runs import start_round_run
from ultrafed.tracking.store import state_sha256



def _artifact_dir(name: str, version: int) -> Path:
    """Where a version's files live in the embedded store (to tamper with them like an attacker)."""
    uri = MlflowClient().get_model_version_download_uri(name, str(version))
    assert uri.startswith("file://"), uri
    return Path(uri[len("file://"):])


def test_register_three_rounds_versions_tags_and_load(parent_run, tmp_path):
    # Prepare / Execute
    vs = register_chain(parent_run, tmp_path, 3)
    # Assert: consecutive versions, plain-MLflow URIs, weights round-trip bit-exactly
    assert [v.version for v in vs] == [1, 2, 3]
    assert vs[2].uri == "models:/ultrafed-encoder/3"
    assert latest_version("ultrafed-encoder") == vs[2]
    assert latest_version("no-such-model") is None
    for r, v in enumerate(vs):
        assert v.sha256 == state_sha256(small_encoder(seed=r).state_dict())
        loaded = load_encoder(v.uri)
        assert state_sha256(loaded.state_dict()) == v.sha256
    plain = mlflow.pytorch.load_model("models:/ultrafed-encoder/2")  # plain MLflow, no ultrafed helper
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(plain(x), small_encoder(seed=1)(x))
    mv = MlflowClient().get_model_version("ultrafed-encoder", "3")
    # lineage tags: round, parent, per-site manifest md5 / weight / gate, metric
    assert mv.tags["ultrafed.round"] == "2" and mv.tags["ultrafed.parent_version"] == "2"
    assert mv.tags["site.a.weight"] == "0.75" and mv.tags["site.b.weight"] == "0.25"  # 30 vs 10 images
    assert mv.tags["site.a.gate"] == "passed" and len(mv.tags["site.b.manifest_md5"]) == 32
    assert float(mv.tags["metric.global_val_loss"]) == pytest.approx(0.7)
    assert mv.tags["ultrafed.params_hash"] == MlflowClient().get_run(parent_run).data.tags["ultrafed.params_hash"]
    files = json.loads(mv.tags[TAG_FILES_SHA])
    assert {"MLmodel", "data/model.pth", "extra_files/lineage.json", "requirements.txt"} <= set(files)
    reqs = (_artifact_dir("ultrafed-encoder", 3) / "requirements.txt").read_text()
    from importlib.metadata import version

    assert f"torch=={version('torch')}" in reqs.splitlines()  # explicit, pinned


def test_logged_model_lands_in_the_runs_experiment_not_cwd(parent_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    register_chain(parent_run, tmp_path, 1)
    assert not (tmp_path / "mlruns").exists()
    assert str(tmp_path / "artifacts") in MlflowClient().get_model_version_download_uri("ultrafed-encoder", "1")


def test_alias_loads_by_alias_and_chain_walks_back_to_round_zero(parent_run, tmp_path):
    register_chain(parent_run, tmp_path, 3)
    MlflowClient().set_registered_model_alias("ultrafed-encoder", "candidate", "3")
    m = mlflow.pytorch.load_model("models:/ultrafed-encoder@candidate")
    assert state_sha256(m.state_dict()) == state_sha256(small_encoder(seed=2).state_dict())
    links = chain("models:/ultrafed-encoder@candidate")
    assert [(link.version, link.lineage.round, link.lineage.parent_version) for link in links] == \
        [(3, 2, 2), (2, 1, 1), (1, 0, None)]
    assert links[0].aliases == ["candidate"]
    assert chain_problems(links) == []


def test_verify_passes_then_catches_tampered_weights_and_lineage(parent_run, tmp_path):
    register_chain(parent_run, tmp_path, 2)
    checks = verify("models:/ultrafed-encoder/2")
    assert checks and not [c for c in checks if c.failed]
    assert sum(c.what.startswith("manifest") and c.status == "ok" for c in checks) == 4  # 2 sites x 2 versions
    # Tamper: flip one byte in the middle of version 1's pickled weights.
    pth = _artifact_dir("ultrafed-encoder", 1) / "data" / "model.pth"
    raw = bytearray(pth.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    pth.write_bytes(bytes(raw))
    failed = [c for c in verify("models:/ultrafed-encoder/2") if c.failed]
    assert [(c.version, c.what) for c in failed] == [("ultrafed-encoder v1", "artifact data/model.pth")]
    # Tamper: rewrite version 2's lineage.json (an excluded site "forgotten").
    lj = _artifact_dir("ultrafed-encoder", 2) / "extra_files" / "lineage.json"
    lj.write_text(lj.read_text().replace('"excluded": {}', '"excluded": {"c": "never existed"}'))
    failed = {(c.version, c.what) for c in verify("models:/ultrafed-encoder/2") if c.failed}
    assert ("ultrafed-encoder v2", "artifact extra_files/lineage.json") in failed
    assert ("ultrafed-encoder v2", "lineage.json vs tag") in failed


def test_verify_catches_changed_manifest_and_skips_unreachable(parent_run, tmp_path):
    register_chain(parent_run, tmp_path, 1)
    (tmp_path / "manifests" / "a.json").write_text('{"site": "a", "images": ["swapped.png"]}')
    (tmp_path / "manifests" / "b.json").unlink()
    checks = {c.what: c for c in verify("models:/ultrafed-encoder/1")}
    assert checks["manifest a"].status == "mismatch" and "a.json" in checks["manifest a"].detail
    assert checks["manifest b"].status == "skipped" and not checks["manifest b"].failed


def test_lineage_cli_json_and_verify_exit_code(parent_run, tmp_path, store, capsys):
    from flows.cli import main

    register_chain(parent_run, tmp_path, 2)
    assert main(["lineage", "models:/ultrafed-encoder/2", "--json", "--tracking-uri", store]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["version"] for c in out["chain"]] == [2, 1]
    assert out["chain"][0]["lineage"]["sites"][0]["weight"] == pytest.approx(0.75)
    assert main(["lineage", "models:/ultrafed-encoder/2", "--verify", "--tracking-uri", store]) == 0
    assert "-> OK" in capsys.readouterr().out
    pth = _artifact_dir("ultrafed-encoder", 2) / "data" / "model.pth"
    pth.write_bytes(pth.read_bytes()[:-100])  # truncated upload
    assert main(["lineage", "models:/ultrafed-encoder/2", "--verify", "--tracking-uri", store]) == 1
    assert "MISMATCH ultrafed-encoder v2: artifact data/model.pth" in capsys.readouterr().out
    assert main(["lineage", "models:/nope/1", "--tracking-uri", store]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ultrafed lineage: models:/nope/1:") and err.count("\n") == 1


def test_promotion_accepted_records_who_when_why_evidence(parent_run, tmp_path, store, capsys):
    from flows.cli import main

    register_chain(parent_run, tmp_path, 3)
    code = main(["promote", "ultrafed-encoder", "3", "--alias", "production", "--reason", "round 2 beats baseline",
                 "--by", "dr.who@hospital", "--tracking-uri", store])
    assert code == 0, capsys.readouterr()
    assert "ultrafed-encoder@production -> v3" in capsys.readouterr().out
    client = MlflowClient()
    assert int(client.get_model_version_by_alias("ultrafed-encoder", "production").version) == 3
    tags = client.get_model_version("ultrafed-encoder", "3").tags
    assert tags["promotion.production.by"] == "dr.who@hospital"
    assert tags["promotion.production.reason"] == "round 2 beats baseline"
    assert tags["promotion.production.at"].startswith("20")
    evidence = json.loads(tags["promotion.production.evidence"])
    assert {r["gate"] for r in evidence["results"]} == {
        "metric global_val_loss", "lineage complete", "sites passed quality gates", "artifact checksums"}
    assert all(r["passed"] for r in evidence["results"])
    assert main(["models", "--tracking-uri", store]) == 0
    table = capsys.readouterr().out
    line3 = next(ln for ln in table.splitlines() if ln.startswith("ultrafed-encoder") and " 3 " in ln)
    assert "production" in line3 and "global_val_loss=0.7" in line3
    rows = list_versions("ultrafed-encoder")
    assert [r["version"] for r in rows] == [3, 2, 1] and rows[0]["aliases"] == ["production"]


def test_promotion_refused_metric_below_threshold(parent_run, tmp_path):
    register_chain(parent_run, tmp_path, 2, val_losses=[0.9, 1.2])  # gate: global_val_loss <= 1.0
    with pytest.raises(PromotionRefused, match=r"metric global_val_loss: 1\.2 > max 1"):
        promote("ultrafed-encoder", 2, "production", reason="try")
    with pytest.raises(MlflowException):  # nothing was changed
        MlflowClient().get_model_version_by_alias("ultrafed-encoder", "production")


def test_promotion_refused_when_a_site_failed_in_any_round(parent_run, tmp_path):
    register_chain(parent_run, tmp_path, 3, gate_by_round={1: {"b": "failed"}})
    with pytest.raises(PromotionRefused, match="ultrafed-encoder v2 site b"):
        promote("ultrafed-encoder", 3, "production", reason="try")


def test_promotion_refused_when_lineage_incomplete(parent_run, tmp_path):
    register_chain(parent_run, tmp_path, 1)
    rid = start_round_run(parent_run, 1)
    lin = round_lineage(tmp_path, 1, None)  # round 1 without a parent version
    lin["sites"][0]["manifest_md5"] = ""
    register_encoder(small_encoder(5), name="ultrafed-encoder", run_id=rid, lineage=lin,
                     metrics={"global_val_loss": 0.5})
    results = {r.gate: r for r in evaluate_gates("ultrafed-encoder", 2, load_gates("ultrafed-encoder"))}
    assert results["metric global_val_loss"].passed
    assert not results["lineage complete"].passed
    assert "round 1 has no parent_version" in results["lineage complete"].detail
    assert "site a: manifest_md5 missing" in results["lineage complete"].detail
    with pytest.raises(PromotionRefused, match="lineage complete"):
        promote("ultrafed-encoder", 2, "production", reason="try")


def test_promotion_refused_when_artifact_tampered(parent_run, tmp_path, store, capsys):
    from flows.cli import main

    register_chain(parent_run, tmp_path, 1)
    (_artifact_dir("ultrafed-encoder", 1) / "MLmodel").write_text("tampered\n")
    assert main(["promote", "ultrafed-encoder", "1", "--reason", "x", "--tracking-uri", store]) == 1
    out, err = capsys.readouterr()
    assert "FAIL artifact checksums" in out and "refused to set ultrafed-encoder@production" in err


def test_gates_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "gates.yaml"
    bad.write_text("default:\n  metrics: {val_loss: 3}\n")
    with pytest.raises(ValueError, match=r"gates.yaml: metric gate 'val_loss' must be a mapping"):
        load_gates("m", bad)
    bad.write_text("default:\n  require_everything: true\n")
    with pytest.raises(ValueError, match=r"unknown gate key\(s\) \['require_everything'\]"):
        load_gates("m", bad)
    with pytest.raises(ValueError, match="gates file not found"):
        load_gates("m", tmp_path / "missing.yaml")
    g = load_gates("busi-classifier")  # the repo's mlflow/registry.yaml, pattern "*-classifier"
    assert g.metrics == {"val_auroc": {"min": 0.7}} and g.require_sites_passed


class _ClsToken(torch.nn.Module):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]


def test_task_model_points_to_encoder_version_and_chain_continues(parent_run, tmp_path, store, capsys):
    import cloudpickle

    from flows.cli import main

    register_chain(parent_run, tmp_path, 2)
    MlflowClient().set_registered_model_alias("ultrafed-encoder", "production", "2")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's own head class travels by value
    clf = torch.nn.Sequential(small_encoder(seed=1), _ClsToken(), torch.nn.Linear(32, 3))
    rid = start_round_run(parent_run, 99)
    v = register_task_model(clf, name="busi-classifier", encoder_uri="models:/ultrafed-encoder@production",
                            run_id=rid, metrics={"val_auroc": 0.81}, task="busi-classification",
                            class_names=["normal", "benign", "malignant"], img_size=32)
    links = chain(v.uri)
    assert [(link.name, link.version) for link in links] == \
        [("busi-classifier", 1), ("ultrafed-encoder", 2), ("ultrafed-encoder", 1)]
    assert links[0].lineage.encoder_uri == "models:/ultrafed-encoder/2"  # alias resolved to the version
    model = mlflow.pytorch.load_model(v.uri)
    probs = model(torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert probs.shape == (4, 3) and torch.allclose(probs.sum(1), torch.ones(4))
    results = promote("busi-classifier", 1, "production", reason="val AUROC 0.81")
    assert {r.gate for r in results} >= {"metric val_auroc", "lineage complete"}
    assert main(["lineage", "models:/busi-classifier@production", "--tracking-uri", store]) == 0
    assert "fine-tuned from models:/ultrafed-encoder/2" in capsys.readouterr().out


def test_lineage_record_problems_hand_checked():
    lin = Lineage.from_dict({"round": 2, "parent_version": 1, "strategy": "fedavg", "code_commit": "abc",
                             "params_hash": "h", "run_id": "r", "weights_sha256": "w",
                             "sites": [{"site": "a", "n_images": 3, "manifest_md5": "m", "weight": 0.6,
                                        "gate_status": "passed"},
                                       {"site": "b", "n_images": 2, "manifest_md5": "m", "weight": 0.3,
                                        "gate_status": "failed", "gate_reasons": ["blank images"]}],
                             "excluded": {"b": "timeout"}, "auditor_note": "kept"})
    assert lin.problems() == ["aggregation weights sum to 0.900000, not 1",
                              "site(s) ['b'] both participating and excluded"]
    assert lin.failed_sites() == ["b"]
    assert lin.extra == {"auditor_note": "kept"}
    assert Lineage.from_dict(lin.to_dict()) == lin
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        Lineage.from_dict({"sites": [{"site": "a", "colour": "red"}]})


@pytest.mark.slow
def test_promoted_encoder_loads_in_fresh_process_and_embeds_an_image(parent_run, tmp_path, store):
    register_chain(parent_run, tmp_path, 2)
    promote("ultrafed-encoder", 2, "production", reason="fresh process test")
    code = ("import mlflow, numpy as np, torch, cv2, sys\n"
            "m = mlflow.pytorch.load_model('models:/ultrafed-encoder@production')\n"
            "img = cv2.imread(sys.argv[1], cv2.IMREAD_GRAYSCALE)\n"
            "x = torch.from_numpy(cv2.resize(img, (32, 32))).float().div(255)[None, None]\n"
            "with torch.no_grad(): t = m(x)\n"
            "print(type(m).__name__, tuple(t.shape), float(t[0, 0].norm()))\n")
    import cv2
    import numpy as np

    img = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "probe.png"), img)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "probe.png")], capture_output=True,
                         text=True, env=env, timeout=240, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    name, shape = res.stdout.strip().splitlines()[-1].split(" (")[0], res.stdout.split("(")[1].split(")")[0]
    assert name == "ViTEncoder"
    assert shape == "1, 5, 32"  # cls + 2x2 patch tokens, 32-d
    x = torch.from_numpy(cv2.resize(img, (32, 32))).float().div(255)[None, None]
    with torch.no_grad():
        expected = float(small_encoder(seed=1)(x)[0, 0].norm())
    assert float(res.stdout.split()[-1]) == pytest.approx(expected, rel=1e-5)
