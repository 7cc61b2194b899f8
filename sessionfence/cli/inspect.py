"""``sessionfence inspect FILE...``: fingerprint, lock state and transcript summary."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from . import CliError

_HEADER_PROBE = 1 << 20  # the header line must fit in this much


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "inspect",
        help="show a transcript's fingerprint, lock state and last entry",
        description="Show each transcript's fingerprint, who holds its write lock, how many "
        "entries it has and its last entry.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="JSONL transcript(s)")
    parser.add_argument("--window", type=int, default=4096, help="tail window in bytes")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")
    parser.set_defaults(func=run)


def _check_transcript(path: str) -> None:
    if not os.path.exists(path):
        raise CliError(f"no such file: {path}")
    if os.path.isdir(path):
        raise CliError(f"is a directory, not a transcript: {path}")
    with open(path, "rb") as f:
        head = f.read(_HEADER_PROBE)
    first = head.split(b"\n", 1)[0].strip()
    if not first:
        return  # an empty transcript is valid: the first append writes the header
    try:
        record = json.loads(first)
    except ValueError:
        raise CliError(f"not a transcript (first line is not JSON): {path}") from None
    if not isinstance(record, dict) or record.get("type") != "session":
        raise CliError(f'not a transcript (no {{"type":"session"}} header): {path}')


def _lock_part(path: str) -> dict[str, Any]:
    from ..lock import inspect_lock

    info = inspect_lock(path)
    return {
        "held": info.held,
        "lock_path": info.lock_path,
        "owner": info.owner,
        "age_s": info.age,
        "stale_reasons": list(info.stale_reasons),
    }


def _transcript_part(path: str) -> dict[str, Any]:
    from ..transcript import SessionManager

    manager = SessionManager.open(path)
    entries = manager.entries
    last = entries[-1] if entries else None
    return {
        "entries": len(entries),
        "malformed_lines": getattr(manager, "malformed_lines", None),
        "torn_tail": manager.torn_tail,
        "leaf_id": manager.leaf_id,
        "last_entry": last,
    }


def inspect_one(path: str, window: int) -> dict[str, Any]:
    import sessionfence

    _check_transcript(path)
    try:
        fp = sessionfence.fingerprint(path, window=window)
    except (OSError, ValueError) as exc:
        raise CliError(f"{path}: {exc}") from None
    report: dict[str, Any] = {
        "file": path,
        "backend": sessionfence.BACKEND,
        "fingerprint": {
            "exists": fp.exists,
            "dev": fp.dev,
            "ino": fp.ino,
            "size": fp.size,
            "mtime_ns": fp.mtime_ns,
            "ctime_ns": fp.ctime_ns,
            "tail_len": fp.tail_len,
            "tail_hash": f"{fp.tail_hash:016x}",
        },
    }
    report["lock"] = _lock_part(path)
    report["transcript"] = _transcript_part(path)
    return report


def _print_text(report: dict[str, Any]) -> None:
    fp = report["fingerprint"]
    print(report["file"])
    print(
        f"  fingerprint  size={fp['size']} dev={fp['dev']} ino={fp['ino']} "
        f"mtime_ns={fp['mtime_ns']} ctime_ns={fp['ctime_ns']}"
    )
    print(f"               tail {fp['tail_len']} bytes xxh3={fp['tail_hash']}")
    lock = report["lock"]
    owner = lock["owner"] or {}
    state = "held" if lock["held"] else "free"
    who = f" by pid={owner.get('pid')} host={owner.get('host')}" if lock["held"] else ""
    stale = f" stale: {', '.join(lock['stale_reasons'])}" if lock["stale_reasons"] else ""
    print(f"  lock         {state}{who} ({lock['lock_path']}){stale}")
    part = report["transcript"]
    torn = part["torn_tail"]
    extra = f", torn tail of {torn[1]} bytes at {torn[0]}" if torn else ""
    malformed = part["malformed_lines"]
    if malformed:
        extra += f", {malformed} malformed line(s) skipped"
    print(f"  transcript   {part['entries']} entries, leaf {part['leaf_id']}{extra}")
    last = part["last_entry"]
    if last is not None:
        text = json.dumps(last, ensure_ascii=False, separators=(",", ":"))
        print(f"  last entry   {text[:200]}{'…' if len(text) > 200 else ''}")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.window <= 1 << 20:
        raise CliError(f"--window must be between 0 and 1048576, got {args.window}")
    reports = [inspect_one(path, args.window) for path in args.files]
    for report in reports:
        if args.json:
            print(json.dumps(report, ensure_ascii=False, default=str))
        else:
            _print_text(report)
    return 0
