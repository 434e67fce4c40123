"""`ddpm-hf`: the command-line tools around a trained pipeline.

Each subcommand lives beside the code it runs; that module's `add_cli(subparsers)` registers it.
Training itself is `accelerate launch train_ddpm.py` (see ddpm_hf/training.py).
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError, exit_with

# Modules that register subcommands, in the order `ddpm-hf --help` lists them.
COMMAND_MODULES = ("sampling", "hub", "evaluation_cli", "visualize", "demo")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose mistakes are the one-line error (exit 2) of every other mistake, not usage + message."""

    def error(self, message: str):
        raise UserError(f"{message}. Run `{self.prog} --help` for the options.")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = OneLineErrorParser(prog="ddpm-hf", description="Sample, evaluate, visualise and share DDPM pipelines.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"ddpm_hf.{name}").add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        args.func(args)
    except UserError as error:
        exit_with(error)
    except RuntimeError as error:  # under torchrun: another process died or hangs
        from .distributed import collective_failure

        message = collective_failure(error)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
