"""Value types and argument checks shared by both backends (docs/design.md, "The hot path")."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

__all__ = [
    "DEFAULT_MAX_SUFFIX",
    "DEFAULT_WINDOW",
    "FINGERPRINT_SETTERS",
    "MISSING",
    "RACY_NS",
    "SPIN_TRIES",
    "STABLE_TRIES",
    "WINDOW_MAX",
    "Change",
    "ChangeKind",
    "Fingerprint",
    "PathArg",
    "backoff_seconds",
    "check_before",
    "check_max_suffix",
    "check_window",
    "existing_fingerprint",
    "racy_clean",
    "same_stat",
    "slot_setters",
]

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

WINDOW_MAX = 1 << 20
DEFAULT_WINDOW = 4096
DEFAULT_MAX_SUFFIX = 1 << 20
STABLE_TRIES = 64
RACY_NS = 2_000_000_000  # FileProbe's racy-clean margin: one timestamp granule of any FS
SPIN_TRIES = 8  # later stable-read retries back off: 1 us doubling to 1 ms (~50 ms in all)


def backoff_seconds(tries: int) -> float:
    """Pause before stable-read retry ``tries`` (the C backend uses the same schedule)."""
    if tries < SPIN_TRIES:
        return 0.0
    return 1e-3 if tries - SPIN_TRIES >= 10 else (1 << (tries - SPIN_TRIES)) * 1e-6


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Stat identity of a file plus an XXH3-64 hash of its last ``tail_len`` bytes."""

    exists: bool
    dev: int = 0
    ino: int = 0
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    tail_len: int = 0
    tail_hash: int = 0


MISSING = Fingerprint(exists=False)


def slot_setters(cls: type, names: tuple[str, ...]) -> tuple[Any, ...]:
    """The slot descriptors' setters of a slots dataclass. A frozen dataclass assigns each
    field through ``object.__setattr__``; calling the descriptors directly builds the same
    object in about half the time, and every hot-path call builds one."""
    return tuple(cls.__dict__[name].__set__ for name in names)


FINGERPRINT_SETTERS = slot_setters(
    Fingerprint,
    ("exists", "dev", "ino", "size", "mtime_ns", "ctime_ns", "tail_len", "tail_hash"),
)


def _fast_constructor() -> Callable[[int, int, int, int, int, int, int], Fingerprint]:
    """Builds existing-file fingerprints without the dataclass ``__init__``."""
    new = object.__new__
    (
        set_exists,
        set_dev,
        set_ino,
        set_size,
        set_mtime,
        set_ctime,
        set_tail_len,
        set_tail_hash,
    ) = FINGERPRINT_SETTERS

    def existing(
        dev: int,
        ino: int,
        size: int,
        mtime_ns: int,
        ctime_ns: int,
        tail_len: int,
        tail_hash: int,
    ) -> Fingerprint:
        fp = new(Fingerprint)
        set_exists(fp, True)
        set_dev(fp, dev)
        set_ino(fp, ino)
        set_size(fp, size)
        set_mtime(fp, mtime_ns)
        set_ctime(fp, ctime_ns)
        set_tail_len(fp, tail_len)
        set_tail_hash(fp, tail_hash)
        return fp

    return existing


existing_fingerprint = _fast_constructor()


def same_stat(a: Fingerprint, b: Fingerprint) -> bool:
    """Stat equality: existence and, for existing files, identity, size and both times.

    The tail hash is not compared (``Fingerprint.__eq__`` compares every field). This is the
    openclaw controller's fingerprint equality; the fence compares tail hashes as well."""
    if a.exists != b.exists:
        return False
    if not a.exists:
        return True
    return (
        a.dev == b.dev
        and a.ino == b.ino
        and a.size == b.size
        and a.mtime_ns == b.mtime_ns
        and a.ctime_ns == b.ctime_ns
    )


class ChangeKind(enum.Enum):
    UNCHANGED = "unchanged"
    APPENDED = "appended"
    TOUCHED = "touched"
    REWRITTEN = "rewritten"
    TRUNCATED = "truncated"
    REPLACED = "replaced"
    CREATED = "created"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class Change:
    """What happened to a file since ``before``: the answer of ``check_append``.

    ``kind`` classifies the change, ``before`` is the fingerprint it was checked against and
    ``after`` the file as checked (its tail hashed with the call's ``window``).

    ``appended`` holds the new bytes ``[before.size, after.size)`` for ``APPENDED`` (for
    ``CREATED``: the whole content, ``b""`` for an empty file), but only when that span is at
    most ``max_suffix`` bytes (default 1 MiB, ``DEFAULT_MAX_SUFFIX``). Above that it is
    ``None`` although ``kind`` is ``APPENDED`` (or ``CREATED``): the check still proved the
    old tail window, it just did not read the suffix. Pass a larger ``max_suffix``, or read
    the span yourself with ``read_range(path, before.size, after.size - before.size)``.
    For every other kind it is ``None``.
    """

    kind: ChangeKind
    before: Fingerprint
    after: Fingerprint
    appended: bytes | None = None


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def racy_clean(
    last: Fingerprint | None,
    st_fields: tuple[int, int, int, int, int],
    window: int,
    read_at_ns: int,
    racy_ns: int,
) -> bool:
    """Git's racy-clean rule (see sf_probe_fingerprint): may ``last`` stand for the file
    whose stat is ``st_fields`` = (dev, ino, size, mtime_ns, ctime_ns) without a re-read?"""
    if last is None or not last.exists or racy_ns < 0:
        return False
    horizon = read_at_ns - racy_ns
    return (
        (last.dev, last.ino, last.size, last.mtime_ns, last.ctime_ns) == st_fields
        and last.tail_len == min(st_fields[2], window)
        and last.mtime_ns < horizon
        and last.ctime_ns < horizon
    )


def check_window(window: object) -> int:
    w = _check_int("window", window)
    if not 0 <= w <= WINDOW_MAX:
        raise ValueError(f"window must be between 0 and {WINDOW_MAX} bytes, got {w}")
    return w


def check_max_suffix(max_suffix: object) -> int:
    m = _check_int("max_suffix", max_suffix)
    if m < 0:
        raise ValueError(f"max_suffix must be >= 0, got {m}")
    return m


def check_before(before: object) -> Fingerprint:
    if not isinstance(before, Fingerprint):
        raise TypeError(f"before must be a Fingerprint, not {type(before).__name__}")
    if before.exists:
        for name in ("dev", "ino", "size", "mtime_ns", "ctime_ns", "tail_len", "tail_hash"):
            _check_int(f"before.{name}", getattr(before, name))
        if before.size < 0:
            raise ValueError(f"before.size must be >= 0, got {before.size}")
        if not 0 <= before.tail_len <= min(before.size, WINDOW_MAX):
            raise ValueError(
                f"before.tail_len must be between 0 and min(size, {WINDOW_MAX}), "
                f"got {before.tail_len} for size {before.size}"
            )
        if not 0 <= before.tail_hash < 1 << 64:
            raise ValueError("before.tail_hash must be an unsigned 64-bit value")
        if not (0 <= before.dev < 1 << 64 and 0 <= before.ino < 1 << 64):
            raise ValueError("before.dev and before.ino must be unsigned 64-bit values")
    return before


def check_range(offset: object, length: object) -> tuple[int, int]:
    off = _check_int("offset", offset)
    ln = _check_int("length", length)
    if off < 0:
        raise ValueError(f"offset must be >= 0, got {off}")
    if ln < 0:
        raise ValueError(f"length must be >= 0, got {ln}")
    return off, ln


def past_end(path: object, offset: int, length: int, size: int) -> ValueError:
    return ValueError(
        f"range [{offset}, {offset + length}) passes the end of the file "
        f"({size} bytes): {os.fsdecode(path) if isinstance(path, bytes) else path}"
    )


def shorter_than(path: object, size: int, actual: int) -> ValueError:
    return ValueError(
        f"file has {actual} bytes, fewer than the {size} asked for: "
        f"{os.fsdecode(path) if isinstance(path, bytes) else path}"
    )
