"""Write scopes (reference §5.7): ``write_lock()`` / ``with_write_lock()``.

A physical scope holds the write lock (the retained one, borrowed, or a short one of its
own) after a fence check; nested calls reuse it through a per-controller context variable;
publications are serialized per controller and recorded as owned writes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

from .._merge import PublishedEntry
from .._types import ChangeKind
from ..errors import SessionTakeoverError
from ._fence import FenceChecks
from ._scope import (
    Scope,
    ScopeState,
    call_maybe_async,
    drain,
    release_lock,
    settle,
    track,
)
from ._state import Resolver

__all__ = ["WriteScope", "WriteScopes"]

T = TypeVar("T")


class WriteScope:
    """One use of the write lock (``write_lock()`` / ``with_write_lock()``).

    Set ``result`` inside the block to hand a value to ``resolve_published_entries``."""

    def __init__(
        self,
        ctl: WriteScopes,
        publish: bool,
        resolve: Resolver | None,
        resolve_after_failure: Resolver | None,
    ) -> None:
        self.result: Any = None
        self._ctl = ctl
        self._publish = publish
        self._resolve = resolve
        self._resolve_after_failure = resolve_after_failure
        self._prepared = False
        self._entered = False
        self._mode = "physical"
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
        ctl = self._ctl
        inherited = ctl._scope_var.get()
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
            self._borrowed = ctl._try_borrow()

    def _abandon(self) -> None:
        """Undo the eager part when the block never ran (task cancelled before start)."""
        if self._marker is not None and self._inherited is not None:
            settle(self._marker, self._inherited.scope, *self._marker_groups)
        if self._borrowed is not None:
            self._borrowed = None
            self._ctl._end_retained()

    async def __aenter__(self) -> WriteScope:
        self._prepare()
        self._entered = True
        ctl = self._ctl
        stack = contextlib.AsyncExitStack()
        self._stack = stack
        try:
            if ctl._takeover is not None:
                raise ctl._sticky_takeover()  # sticky: no write of any kind after one
            if self._mode == "nested":
                assert self._inherited is not None and self._marker is not None
                stack.callback(settle, self._marker, self._inherited.scope)
            elif self._mode == "publication":
                assert self._inherited is not None
                await stack.enter_async_context(ctl._publication(self._inherited, self))
            else:
                if self._mode == "late":
                    assert self._inherited is not None
                    await asyncio.shield(self._inherited.scope.completion)
                    token = ctl._scope_var.set(None)
                    stack.callback(ctl._scope_var.reset, token)
                    self._borrowed = ctl._try_borrow()
                borrowed, self._borrowed = self._borrowed, None
                state = await stack.enter_async_context(ctl._physical(borrowed))
                if self._publish:
                    await stack.enter_async_context(ctl._publication(state, self))
                else:
                    await stack.enter_async_context(ctl._refreshing())
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


class WriteScopes(FenceChecks):
    """The write-scope layer of the controller."""

    # write scopes ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _physical(self, borrowed: Any | None) -> AsyncIterator[ScopeState]:
        """One physical hold: the retained lock borrowed, or a short lock of its own."""
        if self._takeover is not None:
            if borrowed is not None:
                self._end_retained()
            raise self._sticky_takeover()
        lock = borrowed
        owned = False
        if lock is None:
            await self._wait_drain()
            lock = self._try_borrow()
            if lock is None:
                lock = await self._acquire("fence_check")
                owned = True
        state = ScopeState(Scope(asyncio.get_running_loop().create_future()))
        token = self._scope_var.set(state)
        error: BaseException | None = None
        try:
            try:
                self._raise_if_lock_lost(lock, "fence_check")
                # Under the retained lock a racy fence is proven by the next owned append's
                # prefix proof or the next reacquire: one digest per window, not per scope.
                await self._assert_fence("fence_check", prove_racy=owned)
                yield state
                if self._takeover is None:
                    self._raise_if_lock_lost(lock, "fence_check")
            except BaseException as exc:
                error = exc
            await drain(state.scope.pending)
            state.active = False
            state.scope.active = False
            try:
                if owned:
                    await release_lock(lock)
                else:
                    self._end_retained()
            finally:
                if not state.scope.completion.done():
                    state.scope.completion.set_result(None)
        finally:
            self._scope_var.reset(token)
        if self._takeover is not None:
            await self._drop_held_after_retained_idle()
        if self._release_deferred:
            self._release_deferred = False
            await self._release_held_lock_with_fence()
        if error is not None:
            raise error  # the callback's own error wins over a takeover
        if self._takeover is not None:
            raise self._sticky_takeover()

    @contextlib.asynccontextmanager
    async def _refreshing(self) -> AsyncIterator[None]:
        """An ordinary write: afterwards this controller's fence moves over what the block
        appended (even a line torn by a failed write), the old content proven a prefix; the
        registry records nothing. Any other change is judged at once like any fence check:
        a truncation or rewrite inside a scope is a takeover, never adopted."""
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            if self._takeover is None and self._fence_active:
                fence = self._fence
                change = self._io.observe_quiet(fence.fingerprint)
                if change.kind is ChangeKind.APPENDED and self._prove_prefix(fence, change):
                    self._fence = self._roll(fence, change, need_digest=True, proven=True)
                elif change.kind is not ChangeKind.UNCHANGED:
                    try:
                        await self._judge(change, "fence_check")
                    except SessionTakeoverError:
                        if not failed:  # the block's own error wins (it is recorded)
                            raise

    @contextlib.asynccontextmanager
    async def _publication(self, parent: ScopeState, handle: WriteScope) -> AsyncIterator[None]:
        """A write whose result is published as owned (reference §5.7 runPublication).

        A publication started inside another one that still accepts nested publications
        only adds its entries to the parent's; otherwise it is a top-level publication,
        serialized per controller. The marker was registered eagerly by ``_prepare`` when
        the call came from inside a scope, so the parent cannot finish without it."""
        if not (parent.active and parent.scope.active):
            raise RuntimeError("owned session publication requires an active session write lock")
        marker = handle._marker
        if handle._nested_publication:
            assert marker is not None
            ok = False
            try:
                yield
                ok = True
            finally:
                try:
                    entries = _resolve(handle, ok)
                    if entries is not None:
                        if parent.nested_entries is None:
                            parent.nested_entries = []
                        parent.nested_entries.extend(entries)
                finally:
                    settle(marker, parent.scope, parent.pending_nested)
            return
        if marker is None:
            marker = track(parent.scope)
        try:
            async with self._publication_queue:
                if self._takeover is not None:
                    raise self._sticky_takeover()  # queued publications never run after one
                before = self._capture_write_start()
                pub = ScopeState(parent.scope, publishing=True, accepting_nested=True)
                token = self._scope_var.set(pub)
                error: BaseException | None = None
                try:
                    try:
                        yield
                    except BaseException as exc:
                        error = exc
                    await drain(pub.pending_nested)
                    pub.accepting_nested = False
                    pub.active = False
                    # The merge runs in the (now inactive) publication context, so a write
                    # it starts is a late descendant: it waits for the scope, then locks.
                    try:
                        own = _resolve(handle, error is None)
                        if pub.nested_entries is None and own is None:
                            expected = None
                        else:
                            expected = list(pub.nested_entries or []) + list(own or [])
                        await self._publish_owned_fence(before, expected)
                    except BaseException as exc:
                        if error is None:
                            error = exc
                finally:
                    self._scope_var.reset(token)
                if error is not None:
                    raise error
        finally:
            settle(marker, parent.scope)

    def write_lock(
        self,
        *,
        publish_owned_write: bool = False,
        resolve_published_entries: Resolver | None = None,
        resolve_published_entries_after_failure: Resolver | None = None,
    ) -> WriteScope:
        """``async with ctl.write_lock(): ...`` — the block runs under the write lock (the
        retained one when held, else a short one), after a fence check."""
        return WriteScope(
            self,
            publish_owned_write,
            resolve_published_entries,
            resolve_published_entries_after_failure,
        )

    def with_write_lock(
        self,
        fn: Callable[[], Awaitable[T]] | Callable[[], T],
        *,
        publish_owned_write: bool = False,
        resolve_published_entries: Resolver | None = None,
        resolve_published_entries_after_failure: Resolver | None = None,
    ) -> asyncio.Task[T]:
        """Run ``fn`` (sync or async) under the write lock; await the returned task for its
        result. The task starts registered with any enclosing scope (see module doc)."""
        scope = self.write_lock(
            publish_owned_write=publish_owned_write,
            resolve_published_entries=resolve_published_entries,
            resolve_published_entries_after_failure=resolve_published_entries_after_failure,
        )
        scope._prepare()

        async def run() -> T:
            async with scope:
                value: T = await call_maybe_async(fn)
                scope.result = value
            return value

        def done(task: asyncio.Task[T]) -> None:
            self._tasks.discard(task)
            if not scope._entered:  # cancelled before it started: undo the eager part
                scope._abandon()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(done)
        return task


def _resolve(handle: WriteScope, ok: bool) -> list[PublishedEntry] | None:
    if ok:
        if handle._resolve is None:
            return None
        return handle._resolve(handle.result)
    if handle._resolve_after_failure is None:
        return None
    return handle._resolve_after_failure()
