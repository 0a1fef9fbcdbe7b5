"""The ``ultrafed`` command line: one sub-command module per concern (see flows/commands/).

Command modules keep their heavy imports (Prefect, MLflow) inside their handlers, so
``ultrafed data ...`` never pays for importing the orchestration stack.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

import flows  # noqa: F401  (runtime env before Prefect/MLflow imports)

# command name -> module in flows/commands that defines add_parser(subparsers) and run(args)
COMMANDS: dict[str, str] = {
    "data": "flows.commands.data",
    "pretrain": "flows.commands.pretrain",
    "federation": "flows.commands.federation",
    "demo": "flows.commands.demo",
    "finetune": "flows.commands.finetune",
    "schedule": "flows.commands.schedule",
    "report": "flows.commands.report",
    "models": "flows.commands.registry", "lineage": "flows.commands.registry", "promote": "flows.commands.registry",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ultrafed", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None, help="params.yaml to use (default: the repo's)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ultrafed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
