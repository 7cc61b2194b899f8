"""The session write lock: one lock per transcript, shared by every process on a host.

The lock is an OS lock on a sidecar ``<key>.lock`` file that is never unlinked, so a holder
that crashes leaves nothing behind: the kernel drops the lock with the process, and a
contender blocked in the kernel for it (see ``_acquisition``) gets it at once. The JSON
owner record written into the file after
locking says who holds it (for diagnostics and stale reports) and carries a generation
that never decreases, which the fence uses as an epoch.

What the lock cannot do: stop a holder that is paused past its max hold from writing once
it resumes (its own watchdog releases the lock, but a paused process cannot be fenced by
a plain file), exclude processes that ignore the protocol, or exclude across NFS clients.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Union

from ..errors import (
    LockInheritedError,
    SessionWriteLockStaleError,
    SessionWriteLockTimeoutError,
)
from . import _os
from . import _record as _rec
from . import _registry as _reg
from ._inspect import LockInfo, clean_stale_locks, inspect_lock, list_locks
from ._os import lock_path_for
from ._record import DEFAULT_MAX_HOLD as _DEFAULT_MAX_HOLD
from ._record import DEFAULT_STALE as _DEFAULT_STALE
from ._record import DEFAULT_TIMEOUT as _DEFAULT_TIMEOUT
from ._record import resolve_settings as _settings
from ._registry import Entry as _Entry
from ._registry import claimed as _claimed
from ._registry import close_entry as _close_entry
from ._registry import close_tracked as _close_tracked
from ._registry import drop_claim as _drop_claim
from ._registry import epochs as _epochs
from ._registry import interest as _interest
from ._registry import join_reentrant as _join_reentrant
from ._registry import last_generation as _last_generation
from ._registry import note_generation as _note_generation
from ._registry import open_tracked as _open_tracked
from ._registry import register as _register
from ._registry import registry_lock as _registry_lock
from ._registry import waiters as _waiters
from ._registry import watchdog as _watchdog

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
# A path replaced under us is retried at once, but only this often per poll, so a
# pathological replacer cannot turn the wait into a busy loop.
_IMMEDIATE_RETRIES = 3


class SessionWriteLock:
    """A hold of a transcript's write lock. ``release()`` is idempotent.

    Reentrant acquisitions (same non-empty ``reentrant_owner``) get their own handle on one
    shared hold; the OS lock goes with the last release. A handle dropped without release
    keeps the lock until its max hold (the watchdog) or the end of the process: releasing
    from a finalizer would run at an arbitrary point, possibly in a forked child.
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

    def is_intact(self) -> bool:
        """Whether this hold is held and the lock path still names the locked inode.

        Removing or replacing a held lock file (an operator, a tmp cleaner) lets a newcomer
        lock a fresh file while this hold goes on: two holders. Nothing in the protocol can
        prevent that, so writers check this before writing and stop when it is False.
        """
        entry = self._entry
        with _registry_lock:
            if not self.held:
                return False
            try:
                return _os.still_names(entry.fd, entry.lock_path) is not None
            except OSError:
                return False

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
                raise LockInheritedError(entry.lock_path)
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


class _Busy:
    """The lock is held by someone else (``here``: by this process; record not read).

    ``fd``: the descriptor of the failed attempt, still open and with the lock path's
    claim, for the caller to hand to a waiter thread or give up (``_give_up``). ``epoch``:
    the lock path's notification count when the look was taken (see ``_registry.epochs``).
    """

    __slots__ = ("epoch", "fd", "here", "record")

    def __init__(
        self,
        record: _rec.OwnerRecord | None,
        *,
        here: bool = False,
        fd: int | None = None,
        epoch: int = -1,
    ) -> None:
        self.record = record
        self.here = here
        self.fd = fd
        self.epoch = epoch


_RETRY_NOW = object()


def _attempt(
    lock_path: str, max_hold: float, reentrant_owner: str | None, mode: int
) -> _Entry | _Busy | object:
    """One non-blocking try: an ``_Entry`` on success, ``_Busy`` when held, else retry now.

    When this process has a waiter blocked on the lock, the try is made on the waiter's
    descriptor (the one descriptor of that lock file this process may try with): the
    first caller to find it locked takes it over.
    """
    with _registry_lock:
        if lock_path in _claimed:
            waiter = _waiters.get(lock_path)
            if waiter is None:
                return _Busy(None, here=True, epoch=_epochs.get(lock_path, 0))
            taken = _take_from_waiter(waiter)
            if not isinstance(taken, int):
                return taken
            fd = taken
        else:
            _claimed.add(lock_path)
            fd = -1
    try:
        if fd < 0:
            return _attempt_os_lock(lock_path, max_hold, reentrant_owner, mode)
        return _locked(fd, lock_path, max_hold, reentrant_owner)
    except BaseException:
        with _registry_lock:
            _drop_claim(lock_path)
        raise


def _take_from_waiter(waiter: _reg.Waiter) -> int | _Busy | object:
    """The waiter's descriptor if the lock is ours through it (it is then the caller's,
    with the claim), else ``_Busy`` or ``_RETRY_NOW``; caller holds ``registry_lock``."""
    lock_path = waiter.lock_path
    if waiter.returned:
        if waiter.error is not None:
            _reg.retire_waiter(waiter)  # closes it and gives the path up: try afresh
            return _RETRY_NOW
    elif not _os.try_lock(waiter.fd):
        # Still held by someone else: read who, for the stale check and the error
        # message, through the waiter's descriptor; and make sure it is still the lock
        # file the path names, or the waiter could wait on an orphan forever.
        st = _os.still_names(waiter.fd, lock_path)
        if st is None:
            _reg.detach_waiter(waiter)
            return _RETRY_NOW
        raw = _os.read_at(waiter.fd, st.st_size) if st.st_size <= _os.MAX_RECORD_BYTES else b""
        record = _rec.parse_record(raw)
        _note_generation(lock_path, record)
        return _Busy(record, epoch=_epochs.get(lock_path, 0))
    # Locked through the waiter's descriptor (its flock returned, or ours just succeeded
    # on the same open file description): the caller owns it from here on.
    waiter.released = True
    waiter.attached = False
    del _waiters[lock_path]
    return waiter.fd


def _give_up(lock_path: str, fd: int | None) -> None:
    """Close a failed attempt's descriptor and release the path's claim."""
    if fd is None:
        return
    with _registry_lock:
        _close_tracked(fd)
        _drop_claim(lock_path)


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
    lock_path: str, max_hold: float, reentrant_owner: str | None, mode: int
) -> _Entry | _Busy | object:
    """Open and try the lock file; the caller holds the path's claim (and gives it up if
    this raises). On contention the descriptor is returned in ``_Busy`` with the claim."""
    # Opened through the registry so a fork from another thread, at any point from here
    # until the entry is registered, leaves the child without a copy of the descriptor.
    try:
        fd = _open_tracked(lock_path, mode=mode)
    except FileNotFoundError:
        # The transcript's folder does not exist yet; its writer is about to create it.
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)
        fd = _open_tracked(lock_path, mode=mode)
    except PermissionError:
        # Another user's process may have created the file an instant ago, with the mode
        # its umask left, and be about to fchmod it to the shared mode: poll again. Past
        # that instant a permission problem is reported at once, never as a timeout.
        if _os.recently_created_by_another_user(lock_path):
            with _registry_lock:
                _drop_claim(lock_path)
            return _Busy(None)
        raise
    try:
        if not _os.try_lock(fd):
            size = _os.fstat_regular(fd, lock_path).st_size
            raw = _os.read_at(fd, size) if size <= _os.MAX_RECORD_BYTES else b""
            record = _rec.parse_record(raw)
            _note_generation(lock_path, record)
            return _Busy(record, fd=fd)
    except BaseException:
        _close_tracked(fd)
        raise
    return _locked(fd, lock_path, max_hold, reentrant_owner)


# Per lock path, the record this process last wrote there, as release leaves it ("free"),
# and its generation: when the file still holds exactly that, the next acquisition here
# knows the previous generation without parsing JSON (the common case of one process
# taking the same lock again and again).
_last_written: dict[str, tuple[bytes, int]] = {}


def _locked(
    fd: int, lock_path: str, max_hold: float, reentrant_owner: str | None
) -> _Entry | object:
    """Finish an acquisition whose OS lock is held through ``fd`` (tracked, with the claim):
    check that the path still names it, write the owner record, register the hold. Closes
    ``fd`` and gives the claim up on ``_RETRY_NOW`` and on errors (then re-raised)."""
    try:
        st = _os.still_names(fd, lock_path)
        if st is None:
            # We locked an inode that was unlinked or replaced while we waited; whoever
            # locks the file the path names now would hold the "same" lock. Start over.
            with _registry_lock:
                _close_tracked(fd)
                _drop_claim(lock_path)
            return _RETRY_NOW
        # Only the winner rewrites the file: a contender truncating it would wipe the
        # holder's record.
        raw = _os.read_at(fd, st.st_size) if st.st_size <= _os.MAX_RECORD_BYTES else b""
        mine = _last_written.get(lock_path)
        if mine is not None and raw == mine[0]:
            previous = max(mine[1], _last_generation.get(lock_path, 0))
        else:
            previous = _note_generation(lock_path, _rec.parse_record(raw))
        generation = previous + 1
        acquired_at = time.monotonic()
        data, state_offset, token = _rec.encode_record(
            generation=generation, max_hold=max_hold, monotonic=acquired_at, wall=time.time()
        )
        _os.write_at(fd, data, 0)
        if st.st_size > len(data):
            os.ftruncate(fd, len(data))
        _last_generation[lock_path] = generation
        _last_written[lock_path] = (
            data[:state_offset] + _rec.STATE_FREE + data[state_offset + 4 :],
            generation,
        )
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
        _close_tracked(fd)
        raise
    _register(entry)
    _watchdog.add(acquired_at + min(max_hold, _rec.MAX_TIMER_SECONDS), entry)
    return entry


Wait = tuple[_reg.Ticket, float]


def _acquisition(
    path: PathLike,
    timeout: float | None,
    stale: float | None,
    max_hold: float | None,
    reentrant_owner: str | None,
    mode: int,
    loop: asyncio.AbstractEventLoop | None = None,
) -> Generator[Wait, None, SessionWriteLock]:
    """The acquisition loop shared by the sync and async entry points.

    Yields ``(ticket, seconds)``: the caller waits until the ticket fires or the seconds
    pass (``Ticket.wait`` or ``Ticket.wait_async``), then resumes it. A ticket fires when
    this process's claim on the lock path changes: the waiter thread got the lock (the
    hand-off from another process), or a hold or attempt in this process ended. The
    seconds are at most ``POLL_INTERVAL``, at which the holder's record is read again for
    the stale check. One monotonic deadline covers every retry, so retries never extend
    the budget, and wall-clock steps change nothing. Closing the generator (a cancelled
    task, an exception in the caller) withdraws this caller's interest; a waiter that
    nobody wants any more releases whatever it got.
    """
    if reentrant_owner is not None and not isinstance(reentrant_owner, str):
        raise TypeError("reentrant_owner must be a str or None")
    mode = _os.check_mode(mode)
    budget, stale_after, hold_limit = _settings(timeout, stale, max_hold)
    deadline = time.monotonic() + budget
    key, lock_path = lock_path_for(path)
    last: _rec.OwnerRecord | None = None
    last_here = False
    interested = False
    ticket: _reg.Ticket | None = None
    spare: int | None = None  # a failed attempt's descriptor, with the path's claim
    try:
        while True:
            joined = _join_reentrant(lock_path, reentrant_owner)
            if joined is not None:
                return SessionWriteLock(joined, key)
            for _ in range(_IMMEDIATE_RETRIES):
                outcome = _attempt(lock_path, hold_limit, reentrant_owner, mode)
                if outcome is not _RETRY_NOW:
                    break
            if isinstance(outcome, _Entry):
                return SessionWriteLock(outcome, key)
            epoch = -1
            if isinstance(outcome, _Busy):
                spare, epoch = outcome.fd, outcome.epoch
                # Held in this process: never stale, and the record is only read for a report.
                last, last_here = outcome.record, outcome.here
                reasons = [] if last_here else _rec.stale_reasons(last, stale_after)
                if reasons:
                    raise SessionWriteLockStaleError(_rec.describe_owner(last), lock_path, reasons)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _give_up(lock_path, spare)
                spare = None
                if last_here:
                    last = _peek_record(lock_path)
                shown = math.inf if math.isinf(budget) else round(budget * 1000)
                raise SessionWriteLockTimeoutError(shown, _rec.describe_owner(last), lock_path)
            ticket = _reg.Ticket(loop)
            with _registry_lock:
                if not interested:
                    _interest[lock_path] = _interest.get(lock_path, 0) + 1
                    interested = True
                if spare is not None:
                    # Contended by another process: a waiter thread blocks in flock on
                    # this descriptor, and wakes us the moment the lock is free.
                    if not (
                        _os.BLOCKING_WAIT
                        and lock_path not in _reg.no_blocking
                        and _reg.start_waiter(lock_path, spare)
                    ):
                        _close_tracked(spare)  # poll instead
                        _drop_claim(lock_path)
                    spare = None
                    _reg.park(lock_path, ticket)
                elif epoch < 0 or _epochs.get(lock_path, 0) == epoch:
                    _reg.park(lock_path, ticket)
                else:
                    ticket.fire()  # the path changed since we looked: look again now
            yield ticket, min(POLL_INTERVAL, remaining)
            with _registry_lock:
                _reg.unpark(lock_path, ticket)
            ticket = None
    finally:
        _give_up(lock_path, spare)
        if ticket is not None or interested:
            with _registry_lock:
                if ticket is not None:
                    _reg.unpark(lock_path, ticket)
                if interested:
                    _lose_interest(lock_path)


def _lose_interest(lock_path: str) -> None:
    """One waiting acquisition is done with ``lock_path``; caller holds ``registry_lock``.

    The last one out undoes a waiter that already got the lock for nobody."""
    left = _interest.get(lock_path, 1) - 1
    if left > 0:
        _interest[lock_path] = left
        return
    _interest.pop(lock_path, None)
    waiter = _waiters.get(lock_path)
    if waiter is not None and waiter.returned:
        _reg.retire_waiter(waiter)


def acquire_session_write_lock(
    path: PathLike,
    *,
    timeout: float | None = _DEFAULT_TIMEOUT,
    stale: float | None = _DEFAULT_STALE,
    max_hold: float | None = _DEFAULT_MAX_HOLD,
    reentrant_owner: str | None = None,
    mode: int = _os.DEFAULT_MODE,
) -> SessionWriteLock:
    """Take the write lock of the transcript at ``path``, waiting until it is free.

    While another process holds the lock, a waiter thread blocks in ``flock`` for it and
    the lock is this call's the moment the holder releases it or dies (no polling; on
    Windows, which has no such wait, every 50 ms). Every 50 ms meanwhile the holder's
    record is read again for the stale check. A hold in this process is waited for the
    same way, woken by its release.

    ``timeout`` (seconds) is one budget across all retries; ``0`` tries once and
    ``math.inf`` waits forever. A live holder in another process whose record is older than
    ``stale`` or past its own max hold is reported at once with
    ``SessionWriteLockStaleError`` (and left alone); otherwise contention ends in
    ``SessionWriteLockTimeoutError``.

    ``max_hold`` (default 300 s) bounds this hold: past it, a watchdog thread logs a
    warning (logger ``sessionfence.lock``) and releases the lock, so a stuck holder cannot
    block the session forever; this handle's ``held`` then turns False and its
    ``release()`` does nothing. Pass a larger ``max_hold`` (or ``math.inf``) for longer
    holds. Defaults (also used for an argument passed as ``None``) may be overridden by the
    environment variables ``SESSIONFENCE_LOCK_TIMEOUT_MS``, ``SESSIONFENCE_LOCK_STALE_MS``
    and ``SESSIONFENCE_LOCK_MAX_HOLD_MS`` (milliseconds), read at each call; explicit
    arguments win.

    ``mode`` (default ``0o600``) is the permission bits of the lock file ``<path>.lock``
    when this call creates it; use ``0o660`` when processes of several users in one group
    share the transcripts. The created file gets exactly ``mode``, whatever the umask
    (it is widened with ``fchmod``); an existing lock file keeps its mode. It must include
    ``0o600``. Not used on Windows.
    """
    steps = _acquisition(path, timeout, stale, max_hold, reentrant_owner, mode)
    try:
        while True:
            ticket, seconds = next(steps)
            ticket.wait(seconds)
    except StopIteration as done:
        lock: SessionWriteLock = done.value
        return lock
    finally:
        steps.close()


async def acquire_session_write_lock_async(
    path: PathLike,
    *,
    timeout: float | None = _DEFAULT_TIMEOUT,
    stale: float | None = _DEFAULT_STALE,
    max_hold: float | None = _DEFAULT_MAX_HOLD,
    reentrant_owner: str | None = None,
    mode: int = _os.DEFAULT_MODE,
) -> SessionWriteLock:
    """``acquire_session_write_lock`` for asyncio; waiting never blocks the event loop.

    Each attempt is a handful of non-blocking syscalls (open, ``flock(LOCK_NB)``, a small
    read and write), run inline; between attempts the task awaits a future that the
    waiter thread (blocked in ``flock`` for the lock) or a release in this process resolves,
    at most 50 ms. An attempt is never interrupted half-way, so cancelling the task leaves
    nothing held: a lock the waiter thread got for a cancelled task is released at once.
    """
    loop = asyncio.get_running_loop()
    steps = _acquisition(path, timeout, stale, max_hold, reentrant_owner, mode, loop)
    try:
        while True:
            ticket, seconds = next(steps)
            await ticket.wait_async(seconds)
    except StopIteration as done:
        lock: SessionWriteLock = done.value
        return lock
    finally:
        steps.close()
