"""``ultrafed data ...``: synthetic cohort, manifests and quality checks."""
from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = ("flows.commands.data_synth", "flows.commands.data_quality")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make, scan and check site data")
    dsub = p.add_subparsers(dest="data_command", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(dsub)
