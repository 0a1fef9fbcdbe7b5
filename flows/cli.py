"""The ``ultrafed`` command line: one sub-command module per concern (see flows/commands/).

Command modules keep their heavy imports (Prefect, MLflow) inside their handlers, so
``ultrafed data ...`` never pays for importing the orchestration stack.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn, Sequence

import flows  # noqa: F401  (runtime env before Prefect/MLflow imports)

# command name -> module in flows/commands that defines add_parser(subparsers) and run(args)
COMMANDS: dict[str, str] = {
    "config": "flows.commands.config",
    "data": "flows.commands.data",
    "pretrain": "flows.commands.pretrain",
    "federation": "flows.commands.federation",
    "demo": "flows.commands.demo",
    "finetune": "flows.commands.finetune",
    "schedule": "flows.commands.schedule",
    "report": "flows.commands.report",
    "models": "flows.commands.registry", "lineage": "flows.commands.registry", "promote": "flows.commands.registry",
}


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (``ultrafed pretrain: --rounds: ...``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ultrafed", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None, help="params.yaml to use (default: the repo's)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(module).add_parser(sub)
    return parser


def command_name(args: argparse.Namespace) -> str:
    """``data synth``, ``federation up``, ``pretrain``: how messages name the command."""
    parts = [args.command, getattr(args, "data_command", None), getattr(args, "federation_command", None)]
    return " ".join(p for p in parts if p)


def main(argv: Sequence[str] | None = None) -> int:
    from ultrafed.config import ConfigError  # SitesFileError is one too

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:  # params, --set or sites checked before any work: one line, exit 2
        print(f"ultrafed {command_name(args)}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ultrafed config | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return 1
    except KeyboardInterrupt:
        print("ultrafed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
