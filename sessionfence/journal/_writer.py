"""Writers: who appends (``SessionWriter``), claims, and one journaled append (``journaled``).

A journaled append is write-ahead (docs/journal.md, "Crash safety"): under the journal's
lock the writer catches up with the records others wrote, voids a dead writer's intent,
checks its claim (a superseded claimant raises ``SessionSupersededError`` before anything
is written), writes the ``APPEND`` record announcing ``[start, end)`` and the bytes' digest,
then the bytes. A crash between the two leaves an intent without data, voided by the next
writer and ignored by readers; a crash after both leaves a committed append.

Each process keeps what it last read of each journal (position, the end of the last
append, the idempotency keys once asked for), so an append reads only the records written
since, usually none: one ``stat``-sized check, one record written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

from .._util import read_at
from ..errors import JournalError, SessionSupersededError
from ..lock._record import pid_alive, process_starttime
from ._file import (
    COMPACT_AT,
    JournalInvalid,
    Position,
    Scan,
    append_records,
    compact,
    journal_path_for,
    locked_journal,
    read_header,
    read_keys,
    read_slots,
    scan_fd,
    write_slot,
)
from ._format import (
    APPEND,
    CLAIM,
    CLAIMANT,
    COTENANT,
    VOID,
    Record,
    Slot,
    check_run_id,
    digest_bytes,
    key_hash,
)

__all__ = [
    "Committed",
    "SessionWriter",
    "claim_journal",
    "clear_fence_slot",
    "journaled",
    "new_run_id",
    "set_fence_slot",
    "slot_alive",
]

_log = logging.getLogger("sessionfence.journal")

Role = Literal["claimant", "co-tenant"]
_ROLE_CODES = {"claimant": CLAIMANT, "co-tenant": COTENANT}


def new_run_id() -> str:
    """A fresh run id (32 hex digits)."""
    return uuid.uuid4().hex


class SessionWriter:
    """Who writes to a session: a run id and a role.

    A *claimant* is the run that claimed the session (``SessionFenceController.writer``,
    ``claim_session``): its appends carry its claim's revision and fail with
    ``SessionSupersededError`` once another run claimed the session. A *co-tenant*
    (``SessionWriter.cotenant("gateway")``) appends beside the claimant (a gateway
    delivering a user message, a hook) without claiming: the claimant's fence accepts its
    journaled appends without judging their content. Pass one to
    ``SessionManager.open(path, writer=...)`` or ``append_as_cotenant``.
    """

    __slots__ = ("revision", "role", "run_id")

    def __init__(self, run_id: str | None = None, *, role: Role = "co-tenant", revision: int = 0):
        if role not in _ROLE_CODES:
            raise ValueError(f"role must be 'claimant' or 'co-tenant', not {role!r}")
        self.run_id: str = run_id if run_id is not None else new_run_id()
        check_run_id(self.run_id)
        self.role: Role = role
        self.revision: int = int(revision)

    @classmethod
    def cotenant(cls, run_id: str | None = None) -> SessionWriter:
        """A co-tenant writer (a fresh run id when none is given)."""
        return cls(run_id, role="co-tenant")

    def __repr__(self) -> str:
        extra = f" revision={self.revision}" if self.role == "claimant" else ""
        return f"<SessionWriter {self.role} {self.run_id!r}{extra}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SessionWriter):
            return NotImplemented
        return (self.run_id, self.role, self.revision) == (other.run_id, other.role, other.revision)

    def __hash__(self) -> int:
        return hash((self.run_id, self.role, self.revision))


@dataclass
class _Known:
    """What this process last read of one journal (under its lock)."""

    position: Position
    # The transcript end the records vouch for: the end of the last append, or a void's
    # valid end. A transcript shorter than this had an intent that never landed.
    claimed_end: int
    keys: dict[int, tuple[int, int, bytes]] | None = None  # key hash -> (start, end, digest)
    last_append: Record | None = None  # the APPEND that set claimed_end, if one did
    last_checked: bool = True  # its bytes were seen to land (or it is ours)


_KNOWN: dict[str, _Known] = {}
_KNOWN_MAX = 1024
_KNOWN_LOCK = threading.Lock()

# Claimant runs of live controllers in this process, per journal path. In one process the
# attempt owner (acquire_session_file_owner) orders attempts and the trust registry shares
# owned writes between controllers (the original's in-process peers); claims order runs
# across processes. So a claim by a live controller of this process does not supersede
# its peers here; any other run's claim does.
_LIVE_RUNS: dict[str, dict[str, int]] = {}


def add_live_run(jpath: str, run_id: str) -> None:
    with _KNOWN_LOCK:
        runs = _LIVE_RUNS.setdefault(jpath, {})
        runs[run_id] = runs.get(run_id, 0) + 1


def drop_live_run(jpath: str, run_id: str) -> None:
    with _KNOWN_LOCK:
        runs = _LIVE_RUNS.get(jpath)
        if runs is None or run_id not in runs:
            return
        runs[run_id] -= 1
        if runs[run_id] <= 0:
            del runs[run_id]
        if not runs:
            del _LIVE_RUNS[jpath]


def is_live_peer(jpath: str, run_id: str | None) -> bool:
    """Whether ``run_id`` is the run of a live controller of this process on the journal."""
    if run_id is None:
        return False
    with _KNOWN_LOCK:
        return run_id in _LIVE_RUNS.get(jpath, ())


def _forget_runs_in_child() -> None:
    # The parent's controllers are not live in a forked child (their locks are not held
    # there): a claim they made must not pass for an in-process peer's. The mutex may have
    # been held by another thread of the parent at the fork.
    global _KNOWN_LOCK
    _KNOWN_LOCK = threading.Lock()
    _LIVE_RUNS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_runs_in_child)


def forget_all() -> None:
    """Drop every cached journal position and live run (tests; ``reset_for_tests``)."""
    with _KNOWN_LOCK:
        _KNOWN.clear()
        _LIVE_RUNS.clear()


def _apply(known: _Known, records: list[Record], *, ours: bool = False) -> None:
    for record in records:
        if record.type == APPEND:
            known.claimed_end = record.end
            known.last_append = record
            known.last_checked = ours
            if known.keys is not None and record.key_hash:
                known.keys[record.key_hash] = (record.start, record.end, record.digest)
        elif record.type == VOID:
            known.claimed_end = record.start
            known.last_append = None
            if known.keys is not None:
                known.keys = {h: v for h, v in known.keys.items() if v[1] <= record.start}


def _catch_up(jpath: str, jfd: int, want_keys: bool) -> _Known:
    """Read, through the locked descriptor ``jfd``, what was written since this process
    last looked (usually nothing: one ``fstat``)."""
    with _KNOWN_LOCK:
        known = _KNOWN.get(jpath)
    if known is not None and (want_keys and known.keys is None):
        known = None  # the key table needs every record from the base
    st = os.fstat(jfd)
    try:
        since = known.position if known is not None else None
        # Records are only appended, and a rewrite is a new inode: the same size means
        # nothing was written since (an edit in place is for readers to catch).
        if since is not None and (st.st_dev, st.st_ino, st.st_size) == (
            since.dev,
            since.ino,
            since.size,
        ):
            found = Scan(None, since)
        else:
            found = scan_fd(jfd, jpath, since, st)
    except JournalInvalid as exc:
        with _KNOWN_LOCK:
            _KNOWN.pop(jpath, None)
        if known is None or (st.st_dev, st.st_ino) == (known.position.dev, known.position.ino):
            # Torn, edited or truncated under our eyes: never extend it.
            raise JournalError(jpath, exc.detail) from None
        # Another file now (an operator's repair_journal): read it afresh.
        return _catch_up(jpath, jfd, want_keys)
    if known is None or found.compacted_past:
        header = found.header
        assert header is not None  # read from the base: the header was read
        known = _Known(found.position, header.base_offset)
        if want_keys:
            try:
                keys = read_keys(jfd, jpath, header)
            except JournalInvalid as exc:
                raise JournalError(jpath, exc.detail) from None
            known.keys = {k.key_hash: (k.start, k.end, k.digest) for k in keys}
    known.position = found.position
    _apply(known, found.records)
    with _KNOWN_LOCK:
        if jpath not in _KNOWN and len(_KNOWN) >= _KNOWN_MAX:
            _KNOWN.pop(next(iter(_KNOWN)))  # the oldest: it is only a cache
        _KNOWN[jpath] = known
    return known


def _record(writer: SessionWriter, kind: int, revision: int, **fields: object) -> Record:
    return Record(
        type=kind,
        role=_ROLE_CODES[writer.role],
        seq=0,
        revision=revision,
        run_id=writer.run_id,
        pid=os.getpid(),
        time_ns=time.time_ns(),
        **fields,  # type: ignore[arg-type]
    )


@dataclass
class Committed:
    """An idempotent retry's earlier append: the transcript range it occupies."""

    start: int
    end: int


@dataclass
class _Commit:
    jpath: str
    jfd: int
    writer: SessionWriter
    known: _Known
    pending: Record | None = None
    written: list[Record] = field(default_factory=list)

    def find_key(self, key: str, transcript_fd: int, size: int) -> Committed | None:
        """The committed append that carried ``key``: its record says where, and the bytes
        there are still the ones it announced (else it never landed: append again)."""
        assert self.known.keys is not None
        hit = self.known.keys.get(key_hash(key))
        if hit is None:
            return None
        start, end, digest = hit
        if end > size or not digest:
            return None
        # A carried key keeps the first 8 bytes of the digest, a record all 16.
        if digest_bytes(read_at(transcript_fd, end - start, start))[: len(digest)] != digest:
            return None
        return Committed(start, end)

    def intent(self, start: int, data: bytes, key: str | None) -> None:
        """Write the APPEND record for ``data`` at ``start`` (before the data)."""
        record = _record(
            self.writer,
            APPEND,
            self.known.position.claim_revision,
            start=start,
            end=start + len(data),
            digest=digest_bytes(data),
            key_hash=key_hash(key) if key is not None else 0,
        )
        self._write([record])
        self.pending = record

    def landed(self, actual_start: int) -> None:
        """The bytes landed at ``actual_start``: when another (lock-ignoring) writer got
        there first, void the intent and announce where they really are."""
        pending = self.pending
        assert pending is not None
        if actual_start == pending.start:
            return
        moved = replace(pending, start=actual_start, end=actual_start + pending.end - pending.start)
        void = _record(self.writer, VOID, pending.revision, start=pending.start, end=pending.start)
        self._write([void, moved])

    def _write(self, records: list[Record]) -> None:
        position = append_records(self.jfd, self.jpath, self.known.position, records)
        self.known.position = position
        _apply(self.known, records, ours=True)
        self.written.extend(records)


@contextlib.contextmanager
def journaled(
    transcript: str, writer: SessionWriter, transcript_fd: int, *, want_keys: bool = False
) -> Iterator[_Commit]:
    """One journaled append to ``transcript`` (open as ``transcript_fd``) by ``writer``,
    under the journal's lock (see the module docstring)."""
    jpath = journal_path_for(transcript)
    with locked_journal(jpath, create_at=lambda: os.fstat(transcript_fd).st_size) as jfd:
        # The size is read under the journal's lock: an append another journaled writer
        # made before we got it is never taken for a dead intent.
        size = os.fstat(transcript_fd).st_size
        known = _catch_up(jpath, jfd, want_keys)
        commit = _Commit(jpath, jfd, writer, known)
        _void_dead_intent(commit, transcript_fd, size)
        position = known.position
        if (
            writer.role == "claimant"
            and (position.claim_run, position.claim_revision) != (writer.run_id, writer.revision)
            and not (is_live_peer(jpath, writer.run_id) and is_live_peer(jpath, position.claim_run))
        ):
            raise SessionSupersededError(
                transcript,
                "fence_check",
                writer.run_id,
                writer.revision,
                position.claim_run,
                position.claim_revision,
            )
        yield commit
        _maybe_compact(jfd, jpath, known)


def _void_dead_intent(commit: _Commit, transcript_fd: int | None, size: int) -> None:
    """Void the records past the transcript's real end: an intent whose bytes never landed
    (its writer died between record and bytes), a transcript cut back since, or an intent
    whose place another (lock-ignoring) writer took with other bytes."""
    known = commit.known
    valid = size
    last = known.last_append
    if size >= known.claimed_end and last is not None and not known.last_checked:
        known.last_checked = True
        if transcript_fd is not None and last.end <= size:
            data = read_at(transcript_fd, last.end - last.start, last.start)
            if digest_bytes(data) != last.digest:
                valid = last.start
    if valid < known.claimed_end:
        commit._write(
            [_record(commit.writer, VOID, known.position.claim_revision, start=valid, end=valid)]
        )


def _live_min_seq(slots_raw: bytes) -> int | None:
    low: int | None = None
    for slot in read_slots(slots_raw):
        if slot is None or not slot_alive(slot):
            continue
        low = slot.fence_seq if low is None else min(low, slot.fence_seq)
    return low


def slot_alive(slot: Slot) -> bool:
    if not pid_alive(slot.pid):
        return False
    start = process_starttime(slot.pid)
    return start is None or slot.starttime == 0 or start == slot.starttime


def _maybe_compact(jfd: int, jpath: str, known: _Known) -> None:
    """Compact when due. An optimisation: a failure (a full disk, a directory we cannot
    write, Windows refusing to replace an open file) is logged and never fails the append
    that has landed already."""
    if known.position.seq - known.position.base_seq + 1 <= COMPACT_AT:
        return
    try:
        _header, slots = read_header(jfd, jpath)
        done = compact(jfd, jpath, _live_min_seq(slots))
    except (OSError, JournalInvalid) as exc:
        _log.warning("journal compaction failed, will retry at the next append: %s", exc)
        return
    if done:
        with _KNOWN_LOCK:
            _KNOWN.pop(jpath, None)  # next time read the new file from its base


def claim_journal(transcript: str, run_id: str) -> tuple[SessionWriter, Position]:
    """Claim the session for ``run_id`` (the caller holds the transcript's write lock):
    a new claim bumps the revision and names the run it superseded; the run that holds
    the claim already keeps its revision. Returns the claimant writer and the journal
    position after the claim."""
    check_run_id(run_id)
    jpath = journal_path_for(transcript)

    def transcript_size() -> int:
        try:
            return os.stat(transcript).st_size
        except FileNotFoundError:
            return 0

    with locked_journal(jpath, create_at=transcript_size) as jfd:
        size = transcript_size()  # under the journal's lock (see journaled)
        known = _catch_up(jpath, jfd, False)
        position = known.position
        if position.claim_run == run_id and position.claim_revision > 0:
            return SessionWriter(
                run_id, role="claimant", revision=position.claim_revision
            ), position
        writer = SessionWriter(run_id, role="claimant", revision=position.claim_revision + 1)
        record = _record(
            writer, CLAIM, writer.revision, start=size, end=size, superseded=position.claim_run
        )
        commit = _Commit(jpath, jfd, writer, known)
        if size < known.claimed_end:
            commit._write([_record(writer, VOID, position.claim_revision, start=size, end=size)])
        commit._write([record])
        _maybe_compact(jfd, jpath, known)
        return writer, known.position


def set_fence_slot(transcript: str, token: int, fence_seq: int, run_id: str) -> None:
    """Tell compaction that a live fence still needs records after ``fence_seq`` (written
    under the journal lock; a full table just means this fence may fall back to the content
    rules after a compaction)."""
    jpath = journal_path_for(transcript)
    # Best effort: a journal that cannot be read here fails the next fence check instead.
    with (
        contextlib.suppress(OSError, JournalInvalid, JournalError),
        locked_journal(jpath, None) as jfd,
    ):
        _header, raw = read_header(jfd, jpath)
        slots = read_slots(raw)
        pid = os.getpid()
        slot = Slot(pid, process_starttime(pid) or 0, fence_seq, token, time.time_ns(), run_id)
        free: int | None = None
        for i, existing in enumerate(slots):
            if existing is not None and existing.token == token and existing.pid == pid:
                write_slot(jfd, i, slot)
                return
            if free is None and (existing is None or not slot_alive(existing)):
                free = i
        if free is not None:
            write_slot(jfd, free, slot)


def clear_fence_slot(transcript: str, token: int) -> None:
    """The fence is retired (dispose): its slot is free again."""
    jpath = journal_path_for(transcript)
    with (
        contextlib.suppress(OSError, JournalInvalid, JournalError),
        locked_journal(jpath, None) as jfd,
    ):
        _header, raw = read_header(jfd, jpath)
        for i, existing in enumerate(read_slots(raw)):
            if existing is not None and existing.token == token and existing.pid == os.getpid():
                write_slot(jfd, i, None)
