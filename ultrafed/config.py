"""Frozen configuration loaded from ``params.yaml``.

One file holds every hyper-parameter (DVC tracks it); code receives explicit arguments
exploded from these dataclasses at its boundary, never the whole config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"


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
    base_lr: float = 1.5e-4
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
    rounds: int = 3
    local_epochs: int = 1
    lr_horizon_rounds: int = 0  # rounds the LR schedule spans; 0 = the rounds of the current call
    strategy: str = "fedavg"
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    min_sites: int = 2
    max_concurrency: int = 2
    site_timeout_s: float = 3600.0
    keep_optimizer_state: bool = True
    norm_bound: float = 10.0


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlflow/mlflow.db"
    artifact_root: str = "mlflow/artifacts"
    experiment: str = "ultrafed"
    registered_model: str = "ultrafed-encoder"


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
    knn_k: int = 20
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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, the form MLflow params want."""
        return _flatten(self.to_dict())

    def params_hash(self) -> str:
        """sha256 of the resolved config (canonical JSON): the lineage's params hash."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def replace(self, **dotted: Any) -> "Config":
        """A copy with dotted overrides, e.g. ``cfg.replace(**{"model.img_size": 64})``."""
        return from_dict(_merge(self.to_dict(), _unflatten(dotted)))


class ConfigError(ValueError):
    """params.yaml (or an override) names a key that does not exist or has the wrong type."""


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


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"params: unknown key(s) {sorted(unknown)} in section '{where or 'top'}'")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, Mapping):
                raise ConfigError(f"params: '{where + '.' if where else ''}{name}' must be a mapping")
            kwargs[name] = _build(type(default), value, f"{where}.{name}".strip("."))
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"params: '{where}.{name}' must be true/false, got {value!r}")
            kwargs[name] = value
        elif isinstance(default, float) and isinstance(value, (int, float)):
            kwargs[name] = float(value)
        elif isinstance(default, int) and not isinstance(value, int):
            raise ConfigError(f"params: '{where}.{name}' must be an integer, got {value!r}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any]) -> Config:
    return _build(Config, data or {}, "")


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load ``params.yaml`` (default: the repo's) and apply dotted overrides."""
    p = Path(path) if path else DEFAULT_PARAMS
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{p}: params file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e.__class__.__name__})") from None
    if overrides:
        data = _merge(data, _unflatten(overrides))
    return from_dict(data)
