"""Reading, appending to and compacting one journal file (format: ``_format``).

Writers serialize on an exclusive OS lock on the journal file itself, held from reading its
last record to writing the transcript bytes the new record announces (``JournalLock``):
journaled appends are ordered and their records tile the transcript even when a writer
does not hold the transcript's write lock (the controller's ``owned_file_write`` takes
none). Compaction replaces the file by rename under that lock; a writer that locked the
old file sees the path moved on and locks again (the write lock's identity check).

Readers take no lock: records are written whole with one ``write`` and never change.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from .._util import fsync_dir, read_at, session_key, write_at
from ._format import (
    APPEND,
    CHAIN_AT,
    CLAIM,
    HEADER_SIZE,
    RECORD_SIZE,
    SLOT_COUNT,
    SLOT_SIZE,
    SLOTS_AT,
    VOID,
    FormatError,
    Header,
    KeyEntry,
    Record,
    Slot,
    chain_start,
    crc_ok,
    keys_hash,
    pack_keys,
    unpack_keys,
)

__all__ = [
    "COMPACT_AT",
    "KEEP_RECORDS",
    "MAX_KEYS",
    "JournalInvalid",
    "Position",
    "Scan",
    "journal_path_for",
    "locked_journal",
    "new_journal",
    "scan",
]

#: Compact when a journal holds this many records past its base.
COMPACT_AT = 8192
#: Records compaction always keeps (for readers that hold no slot).
KEEP_RECORDS = 1024
#: Idempotency keys compaction carries over (the newest).
MAX_KEYS = 65536

IS_WINDOWS = sys.platform == "win32"
_BINARY = getattr(os, "O_BINARY", 0)


def journal_path_for(transcript: str | os.PathLike[str]) -> str:
    """``<transcript>.fence`` beside the transcript (its real path, as the lock's)."""
    return session_key(transcript) + ".fence"


class JournalInvalid(Exception):
    """The journal is missing, torn, edited, truncated or replaced where a reader needed it
    (fail closed). ``detail`` says what is wrong."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{detail}: {path}")
        self.path = path
        self.detail = detail


@dataclass(frozen=True)
class Position:
    """Where a reader stands: after record ``seq`` (whose chain value is ``chain``) of the
    journal with ``salt``, which was ``(dev, ino, size)`` when read; ``claim`` is the
    writer claim in force there."""

    salt: bytes
    seq: int
    chain: bytes
    claim_run: str | None
    claim_revision: int
    dev: int = 0
    ino: int = 0
    size: int = 0
    mtime_ns: int = 0
    base_seq: int = 1
    # The journal's mtime was within a timestamp granule of the read: an in-place edit in
    # the same tick would keep the stat, so the next look rereads (git's racy rule).
    racy: bool = True


@dataclass
class Scan:
    """What a reader found past its position."""

    header: Header | None  # None: nothing new (the journal's stat matched the position)
    position: Position
    records: list[Record] = field(default_factory=list)
    # The reader's position was compacted away: records from the base on only; bytes
    # before the first of them are not attributed (the content rules judge them).
    compacted_past: bool = False


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _same(st: os.stat_result, position: Position) -> bool:
    key = (position.dev, position.ino, position.size, position.mtime_ns)
    return not position.racy and _stat_key(st) == key


#: Timestamp granularity assumed for the racy rule (coarse kernels tick in ms; FAT in 2 s).
RACY_NS = 2_000_000_000


def _racy(st: os.stat_result) -> bool:
    return max(st.st_mtime_ns, st.st_ctime_ns) + RACY_NS > time.time_ns()


def read_header(fd: int, path: str) -> tuple[Header, bytes]:
    """The header and the raw slot table."""
    raw = read_at(fd, HEADER_SIZE, 0)
    if len(raw) < HEADER_SIZE:
        raise JournalInvalid(path, f"journal header is torn ({len(raw)} of {HEADER_SIZE} bytes)")
    try:
        return Header.unpack(raw), raw[SLOTS_AT:HEADER_SIZE]
    except FormatError as exc:
        raise JournalInvalid(path, str(exc)) from None


def read_keys(fd: int, path: str, header: Header) -> list[KeyEntry]:
    if not header.key_count:
        return []
    raw = read_at(fd, header.data_start - HEADER_SIZE, HEADER_SIZE)
    try:
        return unpack_keys(raw, header.key_count, header.keys_hash)
    except FormatError as exc:
        raise JournalInvalid(path, str(exc)) from None


def _record_count(path: str, header: Header, size: int) -> int:
    body = size - header.data_start
    if body < 0 or body % RECORD_SIZE:
        raise JournalInvalid(
            path, f"journal is torn: {size} bytes is not a whole number of records"
        )
    return body // RECORD_SIZE


def scan(path: str, since: Position | None) -> Scan | None:
    """Records of the journal at ``path`` past ``since`` (all of them when None), checked
    (CRC, chain, sequence); None when there is no journal. Raises ``JournalInvalid`` when
    the journal cannot be trusted from ``since`` on (it was deleted, replaced by another
    journal, truncated before ``since``, torn or edited).

    The common case, nothing written since, costs one ``stat``: records are only ever
    appended (a new size), a rewrite by compaction or repair is a new inode, and an edit
    in place changes the mtime unless the journal was written within the last timestamp
    granule (then the record the reader stopped at is reread and checked)."""
    if since is not None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise JournalInvalid(path, "the journal was deleted") from None
        if _same(st, since):
            return Scan(None, since)
    try:
        fd = os.open(path, os.O_RDONLY | _BINARY)
    except FileNotFoundError:
        if since is not None:
            raise JournalInvalid(path, "the journal was deleted") from None
        return None
    try:
        return _scan_fd(fd, path, since)
    finally:
        os.close(fd)


def _scan_fd(fd: int, path: str, since: Position | None) -> Scan:
    st = os.fstat(fd)
    header, _slots = read_header(fd, path)
    if since is not None and header.salt != since.salt:
        raise JournalInvalid(path, "the journal was replaced by another one")
    if since is not None and _same(st, since):
        return Scan(header, since)
    count = _record_count(path, header, st.st_size)
    last = header.base_seq + count - 1
    compacted_past = False
    if since is None or since.seq + 1 < header.base_seq:
        compacted_past = since is not None
        first, prev = header.base_seq, header.base_chain
        claim = (header.claim_run, header.claim_revision)
    else:
        if since.seq > last:
            raise JournalInvalid(
                path, f"the journal was truncated: record {since.seq} is gone (last {last})"
            )
        if since.seq >= header.base_seq:
            # The record the reader stopped at must still be there, unchanged.
            raw = read_at(fd, RECORD_SIZE, header.record_at(since.seq))
            if raw[CHAIN_AT : CHAIN_AT + 16] != since.chain or not crc_ok(raw):
                raise JournalInvalid(path, f"journal record {since.seq} was edited")
        elif header.base_chain != since.chain:
            raise JournalInvalid(path, "the journal's base does not continue its records")
        first, prev = since.seq + 1, since.chain
        claim = (since.claim_run, since.claim_revision)
    records: list[Record] = []
    if first <= last:
        raw = read_at(fd, (last - first + 1) * RECORD_SIZE, header.record_at(first))
        if len(raw) != (last - first + 1) * RECORD_SIZE:
            raise JournalInvalid(path, "the journal shrank while it was read")
        for i in range(last - first + 1):
            try:
                record = Record.unpack(raw[i * RECORD_SIZE : (i + 1) * RECORD_SIZE], prev)
            except FormatError as exc:
                raise JournalInvalid(path, f"journal record {first + i}: {exc}") from None
            if record.seq != first + i:
                raise JournalInvalid(path, f"journal record {first + i} has number {record.seq}")
            if record.type == CLAIM:
                claim = (record.run_id, record.revision)
            records.append(record)
            prev = record.chain
    position = Position(
        header.salt,
        last,
        prev,
        claim[0],
        claim[1],
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        header.base_seq,
        _racy(st),
    )
    return Scan(header, position, records, compacted_past)


# ---------------------------------------------------------------------------------------
# Writing (under the journal's own lock).
# ---------------------------------------------------------------------------------------


def _os_lock(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
                return
            except OSError as exc:
                if exc.errno != errno.EDEADLK:
                    raise
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)


def new_journal(path: str, base_offset: int, *, claim_revision: int = 0) -> None:
    """Create the journal (header only) unless one exists; atomic: a temp file linked or
    renamed into place, so a reader never sees a half-written header. Its records will
    vouch for transcript bytes from ``base_offset`` on; ``claim_revision`` is the revision
    the next claim goes past."""
    salt = os.urandom(16)
    header = Header(
        salt=salt,
        base_seq=1,
        base_offset=base_offset,
        base_chain=chain_start(salt),
        claim_run=None,
        claim_revision=claim_revision,
        created_ns=time.time_ns(),
    )
    tmp = f"{path}.tmp-{os.getpid()}-{salt.hex()[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o666)
    try:
        write_at(fd, header.pack().ljust(HEADER_SIZE, b"\0"), 0)
    finally:
        os.close(fd)
    try:
        if IS_WINDOWS:  # pragma: no cover
            with contextlib.suppress(FileExistsError):
                os.rename(tmp, path)  # fails when the target exists
        else:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def locked_journal(path: str, create_at: int | None) -> Iterator[int]:
    """The journal at ``path`` opened for appending and locked exclusively; created first
    (its base at transcript offset ``create_at``) when missing and ``create_at`` is given,
    else ``FileNotFoundError``."""
    for _ in range(64):
        try:
            fd = os.open(path, os.O_RDWR | _BINARY)  # no O_APPEND: slots are pwritten
        except FileNotFoundError:
            if create_at is None:
                raise
            new_journal(path, create_at)
            continue
        try:
            _os_lock(fd)
            st = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                continue  # compacted (renamed over) while we waited: lock the new one
            yield fd
            return
        finally:
            os.close(fd)  # closing drops the lock
    raise JournalInvalid(path, "the journal kept being replaced while it was locked")


def append_records(fd: int, path: str, position: Position, records: list[Record]) -> Position:
    """Append ``records`` (numbered from ``position``) under the journal lock; returns the
    position after them. ``position`` must be the end of the journal (``scan`` under the
    same lock)."""
    chain = position.chain
    seq = position.seq
    blob = bytearray()
    claim = (position.claim_run, position.claim_revision)
    for record in records:
        seq += 1
        raw, chain = replace(record, seq=seq).pack(chain)
        blob += raw
        if record.type == CLAIM:
            claim = (record.run_id, record.revision)
    # One positional write at the end (we hold the lock): records land whole.
    write_at(fd, bytes(blob), os.fstat(fd).st_size)
    st = os.fstat(fd)
    return Position(position.salt, seq, chain, claim[0], claim[1], st.st_dev, st.st_ino, st.st_size)


def read_slots(raw: bytes) -> list[Slot | None]:
    return [Slot.unpack(raw[i * SLOT_SIZE : (i + 1) * SLOT_SIZE]) for i in range(SLOT_COUNT)]


def write_slot(fd: int, index: int, slot: Slot | None) -> None:
    data = slot.pack() if slot is not None else b"\0" * SLOT_SIZE
    write_at(fd, data, SLOTS_AT + index * SLOT_SIZE)


def compact(fd: int, path: str, live_min_seq: int | None, *, keep: int | None = None) -> bool:
    """Rewrite the journal without the records no live fence needs (under the journal
    lock): new base = the oldest record a live slot still reads, or ``keep`` records
    before the end, whichever is older. The claim in force and the idempotency keys of
    the dropped records move into the new header. Returns whether it rewrote."""
    st = os.fstat(fd)
    header, slots = read_header(fd, path)
    count = _record_count(path, header, st.st_size)
    last = header.base_seq + count - 1
    new_base = last + 1 - (KEEP_RECORDS if keep is None else keep)
    if live_min_seq is not None:
        new_base = min(new_base, live_min_seq + 1)
    if new_base <= header.base_seq:
        return False
    keys = {k.key_hash: k for k in read_keys(fd, path, header)}
    dropped = read_at(fd, (new_base - header.base_seq) * RECORD_SIZE, header.data_start)
    kept = read_at(fd, (last + 1 - new_base) * RECORD_SIZE, header.record_at(new_base))
    prev = header.base_chain
    claim = (header.claim_run, header.claim_revision)
    base_offset = header.base_offset
    for i in range(new_base - header.base_seq):
        try:
            record = Record.unpack(dropped[i * RECORD_SIZE : (i + 1) * RECORD_SIZE], prev)
        except FormatError as exc:
            raise JournalInvalid(path, f"journal record {header.base_seq + i}: {exc}") from None
        prev = record.chain
        if record.type == CLAIM:
            claim = (record.run_id, record.revision)
        elif record.type == APPEND:
            base_offset = max(base_offset, record.end)
            if record.key_hash:
                keys.pop(record.key_hash, None)
                keys[record.key_hash] = KeyEntry(record.key_hash, record.start, record.end)
        elif record.type == VOID:
            base_offset = min(base_offset, record.start)
            keys = {h: k for h, k in keys.items() if k.end <= record.start}
    carried = list(keys.values())[-MAX_KEYS:]
    new_header = replace(
        header,
        base_seq=new_base,
        base_offset=base_offset,
        base_chain=prev,
        claim_run=claim[0],
        claim_revision=claim[1],
        key_count=len(carried),
        keys_hash=keys_hash(carried),
    )
    tmp = f"{path}.compact-{os.getpid()}"
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _BINARY, 0o666)
    try:
        head = new_header.pack().ljust(SLOTS_AT, b"\0") + slots
        write_at(out, head + pack_keys(carried) + kept, 0)
        os.fsync(out)
    except BaseException:
        os.close(out)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(out)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        fsync_dir(os.path.dirname(path) or ".")
    return True
