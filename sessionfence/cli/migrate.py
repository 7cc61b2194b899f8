"""``sessionfence migrate FILE...``: rewrite pre-tree (v1) and v2 sessions in the current
format, as pi-mono and openclaw would on their next open, keeping a backup."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from . import CliError


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "migrate",
        help="rewrite a pre-tree (v1) session in the current format, keeping a backup",
        description="Rewrite each session transcript in the current format (version 3) the way "
        "pi-mono and openclaw migrate it when they open it: entries get ids and parent ids "
        "in file order, compactions keep their first kept entry. Runs under the session "
        "write lock; the original is kept as <file>.bak-v<N>-<UTC time> beside it, and the "
        "new file replaces it atomically. A file already at version 3 is left alone.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="JSONL session transcript(s)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the session write lock (default 10)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="report what would change, write nothing"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")
    parser.set_defaults(func=run)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise CliError(f"no such file: {path}")
    if os.path.isdir(path):
        raise CliError(f"is a directory, not a transcript: {path}")


def _version(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def migrate_one(path: str, timeout: float, dry_run: bool) -> dict[str, Any]:
    from ..errors import (
        NotASessionError,
        SessionWriteLockAcquireError,
        TornTranscriptError,
    )
    from ..transcript import TranscriptChangedError, migrate_transcript

    _check_file(path)
    try:
        result = migrate_transcript(path, lock_timeout=timeout, dry_run=dry_run)
    except NotASessionError as exc:
        raise CliError(f"{path}: {exc.looks_like}; not migrated") from None
    except TornTranscriptError as exc:
        raise CliError(
            f"{path}: ends with a torn line ({exc.length} bytes at offset {exc.offset}); "
            f"repair it first (SessionManager.open(path).repair_torn_tail())"
        ) from None
    except SessionWriteLockAcquireError as exc:
        raise CliError(f"{path}: could not take the session write lock: {exc}") from None
    except (TranscriptChangedError, OSError, ValueError) as exc:
        raise CliError(f"{path}: {exc}") from None
    return {
        "file": path,
        "changed": result.changed,
        "dry_run": dry_run,
        "from_version": _version(result.from_version),
        "to_version": result.to_version,
        "backup": result.backup,
        "entries": result.entries,
        "kept_lines": result.kept_lines,
        "blank_lines": result.blank_lines,
        "id_map": result.id_map,
    }


def _print_text(report: dict[str, Any]) -> None:
    path = report["file"]
    if not report["changed"]:
        print(f"{path}: already version {report['from_version']}, nothing to do")
        return
    verb = "would migrate" if report["dry_run"] else "migrated"
    line = (
        f"{path}: {verb} v{report['from_version']} -> v{report['to_version']}, "
        f"{report['entries']} entries given ids"
    )
    if report["kept_lines"]:
        line += f", {report['kept_lines']} non-JSON line(s) kept as they were"
    if report["id_map"]:
        line += f", {len(report['id_map'])} old id(s) replaced"
    print(line)
    if report["backup"]:
        print(f"  backup {report['backup']}")


def run(args: argparse.Namespace) -> int:
    if not args.timeout >= 0:
        raise CliError(f"--timeout must be >= 0, got {args.timeout}")
    for path in args.files:
        report = migrate_one(path, args.timeout, args.dry_run)
        if args.json:
            print(json.dumps(report, ensure_ascii=False))
        else:
            _print_text(report)
    return 0
