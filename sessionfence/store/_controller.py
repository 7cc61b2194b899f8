"""``StoreFenceController``: the fence controller of a PostgreSQL session.

``SessionFenceController.create(session_id, store=PostgresStore(...))`` returns one. It has
the agent loop's side of the file controller (``FenceController``: write scopes, prompt
release and reacquire, run id, revision, writer, takeover, dispose) with the same semantics
and errors, on top of the store's fence (``_fence.PostgresFence``), which judges lines as
the file controller judges journaled appends:

- create claims the session (creating it with a header when it does not exist yet);
- there is no lock: every append of this run's writer commits only while its claim is the
  one in force (checked in the append's transaction), and co-tenants append at any time;
- ``release_for_prompt`` checks what was written since the last check (a takeover or a
  supersession is raised before a model call starts, as the file controller does), and
  ``reacquire_after_prompt`` checks again; a write scope opened during a prompt window
  checks first, as the file controller's short lock does;
- accepted foreign lines (co-tenants', benign ones) go to ``merge_foreign_entries``;
  ``reload_session_file`` is called when the merge asks for it (``requires_reload``).

Differences from files, all because there is no lock: the fence is active from create (a
foreign line written before the first release is judged, where a file fence takes the state
at its first release as its baseline), and another host can claim while this run holds the
session (``release_for_prompt`` then raises ``SessionSupersededError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

from .._callbacks import MergeCallback, MergeResult, ReloadCallback, call_maybe_async
from ..controller._classify import BenignPolicy
from ..errors import SessionTakeoverError
from ..journal._writer import SessionWriter
from ._fence import PostgresFence
from ._postgres import AsyncPostgresStore, PostgresStore, default_header, session_label

__all__ = ["StoreFenceController"]

T = TypeVar("T")


class StoreFenceController:
    """One attempt's fence on one session of a PostgreSQL store (see the module doc).
    Make it with ``await SessionFenceController.create(session_id, store=store)``."""

    def __init__(self, fence: PostgresFence, _token: object = None) -> None:
        if _token is not _CREATE:
            raise TypeError("use 'await SessionFenceController.create(id, store=...)'")
        self._fence = fence
        self._held = True
        self._disposed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._in_scope: ContextVar[bool] = ContextVar("sessionfence_store_scope", default=False)
        self._scopes = 0  # write scopes running now
        # release_for_prompt / _for_abort called inside a scope: None, "prompt" or "abort"
        self._release_deferred: str | None = None

    @classmethod
    async def create(
        cls,
        session_id: str,
        store: PostgresStore | AsyncPostgresStore,
        *,
        merge_foreign_entries: MergeCallback | None = None,
        reload_session_file: ReloadCallback | None = None,
        benign_policy: BenignPolicy | None = None,
        run_id: str | None = None,
    ) -> StoreFenceController:
        if isinstance(store, AsyncPostgresStore):
            conn, owns = store, False
        elif isinstance(store, PostgresStore):
            conn, owns = store.async_twin(), True
        else:
            raise TypeError(f"not a PostgreSQL store: {type(store).__name__}")
        merge = _merge_fn(merge_foreign_entries, reload_session_file)

        async def claim() -> PostgresFence:
            return await PostgresFence.open(
                conn,
                session_id,
                run_id=run_id,
                benign_policy=benign_policy,
                merge_foreign_entries=merge,
                owns_store=owns,
            )

        try:
            try:
                fence = await claim()
            except KeyError:
                # No such session yet: as a controller of a missing transcript file, claim
                # it anyway, creating it with its header line (whoever creates it first).
                header = default_header()
                header["cwd"] = os.getcwd()
                with contextlib.suppress(FileExistsError):
                    await conn.create_session(session_id, header)
                fence = await claim()
        except BaseException:
            if owns:
                await conn.aclose()
            raise
        return cls(fence, _CREATE)

    # state --------------------------------------------------------------------------------

    @property
    def session_file(self) -> str:
        return session_label(self._fence.session_id)

    @property
    def session_id(self) -> str:
        return self._fence.session_id

    @property
    def has_takeover(self) -> bool:
        return self._fence.takeover is not None

    @property
    def takeover(self) -> SessionTakeoverError | None:
        return self._fence.takeover

    @property
    def fence_active(self) -> bool:
        return not self._disposed

    @property
    def holds_lock(self) -> bool:
        return self._held and not self._disposed

    @property
    def run_id(self) -> str:
        return self._fence.run_id

    @property
    def revision(self) -> int:
        return self._fence.revision

    @property
    def writer(self) -> SessionWriter:
        return self._fence.writer

    @property
    def last_seq(self) -> int:
        """The last line of the session the fence has judged."""
        return self._fence.last_seq

    @property
    def lines_read(self) -> int:
        """Lines the fence checks read so far (O(new lines): tests and benchmarks)."""
        return self._fence.lines_read

    # write scopes ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def write_lock(self) -> AsyncIterator[None]:
        """``async with ctl.write_lock(): ...``: the block's appends (through a manager
        with ``writer=ctl.writer``) commit only while this run's claim is in force. Inside
        a prompt window the fence is checked first. A ``release_for_prompt`` made inside
        the block is carried out when the last running block ends, as on files."""
        if self._fence.takeover is not None:
            raise self._fence.takeover
        if not self._held and not self._disposed:
            await self._fence.check("fence_check")
        token = self._in_scope.set(True)
        self._scopes += 1
        try:
            yield
        finally:
            self._scopes -= 1
            self._in_scope.reset(token)
            deferred, self._release_deferred = self._release_deferred, None
            if self._scopes == 0 and deferred == "abort":
                with contextlib.suppress(SessionTakeoverError):
                    await self._release()
            elif self._scopes == 0 and deferred == "prompt":
                await self._release()
            else:
                self._release_deferred = deferred

    def with_write_lock(self, fn: Callable[[], Awaitable[T]] | Callable[[], T]) -> asyncio.Task[T]:
        """Run ``fn`` (sync or async) in a write scope; await the returned task."""

        async def run() -> T:
            async with self.write_lock():
                value: T = await call_maybe_async(fn)
            return value

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # prompt release and reacquire -----------------------------------------------------------

    async def release_for_prompt(self) -> None:
        """Check what was written since the last check, then leave the session to others
        for the model call; a takeover or supersession is raised before the call starts.
        Called from inside a write scope, it is carried out when the scope ends."""
        if self._disposed or not self._held:
            return
        await self._release_or_defer("prompt")

    async def _release_or_defer(self, how: str) -> None:
        if self._disposed or not self._held:
            return
        if self._in_scope.get():
            if self._release_deferred != "prompt":  # a prompt release wins over an abort
                self._release_deferred = how
            return
        await self._drain()
        await self._release()

    async def _release(self) -> None:
        if self._disposed or not self._held:
            return
        self._held = False
        await self._fence.check("fence_check")

    async def release_for_abort(self) -> None:
        """``release_for_prompt``, recording a takeover instead of raising it (also when it
        is carried out at the end of a scope)."""
        with contextlib.suppress(SessionTakeoverError):
            await self._release_or_defer("abort")

    async def reacquire_after_prompt(self) -> None:
        """The fence check after the prompt window (phase ``prompt_reacquire``)."""
        if self._disposed or self._fence.takeover is not None or self._held:
            return
        await self._fence.check("prompt_reacquire")
        self._held = True

    @contextlib.asynccontextmanager
    async def prompt_released(self) -> AsyncIterator[None]:
        await self.release_for_prompt()
        try:
            yield
        finally:
            await self.reacquire_after_prompt()

    async def _drain(self) -> None:
        me = asyncio.current_task()
        pending = [t for t in self._tasks if not t.done() and t is not me]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def dispose(self) -> None:
        """Retire the fence (and close its connection when the controller opened it).
        Idempotent."""
        if self._disposed:
            return
        self._disposed = True
        self._held = False
        try:
            if not self._in_scope.get():
                await self._drain()
        finally:
            await self._fence.dispose()

    def __repr__(self) -> str:
        state = "taken over" if self.has_takeover else "disposed" if self._disposed else "active"
        return f"<StoreFenceController {self.session_file!r} run={self.run_id!r} fence={state}>"


_CREATE = object()


def _merge_fn(
    merge: MergeCallback | None, reload: ReloadCallback | None
) -> Callable[[list[Any]], Awaitable[None]] | None:
    """The store fence's merge callback, as the file controller uses the two: accepted
    foreign entries go to ``merge`` (none: they are accepted as far as the policy takes
    lines without a merge callback, and nobody is told); ``reload`` is called when the
    merge says the session must be read again (``MergeResult.requires_reload``)."""
    if merge is None:
        return None

    async def run(entries: list[Any]) -> None:
        result = await call_maybe_async(merge, entries)
        if isinstance(result, MergeResult) and result.requires_reload and reload is not None:
            await call_maybe_async(reload)

    return run
