"""C hot path through cffi. cffi releases the GIL on every ``lib`` call."""

from __future__ import annotations

import os
import struct
import sys
import threading
from collections.abc import Iterable
from typing import Any, NoReturn, TypeVar

from ._ffi import ffi, lib
from ._probe_base import ManyProbeBase, ProbeBase
from ._types import (
    DEFAULT_MAX_SUFFIX,
    DEFAULT_WINDOW,
    FINGERPRINT_SETTERS,
    MISSING,
    RACY_NS,
    STABLE_TRIES,
    WINDOW_MAX,
    Change,
    ChangeKind,
    Fingerprint,
    PathArg,
    check_before,
    check_max_suffix,
    check_range,
    check_window,
    existing_fingerprint,
    past_end,
    shorter_than,
    slot_setters,
)
from ._version import __version__
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

NAME = "cffi"

_built_for = ffi.string(lib.sf_version()).decode("ascii")
if _built_for != __version__:
    raise ImportError(
        f"sessionfence._ffi was built for version {_built_for}, but the Python package is "
        f"{__version__}: reinstall sessionfence (a stale build is on the path)"
    )

# sf_fp is eight 8-byte fields with no padding: one struct call unpacks it.
_FP = struct.Struct("=qQQqqqqQ")
_unpack_fp = _FP.unpack_from
_KINDS = {
    lib.SF_UNCHANGED: ChangeKind.UNCHANGED,
    lib.SF_APPENDED: ChangeKind.APPENDED,
    lib.SF_TOUCHED: ChangeKind.TOUCHED,
    lib.SF_REWRITTEN: ChangeKind.REWRITTEN,
    lib.SF_TRUNCATED: ChangeKind.TRUNCATED,
    lib.SF_REPLACED: ChangeKind.REPLACED,
    lib.SF_CREATED: ChangeKind.CREATED,
    lib.SF_DELETED: ChangeKind.DELETED,
}
_new = ffi.new
_NO_BASELINE = "FileProbe.poll() needs a baseline: call mark() or fingerprint() first"
_buffer = ffi.buffer
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()


def _cpath(path: PathArg) -> bytes:
    raw = (
        path.encode(_FS_ENCODING, _FS_ERRORS) if type(path) is str else os.fsencode(os.fspath(path))
    )
    if 0 in raw:  # memchr; `b"\0" in raw` goes through the buffer protocol, ~10x slower
        raise ValueError("embedded null byte in path")
    return raw


class _Scratch(threading.local):
    """Per-thread output structs for one-shot calls: the C side runs without the GIL, so
    threads must not share them, and allocating them per call costs ~1 us."""

    def __init__(self) -> None:
        self.busy = False
        self.fp = _new("sf_fp *")
        self.fp_view = _buffer(self.fp)
        self.err = _new("sf_err *")
        self.before = _new("sf_fp *")
        self.before_view = _buffer(self.before)
        self.change = _new("sf_change *")
        self.after_view = _buffer(ffi.addressof(self.change, "after"))


_scratch = _Scratch()


def _claim_scratch() -> _Scratch:
    """This thread's scratch, or fresh structs when a call is already using it: a signal
    handler or finalizer that re-enters between a C call and the reading of its results
    must not overwrite them (a clobbered suffix pointer would be freed twice)."""
    scratch = _scratch
    if scratch.busy:
        scratch = _Scratch()
    scratch.busy = True
    return scratch


def _raise(err: Any, path: PathArg) -> NoReturn:
    code = err.code
    if code == lib.SF_EOS:
        e = int(err.sys_errno)
        if sys.platform == "win32" and err.winerror:
            raise OSError(e, os.strerror(e), path, int(err.winerror))
        raise OSError(e, os.strerror(e), path)
    if code == lib.SF_EUNSTABLE:
        raise UnstableFileError(path, STABLE_TRIES)
    if code == lib.SF_ENOMEM:
        raise MemoryError(f"out of memory while reading {path!r}")
    raise ValueError(f"invalid argument ({int(err.detail)}) for {path!r}")


def _fp_from_view(view: Any) -> Fingerprint:
    exists, dev, ino, size, mtime, ctime, tail_len, tail_hash = _unpack_fp(view)
    if not exists:
        return MISSING
    return existing_fingerprint(dev, ino, size, mtime, ctime, tail_len, tail_hash)


def fingerprint(path: PathArg, *, window: int = DEFAULT_WINDOW) -> Fingerprint:
    if type(window) is not int or not 0 <= window <= WINDOW_MAX:
        window = check_window(window)
    cpath = _cpath(path)
    scratch = _claim_scratch()
    try:
        if lib.sf_fingerprint(cpath, window, scratch.fp, scratch.err) != 0:
            _raise(scratch.err, path)
        return _fp_from_view(scratch.fp_view)
    finally:
        scratch.busy = False


def _joined_paths(items: list[PathArg]) -> bytes:
    """All paths as one NUL-separated buffer: the C loop walks it without Python objects."""
    if all(type(p) is str for p in items):
        text = "\0".join(items)  # type: ignore[arg-type]  # all str, checked above
        if text.count("\0") != len(items) - 1:
            raise ValueError("embedded null byte in path")
        return text.encode(_FS_ENCODING, _FS_ERRORS) + b"\0"
    return b"\0".join([_cpath(p) for p in items]) + b"\0"


def fingerprint_many(
    paths: Iterable[PathArg], *, window: int = DEFAULT_WINDOW
) -> list[Fingerprint]:
    window = check_window(window)
    items = list(paths)
    if not items:
        return []
    joined = _joined_paths(items)
    out = _new("sf_fp[]", len(items))
    err = _new("sf_err *")
    if lib.sf_fingerprint_many(joined, len(items), window, out, err) != 0:
        _raise(err, items[err.where])
    # Inlined construction (see _types.existing_fingerprint): this loop is most of the
    # Python-side cost of a batch.
    new = object.__new__
    cls = Fingerprint
    slots = FINGERPRINT_SETTERS
    set_exists, set_dev, set_ino, set_size, set_mtime, set_ctime, set_tl, set_th = slots
    result: list[Fingerprint] = []
    append = result.append
    for exists, dev, ino, size, mtime, ctime, tail_len, tail_hash in _FP.iter_unpack(_buffer(out)):
        if not exists:
            append(MISSING)
            continue
        fp = new(cls)
        set_exists(fp, True)
        set_dev(fp, dev)
        set_ino(fp, ino)
        set_size(fp, size)
        set_mtime(fp, mtime)
        set_ctime(fp, ctime)
        set_tl(fp, tail_len)
        set_th(fp, tail_hash)
        append(fp)
    return result


def _pack_before(view: Any, before: Fingerprint) -> None:
    """Packs ``before`` for C. struct does the type and range checks the pure backend does
    in check_before; only when it refuses do we run check_before for the precise error."""
    if type(before) is not Fingerprint:
        check_before(before)  # TypeError for non-fingerprints; subclasses get the full check
    if not before.exists:
        _FP.pack_into(view, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        return
    tail_len, size = before.tail_len, before.size
    try:
        ok = 0 <= tail_len <= size and tail_len <= WINDOW_MAX
        if ok:
            _FP.pack_into(
                view,
                0,
                1,
                before.dev,
                before.ino,
                size,
                before.mtime_ns,
                before.ctime_ns,
                tail_len,
                before.tail_hash,
            )
    except (struct.error, TypeError):
        ok = False
    if not ok:
        check_before(before)
        raise ValueError(f"before does not describe a file: {before!r}")


_CHANGE_SETTERS = slot_setters(Change, ("kind", "before", "after", "appended"))


def _change_result(scratch: Any, before: Fingerprint) -> Change:
    out = scratch.change
    after = _fp_from_view(scratch.after_view)
    appended = None
    if out.has_suffix:
        try:
            appended = _buffer(out.suffix, out.suffix_len)[:]
        finally:
            lib.sf_free(out.suffix)
    # Built through the slots like Fingerprints (see _types.existing_fingerprint).
    change = object.__new__(Change)
    set_kind, set_before, set_after, set_appended = _CHANGE_SETTERS
    set_kind(change, _KINDS[out.kind])
    set_before(change, before)
    set_after(change, after)
    set_appended(change, appended)
    return change


def _check_append(
    probe: Any, path: PathArg, cpath: bytes, before: Fingerprint, window: int, max_suffix: int
) -> Change:
    if type(window) is not int or not 0 <= window <= WINDOW_MAX:
        window = check_window(window)
    if type(max_suffix) is not int or max_suffix < 0:
        max_suffix = check_max_suffix(max_suffix)
    scratch = _claim_scratch()
    try:
        _pack_before(scratch.before_view, before)
        err = scratch.err
        if lib.sf_check_append(
            probe, cpath, scratch.before, window, max_suffix, scratch.change, err
        ):
            _raise(err, path)
        return _change_result(scratch, before)
    finally:
        scratch.busy = False


def check_append(
    path: PathArg,
    before: Fingerprint,
    *,
    window: int = DEFAULT_WINDOW,
    max_suffix: int = DEFAULT_MAX_SUFFIX,
) -> Change:
    return _check_append(ffi.NULL, path, _cpath(path), before, window, max_suffix)


_alloc_raw = ffi.new_allocator(should_clear_after_alloc=False)


def _read_range(probe: Any, path: PathArg, cpath: bytes, offset: int, length: int) -> bytes:
    offset, length = check_range(offset, length)
    buf = _alloc_raw("uint8_t[]", max(length, 1))
    err = _new("sf_err *")
    if lib.sf_read_range(probe, cpath, offset, length, buf, err) != 0:
        if err.code == lib.SF_ESHORT:
            raise past_end(path, offset, length, int(err.detail))
        _raise(err, path)
    data: bytes = _buffer(buf, length)[:]
    return data


def read_range(path: PathArg, offset: int, length: int) -> bytes:
    return _read_range(ffi.NULL, path, _cpath(path), offset, length)


def _check_size(size: object) -> int:
    if size is None:
        return -1
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int or None, not {type(size).__name__}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return size


def _digest_error(err: Any, path: PathArg, size: int) -> NoReturn:
    if err.code == lib.SF_ESHORT:
        raise shorter_than(path, size, int(err.detail))
    _raise(err, path)


def utf8_invalid_at(data: bytes | bytearray | memoryview) -> int:
    """Offset where strict UTF-8 decoding of ``data`` fails (the start of the first
    malformed sequence, as ``UnicodeDecodeError.start``), or -1 when it is all valid."""
    buf = ffi.from_buffer("uint8_t[]", data)
    return int(lib.sf_utf8_invalid_at(buf, len(buf)))


def content_digest(path: PathArg, size: int | None = None) -> int:
    n = _check_size(size)
    hi = _new("uint64_t *")
    lo = _new("uint64_t *")
    err = _new("sf_err *")
    if lib.sf_content_digest(_cpath(path), n, hi, lo, err) != 0:
        _digest_error(err, path, n)
    return (int(hi[0]) << 64) | int(lo[0])


def _new_state(blocks: bool) -> Any:
    state = lib.sf_bdigest_new() if blocks else lib.sf_digest_new()
    if state == ffi.NULL:
        raise MemoryError("cannot allocate a digest state")
    return ffi.gc(state, lib.sf_digest_free)


_BLOCK = int(lib.SF_DIGEST_BLOCK)


_D = TypeVar("_D", bound="_Digest")


def block_digest(path: PathArg, size: int | None = None) -> int:
    """``BlockDigest`` value of bytes ``[0, size)`` of the file (the fence's whole-content
    proof; ``content_digest`` is the plain XXH3-128)."""
    n = _check_size(size)
    state = _new_state(True)
    err = _new("sf_err *")
    if lib.sf_digest_update_file(state, _cpath(path), n, err) != 0:
        _digest_error(err, path, n)
    hi = _new("uint64_t *")
    lo = _new("uint64_t *")
    if lib.sf_digest_value(state, hi, lo) != 0:
        raise MemoryError("digest finalisation failed")
    return (int(hi[0]) << 64) | int(lo[0])


class _Digest:
    """A digest state over the C one: rolled forward with appended bytes."""

    __slots__ = ("_state",)

    _BLOCKS = False

    def __init__(self) -> None:
        self._state = _new_state(self._BLOCKS)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = ffi.from_buffer(data)
        if lib.sf_digest_update(self._state, view, len(view)) != 0:
            raise MemoryError("digest update failed")

    def copy(self: _D) -> _D:
        other = type(self).__new__(type(self))
        state = lib.sf_digest_copy(self._state)
        if state == ffi.NULL:
            raise MemoryError("cannot allocate a digest state")
        other._state = ffi.gc(state, lib.sf_digest_free)
        return other

    def intdigest(self) -> int:
        hi = _new("uint64_t *")
        lo = _new("uint64_t *")
        if lib.sf_digest_value(self._state, hi, lo) != 0:
            raise MemoryError("digest finalisation failed")
        return (int(hi[0]) << 64) | int(lo[0])

    @classmethod
    def from_file(cls: type[_D], path: PathArg, size: int | None = None) -> _D:
        n = _check_size(size)
        digest = cls()
        err = _new("sf_err *")
        if lib.sf_digest_update_file(digest._state, _cpath(path), n, err) != 0:
            _digest_error(err, path, n)
        return digest


class RollingDigest(_Digest):
    """XXH3-128 streaming state: roll it forward with appended bytes."""

    __slots__ = ()


class BlockDigest(_Digest):
    """The content digest a fence keeps: block-structured so that it can be rebuilt from
    the hashes of whole blocks (``from_blocks``): with ``H`` the XXH3-128 (seed 0, canonical
    16 bytes) of a piece and ``BLOCK`` = 1 MiB, the digest of ``n`` bytes is
    ``XXH3-128(H(block 1) || ... || H(block k) || H(rest) || le64(n))``, the blocks being the
    ``k = n // BLOCK`` whole ones and ``rest`` the bytes after them."""

    __slots__ = ()

    _BLOCKS = True

    #: The block size of the digest (and of the transcript index's block hashes).
    BLOCK = _BLOCK

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
        if parts:
            joined = b"".join(parts)
            if lib.sf_digest_add_blocks(digest._state, joined, len(parts)) != 0:
                raise ValueError("too many block hashes")
        digest.update(tail)
        return digest


class FileProbe(ProbeBase):
    """Keeps the file open between checks; follows the path to a new file by itself."""

    __slots__ = (
        "_before",
        "_before_view",
        "_change",
        "_cpath",
        "_err",
        "_last",
        "_out",
        "_probe",
        "_same",
        "_view",
    )

    def __init__(self, path: PathArg, *, window: int = DEFAULT_WINDOW) -> None:
        self._init_base(path, check_window(window))
        self._cpath = _cpath(path)
        probe = _new("sf_probe *")
        lib.sf_probe_init(probe)
        self._probe = probe
        # Reused per call: allocating them is a measurable part of an unchanged poll.
        self._out = _new("sf_fp *")
        self._view = _buffer(self._out)
        self._err = _new("sf_err *")
        self._same = _new("int32_t *")
        self._change = _new("sf_change *")
        self._before = _new("sf_fp *")
        self._before_view = _buffer(self._before)
        self._last: Fingerprint | None = None  # the Python twin of probe.last, when built

    @property
    def _racy_ns(self) -> int:
        return int(self._probe.racy_ns)

    @_racy_ns.setter
    def _racy_ns(self, value: int) -> None:
        self._probe.racy_ns = value

    def _do_fingerprint(self) -> Fingerprint:
        if self._closed:
            self._ensure_open()
        if lib.sf_probe_fingerprint(
            self._probe, self._cpath, self._window, self._out, self._same, self._err
        ):
            _raise(self._err, self._path)
        last = self._last
        if self._same[0] and last is not None:
            return last  # immutable: hand back the object callers already hold
        fp = _fp_from_view(self._view)
        self._last = fp
        return fp

    def _do_mark(self, fp: Fingerprint | None) -> None:
        if self._closed:
            self._ensure_open()
        if fp is None:
            if lib.sf_probe_fingerprint(
                self._probe, self._cpath, self._window, self._out, self._same, self._err
            ):
                _raise(self._err, self._path)
            if not self._same[0]:
                self._last = None  # built on demand (baseline, fingerprint())
            return
        _pack_before(self._before_view, fp)
        lib.sf_probe_adopt(self._probe, self._before)
        self._last = fp

    def _do_poll(self, max_suffix: int) -> tuple[ChangeKind, bytes | None]:
        if self._closed:
            self._ensure_open()
        if type(max_suffix) is not int or max_suffix < 0:
            max_suffix = check_max_suffix(max_suffix)
        out = self._change
        if lib.sf_probe_poll(self._probe, self._cpath, self._window, max_suffix, out, self._err):
            if self._err.code == lib.SF_EVALUE and not self._probe.has_last:
                raise ValueError(_NO_BASELINE)
            _raise(self._err, self._path)
        kind = out.kind
        self._last = None  # probe.last moved (maybe to an equal state): built on demand
        if not out.has_suffix:
            return _KINDS[kind], None
        try:
            return _KINDS[kind], _buffer(out.suffix, out.suffix_len)[:]
        finally:
            lib.sf_free(out.suffix)

    def _do_baseline(self) -> Fingerprint | None:
        if self._closed or not self._probe.has_last:
            return None
        last = self._last
        if last is None:
            last = self._last = _fp_from_view(_buffer(ffi.addressof(self._probe, "last")))
        return last

    def _do_check_append(self, before: Fingerprint, window: int | None, max_suffix: int) -> Change:
        self._ensure_open()
        w = self._window if window is None else window
        return _check_append(self._probe, self._path, self._cpath, before, w, max_suffix)

    def _do_read_range(self, offset: int, length: int) -> bytes:
        self._ensure_open()
        return _read_range(self._probe, self._path, self._cpath, offset, length)

    def _do_close(self) -> None:
        if not self._closed:
            lib.sf_probe_close(self._probe)
            self._closed = True
            self._last = None

    def __del__(self) -> None:
        probe = getattr(self, "_probe", None)
        if probe is not None and not getattr(self, "_closed", True):
            lib.sf_probe_close(probe)


class ManyProbe(ManyProbeBase):
    """Watches many files; ``poll()`` gives the indices of those that changed since the
    previous poll (see ``ManyProbeBase``). The fingerprints live in C: a poll builds no
    Python object for a file that did not change."""

    __slots__ = ("_changed", "_cpaths", "_err", "_last", "_next", "_out", "_racy_ns", "_read_at")

    def __init__(self, paths: Iterable[PathArg], *, window: int = DEFAULT_WINDOW) -> None:
        items = tuple(paths)
        self._init_base(items, check_window(window))
        n = max(len(items), 1)
        self._cpaths = _joined_paths(list(items)) if items else b"\0"
        self._last = _new("sf_fp[]", n)  # zeroed: MISSING before the first poll
        self._next = _new("sf_fp[]", n)
        self._changed = _new("int64_t[]", n)
        self._out = _new("int64_t[2]")  # changed count, read time of this poll
        self._err = _new("sf_err *")
        self._read_at = -(1 << 63)  # INT64_MIN: no previous poll
        self._racy_ns = RACY_NS
        self._do_poll()

    def _do_poll(self) -> list[int]:
        out = self._out
        if lib.sf_many_poll(
            self._cpaths,
            len(self._paths),
            self._window,
            self._racy_ns,
            self._read_at,
            self._last,
            self._next,
            self._changed,
            out,
            out + 1,
            self._err,
        ):
            _raise(self._err, self._paths[self._err.where])
        self._read_at = out[1]
        count = out[0]
        return ffi.unpack(self._changed, count) if count else []

    def _do_fingerprint(self, index: int) -> Fingerprint:
        return _fp_from_view(_buffer(self._last + index))
