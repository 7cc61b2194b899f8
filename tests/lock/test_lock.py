"""Session write lock (SPEC §3) within one process: API, records, policy, threads, asyncio, CLI.

Cross-process behaviour (N x M stress, SIGKILL, fork, stale live holders, split inodes,
read-only directories) is in ``test_lock_processes.py``.

Ported from openclaw-fence.md §9.2 (by number): 1, 2, 3, 4, 5, 7, 12, 13, 14, 15, 16, 20,
26, 27, 28, 29, 30, 31, 32 (the parts about held vs free files); 17-19 and 41 become the
split-inode tests (a lock file replaced or unlinked while waiting).

Not applicable, because a crashed holder leaves no lock here (the kernel drops the flock
with the process) and the lock file is never removed on release:
- 6, 8, 9, 11, 43, 44, 45: reclaiming dead-pid, recycled-pid, payload-less or malformed
  orphan lock files, and their grace periods: there is nothing to reclaim; a record left
  by a dead holder is just a stale diagnostic, overwritten by the next winner (tested
  here as garbage / empty / huge records and in the SIGKILL tests).
- 10, 34, 40: cleanup-sweep grace for payload-less or orphan-self files: a sweep removes
  only session lock files (an owner record, or empty beside a session transcript) that it
  can lock itself; see ``test_lock_clean.py``.
- 21, 42, 49-53: exit and signal handlers removing lock files: the kernel releases the
  lock on any exit, and no handler is installed (so none can accumulate or mask others).
- 33, 35-39: owner argv checks ("non-OpenClaw owner") and their memoisation: a live
  holder is never broken, so its argv is irrelevant.
- 46-48: starttime-based reclaim of the own process's lock files: the own process's lock
  is never reported stale and never reclaimed, whatever its record says (tested).
- 22-25: max hold derived from a run timeout and the config-file layer: sessionfence has
  explicit arguments and environment overrides only (26 and the env tests cover those).
"""

from __future__ import annotations

import asyncio
import errno
import io
import itertools
import json
import logging
import math
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

import sessionfence
from sessionfence import (
    LockInfo,
    SessionWriteLock,
    SessionWriteLockAcquireError,
    SessionWriteLockStaleError,
    SessionWriteLockTimeoutError,
    acquire_session_write_lock,
    acquire_session_write_lock_async,
    clean_stale_locks,
    inspect_lock,
)
from sessionfence.cli import main as cli_main
from sessionfence.lock import _acquire as lock
from sessionfence.lock import _os as _lock_os
from sessionfence.lock import _record as _lock_record
from sessionfence.lock import _registry as _lock_registry

from .helpers import probe_held

if sys.platform != "win32":  # the module is skipped there, but must still be collectable
    import fcntl

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX flock semantics"),
    pytest.mark.timeout(60),
]

OWNER_RE = re.compile(r"^pid=\d+ host=\S+ alive=(true|false) ageMs=\d+$")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "session.jsonl"
    p.write_bytes(b'{"type":"session"}\n')
    return p


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TIMEOUT", "STALE", "MAX_HOLD"):
        monkeypatch.delenv(f"SESSIONFENCE_LOCK_{name}_MS", raising=False)


@contextmanager
def raw_holder(lock_path: str, content: bytes | None = None) -> Iterator[int]:
    """Hold the flock through a descriptor of our own, like a foreign process would.

    flock belongs to the open file description, so a second description in this process
    contends exactly like another process (and is not in sessionfence's registry).
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if content is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, content, 0)
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def other_pid() -> Iterator[int]:
    """A live process that is not us (and not our parent)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=-1)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _record(lock_path: str) -> dict[str, Any]:
    value = json.loads(Path(lock_path).read_bytes())
    assert isinstance(value, dict)
    return value


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(wall))


# --- API surface and the owner record -------------------------------------------------


def test_public_names_are_exported_lazily() -> None:
    for name in (
        "acquire_session_write_lock",
        "acquire_session_write_lock_async",
        "SessionWriteLock",
        "LockInfo",
        "inspect_lock",
        "clean_stale_locks",
    ):
        assert getattr(sessionfence, name) is getattr(lock, name)


def test_record_written_after_locking_and_marked_free_on_release(path: Path) -> None:
    held = acquire_session_write_lock(path)
    assert isinstance(held, SessionWriteLock)
    assert held.lock_path == str(path) + ".lock"
    assert held.acquired_at <= time.monotonic()
    record = _record(held.lock_path)
    assert record["pid"] == os.getpid()
    assert record["host"] == _lock_record.hostname()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", record["created_at"])
    assert record["max_hold_ms"] == 300_000
    assert record["generation"] == held.generation == 1
    assert re.fullmatch(r"[0-9a-f]{32}", record["token"]) and record["token"] == held.token
    if sys.platform.startswith("linux"):
        assert isinstance(record["starttime"], int)
    assert record["state"] == "held"
    assert stat.S_IMODE(os.stat(held.lock_path).st_mode) == 0o600
    held.release()
    held.release()  # idempotent
    assert not held.held
    # Never unlinked on release; the record stays for diagnostics, marked free.
    after = _record(held.lock_path)
    assert after["state"] == "free"
    assert {k: v for k, v in after.items() if k != "state"} == {
        k: v for k, v in record.items() if k != "state"
    }
    assert not probe_held(held.lock_path)


@pytest.mark.parametrize("how", ["unlink", "replace"])
def test_is_intact_notices_a_removed_or_replaced_lock_file(path: Path, how: str) -> None:
    held = acquire_session_write_lock(path)
    assert held.is_intact()
    if how == "unlink":
        os.unlink(held.lock_path)
    else:
        Path(held.lock_path + ".new").write_bytes(b"")
        os.replace(held.lock_path + ".new", held.lock_path)
    assert not held.is_intact()
    held.release()
    assert not held.is_intact()
    with acquire_session_write_lock(path, timeout=0) as again:
        assert again.is_intact()


def test_lock_key_uses_realpath_of_the_folder_when_the_file_is_missing(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    key, lock_path = lock.lock_path_for(tmp_path / "alias" / "new.jsonl")
    assert key == str(real / "new.jsonl")
    assert lock_path == key + ".lock"
    with pytest.raises(ValueError):
        lock.lock_path_for(str(tmp_path) + "/")
    with pytest.raises(TypeError):
        lock.lock_path_for(b"/tmp/x.jsonl")  # type: ignore[arg-type]


def test_missing_folder_is_created(tmp_path: Path) -> None:
    with acquire_session_write_lock(tmp_path / "a" / "b" / "s.jsonl") as held:
        assert os.path.isfile(held.lock_path)


def test_sync_and_async_context_managers(path: Path) -> None:
    with acquire_session_write_lock(path) as held:
        assert held.held and probe_held(held.lock_path)
    assert not held.held and not probe_held(held.lock_path)

    async def main() -> None:
        async with await acquire_session_write_lock_async(path) as got:
            assert got.held and probe_held(got.lock_path)
        assert not got.held

    asyncio.run(main())


# --- same process: non-reentrant by default, opt-in reentrancy ------------------------


def test_same_process_second_acquire_times_out(path: Path) -> None:  # §9.2 #3, #5
    held = acquire_session_write_lock(path)
    with pytest.raises(SessionWriteLockTimeoutError) as info:
        acquire_session_write_lock(path, timeout=0.005)
    err = info.value
    assert isinstance(err, SessionWriteLockAcquireError)
    assert err.timeout_ms == 5
    assert err.lock_path == held.lock_path
    assert OWNER_RE.match(err.owner), err.owner
    assert err.owner.startswith(f"pid={os.getpid()} ")
    assert str(err) == f"session file locked (timeout 5ms): {err.owner} {held.lock_path}"
    held.release()
    acquire_session_write_lock(path, timeout=0).release()


def test_same_process_exclusion_does_not_rely_on_flock_between_descriptors(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # flock emulated with POSIX record locks (NFS) lets a process lock twice; the
    # in-process claim must still make a second acquisition wait.
    monkeypatch.setattr(_lock_os, "try_lock", lambda fd, shared=False: True)
    held = acquire_session_write_lock(path)
    with pytest.raises(SessionWriteLockTimeoutError) as info:
        acquire_session_write_lock(path, timeout=0.06)
    assert info.value.owner.startswith(f"pid={os.getpid()} ")
    held.release()
    acquire_session_write_lock(path, timeout=0).release()


def test_same_process_symlinked_alias_is_not_reentrant(path: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias.jsonl"
    alias.symlink_to(path)  # §9.2 #4
    with acquire_session_write_lock(path), pytest.raises(SessionWriteLockTimeoutError):
        acquire_session_write_lock(alias, timeout=0)


def test_reentrant_owner_is_reference_counted(path: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias.jsonl"
    alias.symlink_to(path)
    first = acquire_session_write_lock(path, reentrant_owner="run-1")
    second = acquire_session_write_lock(alias, timeout=0, reentrant_owner="run-1")  # §9.2 #1
    assert second.lock_path == first.lock_path
    assert second.generation == first.generation
    with pytest.raises(SessionWriteLockTimeoutError):
        acquire_session_write_lock(path, timeout=0, reentrant_owner="run-2")
    with pytest.raises(SessionWriteLockTimeoutError):
        acquire_session_write_lock(path, timeout=0)
    first.release()
    first.release()  # a handle releases its own reference once
    assert second.held and probe_held(second.lock_path)  # §9.2 #2
    second.release()
    assert not probe_held(second.lock_path)
    assert os.path.exists(second.lock_path)


def test_empty_reentrant_owner_is_not_reentrant(path: Path) -> None:
    with (
        acquire_session_write_lock(path, reentrant_owner=""),
        pytest.raises(SessionWriteLockTimeoutError),
    ):
        acquire_session_write_lock(path, timeout=0, reentrant_owner="")


def test_own_process_lock_is_never_reported_stale(path: Path) -> None:  # §9.2 #15
    with acquire_session_write_lock(path), pytest.raises(SessionWriteLockTimeoutError):
        acquire_session_write_lock(path, timeout=0.06, stale=1e-6)
    # Also through inspect_lock.
    with acquire_session_write_lock(path):
        assert inspect_lock(path, stale=1e-6).stale_reasons == []


def test_own_lock_past_max_hold_is_released_by_watchdog_not_reported(
    path: Path,
) -> None:  # §9.2 #14
    held = acquire_session_write_lock(path, max_hold=0.2)
    # The contender waits like a foreign one; the holder's watchdog frees the lock.
    with acquire_session_write_lock(path, timeout=30, stale=1e-6) as second:
        assert held.force_released and not held.held
        assert second.generation == held.generation + 1


# --- timeouts, budgets, arguments and environment -------------------------------------


@contextmanager
def count_attempts() -> Iterator[list[bool]]:
    outcomes: list[bool] = []
    real = lock._attempt

    def counting(*args: Any) -> Any:
        result = real(*args)
        outcomes.append(isinstance(result, _lock_registry.Entry))
        return result

    lock._attempt = counting  # type: ignore[assignment]
    try:
        yield outcomes
    finally:
        lock._attempt = real


def test_timeout_zero_tries_exactly_once(path: Path) -> None:
    with acquire_session_write_lock(path), count_attempts() as outcomes:
        with pytest.raises(SessionWriteLockTimeoutError) as info:
            acquire_session_write_lock(path, timeout=0)
        assert info.value.timeout_ms == 0
    assert outcomes == [False]


def test_one_timeout_budget_across_retries(path: Path) -> None:  # §9.2 #28
    with (
        acquire_session_write_lock(path),
        count_attempts() as outcomes,
        pytest.raises(SessionWriteLockTimeoutError),
    ):
        acquire_session_write_lock(path, timeout=0.12)
    # Attempts at 0, >=50, >=100 and at the deadline (>=120 ms): retries never extend it.
    assert 2 <= len(outcomes) <= 4
    assert not any(outcomes)


def test_infinite_timeout_waits_until_released(path: Path) -> None:
    held = acquire_session_write_lock(path)
    got: list[SessionWriteLock] = []
    with count_attempts() as outcomes:
        waiter = threading.Thread(
            target=lambda: got.append(acquire_session_write_lock(path, timeout=math.inf))
        )
        waiter.start()
        deadline = time.monotonic() + 30
        while len(outcomes) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        held.release()
        waiter.join(30)
    assert got and got[0].generation == held.generation + 1
    got[0].release()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"timeout": -1}, ValueError),
        ({"timeout": math.nan}, ValueError),
        ({"stale": 0}, ValueError),
        ({"stale": math.inf}, ValueError),  # §9.2 #27: no infinite stale policy
        ({"max_hold": 0}, ValueError),
        ({"max_hold": -5}, ValueError),
        ({"timeout": "5"}, TypeError),
        ({"timeout": True}, TypeError),
        ({"reentrant_owner": 7}, TypeError),
    ],
)
def test_bad_arguments_are_rejected(path: Path, kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        acquire_session_write_lock(path, **kwargs)
    assert not os.path.exists(str(path) + ".lock")


def test_infinite_max_hold_is_clamped_in_the_record(path: Path) -> None:  # §9.2 #31
    with acquire_session_write_lock(path, max_hold=math.inf) as held:
        assert _record(held.lock_path)["max_hold_ms"] == 2_147_000_000


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("250", 0.25),
        (" 250\n", 0.25),
        ("1", 0.001),
        ("9007199254740991", 9007199254740.991),
        ("1e3", None),
        ("0x1000", None),
        ("9007199254740993", None),
        ("0", None),
        ("-5", None),
        ("+5", None),
        ("5.0", None),
        ("", None),
        ("١٢٣", None),  # Unicode digits are not decimal digits for operators
        ("inf", None),
    ],
)
def test_env_override_parsing(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: float | None
) -> None:  # §9.2 #26
    monkeypatch.setenv("SESSIONFENCE_LOCK_TIMEOUT_MS", raw)
    assert _lock_record.env_seconds("SESSIONFENCE_LOCK_TIMEOUT_MS") == expected


def test_env_overrides_replace_defaults_only_and_are_read_at_call_time(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = acquire_session_write_lock(path)
    monkeypatch.setenv("SESSIONFENCE_LOCK_TIMEOUT_MS", "30")
    with pytest.raises(SessionWriteLockTimeoutError) as info:
        acquire_session_write_lock(path)
    assert info.value.timeout_ms == 30
    with pytest.raises(SessionWriteLockTimeoutError) as info:
        acquire_session_write_lock(path, timeout=0)  # explicit wins, even 0
    assert info.value.timeout_ms == 0
    with pytest.raises(SessionWriteLockTimeoutError) as info:
        acquire_session_write_lock(path, timeout=0.05)
    assert info.value.timeout_ms == 50
    with pytest.raises(SessionWriteLockTimeoutError) as info:
        acquire_session_write_lock(path, timeout=None)  # "not given": env applies
    assert info.value.timeout_ms == 30
    monkeypatch.setenv("SESSIONFENCE_LOCK_TIMEOUT_MS", "1e3")
    assert _lock_record.resolve_settings(
        _lock_record.DEFAULT_TIMEOUT, _lock_record.DEFAULT_STALE, _lock_record.DEFAULT_MAX_HOLD
    )[0] == pytest.approx(60.0)
    held.release()
    monkeypatch.setenv("SESSIONFENCE_LOCK_MAX_HOLD_MS", "45000")
    with acquire_session_write_lock(path) as held:
        assert _record(held.lock_path)["max_hold_ms"] == 45_000
    with acquire_session_write_lock(path, max_hold=10) as held:
        assert _record(held.lock_path)["max_hold_ms"] == 10_000


# --- records written by others: garbage, foreign, crafted -----------------------------

GARBAGE = [
    b"",
    b"{",
    b'{"pid": 1',
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    b"null",
    b'{"pid": true, "generation": "7", "created_at": 5}',
    b'{"generation": -5}',
    b"[" * 100_000,
    b"x" * (5 << 20),
]


@pytest.mark.parametrize("content", GARBAGE, ids=lambda c: repr(c[:12]) + f"/{len(c)}")
def test_garbage_record_when_free_is_overwritten(path: Path, content: bytes) -> None:
    lock_path = str(path) + ".lock"
    Path(lock_path).write_bytes(content)
    _lock_registry.last_generation.pop(lock_path, None)
    with acquire_session_write_lock(path, timeout=0) as held:
        assert held.generation == 1
        record = _record(lock_path)  # whole, valid JSON, no garbage tail left behind
        assert record["generation"] == 1 and record["pid"] == os.getpid()
        assert os.path.getsize(lock_path) < 1024
    info = inspect_lock(path)
    assert not info.held and info.owner is not None and info.owner["state"] == "free"


@pytest.mark.parametrize("content", GARBAGE, ids=lambda c: repr(c[:12]) + f"/{len(c)}")
def test_garbage_record_of_a_holder_is_contention_and_kept(path: Path, content: bytes) -> None:
    lock_path = str(path) + ".lock"
    with raw_holder(lock_path, content):  # §9.2 #7
        with pytest.raises(SessionWriteLockTimeoutError) as info:
            acquire_session_write_lock(path, timeout=0.06, stale=1e-6)
        assert Path(lock_path).read_bytes() == content  # a loser never truncates
        assert info.value.owner.split()[0] in ("owner=unknown", "pid=True")
        looked = inspect_lock(path, stale=1e-6)
        assert looked.held and looked.stale_reasons == []


def test_crafted_old_record_of_a_live_foreign_holder_is_stale(
    path: Path, other_pid: int
) -> None:  # §9.2 #12, #16
    lock_path = str(path) + ".lock"
    record = {
        "pid": other_pid,
        "host": _lock_record.hostname(),
        "created_at": _iso(time.time() - 3600),
        "max_hold_ms": 1000,
        "generation": 41,
    }
    with raw_holder(lock_path, json.dumps(record).encode()):
        for _ in range(2):
            with pytest.raises(SessionWriteLockStaleError) as info:
                acquire_session_write_lock(path, timeout=0, stale=60)
            err = info.value
            assert isinstance(err, SessionWriteLockAcquireError)
            assert err.stale_reasons == ["too-old", "hold-exceeded"]
            assert OWNER_RE.match(err.owner) and err.owner.startswith(f"pid={other_pid} ")
            assert str(err) == (
                f"session file lock stale (too-old, hold-exceeded): {err.owner} {lock_path}"
            )
        assert json.loads(Path(lock_path).read_bytes()) == record  # never broken
        assert inspect_lock(path, stale=60).stale_reasons == ["too-old", "hold-exceeded"]
        assert inspect_lock(path, stale=7200).stale_reasons == ["hold-exceeded"]
    with acquire_session_write_lock(path, timeout=0) as held:
        assert held.generation == 42


def test_record_within_its_max_hold_is_fresh(path: Path, other_pid: int) -> None:  # §9.2 #13
    lock_path = str(path) + ".lock"
    record = {"pid": other_pid, "created_at": _iso(time.time() - 30), "max_hold_ms": 60_000}
    with raw_holder(lock_path, json.dumps(record).encode()):
        assert inspect_lock(path, stale=3600).stale_reasons == []
        with pytest.raises(SessionWriteLockTimeoutError):
            acquire_session_write_lock(path, timeout=0, stale=3600)


@pytest.mark.parametrize("case", ["dead-pid", "free", "other-host", "recycled", "future", "self"])
def test_old_records_that_do_not_name_a_live_holder_are_contention(
    path: Path, other_pid: int, case: str
) -> None:
    lock_path = str(path) + ".lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record: dict[str, Any] = {
        "pid": other_pid,
        "host": _lock_record.hostname(),
        "created_at": _iso(time.time() - 3600),
        "max_hold_ms": 1000,
    }
    if case == "dead-pid":
        record["pid"] = dead.pid
    elif case == "free":
        record["state"] = "free"  # the last holder released; whoever holds now is newer
    elif case == "other-host":
        record["host"] = "some-other-host.invalid"
    elif case == "recycled":
        starttime = _lock_record.process_starttime(other_pid)
        if starttime is None:
            pytest.skip("no /proc starttime on this platform")
        record["starttime"] = starttime + 1
    elif case == "future":
        record["created_at"] = _iso(time.time() + 86_400)  # skewed writer clock
    else:
        record["pid"] = os.getpid()
    with raw_holder(lock_path, json.dumps(record).encode()):
        with pytest.raises(SessionWriteLockTimeoutError) as info:
            acquire_session_write_lock(path, timeout=0, stale=60)
        owner = info.value.owner
        if case == "other-host":
            assert "alive=unknown" in owner
        elif case in ("dead-pid", "recycled"):
            assert "alive=false" in owner
        if case == "future":
            assert owner.endswith(" ageMs=0")
        assert inspect_lock(path, stale=60).stale_reasons == []


# --- faults -----------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))


def test_failed_record_write_releases_cleanly(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    acquire_session_write_lock(path).release()  # create the file; warm caches
    before = _open_fds()

    def disk_full(fd: int, data: bytes, offset: int = 0) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_lock_os, "write_at", disk_full)
    with pytest.raises(OSError) as info:
        acquire_session_write_lock(path, timeout=0)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _open_fds() == before
    assert not probe_held(str(path) + ".lock")
    with acquire_session_write_lock(path, timeout=0) as held:  # nothing left claimed
        assert held.held


def test_contended_polls_leak_no_descriptors(path: Path) -> None:
    lock_path = str(path) + ".lock"
    with raw_holder(lock_path, b'{"pid": 1}'):
        before = _open_fds()
        for _ in range(50):
            with pytest.raises(SessionWriteLockTimeoutError):
                acquire_session_write_lock(path, timeout=0)
        assert _open_fds() == before


# --- symlinks and odd files at the lock path ------------------------------------------


def test_lock_path_that_is_a_symlink_is_refused_target_untouched(
    path: Path, tmp_path: Path
) -> None:
    target = tmp_path / "precious.txt"
    target.write_bytes(b"do not truncate me\n")
    before = os.stat(target)
    os.symlink(target, str(path) + ".lock")
    with pytest.raises(OSError) as info:
        acquire_session_write_lock(path, timeout=5)
    assert info.value.errno == errno.ELOOP
    with pytest.raises(OSError):
        inspect_lock(path)
    assert clean_stale_locks(tmp_path) == []
    assert target.read_bytes() == b"do not truncate me\n"
    assert os.stat(target).st_mtime_ns == before.st_mtime_ns
    assert os.path.islink(str(path) + ".lock")


def test_dangling_symlink_lock_path_is_refused_and_not_created(path: Path, tmp_path: Path) -> None:
    target = tmp_path / "nowhere.txt"
    os.symlink(target, str(path) + ".lock")
    with pytest.raises(OSError) as info:
        acquire_session_write_lock(path, timeout=0)
    assert info.value.errno == errno.ELOOP
    assert not target.exists()


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_lock_path_that_is_not_a_regular_file(path: Path, kind: str) -> None:
    lock_path = str(path) + ".lock"
    if kind == "directory":
        os.mkdir(lock_path)
    else:
        os.mkfifo(lock_path)
    with pytest.raises(OSError):
        acquire_session_write_lock(path, timeout=5)


# --- clocks ---------------------------------------------------------------------------


def test_wall_clock_jumps_change_no_decision(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = time.time
    offset = [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])
    generations = []
    for jump in (3600.0, -3600.0, 86_400.0 * 365, -86_400.0 * 365):
        offset[0] = jump  # during acquire ...
        held = acquire_session_write_lock(path, max_hold=60, stale=600)
        generations.append(held.generation)
        offset[0] = -jump  # ... during the hold ...
        assert inspect_lock(path, stale=600).stale_reasons == []
        with pytest.raises(SessionWriteLockTimeoutError):
            acquire_session_write_lock(path, timeout=0, stale=600)
        assert held.held and probe_held(held.lock_path)  # the watchdog did not fire
        offset[0] = jump * 2  # ... and during release
        held.release()
        assert not probe_held(held.lock_path)
    assert generations == [1, 2, 3, 4]


def test_record_age_uses_the_monotonic_clock(
    monkeypatch: pytest.MonkeyPatch, other_pid: int
) -> None:
    data, _, _ = _lock_record.encode_record(
        generation=1, max_hold=5, monotonic=time.monotonic() - 10, wall=time.time()
    )
    record = _lock_record.parse_record(data)
    assert record is not None
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 86_400)
    age = _lock_record.record_age(record)
    if _lock_record.boot_id() is not None:
        assert age is not None and 10 <= age < 20
        assert "hold-exceeded" in _lock_record.stale_reasons(
            dict(record, pid=other_pid, starttime=None), 3600
        )


# --- threads and asyncio --------------------------------------------------------------


def test_threads_never_overlap(path: Path) -> None:
    threads_n, cycles = 4, 50
    intervals: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def worker(n: int) -> None:
        try:
            start.wait(30)
            for seq in range(cycles):
                with acquire_session_write_lock(path, timeout=30):
                    enter = time.monotonic_ns()
                    os.write(fd, json.dumps({"t": n}).encode()[:-1])
                    os.write(fd, f', "s": {seq}}}\n'.encode())
                    leave = time.monotonic_ns()
                intervals.append((enter, leave))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    os.close(fd)
    assert errors == []
    ordered = sorted(intervals)
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(ordered))
    lines = path.read_bytes().splitlines()[1:]
    got = sorted((e["t"], e["s"]) for e in map(json.loads, lines))
    assert got == [(n, s) for n in range(threads_n) for s in range(cycles)]


async def test_async_wait_does_not_block_the_event_loop(path: Path) -> None:
    held = acquire_session_write_lock(path)
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    with pytest.raises(SessionWriteLockTimeoutError):
        await acquire_session_write_lock_async(path, timeout=0.3)
    beat.cancel()
    # A loop blocked by the waiting acquirer would not have ticked at all.
    assert ticks >= 3
    held.release()


async def test_async_tasks_hand_over_and_cancel_cleanly(path: Path) -> None:
    first = await acquire_session_write_lock_async(path)
    waiter = asyncio.create_task(acquire_session_write_lock_async(path, timeout=30))
    await asyncio.sleep(0)  # let it make its first attempt
    assert not waiter.done()
    first.release()
    second = await waiter
    assert second.generation == first.generation + 1

    cancelled = asyncio.create_task(acquire_session_write_lock_async(path, timeout=30))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    second.release()
    # The cancelled acquisition left nothing held behind.
    async with await acquire_session_write_lock_async(path, timeout=0) as third:
        assert third.generation == second.generation + 1


async def test_async_reentrant_owner_across_tasks(path: Path) -> None:
    outer = await acquire_session_write_lock_async(path, reentrant_owner="turn")
    inner = await asyncio.create_task(
        acquire_session_write_lock_async(path, timeout=0, reentrant_owner="turn")
    )
    assert inner.generation == outer.generation
    outer.release()
    assert probe_held(inner.lock_path)
    inner.release()
    assert not probe_held(inner.lock_path)


# --- watchdog -------------------------------------------------------------------------


class _Flag(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.event = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.event.set()


def test_watchdog_force_releases_and_stale_handle_never_touches_new_holder(
    path: Path,
) -> None:  # §9.2 #20
    flag = _Flag()
    logger = logging.getLogger("sessionfence.lock")
    logger.addHandler(flag)
    try:
        old = acquire_session_write_lock(path, max_hold=0.05)
        assert flag.event.wait(30), "watchdog did not fire"
    finally:
        logger.removeHandler(flag)
    assert re.fullmatch(
        r"releasing session write lock held for \d+ms \(max=50ms\): " + re.escape(old.lock_path),
        flag.messages[0],
    )
    assert not old.held and old.force_released
    assert not probe_held(old.lock_path)
    new = acquire_session_write_lock(path, timeout=0)
    old.release()  # no-op
    old.release()
    assert new.held and probe_held(new.lock_path)
    assert _record(new.lock_path)["state"] == "held"
    new.release()


def test_watchdog_handles_many_short_holds(path: Path) -> None:
    # Out-of-order deadlines must wake the shared thread early enough.
    long_hold = acquire_session_write_lock(path, max_hold=300)
    short = acquire_session_write_lock(path.with_name("other.jsonl"), max_hold=0.05)
    deadline = time.monotonic() + 30
    while short.held and time.monotonic() < deadline:
        time.sleep(0.005)
    assert short.force_released
    assert long_hold.held
    long_hold.release()


# --- inspect_lock and clean_stale_locks -----------------------------------------------


def test_inspect_lock_states(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = inspect_lock(path)
    assert info == LockInfo(held=False, lock_path=str(path) + ".lock", owner=None, age=None)
    assert not os.path.exists(info.lock_path)  # inspecting never creates it
    with acquire_session_write_lock(path) as held:
        info = inspect_lock(path)
        assert info.held and info.owner is not None
        assert info.owner["token"] == held.token
        assert info.age is not None and info.age >= 0
        assert info.stale_reasons == []
    info = inspect_lock(path)
    assert not info.held and info.owner is not None and info.owner["state"] == "free"
    # §9.2 #29: the stale policy comes from the environment when not given.
    with raw_holder(info.lock_path) as fd:
        record = {"pid": os.getppid(), "created_at": _iso(time.time() - 45)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        if not _lock_record.pid_alive(os.getppid()):
            pytest.skip("parent process not visible")
        monkeypatch.setenv("SESSIONFENCE_LOCK_STALE_MS", "30000")
        assert inspect_lock(path).stale_reasons == ["too-old"]
        monkeypatch.setenv("SESSIONFENCE_LOCK_STALE_MS", "60000")
        assert inspect_lock(path).stale_reasons == []


def test_clean_stale_locks_removes_only_unheld_files(tmp_path: Path) -> None:  # §9.2 #30, #32
    free = tmp_path / "free.jsonl"
    ours = tmp_path / "ours.jsonl"
    foreign = tmp_path / "foreign.jsonl"
    acquire_session_write_lock(free).release()
    held = acquire_session_write_lock(ours, max_hold=300)
    (tmp_path / "garbage.jsonl.lock").write_bytes(b"\xff")
    (tmp_path / "dir.lock").mkdir()
    (tmp_path / "notes.txt").write_text("keep")
    old = {"pid": os.getppid(), "created_at": _iso(time.time() - 7200), "max_hold_ms": 1}
    with raw_holder(str(foreign) + ".lock", json.dumps(old).encode()):
        removed = clean_stale_locks(tmp_path)
        # Garbage is not a session lock (issue 10: it could be anyone's *.lock file).
        assert removed == [str(tmp_path / "free.jsonl.lock")]
        assert (tmp_path / "garbage.jsonl.lock").read_bytes() == b"\xff"
        # Held files stay, however old or past max hold their holder is.
        assert os.path.exists(str(foreign) + ".lock")
        assert os.path.exists(held.lock_path) and probe_held(held.lock_path)
    assert (tmp_path / "dir.lock").is_dir() and (tmp_path / "notes.txt").exists()
    held.release()
    with pytest.raises(FileNotFoundError):
        clean_stale_locks(tmp_path / "missing")


def test_removed_lock_file_cannot_split_a_waiter(path: Path) -> None:
    # After a clean, the next acquirer creates a fresh lock file and the generation in
    # this process keeps counting up.
    with acquire_session_write_lock(path) as held:
        gen = held.generation
    assert clean_stale_locks(path.parent) == [held.lock_path]
    with acquire_session_write_lock(path, timeout=0) as again:
        assert again.generation == gen + 1
        assert probe_held(again.lock_path)


# --- command line ---------------------------------------------------------------------


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli_main(argv)
    captured = capsys.readouterr()
    return code, out.getvalue() + captured.out, captured.err


def test_cli_locks_lists_and_cleans(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    acquire_session_write_lock(tmp_path / "a.jsonl").release()
    with acquire_session_write_lock(tmp_path / "b.jsonl"):
        code, out, _ = _run_cli(["locks", str(tmp_path), "--plain"], capsys)
        assert code == 0
        rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:-1]}
        assert rows == {"a.jsonl.lock": "free", "b.jsonl.lock": "held"}
        assert f"pid={os.getpid()} " in out
        assert out.splitlines()[-1] == "2 lock file(s), 1 held"
        code, out, _ = _run_cli(["locks", str(tmp_path), "--clean", "--plain"], capsys)
        assert code == 0
        assert "removed" in out and out.splitlines()[-1].endswith("1 removed")
        assert not (tmp_path / "a.jsonl.lock").exists()
        assert (tmp_path / "b.jsonl.lock").exists()


def test_cli_locks_without_rich(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    monkeypatch.setitem(sys.modules, "rich.table", None)
    acquire_session_write_lock(tmp_path / "a.jsonl").release()
    code, out, _ = _run_cli(["locks", str(tmp_path)], capsys)
    assert code == 0 and "a.jsonl.lock" in out and "free" in out


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_cli_locks_bad_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    target = tmp_path / "x"
    if kind == "file":
        target.write_text("")
    code, _, err = _run_cli(["locks", str(target)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("sessionfence locks: error: ")
