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
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from .._types import RACY_NS
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
    "Reader",
    "Scan",
    "journal_path_for",
    "locked_journal",
    "new_journal",
    "same_state",
    "scan",
    "scan_fd",
]

#: Compact when a journal holds this many records past its base.
COMPACT_AT = 8192
#: Records compaction always keeps (for readers that hold no slot).
KEEP_RECORDS = 1024
#: Idempotency keys compaction carries over (the newest).
MAX_KEYS = 65536

IS_WINDOWS = sys.platform == "win32"
_BINARY = getattr(os, "O_BINARY", 0)


_PATHS: dict[str, str] = {}
_PATHS_MAX = 4096


def journal_path_for(transcript: str | os.PathLike[str]) -> str:
    """``<transcript>.fence`` beside the transcript (its real path, as the lock's).

    Resolved once per path string and process (a ``realpath`` walk is most of a journaled
    append's cost otherwise); a symlink re-pointed afterwards is not followed anew."""
    text = os.fspath(transcript)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    found = _PATHS.get(text)
    if found is None:
        found = session_key(text) + ".fence"
        if not os.path.exists(text):
            return found  # the key of a missing file may change once it exists
        if len(_PATHS) >= _PATHS_MAX:
            _PATHS.clear()
        _PATHS[text] = found
    return found


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
    data_start: int = 0  # where record base_seq sits (from the header)


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


def same_state(st: os.stat_result, position: Position) -> bool:
    """Whether the journal is provably as ``position`` left it: same file, size and mtime,
    and the position was not taken within a timestamp granule of a write."""
    key = (position.dev, position.ino, position.size, position.mtime_ns)
    return not position.racy and _stat_key(st) == key


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
    (CRC, chain, sequence); None when there is no journal (see ``Reader.scan``)."""
    reader = Reader(path)
    try:
        return reader.scan(since)
    finally:
        reader.close()


class Reader:
    """A reader of one journal that keeps its descriptor open between looks (reopened when
    the path names another file, and in a forked child).

    ``scan(since)`` raises ``JournalInvalid`` when the journal cannot be trusted from
    ``since`` on: it was deleted, replaced by another journal, truncated before ``since``,
    torn or edited. The common case, nothing written since, costs one ``stat``: records
    are only ever appended (a new size), a rewrite by compaction or repair is a new inode,
    and an edit in place changes the mtime unless the journal was written within the last
    timestamp granule; then the record the reader stopped at is reread and checked (one
    ``pread``). The header is read only from a file the reader has not seen before."""

    __slots__ = ("_fd", "_key", "_pid", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._key: tuple[int, int] | None = None
        self._pid = 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            # In a forked child this is the child's copy of the parent's descriptor:
            # closing it leaves the parent's open.
            with contextlib.suppress(OSError):
                os.close(fd)
        self._key = None

    def _open(self, st: os.stat_result) -> bool:
        """Open the file ``st`` describes; False when the path moved on meanwhile."""
        self.close()
        fd = os.open(self.path, os.O_RDONLY | _BINARY)
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            return False
        self._fd, self._key, self._pid = fd, (st.st_dev, st.st_ino), os.getpid()
        return True

    def scan(self, since: Position | None) -> Scan | None:
        path = self.path
        for _ in range(8):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self.close()
                if since is not None:
                    raise JournalInvalid(path, "the journal was deleted") from None
                return None
            if since is not None and same_state(st, since):
                return Scan(None, since)
            key = (st.st_dev, st.st_ino)
            if self._fd < 0 or self._key != key or self._pid != os.getpid():
                try:
                    if not self._open(st):
                        continue
                except FileNotFoundError:
                    continue
            return scan_fd(self._fd, path, since, st)
        raise JournalInvalid(path, "the journal kept being replaced while it was read")


def scan_fd(fd: int, path: str, since: Position | None, st: os.stat_result) -> Scan:
    same_file = since is not None and (st.st_dev, st.st_ino) == (since.dev, since.ino)
    header: Header | None = None
    if same_file:
        # Same inode as last time: the header has not changed (compaction and repair
        # write a new file), only records were appended.
        assert since is not None
        salt, base_seq, data_start = since.salt, since.base_seq, since.data_start
    else:
        header, _slots = read_header(fd, path)
        salt, base_seq, data_start = header.salt, header.base_seq, header.data_start
        if since is not None and salt != since.salt:
            raise JournalInvalid(path, "the journal was replaced by another one")
    body = st.st_size - data_start
    if body < 0 or body % RECORD_SIZE:
        raise JournalInvalid(
            path, f"journal is torn: {st.st_size} bytes is not a whole number of records"
        )
    last = base_seq + body // RECORD_SIZE - 1

    def record_at(seq: int) -> int:
        return data_start + (seq - base_seq) * RECORD_SIZE

    compacted_past = False
    if since is None or since.seq + 1 < base_seq:
        assert header is not None  # a new file, or none seen before: its header was read
        compacted_past = since is not None
        first, prev = base_seq, header.base_chain
        claim = (header.claim_run, header.claim_revision)
    else:
        if since.seq > last:
            raise JournalInvalid(
                path, f"the journal was truncated: record {since.seq} is gone (last {last})"
            )
        if since.seq >= base_seq:
            # The record the reader stopped at must still be there, unchanged.
            raw = read_at(fd, RECORD_SIZE, record_at(since.seq))
            if raw[CHAIN_AT : CHAIN_AT + 16] != since.chain or not crc_ok(raw):
                raise JournalInvalid(path, f"journal record {since.seq} was edited")
        elif header is not None and header.base_chain != since.chain:
            raise JournalInvalid(path, "the journal's base does not continue its records")
        first, prev = since.seq + 1, since.chain
        claim = (since.claim_run, since.claim_revision)
    records: list[Record] = []
    if first <= last:
        raw = read_at(fd, (last - first + 1) * RECORD_SIZE, record_at(first))
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
        salt,
        last,
        prev,
        claim[0],
        claim[1],
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        base_seq,
        _racy(st),
        data_start,
    )
    return Scan(header, position, records, compacted_past)


# ---------------------------------------------------------------------------------------
# Writing (under the journal's own lock).
# ---------------------------------------------------------------------------------------


# Windows byte-range locks are mandatory: lock a byte far past any record, as the session
# write lock does, so readers of the header and records are never refused.
_WIN_LOCK_OFFSET = 0x7FFF_FFF0


def _os_lock(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
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


def _os_unlock(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


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


class _Held:
    """This process's descriptor of one journal for writing, kept open between appends
    (the OS lock is taken and dropped around each use). ``mutex`` orders the process's
    own threads: an OS lock on one open file description does not exclude them."""

    __slots__ = ("fd", "key", "mutex", "pid")

    def __init__(self) -> None:
        self.fd = -1
        self.key: tuple[int, int] | None = None
        self.pid = 0
        self.mutex = threading.Lock()

    def drop(self, *, locked: bool = False) -> None:
        """Close the descriptor; unlock it first when we hold its OS lock (a forked child
        may still share the open file description, and would keep the lock alive)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            if locked:
                with contextlib.suppress(OSError):
                    _os_unlock(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        self.key = None


_HELD: dict[str, _Held] = {}
_HELD_MAX = 256  # journals this process keeps a descriptor to (a gateway has thousands)
_HELD_LOCK = threading.Lock()


def _forget_held_in_child() -> None:
    # A forked child must not share the parent's open file descriptions (an OS lock on
    # one would not exclude the other, and our copy would keep the parent's lock alive
    # after it closed its own) nor inherit a mutex held by another thread of the parent.
    global _HELD_LOCK
    for entry in _HELD.values():
        if entry.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(entry.fd)
    _HELD.clear()
    _HELD_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_held_in_child)


def _held(path: str) -> _Held:
    with _HELD_LOCK:
        entry = _HELD.get(path)
        if entry is None:
            if len(_HELD) >= _HELD_MAX:
                _evict_idle()
            entry = _HELD[path] = _Held()
        return entry


def _evict_idle() -> None:
    """Close the descriptors of journals no thread is using (called with _HELD_LOCK)."""
    for path, entry in list(_HELD.items()):
        if entry.mutex.acquire(blocking=False):
            try:
                entry.drop()
                del _HELD[path]
            finally:
                entry.mutex.release()
        if len(_HELD) < _HELD_MAX // 2:
            return


@contextlib.contextmanager
def locked_journal(path: str, create_at: Callable[[], int] | None) -> Iterator[int]:
    """The journal at ``path`` open for writing and locked exclusively; created first (its
    base at the transcript offset ``create_at()`` returns, asked only then) when missing
    and ``create_at`` is given, else ``FileNotFoundError``. The descriptor stays open for
    the next use in this process."""
    entry = _held(path)
    with entry.mutex:
        for _ in range(64):
            if entry.fd < 0:
                try:
                    fd = os.open(path, os.O_RDWR | _BINARY)  # no O_APPEND: slots are pwritten
                except FileNotFoundError:
                    if create_at is None:
                        raise
                    new_journal(path, create_at())
                    continue
                entry.fd, entry.pid = fd, os.getpid()
            fd = entry.fd
            _os_lock(fd)
            try:
                st = os.fstat(fd)
                try:
                    now = os.stat(path)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    # Compacted (renamed over) or removed: lock the new one.
                    entry.drop(locked=True)
                    continue
                entry.key = (st.st_dev, st.st_ino)
                yield fd
                return
            finally:
                if entry.fd == fd:
                    _os_unlock(fd)
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
        raw, chain = record.pack(chain, seq)
        blob += raw
        if record.type == CLAIM:
            claim = (record.run_id, record.revision)
    # One positional write at the end (we hold the lock and the caller's position was
    # checked against fstat under it): records land whole.
    write_at(fd, bytes(blob), position.size)
    return Position(
        position.salt,
        seq,
        chain,
        claim[0],
        claim[1],
        position.dev,
        position.ino,
        position.size + len(blob),
        0,  # not read back: a reader of this position rereads (racy)
        position.base_seq,
        True,
        position.data_start,
    )


def read_slots(raw: bytes) -> list[Slot | None]:
    return [Slot.unpack(raw[i * SLOT_SIZE : (i + 1) * SLOT_SIZE]) for i in range(SLOT_COUNT)]


def write_slot(fd: int, index: int, slot: Slot | None) -> None:
    data = slot.pack() if slot is not None else b"\0" * SLOT_SIZE
    write_at(fd, data, SLOTS_AT + index * SLOT_SIZE)


def compact(fd: int, path: str, live_min_seq: int | None, *, keep: int | None = None) -> bool:
    """Rewrite the journal without the records no live fence needs (under the journal
    lock): new base = the oldest record a live slot still reads, or ``keep`` records
    before the end, whichever is older. The claim in force and the idempotency keys of
    the dropped records move into the new header. Returns whether it rewrote.

    Not on Windows: a file another handle has open cannot be replaced there, and every
    reader keeps one open; the journal grows by one record per write instead."""
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        return False
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
                keys[record.key_hash] = KeyEntry(
                    record.key_hash, record.start, record.end, record.digest[:8]
                )
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
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        fsync_dir(os.path.dirname(path) or ".")
    return True
