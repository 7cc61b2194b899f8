"""Small rules several subpackages share, each written once: the session key, positional
I/O, UTC timestamps, pausing the garbage collector."""

from __future__ import annotations

import contextlib
import errno
import gc
import math
import os
import time
from collections.abc import Iterator

__all__ = [
    "MAX_TIMER_MS",
    "MAX_TIMER_SECONDS",
    "fsync_dir",
    "gc_paused",
    "iso_utc",
    "pread",
    "read_at",
    "read_exact",
    "session_key",
    "utc_stamp",
    "write_all",
    "write_at",
]


# The longest delay a timer may be given and still fire when expected: JavaScript's setTimeout
# (whose semantics the lock and owner timeouts keep) caps at 2**31 - 1 ms; just under it.
MAX_TIMER_MS = 2_147_000_000
MAX_TIMER_SECONDS = MAX_TIMER_MS / 1000


def session_key(path: str | os.PathLike[str]) -> str:
    """realpath of the file, else realpath of its folder + name, so aliases (symlinks to
    the file or to its folder, ``..`` paths) share one key: one lock, one fence."""
    raw = os.fspath(path)
    absolute = os.path.abspath(raw)
    if os.path.exists(absolute):
        return os.path.realpath(absolute)
    head, tail = os.path.split(absolute)
    try:
        return os.path.join(os.path.realpath(head), tail)
    except OSError:  # pragma: no cover - realpath only fails on exotic platforms
        return absolute


if hasattr(os, "pread"):

    def pread(fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

else:  # pragma: no cover - Windows has no pread; the descriptor is ours alone

    def pread(fd: int, length: int, offset: int) -> bytes:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, length)


def read_exact(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset`` (positional reads); ``EIO`` if the file ends first."""
    parts: list[bytes] = []
    while length > 0:
        block = pread(fd, length, offset)
        if not block:
            raise OSError(errno.EIO, "file shrank while reading its last line")
        parts.append(block)
        offset += len(block)
        length -= len(block)
    return b"".join(parts)


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


def iso_utc(wall: float | None = None) -> str:
    """``new Date().toISOString()``: UTC, milliseconds, ``Z``; of now, or of ``wall``
    (seconds since the epoch)."""
    millis = time.time_ns() // 1_000_000 if wall is None else math.floor(wall * 1000)
    seconds, rest = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest:03d}Z"


def utc_stamp() -> str:
    """``20260101T120000.123Z``: UTC with milliseconds, safe in a file name."""
    ns = time.time_ns()
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds)) + f".{rest // 1_000_000:03d}Z"


def fsync_dir(directory: str) -> None:
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


def read_at(fd: int, size: int, offset: int = 0) -> bytes:
    """Up to ``size`` bytes at ``offset`` (positional reads); shorter only at end of file."""
    chunks: list[bytes] = []
    while size > 0:
        chunk = pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


if hasattr(os, "pwrite"):

    def _pwrite(fd: int, data: memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

else:  # pragma: no cover - Windows has no pwrite; the descriptor is ours alone

    def _pwrite(fd: int, data: memoryview, offset: int) -> int:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


def write_at(fd: int, data: bytes, offset: int = 0) -> None:
    """All of ``data`` at ``offset`` (positional writes); ``EIO`` on a zero-length write."""
    view = memoryview(data)
    while view:
        written = _pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "short positional write")
        view = view[written:]
        offset += written
