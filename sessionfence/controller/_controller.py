"""The fence controller: prompt release and reacquire, owned writes, takeover detection.

A worker holds a transcript's write lock, releases it while the model thinks
(``release_for_prompt``), takes it back (``reacquire_after_prompt``) and learns at once
whether anyone changed the transcript meanwhile: its own or a trusted in-process peer's
(owned) write, a benign append it may merge, or a takeover it must stop on. It adopts
nothing it did not write (docs/design.md, "Nothing is adopted").

``SessionFenceController`` is one class that reads top to bottom: construction, state,
takeovers, snapshots, the fence check, classification and merge, write scopes and
publications, owned writes made without the lock, publication helpers, prompt release and
reacquire, cleanup. Its collaborators: ``HeldLock`` (``_held``: the retained lock, its
borrowers and the drain), ``WriteScope`` (``_scope``: one use of the write lock, talking to
the controller through ``ScopeHost``), ``SnapshotIO`` / ``FenceSnapshot`` (``_snapshot``:
fingerprint + rolling digest, O(appended bytes)), the process-wide ``REGISTRY`` (``_trust``)
and ``BenignPolicy`` (``_classify``).

Design notes that matter for callers:

- ``with_write_lock`` returns a started ``asyncio.Task``: a nested call registers with the
  enclosing scope (and a top-level one marks its use of the retained lock) at call time, so
  an unawaited nested write is still drained before the scope releases the lock.
- The content digest an active fence needs is computed from the file once per file per
  process, at the first release (or handed over with ``seed_content_digest`` by whoever
  parsed the transcript anyway); after that it is only rolled forward.
- An owned synchronous write or publication that starts from an untrusted state (e.g.
  right after a benign foreign append in the same prompt window) is not published; the next
  fence check judges the combined change as unowned.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from .. import _backend
from .._callbacks import (
    MergeCallback,
    MergeResult,
    PublishedEntry,
    ReloadCallback,
    Resolver,
    call_maybe_async,
)
from .._ownership import LIVE_MANAGERS, OWN_WRITES
from .._types import (
    DEFAULT_WINDOW,
    MISSING,
    Change,
    ChangeKind,
    Fingerprint,
    check_window,
)
from .._util import session_key
from ..errors import (
    SessionSupersededError,
    SessionTakeoverError,
    SessionWriteLockAcquireError,
    SessionWriteLockStaleError,
)
from ..journal._fence import Delta, FenceJournal
from ..journal._format import CLAIMANT, COTENANT, digest_bytes
from ..journal._writer import SessionWriter, forget_all, new_run_id
from ..lock._record import resolve_settings as resolve_lock_settings
from ._classify import (
    BenignPolicy,
    Classified,
    Rejected,
    classify_initialization,
    classify_lines,
    same_published_entries,
    split_lines,
)
from ._held import CleanupLock, HeldLock, NoopCleanupLock, release_lock
from ._owner import SessionFileOwner, acquire_session_file_owner, reset_owners
from ._protocol import FenceController
from ._scope import Scope, ScopeState, WriteScope, drain, settle, track
from ._snapshot import FenceSnapshot, SnapshotIO
from ._trust import REGISTRY, same_state

if TYPE_CHECKING:
    from ..store._base import SessionStore
    from ..store._postgres import AsyncPostgresStore

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


Verify = Literal["tail", "full"]


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


def reset_for_tests() -> None:
    """Forget all process-wide fence state: trust registry, owned-write history, the
    generation counter, content digests, the record of own appends, the open-manager
    registry and in-process owners (waiters fail)."""
    REGISTRY.reset()
    OWN_WRITES.reset()
    LIVE_MANAGERS.reset()
    forget_all()
    reset_owners()


class _ScopeHost:
    """The controller as a ``WriteScope`` sees it (``_scope.ScopeHost``)."""

    __slots__ = ("_ctl",)

    def __init__(self, ctl: SessionFenceController) -> None:
        self._ctl = ctl

    @property
    def scope_var(self) -> ContextVar[ScopeState | None]:
        return self._ctl._scope_var

    def sticky_takeover(self) -> SessionTakeoverError | None:
        return self._ctl._sticky_takeover() if self._ctl._takeover is not None else None

    def borrow(self) -> Any | None:
        return self._ctl._hold.borrow(self._ctl._takeover is None)

    def end_borrow(self) -> None:
        self._ctl._hold.end_borrow()

    def physical(self, borrowed: Any | None) -> AbstractAsyncContextManager[ScopeState]:
        return self._ctl._physical(borrowed)

    def publication(
        self, parent: ScopeState, handle: WriteScope
    ) -> AbstractAsyncContextManager[None]:
        return self._ctl._publication(parent, handle)

    def refreshing(self) -> AbstractAsyncContextManager[None]:
        return self._ctl._refreshing()


class SessionFenceController:
    """Fence of one transcript for one attempt. Create with ``await create(...)``."""

    # construction -------------------------------------------------------------------------------

    @overload
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
        run_id: str | None = None,
        journal: bool = True,
        store: None = None,
    ) -> SessionFenceController: ...

    @overload
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
        run_id: str | None = None,
        journal: bool = True,
        store: SessionStore | AsyncPostgresStore,
    ) -> FenceController: ...

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
        run_id: str | None = None,
        journal: bool = True,
        store: SessionStore | AsyncPostgresStore | None = None,
    ) -> SessionFenceController | FenceController:
        """Build a controller, take the write lock at once (the eager lock) and claim the
        session for the run ``run_id`` (a fresh id when None) in its journal: a run that
        held the claim is superseded (docs/journal.md). Pass ``writer`` to the
        ``SessionManager`` that appends for this run (``SessionManager.open(path,
        writer=ctl.writer)``) so its appends are journaled and checked at commit.
        ``journal=False`` makes no claim and reads no journal (the fence judges every
        change by content alone, as before writer claims; ``writer`` is then unusable).

        Lock times left unset default to 60 s / 1800 s / 300 s, or to the operator's
        ``SESSIONFENCE_LOCK_*_MS`` overrides, read now; ``acquire`` always receives numbers.

        ``store`` (docs/multihost.md): ``session_file`` is then a session id of that store.
        A ``FileStore`` gives this controller on its file; a PostgreSQL store gives a
        ``StoreFenceController`` with the same ``FenceController`` methods and semantics
        (claim at create, fence checks at release and reacquire; ``merge_foreign_entries``,
        ``reload_session_file``, ``benign_policy`` and ``run_id`` apply; the lock options,
        ``acquire``, ``window`` and ``verify`` are about files: a database line cannot be
        edited unseen, ``journal=False`` is refused).
        """
        if verify not in ("tail", "full"):
            raise ValueError(f"verify must be 'tail' or 'full', not {verify!r}")
        if store is not None:
            from ..store._file import FileStore

            if isinstance(store, FileStore):
                session_file = store.path(os.fsdecode(session_file))
            else:
                if not journal:
                    raise ValueError("journal=False: a store's claims cannot be turned off")
                if acquire is not None:
                    raise ValueError("acquire=: a PostgreSQL store has no write lock")
                from ..store._controller import StoreFenceController

                return await StoreFenceController.create(
                    os.fsdecode(session_file),
                    store,  # type: ignore[arg-type]  # checked there: a PostgreSQL store
                    merge_foreign_entries=merge_foreign_entries,
                    reload_session_file=reload_session_file,
                    benign_policy=benign_policy,
                    run_id=run_id,
                )
        timeout, stale, max_hold = resolve_lock_settings(timeout, stale, max_hold)
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
            run_id=run_id,
            _token=CREATE,
        )
        lock = await call_maybe_async(acquire, ctl._session_file, **ctl._lock_options)
        ctl._hold.lock = lock
        try:
            if journal:
                ctl._journal.claim()
            fp = ctl._io.fingerprint()
        except BaseException:
            ctl._journal.retire()  # no live run left behind
            await release_lock(lock)
            raise
        ctl._fence = FenceSnapshot(fp, REGISTRY.lookup_digest(ctl._key, fp))
        return ctl

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
        run_id: str | None = None,
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
        self._key = session_key(self._session_file)
        self._id = f"fence-{os.getpid()}-{next(_ids)}"
        self._io = SnapshotIO(self._session_file, self._key, window, _backend.active())
        self._fence = FenceSnapshot(MISSING)
        self._fence_generation = 0
        self._fence_active = False
        self._takeover: SessionTakeoverError | None = None
        self._disposed = False
        self._cleanup_started = False
        self._lifecycle = asyncio.Lock()
        self._publication_queue = asyncio.Lock()  # FIFO: asyncio.Lock does not barge
        self._release_deferred = False  # a release asked for from inside a scope
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scope_var: ContextVar[ScopeState | None] = ContextVar(
            f"sessionfence-scope-{self._id}", default=None
        )
        self._hold = HeldLock(self._inside_active_scope)
        self._scope_host = _ScopeHost(self)
        self._journal = FenceJournal(self._session_file, run_id if run_id else new_run_id())

    # state --------------------------------------------------------------------------------------

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
        return self._hold.lock is not None

    @property
    def run_id(self) -> str:
        """This attempt's run id (its claim in the session's journal)."""
        return self._journal.writer.run_id

    @property
    def revision(self) -> int:
        """The revision of this run's claim (each new claim of the session bumps it)."""
        return self._journal.writer.revision

    @property
    def writer(self) -> SessionWriter:
        """The claimant writer of this run: give it to the ``SessionManager`` that appends
        for the run, whose appends are then journaled and refused once superseded."""
        return self._journal.writer

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

    # takeovers ----------------------------------------------------------------------------------

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
        if isinstance(first, SessionSupersededError):
            return SessionSupersededError(
                first.session_file,
                first.phase,
                first.run_id,
                first.revision,
                first.superseded_by,
                first.new_revision,
                first.before,
                first.after,
            )
        return SessionTakeoverError(
            first.session_file,
            phase=first.phase,
            reason=first.reason,
            before=first.before,
            after=first.after,
            detail=first.detail,
        )

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
        if self._hold.lock is None or self._takeover is not None:
            return False
        try:
            self._raise_if_lock_lost(self._hold.lock, "fence_check")
        except SessionTakeoverError:
            return True
        return False

    # the lock -----------------------------------------------------------------------------------

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

    # snapshots ----------------------------------------------------------------------------------

    def _held_intact(self) -> bool:
        """Whether this controller writes under a lock it has held since its last fence
        check and still holds (a scope's, or the retained one)."""
        if self._inside_active_scope():
            return True
        lock = self._hold.lock
        return lock is not None and not lock_lost(lock)

    def _prove_prefix(self, prev: FenceSnapshot, change: Change, *, owned: bool = False) -> bool:
        """verify="full": an append is accepted only if the old content is unchanged."""
        if not self._full or change.kind is not ChangeKind.APPENDED:
            return True
        if owned and self._held_intact():
            # An own append under a lock held since the last check: nobody may have touched
            # the old content, and the snapshot this rolls to is racy, so the next fence
            # check proves the whole content once (one digest per prompt window, none per
            # owned append; docs/design.md, "Racy fences").
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
        if self._fence.fingerprint == fp:
            return self._fence
        snap = FenceSnapshot(fp, REGISTRY.lookup_digest(self._key, fp))
        if self._full and not snap.has_digest:
            snap = self._io.fresh_digest(fp)
        return snap

    def _snapshot_for(self, fp: Fingerprint) -> FenceSnapshot:
        if self._fence.fingerprint == fp:
            return self._fence
        return FenceSnapshot(fp, REGISTRY.lookup_digest(self._key, fp))

    # the fence check ----------------------------------------------------------------------------

    async def _assert_fence(self, phase: str, *, prove_racy: bool = True) -> None:
        """Did the transcript change, since this fence last saw it, in a way this
        controller does not own? Raises SessionTakeoverError when it did (docs/design.md,
        "Fence check order")."""
        if not self._fence_active:
            return
        change = self._io.observe_quiet(self._fence.fingerprint)
        await self._judge(change, phase, prove_racy=prove_racy)

    async def _judge(self, change: Change, phase: str, *, prove_racy: bool = True) -> None:
        """Accept ``change`` of the fenced file (owned, benign, metadata-only with the
        content proven) and move the fence to it, or record and raise a takeover.

        ``prove_racy=False`` (at release) leaves the whole-content proof of a racy fence to
        the next fence check, which makes it anyway: one digest per prompt window."""
        fence = self._fence
        if change.kind is ChangeKind.UNCHANGED and not prove_racy:
            # The lock was held since the last check (a release, a scope under the retained
            # lock): no claim and no journaled append can have come in, both need it. The
            # next reacquire reads the journal.
            return
        delta = self._read_journal(change, phase)
        if delta.attributed and change.kind is ChangeKind.APPENDED:
            await self._accept_journaled(change, delta, phase)
            return
        if change.kind is ChangeKind.UNCHANGED:
            if prove_racy and self._full and not fence.quiet:
                # Racy fence: the stat cannot prove the content, the digest must.
                self._prove_racy_fence(change, phase)
            return
        current = change.after
        last = REGISTRY.latest_owned_write(self._key)
        if (
            last is not None
            and last.generation > self._fence_generation
            and last.fingerprint == current
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
            self._roll_over_unowned(fence, change)
            return
        if not self._policy.accepts(classified.kind, has_merge_callback=True):
            raise self._change_takeover(change, phase, f"{classified.kind} entries are not benign")
        await self._merge_unowned(fence, change, phase, classified)

    def _roll_over_unowned(self, fence: FenceSnapshot, change: Change) -> None:
        """An accepted unowned append, no merge callback: only this fence rolls forward over
        it (no owned write is recorded)."""
        self._fence = self._roll(fence, change, need_digest=True, proven=True)
        generation = REGISTRY.trust_state(self._key, change.after)
        self._set_fence_generation(generation if generation is not None else self._fence_generation)

    async def _merge_unowned(
        self, fence: FenceSnapshot, change: Change, phase: str, classified: Classified
    ) -> None:
        """An accepted unowned append handed to the merge callback; the result is recorded
        as an owned write, so peer controllers of this process do not judge it again."""
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

    # the journal -------------------------------------------------------------------------------

    def _read_journal(self, change: Change, phase: str) -> Delta:
        """The records written since the fence last looked (one ``stat``-sized look when
        none were): a newer claim is a supersession, a journal that cannot be trusted fails
        closed (docs/journal.md, "The fence check with the journal")."""
        fenced = self._fence.fingerprint
        delta = self._journal.delta(
            fenced.size if fenced.exists else 0,
            change.after.size if change.after.exists else 0,
        )
        if delta.problem is not None:
            raise self._change_takeover(change, phase, delta.problem, "journal-invalid")
        if delta.superseded_by is not None:
            mine = self._journal.writer
            error = SessionSupersededError(
                self._session_file,
                phase,
                mine.run_id,
                mine.revision,
                delta.superseded_by[0],
                delta.superseded_by[1],
                change.before,
                change.after,
            )
            if self._takeover is None:
                self._takeover = error
            raise error
        self._journal.advance(delta)
        return delta

    async def _accept_journaled(self, change: Change, delta: Delta, phase: str) -> None:
        """An append some of whose bytes journal records announce: this run's own and
        co-tenants' appends are taken without judging their content (their digests must
        match); bytes no record covers go through the content rules as before; co-tenant
        and benign entries go to the merge callback in file order."""
        fence = self._fence
        if not self._prove_prefix(fence, change):
            raise self._change_takeover(
                change, phase, "content before the append changed (verify=full)", "rewritten"
            )
        data = self._io.suffix(change)
        if data is None:
            raise self._change_takeover(
                change, phase, "the transcript moved on while its appended bytes were read"
            )
        base = fence.fingerprint.size
        # Each record's digest is checked first. One whose bytes differ announces nothing
        # (its writer died before writing, and another writer's bytes sit there): its
        # bytes join their unattributed neighbours and are judged by content, as one run.
        pieces: list[tuple[int, int, Any]] = []
        for seg in delta.segments:
            record = seg.record
            if record is not None:
                chunk = data[seg.start - base : seg.end - base]
                if digest_bytes(chunk) != record.digest:
                    record = None
            if record is None and pieces and pieces[-1][2] is None:
                pieces[-1] = (pieces[-1][0], seg.end, None)
            else:
                pieces.append((seg.start, seg.end, record))
        entries: list[Any] = []
        published: list[PublishedEntry] = []
        kinds: set[str] = set()
        current = change.after
        for start, end, record in pieces:
            chunk = data[start - base : end - base]
            if (
                record is not None
                and record.role == CLAIMANT
                and self._journal.own_run(record.run_id)
            ):
                continue  # this run's own append (or a live in-process peer's)
            lines = split_lines(chunk, start)
            if isinstance(lines, Rejected):
                raise self._change_takeover(change, phase, _detail(lines))
            if record is not None and record.role == COTENANT:
                result = classify_lines(lines, policy=None)
            elif OWN_WRITES.covers(current.dev, current.ino, start, chunk):
                continue  # lines a SessionManager of this process wrote without a writer
            else:
                prefix = start

                def known_id(entry_id: str, _at: int = prefix) -> bool:
                    return LIVE_MANAGERS.knows_id(self._key, entry_id, _at)

                result = classify_lines(lines, policy=self._policy, known_id=known_id)
                if not isinstance(result, Rejected):
                    kinds.add(result.kind)
            if isinstance(result, Rejected):
                raise self._change_takeover(change, phase, _detail(result))
            entries.extend(result.entries)
            published.extend(result.published)
        has_merge = self._merge_cb is not None
        for kind in kinds:
            if not self._policy.accepts(kind, has_merge_callback=has_merge):
                raise self._change_takeover(change, phase, f"{kind} entries need a merge callback")
        if not entries or not has_merge:
            self._roll_over_unowned(fence, change)
            return
        kind = next(iter(kinds)) if len(kinds) == 1 else "journaled"
        await self._merge_unowned(fence, change, phase, Classified(kind, entries, published))

    def _prove_racy_fence(self, change: Change, phase: str) -> None:
        """verify="full", equal fingerprint, racy fence: prove the whole content by digest
        (one read at C speed, at most once per quiet period of the file)."""
        fence = self._fence
        if not fence.fingerprint.exists:
            return
        proven = self._io.prove_unchanged(fence)
        if proven is None:
            raise self._change_takeover(
                change,
                phase,
                "same-size rewrite with equal stat (within one timestamp granule): "
                "the content digest differs",
                "rewritten",
            )
        self._fence = proven

    def _accept_identical_content(self, change: Change, phase: str) -> None:
        """Same file, same size, times moved: accepted only when the content digest is
        unchanged, whatever the file's size (docs/design.md, "Fence check order")."""
        fence = self._fence
        if fence.digest is None:
            raise self._change_takeover(
                change, phase, "same-size change and no content digest to compare", "rewritten"
            )
        now = self._io.fresh_digest(change.after)
        if now.digest is None or now.fingerprint != change.after:
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
            if now != current:
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
        if self._full and not self._peer_bytes_proven(fence, change):
            raise self._change_takeover(
                change,
                phase,
                "the owned append's bytes differ from what its writer recorded (verify=full)",
                "rewritten",
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
        if fp != current:  # the callback itself wrote (e.g. a leaf control)
            generation = REGISTRY.record_owned_write(
                self._key, fp, merged.post_merge_published, merged.requires_reload
            )
        self._fence = merged.snapshot
        self._set_fence_generation(generation)

    def _peer_bytes_proven(self, fence: FenceSnapshot, change: Change) -> bool:
        """verify="full": the bytes another controller of this process appended are still
        what it recorded. Its owned write left the digest of the whole file in the registry;
        our proven prefix digest rolled over the suffix as it reads now must equal it. (An
        equal stat proves nothing when the write was racy: a same-tick rewrite keeps it.)"""
        if change.kind is not ChangeKind.APPENDED or fence.digest is None:
            return True
        claimed = REGISTRY.lookup_digest(self._key, change.after)
        if claimed is None:
            return True  # the writer kept no digest: the stat and tail window decide
        data = self._io.suffix(change)
        if data is None:
            return False
        rolled = fence.digest.copy()
        rolled.update(data)
        return bool(rolled.intdigest() == claimed.intdigest())

    # classification and merge -------------------------------------------------------------------

    def _classify(
        self, prev: FenceSnapshot, change: Change, expected: list[PublishedEntry] | None
    ) -> Classified | Rejected:
        """Owned mode (lines must match ``expected``) when ``expected`` is given, else
        unowned mode through the benign policy."""
        policy = None if expected is not None else self._policy
        prev_fp = prev.fingerprint
        initializing = (
            expected is not None
            and change.after.exists
            and (not prev_fp.exists or prev_fp.size == 0)
            and change.kind in (ChangeKind.CREATED, ChangeKind.APPENDED)
        )
        if not initializing and change.kind is not ChangeKind.APPENDED:
            return Rejected(f"the transcript was {REASON_BY_KIND.get(change.kind, 'changed')}")
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

        def known_id(entry_id: str) -> bool:
            # Ids in the fenced prefix, as far as an open SessionManager can tell.
            return LIVE_MANAGERS.knows_id(self._key, entry_id, prev_fp.size)

        return classify_lines(lines, policy=policy, expected=expected, known_id=known_id)

    async def _merge_change(
        self,
        prev: FenceSnapshot,
        change: Change,
        expected: list[PublishedEntry] | None,
        phase: str,
        classified: Classified | None = None,
    ) -> _Merged | Rejected:
        """Hand the appended entries to the merge callback (docs/design.md, "Merge")."""
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
        except asyncio.CancelledError:
            raise  # the caller was cancelled: nothing was decided, nothing is marked
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
            if now != change.after:
                raise self._change_takeover(
                    change, phase, "the transcript changed during the merge", "merge-rejected"
                )
            snapshot = base
        else:
            moved = self._io.observe(change.after)
            # The callback may have rewritten the file (declared by requires_reload); it
            # must report the state it left: same stat, and same tail where comparable.
            if not (reported.exists and same_state(moved.after, reported)):
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

    # write scopes and publications --------------------------------------------------------------

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
            self._scope_host,
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

    @contextlib.asynccontextmanager
    async def _physical(self, borrowed: Any | None) -> AsyncIterator[ScopeState]:
        """One physical hold: the retained lock borrowed, or a short lock of its own."""
        if self._takeover is not None:
            if borrowed is not None:
                self._hold.end_borrow()
            raise self._sticky_takeover()
        lock = borrowed
        owned = False
        if lock is None:
            await self._hold.wait_drain()
            lock = self._hold.borrow(self._takeover is None)
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
                    self._hold.end_borrow()
            finally:
                if not state.scope.completion.done():
                    state.scope.completion.set_result(None)
        finally:
            self._scope_var.reset(token)
        if self._takeover is not None:
            await self._hold.drop()
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
                if change.kind is ChangeKind.APPENDED and self._prove_prefix(
                    fence, change, owned=True
                ):
                    self._fence = self._roll(fence, change, need_digest=True, proven=True)
                elif change.kind is not ChangeKind.UNCHANGED:
                    try:
                        await self._judge(change, "fence_check")
                    except SessionTakeoverError:
                        if not failed:  # the block's own error wins (it is recorded)
                            raise

    @contextlib.asynccontextmanager
    async def _publication(self, parent: ScopeState, handle: WriteScope) -> AsyncIterator[None]:
        """A write whose result is published as owned (docs/design.md, "Publications").

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
        """Record what a publishing write scope wrote as owned, if it is a proven append
        (or the declared creation of the transcript) of exactly the declared entries
        (docs/design.md, "Publications"). Own entries are not fed to the merge callback:
        the writer already has them (a peer controller merges them at its own fence
        check)."""
        if self._takeover is not None:
            return
        change = self._io.observe(before.fingerprint)
        if change.kind is ChangeKind.UNCHANGED:
            return
        current = change.after
        trusted_before = (
            self._fence_active and self._fence.fingerprint == before.fingerprint
        ) or REGISTRY.is_trusted(self._key, before.fingerprint)
        if not trusted_before:
            return  # the next fence check judges the change as unowned
        prev_fp = before.fingerprint
        initializing = (
            expected is not None
            and current.exists
            and (not prev_fp.exists or prev_fp.size == 0)
            and change.kind in (ChangeKind.CREATED, ChangeKind.APPENDED)
        )
        if change.kind is not ChangeKind.APPENDED and not initializing:
            if self._fence_active and self._fence.fingerprint == prev_fp:
                # Nothing appended: judged like any fence check (a touch or chmod by
                # someone else passes when the content is proven unchanged).
                await self._judge(change, "fence_check")
                return
            raise self._change_takeover(change, "fence_check")
        if not self._prove_prefix(before, change, owned=True):
            raise self._change_takeover(
                change, "fence_check", "content before the owned append changed", "rewritten"
            )
        published = expected
        if expected is not None:
            classified = self._classify(before, change, expected)
            if isinstance(classified, Rejected):
                raise self._change_takeover(
                    change, "fence_check", _detail(classified), "merge-rejected"
                )
            if not same_published_entries(classified.published, expected):
                raise self._change_takeover(
                    change,
                    "fence_check",
                    "the written entries differ from the declared ones",
                    "merge-rejected",
                )
            published = list(classified.published)
        generation = REGISTRY.record_owned_write(self._key, current, published)
        snapshot = self._roll(before, change, need_digest=self._fence_active, proven=True)
        if self._fence_active:
            self._fence = snapshot
            self._set_fence_generation(generation)

    # owned writes without the lock --------------------------------------------------------------

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
            # A validated append needs the file it appends to (as in the openclaw controller).
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
            return result  # only a proven append is published (docs/design.md, "Owned writes")
        prev = reference if reference is not None else self._snapshot_for(before)
        proven = False
        if self._full:
            if not self._prove_prefix(prev, change, owned=True):
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
            if not self._prove_prefix(fence, change, owned=True):
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

    # publication helpers ------------------------------------------------------------------------

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
        if not self._prove_prefix(fence, change, owned=True):
            return False
        generation = REGISTRY.record_owned_write(self._key, change.after)
        if self._fence_active:
            self._fence = self._roll(fence, change, need_digest=True, proven=True)
            self._set_fence_generation(generation)
        return True

    def publish_validated_snapshot(self, fp: Fingerprint) -> bool:
        """Trust ``fp`` after a repair pass validated it under the retained lock."""
        if self._takeover is not None or self._hold.lock is None or self._hold.draining:
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

        ``digest`` must be the fence's content digest (a ``BlockDigest``: the one
        ``SessionManager.fence_digest()`` gives, with ``parsed_fingerprint`` and
        ``digest_size``)
        of bytes ``[0, fp.size)`` of the file as ``fp`` describes it. It is copied; it is
        used only while the file still matches ``fp``. A ``RollingDigest`` (plain XXH3-128)
        is a ``TypeError``: its value is another function of the bytes."""
        if size is not None and size != fp.size:
            raise ValueError(f"digest covers {size} bytes, the fingerprint {fp.size}")
        if not isinstance(digest, self._io.hot.BlockDigest):  # type: ignore[arg-type]
            raise TypeError(
                "seed_content_digest takes a BlockDigest (SessionManager.fence_digest()), not "
                f"{type(digest).__name__}"
            )
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

    # prompt release and reacquire ---------------------------------------------------------------

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

    async def _release_held_lock_with_fence(self) -> None:
        """Release the held lock and leave the fence on the file as it is now.

        An active fence judges what happened while the lock was held exactly as it judges
        a prompt window (docs/design.md, "Nothing is adopted"), and a lock lost while held
        is a takeover (``lock-lost``). The takeover is recorded, the lock released, and the
        error raised. Before the first release the fence is inactive: the state at release
        becomes its baseline (docs/design.md, "Attempt lifecycle")."""
        if self._hold.lock is None:
            await self._hold.wait_drain()
            return
        async with self._hold.exclusive() as idle:
            if not idle:
                self._release_deferred = True  # the scope finishes the release
                return
            lock, self._hold.lock = self._hold.lock, None
            if lock is None:
                return
            try:
                if self._fence_active:
                    self._raise_if_lock_lost(lock, "fence_check")
                    await self._judge(
                        self._io.observe_quiet(self._fence.fingerprint),
                        "fence_check",
                        prove_racy=False,
                    )
                    if not self._fence.has_digest:
                        self._fence = self._io.fresh_digest(self._fence.fingerprint)
                    self._journal.publish_slot()
                    return
                change = self._io.observe_quiet(self._fence.fingerprint)
                fp = change.after
                last = REGISTRY.latest_owned_write(self._key)
                trusted_generation = REGISTRY.trust_state(self._key, fp)
                self._fence = self._roll(self._fence, change, need_digest=True)
                if last is not None and last.fingerprint == fp:
                    generation = last.generation
                elif trusted_generation is not None:
                    generation = trusted_generation
                else:
                    generation = self._fence_generation
                self._activate_fence(generation)
                # The fence starts here: the records of the held period (own appends) are
                # behind it; compaction keeps what comes after.
                size = fp.size if fp.exists else 0
                start = self._journal.delta(size, size)
                if start.problem is None and start.superseded_by is None:
                    self._journal.advance(start)
                self._journal.publish_slot()
            finally:
                await release_lock(lock)

    async def reacquire_after_prompt(self) -> None:
        """Take the lock back and check the fence (phase ``prompt_reacquire``)."""
        if self._cleanup_started:
            return
        async with self._lifecycle:
            await self._hold.wait_drain()
            if self._disposed or self._takeover is not None or self._hold.lock is not None:
                return
            lock = await self._acquire("prompt_reacquire")
            if self._disposed:
                await release_lock(lock)
                return
            self._hold.lock = lock
            try:
                await self._assert_fence("prompt_reacquire")
            except BaseException:
                if self._hold.lock is lock:
                    self._hold.lock = None
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

    # cleanup and disposal -----------------------------------------------------------------------

    async def acquire_for_cleanup(self) -> CleanupLock | NoopCleanupLock:
        """The lock for end-of-attempt cleanup after a fence check (phase ``cleanup``);
        a no-op lock after a takeover. The caller owns and releases it."""
        self._cleanup_started = True
        async with self._lifecycle:
            if self._takeover is not None:
                return NoopCleanupLock()
            lock = await self._hold.take()
            if lock is None:
                await self._hold.wait_drain()
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
            await self._hold.drop()
        finally:
            self._deactivate_fence()
            self._journal.retire()
            self._io.close()  # a later call (cleanup after dispose) reopens it

    def __repr__(self) -> str:
        state = "taken over" if self._takeover else "active" if self._fence_active else "inactive"
        return f"<SessionFenceController {self._session_file!r} fence={state}>"
