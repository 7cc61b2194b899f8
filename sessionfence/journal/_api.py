"""Public operations on a session's journal: claim, co-tenant append, inspect, repair."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._util import iso_utc, read_at, utc_stamp, write_all
from ..errors import JournalError, NotASessionError, TornTranscriptError
from ._file import JournalInvalid, journal_path_for, new_journal, read_header, read_slots, scan
from ._format import RECORD_SIZE, Record, digest_bytes
from ._writer import (
    SessionWriter,
    _apply,
    _Known,
    claim_journal,
    journaled,
    new_run_id,
    slot_alive,
)

__all__ = [
    "JournalInfo",
    "append_as_cotenant",
    "claim_session",
    "inspect_journal",
    "repair_journal",
]


def claim_session(
    session_file: str | os.PathLike[str],
    *,
    run_id: str | None = None,
    timeout: float = 60.0,
    reentrant_owner: str | None = None,
) -> SessionWriter:
    """Claim the session for ``run_id`` (a fresh id when None) under its write lock and
    return the claimant writer. The run that held the claim is superseded: its fence check
    and its next append raise ``SessionSupersededError``. ``SessionFenceController.create``
    claims this way itself; use this for a run that writes through a ``SessionManager``
    alone (``SessionManager.open(path, writer=claim_session(path))``). A caller that holds
    the lock already passes the ``reentrant_owner`` it took it with."""
    from ..lock import acquire_session_write_lock

    path = os.fspath(session_file)
    with acquire_session_write_lock(path, timeout=timeout, reentrant_owner=reentrant_owner):
        writer, _position = claim_journal(path, run_id if run_id is not None else new_run_id())
    return writer


def append_as_cotenant(
    session_file: str | os.PathLike[str],
    entry: Mapping[str, Any],
    *,
    writer: SessionWriter | str | None = None,
    idempotency_key: str | None = None,
    timeout: float = 60.0,
    reentrant_owner: str | None = None,
) -> str:
    """Append one entry to an existing session as a co-tenant, under its write lock, with
    a journal record; returns the entry's id.

    ``entry`` needs a ``type``; ``id`` (8 hex digits), ``parentId`` (the id of the last
    entry in the file) and ``timestamp`` are filled in when absent. Only the end of the
    file is read. The claimant's fence accepts the entry without judging its content (a
    user message delivered by a gateway, say). With ``idempotency_key``, a retry of an
    append that landed (its acknowledgement lost) returns the id it wrote instead of
    writing a duplicate; the key is found in the journal, not by reading the transcript.
    ``writer`` is a co-tenant ``SessionWriter`` or its run id (default: a fresh one). A
    caller that holds the lock already passes the ``reentrant_owner`` it took it with."""
    from ..lock import acquire_session_write_lock

    if isinstance(writer, SessionWriter):
        if writer.role != "co-tenant":
            raise ValueError("append_as_cotenant needs a co-tenant writer")
        who = writer
    else:
        who = SessionWriter.cotenant(writer)
    kind = entry.get("type")
    if not isinstance(kind, str) or not kind or kind == "session":
        raise ValueError("an entry needs a non-empty string 'type' other than 'session'")
    path = os.fspath(session_file)
    with acquire_session_write_lock(path, timeout=timeout, reentrant_owner=reentrant_owner):
        fd = os.open(path, os.O_RDWR | os.O_APPEND | getattr(os, "O_BINARY", 0))
        try:
            with journaled(path, who, fd, want_keys=idempotency_key is not None) as commit:
                size = os.fstat(fd).st_size
                if idempotency_key is not None:
                    hit = commit.find_key(idempotency_key, fd, size)
                    if hit is not None:
                        return _entry_id(path, fd, hit.start, hit.end)
                ends_clean, parent = _tail_facts(path, fd, size)
                fields: dict[str, Any] = {"type": kind}
                ident = entry.get("id")
                fields["id"] = ident if isinstance(ident, str) and ident else os.urandom(4).hex()
                fields["parentId"] = entry.get("parentId", parent)
                fields["timestamp"] = entry.get("timestamp", iso_utc())
                for key, value in entry.items():
                    fields.setdefault(key, value)
                from .._jsonl import dumps_line

                data = (b"" if ends_clean else b"\n") + dumps_line(fields)
                commit.intent(size, data, idempotency_key)
                write_all(fd, data)
                commit.landed(os.lseek(fd, 0, os.SEEK_CUR) - len(data))
                return str(fields["id"])
        finally:
            os.close(fd)


_TAIL_SCAN = 1 << 16


def _tail_facts(path: str, fd: int, size: int) -> tuple[bool, str | None]:
    """``(ends_with_newline, id of the last entry)`` of a session, from its first line and
    its end only; refuses an empty file, a non-session and a torn last line."""
    from ..transcript import _io

    if size == 0:
        raise NotASessionError(path, "it is empty")
    head = read_at(fd, min(size, _TAIL_SCAN), 0)
    first = head.split(b"\n", 1)[0]
    value, _ = _io.parse_last_line(first, True)
    if value is None or value.get("type") != "session":
        raise NotASessionError(path, "its first line is not a session header")
    ends_clean = read_at(fd, 1, size - 1) == b"\n"
    if not ends_clean:
        offset, _data, complete = _io.last_line(fd, size)
        if not complete:
            raise TornTranscriptError(path, offset, size - offset)
    start = max(0, size - _TAIL_SCAN)
    tail = read_at(fd, size - start, start)
    lines = tail.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first piece may be the end of a longer line
    for raw in reversed(lines):
        if not raw.strip():
            continue
        entry, _ = _io.parse_last_line(raw, False)
        if entry is None:
            continue
        ident = entry.get("id")
        if entry.get("type") != "session" and isinstance(ident, str):
            return ends_clean, ident
        if entry.get("type") == "session":
            break
    return ends_clean, None


def _entry_id(path: str, fd: int, start: int, end: int) -> str:
    """The id of the entry an idempotency key's append wrote at ``[start, end)``."""
    from ..transcript import _io

    entry = _io.entry_at(fd, start, end)
    ident = entry.get("id") if entry is not None else None
    if not isinstance(ident, str):
        raise JournalError(journal_path_for(path), "the entry an idempotency key names has no id")
    return ident


@dataclass
class JournalInfo:
    """What ``inspect_journal`` found: the journal's path, whether it exists and can be
    trusted (``problem`` says why not), the claim in force (``claim_run``,
    ``claim_revision``), its records (``base_seq``, ``last_seq``, counts by type), the
    transcript bytes it vouches for (``covered_end``), the active fences (live slots), and
    whether the last announced append's bytes are there (``last_append_landed``; False for
    an intent whose writer died before writing)."""

    path: str
    exists: bool
    problem: str | None = None
    claim_run: str | None = None
    claim_revision: int = 0
    base_seq: int = 0
    last_seq: int = 0
    records: dict[str, int] = field(default_factory=dict)
    covered_end: int | None = None
    transcript_size: int | None = None
    active_fences: int = 0
    last_append_landed: bool | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "exists": self.exists,
            "problem": self.problem,
            "claim": {"run_id": self.claim_run, "revision": self.claim_revision},
            "base_seq": self.base_seq,
            "last_seq": self.last_seq,
            "records": dict(self.records),
            "covered_end": self.covered_end,
            "transcript_size": self.transcript_size,
            "active_fences": self.active_fences,
            "last_append_landed": self.last_append_landed,
        }


def inspect_journal(session_file: str | os.PathLike[str]) -> JournalInfo:
    """Read the session's journal (no lock taken) and say what is in it, and what is wrong
    with it when it cannot be trusted: torn, edited, or disagreeing with the transcript."""
    path = os.fspath(session_file)
    jpath = journal_path_for(path)
    info = JournalInfo(jpath, os.path.exists(jpath))
    try:
        info.transcript_size = os.stat(path).st_size
    except FileNotFoundError:
        info.transcript_size = None
    if not info.exists:
        return info
    try:
        found = scan(jpath, None)
    except JournalInvalid as exc:
        info.problem = exc.detail
        return info
    if found is None:
        info.exists = False
        return info
    header = found.header
    assert header is not None
    info.claim_run = found.position.claim_run
    info.claim_revision = found.position.claim_revision
    info.base_seq = header.base_seq
    info.last_seq = found.position.seq
    for record in found.records:
        info.records[record.type_name] = info.records.get(record.type_name, 0) + 1
    # What the records vouch for, by the rules a writer applies when it catches up.
    known = _Known(found.position, header.base_offset)
    _apply(known, found.records)
    info.covered_end = known.claimed_end
    last_append = known.last_append
    with contextlib.suppress(OSError):
        fd = os.open(jpath, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            _h, slots = read_header(fd, jpath)
        finally:
            os.close(fd)
        info.active_fences = sum(1 for s in read_slots(slots) if s is not None and slot_alive(s))
    size = info.transcript_size
    if size is not None and last_append is not None and size >= last_append.end:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            data = read_at(fd, last_append.end - last_append.start, last_append.start)
        finally:
            os.close(fd)
        # An intent whose writer died before its bytes (another writer's bytes may sit
        # there now) is no damage: readers judge those bytes by content, the next writer
        # voids it.
        info.last_append_landed = digest_bytes(data) == last_append.digest
    if size is not None and size < header.base_offset and info.problem is None:
        info.problem = f"the transcript ({size} bytes) is shorter than the journal's base"
    return info


def repair_journal(session_file: str | os.PathLike[str], *, timeout: float = 60.0) -> str | None:
    """Move an untrustworthy journal aside (``<journal>.corrupt-<UTC time>``) under the
    session's write lock and start a new one at the transcript's current end, keeping
    the last claim that can still be read; returns the quarantine path, or None when the
    journal was fine (or absent). Every active fence of the session then fails closed
    (``journal-invalid``): run it when no attempt is active."""
    from ..lock import acquire_session_write_lock

    path = os.fspath(session_file)
    jpath = journal_path_for(path)
    with acquire_session_write_lock(path, timeout=timeout):
        info = inspect_journal(path)
        if not info.exists or info.problem is None:
            return None
        aside = f"{jpath}.corrupt-{utc_stamp()}"
        revision = _last_readable_revision(jpath)
        os.replace(jpath, aside)
        # The new journal starts past every revision the old one showed, with no claimant:
        # the old run's fence fails closed, its writer finds itself superseded.
        new_journal(jpath, info.transcript_size or 0, claim_revision=revision)
        return aside


def _last_readable_revision(path: str) -> int:
    """The highest claim revision still readable in a damaged journal (0 if none)."""
    revision = 0
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            try:
                header, _slots = read_header(fd, path)
            except JournalInvalid:
                return 0
            revision = header.claim_revision
            size = os.fstat(fd).st_size
            prev = header.base_chain
            offset = header.data_start
            while offset + RECORD_SIZE <= size:
                try:
                    record = Record.unpack(read_at(fd, RECORD_SIZE, offset), prev)
                except ValueError:
                    break
                prev = record.chain
                revision = max(revision, record.revision)
                offset += RECORD_SIZE
        finally:
            os.close(fd)
    return revision
