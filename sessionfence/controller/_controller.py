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

The class is built in layers, one module each: ``_controller_state`` (fields, takeover
records, the held-lock drain and retained use), ``_controller_fence`` (the fence check,
classification through ``BenignPolicy``, merges, publications), ``_controller_write``
(write scopes) and this module (construction, the synchronous owned write, the
publication helpers, prompt release/reacquire, cleanup and disposal).

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
import os
import threading
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, TypeVar

from .._merge import MergeResult
from .._ownership import LIVE_MANAGERS, OWN_WRITES
from .._types import (
    DEFAULT_WINDOW,
    Change,
    ChangeKind,
    Fingerprint,
    check_window,
)
from ..errors import (
    SessionTakeoverError,
    SessionWriteLockAcquireError,
)
from ..lock._record import resolve_settings as resolve_lock_settings
from ._classify import (
    BenignPolicy,
)
from ._owner import SessionFileOwner, acquire_session_file_owner, reset_owners
from ._scope import (
    call_maybe_async,
    release_lock,
)
from ._snapshot import FenceSnapshot
from ._state import CREATE, MergeCallback, ReloadCallback, Verify
from ._trust import REGISTRY, same_state
from ._write import WriteScope, WriteScopes

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


def reset_for_tests() -> None:
    """Forget all process-wide fence state: trust registry, owned-write history, the
    generation counter, content digests, the record of own appends, the open-manager
    registry and in-process owners (waiters fail)."""
    REGISTRY.reset()
    OWN_WRITES.reset()
    LIVE_MANAGERS.reset()
    reset_owners()


class NoopCleanupLock:
    """Cleanup lock after a takeover: nothing to release."""

    def release(self) -> None:
        return None

    async def arelease(self) -> None:
        return None


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


class SessionFenceController(WriteScopes):
    """Fence of one transcript for one attempt. Create with ``await create(...)``."""

    # construction --------------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        session_file: str | os.PathLike[str],
        *,
        timeout: float | None = None,
        stale: float | None = None,
        max_hold: float | None = None,
        acquire: Callable[..., Any] | None = None,
        merge_foreign_entries: MergeCallback | None = None,
        reload_session_file: ReloadCallback | None = None,
        verify: Verify = "tail",
        window: int = DEFAULT_WINDOW,
        benign_policy: BenignPolicy | None = None,
    ) -> SessionFenceController:
        """Build a controller and take the write lock at once (the eager lock).

        Lock times left unset default to 60 s / 1800 s / 300 s, or to the operator's
        ``SESSIONFENCE_LOCK_*_MS`` overrides, read now; ``acquire`` always receives numbers.
        """
        timeout, stale, max_hold = resolve_lock_settings(timeout, stale, max_hold)
        if verify not in ("tail", "full"):
            raise ValueError(f"verify must be 'tail' or 'full', not {verify!r}")
        check_window(window)
        if acquire is None:
            from ..lock import acquire_session_write_lock_async

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
            _token=CREATE,
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

    # the synchronous owned write (compaction) ------------------------------------------------

    def owned_file_write(
        self,
        run: Callable[[], T],
        validate_append: Callable[[T, str], bool] | None = None,
    ) -> T:
        """Run ``run()`` (which appends to the transcript without the lock, e.g. a
        compaction) and publish the result as owned when the state before it was trusted,
        the change is an append whose old content is still a prefix of the new (tail
        window, or the whole content with verify="full") and what was appended is known to
        be ours: ``validate_append(result, appended_text)`` accepts exactly it, or, without
        a validator, it is exactly lines a ``SessionManager`` of this process wrote.
        Anything else (a truncation, a rewrite, a refused validation) is not published:
        the next fence check judges it. Costs O(appended bytes) in tail mode; never raises
        for a refused publication."""
        before = self._io.fingerprint()
        if validate_append is not None and not before.exists:
            # As the original: a validated append needs the file it appends to.
            raise FileNotFoundError(2, "session file does not exist", self._session_file)
        if self._held_lock_lost():
            return run()  # recorded as lock-lost; nothing this run writes is published
        trusted = (self._fence_active and self._fence.fingerprint == before) or REGISTRY.is_trusted(
            self._key, before
        )
        reference: FenceSnapshot | None = None
        if not trusted:
            # A touch, chmod or ctime drift since the fence is judged by content, as the
            # fence check judges any same-size change (no false takeover for metadata).
            reference = self._identical_content(before)
            trusted = reference is not None
        if reference is None and self._full:
            reference = self._snapshot_for(before)
            if reference.digest is None and before.exists:
                reference = self._io.fresh_digest(before)
        result = run()
        if self._takeover is not None:
            return result
        change = self._io.observe(before)
        after = change.after
        if change.kind is ChangeKind.UNCHANGED or not trusted:
            return result
        if change.kind is not ChangeKind.APPENDED:
            return result  # only a proven append is published (SPEC §5.1)
        prev = reference if reference is not None else self._snapshot_for(before)
        proven = False
        if self._full:
            if not self._io.prefix_unchanged(prev):
                return result
            proven = True
        if validate_append is not None:
            data = self._io.suffix(change)
            if data is None or not validate_append(result, data.decode("utf-8", errors="replace")):
                return result
        elif not self._own_append(change, None):
            # No validator: only bytes this process is known to have written (lines a
            # SessionManager appended) are published; a writer of raw bytes passes a
            # validator (e.g. ``lambda result, text: text == expected``).
            return result
        generation = REGISTRY.record_owned_write(self._key, after)
        if self._fence_active:
            self._fence = self._roll(prev, change, need_digest=True, proven=proven)
            self._set_fence_generation(generation)
        return result

    def _identical_content(self, before: Fingerprint) -> FenceSnapshot | None:
        """The fence's content under ``before``'s stat, when ``before`` is the fenced file at
        the same size with a content digest equal to the fence's (one whole-file read, only
        after a metadata-only change); else None."""
        fence = self._fence
        fp = fence.fingerprint
        if not (self._fence_active and fp.exists and before.exists and fence.digest is not None):
            return None
        if (fp.dev, fp.ino, fp.size) != (before.dev, before.ino, before.size):
            return None
        snap = FenceSnapshot(before, fence.digest)
        return snap if self._io.prefix_unchanged(snap) else None

    # synchronous helpers ---------------------------------------------------------------------

    def refresh_after_owned_write(self, written: bytes | None = None) -> None:
        """This process appended to the transcript (``guard_session_manager`` calls this
        after every message a ``SessionManager`` persisted): move the fence over it.

        Only an append whose bytes are exactly what this process wrote is taken: the
        ``written`` bytes when given, else the lines ``SessionManager`` objects of this
        process recorded as they wrote them; with ``verify="full"`` the old content is
        proven a prefix too. Anything else (a foreign line before or after ours, a
        truncation, a rewrite) is left for the fence check to judge, never adopted.
        Before the first release this also makes the new state the trusted one for the
        next attempt."""
        if self._takeover is not None or self._held_lock_lost():
            return
        fence = self._fence
        before = fence.fingerprint
        change = self._io.observe(before)
        if change.kind is ChangeKind.UNCHANGED:
            return
        if not self._own_append(change, written):
            return
        proven = False
        if self._full and self._fence_active and change.kind is ChangeKind.APPENDED:
            # Before the first release the fence is a baseline, not a proof: nothing to check.
            if not self._io.prefix_unchanged(fence):
                return
            proven = True
        fp = change.after
        if not self._fence_active:
            self._set_fence_generation(REGISTRY.record_trusted(self._key, fp))
        elif REGISTRY.is_trusted(self._key, before):
            self._set_fence_generation(REGISTRY.record_owned_write(self._key, fp))
        self._fence = self._roll(fence, change, need_digest=self._fence_active, proven=proven)

    def _own_append(self, change: Change, written: bytes | None) -> bool:
        """Whether ``change`` appended (or created the file with) exactly own bytes."""
        if change.kind is ChangeKind.APPENDED:
            offset = change.before.size
        elif change.kind is ChangeKind.CREATED:
            offset = 0
        else:
            return False
        data = self._io.suffix(change)
        if not data:
            return False
        if written is not None:
            return bytes(written) == data
        after = change.after
        return OWN_WRITES.covers(after.dev, after.ino, offset, data)

    def can_advance_entry_cache(self, fp: Fingerprint) -> bool:
        """May a transcript cache reuse a parse made at exactly ``fp``?"""
        if self._takeover is not None or not self._inside_active_scope():
            return False
        return (self._fence_active and same_state(self._fence.fingerprint, fp)) or (
            REGISTRY.is_trusted(self._key, fp)
        )

    def publish_owned_snapshot(self, fp: Fingerprint) -> bool:
        """Record ``fp`` (the current state, appended inside this scope) as owned. Only an
        append over the fence (old content proven a prefix) can be published."""
        if self._takeover is not None or not self._inside_active_scope():
            return False
        fence = self._fence
        change = self._io.observe(fence.fingerprint)
        if not same_state(change.after, fp) or change.kind not in (
            ChangeKind.APPENDED,
            ChangeKind.UNCHANGED,
        ):
            return False
        if not self._prove_prefix(fence, change):
            return False
        generation = REGISTRY.record_owned_write(self._key, change.after)
        if self._fence_active:
            self._fence = self._roll(fence, change, need_digest=True, proven=True)
            self._set_fence_generation(generation)
        return True

    def publish_validated_snapshot(self, fp: Fingerprint) -> bool:
        """Trust ``fp`` after a repair pass validated it under the retained lock."""
        if self._takeover is not None or self._held is None or self._draining:
            return False
        if self._held_lock_lost():
            return False
        change = self._io.observe(self._fence.fingerprint)
        if not same_state(change.after, fp):
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
        if same_state(self._fence.fingerprint, fp) and self._fence.digest is None:
            self._fence = FenceSnapshot(self._fence.fingerprint, own)

    def trusted_snapshot(self) -> Fingerprint | None:
        """The current fingerprint when this process trusts it (skip repair), else None."""
        fp = self._io.fingerprint()
        return fp if fp.exists and REGISTRY.is_trusted(self._key, fp) else None

    # prompt release and reacquire ------------------------------------------------------------

    async def release_for_prompt(self) -> None:
        """Release the held lock for the model call; the fence remembers the file.

        Once the fence is active, what happened while the lock was held is judged first
        (owned appends pass; a foreign change or a lost lock does not): on a takeover the
        lock is still released, and ``SessionTakeoverError`` is raised, so no model call
        starts on a transcript that is no longer ours."""
        await self._release_held_lock_with_fence()

    async def release_for_abort(self) -> None:
        """Same as ``release_for_prompt``, but a takeover found on the way is only recorded
        (``takeover``), not raised: an abort must not fail. Deferred to the end of the
        scope when called from inside a write."""
        with contextlib.suppress(SessionTakeoverError):
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
