"""``sessionfence locks DIR [--clean]``: the lock files under a sessions directory."""

from __future__ import annotations

import argparse
import os
from typing import Any

from . import CliError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "locks",
        help="list session lock files and their state; --clean removes unheld ones",
        description="List the session lock files directly in DIR: held or free, owner pid, "
        "host, liveness, record age, generation and stale reasons. A session lock file is a "
        "<transcript>.lock carrying a sessionfence owner record (or empty, beside a session "
        "transcript); other *.lock files (poetry.lock, Cargo.lock, ...) are listed as not a "
        "session lock and never touched. With --clean, remove the session lock files no "
        "process holds (held ones are never touched).",
    )
    parser.add_argument("directory", metavar="DIR", help="sessions directory")
    parser.add_argument(
        "--clean", action="store_true", help="remove session lock files nobody holds"
    )
    parser.add_argument(
        "--stale",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="report held locks older than this as stale (default: 1800, or "
        "SESSIONFENCE_LOCK_STALE_MS)",
    )
    parser.add_argument("--plain", action="store_true", help="plain text even if rich is present")
    parser.set_defaults(func=run)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number: {text!r}")
    return value


def _row(info: Any, removed: set[str]) -> list[str]:
    from ..lock._record import describe_owner

    owner = info.owner
    generation = owner.get("generation") if owner else None
    state = "removed" if info.lock_path in removed else "held" if info.held else "free"
    return [
        os.path.basename(info.lock_path),
        state,
        "-"
        if owner is None
        else describe_owner(owner)
        if info.held
        else "last " + describe_owner(owner),
        "-" if generation is None else str(generation),
        ", ".join(info.stale_reasons) or "-",
    ]


def _other_row(other: Any) -> list[str]:
    return [os.path.basename(other.path), "not a session lock", other.reason, "-", "-"]


def run(args: argparse.Namespace) -> int:
    from ..lock import clean_stale_locks
    from ..lock._inspect import scan_locks

    directory = args.directory
    if not os.path.exists(directory):
        raise CliError(f"no such directory: {directory}")
    if not os.path.isdir(directory):
        raise CliError(f"not a directory: {directory}")
    try:
        infos, others = scan_locks(directory, stale=args.stale)
        removed = set(clean_stale_locks(directory)) if args.clean else set()
    except PermissionError as exc:
        raise CliError(f"permission denied: {exc.filename or directory}") from None
    headers = ["lock file", "state", "owner", "generation", "stale"]
    rows = sorted([_row(info, removed) for info in infos] + [_other_row(other) for other in others])
    summary = f"{len(infos)} lock file(s), {sum(i.held for i in infos)} held"
    if args.clean:
        summary += f", {len(removed)} removed"
    if others:
        summary += f"; {len(others)} other *.lock file(s) left alone"
    if not args.plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(*headers, title=os.path.abspath(directory))
            for row in rows:
                table.add_row(*row)
            console = Console()
            console.print(table)
            console.print(summary)
            return 0
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )
    print(summary)
    return 0
