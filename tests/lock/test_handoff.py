"""The wake-up path of the session write lock (issue 16): a contender blocked in the kernel.

A contender that finds the lock held by another process hands the descriptor of its failed
attempt to a waiter thread blocked in ``flock(LOCK_EX)``; the kernel wakes it when the
holder unlocks, closes or dies, and the contender takes the lock at once instead of on its
next poll. Tests that are about the wake-up itself raise ``POLL_INTERVAL`` to an hour
(``no_poll``): a contender that is not woken then sleeps until its own timeout, past the
hang guard, and the test fails. Nothing here asserts a time; every "is it held?" is asked
of the kernel (``probe_held``, /proc/locks), and every wait on another process is bounded
by ``WAIT``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessionfence import (
    SessionWriteLock,
    SessionWriteLockTimeoutError,
    acquire_session_write_lock,
    acquire_session_write_lock_async,
)
from sessionfence.lock import _acquire as lock
from sessionfence.lock import _os as _lock_os
from sessionfence.lock import _registry as _lock_registry

from .helpers import (
    CTX,
    WAIT,
    Holder,
    blocked_in_flock,
    counter_main,
    probe_held,
    wait_for,
    waiter_main,
)

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="Windows waiters poll (docs/platforms.md)"),
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/locks and /proc/self/fd"
)

# Longer than any hang guard here: a contender that relies on this budget was not woken.
LONG = 4 * WAIT


@pytest.fixture
def no_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Contenders re-check only once an hour: only the wake-up path can hand them the lock."""
    monkeypatch.setattr(lock, "POLL_INTERVAL", 3600.0)


@pytest.fixture
def path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "s.jsonl")
    # Whatever a test did, the waiters it started are gone once the lock is free.
    wait_for(lambda: not _lock_registry.waiters, "waiter threads to finish")
    wait_for(lambda: not _lock_registry.claimed, "claims to be given up")
    assert not _lock_registry.held and not _lock_registry.interest


def _waiter_threads() -> int:
    return sum(t.name == "sessionfence-lock-waiter" for t in threading.enumerate())


def _waiting_here(lock_path: str) -> bool:
    """This process has a waiter on ``lock_path`` and the kernel lists it as blocked."""
    if lock_path not in _lock_registry.waiters:
        return False
    return not sys.platform.startswith("linux") or blocked_in_flock(lock_path, os.getpid())


class _Attempts:
    """Records the outcome of every ``_attempt``: True when it took the lock."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.outcomes: list[bool] = []
        real = lock._attempt

        def counting(*args: Any) -> Any:
            outcome = real(*args)
            self.outcomes.append(isinstance(outcome, _lock_registry.Entry))
            return outcome

        monkeypatch.setattr(lock, "_attempt", counting)


def _in_thread(path: str, got: list[SessionWriteLock], **kwargs: Any) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: got.append(acquire_session_write_lock(path, **kwargs)), daemon=True
    )
    thread.start()
    return thread


# --- the hand-off ---------------------------------------------------------------------


def test_waiter_is_handed_the_lock_without_polling(
    path: str, no_poll: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = _Attempts(monkeypatch)
    holder = Holder(path)
    try:
        got: list[SessionWriteLock] = []
        thread = _in_thread(path, got, timeout=LONG)
        wait_for(lambda: _waiting_here(holder.lock_path), "the waiter to block in flock")
        holder.release()
        thread.join(WAIT)
        assert got, "the waiter was not woken by the release"
        # One attempt found it held, the next (after the wake-up) took it: no polling.
        assert attempts.outcomes == [False, True]
        assert got[0].generation == holder.generation + 1
        assert probe_held(got[0].lock_path)
        got[0].release()
        assert not probe_held(got[0].lock_path)
    finally:
        holder.close()


async def test_async_waiter_is_handed_the_lock_without_polling(
    path: str, no_poll: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = _Attempts(monkeypatch)
    holder = Holder(path)
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    try:
        task = asyncio.create_task(acquire_session_write_lock_async(path, timeout=LONG))
        while not _waiting_here(holder.lock_path):
            assert not task.done()
            await asyncio.sleep(0.001)
        seen = ticks
        while ticks < seen + 3:  # the loop runs while the task waits
            await asyncio.sleep(0.001)
        holder.release()
        got = await asyncio.wait_for(task, WAIT)
        assert attempts.outcomes == [False, True]
        assert got.generation == holder.generation + 1
        assert probe_held(got.lock_path)
        got.release()
    finally:
        beat.cancel()
        holder.close()


def test_sigkilled_holder_hands_the_lock_to_a_blocked_waiter(path: str, no_poll: None) -> None:
    holder = Holder(path)
    try:
        got: list[SessionWriteLock] = []
        thread = _in_thread(path, got, timeout=LONG)
        wait_for(lambda: _waiting_here(holder.lock_path), "the waiter to block in flock")
        os.kill(holder.proc.pid or 0, signal.SIGKILL)  # no release: the kernel drops it
        thread.join(WAIT)
        assert got, "the waiter was not woken by the holder's death"
        assert got[0].generation > holder.generation
        got[0].release()
    finally:
        holder.close()


def test_threads_of_one_process_are_woken_by_a_release(path: str, no_poll: None) -> None:
    first = acquire_session_write_lock(path)
    got: list[SessionWriteLock] = []
    threads = [_in_thread(path, got, timeout=LONG) for _ in range(3)]
    wait_for(lambda: _lock_registry.interest.get(first.lock_path) == 3, "three waiters")
    first.release()
    for _ in range(3):
        wait_for(lambda: got, "a waiter to get the lock")
        got.pop().release()
    for thread in threads:
        thread.join(WAIT)
    assert not got


# --- contention -------------------------------------------------------------------------


def test_eight_processes_count_exactly_without_overlap(tmp_path: Path, path: str) -> None:
    processes, cycles = 8, 250
    counter = tmp_path / "counter"
    counter.write_text("0")
    marker = str(tmp_path / "inside")
    start = CTX.Event()
    procs = [
        CTX.Process(
            target=counter_main,
            args=(path, str(counter), marker, cycles, n % 2 == 1, start),
        )
        for n in range(processes)
    ]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(100)
    # Exit 7 is an overlap seen by the occupancy marker; any other failure is a crash.
    assert [p.exitcode for p in procs] == [0] * processes
    assert int(counter.read_text()) == processes * cycles
    assert not os.path.exists(marker)
    record = json.loads(Path(path + ".lock").read_bytes())
    assert record["state"] == "free"
    assert record["generation"] >= processes * cycles


# --- timeouts ---------------------------------------------------------------------------


def test_timed_out_waiter_never_keeps_the_lock(path: str) -> None:
    holder = Holder(path)
    try:
        for _ in range(3):
            with pytest.raises(SessionWriteLockTimeoutError) as info:
                acquire_session_write_lock(path, timeout=0.05)
            assert info.value.owner.startswith(f"pid={holder.pid} ")
        # The abandoned waiter stays blocked (nothing can interrupt a flock), one for all
        # three acquisitions, and nobody is interested in it any more.
        assert holder.lock_path in _lock_registry.waiters
        assert _waiter_threads() == 1
        assert not _lock_registry.interest
        with pytest.raises(SessionWriteLockTimeoutError):
            acquire_session_write_lock(path, timeout=0)
        holder.release()
        wait_for(lambda: not _lock_registry.waiters, "the abandoned waiter to let go")
        assert not probe_held(holder.lock_path)
        with holding_in_another_process(path) as other:
            assert other.generation == holder.generation + 1
    finally:
        holder.close()


def test_timeout_zero_right_after_a_release_takes_over_an_abandoned_waiter(path: str) -> None:
    holder = Holder(path)
    try:
        with pytest.raises(SessionWriteLockTimeoutError):
            acquire_session_write_lock(path, timeout=0.05)
        assert holder.lock_path in _lock_registry.waiters
        holder.release()
        # Whether or not the abandoned waiter's flock has returned yet, the lock is free
        # for this process: a single try gets it (through the waiter's descriptor).
        with acquire_session_write_lock(path, timeout=0) as mine:
            assert mine.generation == holder.generation + 1
            assert probe_held(mine.lock_path)
        assert not probe_held(holder.lock_path)
    finally:
        holder.close()


# --- asyncio cancellation ---------------------------------------------------------------


async def test_cancelled_async_waiter_leaks_nothing(path: str) -> None:
    holder = Holder(path)
    try:
        task = asyncio.create_task(acquire_session_write_lock_async(path, timeout=LONG))
        while holder.lock_path not in _lock_registry.waiters:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not _lock_registry.interest
        holder.release()
        while _lock_registry.waiters:
            await asyncio.sleep(0.001)
        assert not probe_held(holder.lock_path)
        async with await acquire_session_write_lock_async(path, timeout=0) as mine:
            assert mine.generation == holder.generation + 1
    finally:
        holder.close()


async def test_async_waiter_cancelled_after_its_waiter_got_the_lock(path: str) -> None:
    holder = Holder(path)
    try:
        task = asyncio.create_task(acquire_session_write_lock_async(path, timeout=LONG))
        while holder.lock_path not in _lock_registry.waiters:
            await asyncio.sleep(0.001)
        waiter = _lock_registry.waiters[holder.lock_path]
        holder.release()
        # Block the event loop until the waiter thread holds the lock for the task, so the
        # task is cancelled with the lock waiting for it.
        wait_for(lambda: waiter.returned, "the waiter thread to get the lock")
        assert probe_held(holder.lock_path)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not _lock_registry.waiters and not _lock_registry.claimed
        assert not probe_held(holder.lock_path)
        with holding_in_another_process(path) as other:
            assert other.generation == holder.generation + 1
    finally:
        holder.close()


# --- fork and SIGKILL of a waiter ---------------------------------------------------------


@linux_only
def test_fork_while_a_waiter_thread_is_blocked(path: str, no_poll: None) -> None:
    holder = Holder(path)
    try:
        got: list[SessionWriteLock] = []
        thread = _in_thread(path, got, timeout=LONG)
        wait_for(lambda: _waiting_here(holder.lock_path), "the waiter to block in flock")
        ident = os.stat(holder.lock_path)
        read_end, write_end = os.pipe()
        go_read, go_write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.close(read_end)
                os.close(go_write)
                mine = 0
                for name in os.listdir("/proc/self/fd"):
                    try:
                        st = os.fstat(int(name))
                    except OSError:
                        continue
                    if (st.st_dev, st.st_ino) == (ident.st_dev, ident.st_ino):
                        mine += 1
                code = 10 + mine if mine else 0
                if code == 0 and _lock_registry.waiters:
                    code = 2  # the child inherited the parent's waiter
                if code == 0:
                    try:
                        acquire_session_write_lock(path, timeout=0).release()
                        code = 3  # the holder still holds it: this must fail
                    except SessionWriteLockTimeoutError:
                        pass
            finally:
                os.write(write_end, bytes([code]))
                os.read(go_read, 1)  # stay alive until the parent is done
                os._exit(code)
        os.close(write_end)
        os.close(go_read)
        try:
            with os.fdopen(read_end, "rb") as fh:
                assert fh.read(1) == b"\x00", "child check failed"
            # The child is alive; the parent's waiter still gets the lock and lets it go.
            holder.release()
            thread.join(WAIT)
            assert got, "the waiter was not woken after the fork"
            assert probe_held(got[0].lock_path)
            got[0].release()
            assert not probe_held(got[0].lock_path)
        finally:
            os.write(go_write, b"x")
            os.close(go_write)
            os.waitpid(pid, 0)
    finally:
        holder.close()


@linux_only
def test_sigkilled_waiter_process_disturbs_nobody(path: str, no_poll: None) -> None:
    holder = Holder(path)
    conn, child_end = CTX.Pipe()
    victim = CTX.Process(target=waiter_main, args=(child_end, path), daemon=True)
    victim.start()
    child_end.close()
    try:
        assert conn.poll(WAIT)
        victim_pid = conn.recv()
        wait_for(lambda: blocked_in_flock(holder.lock_path, victim_pid), "the victim to block")
        got: list[SessionWriteLock] = []
        thread = _in_thread(path, got, timeout=LONG)
        wait_for(lambda: _waiting_here(holder.lock_path), "our waiter to block in flock")
        os.kill(victim_pid, signal.SIGKILL)
        victim.join(WAIT)
        assert victim.exitcode == -signal.SIGKILL
        try:
            said = conn.recv() if conn.poll(0) else None
        except EOFError:
            said = None  # it died without a word, as it should
        assert said is None, "the victim got the lock before it died"
        assert probe_held(holder.lock_path)  # the holder is unaffected ...
        assert holder.ask("state") == (True, False)
        holder.release()
        thread.join(WAIT)  # ... and so is the other waiter
        assert got, "the surviving waiter was not woken"
        assert got[0].generation == holder.generation + 1
        got[0].release()
    finally:
        conn.close()
        if victim.is_alive():
            victim.kill()
        holder.close()


# --- the waited-on file changes -----------------------------------------------------------


@linux_only
def test_lock_file_replaced_under_a_blocked_waiter(path: str) -> None:
    holder = Holder(path)
    try:
        got: list[SessionWriteLock] = []
        thread = _in_thread(path, got, timeout=WAIT)
        wait_for(lambda: _waiting_here(holder.lock_path), "the waiter to block in flock")
        orphan = os.stat(holder.lock_path)
        os.rename(holder.lock_path, holder.lock_path + ".old")
        # The holder keeps the renamed inode; the waiter's next re-check sees that the
        # path no longer names it and locks the fresh file the path names now.
        thread.join(WAIT)
        assert got, "the waiter stayed on the orphaned lock file"
        assert os.fstat(got[0]._entry.fd).st_ino != orphan.st_ino
        assert os.stat(got[0].lock_path).st_ino != orphan.st_ino
        got[0].release()
        # The waiter blocked on the orphan lets it go when its holder does.
        holder.release()
        wait_for(lambda: _waiter_threads() == 0, "the orphan's waiter to finish")
        assert not probe_held(holder.lock_path + ".old")
    finally:
        holder.close()


class holding_in_another_process:
    """A ``Holder`` that must get the lock at once (``timeout=0``), released on exit."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> Holder:
        self.holder = Holder(self.path, timeout=0)
        return self.holder

    def __exit__(self, *exc: object) -> None:
        self.holder.release()
        self.holder.close()


# --- no blocking wait: fall back to polling -------------------------------------------------


def test_filesystem_without_blocking_flock_falls_back_to_polling(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_blocking_lock(fd: int) -> None:
        raise OSError(errno.ENOLCK, "no blocking locks here")

    monkeypatch.setattr(_lock_os, "lock_blocking", no_blocking_lock)
    holder = Holder(path)
    try:
        got: list[SessionWriteLock] = []
        thread = _in_thread(path, got, timeout=WAIT)
        wait_for(lambda: holder.lock_path in _lock_registry.no_blocking, "the waiter to fail")
        holder.release()
        thread.join(WAIT)  # found free on a later poll
        assert got and got[0].generation == holder.generation + 1
        got[0].release()
        assert _waiter_threads() == 0
    finally:
        _lock_registry.no_blocking.discard(holder.lock_path)
        holder.close()


def test_no_thread_for_a_waiter_falls_back_to_polling(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NoWaiterThread(threading.Thread):
        def start(self) -> None:
            if self.name == "sessionfence-lock-waiter":
                raise RuntimeError("can't start new thread")
            super().start()

    holder = Holder(path)
    monkeypatch.setattr(_lock_registry.threading, "Thread", NoWaiterThread)
    try:
        with pytest.raises(SessionWriteLockTimeoutError):
            acquire_session_write_lock(path, timeout=0.12)
        assert not _lock_registry.waiters and not _lock_registry.claimed
        holder.release()
        with acquire_session_write_lock(path, timeout=WAIT) as mine:
            assert mine.generation == holder.generation + 1
    finally:
        monkeypatch.undo()
        holder.close()


@linux_only
def test_lock_taken_before_the_waiter_thread_reached_flock(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The waiter thread is held back before its flock; the caller's re-check finds the
    # lock free through the waiter's descriptor, takes it, holds and releases it. Only then
    # does the thread reach flock, on its own duplicate: whatever it gets goes at once, and
    # no other descriptor of this process (one reusing a closed number) is touched.
    go = threading.Event()
    real_lock_blocking = _lock_os.lock_blocking

    def late_lock_blocking(fd: int) -> None:
        go.wait(WAIT)
        real_lock_blocking(fd)

    monkeypatch.setattr(_lock_os, "lock_blocking", late_lock_blocking)
    holder = Holder(path)
    try:
        got: list[SessionWriteLock] = []
        thread = _in_thread(path, got, timeout=WAIT)
        wait_for(lambda: holder.lock_path in _lock_registry.waiters, "the waiter to start")
        holder.release()
        thread.join(WAIT)  # taken on the caller's next re-check, the thread still held back
        assert got and got[0].generation == holder.generation + 1
        got[0].release()
        assert _waiter_threads() == 1
        decoy = os.open(os.devnull, os.O_RDONLY)  # likely the number the taken one had
        try:
            go.set()
            wait_for(lambda: _waiter_threads() == 0, "the late waiter thread to finish")
            assert not probe_held(holder.lock_path)
            decoy_ino = os.fstat(decoy).st_ino  # still open, and never locked by us:
            with open("/proc/locks", encoding="ascii") as fh:
                ours = [
                    line
                    for line in fh
                    if line.split()[4 if "->" not in line else 5] == str(os.getpid())
                    and line.split()[-3].rsplit(":", 1)[-1] == str(decoy_ino)
                ]
            assert ours == []
            lock_ino = os.stat(holder.lock_path).st_ino
            mine = [
                n
                for n in os.listdir("/proc/self/fd")
                if os.path.realpath(f"/proc/self/fd/{n}") == holder.lock_path
            ]
            assert mine == [], f"descriptors of {lock_ino} left open"
        finally:
            os.close(decoy)
        with holding_in_another_process(path) as other:
            assert other.generation == holder.generation + 2
    finally:
        go.set()
        holder.close()
