"""File work of the transcript model: the streaming parse, appends, torn-tail quarantine.

Kept apart from ``transcript.py`` so the tree logic there reads without the byte juggling.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _jsonl

if TYPE_CHECKING:
    # Either backend's RollingDigest has this interface; the pure one names the type.
    from ._impl_py import RollingDigest as DigestT

__all__ = [
    "DEFAULT_CHUNK",
    "Loaded",
    "append_flags",
    "clean_end",
    "gc_paused",
    "iso_now",
    "new_entry_id",
    "parse_fd",
    "pread",
    "quarantine_bytes",
    "settled_end",
    "uuid7",
    "write_all",
]

DEFAULT_CHUNK = 8 << 20
_SCAN_BACK = 64 << 10
_UTF8_BOM = b"\xef\xbb\xbf"
_O_BINARY: int = getattr(os, "O_BINARY", 0)


def append_flags(create: bool) -> int:
    # O_RDWR, not O_WRONLY: the one-byte torn-tail check reads through the same descriptor.
    flags = os.O_RDWR | os.O_APPEND | _O_BINARY
    if create:
        flags |= os.O_CREAT | os.O_EXCL
    return flags


if hasattr(os, "pread"):

    def pread(fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

else:  # pragma: no cover - Windows has no pread; the descriptor is ours alone

    def pread(fd: int, length: int, offset: int) -> bytes:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, length)


def clean_end(fd: int, size: int) -> int:
    """Offset just past the last ``\\n`` in ``[0, size)`` (0 when there is none)."""
    end = size
    while end > 0:
        start = max(0, end - _SCAN_BACK)
        block = pread(fd, end - start, start)
        if len(block) != end - start:
            raise OSError(errno.EIO, "short read while looking for the last newline")
        nl = block.rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        end = start
    return 0


# A last byte that is not a newline is either a torn tail (a writer died mid-line: the size
# holds still) or another process's append caught mid-copy: Linux grows a file page by page
# during one write(), and readers do not wait for the writer's inode lock. These bound how
# long a suspicious tail is watched before it is called torn.
TORN_SETTLE = 0.2  # seconds the size must hold still without a newline at the end
TORN_SETTLE_MAX = 5.0  # overall cap, even while the file keeps growing


def settled_end(
    fd: int,
    settle: float = TORN_SETTLE,
    limit: float = TORN_SETTLE_MAX,
) -> tuple[int, bool]:
    """``(size, ends_cleanly)``: whether the file is empty or ends in ``\n``.

    The common case costs one ``fstat`` and one one-byte ``pread``. Only a tail without a
    newline is watched (short sleeps, re-reading that one byte) until it either gains its
    newline (an append in flight) or holds still for ``settle`` seconds (torn).
    """
    size = os.fstat(fd).st_size
    if size == 0 or pread(fd, 1, size - 1) == b"\n":
        return size, True
    start = stable_since = time.monotonic()
    pause = 1e-5
    while True:
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)
        now_size = os.fstat(fd).st_size
        if now_size == 0 or pread(fd, 1, now_size - 1) == b"\n":
            return now_size, True
        now = time.monotonic()
        if now_size != size:
            size, stable_since = now_size, now
        elif now - stable_since >= settle or now - start >= limit:
            return size, False


def write_all(fd: int, data: bytes) -> None:
    """Appends ``data`` with one ``os.write`` on an ``O_APPEND`` descriptor.

    For a regular file the kernel writes the whole buffer in one call (and, with
    ``O_APPEND``, at the end as one unit) unless the disk fills up, a file size limit is
    hit, or a signal lands mid-way. Only then is there a short write, and the rest is
    written by further calls: those bytes still land at the end of the file, but another
    writer's line may get between the two parts. If a later call fails the file is left
    ending in a partial line, a torn tail that every following append refuses until
    ``repair_torn_tail()`` moves it aside: a short write never glues two records silently.
    """
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - a regular file never returns 0 for a non-empty write
            raise OSError(errno.EIO, "write made no progress")
        view = view[n:]


def iso_now() -> str:
    """``new Date().toISOString()``: UTC, milliseconds, ``Z``."""
    ns = time.time_ns()
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1_000_000:03d}Z"


def new_entry_id(taken: Callable[[str], bool]) -> str:
    """8 hex chars not yet used in the file; after 100 collisions a full UUID (hex)."""
    for _ in range(100):
        candidate = os.urandom(4).hex()
        if not taken(candidate):
            return candidate
    return uuid.uuid4().hex


def uuid7() -> str:
    """A time-ordered UUID (version 7) for new session headers, as the original writes."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def quarantine_bytes(path: str, data: bytes, mode: int = 0o600) -> str:
    """Writes ``data`` to a new ``<path>.torn-<UTC time>`` file, durably; returns its path.

    Never replaces an existing file (``O_EXCL``, then ``-1``, ``-2``, ... suffixes). The
    file and its directory entry are fsynced before returning, because the caller truncates
    the transcript next and a crash in between must not lose the bytes.
    """
    ns = time.time_ns()
    seconds, rest = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds)) + f".{rest // 1_000_000:03d}Z"
    base = f"{path}.torn-{stamp}"
    for attempt in range(10_000):
        target = base if attempt == 0 else f"{base}-{attempt}"
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, mode)
        except FileExistsError:
            continue
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(os.path.dirname(os.path.abspath(target)))
        return target
    raise FileExistsError(errno.EEXIST, "no free quarantine name", base)  # pragma: no cover


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows cannot open a directory; nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


@dataclass
class Loaded:
    """What one streaming pass over a transcript found."""

    values: list[dict[str, Any]] = field(default_factory=list)
    malformed: int = 0
    invalid_utf8: int = 0
    size: int = 0
    torn: tuple[int, int] | None = None
    clean_digest: DigestT | None = None  # digest of [0, torn offset) when there is a torn tail


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector while a transcript is parsed.

    Parsing allocates only acyclic containers (JSON cannot express a cycle), so the
    collector finds nothing, yet with every parsed value kept alive its generational passes
    over the growing heap cost more than the parse itself (about 2.5x the time on a 100 MB
    transcript). Reference counting still frees everything as usual. Re-enabled only if it
    was enabled, so a caller that turned it off keeps it off.
    """
    was_enabled = gc.isenabled()
    if was_enabled:
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse_fd(fd: int, digest: DigestT, chunk: int = DEFAULT_CHUNK) -> Loaded:
    """Reads ``fd`` to its end, parsing every complete line and hashing every byte read.

    Each byte is hashed exactly once, in file order, straight from the read buffer; a last
    line without its newline (a torn tail) is hashed after a copy of the digest is taken, so
    ``clean_digest`` covers exactly the bytes a repair keeps. Lines are handed to the parser
    as ``memoryview`` slices of the read buffer: only a line that spans two reads is copied.
    Blank lines are skipped without counting; lines that are not JSON objects count as
    malformed.
    """
    out = Loaded()
    pending: list[bytes] = []  # bytes after the last newline seen, not yet hashed
    total = 0
    first = True
    while True:
        data = os.read(fd, chunk)
        if not data:
            break
        total += len(data)
        nl = data.rfind(b"\n")
        if nl < 0:
            pending.append(data)
            continue
        view = memoryview(data)
        for part in pending:
            digest.update(part)
        digest.update(view[: nl + 1])
        lines: list[bytes | memoryview] = []
        start = 0
        if pending:
            start = data.find(b"\n") + 1
            pending.append(data[: start - 1])
            lines.append(b"".join(pending))
            pending = []
        elif first and data.startswith(_UTF8_BOM):
            # JS trim() drops a BOM at the start of the file's text (reference §10.7)
            start = len(_UTF8_BOM)
        if first:
            first = False
            if lines and lines[0][: len(_UTF8_BOM)] == _UTF8_BOM:
                lines[0] = lines[0][len(_UTF8_BOM) :]
        find = data.find
        while start <= nl:
            end = find(b"\n", start, nl + 1)
            if end > start:
                lines.append(view[start:end])
            start = end + 1
        if nl + 1 < len(data):
            pending.append(data[nl + 1 :])
        _parse_lines(lines, out)
        del lines, view  # the views pin ``data``; let it go before the next read
    out.size = total
    if pending:
        tail = b"".join(pending)
        out.clean_digest = digest.copy()
        digest.update(tail)
        out.torn = (total - len(tail), len(tail))
    return out


def _parse_lines(lines: list[bytes | memoryview], out: Loaded) -> None:
    append = out.values.append
    loads = _jsonl.loads_line
    for line in lines:
        try:
            value, replaced = loads(line)
        except (ValueError, RecursionError):
            if not _blank_after_js_trim(line):
                out.malformed += 1
            continue
        if replaced:
            out.invalid_utf8 += 1
        if type(value) is dict:
            append(value)
        else:
            out.malformed += 1


def _blank_after_js_trim(line: bytes | memoryview) -> bool:
    # Only reached for lines JSON refused (blank ones included), so the decode cost never
    # hits the fast path.
    return not _jsonl.js_trim(str(line, "utf-8", "replace"))
