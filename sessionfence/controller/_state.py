"""The controller's state and lock plumbing: the base layer of ``SessionFenceController``.

Holds every per-controller field of reference §5.1, records takeovers, and implements the
held-lock lifecycle helpers of §5.9: the single-owner drain, retained (borrowed) use of
the held lock, and taking or dropping the held lock once no write borrows it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Literal

from .._merge import MergeResult, PublishedEntry
from .._types import (
    MISSING,
    Change,
    ChangeKind,
    Fingerprint,
)
from ..errors import (
    SessionTakeoverError,
    SessionWriteLockAcquireError,
    SessionWriteLockStaleError,
)
from ._classify import (
    BenignPolicy,
)
from ._scope import (
    ScopeState,
    Signal,
    call_maybe_async,
    release_lock,
)
from ._snapshot import FenceSnapshot, SnapshotIO
from ._trust import REGISTRY, session_file_key

__all__ = ["ControllerState", "MergeCallback", "ReloadCallback", "Resolver", "Verify"]

Verify = Literal["tail", "full"]
MergeCallback = Callable[[list[Any]], "Awaitable[MergeResult | None] | MergeResult | None"]
ReloadCallback = Callable[[], "Awaitable[None] | None"]
Resolver = Callable[..., "list[PublishedEntry] | None"]

CREATE = object()  # only SessionFenceController.create builds controllers
_ids = itertools.count(1)

REASON_BY_KIND = {
    ChangeKind.REPLACED: "replaced",
    ChangeKind.TRUNCATED: "truncated",
    ChangeKind.REWRITTEN: "rewritten",
    ChangeKind.TOUCHED: "rewritten",
    ChangeKind.DELETED: "deleted",
    ChangeKind.CREATED: "created",
    ChangeKind.APPENDED: "foreign-append",
}


class ControllerState:
    """Fields and lock plumbing shared by the controller's layers."""

    def __init__(
        self,
        session_file: str | os.PathLike[str],
        *,
        timeout: float,
        stale: float,
        max_hold: float,
        acquire: Callable[..., Any],
        merge_foreign_entries: MergeCallback | None,
        reload_session_file: ReloadCallback | None,
        verify: Verify,
        window: int,
        benign_policy: BenignPolicy | None,
        _token: object = None,
    ) -> None:
        if _token is not CREATE:
            raise TypeError("use 'await SessionFenceController.create(...)'")
        self._session_file = os.fspath(session_file)
        self._lock_options = {"timeout": timeout, "stale": stale, "max_hold": max_hold}
        self._acquire_fn = acquire
        self._merge_cb = merge_foreign_entries
        self._reload_cb = reload_session_file
        self._full = verify == "full"
        self._policy = benign_policy if benign_policy is not None else BenignPolicy()
        self._key = session_file_key(self._session_file)
        self._id = f"fence-{os.getpid()}-{next(_ids)}"
        self._io = SnapshotIO(self._session_file, self._key, window)
        self._held: Any | None = None
        self._fence = FenceSnapshot(MISSING)
        self._fence_generation = 0
        self._fence_active = False
        self._takeover: SessionTakeoverError | None = None
        self._disposed = False
        self._cleanup_started = False
        self._lifecycle = asyncio.Lock()
        self._publication_queue = asyncio.Lock()  # FIFO: asyncio.Lock does not barge
        self._release_deferred = False
        self._retained_use = 0
        self._retained_idle = Signal()
        self._draining = False
        self._drain_done = Signal()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scope_var: ContextVar[ScopeState | None] = ContextVar(
            f"sessionfence-scope-{self._id}", default=None
        )

    # state -----------------------------------------------------------------------------------

    @property
    def session_file(self) -> str:
        return self._session_file

    @property
    def has_takeover(self) -> bool:
        return self._takeover is not None

    @property
    def takeover(self) -> SessionTakeoverError | None:
        return self._takeover

    @property
    def fence_active(self) -> bool:
        return self._fence_active

    @property
    def fence_fingerprint(self) -> Fingerprint:
        return self._fence.fingerprint

    @property
    def holds_lock(self) -> bool:
        return self._held is not None

    def _inside_active_scope(self) -> bool:
        state = self._scope_var.get()
        return state is not None and state.active and state.scope.active

    def _set_fence_generation(self, generation: int) -> None:
        self._fence_generation = generation
        if self._fence_active:
            REGISTRY.set_active_fence(self._key, self._id, generation)

    def _activate_fence(self, generation: int) -> None:
        self._fence_active = True
        self._set_fence_generation(generation)

    def _deactivate_fence(self) -> None:
        if self._fence_active:
            self._fence_active = False
            REGISTRY.drop_active_fence(self._key, self._id)

    # takeover --------------------------------------------------------------------------------

    def _record_takeover(
        self,
        reason: str,
        phase: str | None,
        *,
        before: Fingerprint | None = None,
        after: Fingerprint | None = None,
        detail: str | None = None,
    ) -> SessionTakeoverError:
        error = SessionTakeoverError(
            self._session_file,
            phase=phase,
            reason=reason,
            before=before,
            after=after,
            detail=detail,
        )
        if self._takeover is None:
            self._takeover = error
        return error

    def _change_takeover(
        self,
        change: Change,
        phase: str | None,
        detail: str | None = None,
        reason: str | None = None,
    ) -> SessionTakeoverError:
        return self._record_takeover(
            reason or REASON_BY_KIND.get(change.kind, "rewritten"),
            phase,
            before=change.before,
            after=change.after,
            detail=detail if detail is not None else _describe_change(change),
        )

    def _sticky_takeover(self) -> SessionTakeoverError:
        """A fresh error carrying the first takeover's verdict (takeover is sticky)."""
        first = self._takeover
        assert first is not None
        return SessionTakeoverError(
            first.session_file,
            phase=first.phase,
            reason=first.reason,
            before=first.before,
            after=first.after,
            detail=first.detail,
        )

    # lock plumbing ---------------------------------------------------------------------------

    def _raise_if_lock_lost(self, lock: Any, phase: str | None) -> None:
        """A held lock that was force-released (max hold) or whose lock file was replaced
        is a takeover (``lock-lost``): someone else may hold the lock now."""
        if lock_lost(lock):
            fence = self._fence.fingerprint
            try:
                now: Fingerprint | None = self._io.fingerprint()
            except OSError:
                now = None
            raise self._record_takeover(
                "lock-lost",
                phase,
                before=fence,
                after=now,
                detail="the held write lock was force-released or its lock file replaced",
            )

    def _held_lock_lost(self) -> bool:
        """Whether the retained lock is held but lost; records the takeover if so."""
        if self._held is None or self._takeover is not None:
            return False
        try:
            self._raise_if_lock_lost(self._held, "fence_check")
        except SessionTakeoverError:
            return True
        return False

    async def _acquire(self, phase: str) -> Any:
        try:
            return await call_maybe_async(
                self._acquire_fn, self._session_file, **self._lock_options
            )
        except SessionWriteLockAcquireError as exc:
            reason = "lock-stale" if isinstance(exc, SessionWriteLockStaleError) else "lock-timeout"
            try:
                now: Fingerprint | None = self._io.fingerprint()
            except OSError:
                now = None
            self._record_takeover(
                reason, phase, before=self._fence.fingerprint, after=now, detail=str(exc)
            )
            raise

    def _try_borrow(self) -> Any | None:
        if self._takeover is None and not self._draining and self._held is not None:
            self._retained_use += 1
            return self._held
        return None

    def _end_retained(self) -> None:
        self._retained_use -= 1
        if self._retained_use == 0:
            self._retained_idle.fire()

    async def _wait_retained_idle(self) -> bool:
        """False from inside an active scope: waiting there would wait for itself."""
        if self._inside_active_scope():
            return False
        while self._retained_use > 0:
            await self._retained_idle.wait()
        return True

    async def _wait_drain(self) -> None:
        while self._draining:
            await self._drain_done.wait()

    async def _claim_drain(self) -> None:
        await self._wait_drain()
        self._draining = True

    def _finish_drain(self) -> None:
        self._draining = False
        self._drain_done.fire()

    async def _drop_held_after_retained_idle(self) -> None:
        """Release the held lock once no write borrows it (dispose, after a takeover)."""
        if self._held is None:
            await self._wait_drain()
            return
        await self._claim_drain()
        try:
            if not await self._wait_retained_idle():
                return
            lock, self._held = self._held, None
            if lock is not None:
                await release_lock(lock)
        finally:
            self._finish_drain()

    async def _take_held_after_retained_idle(self) -> Any | None:
        if self._held is None:
            return None
        await self._claim_drain()
        try:
            if not await self._wait_retained_idle():
                return None
            lock, self._held = self._held, None
            return lock
        finally:
            self._finish_drain()


def lock_lost(lock: Any) -> bool:
    """For the package's ``SessionWriteLock`` (and injected locks that offer the same
    ``held`` / ``is_intact()``): whether this hold no longer guards the file."""
    held = getattr(lock, "held", None)
    if held is False:
        return True
    intact = getattr(lock, "is_intact", None)
    return bool(callable(intact) and not intact())


def _describe_change(change: Change) -> str:
    before, after = change.before, change.after
    if change.kind is ChangeKind.REPLACED:
        return f"another file now sits at the path (inode {before.ino} -> {after.ino})"
    if change.kind is ChangeKind.TRUNCATED:
        return f"shrank from {before.size} to {after.size} bytes"
    if change.kind is ChangeKind.REWRITTEN:
        return (
            f"the last {before.tail_len} bytes seen before no longer match ({after.size} bytes now)"
        )
    if change.kind is ChangeKind.DELETED:
        return "the transcript was deleted"
    if change.kind is ChangeKind.CREATED:
        return f"an unowned writer created the transcript ({after.size} bytes)"
    return f"{change.kind.value}: {before.size} -> {after.size} bytes"
