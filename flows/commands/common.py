"""What the sub-commands share: the resolved and validated config, the sites, the MLflow store.

Everything here runs before any work starts, so a bad value, a malformed sites.yaml or a
site list that cannot run the config stops the command with one line (``flows/cli.py`` turns
:class:`ConfigError`, and its subclass ``SitesFileError``, into exit code 2), not after every site trained.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from ultrafed.config import Config, ConfigError, load_config, parse_overrides, validate

__all__ = ["add_config_args", "federation_env", "load_cfg", "parse_overrides", "resolve_sites", "tracking_uri"]


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--params FILE`` (also accepted before the command) and repeated ``--set KEY=VALUE``."""
    p.add_argument("--params", default=argparse.SUPPRESS, help="params.yaml to use (default: the repo's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params.yaml value, e.g. --set model.img_size=64 (read as YAML)")


def load_cfg(args: argparse.Namespace) -> Config:
    """params.yaml + ``--set`` + the flags that stand for keys (--preset, --strategy), validated."""
    over = parse_overrides(getattr(args, "set", None) or [])
    if getattr(args, "preset", None):
        over["model.preset"] = args.preset
    if getattr(args, "strategy", None):
        over["federated.strategy"] = args.strategy
    if getattr(args, "tracking_uri", None):
        over["tracking.tracking_uri"] = args.tracking_uri
    rounds = getattr(args, "rounds", None)
    if rounds is not None and rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    return validate(load_config(getattr(args, "params", None), over))


def tracking_uri(args: argparse.Namespace, cfg: Config | None = None) -> str:
    """Where this command logs: ``--tracking-uri`` or ``--set tracking.tracking_uri`` >
    ``$MLFLOW_TRACKING_URI`` > ``tracking.tracking_uri`` of the params file."""
    explicit = getattr(args, "tracking_uri", None) or parse_overrides(getattr(args, "set", None) or []).get(
        "tracking.tracking_uri")
    if explicit:
        return str(explicit)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return (cfg or load_config(getattr(args, "params", None))).tracking.tracking_uri


def resolve_sites(args: argparse.Namespace, cfg: Config) -> tuple[str, list[dict[str, Any]]]:
    """(mode, sites) from --sites / --data, else the synthetic cohort: :func:`ultrafed.federated.sitesfile.resolve_sites`."""
    from ultrafed.federated.sitesfile import resolve_sites as resolve

    return resolve(cfg, sites_file=getattr(args, "sites", None), data=getattr(args, "data", None))


def federation_env() -> dict[str, str]:
    """PREFECT_API_URL and MLFLOW_TRACKING_URI of the running rehearsal (for federation-mode rounds)."""
    from flows import federation

    st = federation.status()
    if st["info"] is None:
        return {}
    return {"PREFECT_API_URL": st["info"]["prefect_api_url"], "MLFLOW_TRACKING_URI": st["info"]["mlflow_tracking_uri"]}
