"""Helpers of the journal tests: run a function in a real child process, journal damage."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sessionfence.journal import journal_path_for
from sessionfence.journal._format import HEADER_SIZE, RECORD_SIZE

_FORK = multiprocessing.get_context("fork")


def _child(fn: Callable[..., Any], args: tuple[Any, ...], conn: Any) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # report, never hang the parent
        conn.send(("error", repr(exc)))


def in_child(fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> tuple[str | None, Any]:
    """Run ``fn(*args)`` in a forked child; ``(status, value)`` where status is ``ok``,
    ``error`` (value: the repr) or None when the child died without answering (SIGKILL)."""
    parent, child = _FORK.Pipe(duplex=False)
    proc = _FORK.Process(target=_child, args=(fn, args, child))
    proc.start()
    child.close()
    proc.join(timeout)
    if proc.is_alive():  # pragma: no cover - a hang is a failure, not a wait
        proc.kill()
        proc.join()
        raise AssertionError(f"child {fn.__name__} did not finish in {timeout} s")
    if parent.poll():
        try:
            status, value = parent.recv()
        except EOFError:  # it died without a word
            pass
        else:
            return status, value
    assert proc.exitcode == -signal.SIGKILL, proc.exitcode
    return None, None


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def journal_of(path: Path) -> Path:
    return Path(journal_path_for(path))


def record_count(path: Path) -> int:
    return (journal_of(path).stat().st_size - HEADER_SIZE) // RECORD_SIZE


def damage_journal(path: Path, how: str) -> None:
    """Damage the session's journal: ``torn`` (half a record cut off), ``deleted``,
    ``edited`` (a byte of the last record flipped), ``truncated`` (the last whole record
    removed), ``replaced`` (a fresh journal of another session put in its place)."""
    journal = journal_of(path)
    size = journal.stat().st_size
    if how == "torn":
        os.truncate(journal, size - RECORD_SIZE // 2)
    elif how == "deleted":
        journal.unlink()
    elif how == "edited":
        with open(journal, "r+b") as fh:
            fh.seek(size - RECORD_SIZE + 60)
            byte = fh.read(1)
            fh.seek(size - RECORD_SIZE + 60)
            fh.write(bytes([byte[0] ^ 1]))
    elif how == "truncated":
        os.truncate(journal, size - RECORD_SIZE)
    elif how == "replaced":
        other = path.with_name("other.jsonl")
        other.write_bytes(b'{"type":"session"}\n')
        from sessionfence import claim_session

        claim_session(other)
        os.replace(journal_of(other), journal)
    else:  # pragma: no cover
        raise AssertionError(how)
