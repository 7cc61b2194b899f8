"""``sessionfence.sync.SyncSessionFenceController``: the controller from synchronous code.

Real lock, real files, real threads. The facade drives the async controller on one private
event loop thread per process; these tests hold it to what its module documentation
promises: the README flow done synchronously, guarded ``SessionManager`` appends, errors
crossing threads unchanged, nested writes from the write's own thread, one write block at a
time per facade, two controllers contending for one transcript from two threads, use from
inside a running asyncio loop, a clear error instead of a deadlock on the loop thread,
idempotent disposal with no thread left behind.

Every wait on another thread is bounded, so a deadlock fails a test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessionfence import (
    Fingerprint,
    SessionTakeoverError,
    SessionWriteLockTimeoutError,
)
from sessionfence._sync import LOOP_THREAD_NAME
from sessionfence.controller import reset_for_tests
from sessionfence.lock import acquire_session_write_lock
from sessionfence.sync import SyncCleanupLock, SyncSessionFenceController
from sessionfence.transcript import SessionManager, guard_session_manager

pytestmark = pytest.mark.timeout(120)

WAIT = 30.0  # bound of every cross-thread wait; the operations take milliseconds


# -- fixtures and helpers -----------------------------------------------------------------------


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == LOOP_THREAD_NAME]


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    reset_for_tests()
    yield
    leaked = loop_threads()
    reset_for_tests()
    assert leaked == [], "a test left the facade's loop thread running (undisposed facade?)"


@pytest.fixture
def session_file(tmp_path: Path) -> Path:
    path = tmp_path / "session.jsonl"
    path.write_bytes(b'{"type":"session"}\n')
    return path


def entry(kind: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "id": secrets.token_hex(4),
        "parentId": None,
        "timestamp": "2025-01-01T00:00:00.000Z",
        **fields,
    }


def user_message(text: str) -> dict[str, Any]:
    return entry("message", message={"role": "user", "content": text})


def mirror_message(text: str = "mirrored") -> dict[str, Any]:
    message = {
        "role": "assistant",
        "content": [{"type": "text", "text": text}],
        "provider": "openclaw",
        "model": "delivery-mirror",
    }
    return entry("message", message=message)


def append_entries(path: Path, *entries: dict[str, Any]) -> bytes:
    """A writer outside the fence: one write of whole lines."""
    data = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries).encode()
    with open(path, "ab") as handle:
        handle.write(data)
    return data


def read_entries(path: Path) -> list[Any]:
    return [json.loads(x) for x in path.read_text("utf-8").splitlines() if x.strip()]


def lock_is_free(path: Path) -> bool:
    try:
        lock = acquire_session_write_lock(path, timeout=0)
    except SessionWriteLockTimeoutError:
        return False
    lock.release()
    return True


def run_threads(*targets: Any) -> None:
    """Run each target in its own thread; re-raise the first failure in this thread."""
    failures: list[BaseException] = []

    def wrap(target: Any) -> Any:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                failures.append(exc)

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive(), "a thread is stuck (deadlock?)"
    if failures:
        raise failures[0]


class Boom(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"boom {code}")
        self.code = code


# -- the README flow, synchronously -------------------------------------------------------------


def test_readme_flow_foreign_user_line_in_the_window_is_a_takeover(session_file: Path) -> None:
    manager = SessionManager.open(session_file)
    ctl = SyncSessionFenceController.create(session_file)
    assert ctl.holds_lock and not lock_is_free(session_file)  # the eager lock
    try:
        with pytest.raises(SessionTakeoverError) as caught:
            with ctl.prompt_released():
                assert lock_is_free(session_file)  # released while the model runs
                append_entries(session_file, mirror_message())  # benign on its own
                append_entries(session_file, user_message("someone else's turn"))
            manager.append_message({"role": "assistant", "content": "never written"})
    finally:
        ctl.dispose()
    exc = caught.value
    assert type(exc) is SessionTakeoverError
    assert exc.reason == "foreign-append" and exc.phase == "prompt_reacquire"
    assert exc.session_file == ctl.session_file
    assert isinstance(exc.before, Fingerprint) and isinstance(exc.after, Fingerprint)
    assert exc.after.size > exc.before.size
    assert ctl.has_takeover and ctl.takeover is not None
    assert ctl.takeover.reason == "foreign-append"
    assert [e["message"]["role"] for e in read_entries(session_file)[1:]] == [
        "assistant",
        "user",
    ]
    assert lock_is_free(session_file)


def test_readme_flow_a_benign_mirror_append_passes(session_file: Path) -> None:
    with SyncSessionFenceController.create(session_file) as ctl:
        manager = SessionManager.open(session_file)
        with ctl.prompt_released():
            append_entries(session_file, mirror_message("delivered to the channel"))
            reply = {"role": "assistant", "content": "the answer"}
        manager.reload()  # pick up the mirror line before appending after it
        entry_id = ctl.with_write_lock(lambda: manager.append_message(reply))
        assert not ctl.has_takeover
        assert read_entries(session_file)[-1]["id"] == entry_id
    assert ctl.disposed and lock_is_free(session_file)


def test_sticky_takeover_every_later_write_raises(session_file: Path) -> None:
    with SyncSessionFenceController.create(session_file) as ctl:
        ctl.release_for_prompt()
        session_file.write_bytes(b'{"type":"session","v":2}\n')  # a rewrite
        with pytest.raises(SessionTakeoverError) as first:
            ctl.reacquire_after_prompt()
        assert first.value.reason == "rewritten"
        with pytest.raises(SessionTakeoverError) as later:
            ctl.with_write_lock(lambda: None)
        assert later.value.reason == "rewritten"
        cleanup = ctl.acquire_for_cleanup()
        assert isinstance(cleanup, SyncCleanupLock) and not cleanup.held
        cleanup.release()


# -- guarded SessionManager appends -------------------------------------------------------------


def guarded(path: Path, ctl: SyncSessionFenceController) -> SessionManager:
    return guard_session_manager(
        SessionManager.open(path),
        with_compaction_persistence=ctl.owned_file_write,
        on_message_persisted=ctl.refresh_after_owned_write,
    )


def test_guarded_session_manager_appends_are_owned(session_file: Path) -> None:
    with SyncSessionFenceController.create(session_file) as ctl:
        manager = guarded(session_file, ctl)
        ctl.with_write_lock(lambda: manager.append_message({"role": "user", "content": "q"}))
        for turn in range(3):
            with ctl.prompt_released():
                # Persisted while the lock is released (as a streaming agent does): the
                # guard moves the fence over each line, from this thread, outside a block.
                manager.append_message({"role": "assistant", "content": f"part {turn}"})
                manager.append_message({"role": "toolResult", "content": f"tool {turn}"})
            manager.append_compaction("older turns, summarised", manager.leaf_id or "", 1234)
            ctl.with_write_lock(
                functools.partial(manager.append_message, {"role": "user", "content": f"{turn}"})
            )
        assert not ctl.has_takeover
        lock = ctl.acquire_for_cleanup()
        assert lock.held
        lock.release()
    assert len(read_entries(session_file)) == 1 + 1 + 3 * 4


def test_unguarded_appends_in_the_window_are_a_takeover(session_file: Path) -> None:
    """The control for the test above: the same append without the guard is foreign."""
    with SyncSessionFenceController.create(session_file) as ctl:
        manager = SessionManager.open(session_file)
        with pytest.raises(SessionTakeoverError) as caught, ctl.prompt_released():
            manager.append_message({"role": "user", "content": "unvouched"})
        assert caught.value.reason == "foreign-append"


def test_guarded_appends_from_another_thread(session_file: Path) -> None:
    with SyncSessionFenceController.create(session_file) as ctl:
        manager = guarded(session_file, ctl)
        ctl.release_for_prompt()

        def worker() -> None:
            for i in range(5):
                manager.append_message({"role": "assistant", "content": f"streamed {i}"})

        run_threads(worker)
        ctl.reacquire_after_prompt()
        assert not ctl.has_takeover


# -- errors cross the thread boundary unchanged -------------------------------------------------


def test_the_callbacks_own_error_propagates_as_the_same_object(session_file: Path) -> None:
    raised = Boom(7)

    def fail() -> None:
        raise raised

    with SyncSessionFenceController.create(session_file) as ctl:
        with pytest.raises(Boom) as caught:
            ctl.with_write_lock(fail)
        assert caught.value is raised and caught.value.code == 7
        assert not ctl.has_takeover
        # The block's error left the facade usable: the next write takes the lock again.
        assert ctl.with_write_lock(lambda: "again") == "again"


def test_the_callbacks_own_error_wins_over_a_takeover(session_file: Path) -> None:
    with SyncSessionFenceController.create(session_file) as ctl:
        ctl.release_for_prompt()

        def truncate_then_fail() -> None:
            session_file.write_bytes(b"")
            raise Boom(3)

        with pytest.raises(Boom):
            ctl.with_write_lock(truncate_then_fail)
        assert ctl.takeover is not None and ctl.takeover.reason == "truncated"


def test_a_lock_error_at_create_propagates_with_its_fields(session_file: Path) -> None:
    holder = acquire_session_write_lock(session_file)
    try:
        with pytest.raises(SessionWriteLockTimeoutError) as caught:
            SyncSessionFenceController.create(session_file, timeout=0.2)
    finally:
        holder.release()
    exc = caught.value
    assert exc.timeout_ms == 200 and exc.lock_path == holder.lock_path
    assert f"pid={os.getpid()}" in exc.owner
    assert isinstance(exc, TimeoutError)
    assert loop_threads() == []  # the failed create gave its loop use back


def test_a_lock_error_at_reacquire_sets_takeover_and_propagates(session_file: Path) -> None:
    with SyncSessionFenceController.create(session_file, timeout=0.2) as ctl:
        ctl.release_for_prompt()
        other = acquire_session_write_lock(session_file)
        try:
            with pytest.raises(SessionWriteLockTimeoutError):
                ctl.reacquire_after_prompt()
        finally:
            other.release()
        assert ctl.takeover is not None and ctl.takeover.reason == "lock-timeout"


def test_invalid_options_raise_in_the_callers_thread() -> None:
    with pytest.raises(ValueError, match="verify"):
        SyncSessionFenceController.create("unused.jsonl", verify="partial")  # type: ignore[arg-type]
    assert loop_threads() == []


def test_with_write_lock_refuses_a_coroutine_function(session_file: Path) -> None:
    async def coroutine_function() -> None:
        return None

    with SyncSessionFenceController.create(session_file) as ctl:
        with pytest.raises(TypeError, match="plain function"):
            ctl.with_write_lock(coroutine_function)  # type: ignore[unused-coroutine]
        with pytest.raises(TypeError, match="awaitable"):
            ctl.with_write_lock(lambda: coroutine_function())  # type: ignore[unused-coroutine]
        assert ctl.with_write_lock(lambda: 1) == 1


def test_the_constructor_is_not_public(session_file: Path) -> None:
    with pytest.raises(TypeError, match="create"):
        SyncSessionFenceController(None)  # type: ignore[arg-type]


# -- nested writes ------------------------------------------------------------------------------


def test_a_nested_write_from_the_block_runs_inside_it(session_file: Path) -> None:
    # timeout=1: a nested write that were not nested would wait for the lock its own
    # block holds and fail with SessionWriteLockTimeoutError after a second.
    with SyncSessionFenceController.create(session_file, timeout=1.0) as ctl:
        manager = guarded(session_file, ctl)
        for window in (False, True):  # under the retained lock, then with short locks
            if window:
                ctl.release_for_prompt()

            def outer() -> str:
                manager.append_message({"role": "user", "content": "outer"})

                def inner() -> str:
                    manager.append_message({"role": "assistant", "content": "inner"})
                    with ctl.write_lock():  # nested twice, as a context manager
                        manager.append_message({"role": "assistant", "content": "innermost"})
                    return "inner result"

                return ctl.with_write_lock(inner)

            assert ctl.with_write_lock(outer) == "inner result"
            assert not ctl.has_takeover
        ctl.reacquire_after_prompt()
        assert not ctl.has_takeover
    assert len(read_entries(session_file)) == 1 + 2 * 3


def test_release_for_prompt_inside_a_block_is_deferred_to_its_end(session_file: Path) -> None:
    with SyncSessionFenceController.create(session_file, timeout=2.0) as ctl:

        def write_then_release() -> None:
            append_entries(session_file, user_message("mine"))
            ctl.release_for_prompt()  # from inside the scope: deferred, not a deadlock
            assert ctl.holds_lock

        ctl.with_write_lock(write_then_release)
        assert not ctl.holds_lock and lock_is_free(session_file)
        ctl.reacquire_after_prompt()
        assert not ctl.has_takeover


def test_nested_publications_reach_a_peer(session_file: Path) -> None:
    merged: list[list[Any]] = []
    ctl = SyncSessionFenceController.create(session_file, timeout=2.0)
    try:
        ctl.release_for_prompt()
        peer = SyncSessionFenceController.create(
            session_file, timeout=2.0, merge_foreign_entries=lambda entries: merged.append(entries)
        )
        try:
            peer.release_for_prompt()
            parent, child = user_message("parent"), user_message("child")

            def publish(item: dict[str, Any]) -> dict[str, Any]:
                return {
                    "publish_owned_write": True,
                    "resolve_published_entries": lambda _: [{"kind": "id", "id": item["id"]}],
                }

            def write_parent() -> None:
                append_entries(session_file, parent)
                ctl.with_write_lock(lambda: append_entries(session_file, child), **publish(child))

            ctl.with_write_lock(write_parent, **publish(parent))
            peer.with_write_lock(lambda: None)
            assert not peer.has_takeover and not ctl.has_takeover
            assert [e["id"] for batch in merged for e in batch] == [parent["id"], child["id"]]
        finally:
            peer.dispose()
    finally:
        ctl.dispose()


# -- threads ------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [False, True], ids=["retained-lock", "prompt-window"])
def test_write_blocks_of_one_facade_never_overlap(session_file: Path, window: bool) -> None:
    inside = 0
    most = 0
    count = threading.Lock()
    with SyncSessionFenceController.create(session_file, timeout=5.0) as ctl:
        manager = guarded(session_file, ctl)
        if window:
            ctl.release_for_prompt()

        def write(i: int) -> None:
            nonlocal inside, most
            with count:
                inside += 1
                most = max(most, inside)
            time.sleep(0.02)
            manager.append_message({"role": "user", "content": f"from a thread {i}"})
            with count:
                inside -= 1

        def worker() -> None:
            for i in range(5):
                ctl.with_write_lock(functools.partial(write, i))

        run_threads(worker, worker, worker)
        if window:
            ctl.reacquire_after_prompt()
        assert not ctl.has_takeover
    assert most == 1
    assert len(read_entries(session_file)) == 1 + 15


def test_prompt_cycles_and_writes_from_different_threads(session_file: Path) -> None:
    with SyncSessionFenceController.create(session_file, timeout=5.0) as ctl:
        manager = guarded(session_file, ctl)

        def prompter() -> None:
            for _ in range(10):
                with ctl.prompt_released():
                    time.sleep(0.005)

        def writer() -> None:
            for i in range(10):
                ctl.with_write_lock(
                    functools.partial(manager.append_message, {"role": "user", "content": f"{i}"})
                )

        run_threads(prompter, writer)
        assert not ctl.has_takeover
    assert len(read_entries(session_file)) == 1 + 10


def test_two_controllers_in_two_threads_take_turns(session_file: Path) -> None:
    events: list[tuple[str, str]] = []
    record = threading.Lock()

    def attempt(name: str) -> None:
        with SyncSessionFenceController.create(session_file) as ctl:  # waits for the lock
            with record:
                events.append(("start", name))
            ctl.with_write_lock(lambda: append_entries(session_file, user_message(name)))
            time.sleep(0.1)  # hold the lock a while: the other attempt must wait
            assert not ctl.has_takeover
            with record:
                events.append(("end", name))

    run_threads(lambda: attempt("a"), lambda: attempt("b"))
    assert [kind for kind, _ in events] == ["start", "end", "start", "end"]
    assert events[0][1] == events[1][1] != events[2][1] == events[3][1]
    assert len(read_entries(session_file)) == 3
    assert lock_is_free(session_file)


def test_a_controller_of_another_thread_writing_in_the_window_is_a_takeover(
    session_file: Path,
) -> None:
    released = threading.Event()
    intruded = threading.Event()
    seen: list[SessionTakeoverError] = []

    def first() -> None:
        with SyncSessionFenceController.create(session_file) as ctl:
            try:
                with ctl.prompt_released():
                    released.set()
                    assert intruded.wait(WAIT)
            except SessionTakeoverError as exc:
                seen.append(exc)

    def second() -> None:
        assert released.wait(WAIT)
        with SyncSessionFenceController.create(session_file) as ctl:
            manager = guarded(session_file, ctl)
            ctl.with_write_lock(lambda: manager.append_message({"role": "user", "content": "b"}))
            assert not ctl.has_takeover
        intruded.set()

    run_threads(first, second)
    # The second controller claimed the session (and is gone): a visible supersession.
    assert len(seen) == 1 and seen[0].reason == "superseded"


def test_one_loop_thread_for_all_facades_of_the_process(tmp_path: Path) -> None:
    paths = [tmp_path / f"{name}.jsonl" for name in "ab"]
    for path in paths:
        path.write_bytes(b'{"type":"session"}\n')
    a = SyncSessionFenceController.create(paths[0])
    b = SyncSessionFenceController.create(paths[1])
    try:
        assert len(loop_threads()) == 1
        a.dispose()
        assert len(loop_threads()) == 1  # b still uses it
        b.release_for_prompt()
        b.reacquire_after_prompt()
    finally:
        a.dispose()
        b.dispose()
    assert loop_threads() == []


# -- asyncio callers and the loop thread --------------------------------------------------------


async def test_blocking_calls_from_inside_a_running_event_loop(session_file: Path) -> None:
    asyncio.get_running_loop()  # this test body runs on pytest's event loop
    with SyncSessionFenceController.create(session_file) as ctl:
        manager = guarded(session_file, ctl)
        with ctl.prompt_released():
            manager.append_message({"role": "assistant", "content": "streamed"})
        assert ctl.with_write_lock(lambda: 5) == 5
        ctl.acquire_for_cleanup().release()
        assert not ctl.has_takeover


def test_a_blocking_call_on_the_loop_thread_raises_instead_of_deadlocking(
    session_file: Path,
) -> None:
    errors: list[BaseException] = []
    inline: list[Any] = []
    holder: list[SyncSessionFenceController] = []

    def merge(entries: list[Any]) -> None:
        ctl = holder[0]
        inline.append(ctl.trusted_snapshot())  # a synchronous helper: runs inline
        for call in (ctl.release_for_prompt, lambda: ctl.with_write_lock(lambda: None)):
            try:
                call()
            except RuntimeError as exc:
                errors.append(exc)

    with SyncSessionFenceController.create(session_file, merge_foreign_entries=merge) as ctl:
        holder.append(ctl)
        with ctl.prompt_released():
            append_entries(session_file, mirror_message())  # merged at the reacquire
        assert not ctl.has_takeover
    assert len(inline) == 1
    assert len(errors) == 2
    assert all("own event-loop thread" in str(e) for e in errors)


# -- interrupts ---------------------------------------------------------------------------------


def test_a_keyboard_interrupt_in_a_block_propagates_and_the_loop_survives(
    session_file: Path,
) -> None:
    def interrupted() -> None:
        append_entries(session_file, user_message("half a turn"))
        raise KeyboardInterrupt

    with SyncSessionFenceController.create(session_file) as ctl:
        with pytest.raises(KeyboardInterrupt):
            ctl.with_write_lock(interrupted)
        # asyncio lets a KeyboardInterrupt escape its loop: the block's must not reach it.
        assert ctl.with_write_lock(lambda: "still serving") == "still serving"
        assert not ctl.has_takeover


def test_a_callback_calling_sys_exit_reaches_the_caller_and_the_loop_survives(
    session_file: Path,
) -> None:
    def merge(entries: list[Any]) -> None:
        raise SystemExit(4)

    with SyncSessionFenceController.create(session_file, merge_foreign_entries=merge) as ctl:
        ctl.release_for_prompt()
        append_entries(session_file, mirror_message())
        with pytest.raises(SystemExit) as caught:
            ctl.reacquire_after_prompt()
        assert caught.value.code == 4
        ctl.trusted_snapshot()  # the loop still answers


class Interrupted(BaseException):
    """What SIGINT raises in these tests (a KeyboardInterrupt arriving late would stop
    pytest itself)."""


@contextlib.contextmanager
def sigint_after(seconds: float) -> Iterator[None]:
    """Deliver SIGINT to this (the main) thread after ``seconds``, raising Interrupted."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGINT, handler)
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGINT, previous)


interrupts = pytest.mark.skipif(
    sys.platform == "win32" or threading.current_thread() is not threading.main_thread(),
    reason="needs POSIX signals delivered to the main thread",
)


@interrupts
def test_an_interrupted_create_takes_no_lock(session_file: Path) -> None:
    holder = acquire_session_write_lock(session_file)
    try:
        with pytest.raises(Interrupted), sigint_after(0.3):
            SyncSessionFenceController.create(session_file, timeout=10.0)
    finally:
        holder.release()
    assert loop_threads() == []
    assert lock_is_free(session_file)  # the cancelled acquisition left nothing held


@interrupts
def test_an_interrupted_wait_for_a_write_leaves_the_facade_usable(session_file: Path) -> None:
    with SyncSessionFenceController.create(session_file, timeout=10.0) as ctl:
        ctl.release_for_prompt()
        holder = acquire_session_write_lock(session_file)
        try:
            with pytest.raises(Interrupted), sigint_after(0.3):
                ctl.with_write_lock(lambda: append_entries(session_file, user_message("no")))
        finally:
            holder.release()
        assert len(read_entries(session_file)) == 1  # the block never ran
        assert lock_is_free(session_file)  # the abandoned write holds nothing
        assert ctl.with_write_lock(lambda: "next") == "next"  # the turn was given back
        ctl.reacquire_after_prompt()
        assert not ctl.has_takeover


# -- disposal -----------------------------------------------------------------------------------


def test_dispose_is_idempotent_and_leaves_no_thread(session_file: Path, tmp_path: Path) -> None:
    # The lock module's own watchdog thread starts with the first lock of the process and
    # stays; start it first so that the comparison sees only the facade's threads.
    acquire_session_write_lock(tmp_path / "warm.jsonl").release()
    before = set(threading.enumerate())
    ctl = SyncSessionFenceController.create(session_file)
    assert len(loop_threads()) == 1
    ctl.with_write_lock(lambda: append_entries(session_file, user_message("x")))
    ctl.dispose()
    assert set(threading.enumerate()) == before
    assert lock_is_free(session_file)
    ctl.dispose()
    ctl.close()
    with ctl:
        pass
    assert ctl.disposed and not ctl.holds_lock and not ctl.has_takeover
    # A call after dispose runs on a loop started for it, and leaves no thread either.
    ctl.release_for_prompt()
    ctl.trusted_snapshot()
    assert set(threading.enumerate()) == before


def test_the_cleanup_lock_is_released_synchronously_and_once(session_file: Path) -> None:
    with SyncSessionFenceController.create(session_file, timeout=0.2) as ctl:
        ctl.release_for_prompt()
        with ctl.acquire_for_cleanup() as lock:
            assert lock.held and not lock_is_free(session_file)
        assert not lock.held and lock_is_free(session_file)
        lock.release()  # idempotent
        assert lock_is_free(session_file)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_facade_refuses_to_work_in_a_forked_child(session_file: Path) -> None:
    with SyncSessionFenceController.create(session_file) as ctl:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            signal.alarm(10)  # a call that hangs (no loop thread here) kills the child
            code = 1
            try:
                ctl.with_write_lock(lambda: None)
            except RuntimeError as exc:
                code = 0 if "cannot be used after fork()" in str(exc) else 2
            except BaseException:
                code = 3
            sys.stdout.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert ctl.with_write_lock(lambda: "parent unaffected") == "parent unaffected"


# -- the documentation --------------------------------------------------------------------------


def _repository_root() -> Path:
    here = Path(__file__).resolve().parent
    while not (here / "pyproject.toml").exists():
        here = here.parent
    return here


def test_the_snippets_of_docs_sync_md_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (_repository_root() / "docs" / "sync.md").read_text("utf-8")
    snippets = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert snippets
    for number, snippet in enumerate(snippets):
        workdir = tmp_path / str(number)  # as a new user would: no transcript yet
        workdir.mkdir()
        monkeypatch.chdir(workdir)
        exec(compile(snippet, "docs/sync.md", "exec"), {"__name__": "__docs__"})
        assert read_entries(Path("session.jsonl"))[-1]["message"]["content"] == "hello"
        assert lock_is_free(Path("session.jsonl"))
    out = capsys.readouterr().out
    assert "stopped" not in out and out.strip().endswith("hello")
