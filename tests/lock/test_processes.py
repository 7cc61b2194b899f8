"""Session write lock across real processes: exclusion, crashes, stale reports, fork, races.

Every "is it held?" question is answered by ``probe_held`` (raw flock in a forked child),
independently of the code under test. Synchronisation is by pipes, multiprocessing events
and observed process states, never by sleeping for a while.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import sessionfence
from sessionfence import (
    SessionWriteLockStaleError,
    SessionWriteLockTimeoutError,
    acquire_session_write_lock,
)
from sessionfence.lock import LockInheritedError
from sessionfence.lock import _acquire as lock
from sessionfence.lock import _os as _lock_os
from sessionfence.lock import _registry as _lock_registry

from .helpers import (
    CTX,
    WAIT,
    Holder,
    holding,
    line_size,
    probe_held,
    process_state,
    stress_main,
    wait_for,
)

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX process semantics"),
    pytest.mark.timeout(60),
    # Fork with the watchdog thread alive is what these tests are about (3.12+ warns).
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="needs /proc to observe process states"
)


def _sweep_overlaps(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Pairs of hold intervals that overlap (an interval sweep over enter times)."""
    overlaps = []
    latest_leave, latest = -1, (-1, -1)
    for enter, leave in sorted(intervals):
        assert leave >= enter
        if enter < latest_leave:
            overlaps.append((enter, latest[1]))
        if leave > latest_leave:
            latest_leave, latest = leave, (enter, leave)
    return overlaps


def test_overlap_sweep_detects_overlap() -> None:
    # The oracle itself must be able to fail.
    assert _sweep_overlaps([(0, 10), (10, 20), (25, 30)]) == []
    assert _sweep_overlaps([(0, 10), (5, 20)]) != []
    assert _sweep_overlaps([(0, 100), (10, 20), (30, 40)]) != []


def test_n_processes_m_cycles_no_overlap_every_line_once(tmp_path: Path) -> None:
    writers, cycles = 8, 200
    transcript = tmp_path / "session.jsonl"
    start = CTX.Event()
    procs = []
    for writer in range(writers):
        out = tmp_path / f"intervals-{writer}.txt"
        proc = CTX.Process(
            target=stress_main, args=(str(transcript), str(out), writer, cycles, start)
        )
        proc.start()
        procs.append(proc)
    start.set()
    for proc in procs:
        proc.join(120)
    assert [p.exitcode for p in procs] == [0] * writers

    intervals = []
    for writer in range(writers):
        lines = (tmp_path / f"intervals-{writer}.txt").read_text().splitlines()
        assert len(lines) == cycles
        intervals += [tuple(map(int, line.split())) for line in lines]
    assert _sweep_overlaps(intervals) == []  # type: ignore[arg-type]

    seen: dict[tuple[int, int], int] = {}
    raw = transcript.read_bytes()
    assert raw.endswith(b"\n")
    for line in raw.split(b"\n")[:-1]:
        entry = json.loads(line)  # a torn or interleaved line fails here
        key = (entry["w"], entry["s"])
        assert entry["pad"] == "x" * line_size(*key)
        seen[key] = seen.get(key, 0) + 1
    assert seen == {(w, s): 1 for w in range(writers) for s in range(cycles)}


def test_sigkilled_holder_frees_the_lock_for_the_next_poll(tmp_path: Path) -> None:
    path = str(tmp_path / "s.jsonl")
    holder = Holder(path)
    try:
        with pytest.raises(SessionWriteLockTimeoutError):
            acquire_session_write_lock(path, timeout=0)

        # A contender already waiting: no attempt of it fails once the holder is reaped
        # (its waiter thread holds the lock by then, and its next attempt takes it).
        attempts: list[tuple[float, bool]] = []
        real_attempt = lock._attempt

        def counting_attempt(*args: Any) -> Any:
            started = time.monotonic()
            outcome = real_attempt(*args)
            attempts.append((started, isinstance(outcome, _lock_registry.Entry)))
            return outcome

        got: list[Any] = []
        waiter = threading.Thread(
            target=lambda: got.append(acquire_session_write_lock(path, timeout=WAIT))
        )
        lock._attempt = counting_attempt  # type: ignore[assignment]
        try:
            waiter.start()
            wait_for(lambda: len(attempts) >= 1, "the contender's first attempt")
            holder.kill()
            reaped = time.monotonic()
            waiter.join(WAIT)
        finally:
            lock._attempt = real_attempt
        assert got, "contender did not get the lock"
        assert all(ok for started, ok in attempts if started > reaped)
        assert attempts[-1][1]
        assert got[0].generation > holder.generation
        got[0].release()
        # And a fresh acquirer with no budget at all gets it too.
        acquire_session_write_lock(path, timeout=0).release()
    finally:
        holder.close()


def test_sigkill_right_after_reap_timeout_zero_succeeds(tmp_path: Path) -> None:
    path = str(tmp_path / "s.jsonl")
    holder = Holder(path)
    holder.kill()
    # The kernel drops a flock when the process exits, before the parent can reap it.
    with acquire_session_write_lock(path, timeout=0) as got:
        assert got.generation == holder.generation + 1
    holder.close()


def test_other_process_holder_blocks_then_releases(tmp_path: Path) -> None:
    path = str(tmp_path / "s.jsonl")
    with holding(path) as holder:
        with pytest.raises(SessionWriteLockTimeoutError) as info:
            acquire_session_write_lock(path, timeout=0.1)
        err = info.value
        assert err.lock_path == holder.lock_path
        assert err.timeout_ms == 100
        assert err.owner.startswith(f"pid={holder.pid} host=")
        assert " alive=true ageMs=" in err.owner
        assert str(err) == f"session file locked (timeout 100ms): {err.owner} {err.lock_path}"
        holder.release()
        with acquire_session_write_lock(path, timeout=0) as mine:
            assert mine.generation == holder.generation + 1


@pytest.mark.parametrize("alias", ["file-symlink", "dir-symlink", "dotdot"])
def test_symlinked_alias_contends_across_processes(tmp_path: Path, alias: str) -> None:
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    real = real_dir / "s.jsonl"
    real.write_text("")
    if alias == "file-symlink":
        other = tmp_path / "link.jsonl"
        other.symlink_to(real)
    elif alias == "dir-symlink":
        (tmp_path / "linkdir").symlink_to(real_dir)
        other = tmp_path / "linkdir" / "s.jsonl"
    else:
        (real_dir / "sub").mkdir()
        other = real_dir / "sub" / ".." / "s.jsonl"
    with holding(str(other)) as holder:
        assert holder.lock_path == str(real) + ".lock"
        with pytest.raises(SessionWriteLockTimeoutError):
            acquire_session_write_lock(real, timeout=0)
    with acquire_session_write_lock(other, timeout=0) as mine:
        assert mine.lock_path == str(real) + ".lock"
        assert probe_held(str(real) + ".lock")


def test_closing_other_descriptors_keeps_the_lock(tmp_path: Path) -> None:
    # lockf/F_SETLK would be dropped by any close() of the file in this process.
    path = tmp_path / "s.jsonl"
    path.write_text("{}\n")
    with acquire_session_write_lock(path) as held:
        Path(held.lock_path).read_bytes()
        path.read_bytes()
        fd = os.open(held.lock_path, os.O_RDONLY)
        os.close(fd)
        assert probe_held(held.lock_path)


@linux_only
def test_live_holder_past_max_hold_is_reported_not_broken(tmp_path: Path) -> None:
    path = str(tmp_path / "s.jsonl")
    holder = Holder(path, stop_self=True, max_hold=0.5)
    try:
        wait_for(lambda: process_state(holder.pid) == "T", "the holder to stop")
        record_before = Path(holder.lock_path).read_bytes()
        # The stopped holder's watchdog cannot run; the contender waits (its own timeout
        # is long) until the record is past its max hold, then reports at once.
        for _ in range(2):
            with pytest.raises(SessionWriteLockStaleError) as info:
                acquire_session_write_lock(path, timeout=WAIT)
            assert info.value.stale_reasons == ["hold-exceeded"]
            assert info.value.lock_path == holder.lock_path
            assert info.value.owner.startswith(f"pid={holder.pid} ")
            assert str(info.value).startswith("session file lock stale (hold-exceeded): pid=")
        assert sessionfence.inspect_lock(path).stale_reasons == ["hold-exceeded"]
        # Never broken: still held, record untouched.
        assert probe_held(holder.lock_path)
        assert Path(holder.lock_path).read_bytes() == record_before

        # Resumed, the holder's own watchdog force-releases it (past its deadline).
        os.kill(holder.pid, signal.SIGCONT)
        wait_for(lambda: holder.ask("state") == (False, True), "the watchdog to release")
        assert not probe_held(holder.lock_path)
        with acquire_session_write_lock(path, timeout=0) as mine:
            holder.release()  # the stale handle's release is a no-op ...
            assert probe_held(mine.lock_path)  # ... and does not touch the new holder
            assert mine.generation == holder.generation + 1
    finally:
        holder.close()


def test_live_holder_older_than_stale_is_reported(tmp_path: Path) -> None:
    path = str(tmp_path / "s.jsonl")
    with holding(path) as holder:
        # Any real record is older than a microsecond by the time we look at it.
        with pytest.raises(SessionWriteLockStaleError) as info:
            acquire_session_write_lock(path, timeout=WAIT, stale=1e-6)
        assert info.value.stale_reasons == ["too-old"]
        assert probe_held(holder.lock_path)
        # Same verdict from the environment knob, read at call time.
        os.environ["SESSIONFENCE_LOCK_STALE_MS"] = "1"
        try:
            with pytest.raises(SessionWriteLockStaleError):
                acquire_session_write_lock(path, timeout=0)
            # An explicit argument wins over the environment.
            with pytest.raises(SessionWriteLockTimeoutError):
                acquire_session_write_lock(path, timeout=0, stale=3600)
        finally:
            del os.environ["SESSIONFENCE_LOCK_STALE_MS"]
        holder.release()
        acquire_session_write_lock(path, timeout=0, stale=1e-6).release()


def test_wall_clock_jump_does_not_make_a_live_holder_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "s.jsonl")
    with holding(path, max_hold=60) as holder:
        real = time.time
        for jump in (86_400.0, -86_400.0, 3600.0):
            monkeypatch.setattr(time, "time", lambda jump=jump: real() + jump)
            with pytest.raises(SessionWriteLockTimeoutError):
                acquire_session_write_lock(path, timeout=0.06, stale=600)
            info = sessionfence.inspect_lock(path, stale=600)
            assert info.held and info.stale_reasons == []
            assert info.age is not None and 0 <= info.age < 600
            monkeypatch.undo()
        holder.release()


@pytest.mark.parametrize("child_action", ["release", "with-exit", "gc", "acquire", "exit"])
def test_fork_after_acquire_child_cannot_release(tmp_path: Path, child_action: str) -> None:
    path = str(tmp_path / "s.jsonl")
    held = acquire_session_write_lock(path)
    fd = held._entry.fd
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(read_end)
            try:
                os.fstat(fd)
                code = 10  # the inherited descriptor must be closed in the child
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    code = _child_action(held, path, child_action)
        finally:
            os.write(write_end, bytes([code]))
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        verdict = fh.read(1)
    os.waitpid(pid, 0)
    assert verdict == b"\x00", f"child check failed with code {verdict!r}"
    assert held.held
    assert probe_held(held.lock_path)
    held.release()
    assert not probe_held(held.lock_path)


def _child_action(held: lock.SessionWriteLock, path: str, action: str) -> int:
    assert not held.held
    if action == "release":
        try:
            held.release()
        except LockInheritedError:
            return 0
        return 2
    if action == "with-exit":
        try:
            with held:
                pass
        except LockInheritedError:
            return 0
        return 3
    if action == "gc":
        del held
        gc.collect()
        return 0
    if action == "acquire":
        try:
            acquire_session_write_lock(path, timeout=0)
        except SessionWriteLockTimeoutError:
            return 0
        return 4
    return 0


def test_fork_while_another_thread_acquires(tmp_path: Path) -> None:
    # The at-fork handler takes the registry lock; a thread mid-acquire must not leave it
    # locked in the child.
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            acquire_session_write_lock(tmp_path / "a.jsonl").release()

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(20):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                code = 1
                try:
                    acquire_session_write_lock(tmp_path / "b.jsonl", timeout=5).release()
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("how", ["unlink", "rename-away", "replace"])
def test_lock_file_replaced_while_waiting_no_split_brain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # portalocker #115: a waiter opens the old inode, the holder releases, the path is
    # unlinked or replaced and a third party locks the new file. The waiter then locks
    # the orphan; it must notice and go back to contending for the path.
    path = str(tmp_path / "s.jsonl")
    first = Holder(path)
    third: list[Holder] = []
    real_try_lock = _lock_os.try_lock
    calls = 0

    def racing_try_lock(fd: int, *, shared: bool = False) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            first.release()
            lock_path = first.lock_path
            if how == "unlink":
                os.unlink(lock_path)
            elif how == "rename-away":
                os.rename(lock_path, lock_path + ".old")
            else:
                tmp = lock_path + ".tmp"
                Path(tmp).write_bytes(b"")
                os.replace(tmp, lock_path)
            third.append(Holder(path))
        return real_try_lock(fd, shared=shared)

    monkeypatch.setattr(_lock_os, "try_lock", racing_try_lock)
    try:
        with pytest.raises(SessionWriteLockTimeoutError) as info:
            acquire_session_write_lock(path, timeout=0.2)
        assert info.value.owner.startswith(f"pid={third[0].pid} ")
        assert probe_held(first.lock_path)
        monkeypatch.undo()
        third[0].release()
        with acquire_session_write_lock(path, timeout=0) as mine:
            assert probe_held(mine.lock_path)
            # The hold is on the inode the path names, not on an orphan.
            assert os.fstat(mine._entry.fd).st_ino == os.stat(mine.lock_path).st_ino
    finally:
        first.close()
        for holder in third:
            holder.close()


def test_lock_file_unlinked_while_waiting_without_third_party(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "s.jsonl")
    first = Holder(path)
    real_try_lock = _lock_os.try_lock
    calls = 0

    def racing_try_lock(fd: int, *, shared: bool = False) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            first.release()
            os.unlink(first.lock_path)
        return real_try_lock(fd, shared=shared)

    monkeypatch.setattr(_lock_os, "try_lock", racing_try_lock)
    try:
        with acquire_session_write_lock(path, timeout=0) as mine:
            assert calls == 2  # the orphan was locked first, then the fresh file
            assert os.fstat(mine._entry.fd).st_nlink == 1
            assert probe_held(mine.lock_path)
    finally:
        first.close()


def test_generation_increases_across_processes_and_lock_file_loss(tmp_path: Path) -> None:
    path = str(tmp_path / "s.jsonl")
    gens = []
    for _ in range(3):
        with holding(path) as holder:
            gens.append(holder.generation)
            holder.release()
        with acquire_session_write_lock(path) as mine:
            gens.append(mine.generation)
    assert gens == list(range(gens[0], gens[0] + 6))
    # Garbage in the record: this process remembers what it saw and never goes back.
    Path(path + ".lock").write_bytes(b"\x00garbage")
    with acquire_session_write_lock(path) as mine:
        assert mine.generation == gens[-1] + 1
    os.unlink(path + ".lock")
    with acquire_session_write_lock(path) as mine:
        assert mine.generation == gens[-1] + 2


def _drop_to_nobody_and_acquire(path: str) -> int:
    """In a forked child: 0 = PermissionError, 1 = acquired, 2 = other error."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 2
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                acquire_session_write_lock(path, timeout=5).release()
                code = 1
            except PermissionError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX users")
def test_read_only_directory_is_permission_error_not_timeout(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # Root ignores permission bits, so drop to nobody in a forked child; the directory
        # lives under /tmp because pytest's tmp_path is private to root.
        base = tempfile.mkdtemp(prefix="sf-ro-")
        try:
            os.chmod(base, 0o755)
            ro = os.path.join(base, "ro")
            os.mkdir(ro, 0o555)
            os.chmod(ro, 0o555)
            # timeout=5: a permission problem mistaken for contention would end in a
            # SessionWriteLockTimeoutError (exit 2), not a PermissionError.
            assert _drop_to_nobody_and_acquire(os.path.join(ro, "s.jsonl")) == 0
        finally:
            os.chmod(os.path.join(base, "ro"), 0o755)
            shutil.rmtree(base, ignore_errors=True)
    else:
        ro_dir = tmp_path / "ro"
        ro_dir.mkdir()
        ro_dir.chmod(0o555)
        try:
            with pytest.raises(PermissionError):
                acquire_session_write_lock(ro_dir / "s.jsonl", timeout=5)
        finally:
            ro_dir.chmod(0o755)


@linux_only
def test_read_only_filesystem_is_permission_error(tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        with pytest.raises(PermissionError) as info:
            acquire_session_write_lock(mnt / "s.jsonl", timeout=5)
        assert info.value.errno == errno.EROFS
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
