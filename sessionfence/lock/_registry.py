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
"""

from __future__ import annotations

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
    "claimed",
    "close_entry",
    "close_tracked",
    "fork_guard",
    "held",
    "held_here",
    "join_reentrant",
    "last_generation",
    "note_generation",
    "open_tracked",
    "register",
    "registry_lock",
    "unregistered",
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
    # reads "free" knows the pid in the record no longer holds anything.
    with contextlib.suppress(OSError):
        _os.write_at(entry.fd, _rec.STATE_FREE, entry.state_offset)
    # A failed unlock is harmless: closing the last descriptor below releases it anyway.
    with contextlib.suppress(OSError):
        _os.unlock(entry.fd)
    _os.close_quietly(entry.fd)
    claimed.discard(entry.lock_path)
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
    for fd in fds:
        _os.close_quietly(fd)
    unregistered.clear()
    held.clear()
    claimed.clear()
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
