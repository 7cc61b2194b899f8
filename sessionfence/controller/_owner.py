"""The in-process session file owner: one attempt per transcript per process.

Separate from the cross-process lock and held for a whole attempt, so two attempts in one
process cannot interleave their fences (docs/design.md, "In-process owner"). Symlinked paths
share an owner (same key as the registry).

Attempts may run on different event loops in different threads. The table is guarded by a
thread lock, and a waiter parked on another loop is woken through that loop's
``call_soon_threadsafe`` (an asyncio future may only be completed from its own loop's
thread; completing it from elsewhere does not wake the loop). A waiter whose loop is
closed can never run again and is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import threading
from dataclasses import dataclass, field
from types import TracebackType

from .._util import MAX_TIMER_MS as MAX_TIMER_MS
from .._util import session_key
from ..errors import SessionFileOwnerTimeoutError

__all__ = ["SessionFileOwner", "acquire_session_file_owner", "reset_owners"]


@dataclass
class _Entry:
    owner_id: str
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


_OWNERS: dict[str, _Entry] = {}
# Guards _OWNERS and every entry's waiters list; held only for dict and list operations.
# Reentrant: an abandoned acquire coroutine (its loop closed while it waited) is closed by
# the garbage collector, which runs its ``finally`` (take this lock, drop its waiter) on
# whatever thread allocates at that moment, possibly one inside this lock already. With a
# plain lock that thread would wait for itself forever.
_OWNERS_LOCK = threading.RLock()


def clamp_timeout_ms(timeout_ms: float) -> float | None:
    """Per-wait timer in ms: floor, clamped to [1, 2 147 000 000]; None for no timer."""
    if not math.isfinite(timeout_ms):
        return None
    return float(min(MAX_TIMER_MS, max(1, math.floor(timeout_ms))))


class SessionFileOwner:
    """Handle of an acquired owner; ``release()`` is idempotent and survives a reset."""

    def __init__(self, session_file_key: str, owner_id: str) -> None:
        self.session_file_key = session_file_key
        self._owner_id = owner_id

    def release(self) -> None:
        """Give the owner up and wake every waiter, whichever loop or thread it is on."""
        with _OWNERS_LOCK:
            entry = _OWNERS.get(self.session_file_key)
            if entry is None or entry.owner_id != self._owner_id:
                return
            del _OWNERS[self.session_file_key]
            waiters = list(entry.waiters)
        for waiter in waiters:  # all wake; the first to run takes the owner
            _complete(waiter, None)

    def __enter__(self) -> SessionFileOwner:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    async def __aenter__(self) -> SessionFileOwner:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


async def acquire_session_file_owner(
    path: str | os.PathLike[str], timeout: float | None = None
) -> SessionFileOwner:
    """Wait until no other attempt in this process owns ``path``; ``timeout`` in seconds
    applies to each wait (None or inf: wait forever)."""
    key = session_key(path)
    timeout_ms = math.inf if timeout is None else timeout * 1000.0
    delay_ms = clamp_timeout_ms(timeout_ms)
    loop = asyncio.get_running_loop()
    while True:
        waiter: asyncio.Future[None] = loop.create_future()
        with _OWNERS_LOCK:
            entry = _OWNERS.get(key)
            if entry is None:
                owner_id = secrets.token_hex(8)
                _OWNERS[key] = _Entry(owner_id)
                return SessionFileOwner(key, owner_id)
            entry.waiters.append(waiter)
        timer = None
        if delay_ms is not None:
            timer = loop.call_later(
                delay_ms / 1000.0,
                _expire,
                waiter,
                SessionFileOwnerTimeoutError(timeout_ms, os.fspath(path)),
            )
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            with _OWNERS_LOCK:
                if waiter in entry.waiters:
                    entry.waiters.remove(waiter)


def _expire(waiter: asyncio.Future[None], error: BaseException) -> None:
    if not waiter.done():
        waiter.set_exception(error)


def _settle(waiter: asyncio.Future[None], outcome: BaseException | None) -> None:
    """Complete ``waiter`` on its own loop's thread (a no-op if it is done already)."""
    if waiter.done():
        return
    if outcome is None:
        waiter.set_result(None)
    else:
        waiter.set_exception(outcome)


def _complete(waiter: asyncio.Future[None], outcome: BaseException | None) -> None:
    """Wake ``waiter`` from any thread: directly on its own running loop, else through
    ``call_soon_threadsafe``; a waiter whose loop is closed cannot run and is skipped."""
    loop = waiter.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        _settle(waiter, outcome)
        return
    # Closed between the check and the call: call_soon_threadsafe raises RuntimeError.
    with contextlib.suppress(RuntimeError):
        if not loop.is_closed():
            loop.call_soon_threadsafe(_settle, waiter, outcome)


def reset_owners() -> None:
    """Forget every owner; waiters fail with RuntimeError (test reset hook)."""
    with _OWNERS_LOCK:
        entries = list(_OWNERS.values())
        _OWNERS.clear()
        waiters = [waiter for entry in entries for waiter in entry.waiters]
    for waiter in waiters:
        # A waiter of a test whose event loop is already closed cannot be woken.
        _complete(waiter, RuntimeError("session file owners reset"))
