"""What both backends' ``FileProbe`` and ``ManyProbe`` share: accessors, the closed state,
context manager, the locks."""

from __future__ import annotations

import threading
from typing import TypeVar

from ._types import DEFAULT_MAX_SUFFIX, Change, ChangeKind, Fingerprint, PathArg

_P = TypeVar("_P", bound="ProbeBase")


class ProbeBase:
    """Public methods take the probe's lock: the C calls run without the GIL, and one
    thread must not re-open the held file while another reads through it. Reentrant, so a
    finalizer that re-enters on the same thread cannot deadlock."""

    __slots__ = ("_closed", "_lock", "_path", "_window")

    _closed: bool
    _lock: threading.RLock
    _path: PathArg
    _window: int

    def _init_base(self, path: PathArg, window: int) -> None:
        self._path = path
        self._window = window
        self._closed = False
        self._lock = threading.RLock()

    def fingerprint(self) -> Fingerprint:
        with self._lock:
            return self._do_fingerprint()

    def check_append(
        self,
        before: Fingerprint,
        *,
        window: int | None = None,
        max_suffix: int = DEFAULT_MAX_SUFFIX,
    ) -> Change:
        with self._lock:
            return self._do_check_append(before, window, max_suffix)

    def read_range(self, offset: int, length: int) -> bytes:
        with self._lock:
            return self._do_read_range(offset, length)

    def mark(self, fp: Fingerprint | None = None) -> None:
        """Make the file's current state (or ``fp``, adopted without a read) the baseline
        of ``poll()``. Without ``fp`` this is ``fingerprint()`` minus building its result:
        every look the probe takes (``fingerprint()``, ``mark()``, ``poll()``) moves the
        baseline; ``check_append`` and ``read_range`` do not."""
        with self._lock:
            self._do_mark(fp)

    def poll(self, *, max_suffix: int = DEFAULT_MAX_SUFFIX) -> tuple[ChangeKind, bytes | None]:
        """What happened to the file since the baseline, as ``(kind, appended)``: the
        ``kind`` and ``appended`` of ``check_append(baseline)`` with the probe's window,
        without building the ``Change`` or its fingerprints. The file's state as checked
        becomes the new baseline, so each change is reported once. A file whose stat equals
        the baseline and was last written long enough before the baseline was read (the
        racy-clean rule of ``fingerprint()``) is UNCHANGED for the cost of one stat.
        ``ValueError`` before the first ``mark()``/``fingerprint()``."""
        with self._lock:
            return self._do_poll(max_suffix)

    @property
    def baseline(self) -> Fingerprint | None:
        """The fingerprint ``poll()`` compares against (None before the first look)."""
        with self._lock:
            return self._do_baseline()

    def close(self) -> None:
        with self._lock:
            self._do_close()

    def _do_fingerprint(self) -> Fingerprint:
        raise NotImplementedError

    def _do_check_append(self, before: Fingerprint, window: int | None, max_suffix: int) -> Change:
        raise NotImplementedError

    def _do_read_range(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def _do_close(self) -> None:
        raise NotImplementedError

    def _do_mark(self, fp: Fingerprint | None) -> None:
        raise NotImplementedError

    def _do_poll(self, max_suffix: int) -> tuple[ChangeKind, bytes | None]:
        raise NotImplementedError

    def _do_baseline(self) -> Fingerprint | None:
        raise NotImplementedError

    @property
    def path(self) -> PathArg:
        return self._path

    @property
    def window(self) -> int:
        return self._window

    @property
    def closed(self) -> bool:
        return self._closed

    def _ensure_open(self) -> None:
        if self._closed:
            raise ValueError("operation on a closed FileProbe")

    def __enter__(self: _P) -> _P:
        self._ensure_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<FileProbe {self._path!r} window={self._window} {state}>"


class ManyProbeBase:
    """What both backends' ``ManyProbe`` share: the paths, the lock, accessors.

    A ``ManyProbe`` watches many files (a gateway's thousands of transcripts) and answers
    one question cheaply: which of them changed since the previous ``poll()``? A file
    whose stat is unchanged and that was last written long enough before the previous poll
    read it (git's racy-clean rule, as ``FileProbe.fingerprint()``) costs one stat and no
    Python object; any other file is fingerprinted as ``fingerprint()`` does. No file is
    kept open between polls (thousands of descriptors would run into the process limit).
    """

    __slots__ = ("_lock", "_paths", "_window")

    _lock: threading.Lock
    _paths: tuple[PathArg, ...]
    _window: int

    def _init_base(self, paths: tuple[PathArg, ...], window: int) -> None:
        self._paths = paths
        self._window = window
        self._lock = threading.Lock()

    def poll(self) -> list[int]:
        """Indices (ascending) of the files whose fingerprint differs from the previous
        poll's (the first poll runs in the constructor). A file that is missing at both
        polls has not changed. An ``OSError`` other than a missing file (a directory, no
        permission) propagates with the path; then no baseline moves."""
        with self._lock:
            return self._do_poll()

    def __getitem__(self, index: int) -> Fingerprint:
        """The fingerprint of ``paths[index]`` as of the latest poll."""
        with self._lock:
            return self._do_fingerprint(range(len(self._paths))[index])

    def fingerprints(self) -> list[Fingerprint]:
        """Every file's fingerprint as of the latest poll, in the order of ``paths``."""
        with self._lock:
            return [self._do_fingerprint(i) for i in range(len(self._paths))]

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def paths(self) -> tuple[PathArg, ...]:
        return self._paths

    @property
    def window(self) -> int:
        return self._window

    def _do_poll(self) -> list[int]:
        raise NotImplementedError

    def _do_fingerprint(self, index: int) -> Fingerprint:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<ManyProbe of {len(self._paths)} files window={self._window}>"
