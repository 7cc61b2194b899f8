"""Small asyncio pieces of the controller: write-scope state, wake-all signals, callables
that may be sync or async, and lock handles whose release may be either."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .._merge import PublishedEntry

__all__ = ["Scope", "ScopeState", "Signal", "call_maybe_async", "release_lock", "settle"]

T = TypeVar("T")


async def call_maybe_async(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; await its result when it is awaitable (sync or async callbacks)."""
    value = fn(*args, **kwargs)
    if inspect.isawaitable(value):
        return await value
    return value


async def release_lock(lock: Any) -> None:
    value = lock.release()
    if inspect.isawaitable(value):
        await value


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


@dataclass(eq=False)
class Scope:
    """One physical hold of the write lock. ``pending`` holds settle-only markers of the
    operations started inside it (nested writes, publications), awaited before release."""

    completion: asyncio.Future[None]
    active: bool = True
    pending: set[asyncio.Future[None]] = field(default_factory=set)


@dataclass(eq=False)
class ScopeState:
    """The context variable's value: shared by reference with every task started inside,
    so a detached descendant sees it turn inactive (reference §10.1)."""

    scope: Scope
    active: bool = True
    publishing: bool = False
    accepting_nested: bool = False
    pending_nested: set[asyncio.Future[None]] = field(default_factory=set)
    nested_entries: list[PublishedEntry] | None = None


def track(scope: Scope, *extra: set[asyncio.Future[None]]) -> asyncio.Future[None]:
    marker: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    scope.pending.add(marker)
    for group in extra:
        group.add(marker)
    return marker


def settle(marker: asyncio.Future[None], scope: Scope, *extra: set[asyncio.Future[None]]) -> None:
    if not marker.done():
        marker.set_result(None)
    scope.pending.discard(marker)
    for group in extra:
        group.discard(marker)


async def drain(markers: set[asyncio.Future[None]]) -> None:
    """Wait until the set is empty, including markers added while waiting. asyncio.wait,
    not gather: a cancelled waiter must not cancel the markers it waits on."""
    while markers:
        await asyncio.wait(list(markers))


Thunk = Callable[[], "Awaitable[T] | T"]
