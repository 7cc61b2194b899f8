"""Pure-Python hot path: bit-identical results to the C backend, and its baseline."""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_mod
import struct
import sys
import time
from collections.abc import Iterable

import xxhash

from ._probe_base import ManyProbeBase, ProbeBase
from ._types import (
    DEFAULT_MAX_SUFFIX,
    DEFAULT_WINDOW,
    MISSING,
    RACY_NS,
    STABLE_TRIES,
    Change,
    ChangeKind,
    Fingerprint,
    PathArg,
    backoff_seconds,
    check_before,
    check_max_suffix,
    check_range,
    check_window,
    existing_fingerprint,
    past_end,
    racy_clean,
    shorter_than,
)
from .errors import UnstableFileError

__all__ = [
    "NAME",
    "BlockDigest",
    "FileProbe",
    "ManyProbe",
    "RollingDigest",
    "block_digest",
    "check_append",
    "content_digest",
    "fingerprint",
    "fingerprint_many",
    "read_range",
    "utf8_invalid_at",
]

NAME = "python"

_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block the open
    | getattr(os, "O_BINARY", 0)
)
_DIGEST_CHUNK = 256 * 1024
_xxh3_64 = xxhash.xxh3_64_intdigest
if sys.platform == "win32":  # os with the C backend's stat numbers and share modes: _winstat
    from ._winstat import os_view

    os = os_view()
_MISSING_ERRNOS = (errno.ENOENT, errno.ENOTDIR)
_NEVER = -(1 << 63)  # read time of a fingerprint adopted by mark(fp): never racy-clean
_NO_BASELINE = "FileProbe.poll() needs a baseline: call mark() or fingerprint() first"


if sys.platform == "win32":

    def _pread_once(fd: int, length: int, offset: int) -> bytes:
        # No pread on Windows; the descriptor is private to us, so seek + read is positional.
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, length)

else:
    _pread_once = os.pread


def _pread(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes at ``offset``; shorter only at end of file."""
    parts: list[bytes] = []
    done = 0
    while done < length:
        chunk = _pread_once(fd, length - done, offset + done)
        if not chunk:
            break
        parts.append(chunk)
        done += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _pause(tries: int) -> None:
    delay = backoff_seconds(tries)
    if delay:
        time.sleep(delay)


def _check_regular(st: os.stat_result, path: PathArg) -> None:
    if stat_mod.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not stat_mod.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)


_NOATIME = getattr(os, "O_NOATIME", 0)


def _open_fd(path: PathArg) -> int:
    # Our reads leave the access time alone, as the C backend's (sessionfence.c, h_open):
    # only the file's owner may ask, EPERM for anyone else.
    if _NOATIME:
        try:
            return os.open(path, _OPEN_FLAGS | _NOATIME)
        except PermissionError as exc:
            if exc.errno != errno.EPERM:
                raise
    return os.open(path, _OPEN_FLAGS)


def _open(path: PathArg) -> tuple[int, os.stat_result] | None:
    """Opens a regular file for reading; None when the path names nothing."""
    try:
        fd = _open_fd(path)
    except OSError as exc:
        if exc.errno in _MISSING_ERRNOS:
            return None
        if sys.platform == "win32" and exc.errno == errno.EACCES and os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path) from None
        raise
    try:
        st = os.fstat(fd)
        _check_regular(st, path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _same_state(a: os.stat_result, b: os.stat_result) -> bool:
    return (
        a.st_dev == b.st_dev
        and a.st_ino == b.st_ino
        and a.st_size == b.st_size
        and a.st_mtime_ns == b.st_mtime_ns
        and a.st_ctime_ns == b.st_ctime_ns
    )


def _fp(st: os.stat_result, tail_len: int, tail_hash: int) -> Fingerprint:
    return existing_fingerprint(
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        tail_len,
        tail_hash,
    )


def _stable_tail(
    fd: int, st: os.stat_result, window: int, path: PathArg, linked: bool = False
) -> Fingerprint | None:
    """The stable tail fingerprint; None when ``linked`` (a probe's kept descriptor) and
    the file lost its last link (the C backend's SF_STALE: the caller re-opens the path)."""
    for tries in range(STABLE_TRIES):
        _pause(tries)
        tl = min(st.st_size, window)
        data = _pread(fd, tl, st.st_size - tl) if tl else b""
        post = os.fstat(fd)
        if linked and post.st_nlink == 0:
            return None
        if len(data) == tl and _same_state(st, post):
            return _fp(st, tl, _xxh3_64(data))
        st = post
    raise UnstableFileError(path, STABLE_TRIES)


def fingerprint(path: PathArg, *, window: int = DEFAULT_WINDOW) -> Fingerprint:
    return _fingerprint(path, check_window(window))


def _fingerprint(path: PathArg, window: int) -> Fingerprint:
    opened = _open(path)
    if opened is None:
        return MISSING
    fd, st = opened
    try:
        fp = _stable_tail(fd, st, window, path)
    finally:
        os.close(fd)
    assert fp is not None  # only a linked descriptor goes stale
    return fp


def fingerprint_many(
    paths: Iterable[PathArg], *, window: int = DEFAULT_WINDOW
) -> list[Fingerprint]:
    window = check_window(window)
    return [_fingerprint(p, window) for p in paths]


def _classify(
    fd: int,
    st: os.stat_result,
    before: Fingerprint,
    window: int,
    max_suffix: int,
) -> Change | None:
    """One attempt; None when the reads saw the file stop short (it shrank under us)."""
    size = st.st_size
    aw = min(size, window)
    same_file = before.exists and st.st_dev == before.dev and st.st_ino == before.ino
    if not before.exists:
        whole = size <= max_suffix
        data = _pread(fd, size if whole else aw, 0 if whole else size - aw)
        if len(data) != (size if whole else aw):
            return None
        after = _fp(st, aw, _xxh3_64(data[len(data) - aw :]))
        return Change(ChangeKind.CREATED, before, after, data if whole else None)
    if not same_file or size < before.size:
        data = _pread(fd, aw, size - aw)
        if len(data) != aw:
            return None
        kind = ChangeKind.REPLACED if not same_file else ChangeKind.TRUNCATED
        return Change(kind, before, _fp(st, aw, _xxh3_64(data)))
    tl = before.tail_len
    if size == before.size:
        span = max(aw, tl)
        data = _pread(fd, span, size - span)
        if len(data) != span:
            return None
        after = _fp(st, aw, _xxh3_64(data[span - aw :]))
        # The old window is always re-hashed: with coarse timestamps (jiffies, NFS, FAT) a
        # same-size rewrite can leave mtime and ctime equal, and only the bytes tell.
        if _xxh3_64(data[span - tl :]) != before.tail_hash:
            kind = ChangeKind.REWRITTEN
        elif st.st_mtime_ns == before.mtime_ns and st.st_ctime_ns == before.ctime_ns:
            kind = ChangeKind.UNCHANGED
        else:
            kind = ChangeKind.TOUCHED
        return Change(kind, before, after)
    suffix_len = size - before.size
    old_lo = before.size - tl
    if suffix_len <= max_suffix:
        lo = min(old_lo, size - aw)
        data = _pread(fd, size - lo, lo)
        if len(data) != size - lo:
            return None
        after = _fp(st, aw, _xxh3_64(data[len(data) - aw :]))
        if _xxh3_64(data[old_lo - lo : before.size - lo]) != before.tail_hash:
            return Change(ChangeKind.REWRITTEN, before, after)
        return Change(ChangeKind.APPENDED, before, after, data[before.size - lo :])
    old = _pread(fd, tl, old_lo)
    tail = _pread(fd, aw, size - aw)
    if len(old) != tl or len(tail) != aw:
        return None
    after = _fp(st, aw, _xxh3_64(tail))
    same = _xxh3_64(old) == before.tail_hash
    return Change(ChangeKind.APPENDED if same else ChangeKind.REWRITTEN, before, after)


def _check_append_fd(
    fd: int,
    st: os.stat_result,
    before: Fingerprint,
    window: int,
    max_suffix: int,
    path: PathArg,
    linked: bool = False,
) -> Change | None:
    """None when ``linked`` and the file lost its last link (see ``_stable_tail``)."""
    for tries in range(STABLE_TRIES):
        _pause(tries)
        change = _classify(fd, st, before, window, max_suffix)
        post = os.fstat(fd)
        if linked and post.st_nlink == 0:
            return None
        if change is not None and _same_state(st, post):
            return change
        st = post
    raise UnstableFileError(path, STABLE_TRIES)


def _missing_change(before: Fingerprint) -> Change:
    kind = ChangeKind.DELETED if before.exists else ChangeKind.UNCHANGED
    return Change(kind, before, MISSING)


def check_append(
    path: PathArg,
    before: Fingerprint,
    *,
    window: int = DEFAULT_WINDOW,
    max_suffix: int = DEFAULT_MAX_SUFFIX,
) -> Change:
    window = check_window(window)
    max_suffix = check_max_suffix(max_suffix)
    before = check_before(before)
    opened = _open(path)
    if opened is None:
        return _missing_change(before)
    fd, st = opened
    try:
        change = _check_append_fd(fd, st, before, window, max_suffix, path)
    finally:
        os.close(fd)
    assert change is not None  # only a linked descriptor goes stale
    return change


def _read_range_fd(fd: int, size: int, offset: int, length: int, path: PathArg) -> bytes:
    if offset > size or length > size - offset:
        raise past_end(path, offset, length, size)
    data = _pread(fd, length, offset)
    if len(data) != length:
        raise past_end(path, offset, length, offset + len(data))
    return data


def read_range(path: PathArg, offset: int, length: int) -> bytes:
    offset, length = check_range(offset, length)
    opened = _open(path)
    if opened is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    fd, st = opened
    try:
        return _read_range_fd(fd, st.st_size, offset, length, path)
    finally:
        os.close(fd)


def _check_size(size: object) -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int or None, not {type(size).__name__}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return size


def _digest_file(digest: RollingDigest | BlockDigest, path: PathArg, size: int | None) -> None:
    size = _check_size(size)
    opened = _open(path)
    if opened is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    fd, st = opened
    try:
        end = st.st_size if size is None else size
        if end > st.st_size:
            raise shorter_than(path, end, st.st_size)
        off = 0
        while off < end:
            chunk = _pread(fd, min(_DIGEST_CHUNK, end - off), off)
            if not chunk:
                raise shorter_than(path, end, off)
            digest.update(chunk)
            off += len(chunk)
    finally:
        os.close(fd)


def utf8_invalid_at(data: bytes | bytearray | memoryview) -> int:
    """Offset where strict UTF-8 decoding of ``data`` fails (the start of the first
    malformed sequence, as ``UnicodeDecodeError.start``), or -1 when it is all valid."""
    try:
        str(data, "utf-8")
    except UnicodeDecodeError as exc:
        return int(exc.start)
    return -1


def content_digest(path: PathArg, size: int | None = None) -> int:
    digest = RollingDigest()
    _digest_file(digest, path, size)
    return digest.intdigest()


def block_digest(path: PathArg, size: int | None = None) -> int:
    """``BlockDigest`` value of bytes ``[0, size)`` of the file (the fence's whole-content
    proof; ``content_digest`` is the plain XXH3-128)."""
    digest = BlockDigest()
    _digest_file(digest, path, size)
    return digest.intdigest()


_BLOCK = 1 << 20
_LEN = struct.Struct("<Q")


class RollingDigest:
    """XXH3-128 streaming state: roll it forward with appended bytes."""

    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state = xxhash.xxh3_128()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._state.update(data)

    def copy(self) -> RollingDigest:
        other = RollingDigest.__new__(RollingDigest)
        other._state = self._state.copy()
        return other

    def intdigest(self) -> int:
        return int(self._state.intdigest())

    @classmethod
    def from_file(cls, path: PathArg, size: int | None = None) -> RollingDigest:
        digest = cls()
        _digest_file(digest, path, size)
        return digest


class BlockDigest:
    """The content digest a fence keeps: block-structured so that it can be rebuilt from
    the hashes of whole blocks (``from_blocks``): with ``H`` the
    XXH3-128 (seed 0, canonical 16 bytes) of a piece and ``BLOCK`` = 1 MiB, the digest of
    ``n`` bytes is ``XXH3-128(H(block 1) || ... || H(block k) || H(rest) || le64(n))``, the
    blocks being the ``k = n // BLOCK`` whole ones and ``rest`` the bytes after them."""

    __slots__ = ("_fill", "_inner", "_outer", "_total")

    #: The block size of the digest (and of the transcript index's block hashes).
    BLOCK = _BLOCK

    def __init__(self) -> None:
        self._outer = xxhash.xxh3_128()  # over the whole blocks' hashes
        self._inner = xxhash.xxh3_128()  # over the partial block
        self._fill = 0  # bytes in the partial block
        self._total = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if type(data) is bytes or type(data) is bytearray:
            n = len(data)
            if self._fill + n < _BLOCK:  # the common case: within the partial block
                self._inner.update(data)
                self._fill += n
                self._total += n
                return
            view = memoryview(data)
        else:
            view = memoryview(data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            n = view.nbytes
        inner = self._inner
        while n:
            take = min(n, _BLOCK - self._fill)
            inner.update(view[:take])
            view = view[take:]
            n -= take
            self._fill += take
            self._total += take
            if self._fill == _BLOCK:
                self._outer.update(inner.digest())
                inner.reset()
                self._fill = 0

    def copy(self) -> BlockDigest:
        other = BlockDigest.__new__(BlockDigest)
        other._outer = self._outer.copy()
        other._inner = self._inner.copy()
        other._fill = self._fill
        other._total = self._total
        return other

    def intdigest(self) -> int:
        last = self._outer.copy()
        last.update(self._inner.digest())
        last.update(_LEN.pack(self._total))
        return int(last.intdigest())

    @classmethod
    def from_file(cls, path: PathArg, size: int | None = None) -> BlockDigest:
        digest = cls()
        _digest_file(digest, path, size)
        return digest

    @classmethod
    def from_blocks(
        cls, hashes: Iterable[bytes], tail: bytes | bytearray | memoryview = b""
    ) -> BlockDigest:
        """The digest of ``k`` whole blocks whose hashes are ``hashes`` (each the 16-byte
        XXH3-128 of one ``BLOCK``-byte block, in order), followed by the bytes ``tail``:
        equal to one fed those blocks' bytes and ``tail``, which are never read."""
        parts = list(hashes)
        for h in parts:
            if len(h) != 16:
                raise ValueError(f"a block hash is 16 bytes, got {len(h)}")
        digest = cls()
        digest._outer.update(b"".join(parts))  # one stream: the same as one update each
        digest._total = len(parts) * _BLOCK
        digest.update(tail)
        return digest


class FileProbe(ProbeBase):
    """Keeps the file open between checks; follows the path to a new file by itself."""

    __slots__ = ("_fd", "_ident", "_last", "_racy_ns", "_read_at")

    def __init__(self, path: PathArg, *, window: int = DEFAULT_WINDOW) -> None:
        self._init_base(path, check_window(window))
        self._fd: int | None = None
        self._ident: tuple[int, int] = (0, 0)
        self._last: Fingerprint | None = None  # the last look: poll()'s baseline
        self._read_at = _NEVER
        self._racy_ns = RACY_NS

    def _drop(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _attach(self, reopen: bool = False) -> tuple[int, os.stat_result, bool] | None:
        """(descriptor, stat, linked) for the file the path names now, None when it names
        nothing. ``linked``: a descriptor kept from an earlier call, whose file may have
        lost its last link since (unlinked between checks, or an inode number a FUSE or
        network file system handed out again): the read through it checks (``_stable_tail``)
        and the caller re-attaches with ``reopen`` (as sf_probe_fingerprint does)."""
        self._ensure_open()
        try:
            st = os.stat(self._path)
        except OSError as exc:
            if exc.errno in _MISSING_ERRNOS:
                self._drop()
                return None
            raise
        _check_regular(st, self._path)
        if not reopen and self._fd is not None and self._ident == (st.st_dev, st.st_ino):
            return self._fd, st, True
        self._drop()
        opened = _open(self._path)
        if opened is None:
            return None
        self._fd, st = opened
        self._ident = (st.st_dev, st.st_ino)
        return self._fd, st, False

    def _racy_clean(self, st: os.stat_result) -> bool:
        fields = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        return racy_clean(self._last, fields, self._window, self._read_at, self._racy_ns)

    def _do_fingerprint(self) -> Fingerprint:
        started = time.time_ns()
        last = self._last
        reopen = False
        while True:
            attached = self._attach(reopen)
            if attached is None:
                fp = MISSING
                break
            fd, st, linked = attached
            if linked and self._racy_clean(st):
                return last  # type: ignore[return-value]  # racy_clean implies not None
            found = _stable_tail(fd, st, self._window, self._path, linked)
            if found is not None:
                fp = found
                break
            reopen = True  # the kept descriptor's file is gone: open the path anew
        self._read_at = started
        if last is not None and last == fp:
            return last  # immutable: hand back the object callers already hold
        self._last = fp
        return fp

    def _do_mark(self, fp: Fingerprint | None) -> None:
        if fp is None:
            self._do_fingerprint()
            return
        self._ensure_open()
        self._last = check_before(fp)
        self._read_at = _NEVER  # an adopted fingerprint's read time is unknown

    def _do_poll(self, max_suffix: int) -> tuple[ChangeKind, bytes | None]:
        max_suffix = check_max_suffix(max_suffix)
        self._ensure_open()
        before = self._last
        if before is None:
            raise ValueError(_NO_BASELINE)
        started = time.time_ns()
        reopen = False
        while True:
            attached = self._attach(reopen)
            if attached is None:
                change = _missing_change(before)
                break
            fd, st, linked = attached
            if linked and self._racy_clean(st):
                self._read_at = started
                return ChangeKind.UNCHANGED, None
            found = _check_append_fd(fd, st, before, self._window, max_suffix, self._path, linked)
            if found is not None:
                change = found
                break
            reopen = True
        self._read_at = started
        self._last = change.after
        return change.kind, change.appended

    def _do_baseline(self) -> Fingerprint | None:
        return self._last

    def _do_check_append(self, before: Fingerprint, window: int | None, max_suffix: int) -> Change:
        w = self._window if window is None else check_window(window)
        max_suffix = check_max_suffix(max_suffix)
        before = check_before(before)
        reopen = False
        while True:
            attached = self._attach(reopen)
            if attached is None:
                return _missing_change(before)
            fd, st, linked = attached
            change = _check_append_fd(fd, st, before, w, max_suffix, self._path, linked)
            if change is not None:
                return change
            reopen = True

    def _do_read_range(self, offset: int, length: int) -> bytes:
        offset, length = check_range(offset, length)
        reopen = False
        while True:
            attached = self._attach(reopen)
            if attached is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self._path)
            fd, st, linked = attached
            if offset > st.st_size or length > st.st_size - offset:
                raise past_end(self._path, offset, length, st.st_size)
            data = _pread(fd, length, offset)
            if linked and os.fstat(fd).st_nlink == 0:
                reopen = True  # read the file the path names now
                continue
            if len(data) != length:
                raise past_end(self._path, offset, length, offset + len(data))
            return data

    def _do_close(self) -> None:
        self._drop()
        self._closed = True
        self._last = None

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class ManyProbe(ManyProbeBase):
    """Watches many files; ``poll()`` gives the indices of those that changed since the
    previous poll (see ``ManyProbeBase``)."""

    __slots__ = ("_fps", "_racy_ns", "_read_at")

    def __init__(self, paths: Iterable[PathArg], *, window: int = DEFAULT_WINDOW) -> None:
        items = tuple(paths)
        for p in items:
            os.fspath(p)  # TypeError for what is not a path, as the C backend
        self._init_base(items, check_window(window))
        self._fps: list[Fingerprint] = [MISSING] * len(items)
        self._read_at = _NEVER
        self._racy_ns = RACY_NS
        self._do_poll()

    def _do_poll(self) -> list[int]:
        started = time.time_ns()
        window, read_at, racy_ns = self._window, self._read_at, self._racy_ns
        old = self._fps
        new = old.copy()  # committed only when every file succeeded
        changed: list[int] = []
        for i, path in enumerate(self._paths):
            try:
                st = os.stat(path)
            except OSError as exc:
                if exc.errno not in _MISSING_ERRNOS:
                    raise
                fp = MISSING
            else:
                fields = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                if racy_clean(old[i], fields, window, read_at, racy_ns):
                    continue
                fp = _fingerprint(path, window)
            if fp != old[i]:
                new[i] = fp
                changed.append(i)
        self._fps = new
        self._read_at = started
        return changed

    def _do_fingerprint(self, index: int) -> Fingerprint:
        return self._fps[index]
