"""Session write lock measures for ``sessionfence bench``: L1 (hand-off) and L2 (cost).

The targets are issue 16's ("Performance at the floor").

- **L1**: lock hand-off between two processes, p50, target <= 1 ms. The parent holds the
  lock while a spawned child waits inside ``acquire``; the parent releases, the child
  stamps the moment ``acquire`` returned. Latency = child's stamp - parent's stamp taken
  just before ``release()`` (``time.monotonic_ns``, one clock for every process on the
  host), so the release itself is included and the pipe that reports it is not. Before
  each timed release the parent sleeps a random 2 to 52 ms: the waiter is blocked by then,
  and a lock that polls (``filelock`` every 50 ms) is caught at a uniformly random phase
  of its poll, as in real use. ``filelock``'s hand-off is measured the same way in the
  same run when it is importable (it is a test extra, not a dependency); otherwise the
  cell says so.
- **L2**: uncontended ``acquire_session_write_lock`` + ``release`` ÷ its floor: the
  syscalls of a bare lock done directly (``open(O_RDWR|O_CREAT|O_CLOEXEC)``,
  ``flock(LOCK_EX|LOCK_NB)``, ``pwrite`` of a prepared owner record of the same size,
  ``close``), interleaved round by round, target <= 2. Beside it, informational: the ten
  syscalls the lock itself makes, done directly without any bookkeeping (what bounds the
  ratio: the identity check, the previous record's read and the release's "free" mark
  cost syscalls the floor does not make), and ``filelock``'s acquire + release.

The lock has no C path: its figures go in the ``python`` column, and the ``cffi`` cell says
so (``baseline``: the floor, or filelock).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..lock import _record as _rec
from ..lock import acquire_session_write_lock
from . import _suite as bs

__all__ = ["handoff_child", "lock_floor", "lock_syscalls", "measure_l1", "measure_l2"]

_WAIT = 30.0  # bound on every hand-shake with the child
_PHASE = (0.002, 0.052)  # seconds slept before each timed release (see the docstring)
_HANDOFF_ROUNDS = {"full": 41, "quick": 21, "tiny": 3}
# The lock is the same code under either backend: its cffi cell says so.
_NO_C = bs.Figure("same (no C path)")


def _filelock() -> Any | None:
    try:
        import filelock
    except ImportError:
        return None
    return filelock


def _locker(kind: str, transcript: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(acquire, release)`` of one lock implementation on one transcript."""
    if kind == "sessionfence":
        held: list[Any] = []

        def acquire() -> None:
            held.append(acquire_session_write_lock(transcript, timeout=_WAIT))

        def release() -> None:
            held.pop().release()

        return acquire, release
    filelock = _filelock()
    if filelock is None:  # pragma: no cover - the caller checks first
        raise RuntimeError("filelock is not importable")
    lock = filelock.FileLock(transcript + ".filelock", timeout=_WAIT)
    return lock.acquire, lock.release


def handoff_child(conn: Connection, kind: str, transcript: str) -> None:
    """The waiting side of L1 (spawned): on "wait", say "waiting", block in acquire, send
    the monotonic ns at which acquire returned; on "release", release; "stop" ends it."""
    acquire, release = _locker(kind, transcript)
    while True:
        command = conn.recv()
        if command == "stop":
            return
        if command == "release":
            release()
            conn.send("released")
            continue
        conn.send("waiting")
        acquire()
        conn.send(time.monotonic_ns())


class _Handoff:
    """A spawned child that takes the lock from this process, round by round."""

    def __init__(self, kind: str, transcript: str) -> None:
        self.acquire, self.release = _locker(kind, transcript)
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_end = ctx.Pipe()
        self.child = ctx.Process(
            target=handoff_child, args=(child_end, kind, transcript), daemon=True
        )
        self.child.start()
        child_end.close()

    def _expect(self) -> Any:
        if not self.conn.poll(_WAIT):
            raise bs.BenchError("the lock hand-off child stopped answering")
        return self.conn.recv()

    def once(self, rng: random.Random) -> float:
        """ns from just before this process's release to the child's acquire returning."""
        self.acquire()
        self.conn.send("wait")
        if self._expect() != "waiting":  # pragma: no cover - protocol error
            raise bs.BenchError("unexpected answer from the hand-off child")
        time.sleep(rng.uniform(*_PHASE))
        t0 = time.monotonic_ns()
        self.release()
        t1 = int(self._expect())
        self.conn.send("release")
        if self._expect() != "released":  # pragma: no cover - protocol error
            raise bs.BenchError("unexpected answer from the hand-off child")
        return float(t1 - t0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send("stop")
        self.child.join(_WAIT)
        if self.child.is_alive():  # pragma: no cover - a stuck child
            self.child.kill()
            self.child.join()
        self.conn.close()


def _p50(samples: list[float]) -> bs.Stats:
    return bs.Stats(float(statistics.median(samples)), float(min(samples)), len(samples))


def measure_l1(bench: bs.Bench, rounds: int | None = None) -> list[bs.Result]:
    if rounds is None:
        rounds = _HANDOFF_ROUNDS.get(bench.profile.name, 21)
        if bench.rounds != bench.profile.rounds:
            rounds = bench.rounds  # --rounds
    kinds = ["sessionfence"] + (["filelock"] if _filelock() is not None else [])
    transcript = str(bench.path("handoff"))
    with open(transcript, "wb") as f:
        f.write(b'{"type":"session"}\n')
    rng = random.Random(16)
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    pairs: dict[str, _Handoff] = {}
    try:
        for kind in kinds:
            pairs[kind] = _Handoff(kind, transcript)
            pairs[kind].once(rng)  # warm-up: imports, the child's first acquisition
        for r in range(rounds):
            order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
            for kind in order:
                samples[kind].append(pairs[kind].once(rng))
    finally:
        for pair in pairs.values():
            pair.close()
    ours = _p50(samples["sessionfence"])
    figures: dict[bs.Column, bs.Figure] = {"python": bs.Figure(_ms(ours), ours), "cffi": _NO_C}
    if "filelock" in samples:
        theirs = _p50(samples["filelock"])
        figures["baseline"] = bs.Figure(f"filelock {_ms(theirs)}", theirs)
        reference = f"filelock {_ms(theirs)} (p50, same run)"
    else:
        figures["baseline"] = bs.Figure("filelock n/a")
        reference = "filelock not importable: not measured"
    p99 = sorted(samples["sessionfence"])[max(0, round(0.99 * len(samples["sessionfence"])) - 1)]
    return [
        bs.Result(
            "L1",
            "handoff",
            "lock hand-off between two processes, p50 (ms)",
            ours.median / 1e6,
            "p50 ms",
            bs.Target("<=", 1),
            figures,
            ours.min / 1e6,
            {
                "rounds": rounds,
                "p99_ms": p99 / 1e6,
                "filelock_p50_ms": (
                    statistics.median(samples["filelock"]) / 1e6 if "filelock" in samples else None
                ),
                "platform": sys.platform,
            },
            note=f"release → the waiting process's acquire returns; {reference}",
        )
    ]


def _ms(s: bs.Stats) -> str:
    return f"{s.median / 1e6:.3f} ms"


def lock_floor(lock_path: str, record: bytes) -> Callable[[], None]:
    """The floor of L2: a bare lock's syscalls, done directly."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        def floor() -> None:
            fd = os.open(lock_path, flags, 0o600)
            os.lseek(fd, 0x7FFF_FFF0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, record)
            os.close(fd)

        return floor

    import fcntl

    exclusive = fcntl.LOCK_EX | fcntl.LOCK_NB

    def floor() -> None:
        fd = os.open(lock_path, flags, 0o600)
        fcntl.flock(fd, exclusive)
        os.pwrite(fd, record, 0)
        os.close(fd)

    return floor


def lock_syscalls(transcript: str, record: bytes) -> Callable[[], None]:
    """What bounds L2: the syscalls an uncontended acquire + release makes, done directly
    with no bookkeeping (``strace`` of one cycle: lstat of the transcript (its remembered
    real path still holds), open, flock, fstat, lstat of the lock path (identity check),
    pread of the previous record, pwrite of ours; release: pwrite "free", flock(LOCK_UN),
    close). POSIX only."""
    import fcntl

    lock_path = transcript + ".lock"
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    exclusive, unlock = fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_UN
    size, state_at = len(record), max(0, len(record) - 7)

    def syscalls() -> None:
        os.lstat(transcript)
        fd = os.open(lock_path, flags)
        fcntl.flock(fd, exclusive)
        os.fstat(fd)
        os.lstat(lock_path)
        os.pread(fd, size, 0)
        os.pwrite(fd, record, 0)
        os.pwrite(fd, b"free", state_at)
        fcntl.flock(fd, unlock)
        os.close(fd)

    return syscalls


def measure_l2(bench: bs.Bench) -> list[bs.Result]:
    transcript = str(bench.path("uncontended"))
    with open(transcript, "wb") as f:
        f.write(b'{"type":"session"}\n')

    def ours() -> None:
        acquire_session_write_lock(transcript, timeout=0).release()

    ours()
    with open(transcript + ".lock", "rb") as lock_file:
        size = len(lock_file.read())
    # A record like ours, of the same size: the floor writes as many bytes.
    data, _, _ = _rec.encode_record(
        generation=1, max_hold=300.0, monotonic=time.monotonic(), wall=time.time()
    )
    record = data[:size].ljust(size, b" ")
    contenders: dict[str, bs.Contender] = {
        "floor": bench.batch(lock_floor(transcript + ".floor", record)),
        "sessionfence": bench.batch(ours),
    }
    if sys.platform != "win32":
        # Its own lock file, with the same record: never contends with ``ours``.
        bound = transcript + ".bound"
        with open(bound, "wb") as f:
            f.write(b"")
        with open(bound + ".lock", "wb") as f:
            f.write(record)
        contenders["syscalls"] = bench.batch(lock_syscalls(bound, record))
    filelock = _filelock()
    if filelock is not None:
        lock = filelock.FileLock(transcript + ".filelock", timeout=0)

        def theirs() -> None:
            lock.acquire()
            lock.release()

        contenders["filelock"] = bench.batch(theirs)
    stats = bs.race(contenders, bench.rounds)
    floor, mine = stats["floor"], stats["sessionfence"]
    results = [
        bs.Result(
            "L2",
            "acquire_release",
            "lock acquire + release ÷ open + flock + record + close",
            mine.median / floor.median,
            "acquire + release ÷ floor",
            bs.Target("<=", 2),
            {
                "baseline": bs._time_fig(floor, "floor "),
                "python": bs._time_fig(mine),
                "cffi": _NO_C,
            },
            mine.min / floor.min,
            {"record_bytes": size},
            note="uncontended, one process; floor: the bare syscalls with a prepared record",
        )
    ]
    if "syscalls" in stats:
        direct = stats["syscalls"]
        results.append(
            bs.Result(
                "L2",
                "syscalls",
                "the lock's own 10 syscalls, done directly ÷ the same floor (its bound)",
                direct.median / floor.median,
                "syscalls ÷ floor",
                bs.Target("<=", 2),
                {
                    "baseline": bs._time_fig(floor, "floor "),
                    "python": bs._time_fig(direct, "syscalls "),
                    "cffi": _NO_C,
                },
                direct.min / floor.min,
                note="lstat, open, flock, fstat, lstat, pread, pwrite; pwrite, flock, close",
                informational=True,
            )
        )
    if filelock is not None:
        theirs_stats = stats["filelock"]
        results.append(
            bs.Result(
                "L2",
                "filelock",
                "filelock acquire + release ÷ the same floor (reference)",
                theirs_stats.median / floor.median,
                "filelock ÷ floor",
                bs.Target("<=", 2),
                {
                    "baseline": bs._time_fig(floor, "floor "),
                    "python": bs._time_fig(theirs_stats, "filelock "),
                    "cffi": _NO_C,
                },
                theirs_stats.min / floor.min,
                informational=True,
            )
        )
    return results


L1 = bs.measure("L1", "lock hand-off between two processes, p50")(measure_l1)
L2 = bs.measure("L2", "lock acquire + release ÷ open + flock + record + close")(measure_l2)
