"""`ddpm-hf`: the command-line tools around a trained pipeline.

Each subcommand lives beside the code it runs; that module's `add_cli(subparsers)` registers it.
Training itself is `accelerate launch train_ddpm.py` (see ddpm_hf/training.py).
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError, exit_with

# Modules that register subcommands, in the order `ddpm-hf --help` lists them.
COMMAND_MODULES = ("sampling", "hub", "evaluation", "visualize")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="ddpm-hf", description="Sample, evaluate, visualise and share DDPM pipelines.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"ddpm_hf.{name}").add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.func(args)
    except UserError as error:
        exit_with(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
