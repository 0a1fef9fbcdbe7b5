"""ultrafed.config: every value parsed to its field's type at load time, range rules in one
validate(), a params hash that ignores where a run is logged, and defaults equal to params.yaml."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from ultrafed.config import (
    DEFAULT_PARAMS, ENCODER_PRESETS, Config, ConfigError, MICConfig, from_dict, load_config, parse_override,
    parse_overrides, validate,
)


# -- defaults ----------------------------------------------------------------------------------
def test_dataclass_defaults_equal_params_yaml():
    assert load_config() == Config()


def test_params_yaml_names_every_field_and_nothing_else():
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())

    def keys(d: dict, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in d.items():
            if isinstance(v, dict) and k != "strategy_params":
                out |= keys(v, f"{prefix}{k}.")
            else:
                out.add(prefix + k)
        return out

    assert keys(raw) == set(Config().flat())


def test_defaults_are_valid():
    assert validate(Config()) == Config()


def test_dead_keys_are_gone():
    flat = Config().flat()
    assert "tracking.artifact_root" not in flat and "finetune.knn_k" not in flat
    assert "ultramim.mic.ref_size" in flat and "data.shared_root" in flat  # wired, so kept


def test_encoder_presets_match_the_model_factory():
    from ultrafed.models.mae import ENCODER_PRESETS as MODEL_PRESETS

    assert ENCODER_PRESETS == tuple(MODEL_PRESETS)


# -- parsing to the field's type ------------------------------------------------------------------
@pytest.mark.parametrize("key, text, expected", [
    ("pretrain.base_lr", "1e-3", 1e-3),         # YAML 1.1 leaves this a string
    ("pretrain.base_lr", "2", 2.0),
    ("model.img_size", "64", 64),
    ("model.img_size", "'64'", 64),              # a quoted number
    ("federated.site_timeout_s", "1_200", 1200.0),
    ("pretrain.cache_images", "false", False),
    ("pretrain.betas", "[0.8, 0.9]", (0.8, 0.9)),
    ("pretrain.betas", "['9e-1', 0.99]", (0.9, 0.99)),
    ("tracking.experiment", "2026", "2026"),
    ("federated.strategy_params", "{server_lr: 1e-2, momentum: 0.5}", {"server_lr": 0.01, "momentum": 0.5}),
])
def test_set_values_are_parsed_to_the_field_type(key, text, expected):
    cfg = load_config(overrides=parse_overrides([f"{key}={text}"]))
    value = cfg.flat()[key] if key != "pretrain.betas" else cfg.pretrain.betas
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("key, text, message", [
    ("model.img_size", "abc", "params: 'model.img_size' must be an integer, got 'abc'"),
    ("model.img_size", "2.5", "'model.img_size' must be an integer, got 2.5"),
    ("model.img_size", "true", "'model.img_size' must be an integer, got True"),
    ("pretrain.base_lr", "abc", "'pretrain.base_lr' must be a finite number, got 'abc'"),
    ("pretrain.base_lr", ".nan", "'pretrain.base_lr' must be a finite number"),
    ("pretrain.cache_images", "1", "'pretrain.cache_images' must be true or false, got 1"),
    ("pretrain.betas", "[0.9]", "'pretrain.betas' must be a list of 2 values"),
    ("pretrain.betas", "[0.9, x]", "'pretrain.betas[1]' must be a finite number, got 'x'"),
    ("pretrain.device", "[cpu]", "'pretrain.device' must be a string"),
    ("model", "3", "'model' must be a mapping of keys, got 3"),
    ("model.img_sze", "64", "unknown key 'model.img_sze' (did you mean 'model.img_size'?)"),
    ("modle.img_size", "64", "unknown key 'modle' (did you mean 'model'?)"),
    ("federated.strategy_params", "3", "'federated.strategy_params' must be a mapping"),
    ("model.img_size", "", "'model.img_size' must be an integer, got None"),
])
def test_wrong_types_and_unknown_keys_name_the_key(key, text, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=parse_overrides([f"{key}={text}"]))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("item", ["model.img_size", "=3", "model..img_size=3", ".x=1"])
def test_malformed_set_items(item):
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        parse_override(item)


def test_set_value_that_is_not_yaml():
    with pytest.raises(ConfigError, match=r"--set model.preset: .* is not a YAML value"):
        parse_override("model.preset=[tiny")


def test_dotted_strategy_params_replace_the_mapping():
    cfg = load_config(overrides=parse_overrides(["federated.strategy=fedavgm", "federated.strategy_params.momentum=0.5"]))
    assert cfg.federated.strategy_params == {"momentum": 0.5}
    validate(cfg)


def test_replace_parses_too():
    assert Config().replace(**{"model.img_size": "64"}).model.img_size == 64
    with pytest.raises(ConfigError, match="'model.img_size' must be an integer"):
        Config().replace(**{"model.img_size": "big"})


def test_from_dict_refuses_a_non_mapping():
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        from_dict([1, 2])  # type: ignore[arg-type]


# -- the params file ------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (b"model: [\n", "not valid YAML (line 2"),
    (b"- a\n- b\n", "params file must be a mapping of keys at the top, got a list"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "params file is not text (binary content)"),
    (b"model:\n  img_size: 64\nmodel:\n  img_size: 32\n", "key 'model' is written twice (line 3)"),
    (b"model:\n  img_size: abc\n", "'model.img_size' must be an integer, got 'abc'"),
])
def test_malformed_params_files_are_one_line(tmp_path: Path, content: bytes, message: str):
    p = tmp_path / "params.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert message in str(e.value) and "\n" not in str(e.value)
    if "must be an integer" not in message:
        assert str(e.value).startswith(f"{p}: ")


def test_missing_and_folder_params_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="params file is a folder"):
        load_config(tmp_path)


def test_empty_params_file_or_section_is_the_defaults(tmp_path: Path):
    (tmp_path / "p.yaml").write_text("# nothing set\n")
    assert load_config(tmp_path / "p.yaml") == Config()
    (tmp_path / "q.yaml").write_text("model:\n  # img_size: 64\nseed: 3\n")
    assert load_config(tmp_path / "q.yaml") == Config(seed=3)


def test_yaml_anchors_and_merge_keys_still_load(tmp_path: Path):
    (tmp_path / "p.yaml").write_text("pretrain: &pre {batch_size: 8}\nfinetune:\n  <<: {batch_size: 4, epochs: 9}\n  epochs: 2\n")
    cfg = load_config(tmp_path / "p.yaml")
    assert cfg.pretrain.batch_size == 8 and cfg.finetune.batch_size == 4 and cfg.finetune.epochs == 2


# -- ranges -------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, key", [
    ({"federated.rounds": 0}, "'federated.rounds' must be >= 1"),
    ({"federated.rounds": -1}, "'federated.rounds' must be >= 1"),
    ({"federated.local_epochs": 0}, "'federated.local_epochs' must be >= 1"),
    ({"federated.min_sites": 0}, "'federated.min_sites' must be >= 1"),
    ({"federated.max_concurrency": 0}, "'federated.max_concurrency' must be >= 1"),
    ({"federated.lr_horizon_rounds": -2}, "'federated.lr_horizon_rounds' must be >= 0"),
    ({"federated.site_timeout_s": 0}, "'federated.site_timeout_s' must be > 0"),
    ({"federated.norm_bound": -1}, "'federated.norm_bound' must be > 0"),
    ({"pretrain.batch_size": 0}, "'pretrain.batch_size' must be >= 1"),
    ({"pretrain.base_lr": 0}, "'pretrain.base_lr' must be > 0"),
    ({"pretrain.num_workers": -1}, "'pretrain.num_workers' must be >= 0"),
    ({"pretrain.betas": [0.9, 1.0]}, "'pretrain.betas[1]' must be in [0, 1)"),
    ({"pretrain.device": "gpu"}, "'pretrain.device' must be one of auto, cpu, cuda"),
    ({"model.mask_ratio": 1.5}, "'model.mask_ratio' must be in (0, 1)"),
    ({"model.mask_ratio": 0}, "'model.mask_ratio' must be in (0, 1)"),
    ({"model.img_size": 50}, "'model.img_size' must be a positive multiple of model.patch_size (16)"),
    ({"model.img_size": 8}, "'model.img_size' must be a positive multiple of model.patch_size (16)"),
    ({"model.preset": "huge"}, "'model.preset' must be one of tiny, small, base"),
    ({"model.decoder_dim": 100, "model.decoder_heads": 3}, "'model.decoder_dim' must be a multiple of model.decoder_heads (3)"),
    ({"model.patch_size": 0}, "'model.patch_size' must be >= 1"),
    ({"ultramim.mic.p": 1.2}, "'ultramim.mic.p' must be in [0, 1]"),
    ({"ultramim.mic.p_each": -0.1}, "'ultramim.mic.p_each' must be in [0, 1]"),
    ({"ultramim.mic.sp_amount": 0.6}, "'ultramim.mic.sp_amount' must be in [0, 0.5]"),
    ({"ultramim.mic.ref_size": 0}, "'ultramim.mic.ref_size' must be >= 1"),
    ({"ultramim.mic.gauss_sigma": 0}, "'ultramim.mic.gauss_sigma' must be > 0"),
    ({"ultramim.smat.angle_deg": 180}, "'ultramim.smat.angle_deg' must be in (0, 180)"),
    ({"ultramim.smat.r_min_frac": 1.0}, "'ultramim.smat.r_min_frac' must be in [0, 1)"),
    ({"ultramim.tgm.strength": -1}, "'ultramim.tgm.strength' must be >= 0"),
    ({"synth.sites": 0}, "'synth.sites' must be >= 1"),
    ({"synth.size": 16}, "'synth.size' must be >= 32"),
    ({"finetune.img_size": 100}, "'finetune.img_size' must be a positive multiple of model.patch_size (16)"),
    ({"finetune.layer_decay": 0}, "'finetune.layer_decay' must be in (0, 1]"),
    ({"finetune.n_boot": -1}, "'finetune.n_boot' must be >= 0"),
    ({"finetune.device": "tpu"}, "'finetune.device' must be one of auto, cpu, cuda"),
    ({"tracking.experiment": " "}, "'tracking.experiment' must not be empty"),
    ({"seed": -1}, "'seed' must be >= 0"),
    ({"federated.strategy": "fedavgx"}, "'federated.strategy' must be one of fedadam, fedavg"),
    ({"federated.strategy_params": {"mu": 0.1}}, "strategy 'fedavg': unknown parameter(s) ['mu']; allowed: none"),
    ({"federated.strategy": "fedavgm", "federated.strategy_params": {"mu": 0.1}},
     "unknown parameter(s) ['mu']; allowed: ['momentum', 'server_lr']"),
    ({"federated.strategy": "fedavgm", "federated.strategy_params": {"momentum": 1.5}},
     "fedavgm: momentum must be in [0, 1), got 1.5"),
    ({"federated.strategy": "fedprox", "federated.strategy_params": {"mu": -1}}, "fedprox: mu must be >= 0"),
    ({"federated.strategy": "trimmed_mean", "federated.strategy_params": {"beta": 0.5}}, "trimmed_mean: beta must be in [0, 0.5)"),
    ({"federated.strategy": "fedadam", "federated.strategy_params": {"tau": 0}}, "fedadam: tau must be > 0"),
    ({"federated.strategy": "qfedavg", "federated.strategy_params": {"q": "x"}},
     "'federated.strategy_params.q' must be a finite number, got 'x'"),
])
def test_out_of_range_values_name_the_key(over, key):
    cfg = load_config(overrides=over)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert key in str(e.value) and str(e.value).startswith("params: ") and "\n" not in str(e.value)


def test_every_problem_is_listed_on_one_line():
    with pytest.raises(ConfigError) as e:
        validate(load_config(overrides={"federated.rounds": 0, "model.mask_ratio": 2, "pretrain.batch_size": 0}))
    msg = str(e.value)
    assert "federated.rounds" in msg and "model.mask_ratio" in msg and "pretrain.batch_size" in msg
    assert msg.count("; ") == 2 and "\n" not in msg


def test_good_strategy_params_pass():
    for strategy, params in (("fedprox", {"mu": 0.1}), ("fedavgm", {"server_lr": 1.0, "momentum": 0.0}),
                             ("fedadam", {"server_lr": 0.01}), ("trimmed_mean", {"beta": 0.2}),
                             ("qfedavg", {"q": 0.0, "lipschitz": 1}), ("median", {})):
        validate(load_config(overrides={"federated.strategy": strategy, "federated.strategy_params": params}))


# -- the params hash ------------------------------------------------------------------------------
def test_params_hash_ignores_where_a_run_is_logged_and_its_data_lives():
    base = Config()
    moved = base.replace(**{"tracking.tracking_uri": "http://127.0.0.1:5000", "tracking.experiment": "elsewhere",
                            "tracking.registered_model": "other-encoder", "data.root": "/mnt/cohort",
                            "data.shared_root": "/srv/data", "data.manifests": "/tmp/m"})
    assert moved != base and moved.params_hash() == base.params_hash()


@pytest.mark.parametrize("key, value", [("model.img_size", 64), ("pretrain.base_lr", 1e-4), ("seed", 1),
                                        ("federated.strategy", "median"), ("ultramim.mic.ref_size", 96)])
def test_params_hash_follows_what_is_trained(key, value):
    assert Config().replace(**{key: value}).params_hash() != Config().params_hash()


# -- the YAML form --------------------------------------------------------------------------------
def test_to_yaml_loads_back_to_the_same_config(tmp_path: Path):
    cfg = Config().replace(**{"pretrain.base_lr": 1e-3, "federated.strategy": "fedavgm",
                              "federated.strategy_params": {"momentum": 0.5}, "pretrain.betas": [0.8, 0.99],
                              "finetune.baseline_weight_decay": 1e-10})
    (tmp_path / "p.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "p.yaml") == cfg
    assert "betas: [0.8, 0.99]" in cfg.to_yaml()


def test_mic_config_is_what_training_receives():
    from ultrafed.data.datasets import mic_kwargs

    assert mic_kwargs(MICConfig(ref_size=128))["ref_size"] == 128
    assert set(mic_kwargs(MICConfig())) == {f.name for f in dataclasses.fields(MICConfig)} - {"enabled"}
