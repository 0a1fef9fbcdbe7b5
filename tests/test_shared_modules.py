"""The leaf modules every layer shares (paths, files, protocol names, tracking names), and the
rule that committed documents name no folder of the machine that wrote them."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from ultrafed import files, paths, protocol
from ultrafed.tracking import names

REPO = Path(__file__).resolve().parents[1]


def test_home_is_read_at_each_call(monkeypatch):
    monkeypatch.delenv("ULTRAFED_HOME", raising=False)
    assert paths.ultrafed_home() == paths.REPO_ROOT / ".ultrafed" == paths.DEFAULT_HOME
    monkeypatch.setenv("ULTRAFED_HOME", "/srv/uf")
    assert paths.ultrafed_home() == Path("/srv/uf")
    monkeypatch.setenv("ULTRAFED_HOME", "")  # empty: the default, not the working directory
    assert paths.ultrafed_home() == paths.DEFAULT_HOME


def test_home_users_follow_the_variable(monkeypatch, tmp_path):
    from flows import federation
    from ultrafed.tracking import server

    monkeypatch.setenv("ULTRAFED_HOME", str(tmp_path))
    assert server.default_root() == tmp_path / "mlflow-server"
    assert federation.state_dir() == tmp_path / "federation"


def test_repo_paths_and_neutral_text():
    assert paths.REPO_ROOT == REPO
    assert paths.repo_path("mlflow/mlflow.db") == REPO / "mlflow" / "mlflow.db"
    assert paths.repo_path("/abs/x") == Path("/abs/x")
    cmd = f"ultrafed pretrain --data {REPO.parent}/shared/data --metrics-out {REPO}/.ultrafed/results/out/a.json"
    assert paths.neutral(cmd) == "ultrafed pretrain --data ../shared/data --metrics-out .ultrafed/results/out/a.json"
    assert paths.neutral("/elsewhere/x") == "/elsewhere/x"


def test_read_reason_words_each_failure():
    assert files.read_reason(FileNotFoundError(2, "No such file")) == "file not found"
    assert files.read_reason(IsADirectoryError(21, "Is a directory"), directory="a folder") == "a folder"
    assert files.read_reason(PermissionError(13, "Permission denied")) == "cannot read (Permission denied)"


def test_file_digests(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_bytes(b"alpha")
    (tmp_path / "sub" / "b.bin").write_bytes(b"\0" * (3 << 20))
    assert files.file_digest(tmp_path / "a.txt", "md5") == hashlib.md5(b"alpha").hexdigest()
    assert files.files_sha256(tmp_path) == {"a.txt": hashlib.sha256(b"alpha").hexdigest(),
                                            "sub/b.bin": hashlib.sha256(b"\0" * (3 << 20)).hexdigest()}


def test_protocol_names():
    assert [protocol.primary_metric(t) for t in protocol.TASKS] == ["auroc", "dice", "dice", "dice"]
    assert protocol.primary_metric("synth-cls") == "auroc" and protocol.primary_metric("synth-seg") == "dice"
    assert protocol.RUN_STATUS["failed"] == "FAILED" and set(protocol.RUN_STATUS) == set(protocol.STATUSES)
    assert protocol.is_baseline("baseline-unet") and not protocol.is_baseline(protocol.SCRATCH)
    assert set(protocol.VARIANT_ORDER) >= {protocol.FEDERATED, protocol.CENTRAL, protocol.PLAIN_MAE,
                                           *(a for a, _ in protocol.ABLATIONS)}


def test_engine_selects_on_the_protocols_metric():
    from ultrafed.data.tasks import get_task
    from ultrafed.engine.finetune import primary_metric

    for task in ("busi-cls", "ddti-seg"):
        assert primary_metric(get_task(task)) == protocol.primary_metric(task)


def test_models_uris():
    assert names.parse_models_uri("models:/ultrafed-encoder/3") == ("ultrafed-encoder", "3")
    assert names.parse_models_uri("models:/busi-classifier@production") == ("busi-classifier", "@production")
    for bad in ("runs:/x/y", "models:/noversion"):
        with pytest.raises(ValueError):
            names.parse_models_uri(bad)
    assert names.tag_value({"b": 1, "a": [2]}) == '{"a": [2], "b": 1}' and len(names.tag_value("x" * 9000)) == 4900


def test_lineage_and_registry_do_not_import_each_other():
    text = {m: (REPO / "ultrafed" / "tracking" / f"{m}.py").read_text() for m in ("lineage", "registry", "names")}
    assert "ultrafed.tracking.registry" not in text["lineage"]
    assert "tracking.promotion import" not in text["registry"] and "tracking.lineage import" not in text["names"]
    assert "from ultrafed" not in text["names"]


def test_report_names_the_store_without_a_machine_path():
    from ultrafed.report import store_label

    assert store_label(f"sqlite:///{REPO}/.ultrafed/results/mlflow.db") == "sqlite:///.ultrafed/results/mlflow.db"
    assert store_label("sqlite:////var/stores/results.db") == "sqlite:///<outside the repository>/results.db"
    assert store_label("http://user:secret@127.0.0.1:5000") == "http://127.0.0.1:5000"


_MACHINE_PATH = re.compile(r"(?<![\w.$/-])/(?:root|home|work|tmp|Users|mnt)/")


@pytest.mark.parametrize("doc", ["docs/RESULTS.md", *sorted(str(p.relative_to(REPO)) for p in
                                                            (REPO / "docs" / "results" / "gpu").iterdir())])
def test_committed_results_name_no_machine_path(doc):
    text = (REPO / doc).read_text()
    assert str(REPO.parent) + "/" not in text
    assert not _MACHINE_PATH.search(text), _MACHINE_PATH.search(text)
