"""What both backends' ``FileProbe`` share: accessors, the closed state, context manager."""

from __future__ import annotations

from typing import TypeVar

from ._types import PathArg

_P = TypeVar("_P", bound="ProbeBase")


class ProbeBase:
    __slots__ = ("_closed", "_path", "_window")

    _closed: bool
    _path: PathArg
    _window: int

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

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _P) -> _P:
        self._ensure_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<FileProbe {self._path!r} window={self._window} {state}>"
