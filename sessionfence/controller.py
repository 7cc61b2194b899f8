"""The fence controller: prompt release and reacquire, owned writes, takeover detection.

Re-implements the original's embedded-attempt session-lock controller (reference §5) for
asyncio. A worker holds a transcript's write lock, releases it while the model thinks
(``release_for_prompt``), takes it back (``reacquire_after_prompt``) and learns at once
whether anyone changed the transcript meanwhile: its own or a trusted in-process peer's
(owned) write, a benign append it may merge, or a takeover it must stop on.

Differences from the original (SPEC §5.2): fence snapshots are a Fingerprint plus a
rolling XXH3-128 digest (``_controller_snapshot``), so release, reacquire, ordinary writes
and the synchronous owned write cost O(appended bytes); same-size changes are judged by
content for any size; every takeover says why (``SessionTakeoverError.reason``).

Design notes that matter for callers:

- ``with_write_lock`` returns a started ``asyncio.Task``: like the original's eager promise,
  a nested call registers with the enclosing scope (and a top-level one marks its use of
  the retained lock) at call time, so an unawaited nested write is still drained before
  the scope releases the lock.
- The write scope lives in a per-controller ``contextvars.ContextVar`` whose value is a
  mutable object shared with every task created inside the scope; a task that outlives
  its scope sees it inactive, waits for it to finish and takes the lock afresh.
- The content digest an active fence needs is computed from the file once per file per
  process, at the first release (or handed over with ``seed_content_digest`` by whoever
  parsed the transcript anyway); after that it is only rolled forward.
- As in the original, an owned synchronous write or publication that starts from an
  untrusted state (e.g. right after a benign foreign append in the same prompt window) is
  not published; the next fence check judges the combined change as unowned.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Literal, TypeVar

from ._controller_classify import (
    BenignPolicy,
    Classified,
    Rejected,
    classify_initialization,
    classify_lines,
    same_published_entries,
    split_lines,
)
from ._controller_owner import SessionFileOwner, acquire_session_file_owner, reset_owners
from ._controller_registry import REGISTRY, session_file_key
from ._controller_scope import (
    Scope,
    ScopeState,
    Signal,
    call_maybe_async,
    drain,
    release_lock,
    settle,
    track,
)
from ._controller_snapshot import FenceSnapshot, SnapshotIO
from ._merge import MergeResult, PublishedEntry
from ._types import (
    DEFAULT_WINDOW,
    MISSING,
    Change,
    ChangeKind,
    Fingerprint,
    check_window,
    same_stat,
)
from .errors import (
    SessionTakeoverError,
    SessionWriteLockAcquireError,
    SessionWriteLockStaleError,
)

__all__ = [
    "BenignPolicy",
    "CleanupLock",
    "MergeResult",
    "NoopCleanupLock",
    "SessionFenceController",
    "SessionFileOwner",
    "WriteScope",
    "acquire_session_file_owner",
    "reset_for_tests",
]

T = TypeVar("T")
Verify = Literal["tail", "full"]
MergeCallback = Callable[[list[Any]], "Awaitable[MergeResult | None] | MergeResult | None"]
ReloadCallback = Callable[[], "Awaitable[None] | None"]
Resolver = Callable[..., "list[PublishedEntry] | None"]

_ids = itertools.count(1)

_REASON_BY_KIND = {
    ChangeKind.REPLACED: "replaced",
    ChangeKind.TRUNCATED: "truncated",
    ChangeKind.REWRITTEN: "rewritten",
    ChangeKind.TOUCHED: "rewritten",
    ChangeKind.DELETED: "deleted",
    ChangeKind.CREATED: "created",
    ChangeKind.APPENDED: "foreign-append",
}


def reset_for_tests() -> None:
    """Forget all process-wide fence state: trust registry, owned-write history, the
    generation counter, content digests and in-process owners (waiters fail)."""
    REGISTRY.reset()
    reset_owners()


class _Merged:
    __slots__ = ("post_merge_published", "published_entries", "requires_reload", "snapshot")

    def __init__(
        self,
        snapshot: FenceSnapshot,
        published_entries: list[PublishedEntry] | None,
        post_merge_published: list[PublishedEntry] | None,
        requires_reload: bool,
    ) -> None:
        self.snapshot = snapshot
        self.published_entries = published_entries
        self.post_merge_published = post_merge_published
        self.requires_reload = requires_reload


class NoopCleanupLock:
    """Cleanup lock after a takeover: nothing to release."""

    def release(self) -> None:
        return None


class CleanupLock:
    """The lock handed to cleanup; ``release()`` is synchronous and idempotent."""

    def __init__(self, lock: Any) -> None:
        self._lock: Any | None = lock
        self._pending: asyncio.Future[Any] | None = None

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is None:
            return
        value = lock.release()
        if inspect.isawaitable(value):
            # An injected lock with an async release: finish it on the running loop.
            self._pending = asyncio.ensure_future(value)

    def __enter__(self) -> CleanupLock:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class WriteScope:
    """One use of the write lock (``write_lock()`` / ``with_write_lock()``).

    Set ``result`` inside the block to hand a value to ``resolve_published_entries``."""

    def __init__(
        self,
        ctl: SessionFenceController,
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


class SessionFenceController:
    """Fence of one transcript for one attempt. Create with ``await create(...)``."""

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
        if _token is not _CREATE:
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

    # construction --------------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        session_file: str | os.PathLike[str],
        *,
        timeout: float = 60.0,
        stale: float = 1800.0,
        max_hold: float = 300.0,
        acquire: Callable[..., Any] | None = None,
        merge_foreign_entries: MergeCallback | None = None,
        reload_session_file: ReloadCallback | None = None,
        verify: Verify = "tail",
        window: int = DEFAULT_WINDOW,
        benign_policy: BenignPolicy | None = None,
    ) -> SessionFenceController:
        """Build a controller and take the write lock at once (the eager lock)."""
        if verify not in ("tail", "full"):
            raise ValueError(f"verify must be 'tail' or 'full', not {verify!r}")
        check_window(window)
        if acquire is None:
            from .lock import acquire_session_write_lock_async

            acquire = acquire_session_write_lock_async
        ctl = cls(
            session_file,
            timeout=timeout,
            stale=stale,
            max_hold=max_hold,
            acquire=acquire,
            merge_foreign_entries=merge_foreign_entries,
            reload_session_file=reload_session_file,
            verify=verify,
            window=window,
            benign_policy=benign_policy,
            _token=_CREATE,
        )
        lock = await call_maybe_async(acquire, ctl._session_file, **ctl._lock_options)
        ctl._held = lock
        try:
            fp = ctl._io.fingerprint()
        except BaseException:
            await release_lock(lock)
            raise
        ctl._fence = FenceSnapshot(fp, REGISTRY.lookup_digest(ctl._key, fp))
        return ctl

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
            reason or _REASON_BY_KIND.get(change.kind, "rewritten"),
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

    # snapshots -------------------------------------------------------------------------------

    def _prove_prefix(self, prev: FenceSnapshot, change: Change) -> bool:
        """verify="full": an append is accepted only if the old content is unchanged."""
        if not self._full or change.kind is not ChangeKind.APPENDED:
            return True
        return self._io.prefix_unchanged(prev)

    def _roll(
        self, prev: FenceSnapshot, change: Change, *, need_digest: bool, proven: bool = False
    ) -> FenceSnapshot:
        """Snapshot of change.after from prev; under our own lock a failed full-mode proof
        only means the digest has to be recomputed, not a takeover."""
        if not proven and not self._prove_prefix(prev, change):
            return self._io.fresh_digest(change.after)
        return self._io.advance(prev, change, need_digest=need_digest)

    def _capture_write_start(self) -> FenceSnapshot:
        fp = self._io.fingerprint()
        if same_stat(self._fence.fingerprint, fp):
            return self._fence
        snap = FenceSnapshot(fp, REGISTRY.lookup_digest(self._key, fp))
        if self._full and not snap.has_digest:
            snap = self._io.fresh_digest(fp)
        return snap

    # classification and merge ----------------------------------------------------------------

    def _classify(
        self, prev: FenceSnapshot, change: Change, expected: list[PublishedEntry] | None
    ) -> Classified | Rejected:
        policy = None if expected is not None else self._policy
        prev_fp = prev.fingerprint
        initializing = (
            expected is not None
            and change.after.exists
            and (not prev_fp.exists or prev_fp.size == 0)
            and change.kind in (ChangeKind.CREATED, ChangeKind.APPENDED)
        )
        if not initializing and change.kind is not ChangeKind.APPENDED:
            return Rejected(f"the transcript was {_REASON_BY_KIND.get(change.kind, 'changed')}")
        base = prev_fp.size if change.kind is ChangeKind.APPENDED else 0
        grown = change.after.size - base
        if policy is not None and grown > policy.max_unowned_append_bytes:
            return Rejected(
                f"unowned append of {grown} bytes exceeds {policy.max_unowned_append_bytes} bytes",
                base,
            )
        data = self._io.suffix(change)
        if data is None:
            return Rejected("the transcript moved on while its appended bytes were read", base)
        lines = split_lines(data, base)
        if isinstance(lines, Rejected):
            return lines
        if initializing:
            assert expected is not None
            return classify_initialization(lines, expected)
        return classify_lines(lines, policy=policy, expected=expected)

    async def _merge_change(
        self,
        prev: FenceSnapshot,
        change: Change,
        expected: list[PublishedEntry] | None,
        phase: str,
        classified: Classified | None = None,
    ) -> _Merged | Rejected:
        """Hand the appended entries to the merge callback (reference §5.5)."""
        assert self._merge_cb is not None
        if classified is None:
            result = self._classify(prev, change, expected)
            if isinstance(result, Rejected):
                return result
            classified = result
        if expected is not None and not same_published_entries(classified.published, expected):
            return Rejected("the written entries differ from the declared ones")
        try:
            outcome = await call_maybe_async(self._merge_cb, list(classified.entries))
        except BaseException as exc:
            self._change_takeover(
                change, phase, f"merge callback failed: {exc!r}", "merge-rejected"
            )
            raise
        if outcome is not None and not isinstance(outcome, MergeResult):
            raise self._change_takeover(
                change, phase, f"merge callback returned {type(outcome).__name__}", "merge-rejected"
            )
        base = self._io.advance(prev, change, need_digest=self._fence_active)
        reported = outcome.session_file_snapshot if outcome is not None else None
        if reported is None:
            now = self._io.fingerprint()
            if not same_stat(now, change.after):
                raise self._change_takeover(
                    change, phase, "the transcript changed during the merge", "merge-rejected"
                )
            snapshot = base
        else:
            moved = self._io.observe(change.after)
            if not (reported.exists and same_stat(moved.after, reported)):
                raise self._record_takeover(
                    "merge-rejected",
                    phase,
                    before=change.after,
                    after=moved.after,
                    detail="the merge callback did not report the state it left",
                )
            snapshot = self._io.advance(base, moved, need_digest=self._fence_active)
        requires_reload = bool(outcome is not None and outcome.requires_reload)
        post = (
            None
            if outcome is None or outcome.published_entries is None
            else list(outcome.published_entries)
        )
        published = None if requires_reload else list(classified.published) + (post or [])
        return _Merged(snapshot, published, post, requires_reload)

    # the fence check -------------------------------------------------------------------------

    async def _assert_fence(self, phase: str) -> None:
        """Reference §5.3: did the transcript change, since this fence last saw it, in a
        way this controller does not own? Raises SessionTakeoverError when it did."""
        if not self._fence_active:
            return
        fence = self._fence
        change = self._io.observe_quiet(fence.fingerprint)
        if change.kind is ChangeKind.UNCHANGED:
            return
        current = change.after
        last = REGISTRY.latest_owned_write(self._key)
        if (
            last is not None
            and last.generation > self._fence_generation
            and same_stat(last.fingerprint, current)
        ):
            await self._accept_owned_writes(change, last.generation, phase)
            return
        if change.kind is ChangeKind.TOUCHED:
            self._accept_identical_content(change, phase)
            return
        if change.kind is not ChangeKind.APPENDED:
            raise self._change_takeover(change, phase)
        if not self._prove_prefix(fence, change):
            raise self._change_takeover(
                change, phase, "content before the append changed (verify=full)", "rewritten"
            )
        classified = self._classify(fence, change, None)
        if isinstance(classified, Rejected):
            raise self._change_takeover(change, phase, _detail(classified))
        if self._merge_cb is None:
            if not self._policy.accepts(classified.kind, has_merge_callback=False):
                raise self._change_takeover(
                    change, phase, f"{classified.kind} entries need a merge callback"
                )
            self._fence = self._roll(fence, change, need_digest=True, proven=True)
            generation = REGISTRY.trust_state(self._key, current)
            self._set_fence_generation(
                generation if generation is not None else self._fence_generation
            )
            return
        if not self._policy.accepts(classified.kind, has_merge_callback=True):
            raise self._change_takeover(change, phase, f"{classified.kind} entries are not benign")
        merged = await self._merge_change(fence, change, None, phase, classified)
        if isinstance(merged, Rejected):
            raise self._change_takeover(change, phase, _detail(merged), "merge-rejected")
        self._fence = merged.snapshot
        self._set_fence_generation(
            REGISTRY.record_owned_write(
                self._key,
                merged.snapshot.fingerprint,
                merged.published_entries,
                merged.requires_reload,
            )
        )

    def _accept_identical_content(self, change: Change, phase: str) -> None:
        """Same file, same size, times moved: accepted only when the content digest is
        unchanged, for any size (no 32 MiB cliff: SPEC §5.2 item 2)."""
        fence = self._fence
        if fence.digest is None:
            raise self._change_takeover(
                change, phase, "same-size change and no content digest to compare", "rewritten"
            )
        now = self._io.fresh_digest(change.after)
        if now.digest is None or not same_stat(now.fingerprint, change.after):
            raise self._change_takeover(
                change, phase, "the transcript kept changing while its content was hashed"
            )
        if now.digest.intdigest() != fence.digest.intdigest():
            raise self._change_takeover(change, phase, "same-size rewrite with different content")
        self._fence = now
        self._set_fence_generation(REGISTRY.record_trusted(self._key, change.after))

    async def _accept_owned_writes(self, change: Change, last_generation: int, phase: str) -> None:
        """Owned writes by this or another in-process controller led to the current state."""
        fence = self._fence
        current = change.after
        unseen = REGISTRY.owned_writes_after(self._key, self._fence_generation)
        if any(w.requires_reload for w in unseen):
            if self._reload_cb is None:
                raise self._change_takeover(
                    change, phase, "an owned rewrite needs a reload callback", "reload-failed"
                )
            try:
                await call_maybe_async(self._reload_cb)
            except BaseException as exc:
                self._change_takeover(change, phase, f"reload failed: {exc!r}", "reload-failed")
                raise
            now = self._io.fingerprint()
            if not same_stat(now, current):
                raise self._record_takeover(
                    "reload-failed",
                    phase,
                    before=current,
                    after=now,
                    detail="the transcript changed during the reload",
                )
            self._fence = self._io.fresh_digest(current)
            self._set_fence_generation(last_generation)
            return
        if not self._prove_prefix(fence, change):
            raise self._change_takeover(
                change, phase, "content before the owned append changed (verify=full)", "rewritten"
            )
        if self._merge_cb is None:
            # Without a session to resync, a peer's owned write is accepted by fingerprint.
            self._fence = self._roll(fence, change, need_digest=True, proven=True)
            self._set_fence_generation(last_generation)
            return
        expected: list[PublishedEntry] | None = None
        if all(w.published_entries is not None for w in unseen):
            expected = [dict(e) for w in unseen for e in (w.published_entries or ())]
        merged = await self._merge_change(fence, change, expected, phase)
        if isinstance(merged, Rejected):
            reason = "merge-rejected" if expected is not None else None
            raise self._change_takeover(change, phase, _detail(merged), reason)
        fp = merged.snapshot.fingerprint
        generation = last_generation
        if not same_stat(fp, current):  # the callback itself wrote (e.g. a leaf control)
            generation = REGISTRY.record_owned_write(
                self._key, fp, merged.post_merge_published, merged.requires_reload
            )
        self._fence = merged.snapshot
        self._set_fence_generation(generation)

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
                await self._assert_fence("fence_check")
                yield state
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
        """An ordinary write: afterwards this controller's fence adopts what it wrote
        (even when the write failed half-way); the registry records nothing."""
        before = self._io.fingerprint()
        try:
            yield
        finally:
            if self._takeover is None and self._fence_active:
                change = self._io.observe_quiet(self._fence.fingerprint)
                if change.kind is not ChangeKind.UNCHANGED and not same_stat(change.after, before):
                    self._fence = self._roll(self._fence, change, need_digest=True)

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

    async def _publish_owned_fence(
        self, before: FenceSnapshot, expected: list[PublishedEntry] | None
    ) -> None:
        if self._takeover is not None:
            return
        change = self._io.observe(before.fingerprint)
        if change.kind is ChangeKind.UNCHANGED:
            return
        current = change.after
        trusted_before = (
            self._fence_active and same_stat(self._fence.fingerprint, before.fingerprint)
        ) or REGISTRY.is_trusted(self._key, before.fingerprint)
        if not trusted_before:
            return  # the next fence check judges the change as unowned
        if not self._prove_prefix(before, change):
            raise self._change_takeover(
                change, "fence_check", "content before the owned append changed", "rewritten"
            )
        if self._merge_cb is not None:
            merged = await self._merge_change(before, change, expected, "fence_check")
            if isinstance(merged, Rejected):
                raise self._change_takeover(
                    change, "fence_check", _detail(merged), "merge-rejected"
                )
            generation = REGISTRY.record_owned_write(
                self._key,
                merged.snapshot.fingerprint,
                merged.published_entries,
                merged.requires_reload,
            )
            snapshot = merged.snapshot
        else:
            generation = REGISTRY.record_owned_write(self._key, current, expected)
            snapshot = self._roll(before, change, need_digest=self._fence_active, proven=True)
        if self._fence_active:
            self._fence = snapshot
            self._set_fence_generation(generation)

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

    # the synchronous owned write (compaction) ------------------------------------------------

    def owned_file_write(
        self,
        run: Callable[[], T],
        validate_append: Callable[[T, str], bool] | None = None,
    ) -> T:
        """Run ``run()`` (which appends to the transcript without the lock, e.g. a
        compaction) and publish the result as owned when the state before it was trusted,
        the old content is still a prefix of the new (tail window, or the whole content
        with verify="full") and ``validate_append(result, appended_text)`` accepts exactly
        what was appended. Costs O(appended bytes); never raises for a refused
        publication (the next fence check judges the change)."""
        before = self._io.fingerprint()
        if validate_append is not None and not before.exists:
            # As the original: a validated append needs the file it appends to.
            raise FileNotFoundError(2, "session file does not exist", self._session_file)
        reference: FenceSnapshot | None = None
        if self._full:
            reference = self._snapshot_for(before)
            if reference.digest is None and before.exists:
                reference = self._io.fresh_digest(before)
        result = run()
        if self._takeover is not None:
            return result
        change = self._io.observe(before)
        after = change.after
        if change.kind is ChangeKind.UNCHANGED:
            return result
        trusted = (
            self._fence_active and same_stat(self._fence.fingerprint, before)
        ) or REGISTRY.is_trusted(self._key, before)
        if not trusted:
            return result
        prev = reference if reference is not None else self._snapshot_for(before)
        proven = False
        if validate_append is not None:
            if change.kind is not ChangeKind.APPENDED:
                return result
            if self._full:
                if not self._io.prefix_unchanged(prev):
                    return result
                proven = True
            data = self._io.suffix(change)
            if data is None or not validate_append(result, data.decode("utf-8", errors="replace")):
                return result
        generation = REGISTRY.record_owned_write(self._key, after)
        if self._fence_active:
            self._fence = self._roll(prev, change, need_digest=True, proven=proven)
            self._set_fence_generation(generation)
        return result

    def _snapshot_for(self, fp: Fingerprint) -> FenceSnapshot:
        if same_stat(self._fence.fingerprint, fp):
            return self._fence
        return FenceSnapshot(fp, REGISTRY.lookup_digest(self._key, fp))

    # synchronous helpers ---------------------------------------------------------------------

    def refresh_after_owned_write(self) -> None:
        """The session manager persisted a message: adopt the new state (and, before the
        first release, make it the trusted state for the next attempt)."""
        if self._takeover is not None:
            return
        before = self._fence.fingerprint
        change = self._io.observe(before)
        fp = change.after
        if not self._fence_active:
            self._set_fence_generation(REGISTRY.record_trusted(self._key, fp))
        elif not same_stat(fp, before) and REGISTRY.is_trusted(self._key, before):
            self._set_fence_generation(REGISTRY.record_owned_write(self._key, fp))
        self._fence = self._roll(self._fence, change, need_digest=self._fence_active)

    def can_advance_entry_cache(self, fp: Fingerprint) -> bool:
        """May a transcript cache reuse a parse made at exactly ``fp``?"""
        if self._takeover is not None or not self._inside_active_scope():
            return False
        return (self._fence_active and same_stat(self._fence.fingerprint, fp)) or (
            REGISTRY.is_trusted(self._key, fp)
        )

    def publish_owned_snapshot(self, fp: Fingerprint) -> bool:
        """Record ``fp`` (the current state, written inside this scope) as owned."""
        if self._takeover is not None or not self._inside_active_scope():
            return False
        change = self._io.observe(self._fence.fingerprint)
        if not same_stat(change.after, fp):
            return False
        generation = REGISTRY.record_owned_write(self._key, change.after)
        if self._fence_active:
            self._fence = self._roll(self._fence, change, need_digest=True)
            self._set_fence_generation(generation)
        return True

    def publish_validated_snapshot(self, fp: Fingerprint) -> bool:
        """Trust ``fp`` after a repair pass validated it under the retained lock."""
        if self._takeover is not None or self._held is None or self._draining:
            return False
        change = self._io.observe(self._fence.fingerprint)
        if not same_stat(change.after, fp):
            return False
        self._set_fence_generation(REGISTRY.record_trusted(self._key, change.after))
        if self._fence_active:
            self._fence = self._roll(self._fence, change, need_digest=True)
        return True

    def seed_content_digest(self, fp: Fingerprint, digest: Any, size: int | None = None) -> None:
        """Hand over a content digest computed while the transcript was read anyway, so
        the first activation needs no whole-file read of its own.

        ``digest`` must be a ``RollingDigest`` of bytes ``[0, fp.size)`` of the file as
        ``fp`` describes it (e.g. ``SessionManager.open``'s ``digest`` with
        ``parsed_fingerprint`` and ``digest_size``). It is copied; it is used only while
        the file still matches ``fp``."""
        if size is not None and size != fp.size:
            raise ValueError(f"digest covers {size} bytes, the fingerprint {fp.size}")
        if not fp.exists:
            return
        own = digest.copy()
        REGISTRY.remember_digest(self._key, fp, own)
        if same_stat(self._fence.fingerprint, fp) and self._fence.digest is None:
            self._fence = FenceSnapshot(self._fence.fingerprint, own)

    def trusted_snapshot(self) -> Fingerprint | None:
        """The current fingerprint when this process trusts it (skip repair), else None."""
        fp = self._io.fingerprint()
        return fp if fp.exists and REGISTRY.is_trusted(self._key, fp) else None

    # prompt release and reacquire ------------------------------------------------------------

    async def _release_held_lock_with_fence(self) -> None:
        if self._held is None:
            await self._wait_drain()
            return
        await self._claim_drain()
        try:
            if not await self._wait_retained_idle():
                self._release_deferred = True  # the scope finishes the release
                return
            lock, self._held = self._held, None
            if lock is None:
                return
            try:
                change = self._io.observe_quiet(self._fence.fingerprint)
                fp = change.after
                last = REGISTRY.latest_owned_write(self._key)
                trusted_generation = REGISTRY.trust_state(self._key, fp)
                self._fence = self._roll(self._fence, change, need_digest=True)
                if last is not None and same_stat(last.fingerprint, fp):
                    generation = last.generation
                elif trusted_generation is not None:
                    generation = trusted_generation
                else:
                    generation = self._fence_generation
                self._activate_fence(generation)
            finally:
                await release_lock(lock)
        finally:
            self._finish_drain()

    async def release_for_prompt(self) -> None:
        """Release the held lock for the model call; the fence remembers the file."""
        await self._release_held_lock_with_fence()

    async def release_for_abort(self) -> None:
        """Same as ``release_for_prompt``; deferred to the end of the scope when called
        from inside a write."""
        await self._release_held_lock_with_fence()

    async def reacquire_after_prompt(self) -> None:
        """Take the lock back and check the fence (phase ``prompt_reacquire``)."""
        if self._cleanup_started:
            return
        async with self._lifecycle:
            await self._wait_drain()
            if self._disposed or self._takeover is not None or self._held is not None:
                return
            lock = await self._acquire("prompt_reacquire")
            if self._disposed:
                await release_lock(lock)
                return
            self._held = lock
            try:
                await self._assert_fence("prompt_reacquire")
            except BaseException:
                if self._held is lock:
                    self._held = None
                await release_lock(lock)
                raise

    @contextlib.asynccontextmanager
    async def prompt_released(self) -> AsyncIterator[None]:
        """Release for the prompt on entry, reacquire on exit (a reacquire error replaces
        the block's outcome)."""
        await self.release_for_prompt()
        try:
            yield
        finally:
            await self.reacquire_after_prompt()

    async def acquire_for_cleanup(self) -> CleanupLock | NoopCleanupLock:
        """The lock for end-of-attempt cleanup after a fence check (phase ``cleanup``);
        a no-op lock after a takeover. The caller owns and releases it."""
        self._cleanup_started = True
        async with self._lifecycle:
            if self._takeover is not None:
                return NoopCleanupLock()
            lock = await self._take_held_after_retained_idle()
            if lock is None:
                await self._wait_drain()
                try:
                    lock = await self._acquire("cleanup")
                except SessionWriteLockAcquireError:
                    return NoopCleanupLock()
            try:
                await self._assert_fence("cleanup")
            except SessionTakeoverError:
                await release_lock(lock)
                return NoopCleanupLock()
            except BaseException:
                await release_lock(lock)
                raise
            return CleanupLock(lock)

    async def dispose(self) -> None:
        """Release the held lock (once) and retire the fence. Idempotent."""
        self._disposed = True
        try:
            await self._drop_held_after_retained_idle()
        finally:
            self._deactivate_fence()
            self._io.close()  # a later call (cleanup after dispose) reopens it

    def __repr__(self) -> str:
        state = "taken over" if self._takeover else "active" if self._fence_active else "inactive"
        return f"<SessionFenceController {self._session_file!r} fence={state}>"


_CREATE = object()


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


def _detail(rejected: Rejected) -> str:
    if rejected.offset is None:
        return rejected.detail
    return f"{rejected.detail} at offset {rejected.offset}"


def _resolve(handle: WriteScope, ok: bool) -> list[PublishedEntry] | None:
    if ok:
        if handle._resolve is None:
            return None
        return handle._resolve(handle.result)
    if handle._resolve_after_failure is None:
        return None
    return handle._resolve_after_failure()
