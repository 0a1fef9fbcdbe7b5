"""What the sub-commands share: the resolved and validated config, the sites, the MLflow store.

Everything here runs before any work starts, so a bad value, a malformed sites.yaml or a
site list that cannot run the config stops the command with one line (``flows/cli.py`` turns
:class:`ConfigError`, and its subclass ``SitesFileError``, into exit code 2), not after every site trained.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
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
    """(mode, sites) from --sites / --data, else the synthetic cohort (made on first use),
    checked against the config (``federated.min_sites``, ids, roots) before anything is made."""
    from ultrafed.config import REPO_ROOT
    from ultrafed.federated.sitesfile import (SitesFileError, check_sites, cohort_sites, load_sites_file,
                                              shared_data_sites)

    need = cfg.federated.min_sites
    if getattr(args, "sites", None):
        mode, sites = load_sites_file(args.sites)
        check_sites(sites, source=args.sites, min_sites=need)
        missing = [s for s in sites if s.get("root") and not Path(s["root"]).is_dir()]
        if missing:
            raise SitesFileError(f"{args.sites}: site {missing[0]['id']}: root {missing[0]['root']} is not a folder")
        return mode, sites
    if getattr(args, "data", None):
        sites = shared_data_sites(args.data)
        if not sites:
            raise SitesFileError(f"{args.data}: no busi/ddti/hc18 folders with labels.csv")
        check_sites(sites, source=args.data, min_sites=need)
        return "embedded", sites
    root = Path(cfg.data.root)
    root = root if root.is_absolute() else REPO_ROOT / root
    if not cohort_sites(root):
        if cfg.synth.sites < need:
            raise SitesFileError(f"{root}: the synthetic cohort would have synth.sites={cfg.synth.sites} site(s) "
                                 f"but federated.min_sites is {need}; no round could aggregate")
        from ultrafed.data.synth import make_cohort

        print(f"making the synthetic cohort in {root} ({cfg.synth.sites} sites x {cfg.synth.per_site} images)")
        make_cohort(root, cfg.synth.sites, cfg.synth.per_site, cfg.synth.seed, cfg.synth.size)
    sites = cohort_sites(root)
    check_sites(sites, source=root, min_sites=need)
    return "embedded", sites


def federation_env() -> dict[str, str]:
    """PREFECT_API_URL and MLFLOW_TRACKING_URI of the running rehearsal (for federation-mode rounds)."""
    from flows import federation

    st = federation.status()
    if st["info"] is None:
        return {}
    return {"PREFECT_API_URL": st["info"]["prefect_api_url"], "MLFLOW_TRACKING_URI": st["info"]["mlflow_tracking_uri"]}
