"""``sessionfence`` command line. Each module named in ``COMMANDS`` has ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

# Listed, not discovered: a directory scan finds nothing where the installed package's
# folder cannot be listed (a privilege-dropped process), and a stray file is no command.
COMMANDS = ("bench", "fleet", "inspect", "locks", "migrate")


class CliError(Exception):
    """Bad input: printed as one line, exit status 2, never a traceback."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2), like every other bad-input error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sessionfence",
        description="Fence shared JSONL agent transcripts: fleet simulation, benchmarks, "
        "inspection and lock maintenance.",
    )
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"sessionfence {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"sessionfence {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sessionfence {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep the interpreter's own
        # flush at exit from raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
