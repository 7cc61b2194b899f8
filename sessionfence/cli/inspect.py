"""``sessionfence inspect FILE...``: fingerprint, lock state, writer claim and journal,
transcript summary.

Each argument is reported on its own: a bad one (missing, a directory, a FIFO or other
non-regular file, unreadable, not a transcript, a lock path that cannot be inspected) gets
one ``sessionfence inspect: error: ...`` line on stderr and the others are still reported;
the exit status is 2 if any argument was bad. Nothing is opened in a way that can block:
a FIFO is opened non-blocking and refused after ``fstat``.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from typing import Any

from . import CliError

_HEADER_PROBE = 1 << 20  # the header line must fit in this much


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "inspect",
        help="show a transcript's fingerprint, lock state, writer claim and last entry",
        description="Show each transcript's fingerprint, who holds its write lock, which run "
        "claims it and what its owned-write journal says (or what is wrong with it), how many "
        "entries it has and its last entry.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="JSONL transcript(s)")
    parser.add_argument("--window", type=int, default=4096, help="tail window in bytes")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per transcript on stdout (errors stay on stderr)",
    )
    parser.set_defaults(func=run)


_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block the open
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a file"


def _read_head(path: str) -> bytes:
    """The first ``_HEADER_PROBE`` bytes of a regular file; bad files as ``CliError``."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise CliError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise CliError(f"is a directory, not a transcript: {path}") from None
    except PermissionError:
        raise CliError(f"permission denied: {path}") from None
    except OSError as exc:
        raise CliError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise CliError(f"is a directory, not a transcript: {path}")
        if not stat.S_ISREG(mode):
            raise CliError(f"not a regular file ({_kind(mode)}): {path}")
        chunks: list[bytes] = []
        left = _HEADER_PROBE
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except PermissionError:
        raise CliError(f"permission denied: {path}") from None
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _check_transcript(path: str) -> None:
    head = _read_head(path)
    first = head.split(b"\n", 1)[0].strip()
    if not first:
        return  # an empty transcript is valid: the first append writes the header
    try:
        record = json.loads(first)
    except (ValueError, RecursionError):
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


_PROGRESS_FROM = 64 << 20  # files this large show how far their parse is (on a terminal)


def _progress_for(path: str) -> Any:
    """A ``progress`` callback printing ``parsing FILE: 37% of 1024 MiB`` on stderr while a
    large transcript is parsed (its first open, before the index exists), when stderr is a
    terminal; ``None`` otherwise."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return None
    if size < _PROGRESS_FROM or not sys.stderr.isatty():
        return None
    shown = [-1]

    def report(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct != shown[0]:
            shown[0] = pct
            end = "\n" if done >= total else ""
            print(f"\rparsing {path}: {pct}% of {total >> 20} MiB", end=end, file=sys.stderr)

    return report


def _transcript_part(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The transcript summary, and what the open made of its index."""
    from ..transcript import SessionManager, _index

    found_before = _index.read_index(path) is not None
    manager = SessionManager.open(path, progress=_progress_for(path))
    entries = manager.entries
    last = entries[-1] if entries else None
    part = {
        "entries": len(entries),
        "malformed_lines": getattr(manager, "malformed_lines", None),
        "torn_tail": manager.torn_tail,
        "leaf_id": manager.leaf_id,
        "last_entry": last,
    }
    return part, _index_part(path, found_before, manager._index_opened)


def _index_part(path: str, found_before: bool, used: bool) -> dict[str, Any]:
    """The derived index ``<transcript>.idx`` (docs/transcripts.md, "The index"): what it
    covers, whether the open went through it, and the journal position it recorded, with
    whether the journal's records since still vouch for the indexed prefix."""
    from ..transcript import _index

    index = _index.read_index(path)
    report: dict[str, Any] = {
        "path": _index.index_path_for(path),
        "exists": index is not None,
        "found_before_open": found_before,
        "used_by_open": used,
    }
    if index is None:
        return report
    meta = index.meta
    report.update(size=index.size, rows=int(meta["rows"]), blocks=len(meta["blocks"]))
    report["journal"] = meta.get("journal")  # the position recorded when it was written
    report["journal_vouches"] = _index.journal_vouches(path, index)
    return report


def _journal_part(path: str) -> dict[str, Any]:
    from ..journal import inspect_journal

    return inspect_journal(path).as_json()


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
    try:
        report["lock"] = _lock_part(path)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise CliError(f"cannot inspect the lock of {path}: {exc.strerror or exc}{where}") from None
    try:
        report["journal"] = _journal_part(path)
    except OSError as exc:
        raise CliError(f"cannot read the journal of {path}: {exc}") from None
    try:
        report["transcript"], report["index"] = _transcript_part(path)
    except PermissionError:
        raise CliError(f"permission denied: {path}") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise CliError(f"cannot read the transcript {path}: {exc}") from None
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
    journal = report["journal"]
    if not journal["exists"]:
        print("  journal      none (no sessionfence writer has claimed this session)")
    else:
        claim = journal["claim"]
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(journal["records"].items()))
        print(
            f"  claim        run {claim['run_id']} revision {claim['revision']}"
            f" ({journal['active_fences']} active fence(s))"
        )
        print(
            f"  journal      records {journal['base_seq']}..{journal['last_seq']}"
            f" ({counts or 'none'}), vouches for bytes up to {journal['covered_end']}"
            f" ({journal['path']})"
        )
        if journal["problem"]:
            print(f"  journal      PROBLEM: {journal['problem']} (see repair_journal)")
    part = report["transcript"]
    torn = part["torn_tail"]
    extra = f", torn tail of {torn[1]} bytes at {torn[0]}" if torn else ""
    malformed = part["malformed_lines"]
    if malformed:
        extra += f", {malformed} malformed line(s) skipped"
    print(f"  transcript   {part['entries']} entries, leaf {part['leaf_id']}{extra}")
    _print_index(report["index"])
    last = part["last_entry"]
    if last is not None:
        text = json.dumps(last, ensure_ascii=False, separators=(",", ":"))
        print(f"  last entry   {text[:200]}{'…' if len(text) > 200 else ''}")


def _print_index(index: dict[str, Any]) -> None:
    if not index["exists"]:
        print(f"  index        none ({index['path']}: written for sessions of 256 KiB or more)")
        return
    if index["used_by_open"]:
        how = "the open went through it"
    elif index["found_before_open"]:
        how = "not trusted by the open: rebuilt"
    else:
        how = "written by this open"
    print(
        f"  index        {index['size']} bytes, {index['rows']} rows, {index['blocks']} block "
        f"hash(es); {how} ({index['path']})"
    )
    journal = index["journal"]
    if not index["journal_vouches"]:
        verdict = "NOT vouched for by the journal now: the next open rebuilds it"
    elif journal is None:
        verdict = "no journaled writer has cut the prefix since"
    else:
        verdict = "the records since vouch for the indexed prefix"
    if journal is None:
        where = "no journal when it was written"
    else:
        where = f"after record {journal['seq']} of journal {journal['salt'][:12]}"
    print(f"               journal position: {where}; {verdict}")


def run(args: argparse.Namespace) -> int:
    """Report every argument in order; one stderr line per bad one, exit 2 if any was bad."""
    if not 0 <= args.window <= 1 << 20:
        raise CliError(f"--window must be between 0 and 1048576, got {args.window}")
    bad = 0
    for path in args.files:
        try:
            report = inspect_one(path, args.window)
        except CliError as exc:
            bad += 1
            sys.stdout.flush()  # keep the order when both streams go to one terminal
            print(f"sessionfence {args.command}: error: {exc}", file=sys.stderr, flush=True)
            continue
        if args.json:
            print(json.dumps(report, ensure_ascii=False, default=str))
        else:
            _print_text(report)
    return 2 if bad else 0
