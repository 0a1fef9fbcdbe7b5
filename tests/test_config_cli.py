"""The CLI stops a bad configuration before any work: one line on stderr naming the key or the
file, exit code 2, no run folder, no MLflow store, no training call. ``ultrafed config`` prints
what a run would use, and every command logs where ``tracking.tracking_uri`` says.

The training entry points (flows.pretrain.run_pretrain, tasks.finetune.finetune_and_register)
are replaced by recorders, so "no work" is checked directly and a good config is seen to reach
them; nothing trains here.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from ultrafed.config import load_config


class World:
    """A temp home, MLflow store and two site folders; the calls the training entry points got."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.home, self.db = tmp, tmp / "home", tmp / "mlflow.db"
        self.calls: list[tuple[str, tuple, dict]] = []
        for s in ("a", "b"):
            (tmp / "sites" / s).mkdir(parents=True)
        self.sites = self.write("sites.yaml", "sites:\n  - id: a\n    root: sites/a\n  - id: b\n    root: sites/b\n")

    def write(self, name: str, text: str | bytes) -> Path:
        p = self.tmp / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p

    def record(self, name: str, result: dict) -> Any:
        def fn(*a: Any, **k: Any) -> dict:
            self.calls.append((name, a, k))
            return result
        return fn

    def no_work(self) -> None:
        """No training call, no run folder or file under the home (importing ``flows`` may make
        its empty prefect/ folder), no MLflow store, no synthetic cohort."""
        assert self.calls == []
        assert not (self.home / "runs").exists() and not [p for p in self.home.rglob("*") if p.is_file()]
        assert not self.db.exists() and not (self.tmp / "cohort").exists()


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import mlflow

    w = World(tmp_path)
    monkeypatch.setenv("ULTRAFED_HOME", str(w.home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{w.db}")
    pre = types.ModuleType("flows.pretrain")
    pre.run_pretrain = w.record("pretrain", {"model_uri": "models:/ultrafed-encoder/1", "version": 1, "history": [
        {"round": 0, "metrics": {"train_loss": 1.0}, "version": 1, "model_uri": "models:/ultrafed-encoder/1"}]})
    ft = types.ModuleType("tasks.finetune")
    ft.finetune_and_register = w.record("finetune", {"task": "synth-cls", "val": {}, "test": None,
                                                     "model_uri": None, "wall_s": 0.0})
    monkeypatch.setitem(sys.modules, "flows.pretrain", pre)
    monkeypatch.setitem(sys.modules, "tasks.finetune", ft)
    prev = mlflow.get_tracking_uri()
    yield w
    mlflow.set_tracking_uri(prev)
    mlflow.set_registry_uri(prev)


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from flows.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(err: str, prefix: str, *needles: str) -> None:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(prefix), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


# -- bad values: pretrain -------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--set", "pretrain.base_lr=abc"], "'pretrain.base_lr' must be a finite number, got 'abc'"),
    (["--set", "model.img_size=abc"], "'model.img_size' must be an integer, got 'abc'"),
    (["--set", "model.img_size=50"], "'model.img_size' must be a positive multiple of model.patch_size"),
    (["--set", "model.no_such_key=1"], "unknown key 'model.no_such_key'"),
    (["--strategy", "fedavgx"], "'federated.strategy' must be one of"),
    (["--set", "pretrain.batch_size=0"], "'pretrain.batch_size' must be >= 1"),
    (["--set", "model.mask_ratio=1.5"], "'model.mask_ratio' must be in (0, 1)"),
    (["--set", "federated.local_epochs=0"], "'federated.local_epochs' must be >= 1"),
    (["--set", "federated.rounds=-1"], "'federated.rounds' must be >= 1"),
    (["--set", "federated.strategy=fedavgm", "--set", "federated.strategy_params={mu: 1}"],
     "strategy 'fedavgm': unknown parameter(s) ['mu']"),
    (["--set", "federated.strategy=fedavgm", "--set", "federated.strategy_params.momentum=1.5"],
     "momentum must be in [0, 1)"),
    (["--set", "ultramim.mic.p=2"], "'ultramim.mic.p' must be in [0, 1]"),
    (["--set", "federated.min_sites=3"], "2 site(s) but federated.min_sites is 3"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--rounds", "-1"], "--rounds must be >= 1, got -1"),
    (["--set", "model.img_size"], "--set expects KEY=VALUE"),
])
def test_pretrain_refuses_bad_values_before_any_work(world: World, capsys, argv, needle):
    rc, out, err = cli(["pretrain", "--sites", str(world.sites), *argv], capsys)
    assert rc == 2
    assert_one_line(err, "ultrafed pretrain: ", needle)
    world.no_work()


def test_argparse_errors_are_one_line_too(world: World, capsys):
    rc, _, err = cli(["pretrain", "--rounds", "abc"], capsys)
    assert rc == 2
    assert_one_line(err, "ultrafed pretrain: ", "--rounds: invalid int value: 'abc'")
    world.no_work()


# -- malformed sites.yaml -------------------------------------------------------------------------
@pytest.mark.parametrize("content, needle", [
    ("sites: [\n", "not valid YAML (line 2"),
    ("- id: a\n- id: b\n", "sites file must be a mapping of keys at the top, got a list"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00\xff\xfe\x00", "sites file is not text (binary content)"),
    ("sites:\n  - id: a\n    root: sites/a\n  - id: a\n    root: sites/b\n", "duplicate site id 'a'"),
    ("sites:\n  - id: a\n    root: sites/a\n  - id: b\n", "site b needs a 'root' folder in embedded mode"),
    ("sites:\n  - id: a\n    root: sites/a\n  - id: b\n    root: sites/../sites/a\n",
     "sites a and b have the same root"),
    ("sites:\n  - id: a\n    root: sites/a\n  - id: b\n    root: sites/nowhere\n", "site b: root"),
    ("sites:\n  - id: a\n    root: sites/a\n    rooot: x\n", "site #1 has unknown key(s) ['rooot']"),
    ("site:\n  - id: a\n", "unknown key(s) ['site'] at the top"),
    ("sites: {a: sites/a}\n", "'sites' must be a list of sites"),
    ("sites:\n  - id: Bad Id\n    root: sites/a\n", "id 'Bad Id' must be lowercase"),
    ("mode: central\nsites: []\n", "mode must be 'embedded' or 'federation'"),
    ("sites:\n  - id: a\n    root: sites/a\nsites: []\n", "key 'sites' is written twice"),
    ("", "no sites listed"),
])
def test_malformed_sites_file_is_one_line_naming_it(world: World, capsys, content, needle):
    bad = world.write("bad-sites.yaml", content)
    rc, _, err = cli(["pretrain", "--sites", str(bad)], capsys)
    assert rc == 2
    assert_one_line(err, f"ultrafed pretrain: {bad}: ", needle)
    world.no_work()


def test_missing_sites_file(world: World, capsys):
    rc, _, err = cli(["pretrain", "--sites", str(world.tmp / "absent.yaml")], capsys)
    assert rc == 2
    assert_one_line(err, "ultrafed pretrain: ", "absent.yaml: sites file not found")
    world.no_work()


def test_data_folder_without_datasets(world: World, capsys):
    rc, _, err = cli(["pretrain", "--data", str(world.tmp / "sites")], capsys)
    assert rc == 2
    assert_one_line(err, "ultrafed pretrain: ", "no busi/ddti/hc18 folders")
    world.no_work()


def test_synthetic_cohort_too_small_for_min_sites_is_not_made(world: World, capsys):
    rc, _, err = cli(["pretrain", "--set", f"data.root={world.tmp / 'cohort'}", "--set", "synth.sites=1"], capsys)
    assert rc == 2
    assert_one_line(err, "ultrafed pretrain: ", "synth.sites=1 site(s) but federated.min_sites is 2")
    world.no_work()


def test_bad_params_file(world: World, capsys):
    bad = world.write("params.yaml", "- just\n- a list\n")
    rc, _, err = cli(["--params", str(bad), "pretrain", "--sites", str(world.sites)], capsys)
    assert rc == 2
    assert_one_line(err, f"ultrafed pretrain: {bad}: ", "must be a mapping")
    world.no_work()


# -- a good config reaches training (the recorder sees it) ------------------------------------------
def test_good_values_reach_training_parsed(world: World, capsys):
    import mlflow

    rc, out, err = cli(["pretrain", "--sites", str(world.sites), "--rounds", "1", "--set", "pretrain.base_lr=1e-3",
                        "--set", "federated.strategy=fedprox", "--set", "federated.strategy_params={mu: 1e-2}"], capsys)
    assert rc == 0, err
    [(name, (cfg, sites), kw)] = world.calls
    assert name == "pretrain" and kw["rounds"] == 1 and [s["id"] for s in sites] == ["a", "b"]
    assert cfg["pretrain"]["base_lr"] == 0.001 and isinstance(cfg["pretrain"]["base_lr"], float)
    assert cfg["federated"]["strategy_params"] == {"mu": 0.01}
    assert mlflow.get_tracking_uri() == f"sqlite:///{world.db}" and world.db.exists()


# -- tracking.tracking_uri is honoured ------------------------------------------------------------
def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from flows.commands.common import tracking_uri

    params = tmp_path / "p.yaml"
    params.write_text("tracking:\n  tracking_uri: sqlite:///from-params.db\n")
    ns = argparse.Namespace
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(ns(params=str(params), set=[], tracking_uri=None)) == "sqlite:///from-params.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking_uri(ns(params=str(params), set=[], tracking_uri=None)) == "http://env:5000"
    assert tracking_uri(ns(params=str(params), set=["tracking.tracking_uri=http://set:1"], tracking_uri=None)) \
        == "http://set:1"
    assert tracking_uri(ns(params=str(params), set=[], tracking_uri="http://flag:2")) == "http://flag:2"


def _params_logging_to(world: World, name: str) -> tuple[Path, Path]:
    db = world.tmp / name
    return world.write(f"params-{name}.yaml", f"tracking:\n  tracking_uri: sqlite:///{db}\n"), db


def test_pretrain_logs_where_the_params_file_says(world: World, capsys, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    params, db = _params_logging_to(world, "params-store.db")
    rc, _, err = cli(["--params", str(params), "pretrain", "--sites", str(world.sites)], capsys)
    assert rc == 0, err
    assert mlflow.get_tracking_uri() == f"sqlite:///{db}" and db.exists()
    [(_, (cfg, _sites), _kw)] = world.calls
    assert cfg["tracking"]["tracking_uri"] == f"sqlite:///{db}"


def test_env_store_wins_over_the_params_file_and_the_run_records_it(world: World, capsys):
    import mlflow

    params, db = _params_logging_to(world, "not-this.db")
    rc, _, err = cli(["--params", str(params), "pretrain", "--sites", str(world.sites)], capsys)
    assert rc == 0, err
    assert mlflow.get_tracking_uri() == f"sqlite:///{world.db}" and not db.exists()
    [(_, (cfg, _sites), _kw)] = world.calls
    assert cfg["tracking"]["tracking_uri"] == f"sqlite:///{world.db}"


def test_finetune_logs_where_the_params_file_says_and_refuses_bad_values(world: World, capsys, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    params, db = _params_logging_to(world, "ft-store.db")
    rc, _, err = cli(["finetune", "--params", str(params), "--task", "synth-cls", "--data", str(world.tmp),
                      "--set", "finetune.batch_size=0"], capsys)
    assert rc == 2
    assert_one_line(err, "ultrafed finetune: ", "'finetune.batch_size' must be >= 1")
    assert world.calls == [] and not db.exists()
    rc, _, err = cli(["finetune", "--params", str(params), "--task", "synth-cls", "--data", str(world.tmp)], capsys)
    assert rc == 0, err
    assert [c[0] for c in world.calls] == ["finetune"]
    assert mlflow.get_tracking_uri() == f"sqlite:///{db}" and db.exists()


def test_registry_commands_read_the_params_store(world: World, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    params, db = _params_logging_to(world, "registry-store.db")
    rc, out, err = cli(["--params", str(params), "models"], capsys)
    assert rc == 0, err
    assert "no registered models" in out and db.exists()


def test_finetune_real_task_default_is_data_shared_root(world: World, monkeypatch):
    from flows.commands.finetune import default_data_root

    real = world.tmp / "real"
    (real / "busi").mkdir(parents=True)
    (real / "busi" / "labels.csv").write_text("file,label\n")
    monkeypatch.delenv("ULTRAFED_SHARED_DATA", raising=False)
    cfg = load_config(overrides={"data.shared_root": str(real)})
    assert default_data_root("busi-cls", cfg) == str(real)
    assert default_data_root("busi-cls", load_config(overrides={"data.shared_root": str(world.tmp)})) is None
    monkeypatch.setenv("ULTRAFED_SHARED_DATA", str(real))
    assert default_data_root("busi-cls", load_config(overrides={"data.shared_root": str(world.tmp)})) == str(real)


# -- other commands -------------------------------------------------------------------------------
def test_data_synth_refuses_a_bad_params_file(world: World, capsys):
    bad = world.write("params.yaml", "synth:\n  sites: many\n")
    rc, _, err = cli(["--params", str(bad), "data", "synth", "--out", str(world.tmp / "cohort")], capsys)
    assert rc == 2
    assert_one_line(err, "ultrafed data synth: ", "'synth.sites' must be an integer, got 'many'")
    world.no_work()


def test_federation_up_needs_a_site(world: World, capsys):
    rc, _, err = cli(["federation", "up", "--sites", "0"], capsys)
    assert rc == 2
    assert_one_line(err, "ultrafed federation up: ", "--sites must be >= 1")


# -- ultrafed config ------------------------------------------------------------------------------
SETS = ["--set", "pretrain.base_lr=1e-3", "--set", "federated.strategy=fedprox",
        "--set", "federated.strategy_params={mu: 0.05}", "--set", "model.img_size=64", "--set", "pretrain.betas=[0.8, 0.9]"]


def test_config_prints_what_a_run_would_use_and_round_trips(world: World, capsys):
    from flows.commands.common import load_cfg

    rc, out, err = cli(["config", *SETS], capsys)
    assert rc == 0, err
    printed = world.write("resolved.yaml", out)
    expected = load_cfg(argparse.Namespace(params=None, set=SETS[1::2]))
    expected = expected.replace(**{"tracking.tracking_uri": f"sqlite:///{world.db}"})  # the store a run would use
    assert load_config(printed) == expected
    assert expected.pretrain.base_lr == 0.001 and expected.model.img_size == 64
    rc, again, _ = cli(["config", "--params", str(printed)], capsys)  # --params after the command works too
    assert rc == 0 and again.splitlines()[1:] == out.splitlines()[1:]
    world.no_work()


@pytest.mark.parametrize("argv, needle", [
    (["--set", "model.img_size=abc"], "'model.img_size' must be an integer, got 'abc'"),
    (["--set", "federated.rounds=0"], "'federated.rounds' must be >= 1"),
    (["--set", "nope=1"], "unknown key 'nope'"),
])
def test_config_refuses_bad_values(world: World, capsys, argv, needle):
    rc, out, err = cli(["config", *argv], capsys)
    assert rc == 2 and out == ""
    assert_one_line(err, "ultrafed config: ", needle)
