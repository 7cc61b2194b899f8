"""Helpers for the lock tests: spawned holder processes, stress workers and an independent probe.

Kept importable by spawned children (no pytest import at module level, no tests here).
The probe uses raw ``fcntl.flock`` in a forked child, not sessionfence, so "is it held?"
is answered by the kernel rather than by the code under test.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

CTX = multiprocessing.get_context("spawn")
WAIT = 30.0  # generous bound for any hand-shake with a child process


def probe_held(lock_path: str) -> bool:
    """True if another process cannot take an exclusive flock on ``lock_path`` right now."""
    import fcntl

    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a threaded process (the lock watchdog is a
        # thread); this child only makes raw syscalls and _exits, so it cannot deadlock.
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 2
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                code = 0
            except OSError as exc:
                code = 1 if exc.errno in (errno.EAGAIN, errno.EACCES) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise AssertionError(f"probe failed on {lock_path} (exit {code})")
    return code == 1


def wait_for(predicate: Any, what: str, timeout: float = WAIT) -> None:
    """Poll an external condition (process state) with a deadline; fail loudly on expiry."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read()
    return raw[raw.rfind(b")") + 2 :].split()[0].decode()


def holder_main(conn: Connection, path: str, kwargs: dict[str, Any], stop_self: bool) -> None:
    """Hold the lock until told otherwise; report handle state on request."""
    import logging

    from sessionfence import acquire_session_write_lock

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    lock = acquire_session_write_lock(path, **kwargs)
    conn.send(("held", lock.generation, os.getpid(), lock.lock_path))
    if stop_self:
        # Stop ourselves right away: all threads, the watchdog included, freeze together,
        # so the hold outlives its max hold without any race against the test.
        os.kill(os.getpid(), signal.SIGSTOP)
    while True:
        cmd = conn.recv()
        if cmd == "release":
            lock.release()
            conn.send("released")
        elif cmd == "state":
            conn.send((lock.held, lock.force_released))
        elif cmd == "exit":
            return


class Holder:
    """A spawned process holding a session write lock."""

    def __init__(self, path: str, *, stop_self: bool = False, **kwargs: Any) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(
            target=holder_main, args=(child, path, kwargs, stop_self), daemon=True
        )
        self.proc.start()
        child.close()
        if not self.conn.poll(WAIT):
            self.kill()
            raise AssertionError("holder did not acquire the lock")
        tag, self.generation, self.pid, self.lock_path = self.conn.recv()
        assert tag == "held"

    def ask(self, cmd: str) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(WAIT):
            raise AssertionError(f"holder did not answer {cmd!r}")
        return self.conn.recv()

    def release(self) -> None:
        assert self.ask("release") == "released"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid or 0, signal.SIGKILL)
        self.proc.join(WAIT)

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid or 0, signal.SIGCONT)
            self.kill()
        self.conn.close()


@contextlib.contextmanager
def holding(path: str, **kwargs: Any) -> Iterator[Holder]:
    holder = Holder(path, **kwargs)
    try:
        yield holder
    finally:
        holder.close()


def line_size(writer: int, seq: int) -> int:
    # Mostly small lines, every 25th past 64 KiB so one line needs several write() calls
    # and exceeds PIPE_BUF and a page; deterministic so the checker can recompute it.
    if (writer + seq) % 25 == 0:
        return 70_000 + seq
    return (seq * 7919 + writer * 104_729) % 3000


def stress_main(path: str, out_path: str, writer: int, cycles: int, start: Any) -> None:
    """Lock, append one line in three writes, unlock; log monotonic hold intervals."""
    from sessionfence import acquire_session_write_lock

    if not start.wait(WAIT):
        raise SystemExit(3)
    intervals = []
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        for seq in range(cycles):
            data = (
                json.dumps({"w": writer, "s": seq, "pad": "x" * line_size(writer, seq)}) + "\n"
            ).encode()
            cut1, cut2 = len(data) // 3, 2 * len(data) // 3
            lock = acquire_session_write_lock(path, timeout=WAIT)
            enter = time.monotonic_ns()
            # Three separate appends: without exclusion another writer's bytes would land
            # between them and tear this line.
            for part in (data[:cut1], data[cut1:cut2], data[cut2:]):
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
            leave = time.monotonic_ns()
            lock.release()
            intervals.append((enter, leave))
    finally:
        os.close(fd)
    with open(out_path, "w", encoding="ascii") as fh:
        fh.writelines(f"{enter} {leave}\n" for enter, leave in intervals)


def blocked_in_flock(lock_path: str, pid: int | None = None) -> bool:
    """Whether the kernel lists a blocked flock request on ``lock_path`` (by ``pid``).

    Reads /proc/locks (Linux), where a request waiting for a lock is shown as ``->``: the
    kernel's own answer to "is someone waiting in flock", independent of the code under
    test.
    """
    ino = os.stat(lock_path).st_ino
    with open("/proc/locks", encoding="ascii") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) < 7 or fields[1] != "->" or fields[2] != "FLOCK":
                continue
            if int(fields[6].rsplit(":", 1)[-1]) != ino:
                continue
            if pid is None or int(fields[5]) == pid:
                return True
    return False


def counter_main(
    path: str, counter: str, marker: str, cycles: int, use_async: bool, start: Any
) -> None:
    """Take the lock ``cycles`` times; under it, read, increment and rewrite a counter file.

    The occupancy marker is created with ``O_EXCL`` on entry and removed on exit, so two
    holders at once fail loudly here (exit status), independently of the final count.
    """
    import asyncio

    from sessionfence import acquire_session_write_lock, acquire_session_write_lock_async

    def critical() -> None:
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SystemExit(7) from None  # another holder is inside: overlap
        os.close(fd)
        with open(counter, "r+", encoding="ascii") as fh:
            value = int(fh.read() or "0")
            fh.seek(0)
            fh.write(str(value + 1))
            fh.truncate()
        os.unlink(marker)

    if not start.wait(WAIT):
        raise SystemExit(3)
    if use_async:

        async def run() -> None:
            for _ in range(cycles):
                async with await acquire_session_write_lock_async(path, timeout=WAIT):
                    critical()

        asyncio.run(run())
    else:
        for _ in range(cycles):
            with acquire_session_write_lock(path, timeout=WAIT):
                critical()


def waiter_main(conn: Connection, path: str) -> None:
    """Report our pid, then wait for the lock (until killed, or it is handed to us)."""
    from sessionfence import acquire_session_write_lock

    conn.send(os.getpid())
    lock = acquire_session_write_lock(path, timeout=WAIT)
    conn.send("got")
    lock.release()
