"""A fork never leaves the child holding a session lock (issue 10).

``flock`` belongs to the open file description, which a forked child shares with its
parent. A thread that has opened and locked the lock file but not yet registered the
descriptor when another thread forks used to leave the child with a copy that kept the
lock alive: once the parent released (or was SIGKILLed), everyone stayed blocked until
the child exited. Here a thread takes and drops the lock in a loop while the main thread
forks many times; every child stops itself and stays alive, and then

- each child has reported how many descriptors of the lock file it holds (must be 0), and
- with the parent's thread stopped and every child still alive, another process can take
  the lock at once (the kernel's answer, independent of the code under test).

An explicit release unlocks the open file description, which also frees a child's copy,
so the harm shows in full when the holder dies without releasing: the last test SIGKILLs
a holder process whose lock a child may have inherited, and the lock must die with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

from sessionfence import acquire_session_write_lock, inspect_lock
from sessionfence.lock import _registry as _lock_registry

from .helpers import WAIT, probe_held, process_state, wait_for

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/fd"),
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

FORKS = 60


def _lock_fds_here(ident: tuple[int, int]) -> int:
    """In the child: how many open descriptors refer to the lock file's inode."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue  # the listdir descriptor itself, closed by now
        if (st.st_dev, st.st_ino) == ident:
            count += 1
    return count


def _fork_stopped_child(ident: tuple[int, int]) -> tuple[int, int]:
    """Fork a child that reports its lock descriptors and stops; ``(pid, count)``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_end)
            os.write(write_end, bytes([min(_lock_fds_here(ident), 255)]))
            os.kill(os.getpid(), signal.SIGSTOP)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        report = fh.read(1)
    # Wait until it has stopped, so it is alive (and still holding whatever it inherited)
    # when the lock is probed below.
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"child {pid} did not stop: status {status}"
    assert len(report) == 1, "child died before reporting"
    return pid, report[0]


def _acquire_release(path: Path) -> None:
    acquire_session_write_lock(path, timeout=WAIT).release()


def _inspect(path: Path) -> None:
    inspect_lock(path)


@pytest.mark.parametrize("churn", [_acquire_release, _inspect], ids=["acquire", "inspect"])
def test_fork_while_another_thread_locks_leaves_the_child_nothing(
    tmp_path: Path, churn: Callable[[Path], None]
) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"type":"session"}\n')
    acquire_session_write_lock(path).release()  # the lock file exists from here on
    lock_path = str(path) + ".lock"
    st = os.stat(lock_path)
    ident = (st.st_dev, st.st_ino)

    stop = threading.Event()
    rounds = 0

    def loop() -> None:
        nonlocal rounds
        while not stop.is_set():
            churn(path)
            rounds += 1

    children: list[int] = []
    counts: list[int] = []
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        for _ in range(FORKS):
            pid, count = _fork_stopped_child(ident)
            children.append(pid)
            counts.append(count)
        stop.set()
        thread.join(WAIT)
        assert not thread.is_alive()
        assert rounds > 0
        # The parent holds nothing now, and every child is alive (stopped).
        leaked = [n for n in counts if n]
        assert not probe_held(lock_path), (
            f"a forked child keeps the lock alive; {len(leaked)} of {FORKS} children "
            f"inherited a lock descriptor"
        )
        assert leaked == [], f"{len(leaked)} of {FORKS} children inherited a lock descriptor"
        with acquire_session_write_lock(path, timeout=0):
            pass
        assert not _lock_registry.unregistered  # every tracked descriptor was closed
    finally:
        stop.set()
        thread.join(WAIT)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


ROUNDS = 40


def _holder_round(path: Path, ident: tuple[int, int], report: int) -> NoReturn:
    """Forked holder: a thread takes and drops the lock; fork a child while it does, then
    keep the lock taken next (or in progress) and wait to be SIGKILLed."""
    code = 1
    try:
        keep = threading.Event()
        kept = threading.Event()
        running = threading.Event()

        def loop() -> None:
            while True:
                held = acquire_session_write_lock(path, timeout=WAIT)
                if keep.is_set():
                    kept.set()
                    threading.Event().wait()  # hold until killed
                held.release()
                running.set()

        threading.Thread(target=loop, daemon=True).start()
        if not running.wait(WAIT):
            raise AssertionError("holder thread did not start")
        pid, count = _fork_stopped_child(ident)
        keep.set()
        if not kept.wait(WAIT):
            raise AssertionError("holder thread did not keep the lock")
        os.write(report, f"{pid} {count}\n".encode())
        threading.Event().wait()
    finally:
        os._exit(code)


def test_sigkilled_holder_does_not_leave_its_lock_to_a_forked_child(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"type":"session"}\n')
    acquire_session_write_lock(path).release()
    lock_path = str(path) + ".lock"
    st = os.stat(lock_path)
    ident = (st.st_dev, st.st_ino)
    leaked = survived = 0
    for _ in range(ROUNDS):
        read_end, write_end = os.pipe()
        holder = os.fork()
        if holder == 0:  # pragma: no cover - child
            os.close(read_end)
            _holder_round(path, ident, write_end)
        os.close(write_end)
        child = 0
        try:
            with os.fdopen(read_end, "rb") as fh:
                line = fh.readline().split()
            assert len(line) == 2, "holder died before reporting"
            child, count = int(line[0]), int(line[1])
            leaked += count > 0
            os.kill(holder, signal.SIGKILL)
            os.waitpid(holder, 0)
            holder = 0
            # The holder is dead; its child, forked while it was locking, is alive.
            assert process_state(child) == "T"
            if probe_held(lock_path):
                survived += 1
        finally:
            if holder:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(holder, signal.SIGKILL)
                os.waitpid(holder, 0)
            if child:
                # An orphan now (init reaps it); a dead or zombie process holds no locks.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
                wait_for(lambda c=child: _gone(c), f"child {child} to die")
    assert (survived, leaked) == (0, 0), (
        f"in {survived} of {ROUNDS} rounds the lock outlived its SIGKILLed holder in a "
        f"forked child; {leaked} children inherited a lock descriptor"
    )


def _gone(pid: int) -> bool:
    try:
        return process_state(pid) in ("Z", "X")
    except FileNotFoundError:
        return True
