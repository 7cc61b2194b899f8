"""The controller's retained write lock, and the locks it hands to cleanup.

``HeldLock`` is the one place that knows who holds the retained lock and who borrows it:

- a write that uses the retained lock *borrows* it before it starts, so a release that
  begins meanwhile waits for the write to end instead of pulling the lock from under it;
- releasers (prompt release, abort, cleanup taking the lock, dispose) *drain* one at a
  time: each waits for the previous one to finish, then for the borrowers to end, then
  takes the lock; a second releaser then finds nothing held.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

from .._callbacks import call_maybe_async

__all__ = ["CleanupLock", "HeldLock", "NoopCleanupLock", "Signal", "release_lock"]


async def release_lock(lock: Any) -> None:
    """Release a lock whose ``release()`` may be sync or async."""
    await call_maybe_async(lock.release)


class Signal:
    """Wake-all notification: ``wait()`` resolves at the next ``fire()``."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def fire(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class HeldLock:
    """The retained lock, its borrowers and the single-owner drain (docs/design.md,
    "Retained lock and drains")."""

    def __init__(self, inside_active_scope: Callable[[], bool]) -> None:
        self.lock: Any | None = None
        self.draining = False
        self._borrowers = 0
        self._idle = Signal()
        self._drained = Signal()
        # From inside an active write scope, waiting for the borrowers would wait for itself.
        self._inside_active_scope = inside_active_scope

    @property
    def held(self) -> bool:
        return self.lock is not None

    def borrow(self, allowed: bool = True) -> Any | None:
        """The retained lock, marked in use before the write starts; None when nothing
        is held, a drain is under way, or ``allowed`` is false (after a takeover)."""
        if not allowed or self.draining or self.lock is None:
            return None
        self._borrowers += 1
        return self.lock

    def end_borrow(self) -> None:
        self._borrowers -= 1
        if self._borrowers == 0:
            self._idle.fire()

    async def wait_drain(self) -> None:
        while self.draining:
            await self._drained.wait()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[bool]:
        """One drain at a time. Yields True once no write borrows the lock, False at once
        from inside an active scope (the caller then defers or gives up)."""
        await self.wait_drain()
        self.draining = True
        try:
            yield await self._wait_idle()
        finally:
            self.draining = False
            self._drained.fire()

    async def _wait_idle(self) -> bool:
        if self._inside_active_scope():
            return False
        while self._borrowers > 0:
            await self._idle.wait()
        return True

    async def take(self) -> Any | None:
        """Take the held lock once no write borrows it (cleanup); None when nothing is
        held or when called from inside a scope."""
        if self.lock is None:
            return None
        async with self.exclusive() as idle:
            if not idle:
                return None
            lock, self.lock = self.lock, None
            return lock

    async def drop(self) -> None:
        """Release the held lock once no write borrows it (dispose, after a takeover)."""
        if self.lock is None:
            await self.wait_drain()
            return
        async with self.exclusive() as idle:
            if not idle:
                return
            lock, self.lock = self.lock, None
            if lock is not None:
                await release_lock(lock)


class NoopCleanupLock:
    """Cleanup lock after a takeover: nothing to release."""

    def release(self) -> None:
        return None

    async def arelease(self) -> None:
        return None


class CleanupLock:
    """The lock handed to cleanup; ``release()`` is synchronous and idempotent."""

    def __init__(self, lock: Any) -> None:
        self._lock: Any | None = lock

    def release(self) -> None:
        """Release the lock; when this returns, it is released. An injected lock whose
        ``release()`` is a coroutine is driven to completion here: on a fresh event loop
        when none runs in this thread, else on one in a helper thread (prefer ``await
        arelease()`` from async code, which awaits it on the running loop)."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        value = lock.release()
        if inspect.isawaitable(value):
            _finish_awaitable(value)

    async def arelease(self) -> None:
        """``release()`` for async code: an async ``release()`` is awaited here."""
        lock, self._lock = self._lock, None
        if lock is not None:
            await release_lock(lock)

    def __enter__(self) -> CleanupLock:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _finish_awaitable(value: Any) -> None:
    """Run an awaitable to completion from synchronous code, blocking until it is done."""

    async def wait() -> None:
        await value

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(wait())
        return
    # A loop runs in this thread and cannot be re-entered: finish on a loop of its own.
    failure: list[BaseException] = []

    def runner() -> None:
        try:
            asyncio.run(wait())
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=runner, name="sessionfence-cleanup-release")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
