"""The session write lock: one OS lock per transcript, shared by every process on a host.

Layout: ``_acquire`` (``SessionWriteLock`` and the blocking / async acquisition), ``_os``
(open, flock / LockFileEx, identity checks), ``_record`` (the owner record, stale reasons,
operator settings), ``_registry`` (this process's holds and fork hygiene), ``_watchdog``
(max hold), ``_inspect`` (``inspect_lock``, ``list_locks``, ``clean_stale_locks``).
"""

from __future__ import annotations

from .. import _LAZY as _ROOT_EXPORTS
from .._exports import present_as
from ._acquire import (
    POLL_INTERVAL,
    LockInfo,
    LockInheritedError,
    SessionWriteLock,
    acquire_session_write_lock,
    acquire_session_write_lock_async,
    clean_stale_locks,
    inspect_lock,
    list_locks,
    lock_path_for,
)

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

# Names the package root re-exports print as ``sessionfence.X``, the others as
# ``{__name__}.X`` (see sessionfence/_exports.py).
present_as("sessionfence", [globals()[name] for name in __all__ if name in _ROOT_EXPORTS])
present_as(__name__, [globals()[name] for name in __all__])
