"""In-process state of the session write lock: who holds what, the watchdog, fork hygiene.

Every field of an ``Entry`` that can change (``refcount``, ``closed``) and the tables below
are guarded by ``registry_lock``, which is only held for short non-blocking work.

Fork hygiene: ``flock`` belongs to the open file description, which a forked child shares.
A child must therefore close every lock-file descriptor it inherits, including one another
thread has just opened and locked but not yet registered in ``held`` (an acquisition in
progress, an inspection's shared probe, a clean's exclusive lock): otherwise the child's
copy keeps the lock alive after the parent releases it without ``LOCK_UN`` (a close, or a
SIGKILL). Such descriptors are opened with ``open_tracked``, which records them in
``unregistered`` under ``fork_guard`` in the same step as the open, and they leave that set
only when closed (``close_tracked``) or moved into ``held`` (``register``). The at-fork
hooks take both locks, so a fork never sees a descriptor in neither place.

Waiting (``Waiter``, ``Ticket``): a contender that finds the lock held by another process
keeps the descriptor of its failed attempt and hands it to a waiter thread that blocks in
``flock(LOCK_EX)``; the kernel wakes that thread the moment the holder unlocks, closes or
dies. The waiter owns the lock path's claim (``claimed``) while it waits, so this process
never has two descriptors of one lock file trying at once, and every acquisition in this
process that wants the path waits on that one waiter. Waiting callers park a ``Ticket``
under the path; any change of the path's claim (a hold released, an attempt given up, the
waiter's ``flock`` returning) fires every ticket parked there, and the woken callers try
again: the first takes the waiter's locked descriptor. A waiter that nobody wants any more
(its callers timed out or were cancelled) stays blocked until the lock is free, then
unlocks and closes at once: at most one such thread per lock path, and it never keeps the
lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass

from . import _os
from . import _record as _rec
from ._watchdog import Watchdog

__all__ = [
    "Entry",
    "Ticket",
    "Waiter",
    "claimed",
    "close_entry",
    "close_tracked",
    "detach_waiter",
    "drop_claim",
    "epochs",
    "fork_guard",
    "held",
    "held_here",
    "interest",
    "join_reentrant",
    "last_generation",
    "no_blocking",
    "note_generation",
    "notify",
    "open_tracked",
    "park",
    "register",
    "registry_lock",
    "retire_waiter",
    "start_waiter",
    "unpark",
    "unregistered",
    "waiters",
    "watchdog",
]

_log = logging.getLogger("sessionfence.lock")


@dataclass(eq=False)
class Entry:
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


# Guards held, claimed, every Entry's refcount/closed and every handle's _released
# flag. Held only for short non-blocking work (a 4-byte pwrite, unlock, close).
registry_lock = threading.Lock()
held: dict[str, list[Entry]] = {}
# Lock paths this process is trying to lock or holds. Same-process exclusion then does not
# depend on flock conflicting between two descriptors of one process (it does on local
# filesystems, but flock emulated with POSIX record locks, as on NFS, does not).
claimed: set[str] = set()
# The highest generation this process has seen per lock path: a lock file deleted or
# overwritten with garbage must not make the next generation go backwards here.
last_generation: dict[str, int] = {}

# Lock-file descriptors that may carry an OS lock but are not (or not yet) in ``held``;
# guarded by ``fork_guard``. Lock order: ``registry_lock`` before ``fork_guard``; nothing
# takes ``registry_lock`` while holding ``fork_guard``.
fork_guard = threading.Lock()
unregistered: set[int] = set()


class Waiter:
    """A thread blocked in ``flock(LOCK_EX)`` on ``fd``, on behalf of this process's callers.

    ``attached``: it owns the claim of ``lock_path`` (and is ``waiters[lock_path]``); a
    waiter whose lock file was replaced under it is detached. ``returned``: its ``flock``
    returned (``error`` says how). ``released``: ``fd`` is no longer the waiter's (a caller
    took it, it was closed, or this is a forked child). The thread itself never touches
    ``fd``: it blocks on a private duplicate (see ``start_waiter``).
    All fields are guarded by ``registry_lock``.
    """

    __slots__ = ("attached", "error", "fd", "lock_path", "released", "returned")

    def __init__(self, lock_path: str, fd: int) -> None:
        self.lock_path = lock_path
        self.fd = fd
        self.attached = True
        self.returned = False
        self.released = False
        self.error: OSError | None = None


class Ticket:
    """One parked wait of one caller: fired (at most once) when the path's claim changes."""

    __slots__ = ("event", "future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        if loop is None:
            self.event: threading.Event | None = threading.Event()
            self.future: asyncio.Future[None] | None = None
        else:
            self.event = None
            self.future = loop.create_future()

    def fire(self) -> None:
        if self.event is not None:
            self.event.set()
            return
        assert self.loop is not None and self.future is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self.loop.call_soon_threadsafe(_resolve, self.future)

    def wait(self, timeout: float) -> None:
        """Sync callers: until fired or ``timeout`` seconds passed."""
        assert self.event is not None
        self.event.wait(timeout)

    async def wait_async(self, timeout: float) -> None:
        """Async callers: until fired or ``timeout`` seconds passed; never blocks the loop."""
        assert self.loop is not None and self.future is not None
        timer = self.loop.call_later(timeout, _resolve, self.future)
        try:
            await self.future
        finally:
            timer.cancel()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# The blocked waiter of a lock path, while it owns the path's claim.
waiters: dict[str, Waiter] = {}
# Tickets of callers waiting for a change of a lock path's claim.
parked: dict[str, list[Ticket]] = {}
# How many acquisitions in this process are waiting for each lock path: a waiter whose
# flock returns keeps the lock for them (one of them takes it) instead of dropping it.
interest: dict[str, int] = {}
# Per lock path, how many times ``notify`` ran: a caller that saw the path busy parks only
# if nothing changed since, so a release between its look and its parking is not missed.
epochs: dict[str, int] = {}
# Lock paths where a blocking flock failed (a filesystem without it): waiters poll there.
no_blocking: set[str] = set()


def notify(lock_path: str) -> None:
    """Fire every ticket parked on ``lock_path``; caller holds ``registry_lock``."""
    epochs[lock_path] = epochs.get(lock_path, 0) + 1
    tickets = parked.pop(lock_path, None)
    if tickets:
        for ticket in tickets:
            ticket.fire()


def park(lock_path: str, ticket: Ticket) -> None:
    """Park ``ticket`` until the next change of ``lock_path``'s claim; caller holds the lock."""
    parked.setdefault(lock_path, []).append(ticket)


def unpark(lock_path: str, ticket: Ticket) -> None:
    """Remove a ticket that timed out instead of firing; caller holds ``registry_lock``."""
    tickets = parked.get(lock_path)
    if tickets is not None:
        with contextlib.suppress(ValueError):
            tickets.remove(ticket)
        if not tickets:
            del parked[lock_path]


def drop_claim(lock_path: str) -> None:
    """Give up this process's claim on ``lock_path``; caller holds ``registry_lock``."""
    claimed.discard(lock_path)
    notify(lock_path)


def start_waiter(lock_path: str, fd: int) -> bool:
    """Hand ``fd`` (open, tracked, not locked, with the claim of ``lock_path``) to a new
    waiter thread; caller holds ``registry_lock``. False if no thread can be started (a
    thread limit, interpreter shutdown): ``fd`` and the claim are then still the caller's.

    The thread blocks on a duplicate of ``fd`` that only it uses and closes: the same open
    file description (``flock`` belongs to it, so a success through either descriptor
    locks both), but a descriptor number no caller can close or reuse under the thread.
    A caller may so take ``fd`` at any time, even before the thread reached ``flock``.
    """
    with fork_guard:
        own = os.dup(fd)
        unregistered.add(own)
    waiter = Waiter(lock_path, fd)
    thread = threading.Thread(
        target=_wait, args=(waiter, own), name="sessionfence-lock-waiter", daemon=True
    )
    waiters[lock_path] = waiter
    try:
        thread.start()
    except RuntimeError:
        del waiters[lock_path]
        close_tracked(own)
        return False
    return True


def _wait(waiter: Waiter, own: int) -> None:
    """The waiter thread: block until the lock is ours, then keep it for a caller that
    still wants it (they are woken and the first takes it), or undo it at once."""
    error: OSError | None = None
    try:
        _os.lock_blocking(own)
    except OSError as exc:
        error = exc
    # Our duplicate goes first: the lock stays with ``waiter.fd`` (the same open file
    # description) if a caller holds or will take it; if ``waiter.fd`` was closed
    # meanwhile, this is the last reference, and a lock got for nobody goes with it.
    close_tracked(own)
    with registry_lock:
        waiter.returned = True
        waiter.error = error
        if waiter.released:
            return  # a caller took the descriptor, or it was closed
        if error is not None and waiter.attached:
            no_blocking.add(waiter.lock_path)
        if waiter.attached and error is None and interest.get(waiter.lock_path, 0) > 0:
            notify(waiter.lock_path)
            return
        retire_waiter(waiter)


def retire_waiter(waiter: Waiter) -> None:
    """Undo a waiter whose ``flock`` has returned and that nobody took; caller holds
    ``registry_lock``. Unlocks (a success nobody wants is never kept), closes, and gives up
    the claim if the waiter still had it."""
    if waiter.released:
        return
    waiter.released = True
    if waiter.error is None:
        with contextlib.suppress(OSError):
            _os.unlock(waiter.fd)
    close_tracked(waiter.fd)
    if waiter.attached:
        waiter.attached = False
        if waiters.get(waiter.lock_path) is waiter:
            del waiters[waiter.lock_path]
        drop_claim(waiter.lock_path)


def detach_waiter(waiter: Waiter) -> None:
    """The waiter's lock file was replaced: close its descriptor and let the path go (a
    fresh attempt may lock the new file); the thread, still blocked on the orphan, only
    closes its duplicate when its ``flock`` returns. Caller holds ``registry_lock``."""
    if not waiter.attached:
        return
    if waiter.returned:
        retire_waiter(waiter)
        return
    waiter.attached = False
    waiter.released = True
    close_tracked(waiter.fd)
    if waiters.get(waiter.lock_path) is waiter:
        del waiters[waiter.lock_path]
    drop_claim(waiter.lock_path)


def open_tracked(
    lock_path: str, *, create: bool = True, write: bool = True, mode: int = _os.DEFAULT_MODE
) -> int:
    """``open_lock_file``, atomically with recording the descriptor for the fork hooks."""
    with fork_guard:
        fd = _os.open_lock_file(lock_path, create=create, write=write, mode=mode)
        unregistered.add(fd)
    return fd


def close_tracked(fd: int) -> None:
    """Close a descriptor from ``open_tracked`` that was never registered (or failed to be)."""
    with fork_guard:
        unregistered.discard(fd)
        _os.close_quietly(fd)


def register(entry: Entry) -> None:
    """Move a freshly locked descriptor from ``unregistered`` into ``held``, in one step."""
    with registry_lock, fork_guard:
        held.setdefault(entry.lock_path, []).append(entry)
        unregistered.discard(entry.fd)


def close_entry(entry: Entry) -> None:
    """Mark the record free, unlock, close; caller holds ``registry_lock``."""
    entry.closed = True
    # Still under the OS lock, so this write races with nobody. A later contender that
    # reads "free" knows the pid in the record no longer holds anything. (try/except, not
    # contextlib.suppress: this is on every release's path.)
    try:  # noqa: SIM105
        _os.write_at(entry.fd, _rec.STATE_FREE, entry.state_offset)
    except OSError:
        pass
    # A failed unlock is harmless: closing the last descriptor below releases it anyway.
    try:  # noqa: SIM105
        _os.unlock(entry.fd)
    except OSError:
        pass
    _os.close_quietly(entry.fd)
    drop_claim(entry.lock_path)
    entries = held.get(entry.lock_path)
    if entries is not None:
        if entry in entries:
            entries.remove(entry)
        if not entries:
            del held[entry.lock_path]


def _expire(entry: Entry) -> None:
    with registry_lock:
        if entry.closed or entry.pid != os.getpid():
            return
        held_for = time.monotonic() - entry.acquired_at
        entry.force_released = True
        close_entry(entry)
    # Logged after the release (and outside the registry lock, so a handler that touches
    # locks cannot deadlock): whoever reacts to the warning finds the lock already free.
    _log.warning(
        "releasing session write lock held for %dms (max=%dms): %s",
        int(held_for * 1000),
        int(min(entry.max_hold, _rec.MAX_TIMER_SECONDS) * 1000),
        entry.lock_path,
    )


watchdog: Watchdog[Entry] = Watchdog(lambda e: e.closed, _expire)


def _before_fork() -> None:
    registry_lock.acquire()
    fork_guard.acquire()


def _after_fork_parent() -> None:
    fork_guard.release()
    registry_lock.release()


def _after_fork_child() -> None:
    """The child holds nothing: close inherited descriptors without unlocking.

    ``flock`` belongs to the open file description shared with the parent; LOCK_UN here
    would release the parent's lock, while closing our copy leaves it alone. That covers
    the registered holds and every descriptor another thread had opened for locking but
    not registered yet. Both locks were taken before the fork by the forking thread, whose
    copy runs this, so no other thread of the parent can have left them locked.
    """
    fds = set(unregistered)
    for entries in held.values():
        for entry in entries:
            if not entry.closed:
                entry.closed = True
                fds.add(entry.fd)
    for waiter in waiters.values():
        waiter.released = True  # its descriptor is in ``unregistered``, closed below
    for fd in fds:
        _os.close_quietly(fd)
    unregistered.clear()
    held.clear()
    claimed.clear()
    waiters.clear()
    parked.clear()
    interest.clear()
    watchdog.reset()
    fork_guard.release()
    registry_lock.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_parent,
        after_in_child=_after_fork_child,
    )


def held_here(lock_path: str) -> Entry | None:
    with registry_lock:
        for entry in held.get(lock_path, ()):
            if not entry.closed:
                return entry
    return None


def join_reentrant(lock_path: str, owner: str | None) -> Entry | None:
    if not owner:
        return None
    with registry_lock:
        for entry in held.get(lock_path, ()):
            if not entry.closed and entry.reentrant_owner == owner:
                entry.refcount += 1
                return entry
    return None


def note_generation(lock_path: str, record: _rec.OwnerRecord | None) -> int:
    seen = max(_rec.record_generation(record), last_generation.get(lock_path, 0))
    last_generation[lock_path] = seen
    return seen
