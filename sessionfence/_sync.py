"""The fence controller for code that does not use asyncio: ``SyncSessionFenceController``.

Many agent frameworks are synchronous. ``SyncSessionFenceController`` gives them the whole
``SessionFenceController`` API as blocking calls::

    from sessionfence import SessionManager, SessionTakeoverError
    from sessionfence.sync import SyncSessionFenceController

    with SyncSessionFenceController.create("session.jsonl") as ctl:  # takes the write lock
        manager = SessionManager.open("session.jsonl")
        try:
            with ctl.prompt_released():  # lock released while the model runs
                reply = call_model(manager.branch())
            ctl.with_write_lock(lambda: manager.append_message(reply))
        except SessionTakeoverError as exc:  # someone else changed the transcript
            print(exc.reason)
    # leaving the block disposed the controller (released the lock)

How it works
------------
The facade drives an ordinary ``SessionFenceController`` on a private event loop running in
a daemon thread (``sessionfence-sync-loop``). Each blocking method submits the controller's
coroutine to that loop with ``asyncio.run_coroutine_threadsafe`` and waits for it; the
result, or the exception (``SessionTakeoverError``, a lock error, your callback's own
error: the very object, with its type and fields), comes back to the calling thread.

**One loop for the whole process, not one per facade.** The controller keeps process-wide
state (the trust registry, the owned-write history and its generation counter, the content
digest cache, the record of bytes this process appended) as plain Python objects made for
one event loop. With a loop per facade, two facades would mutate that state from two
threads at once (and truly in parallel on free-threaded CPython). With one loop every
facade's controller runs on one thread, which is exactly how several controllers share a
process in an asyncio program, the configuration the controller is specified and tested
in (peers merging each other's publications, trust carried from one attempt to the next).
It also costs one thread whatever the number of facades. Waiting never blocks that loop:
lock acquisitions poll with ``asyncio.sleep``, so a facade waiting for a contended lock
does not delay the others. The loop starts with the first facade of the process and stops
(its thread is joined) when the last one is disposed; a call made after ``dispose()``
starts it again for the length of the call.

The price: code of yours that runs *on* the loop thread delays every facade while it runs.
That is the merge and reload callbacks, the ``resolve_published_entries*`` resolvers, an
injected ``acquire``, and ``owned_file_write``'s ``run`` and ``validate_append`` (the
controller's synchronous helpers run on the loop too, so that only one thread ever touches
a controller). Keep them short. Plain functions are the norm there; coroutine functions
are accepted and run on the private loop.

**Where the write runs.** ``with_write_lock(fn)`` and the body of ``with ctl.write_lock():``
run on *your* thread: the facade opens the controller's write scope on the loop, keeps it
open while your code runs, and closes it with your code's outcome (its return value for
the resolvers, or its exception, which wins over a takeover as in the async controller).
So a slow ``fn`` stalls no other facade, and ``fn`` may call back into the facade: a call
made by the thread that opened a write block runs *inside* that block, as a coroutine
started inside an async scope does. A nested ``with_write_lock`` reuses the held lock, a
nested publication adds its entries to the enclosing one, ``release_for_prompt()`` is
deferred to the end of the scope, and ``refresh_after_owned_write`` (what
``guard_session_manager(manager, on_message_persisted=ctl.refresh_after_owned_write)``
calls) moves the fence over a line the manager wrote. Calls of other threads are not
inside your block (a thread you start from ``fn`` included): they are independent calls.

**Threads.** A facade may be shared between threads. Its blocking operations (write
blocks, ``release_for_prompt``, ``release_for_abort``, ``reacquire_after_prompt``,
``acquire_for_cleanup``, ``dispose``) take turns: a thread waits until another thread's
operation or write block has finished, then runs its own, so write blocks of one facade
never overlap (as synchronous functions handed to the async controller never do), and a
write never times out waiting for a lock its own facade holds. The thread that holds the
turn may call in again (nested calls). Consequently a write block must not wait for
another thread that is itself waiting to use the same facade: that is a deadlock. The
synchronous helpers (``refresh_after_owned_write``, ``owned_file_write``,
``trusted_snapshot``, ...) take no turn; the loop runs them one at a time. Properties
(``takeover``, ``has_takeover``, ``session_file``, ...) are read directly, from any thread,
also after ``dispose()``.

**From inside asyncio.** A blocking call made from a coroutine of another event loop works:
it blocks that loop's thread until the call returns (use ``SessionFenceController``
directly to avoid that). A blocking call made on the facade's own loop thread (from a merge
or reload callback, a resolver, ``owned_file_write``'s ``run``) would wait for itself; it
raises ``RuntimeError`` instead. The synchronous helpers and the properties may be called
from there; they run inline.

**Interrupts.** A ``KeyboardInterrupt`` (or any exception) raised in your thread while it
waits cancels the controller operation it waits for, as cancelling the task would in
asyncio; a write block that was already open is closed with that exception as the block's
outcome.

**fork().** A facade is not fork-safe: its loop thread does not exist in a child process.
Using a facade created before ``fork()`` in the child raises ``RuntimeError``; create new
facades in the child (the child starts a fresh loop). Prefer ``spawn`` or ``forkserver``.

Always ``dispose()`` a facade (or use it as a context manager): an undisposed facade keeps
the lock until its max hold and keeps the loop thread alive.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from ._callbacks import MergeCallback, ReloadCallback, Resolver
from .controller import (
    BenignPolicy,
    CleanupLock,
    NoopCleanupLock,
    SessionFenceController,
    WriteScope,
)
from .controller._controller import Verify
from .errors import SessionTakeoverError
from .journal import SessionWriter

if TYPE_CHECKING:
    from typing_extensions import Self

    from ._types import Fingerprint

__all__ = ["SyncCleanupLock", "SyncSessionFenceController", "SyncWriteScope"]

T = TypeVar("T")
P = ParamSpec("P")


LOOP_THREAD_NAME = "sessionfence-sync-loop"

_CREATE = object()


# -- the process's private event loop ----------------------------------------------------------


class _LoopHost:
    """The one private event loop of the process, run by a daemon thread while in use.

    ``acquire()`` starts it if needed and counts a user; ``release()`` uncounts one and,
    for the last, stops the loop and joins its thread (outside the host lock, so a loop
    stopping never blocks a facade being created: that one starts a fresh loop)."""

    def __init__(self) -> None:
        self._init()

    def _init(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self._users = 0

    def acquire(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                stop = threading.Event()
                thread = threading.Thread(
                    target=_run_loop, args=(loop, stop), name=LOOP_THREAD_NAME, daemon=True
                )
                thread.start()
                self._loop, self._thread, self._stop = loop, thread, stop
            self._users += 1
            return self._loop

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._loop is None:
                return
            loop, thread, stop = self._loop, self._thread, self._stop
            self._loop = self._thread = self._stop = None
        if stop is not None:
            stop.set()
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def after_fork_in_child(self) -> None:
        # The loop thread did not survive fork() and the host lock may be held by a
        # thread that no longer exists: start from nothing (facades of the parent refuse).
        self._init()

    @property
    def users(self) -> int:
        return self._users


_LOCAL = threading.local()  # .loop_thread is True on a loop thread of ours


def _run_loop(loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
    _LOCAL.loop_thread = True
    asyncio.set_event_loop(loop)
    try:
        while True:
            # asyncio lets a task's KeyboardInterrupt or SystemExit escape the loop (a
            # callback of yours called sys.exit()); the caller waiting on that task has it
            # already. Keep serving the other facades until told to stop.
            with contextlib.suppress(BaseException):
                loop.run_forever()
            if stop.is_set():
                break
    finally:
        try:
            # Nothing should be left (every facade is disposed); cancel what is.
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


_HOST = _LoopHost()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HOST.after_fork_in_child)


def _on_loop_thread() -> bool:
    return getattr(_LOCAL, "loop_thread", False)


def _refuse_on_loop_thread(what: str) -> None:
    if _on_loop_thread():
        raise RuntimeError(
            f"SyncSessionFenceController.{what}() called on the facade's own event-loop "
            "thread (from a merge or reload callback, a resolver, an injected acquire or "
            "owned_file_write's run): it would wait for itself. Call it after the "
            "facade call that ran your callback returns; only the synchronous helpers "
            "(refresh_after_owned_write, owned_file_write, trusted_snapshot, ...) and the "
            "properties may be used from there."
        )


def _wait(future: concurrent.futures.Future[T]) -> T:
    """Block for ``future``; if the wait itself is interrupted (KeyboardInterrupt, ...),
    cancel the operation it waits for before propagating."""
    try:
        return future.result()
    except BaseException:
        future.cancel()  # a no-op when it is done (also when it failed by itself)
        raise


class _Handoff(Generic[T]):
    """Hands a resource made on the loop (a controller holding the lock, an open write
    scope) to a caller that may stop waiting for it: exactly one side ends up owning it.

    Cancelling the caller's future is not enough: an operation that completes just as the
    caller gives up has its result dropped by ``run_coroutine_threadsafe``, and a lock or
    an open scope would be left behind with nobody to release it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._value: T | None = None

    def offer(self, value: T) -> bool:
        """Loop side: False when the caller gave up (the loop side must undo ``value``)."""
        with self._lock:
            if self._abandoned:
                return False
            self._value = value
            return True

    def abandon(self) -> T | None:
        """Caller side: give up; returns the value if it was offered (the caller must undo
        it), else None (the loop side will, if it ever makes it)."""
        with self._lock:
            self._abandoned = True
            value, self._value = self._value, None
            return value


async def _in_context(
    context: contextvars.Context | None, factory: Callable[[], Awaitable[T]]
) -> T:
    """Run ``factory()`` to completion; inside ``context`` (a copy of an open write block's
    context, so the controller sees the call as made inside that scope) when given."""
    if context is None:
        return await factory()

    def start() -> asyncio.Future[T]:
        return asyncio.ensure_future(factory())

    return await context.run(start)


# -- write blocks ------------------------------------------------------------------------------


class _BlockInterrupted(Exception):
    """Stands in, on the loop, for a write block's KeyboardInterrupt, SystemExit or other
    non-``Exception`` error: asyncio would let those escape the event loop itself. The
    scope sees an ordinary failure; the caller re-raises the original."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(repr(original))
        self.original = original


def _for_loop(error: BaseException | None) -> BaseException | None:
    if error is None or isinstance(error, (Exception, asyncio.CancelledError)):
        return error
    return _BlockInterrupted(error)


class _OpenBlock:
    """The loop-side handle of an open write block: the task that holds the scope open,
    the future that lets it leave, and a copy of the scope's context."""

    def __init__(
        self,
        holder: asyncio.Task[bool],
        leave: asyncio.Future[tuple[Any, BaseException | None]],
        context: contextvars.Context,
    ) -> None:
        self.holder = holder
        self.leave = leave
        self.context = context


async def _hold(
    scope: WriteScope,
    entered: asyncio.Future[contextvars.Context],
    leave: asyncio.Future[tuple[Any, BaseException | None]],
) -> bool:
    """Enter ``scope``, report the entered context, wait for the block's outcome, exit.

    One task from entry to exit: the scope's context variable is set and reset in the same
    context, as ``async with`` would. Returns whether the scope suppressed the error."""
    try:
        await scope.__aenter__()
    except asyncio.CancelledError:
        if not entered.done():
            entered.cancel()
        raise
    except BaseException as exc:
        if not entered.done():
            entered.set_exception(exc)
        return False
    entered.set_result(contextvars.copy_context())
    try:
        value, error = await leave
    except asyncio.CancelledError as cancelled:  # the caller gave up before its block ran
        value, error = None, cancelled
    scope.result = value
    if error is None:
        await scope.__aexit__(None, None, None)
        return False
    return bool(await scope.__aexit__(type(error), error, error.__traceback__))


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: an abandoned block's exit error is not logged


async def _open_block(scope: WriteScope, handoff: _Handoff[_OpenBlock]) -> _OpenBlock:
    loop = asyncio.get_running_loop()
    entered: asyncio.Future[contextvars.Context] = loop.create_future()
    leave: asyncio.Future[tuple[Any, BaseException | None]] = loop.create_future()
    holder = loop.create_task(_hold(scope, entered, leave))  # inherits this context
    try:
        context = await asyncio.shield(entered)
    except asyncio.CancelledError:
        # The caller stopped waiting: the scope is abandoned, entered or not.
        holder.add_done_callback(_retrieve)
        holder.cancel()
        raise
    except BaseException:
        await holder  # returned False after a failed entry
        raise
    block = _OpenBlock(holder, leave, context)
    if not handoff.offer(block):  # entered just as the caller gave up: leave at once
        holder.add_done_callback(_retrieve)
        leave.set_result((None, asyncio.CancelledError()))
        raise asyncio.CancelledError
    return block


async def _close_block(block: _OpenBlock, value: Any, error: BaseException | None) -> bool:
    if not block.leave.done():
        block.leave.set_result((value, error))
    # Shielded: a caller interrupted while waiting must not cancel the scope's exit.
    return await asyncio.shield(block.holder)


class SyncWriteScope:
    """One use of the write lock from synchronous code: ``with ctl.write_lock() as scope:``.

    The block runs on your thread under the write lock, after a fence check (see the module
    documentation). Set ``result`` inside the block to hand a value to
    ``resolve_published_entries``, as with the async ``WriteScope``."""

    def __init__(
        self,
        facade: SyncSessionFenceController,
        publish_owned_write: bool,
        resolve_published_entries: Resolver | None,
        resolve_published_entries_after_failure: Resolver | None,
    ) -> None:
        self.result: Any = None
        self._facade = facade
        self._options: dict[str, Any] = {
            "publish_owned_write": publish_owned_write,
            "resolve_published_entries": resolve_published_entries,
            "resolve_published_entries_after_failure": resolve_published_entries_after_failure,
        }
        self._block: _OpenBlock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> SyncWriteScope:
        if self._block is not None:
            raise RuntimeError("this write scope is already open; call write_lock() again")
        facade = self._facade
        facade._check_process()
        _refuse_on_loop_thread("write_lock")
        ctl = facade._ctl
        options = self._options
        stack = facade._blocks()
        context = stack[-1].context if stack else None

        handoff: _Handoff[_OpenBlock] = _Handoff()

        def open_scope() -> Awaitable[_OpenBlock]:
            return _open_block(ctl.write_lock(**options), handoff)

        facade._turn.acquire()  # reentrant: a nested block's thread holds it already
        try:
            loop = _HOST.acquire()
            try:
                future = asyncio.run_coroutine_threadsafe(_in_context(context, open_scope), loop)
                try:
                    block = _wait(future)
                except BaseException as exc:
                    orphan = handoff.abandon()
                    if orphan is not None:  # interrupted as it opened: close it with that
                        with contextlib.suppress(BaseException):
                            _wait(
                                asyncio.run_coroutine_threadsafe(
                                    _close_block(orphan, None, _for_loop(exc)), loop
                                )
                            )
                    raise
            except BaseException:
                _HOST.release()
                raise
        except BaseException:
            facade._turn.release()
            raise
        self._block, self._loop = block, loop
        stack.append(block)
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool:
        block, loop = self._block, self._loop
        if block is None or loop is None:
            return False
        self._block = self._loop = None
        facade = self._facade
        stack = facade._blocks()
        if block in stack:
            stack.remove(block)
        error = _for_loop(e)
        try:
            future = asyncio.run_coroutine_threadsafe(_close_block(block, self.result, error), loop)
            try:
                return _wait(future)
            except BaseException as exc:
                if exc is error and e is not None:
                    # The block's own error: let `with` re-raise it as it was.
                    e.with_traceback(tb)
                    return False
                raise
        finally:
            _HOST.release()
            facade._turn.release()


# -- the cleanup lock --------------------------------------------------------------------------


class SyncCleanupLock:
    """The lock ``acquire_for_cleanup()`` hands out; ``release()`` is synchronous and
    idempotent, and may be called from any thread (also after ``dispose()``). After a
    takeover it holds nothing (``held`` is False) and ``release()`` does nothing."""

    def __init__(
        self, facade: SyncSessionFenceController, lock: CleanupLock | NoopCleanupLock
    ) -> None:
        self._facade = facade
        self._lock: CleanupLock | NoopCleanupLock | None = lock
        self._release_lock = threading.Lock()
        self.held = isinstance(lock, CleanupLock)

    def release(self) -> None:
        """Release the lock; when this returns, it is released. An injected lock whose
        release is a coroutine is awaited on the facade's loop."""
        with self._release_lock:
            lock, self._lock = self._lock, None
            self.held = False
        if lock is None:
            return
        if _on_loop_thread():
            lock.release()
            return
        self._facade._submit(lock.arelease)

    def __enter__(self) -> SyncCleanupLock:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<SyncCleanupLock held={self.held}>"


# -- the facade --------------------------------------------------------------------------------


class SyncSessionFenceController:
    """``SessionFenceController`` for synchronous code; create with ``create(...)``.

    Every method blocks until the controller's operation is done and raises what it raised.
    Dispose it (``dispose()``, ``close()`` or leaving a ``with`` block) when the attempt
    ends. See the module documentation for the threads involved and the rules for
    callbacks."""

    def __init__(self, controller: SessionFenceController, _token: object = None) -> None:
        if _token is not _CREATE:
            raise TypeError("use 'SyncSessionFenceController.create(...)'")
        self._ctl = controller
        self._pid = os.getpid()
        self._turn = threading.RLock()
        self._local = threading.local()
        self._state_lock = threading.Lock()
        self._holds_loop = True  # the loop use taken by create(), given back by dispose()
        self._disposed = False

    # construction --------------------------------------------------------------------------

    @classmethod
    def create(
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
        window: int | None = None,
        benign_policy: BenignPolicy | None = None,
        run_id: str | None = None,
        journal: bool = True,
    ) -> SyncSessionFenceController:
        """Build a controller and take the write lock; returns once the lock is held.

        The options are ``SessionFenceController.create``'s (``window=None`` means its
        default, 4 KiB). Lock errors (``SessionWriteLockTimeoutError``,
        ``SessionWriteLockStaleError``) propagate as themselves. ``merge_foreign_entries``
        and ``reload_session_file`` may be plain functions; they run on the facade's loop
        thread while the call that triggered them waits."""
        _refuse_on_loop_thread("create")
        options: dict[str, Any] = {
            "timeout": timeout,
            "stale": stale,
            "max_hold": max_hold,
            "acquire": acquire,
            "merge_foreign_entries": merge_foreign_entries,
            "reload_session_file": reload_session_file,
            "verify": verify,
            "benign_policy": benign_policy,
            "run_id": run_id,
            "journal": journal,
        }
        if window is not None:
            options["window"] = window
        handoff: _Handoff[SessionFenceController] = _Handoff()

        async def make() -> SessionFenceController:
            controller = await SessionFenceController.create(session_file, store=None, **options)
            if not handoff.offer(controller):  # the caller gave up: give the lock back
                await controller.dispose()
                raise asyncio.CancelledError
            return controller

        loop = _HOST.acquire()
        try:
            controller = _wait(asyncio.run_coroutine_threadsafe(make(), loop))
        except BaseException:
            orphan = handoff.abandon()
            if orphan is not None:  # interrupted just as the lock was taken: give it back
                with contextlib.suppress(BaseException):
                    _wait(asyncio.run_coroutine_threadsafe(orphan.dispose(), loop))
            _HOST.release()
            raise
        return cls(controller, _CREATE)

    # plumbing ------------------------------------------------------------------------------

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(
                "this SyncSessionFenceController was created in process "
                f"{self._pid} and cannot be used after fork(): its event-loop thread does "
                "not exist here. Create a new one in this process."
            )

    def _blocks(self) -> list[_OpenBlock]:
        """The write blocks this thread has open on this facade, innermost last."""
        stack: list[_OpenBlock] | None = getattr(self._local, "blocks", None)
        if stack is None:
            stack = self._local.blocks = []
        return stack

    def _submit(self, factory: Callable[[], Awaitable[T]]) -> T:
        """Run ``factory()`` on the loop (inside this thread's innermost open write block,
        if any) and wait for its outcome."""
        self._check_process()
        loop = _HOST.acquire()
        try:
            stack = self._blocks()
            context = stack[-1].context if stack else None
            return _wait(asyncio.run_coroutine_threadsafe(_in_context(context, factory), loop))
        finally:
            _HOST.release()

    def _blocking(self, what: str, factory: Callable[[], Awaitable[T]]) -> T:
        """A blocking operation: refused on the loop thread, run in this facade's turn."""
        self._check_process()
        _refuse_on_loop_thread(what)
        with self._turn:
            return self._submit(factory)

    def _helper(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A synchronous controller helper: inline on the loop thread, else run there."""
        self._check_process()
        if _on_loop_thread():
            return fn(*args, **kwargs)

        async def call() -> T:
            return fn(*args, **kwargs)

        return self._submit(call)

    # prompt release and reacquire ----------------------------------------------------------

    def release_for_prompt(self) -> None:
        """Release the held lock for the model call; the fence remembers the file. Raises
        ``SessionTakeoverError`` (after releasing) if the transcript was changed by
        someone else while the lock was held."""
        self._blocking("release_for_prompt", self._ctl.release_for_prompt)

    def release_for_abort(self) -> None:
        """``release_for_prompt`` that records a takeover (``takeover``) instead of raising."""
        self._blocking("release_for_abort", self._ctl.release_for_abort)

    def reacquire_after_prompt(self) -> None:
        """Take the lock back and check the fence: ``SessionTakeoverError`` when someone
        else changed the transcript meanwhile; a lock error (and ``takeover`` set with
        reason ``lock-timeout`` or ``lock-stale``) when the lock cannot be taken."""
        self._blocking("reacquire_after_prompt", self._ctl.reacquire_after_prompt)

    @contextlib.contextmanager
    def prompt_released(self) -> Iterator[None]:
        """``with ctl.prompt_released(): reply = call_model(...)``: release on entry,
        reacquire on exit (a reacquire error, e.g. the takeover, replaces the block's
        outcome, so put the ``try`` around the whole ``with``)."""
        self.release_for_prompt()
        try:
            yield
        finally:
            self.reacquire_after_prompt()

    # writes --------------------------------------------------------------------------------

    def write_lock(
        self,
        *,
        publish_owned_write: bool = False,
        resolve_published_entries: Resolver | None = None,
        resolve_published_entries_after_failure: Resolver | None = None,
    ) -> SyncWriteScope:
        """``with ctl.write_lock() as scope: ...``: the block runs on this thread under the
        write lock (the retained one when held, else a short one), after a fence check;
        afterwards the fence moves over what it appended (or it publishes it, with
        ``publish_owned_write=True``). Raises ``SessionTakeoverError`` on entry or exit
        when the fence trips; an exception of the block itself wins over a takeover."""
        return SyncWriteScope(
            self,
            publish_owned_write,
            resolve_published_entries,
            resolve_published_entries_after_failure,
        )

    def with_write_lock(
        self,
        fn: Callable[[], T],
        *,
        publish_owned_write: bool = False,
        resolve_published_entries: Resolver | None = None,
        resolve_published_entries_after_failure: Resolver | None = None,
    ) -> T:
        """Run the plain function ``fn`` on this thread under the write lock and return its
        result (see ``write_lock``). ``fn`` may call back into this facade: its calls run
        inside the write (a nested ``with_write_lock`` reuses the lock)."""
        if inspect.iscoroutinefunction(fn):
            raise TypeError(
                "SyncSessionFenceController.with_write_lock takes a plain function; "
                "await SessionFenceController.with_write_lock for a coroutine function"
            )
        with self.write_lock(
            publish_owned_write=publish_owned_write,
            resolve_published_entries=resolve_published_entries,
            resolve_published_entries_after_failure=resolve_published_entries_after_failure,
        ) as scope:
            value = fn()
            if inspect.isawaitable(value):
                if inspect.iscoroutine(value):
                    value.close()  # never awaited, on purpose: no warning
                raise TypeError(
                    "the function given to SyncSessionFenceController.with_write_lock "
                    "returned an awaitable; pass a plain function"
                )
            scope.result = value
        return value

    def owned_file_write(
        self,
        run: Callable[[], T],
        validate_append: Callable[[T, str], bool] | None = None,
    ) -> T:
        """Run ``run()`` (an append made without the lock, e.g. a compaction) and publish
        it as owned when proven ours (``SessionFenceController.owned_file_write``). ``run``
        and ``validate_append`` run on the facade's loop thread."""
        return self._helper(self._ctl.owned_file_write, run, validate_append)

    def refresh_after_owned_write(self, written: bytes | None = None) -> None:
        """This process appended to the transcript: move the fence over it (only exactly
        own bytes; see ``SessionFenceController.refresh_after_owned_write``). Wire it to
        ``guard_session_manager(manager, on_message_persisted=ctl.refresh_after_owned_write)``."""
        self._helper(self._ctl.refresh_after_owned_write, written)

    # synchronous helpers -------------------------------------------------------------------

    def can_advance_entry_cache(self, fp: Fingerprint) -> bool:
        """May a transcript cache reuse a parse made at exactly ``fp``? (Inside a write.)"""
        return self._helper(self._ctl.can_advance_entry_cache, fp)

    def publish_owned_snapshot(self, fp: Fingerprint) -> bool:
        """Record ``fp`` (appended inside this write block) as owned."""
        return self._helper(self._ctl.publish_owned_snapshot, fp)

    def publish_validated_snapshot(self, fp: Fingerprint) -> bool:
        """Trust ``fp`` after a repair pass validated it under the retained lock."""
        return self._helper(self._ctl.publish_validated_snapshot, fp)

    def seed_content_digest(self, fp: Fingerprint, digest: Any, size: int | None = None) -> None:
        """Hand over a content digest computed while the transcript was read anyway."""
        self._helper(self._ctl.seed_content_digest, fp, digest, size)

    def trusted_snapshot(self) -> Fingerprint | None:
        """The current fingerprint when this process trusts it, else None."""
        return self._helper(self._ctl.trusted_snapshot)

    # cleanup and disposal ------------------------------------------------------------------

    def acquire_for_cleanup(self) -> SyncCleanupLock:
        """The lock for end-of-attempt cleanup, after a fence check; it holds nothing
        (``held`` False) after a takeover. Release it with ``release()`` or a ``with``."""
        lock = self._blocking("acquire_for_cleanup", self._ctl.acquire_for_cleanup)
        return SyncCleanupLock(self, lock)

    def dispose(self) -> None:
        """Release the held lock and retire the fence; stops the private loop when this
        was the last facade of the process. Idempotent."""
        self._check_process()
        _refuse_on_loop_thread("dispose")
        with self._turn:
            if self._disposed:
                return
            try:
                self._submit(self._ctl.dispose)
            finally:
                with self._state_lock:
                    self._disposed = True
                    holds, self._holds_loop = self._holds_loop, False
                if holds:
                    _HOST.release()

    def close(self) -> None:
        """Same as ``dispose()``."""
        self.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.dispose()

    # state ---------------------------------------------------------------------------------

    @property
    def session_file(self) -> str:
        """The transcript's path, as given to ``create``."""
        return self._ctl.session_file

    @property
    def has_takeover(self) -> bool:
        """Whether a takeover stopped this controller (every later write raises it)."""
        return self._ctl.has_takeover

    @property
    def takeover(self) -> SessionTakeoverError | None:
        """The ``SessionTakeoverError`` that stopped this controller, or None."""
        return self._ctl.takeover

    @property
    def fence_active(self) -> bool:
        """Whether the fence is active (from the first ``release_for_prompt`` on)."""
        return self._ctl.fence_active

    @property
    def fence_fingerprint(self) -> Fingerprint:
        """The transcript's state as the fence last accepted it."""
        return self._ctl.fence_fingerprint

    @property
    def holds_lock(self) -> bool:
        """Whether the controller holds the write lock between calls (the retained lock)."""
        return self._ctl.holds_lock

    @property
    def disposed(self) -> bool:
        """Whether ``dispose()`` (or ``close()``, or leaving ``with``) has run."""
        return self._disposed

    @property
    def run_id(self) -> str:
        """This run's id (its claim in the session's journal)."""
        return self._ctl.run_id

    @property
    def revision(self) -> int:
        """The revision of this run's claim."""
        return self._ctl.revision

    @property
    def writer(self) -> SessionWriter:
        """The claimant writer to give this run's ``SessionManager``."""
        return self._ctl.writer

    def __repr__(self) -> str:
        state = "disposed" if self._disposed else "taken over" if self.has_takeover else "live"
        return f"<SyncSessionFenceController {self.session_file!r} {state}>"
