"""Write scopes (``write_lock()`` / ``with_write_lock()``) and their state.

A physical scope holds the write lock (the retained one, borrowed, or a short one of its
own) after a fence check; nested calls reuse it through a per-controller context variable
whose value is shared by reference with every task started inside, so a detached
descendant sees the scope turn inactive (docs/design.md, "Write scopes"). ``WriteScope``
drives one use; the controller does the locking, checking and publishing behind
``ScopeHost``."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol

from .._callbacks import PublishedEntry, Resolver
from ..errors import SessionTakeoverError

__all__ = ["Scope", "ScopeHost", "ScopeState", "WriteScope", "drain", "settle", "track"]


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
    so a detached descendant sees it turn inactive (docs/design.md, "Write scopes")."""

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


class ScopeHost(Protocol):
    """What a ``WriteScope`` needs from its controller, and nothing more."""

    @property
    def scope_var(self) -> ContextVar[ScopeState | None]: ...

    def sticky_takeover(self) -> SessionTakeoverError | None:
        """A fresh copy of the recorded takeover, or None: no write runs after one."""

    def borrow(self) -> Any | None:
        """The retained lock, marked in use, when one is held and usable."""

    def end_borrow(self) -> None: ...

    def physical(self, borrowed: Any | None) -> AbstractAsyncContextManager[ScopeState]:
        """One physical hold: the borrowed lock or a short one, after a fence check."""

    def publication(
        self, parent: ScopeState, handle: WriteScope
    ) -> AbstractAsyncContextManager[None]:
        """A write whose result is recorded as owned."""

    def refreshing(self) -> AbstractAsyncContextManager[None]:
        """An ordinary write: the fence moves over what it appended."""


class WriteScope:
    """One use of the write lock (``write_lock()`` / ``with_write_lock()``).

    Set ``result`` inside the block to hand a value to ``resolve_published_entries``."""

    def __init__(
        self,
        host: ScopeHost,
        publish: bool,
        resolve: Resolver | None,
        resolve_after_failure: Resolver | None,
    ) -> None:
        self.result: Any = None
        self._host = host
        self._publish = publish
        self._resolve = resolve
        self._resolve_after_failure = resolve_after_failure
        self._prepared = False
        self._entered = False
        self._mode: Literal["physical", "late", "publication", "nested"] = "physical"
        self._inherited: ScopeState | None = None
        self._marker: asyncio.Future[None] | None = None
        self._marker_groups: tuple[set[asyncio.Future[None]], ...] = ()
        self._nested_publication = False
        self._borrowed: Any | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    def _prepare(self) -> None:
        """The eager part, run at call time: register with the enclosing scope, or mark
        use of the retained lock before anyone can drain it."""
        if self._prepared:
            return
        self._prepared = True
        host = self._host
        inherited = host.scope_var.get()
        self._inherited = inherited
        if inherited is not None and not (inherited.active and inherited.scope.active):
            self._mode = "late"
        elif inherited is not None:
            if self._publish:
                self._mode = "publication"
                if inherited.publishing and inherited.accepting_nested:
                    self._nested_publication = True
                    self._marker_groups = (inherited.pending_nested,)
            else:
                self._mode = "nested"
            self._marker = track(inherited.scope, *self._marker_groups)
        else:
            self._borrowed = host.borrow()

    def _abandon(self) -> None:
        """Undo the eager part when the block never ran (task cancelled before start)."""
        if self._marker is not None and self._inherited is not None:
            settle(self._marker, self._inherited.scope, *self._marker_groups)
        if self._borrowed is not None:
            self._borrowed = None
            self._host.end_borrow()

    async def __aenter__(self) -> WriteScope:
        self._prepare()
        self._entered = True
        host = self._host
        stack = contextlib.AsyncExitStack()
        self._stack = stack
        try:
            taken_over = host.sticky_takeover()
            if taken_over is not None:
                raise taken_over  # sticky: no write of any kind after one
            if self._mode == "nested":
                assert self._inherited is not None and self._marker is not None
                stack.callback(settle, self._marker, self._inherited.scope)
            elif self._mode == "publication":
                assert self._inherited is not None
                await stack.enter_async_context(host.publication(self._inherited, self))
            else:
                if self._mode == "late":
                    assert self._inherited is not None
                    await asyncio.shield(self._inherited.scope.completion)
                    token = host.scope_var.set(None)
                    stack.callback(host.scope_var.reset, token)
                    self._borrowed = host.borrow()
                borrowed, self._borrowed = self._borrowed, None
                state = await stack.enter_async_context(host.physical(borrowed))
                if self._publish:
                    await stack.enter_async_context(host.publication(state, self))
                else:
                    await stack.enter_async_context(host.refreshing())
        except BaseException as exc:
            self._abandon()
            if not await stack.__aexit__(type(exc), exc, exc.__traceback__):
                raise
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool:
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        return bool(await stack.__aexit__(t, e, tb))
