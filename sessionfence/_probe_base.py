"""What both backends' ``FileProbe`` share: accessors, the closed state, context manager."""

from __future__ import annotations

import threading
from typing import TypeVar

from ._types import DEFAULT_MAX_SUFFIX, Change, Fingerprint, PathArg

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
