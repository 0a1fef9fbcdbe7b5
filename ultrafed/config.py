"""Frozen configuration loaded from ``params.yaml``.

One file holds every hyper-parameter (DVC tracks it); code receives explicit arguments
exploded from these dataclasses at its boundary, never the whole config.

Every value is parsed to its field's type when the config is built (``"1e-3"`` for a float is
0.001; ``"abc"`` for an integer is a :class:`ConfigError` naming the key), and
:func:`validate` checks the ranges, so a bad value stops a run before any site trains.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, get_args, get_origin, get_type_hints

import yaml

from ultrafed.yamlfile import read_yaml_mapping

from ultrafed.paths import REPO_ROOT  # noqa: E402  (re-exported for callers of ultrafed.config)
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"

# Sections that say where things are (data folders, the MLflow store and names), not what is
# trained: the params hash leaves them out, so moving a run's store or data keeps its hash.
LOCATION_SECTIONS: tuple[str, ...] = ("data", "tracking")

# ultrafed.models.mae.ENCODER_PRESETS' names (a test keeps them equal): validating a config
# must not import timm, which costs seconds on a small CPU.
ENCODER_PRESETS: tuple[str, ...] = ("tiny", "small", "base")
DP_MODES: tuple[str, ...] = ("off", "local", "central")


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/synth"
    shared_root: str = "../shared/data"
    manifests: str = "manifests"


@dataclass(frozen=True)
class SynthConfig:
    sites: int = 3
    per_site: int = 48
    size: int = 128
    seed: int = 0


@dataclass(frozen=True)
class SMATConfig:
    enabled: bool = True
    angle_deg: float = 60.0
    r_min_frac: float = 0.15


@dataclass(frozen=True)
class MICConfig:
    enabled: bool = True
    p: float = 0.5
    p_each: float = 0.5
    motion_kernel: int = 24
    gauss_sigma: float = 1.1
    sp_amount: float = 0.05
    ref_size: int = 224


@dataclass(frozen=True)
class TGMConfig:
    enabled: bool = True
    strength: float = 1.0


@dataclass(frozen=True)
class UltraMIMConfig:
    smat: SMATConfig = field(default_factory=SMATConfig)
    mic: MICConfig = field(default_factory=MICConfig)
    tgm: TGMConfig = field(default_factory=TGMConfig)


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"
    img_size: int = 96
    patch_size: int = 16
    in_chans: int = 1
    decoder_depth: int = 2
    decoder_dim: int = 128
    decoder_heads: int = 4
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True


@dataclass(frozen=True)
class PretrainConfig:
    batch_size: int = 32
    base_lr: float = 1.5e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: int = 1
    epochs: int = 2
    num_workers: int = 0
    device: str = "auto"
    min_lr: float = 0.0
    cache_images: bool = True


@dataclass(frozen=True)
class FederatedConfig:
    rounds: int = 4
    local_epochs: int = 2
    lr_horizon_rounds: int = 0  # rounds the LR schedule spans; 0 = the rounds of the current call
    strategy: str = "fedavg"
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    min_sites: int = 2
    max_concurrency: int = 2
    site_timeout_s: float = 3600.0
    keep_optimizer_state: bool = True
    norm_bound: float = 10.0
    site_liveness_s: float = 15.0  # a site whose worker is silent this long is declared gone (federation mode)


@dataclass(frozen=True)
class DPConfig:
    mode: str = "off"  # off | local (DP-SGD at each site) | central (DP-FedAvg at the coordinator)
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: float = 1e-5
    max_epsilon: float = 0.0  # 0 = no budget; else a run stops before the round that would exceed it


@dataclass(frozen=True)
class PrivacyConfig:
    dp: DPConfig = field(default_factory=DPConfig)
    secure_aggregation: bool = False


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlflow/mlflow.db"
    experiment: str = "ultrafed"
    registered_model: str = "ultrafed-encoder"
    picture_every: int = 5


@dataclass(frozen=True)
class FinetuneConfig:
    img_size: int = 96
    epochs: int = 10
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    warmup_epochs: float = 1.0
    num_workers: int = 0
    device: str = "auto"
    n_boot: int = 1000
    baseline_img_size: int = 128
    baseline_lr: float = 1e-3
    baseline_weight_decay: float = 1e-4


@dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    ultramim: UltraMIMConfig = field(default_factory=UltraMIMConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, the form MLflow params want."""
        return _flatten(self.to_dict())

    def to_yaml(self) -> str:
        """The resolved config as a params file (loads back to an equal Config)."""
        return yaml.dump(self.to_dict(), Dumper=_ParamsDumper, sort_keys=False)

    def params_hash(self) -> str:
        """sha256 of what is trained (canonical JSON, without :data:`LOCATION_SECTIONS`): the lineage's params hash."""
        content = {k: v for k, v in self.to_dict().items() if k not in LOCATION_SECTIONS}
        blob = json.dumps(content, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def replace(self, **dotted: Any) -> "Config":
        """A copy with dotted overrides, e.g. ``cfg.replace(**{"model.img_size": 64})``."""
        return from_dict(_merge(self.to_dict(), _unflatten(dotted)))


class _ParamsDumper(yaml.SafeDumper):
    """params.yaml's layout: sections as blocks, lists inline (``betas: [0.9, 0.95]``)."""


_ParamsDumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


class ConfigError(ValueError):
    """params.yaml (or an override) names a key that does not exist, or a value of the wrong type or range."""


# -- plain data <-> dotted keys ----------------------------------------------------------------

def _to_plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and key != "federated.strategy_params":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _unflatten(dotted: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in dotted.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k != "strategy_params":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# -- parsing each value to its field's type ----------------------------------------------------

_NUMBER = re.compile(r"^[-+]?(\d[\d_]*)?(\.\d*)?([eE][-+]?\d+)?$")  # YAML 1.1 leaves 1e-3 a string


def _number(text: str) -> float | None:
    """``"1e-3"`` -> 0.001; None when ``text`` is not a plain decimal number."""
    t = text.strip()
    if not t or not _NUMBER.match(t) or not any(c.isdigit() for c in t):
        return None
    return float(t.replace("_", ""))


def _bad(key: str, wanted: str, value: Any) -> ConfigError:
    return ConfigError(f"params: '{key}' must be {wanted}, got {value!r}")


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise _bad(key, "a number", value)
    out = _number(value) if isinstance(value, str) else float(value) if isinstance(value, (int, float)) else None
    if out is None or not math.isfinite(out):
        raise _bad(key, "a finite number", value)
    return out


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise _bad(key, "an integer", value)
    if isinstance(value, int):
        return value
    num = _number(value) if isinstance(value, str) else float(value) if isinstance(value, float) else None
    if num is None or not math.isfinite(num) or not num.is_integer():
        raise _bad(key, "an integer", value)
    return int(num)


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _bad(key, "true or false", value)


def _as_str(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _bad(key, "a string", value)


def _as_tuple(value: Any, args: tuple[Any, ...], key: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise _bad(key, "a list", value)
    variadic = len(args) == 2 and args[1] is Ellipsis
    if not variadic and len(value) != len(args):
        raise _bad(key, f"a list of {len(args)} values", value)
    types = [args[0]] * len(value) if variadic else list(args)
    return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, types)))


def _as_mapping(value: Any, key: str) -> dict[str, Any]:
    """A free-form mapping (strategy parameters): string keys, numeric strings read as numbers."""
    if not isinstance(value, Mapping):
        raise _bad(key, "a mapping", value)
    return {_as_str(k, f"{key} key"): _scalar(v) for k, v in value.items()}


def _scalar(value: Any) -> Any:
    """A numeric string (``"1e-3"``, ``"10"``) as its number; anything else unchanged."""
    num = _number(value) if isinstance(value, str) else None
    if num is None:
        return value
    return int(num) if re.fullmatch(r"[-+]?\d+", value.strip()) else num


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the type ``hint`` of field ``key``, or a ConfigError naming the key."""
    if dataclasses.is_dataclass(hint):
        if value is None:  # a section whose keys are all commented out: its defaults
            value = {}
        if not isinstance(value, Mapping):
            raise _bad(key, "a mapping of keys", value)
        return _build(hint, value, key)
    scalar = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}.get(hint)
    if scalar is not None:
        return scalar(value, key)
    origin = get_origin(hint)
    if origin is tuple:
        return _as_tuple(value, get_args(hint), key)
    if origin in (dict, collections.abc.Mapping):
        return _as_mapping(value, key)
    if hint is Any:
        return value
    raise TypeError(f"config: field {key} has a type the parser does not know: {hint!r}")


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """``cls`` from ``data``: every key known, every value parsed to its field's type."""
    hints = get_type_hints(cls)
    unknown = [k for k in data if k not in hints]
    if unknown:
        raise ConfigError("params: " + "; ".join(_unknown(str(k), where, list(hints)) for k in unknown))
    return cls(**{name: _coerce(value, hints[name], f"{where}.{name}" if where else name)
                  for name, value in data.items()})


def _unknown(name: str, where: str, known: list[str]) -> str:
    key = f"{where}.{name}" if where else name
    close = difflib.get_close_matches(name, known, n=1)
    return f"unknown key '{key}'" + (f" (did you mean '{(where + '.') if where else ''}{close[0]}'?)" if close else "")


def from_dict(data: Mapping[str, Any]) -> Config:
    """A Config from plain data (params.yaml's shape); ConfigError names the first bad key."""
    if data is None:
        return Config()
    if not isinstance(data, Mapping):
        raise ConfigError(f"params: must be a mapping of sections, got {type(data).__name__}")
    return _build(Config, data, "")


# -- overrides (--set KEY=VALUE) ---------------------------------------------------------------

def parse_override(item: str) -> tuple[str, Any]:
    """``"model.img_size=64"`` -> ``("model.img_size", 64)``; the value is read as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects KEY=VALUE (e.g. model.img_size=64), got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: {text!r} is not a YAML value ({getattr(e, 'problem', None) or type(e).__name__})") from None
    return key, value


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Every ``--set`` item as a dotted key -> value (the last of a key wins)."""
    return dict(parse_override(item) for item in items)


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load ``params.yaml`` (default: the repo's) and apply dotted overrides; types are parsed, ranges not (see :func:`validate`)."""
    data = read_yaml_mapping(Path(path) if path else DEFAULT_PARAMS, "params file", ConfigError)
    if overrides:
        data = _merge(data, _unflatten(overrides))
    return from_dict(data)


# -- ranges ------------------------------------------------------------------------------------

_AT_LEAST_1 = ("synth.sites", "synth.per_site", "ultramim.mic.motion_kernel", "ultramim.mic.ref_size",
               "model.patch_size", "model.in_chans", "model.decoder_depth", "model.decoder_dim",
               "model.decoder_heads", "pretrain.batch_size", "pretrain.epochs", "federated.rounds",
               "federated.local_epochs", "federated.min_sites", "federated.max_concurrency",
               "finetune.epochs", "finetune.batch_size")
_AT_LEAST_0 = ("seed", "privacy.dp.noise_multiplier", "privacy.dp.max_epsilon", "synth.seed", "ultramim.tgm.strength", "pretrain.weight_decay", "pretrain.warmup_epochs",
               "pretrain.num_workers", "pretrain.min_lr", "federated.lr_horizon_rounds", "tracking.picture_every", "finetune.weight_decay",
               "finetune.warmup_epochs", "finetune.num_workers", "finetune.n_boot", "finetune.baseline_weight_decay")
_POSITIVE = ("ultramim.mic.gauss_sigma", "pretrain.base_lr", "federated.site_timeout_s", "federated.norm_bound",
             "federated.site_liveness_s", "privacy.dp.clip_norm",
             "finetune.lr", "finetune.baseline_lr")
# key -> (low, high, low inclusive, high inclusive)
_INTERVALS: dict[str, tuple[float, float, bool, bool]] = {
    "ultramim.smat.angle_deg": (0.0, 180.0, False, False),
    "ultramim.smat.r_min_frac": (0.0, 1.0, True, False),
    "ultramim.mic.p": (0.0, 1.0, True, True),
    "ultramim.mic.p_each": (0.0, 1.0, True, True),
    "ultramim.mic.sp_amount": (0.0, 0.5, True, True),
    "model.mask_ratio": (0.0, 1.0, False, False),
    "pretrain.betas[0]": (0.0, 1.0, True, False),
    "pretrain.betas[1]": (0.0, 1.0, True, False),
    "finetune.layer_decay": (0.0, 1.0, False, True),
    "privacy.dp.delta": (0.0, 1.0, False, False),
}
_MIN_IMAGE = {"synth.size": 32, "finetune.baseline_img_size": 32}
_NON_EMPTY = ("data.root", "data.shared_root", "data.manifests", "tracking.tracking_uri", "tracking.experiment",
              "tracking.registered_model")


def _interval(lo: float, hi: float, lo_in: bool, hi_in: bool) -> str:
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def _range_problems(flat: Mapping[str, Any]) -> list[str]:
    """One message per value outside its range (single-key rules)."""
    flat = {**flat, **{f"pretrain.betas[{i}]": b for i, b in enumerate(flat["pretrain.betas"])}}
    out = [f"'{k}' must be >= 1, got {flat[k]!r}" for k in _AT_LEAST_1 if flat[k] < 1]
    out += [f"'{k}' must be >= 0, got {flat[k]!r}" for k in _AT_LEAST_0 if flat[k] < 0]
    out += [f"'{k}' must be > 0, got {flat[k]!r}" for k in _POSITIVE if flat[k] <= 0]
    out += [f"'{k}' must be >= {lo}, got {flat[k]!r}" for k, lo in _MIN_IMAGE.items() if flat[k] < lo]
    out += [f"'{k}' must not be empty" for k in _NON_EMPTY if not str(flat[k]).strip()]
    for key, (lo, hi, lo_in, hi_in) in _INTERVALS.items():
        v = flat[key]
        if not ((lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi)):
            out.append(f"'{key}' must be {_interval(lo, hi, lo_in, hi_in)}, got {v!r}")
    return out


def _choice_problems(cfg: Config) -> list[str]:
    """Names that must be one of a known set (encoder preset, device)."""
    from ultrafed.engine.device import DEVICE_CHOICES

    out = []
    for key, value, choices in (("model.preset", cfg.model.preset, tuple(ENCODER_PRESETS)),
                                ("pretrain.device", cfg.pretrain.device, DEVICE_CHOICES),
                                ("finetune.device", cfg.finetune.device, DEVICE_CHOICES),
                                ("privacy.dp.mode", cfg.privacy.dp.mode, DP_MODES)):
        if value not in choices:
            out.append(f"'{key}' must be one of {', '.join(choices)}, got {value!r}")
    return out


def _shape_problems(m: ModelConfig, finetune_img_size: int) -> list[str]:
    """Sizes that must fit together: images in whole patches, the decoder width in whole heads."""
    out = []
    p = m.patch_size
    if p >= 1 and (m.img_size < p or m.img_size % p):
        out.append(f"'model.img_size' must be a positive multiple of model.patch_size ({p}), got {m.img_size}")
    if p >= 1 and (finetune_img_size < p or finetune_img_size % p):
        out.append(f"'finetune.img_size' must be a positive multiple of model.patch_size ({p}), got {finetune_img_size}")
    if m.decoder_heads >= 1 and m.decoder_dim % m.decoder_heads:
        out.append(f"'model.decoder_dim' must be a multiple of model.decoder_heads ({m.decoder_heads}), "
                   f"got {m.decoder_dim}")
    return out


def strategy_problem(name: str, params: Mapping[str, Any]) -> str | None:
    """Why ``federated.strategy`` / ``strategy_params`` cannot aggregate, or None.

    The strategy itself is run once on a one-number model, so its own range checks (a
    momentum in [0, 1), a positive server_lr, ...) speak now instead of after every site trained.
    """
    import torch

    from ultrafed.federated.strategies import STRATEGIES, SiteUpdate, aggregate, resolve_params

    if name not in STRATEGIES:
        return f"'federated.strategy' must be one of {', '.join(sorted(STRATEGIES))}, got {name!r}"
    try:
        resolve_params(name, params)
    except ValueError as e:
        return f"'federated.strategy_params': {e}"
    for k, v in params.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"'federated.strategy_params.{k}' must be a finite number, got {v!r}"
    w = torch.zeros(1)
    try:
        aggregate(name, {"w": w}, [SiteUpdate(site="probe", state={"w": w.clone()}, n=1, loss=1.0)], **params)
    except (ValueError, TypeError) as e:
        return f"'federated.strategy_params': {e}"
    return None


def validate(cfg: Config) -> Config:
    """``cfg`` when every value is in range; else one ConfigError listing each problem (one line)."""
    problems = _range_problems(cfg.flat())
    problems += _choice_problems(cfg)
    problems += _shape_problems(cfg.model, cfg.finetune.img_size)
    bad_strategy = strategy_problem(cfg.federated.strategy, cfg.federated.strategy_params)
    if bad_strategy:
        problems.append(bad_strategy)
    if problems:
        raise ConfigError("params: " + "; ".join(problems))
    return cfg
