"""The session write lock (SPEC §3): one lock per transcript, shared by every process on a host.

The lock is an OS lock on a sidecar ``<key>.lock`` file that is never unlinked, so a holder
that crashes leaves nothing behind: the kernel drops the lock with the process, and the
next acquirer gets it on its next poll. The JSON owner record written into the file after
locking says who holds it (for diagnostics and stale reports) and carries a generation
that never decreases, which the fence uses as an epoch.

What the lock cannot do: stop a holder that is paused past its max hold from writing once
it resumes (its own watchdog releases the lock, but a paused process cannot be fenced by
a plain file), exclude processes that ignore the protocol, or exclude across NFS clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Union

from . import _lock_os as _os
from . import _lock_record as _rec
from ._lock_watchdog import Watchdog
from .errors import SessionWriteLockStaleError, SessionWriteLockTimeoutError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "POLL_INTERVAL",
    "LockInfo",
    "LockInheritedError",
    "SessionWriteLock",
    "acquire_session_write_lock",
    "acquire_session_write_lock_async",
    "clean_stale_locks",
    "inspect_lock",
    "list_locks",
    "lock_path_for",
]

PathLike = Union[str, "os.PathLike[str]"]

POLL_INTERVAL = 0.05
_ENV_TIMEOUT = "SESSIONFENCE_LOCK_TIMEOUT_MS"
_ENV_STALE = "SESSIONFENCE_LOCK_STALE_MS"
_ENV_MAX_HOLD = "SESSIONFENCE_LOCK_MAX_HOLD_MS"
# A path replaced under us is retried at once, but only this often per poll, so a
# pathological replacer cannot turn the wait into a busy loop.
_IMMEDIATE_RETRIES = 3

_log = logging.getLogger("sessionfence.lock")


class _Default(float):
    """A default argument value the resolver can tell apart from the same number passed
    explicitly: environment overrides replace defaults only, explicit arguments win."""

    __slots__ = ()


_DEFAULT_TIMEOUT = _Default(60.0)
_DEFAULT_STALE = _Default(1800.0)
_DEFAULT_MAX_HOLD = _Default(300.0)


class LockInheritedError(RuntimeError):
    """A lock handle was used in a process forked from its holder; the child holds nothing."""


@dataclass(frozen=True)
class LockInfo:
    """What ``inspect_lock`` sees: whether the OS lock is held, and the last owner record."""

    held: bool
    lock_path: str
    owner: dict[str, Any] | None
    age: float | None
    stale_reasons: list[str] = field(default_factory=list)


@dataclass(eq=False)
class _Entry:
    """One physical hold of the OS lock in this process (shared by reentrant handles)."""

    lock_path: str
    fd: int
    generation: int
    token: str
    acquired_at: float
    max_hold: float
    reentrant_owner: str | None
    state_offset: int
    pid: int
    refcount: int = 1
    closed: bool = False
    force_released: bool = False


# Guards _held, _claimed, every _Entry's refcount/closed and every handle's _released
# flag. Held only for short non-blocking work (a 4-byte pwrite, unlock, close).
_registry_lock = threading.Lock()
_held: dict[str, list[_Entry]] = {}
# Lock paths this process is trying to lock or holds. Same-process exclusion then does not
# depend on flock conflicting between two descriptors of one process (it does on local
# filesystems, but flock emulated with POSIX record locks, as on NFS, does not).
_claimed: set[str] = set()
# The highest generation this process has seen per lock path: a lock file deleted or
# overwritten with garbage must not make the next generation go backwards here.
_last_generation: dict[str, int] = {}


def _close_entry(entry: _Entry) -> None:
    """Mark the record free, unlock, close; caller holds ``_registry_lock``."""
    entry.closed = True
    # Still under the OS lock, so this write races with nobody. A later contender that
    # reads "free" knows the pid in the record no longer holds anything.
    with contextlib.suppress(OSError):
        _os.write_at(entry.fd, _rec.STATE_FREE, entry.state_offset)
    # A failed unlock is harmless: closing the last descriptor below releases it anyway.
    with contextlib.suppress(OSError):
        _os.unlock(entry.fd)
    _os.close_quietly(entry.fd)
    _claimed.discard(entry.lock_path)
    entries = _held.get(entry.lock_path)
    if entries is not None:
        if entry in entries:
            entries.remove(entry)
        if not entries:
            del _held[entry.lock_path]


def _watchdog_expire(entry: _Entry) -> None:
    with _registry_lock:
        if entry.closed or entry.pid != os.getpid():
            return
        held_for = time.monotonic() - entry.acquired_at
        entry.force_released = True
        _close_entry(entry)
    # Logged after the release (and outside the registry lock, so a handler that touches
    # locks cannot deadlock): whoever reacts to the warning finds the lock already free.
    _log.warning(
        "releasing session write lock held for %dms (max=%dms): %s",
        int(held_for * 1000),
        int(min(entry.max_hold, _rec.MAX_TIMER_SECONDS) * 1000),
        entry.lock_path,
    )


_watchdog: Watchdog[_Entry] = Watchdog(lambda e: e.closed, _watchdog_expire)


def _before_fork() -> None:
    _registry_lock.acquire()


def _after_fork_parent() -> None:
    _registry_lock.release()


def _after_fork_child() -> None:
    """The child holds nothing: close inherited descriptors without unlocking.

    ``flock`` belongs to the open file description shared with the parent; LOCK_UN here
    would release the parent's lock, while closing our copy leaves it alone.
    """
    global _registry_lock
    for entries in _held.values():
        for entry in entries:
            if not entry.closed:
                entry.closed = True
                _os.close_quietly(entry.fd)
    _held.clear()
    _claimed.clear()
    _registry_lock = threading.Lock()
    _watchdog.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_parent,
        after_in_child=_after_fork_child,
    )


class SessionWriteLock:
    """A hold of a transcript's write lock. ``release()`` is idempotent.

    Reentrant acquisitions (same non-empty ``reentrant_owner``) get their own handle on one
    shared hold; the OS lock goes with the last release.
    """

    __slots__ = ("_entry", "_path", "_released")

    def __init__(self, entry: _Entry, path: str) -> None:
        self._entry = entry
        self._path = path
        self._released = False

    @property
    def path(self) -> str:
        """The canonical transcript path the lock is keyed by."""
        return self._path

    @property
    def lock_path(self) -> str:
        return self._entry.lock_path

    @property
    def generation(self) -> int:
        """Strictly greater than every earlier holder's generation of this lock file."""
        return self._entry.generation

    @property
    def token(self) -> str:
        """The random token of the owner record this hold wrote."""
        return self._entry.token

    @property
    def acquired_at(self) -> float:
        """``time.monotonic()`` when the OS lock was taken (shared by reentrant handles)."""
        return self._entry.acquired_at

    @property
    def max_hold(self) -> float:
        return self._entry.max_hold

    @property
    def held(self) -> bool:
        """False once released, force-released by the watchdog, or inherited across fork."""
        entry = self._entry
        return not (self._released or entry.closed or entry.pid != os.getpid())

    @property
    def force_released(self) -> bool:
        """True when the max-hold watchdog took the lock away from this hold."""
        return self._entry.force_released

    def release(self) -> None:
        """Release this handle; a no-op when already released or force-released.

        Raises ``LockInheritedError`` in a forked child: the child never held the lock,
        and silently "releasing" would hide a bug that the parent's lock does not have.
        """
        entry = self._entry
        with _registry_lock:
            if self._released:
                return
            if entry.pid != os.getpid():
                raise LockInheritedError(
                    f"session write lock was inherited across fork; the child does not "
                    f"hold it: {entry.lock_path}"
                )
            self._released = True
            if entry.closed:
                return  # the watchdog already released it; never touch a newer holder
            entry.refcount -= 1
            if entry.refcount > 0:
                return
            _close_entry(entry)
        _watchdog.discard()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return (
            f"<SessionWriteLock {state} generation={self.generation} lock_path={self.lock_path!r}>"
        )


def lock_path_for(path: PathLike) -> tuple[str, str]:
    """``(key, lock_path)`` for a transcript path.

    The key is the real path of the transcript when it exists, else the real path of its
    folder plus its name, so a symlink to the file or to its folder shares one lock.
    """
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"path must be str or os.PathLike[str], not {type(text).__name__}")
    absolute = os.path.abspath(text)
    name = os.path.basename(absolute)
    if not name or text.endswith((os.sep, os.altsep or os.sep)):
        raise ValueError(f"not a transcript path: {text!r}")
    if os.path.exists(absolute):
        key = os.path.realpath(absolute)
    else:
        key = os.path.join(os.path.realpath(os.path.dirname(absolute)), name)
    return key, key + ".lock"


def _check_seconds(name: str, value: object, *, zero_ok: bool, inf_ok: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not zero_ok):
        raise ValueError(f"{name} must be {'>= 0' if zero_ok else '> 0'} seconds, got {value!r}")
    if math.isinf(seconds) and not inf_ok:
        raise ValueError(f"{name} must be finite, got {value!r}")
    return seconds


def _settings(
    timeout: float | None, stale: float | None, max_hold: float | None
) -> tuple[float, float, float]:
    """Resolve arguments, environment overrides (read now, at call time) and defaults.

    ``None`` means "not given" too, so wrappers can forward an unset option and still let
    the operator's environment override the default.
    """
    if timeout is None or timeout is _DEFAULT_TIMEOUT:
        timeout = _rec.env_seconds(_ENV_TIMEOUT) or float(_DEFAULT_TIMEOUT)
    if stale is None or stale is _DEFAULT_STALE:
        stale = _rec.env_seconds(_ENV_STALE) or float(_DEFAULT_STALE)
    if max_hold is None or max_hold is _DEFAULT_MAX_HOLD:
        max_hold = _rec.env_seconds(_ENV_MAX_HOLD) or float(_DEFAULT_MAX_HOLD)
    return (
        _check_seconds("timeout", timeout, zero_ok=True, inf_ok=True),
        _check_seconds("stale", stale, zero_ok=False, inf_ok=False),
        min(_check_seconds("max_hold", max_hold, zero_ok=False, inf_ok=True), 1e18),
    )


def _join_reentrant(lock_path: str, owner: str | None) -> _Entry | None:
    if not owner:
        return None
    with _registry_lock:
        for entry in _held.get(lock_path, ()):
            if not entry.closed and entry.reentrant_owner == owner:
                entry.refcount += 1
                return entry
    return None


@dataclass
class _Busy:
    record: _rec.OwnerRecord | None
    here: bool = False  # held (or being locked) by this process; record not read


_RETRY_NOW = object()


def _note_generation(lock_path: str, record: _rec.OwnerRecord | None) -> int:
    seen = max(_rec.record_generation(record), _last_generation.get(lock_path, 0))
    _last_generation[lock_path] = seen
    return seen


def _attempt(
    lock_path: str, max_hold: float, reentrant_owner: str | None
) -> _Entry | _Busy | object:
    """One non-blocking try: an ``_Entry`` on success, ``_Busy`` when held, else retry now."""
    with _registry_lock:
        if lock_path in _claimed:
            return _Busy(None, here=True)
        _claimed.add(lock_path)
    try:
        outcome = _attempt_os_lock(lock_path, max_hold, reentrant_owner)
    except BaseException:
        with _registry_lock:
            _claimed.discard(lock_path)
        raise
    if not isinstance(outcome, _Entry):
        with _registry_lock:
            _claimed.discard(lock_path)
    return outcome


def _peek_record(lock_path: str) -> _rec.OwnerRecord | None:
    """The current record, for diagnostics only; None if it cannot be read."""
    try:
        fd = _os.open_lock_file(lock_path, create=False, write=False)
    except OSError:
        return None
    try:
        size = _os.fstat_regular(fd, lock_path).st_size
        return _rec.parse_record(_os.read_at(fd, size) if size <= _os.MAX_RECORD_BYTES else b"")
    except OSError:
        return None
    finally:
        _os.close_quietly(fd)


def _attempt_os_lock(
    lock_path: str, max_hold: float, reentrant_owner: str | None
) -> _Entry | _Busy | object:
    try:
        fd = _os.open_lock_file(lock_path)
    except FileNotFoundError:
        # The transcript's folder does not exist yet; its writer is about to create it.
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)
        fd = _os.open_lock_file(lock_path)
    try:
        if not _os.try_lock(fd):
            size = _os.fstat_regular(fd, lock_path).st_size
            raw = _os.read_at(fd, size) if size <= _os.MAX_RECORD_BYTES else b""
            record = _rec.parse_record(raw)
            _note_generation(lock_path, record)
            _os.close_quietly(fd)
            return _Busy(record)
        st = _os.still_names(fd, lock_path)
        if st is None:
            # We locked an inode that was unlinked or replaced while we waited; whoever
            # locks the file the path names now would hold the "same" lock. Start over.
            _os.close_quietly(fd)
            return _RETRY_NOW
        # Only the winner rewrites the file: a contender truncating it would wipe the
        # holder's record.
        raw = _os.read_at(fd, st.st_size) if st.st_size <= _os.MAX_RECORD_BYTES else b""
        generation = _note_generation(lock_path, _rec.parse_record(raw)) + 1
        acquired_at = time.monotonic()
        data, state_offset, token = _rec.encode_record(
            generation=generation, max_hold=max_hold, monotonic=acquired_at, wall=time.time()
        )
        _os.write_at(fd, data, 0)
        if st.st_size > len(data):
            os.ftruncate(fd, len(data))
        _last_generation[lock_path] = generation
        entry = _Entry(
            lock_path=lock_path,
            fd=fd,
            generation=generation,
            token=token,
            acquired_at=acquired_at,
            max_hold=max_hold,
            reentrant_owner=reentrant_owner or None,
            state_offset=state_offset,
            pid=os.getpid(),
        )
    except BaseException:
        _os.close_quietly(fd)
        raise
    with _registry_lock:
        _held.setdefault(lock_path, []).append(entry)
    _watchdog.add(acquired_at + min(max_hold, _rec.MAX_TIMER_SECONDS), entry)
    return entry


def _acquisition(
    path: PathLike,
    timeout: float | None,
    stale: float | None,
    max_hold: float | None,
    reentrant_owner: str | None,
) -> Generator[float, None, SessionWriteLock]:
    """The acquisition loop shared by the sync and async entry points.

    Yields the number of seconds to wait before the next attempt; the caller sleeps
    (``time.sleep`` or ``asyncio.sleep``) and resumes it. One monotonic deadline covers
    every retry, so retries never extend the budget, and wall-clock steps change nothing.
    """
    if reentrant_owner is not None and not isinstance(reentrant_owner, str):
        raise TypeError("reentrant_owner must be a str or None")
    budget, stale_after, hold_limit = _settings(timeout, stale, max_hold)
    deadline = time.monotonic() + budget
    key, lock_path = lock_path_for(path)
    last: _rec.OwnerRecord | None = None
    last_here = False
    while True:
        joined = _join_reentrant(lock_path, reentrant_owner)
        if joined is not None:
            return SessionWriteLock(joined, key)
        for _ in range(_IMMEDIATE_RETRIES):
            outcome = _attempt(lock_path, hold_limit, reentrant_owner)
            if outcome is not _RETRY_NOW:
                break
        if isinstance(outcome, _Entry):
            return SessionWriteLock(outcome, key)
        if isinstance(outcome, _Busy):
            # Held in this process: never stale, and the record is only read for a report.
            last, last_here = outcome.record, outcome.here
            reasons = [] if last_here else _rec.stale_reasons(last, stale_after)
            if reasons:
                raise SessionWriteLockStaleError(_rec.describe_owner(last), lock_path, reasons)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if last_here:
                last = _peek_record(lock_path)
            shown = math.inf if math.isinf(budget) else round(budget * 1000)
            raise SessionWriteLockTimeoutError(shown, _rec.describe_owner(last), lock_path)
        yield min(POLL_INTERVAL, remaining)


def acquire_session_write_lock(
    path: PathLike,
    *,
    timeout: float | None = _DEFAULT_TIMEOUT,
    stale: float | None = _DEFAULT_STALE,
    max_hold: float | None = _DEFAULT_MAX_HOLD,
    reentrant_owner: str | None = None,
) -> SessionWriteLock:
    """Take the write lock of the transcript at ``path``, polling every 50 ms.

    ``timeout`` (seconds) is one budget across all retries; ``0`` tries once and
    ``math.inf`` waits forever. A live holder in another process whose record is older than
    ``stale`` or past its own max hold is reported at once with
    ``SessionWriteLockStaleError`` (and left alone); otherwise contention ends in
    ``SessionWriteLockTimeoutError``. ``max_hold`` bounds this hold: the watchdog logs a
    warning and releases the lock after it. Defaults (also used for an argument passed as
    ``None``) may be overridden by the environment variables
    ``SESSIONFENCE_LOCK_TIMEOUT_MS``, ``_STALE_MS`` and ``_MAX_HOLD_MS``, read at each call.
    """
    steps = _acquisition(path, timeout, stale, max_hold, reentrant_owner)
    try:
        while True:
            time.sleep(next(steps))
    except StopIteration as done:
        lock: SessionWriteLock = done.value
        return lock


async def acquire_session_write_lock_async(
    path: PathLike,
    *,
    timeout: float | None = _DEFAULT_TIMEOUT,
    stale: float | None = _DEFAULT_STALE,
    max_hold: float | None = _DEFAULT_MAX_HOLD,
    reentrant_owner: str | None = None,
) -> SessionWriteLock:
    """``acquire_session_write_lock`` for asyncio; waiting never blocks the event loop.

    Each attempt is a handful of non-blocking syscalls (open, ``flock(LOCK_NB)``, a small
    read and write), run inline; the waits between attempts are ``asyncio.sleep``. An
    attempt is never interrupted half-way, so cancelling the task leaves nothing held.
    """
    steps = _acquisition(path, timeout, stale, max_hold, reentrant_owner)
    try:
        while True:
            await asyncio.sleep(next(steps))
    except StopIteration as done:
        lock: SessionWriteLock = done.value
        return lock


def _held_here(lock_path: str) -> _Entry | None:
    with _registry_lock:
        for entry in _held.get(lock_path, ()):
            if not entry.closed:
                return entry
    return None


def _inspect_lock_file(lock_path: str, stale: float) -> LockInfo:
    try:
        fd = _os.open_lock_file(lock_path, create=False, write=False)
    except FileNotFoundError:
        return LockInfo(held=False, lock_path=lock_path, owner=None, age=None)
    try:
        size = _os.fstat_regular(fd, lock_path).st_size
        raw = _os.read_at(fd, size) if size <= _os.MAX_RECORD_BYTES else b""
        # A shared probe conflicts only with an exclusive holder, so inspectors never
        # block each other, and closing the descriptor drops it at once.
        held = _held_here(lock_path) is not None or not _os.try_lock(fd, shared=True)
    finally:
        _os.close_quietly(fd)
    record = _rec.parse_record(raw)
    reasons = _rec.stale_reasons(record, stale) if held else []
    age = _rec.record_age(record) if record is not None else None
    return LockInfo(held=held, lock_path=lock_path, owner=record, age=age, stale_reasons=reasons)


def _stale_setting(stale: float | None) -> float:
    if stale is None:
        return _rec.env_seconds(_ENV_STALE) or float(_DEFAULT_STALE)
    return _check_seconds("stale", stale, zero_ok=False, inf_ok=False)


def inspect_lock(path: PathLike, *, stale: float | None = None) -> LockInfo:
    """The lock state of the transcript at ``path``; never creates or changes the lock file.

    ``stale_reasons`` is what a contender would report (empty unless the OS lock is held
    by a live process other than this one whose record is too old or past its max hold).
    """
    _, lock_path = lock_path_for(path)
    return _inspect_lock_file(lock_path, _stale_setting(stale))


def list_locks(directory: PathLike, *, stale: float | None = None) -> list[LockInfo]:
    """``LockInfo`` for every ``*.lock`` regular file directly in ``directory``, by name."""
    limit = _stale_setting(stale)
    infos = []
    with os.scandir(os.fspath(directory)) as it:
        names = sorted(e.path for e in it if e.name.endswith(".lock") and _is_regular(e))
    for lock_path in names:
        try:
            infos.append(_inspect_lock_file(lock_path, limit))
        except FileNotFoundError:
            continue
    return infos


def _is_regular(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


def _remove_if_free(lock_path: str) -> bool:
    """Unlink a lock file nobody holds, without ever unlinking a held one.

    We take the lock ourselves before unlinking, and only unlink the inode we locked.
    Anyone who opened the old inode meanwhile finds it unlinked after locking (nlink 0)
    and retries on a fresh file, so removal cannot split the lock in two.
    """
    try:
        fd = _os.open_lock_file(lock_path, create=False)
    except FileNotFoundError:
        return False
    try:
        _os.fstat_regular(fd, lock_path)
        if not _os.try_lock(fd):
            return False
        if _os.still_names(fd, lock_path) is None:
            return False
        if not _os.IS_WINDOWS:
            os.unlink(lock_path)
            return True
        # Windows cannot unlink an open file; after closing, a newcomer who opened it
        # keeps it open, which makes the unlink fail rather than split the lock.
        _os.unlock(fd)
    finally:
        _os.close_quietly(fd)
    try:
        os.unlink(lock_path)
    except (PermissionError, FileNotFoundError):
        return False
    return True


def clean_stale_locks(directory: PathLike) -> list[str]:
    """Remove the lock files in ``directory`` that no process holds; return their paths.

    Held lock files, symlinks and other non-regular files are left alone. Removing a free
    lock file also drops its generation counter; processes that saw it keep counting up.
    """
    removed = []
    for info in list_locks(directory):
        if info.held:
            continue
        try:
            if _remove_if_free(info.lock_path):
                removed.append(info.lock_path)
                _log.info("removed unheld session lock: %s", info.lock_path)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.EINVAL):
                raise
    return removed
