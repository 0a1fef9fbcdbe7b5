"""``ultrafed config``: the resolved configuration a run would use, as YAML.

params.yaml, then every ``--set``, parsed to each field's type and validated; the MLflow store
is the one a run would log to ($MLFLOW_TRACKING_URI wins over the file). The output is itself
a params file: ``ultrafed config --set ... > my.yaml`` and ``ultrafed --params my.yaml ...``
runs the same configuration.
"""
from __future__ import annotations

import argparse

from flows.commands.common import add_config_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved configuration (params.yaml + --set) as YAML",
                       description="Print what a run would use; exit 2 with one line naming the key when a "
                                   "value is of the wrong type, unknown or out of range.")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flows.commands.common import load_cfg, tracking_uri

    cfg = load_cfg(args)
    cfg = cfg.replace(**{"tracking.tracking_uri": tracking_uri(args, cfg)})
    source = getattr(args, "params", None) or "params.yaml"
    n = len(getattr(args, "set", None) or [])
    print(f"# resolved from {source}" + (f" and {n} --set override(s)" if n else "")
          + f"; params hash {cfg.params_hash()[:12]}")
    print(cfg.to_yaml(), end="")
    return 0
