"""The one backend seam: which hot-path implementation runs, and what one must provide.

- ``IMPLEMENTATIONS``: the one name -> module map (tests and benchmarks use it too).
- ``load(name=None)``: the module for ``name``, or for ``SESSIONFENCE_BACKEND`` (``auto`` =
  the C extension when importable, else pure Python; ``cffi`` fails loudly without it).
- ``active()``: the implementation the library uses now. Chosen once at import; ``use()``
  switches it for a test or a benchmark that compares backends side by side (objects
  created meanwhile keep the implementation they were created with).
- ``HotPath``: the surface both implementations provide, checked by mypy below.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol, cast

from ._types import Change, ChangeKind, Fingerprint, PathArg

__all__ = [
    "ENV",
    "IMPLEMENTATIONS",
    "VALID",
    "HotPath",
    "ManyProbe",
    "Probe",
    "active",
    "load",
    "requested",
    "use",
]

IMPLEMENTATIONS: dict[str, str] = {
    "cffi": "sessionfence._impl_cffi",
    "python": "sessionfence._impl_py",
}
VALID = ("auto", *IMPLEMENTATIONS)
ENV = "SESSIONFENCE_BACKEND"


class Probe(Protocol):
    """A ``FileProbe``: a file kept open between checks."""

    def fingerprint(self) -> Fingerprint: ...

    def check_append(
        self, before: Fingerprint, *, window: int | None = ..., max_suffix: int = ...
    ) -> Change: ...

    def read_range(self, offset: int, length: int) -> bytes: ...

    def mark(self, fp: Fingerprint | None = ...) -> None: ...

    def poll(self, *, max_suffix: int = ...) -> tuple[ChangeKind, bytes | None]: ...

    @property
    def baseline(self) -> Fingerprint | None: ...

    def close(self) -> None: ...

    @property
    def closed(self) -> bool: ...


class ManyProbe(Protocol):
    """A ``ManyProbe``: which of many files changed since the previous poll."""

    def poll(self) -> list[int]: ...

    def __getitem__(self, index: int) -> Fingerprint: ...

    def fingerprints(self) -> list[Fingerprint]: ...

    def __len__(self) -> int: ...

    @property
    def paths(self) -> tuple[PathArg, ...]: ...

    @property
    def window(self) -> int: ...


class Digest(Protocol):
    """A ``RollingDigest`` (plain XXH3-128) or a ``BlockDigest`` (the block-structured
    digest a fence keeps), rolled forward with appended bytes."""

    def update(self, data: bytes | bytearray | memoryview) -> None: ...

    def copy(self) -> Digest: ...

    def intdigest(self) -> int: ...


class DigestType(Protocol):
    """The ``RollingDigest`` class itself."""

    def __call__(self) -> Digest: ...

    def from_file(self, path: PathArg, size: int | None = ...) -> Digest: ...


class BlockDigestType(DigestType, Protocol):
    """The ``BlockDigest`` class itself."""

    BLOCK: int

    def from_blocks(
        self, hashes: Iterable[bytes], tail: bytes | bytearray | memoryview = ...
    ) -> Digest: ...


class HotPath(Protocol):
    """What a hot-path implementation module provides (both return identical values)."""

    NAME: str

    def fingerprint(self, path: PathArg, *, window: int = ...) -> Fingerprint: ...

    def fingerprint_many(
        self, paths: Iterable[PathArg], *, window: int = ...
    ) -> list[Fingerprint]: ...

    def check_append(
        self, path: PathArg, before: Fingerprint, *, window: int = ..., max_suffix: int = ...
    ) -> Change: ...

    def read_range(self, path: PathArg, offset: int, length: int) -> bytes: ...

    def content_digest(self, path: PathArg, size: int | None = ...) -> int: ...

    def utf8_invalid_at(self, data: bytes | bytearray | memoryview) -> int: ...

    def FileProbe(self, path: PathArg, *, window: int = ...) -> Probe: ...

    def ManyProbe(self, paths: Iterable[PathArg], *, window: int = ...) -> ManyProbe: ...

    @property
    def RollingDigest(self) -> DigestType: ...

    @property
    def BlockDigest(self) -> BlockDigestType: ...

    def block_digest(self, path: PathArg, size: int | None = ...) -> int: ...


if TYPE_CHECKING:  # both implementations satisfy the Protocol (mypy checks these lines)
    from . import _impl_cffi, _impl_py

    _python: HotPath = _impl_py
    _cffi: HotPath = _impl_cffi


def requested() -> str:
    # strip(): Windows `set VAR=value && ...` leaves a trailing space (python-zstandard).
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in VALID:
        raise ImportError(
            f"unknown {ENV}={os.environ.get(ENV)!r}; use one of: {', '.join(VALID)} "
            "(auto = C extension when importable, else pure Python)"
        )
    return value


def load(name: str | None = None) -> HotPath:
    """The implementation called ``name`` ("cffi" or "python"); by default the one
    ``SESSIONFENCE_BACKEND`` asks for."""
    if name is not None:
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"unknown backend {name!r}; use one of: {', '.join(IMPLEMENTATIONS)}")
        return cast(HotPath, importlib.import_module(IMPLEMENTATIONS[name]))
    choice = requested()
    if choice == "python":
        return load("python")
    try:
        return load("cffi")
    except ImportError as exc:
        if choice == "cffi":
            raise ImportError(
                f"{ENV}=cffi but the C extension sessionfence._ffi cannot be imported ({exc}); "
                "reinstall sessionfence with a C compiler available, or set "
                f"{ENV}=python to use the pure-Python backend"
            ) from exc
        return load("python")


_active: HotPath | None = None


def active() -> HotPath:
    """The implementation the library uses (chosen on first use, or set by ``use()``)."""
    global _active
    if _active is None:
        _active = load()
    return _active


@contextlib.contextmanager
def use(impl: str | HotPath) -> Iterator[HotPath]:
    """Run a block with ``impl`` as the active implementation (tests, benchmarks). The
    package-level functions (``sessionfence.fingerprint`` ...) stay the import-time choice;
    what the library creates inside the block (controllers, managers) uses ``impl``."""
    global _active
    chosen = load(impl) if isinstance(impl, str) else impl
    previous = _active
    _active = chosen
    try:
        yield chosen
    finally:
        _active = previous
