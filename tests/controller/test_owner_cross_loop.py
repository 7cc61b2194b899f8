"""The in-process session file owner across threads and event loops (issue 10).

Each thread runs its own event loop. An owner released from one loop must wake a waiter
parked on another loop (``call_soon_threadsafe``, not ``set_result`` from a foreign
thread), and a waiter whose loop has been closed must not break the release.

Failures show as a waiter that never wakes: the test thread waits on a ``threading.Event``
with a generous bound, so a broken wake-up fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sessionfence.controller import acquire_session_file_owner, reset_for_tests
from sessionfence.controller._owner import SessionFileOwner

pytestmark = pytest.mark.timeout(120)

WAIT = 30.0  # generous: the hand-over takes microseconds
T = TypeVar("T")


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    reset_for_tests()
    yield
    reset_for_tests()


class LoopThread:
    """A thread running its own asyncio event loop until stopped."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def stop(self) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT)
            self.loop.close()


def _run_in(loop_thread: LoopThread, coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coro, loop_thread.loop).result(WAIT)


def test_release_from_another_loop_wakes_the_waiter(tmp_path: Path) -> None:
    session = tmp_path / "s.jsonl"
    holder_loop, waiter_loop = LoopThread(), LoopThread()
    try:

        async def hold() -> SessionFileOwner:
            return await acquire_session_file_owner(session)

        owner = _run_in(holder_loop, hold())

        waiting = threading.Event()
        got_it = threading.Event()

        async def wait_for_owner() -> None:
            # No timer on this loop: it sleeps in select() until someone wakes it.
            task = asyncio.ensure_future(acquire_session_file_owner(session))
            await asyncio.sleep(0)  # the task is now parked on its future
            assert not task.done()
            waiting.set()
            second = await task
            got_it.set()
            second.release()

        waiter = asyncio.run_coroutine_threadsafe(wait_for_owner(), waiter_loop.loop)
        assert waiting.wait(WAIT)

        async def release() -> None:
            owner.release()

        _run_in(holder_loop, release())
        assert got_it.wait(WAIT), (
            "the owner was released on another event loop, but the waiter never woke"
        )
        waiter.result(WAIT)
    finally:
        holder_loop.stop()
        waiter_loop.stop()


def test_release_from_a_plain_thread_wakes_the_waiter(tmp_path: Path) -> None:
    session = tmp_path / "s.jsonl"
    waiter_loop = LoopThread()
    try:
        owner = asyncio.run(acquire_session_file_owner(session))
        waiting = threading.Event()
        got_it = threading.Event()

        async def wait_for_owner() -> None:
            task = asyncio.ensure_future(acquire_session_file_owner(session))
            await asyncio.sleep(0)
            waiting.set()
            (await task).release()
            got_it.set()

        waiter = asyncio.run_coroutine_threadsafe(wait_for_owner(), waiter_loop.loop)
        assert waiting.wait(WAIT)
        owner.release()  # no event loop in this thread at all
        assert got_it.wait(WAIT), "the waiter never woke after a release from a plain thread"
        waiter.result(WAIT)
    finally:
        waiter_loop.stop()


def test_waiter_on_a_closed_loop_does_not_break_release(tmp_path: Path) -> None:
    session = tmp_path / "s.jsonl"
    owner = asyncio.run(acquire_session_file_owner(session))
    dead = asyncio.new_event_loop()
    task = dead.create_task(acquire_session_file_owner(session))
    dead.run_until_complete(asyncio.sleep(0))
    assert not task.done()
    dead.close()  # the waiter's loop is gone; its task can never run again
    owner.release()  # must not raise
    # and the owner is free for everyone else
    again = asyncio.run(acquire_session_file_owner(session, timeout=WAIT))
    again.release()


def test_many_waiters_on_many_loops_each_get_the_owner_once(tmp_path: Path) -> None:
    session = tmp_path / "s.jsonl"
    loops = [LoopThread() for _ in range(4)]
    active = 0
    peak = 0
    guard = threading.Lock()
    done = 0

    async def turns(n: int) -> None:
        nonlocal active, peak, done
        for _ in range(n):
            owner = await acquire_session_file_owner(session, timeout=WAIT)
            with guard:
                active += 1
                peak = max(peak, active)
            await asyncio.sleep(0)
            with guard:
                active -= 1
                done += 1
            owner.release()

    try:
        futures = [asyncio.run_coroutine_threadsafe(turns(50), lt.loop) for lt in loops]
        for future in futures:
            future.result(WAIT)
        assert (done, peak) == (200, 1)
    finally:
        for lt in loops:
            lt.stop()


def test_an_abandoned_waiter_collected_inside_the_owner_table_lock_does_not_deadlock(
    tmp_path: Path,
) -> None:
    """A waiter whose loop was closed is a suspended coroutine; the garbage collector runs
    its ``finally`` (which takes the owner table's lock) on whichever thread allocates at
    that moment, possibly one that holds the lock already. It must not wait for itself.
    Run in a child interpreter: a deadlock there fails the test instead of hanging it."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import asyncio, gc
        from sessionfence.controller import _owner
        from sessionfence.controller import acquire_session_file_owner

        path = {str(tmp_path / "s.jsonl")!r}
        owner = asyncio.run(acquire_session_file_owner(path))
        dead = asyncio.new_event_loop()
        task = dead.create_task(acquire_session_file_owner(path))
        dead.run_until_complete(asyncio.sleep(0))
        dead.close()
        owner.release()  # the waiter's loop is closed: it is dropped, never woken
        del task, dead
        gc.disable()
        with _owner._OWNERS_LOCK:  # as acquire/release are when an allocation collects
            gc.collect()
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
