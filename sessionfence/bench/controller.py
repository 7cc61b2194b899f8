"""Controller measures for ``sessionfence bench``: P7, and P2 through the controller.

The targets are in docs/design.md, "Performance targets".

- **P7**: ``release_for_prompt()`` + ``reacquire_after_prompt()`` with no change in between,
  1 GiB ÷ 1 KiB transcript (cffi), target <= 1.5. Beside it, in the same run: the pure
  backend, and ``naive`` = what a content-checking fence without a rolling digest does
  (read the whole file at release and again at reacquire, compare; the openclaw
  controller's algorithm).
- **P2c**: the synchronous owned write of a compaction line (``owned_file_write`` with
  ``is_expected_compaction_append``) on a 100 MiB transcript, naive ÷ cffi, target >= 10 000.
  ``naive`` reads the whole file as UTF-8 before and after the append, checks
  ``startswith``, then validates the suffix (the openclaw controller's validation). The
  append itself is not timed on either side.

The lock is a no-op injected ``acquire``: the measures are about the fence, and a real
lock's cost does not depend on the transcript's size. Each controller runs on its own event
loop and is pinned to its backend, so contenders can be raced round by round.

``measure_p7`` and ``measure_p2_controller`` take a ``Bench``. Importing this module
registers them with ``measure`` as ``P7`` and ``P2c``; ``load_measures()`` imports it
(``MEASURE_MODULES``), which puts them in ``sessionfence bench``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import _backend
from .._types import same_stat
from ..controller import SessionFenceController
from ..journal._writer import journaled
from ..transcript import is_expected_compaction_append
from . import _suite as bs

__all__ = [
    "ControllerBench",
    "measure_p2_controller",
    "measure_p7",
    "naive_owned_compaction",
    "naive_release_reacquire",
]

_CHUNK = 8 * bs.MiB


class _NullLock:
    def release(self) -> None:
        return None


def _null_acquire(path: Any, **options: Any) -> _NullLock:
    return _NullLock()


def compaction_line(entry_id: str) -> bytes:
    return (
        b'{"type":"compaction","id":"' + entry_id.encode() + b'","parentId":null,'
        b'"timestamp":"2026-01-01T00:00:00.000Z","summary":"older turns, summarised",'
        b'"firstKeptEntryId":"00000000","tokensBefore":4321}\n'
    )


def _append(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class ControllerBench:
    """One controller on one transcript, pinned to one backend, with its own event loop.

    The fence is activated once before anything is timed (the first activation computes
    the content digest: once per file per process)."""

    def __init__(self, path: Path, impl: ModuleType, *, verify: str = "tail") -> None:
        self.path = path
        self.impl = impl
        self.loop = asyncio.new_event_loop()
        self._counter = 0
        with _backend.use(impl):  # the controller keeps the backend it was created with
            self.ctl = self.loop.run_until_complete(self._create(verify))
        self.loop.run_until_complete(self.ctl.release_for_prompt())
        self.loop.run_until_complete(self.ctl.reacquire_after_prompt())

    async def _create(self, verify: str) -> SessionFenceController:
        return await SessionFenceController.create(
            self.path,
            acquire=_null_acquire,
            verify="full" if verify == "full" else "tail",
        )

    async def _cycle(self, n: int) -> int:
        clock = time.perf_counter_ns
        ctl = self.ctl
        t0 = clock()
        for _ in range(n):
            await ctl.release_for_prompt()
            await ctl.reacquire_after_prompt()
        return clock() - t0

    def release_reacquire(self, n: int = 1) -> float:
        """Mean ns of one release_for_prompt + reacquire_after_prompt over ``n``."""
        ns = self.loop.run_until_complete(self._cycle(n))
        if self.ctl.has_takeover:  # pragma: no cover - nothing changes the file
            raise AssertionError(f"unexpected takeover: {self.ctl.takeover!r}")
        return ns / n

    def owned_compaction(self) -> float:
        """ns of one owned compaction append (owned_file_write with the validator), minus
        the append itself. The file grows by one line per call; every call must publish."""
        self._counter += 1
        entry_id = f"{self._counter:08x}"
        line = compaction_line(entry_id)
        clock = time.perf_counter_ns
        spent = [0]

        def run() -> str:
            t = clock()
            _append(self.path, line)
            spent[0] = clock() - t
            return entry_id

        if self.ctl.holds_lock:
            self.loop.run_until_complete(self.ctl.release_for_prompt())
        t0 = clock()
        self.ctl.owned_file_write(run, is_expected_compaction_append)
        took = clock() - t0 - spent[0]
        if not same_stat(self.ctl.fence_fingerprint, self.impl.fingerprint(self.path)):
            raise AssertionError("the owned compaction was not published")  # pragma: no cover
        return float(took)

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.ctl.dispose())  # also closes its file probe
        finally:
            self.loop.close()


def naive_release_reacquire(path: Path) -> float:
    """ns of the naive fence around a prompt: hash the whole file at release, again at
    reacquire, compare (streamed in 8 MiB chunks: a 1 GiB file is not held in memory)."""
    clock = time.perf_counter_ns

    def digest() -> bytes:
        state = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(_CHUNK):
                state.update(chunk)
        return state.digest()

    t0 = clock()
    before = digest()
    after = digest()
    took = clock() - t0
    if before != after:  # pragma: no cover
        raise AssertionError("naive fence saw a change that did not happen")
    return float(took)


def naive_owned_compaction(path: Path, counter: list[int]) -> float:
    """ns of the naive owned compaction validation (two whole-file UTF-8 reads and a
    prefix compare, as the openclaw controller did), minus the append itself."""
    counter[0] += 1
    entry_id = f"{counter[0]:08x}"
    line = compaction_line(entry_id)
    clock = time.perf_counter_ns
    t0 = clock()
    with open(path, "rb") as f:
        before = f.read().decode("utf-8")
    t1 = clock()
    _append(path, line)
    t2 = clock()
    with open(path, "rb") as f:
        after = f.read().decode("utf-8")
    ok = after.startswith(before) and is_expected_compaction_append(entry_id, after[len(before) :])
    t3 = clock()
    if not ok:  # pragma: no cover
        raise AssertionError("naive validation refused an owned compaction")
    return float((t1 - t0) + (t3 - t2))


def _samples(fn: Callable[[], float]) -> bs.Contender:
    return lambda: [fn()]


def measure_p7(
    bench: bs.Bench, large: int = 1 * bs.GiB, small: int = 1 * bs.KiB
) -> list[bs.Result]:
    if bench.profile.name == "tiny":
        large, small = bench.profile.p1_sizes[0], 1 * bs.KiB
    cycles: dict[str, ControllerBench] = {}
    try:
        for size in (large, small):
            path = bench.transcript(size, "p7")
            bs.warm(path)
            for name, impl in bench.impls.items():
                cycles[f"{name}@{size}"] = ControllerBench(path, impl)
        contenders: dict[str, bs.Contender] = {}
        for key, cb in cycles.items():
            inner = bs.calibrate(cb.release_reacquire, bench.profile.batch_ns)
            contenders[key] = _samples(functools.partial(cb.release_reacquire, inner))
        stats = bs.race(contenders, bench.rounds)
        naive = bs.race(
            {
                f"naive@{size}": _samples(
                    functools.partial(naive_release_reacquire, bench.transcript(size, "p7"))
                )
                for size in (large, small)
            },
            bench.slow_rounds,
        )
    finally:
        for cb in cycles.values():
            cb.close()
    stats.update(naive)
    figures: dict[bs.Column, bs.Figure] = {}
    for name in ("naive", "python", "cffi"):
        a, b = stats[f"{name}@{large}"], stats[f"{name}@{small}"]
        figures[bs._col(name)] = bs.Figure(
            f"{bs.format_ns(a.median)} / {bs.format_ns(b.median)}", a
        )
    a, b = stats[f"cffi@{large}"], stats[f"cffi@{small}"]
    return [
        bs.Result(
            "P7",
            "release_reacquire",
            f"controller release + reacquire, {bs.format_bytes(large)} ÷ {bs.format_bytes(small)}",
            a.median / b.median,
            f"cffi {bs.format_bytes(large)} ÷ cffi {bs.format_bytes(small)}",
            bs.Target("<=", 1.5),
            figures,
            a.min / b.min,
            {"large": large, "small": small, "lock": "no-op injected"},
            note="cells: large / small transcript; naive hashes the whole file twice",
        )
    ]


def measure_p2_controller(bench: bs.Bench, size: int | None = None) -> list[bs.Result]:
    size = bench.profile.p2_size if size is None else size
    cycles: dict[str, ControllerBench] = {}
    counter = [0]
    naive_path = bench.transcript(size, "p2c-naive")
    bs.warm(naive_path)
    try:
        for name, impl in bench.impls.items():
            path = bench.transcript(size, f"p2c-{name}")
            bs.warm(path)
            cycles[name] = ControllerBench(path, impl)
        contenders = {name: _samples(cb.owned_compaction) for name, cb in cycles.items()}
        for c in contenders.values():
            c()  # warm-up, not recorded
        stats = bs.race(contenders, bench.rounds)
        stats.update(
            bs.race(
                {"naive": _samples(functools.partial(naive_owned_compaction, naive_path, counter))},
                bench.slow_rounds,
            )
        )
    finally:
        for cb in cycles.values():
            cb.close()
    return [
        bs.Result(
            "P2c",
            "owned_compaction",
            f"owned compaction append through the controller, {bs.format_bytes(size)}",
            stats["naive"].median / stats["cffi"].median,
            "naive ÷ cffi",
            bs.Target(">=", 10_000),
            {bs._col(name): bs._time_fig(stats[name]) for name in ("naive", "python", "cffi")},
            stats["naive"].min / stats["cffi"].min,
            {"size": size, "lock": "no-op injected"},
            note="owned_file_write + validator, the append itself untimed",
        )
    ]


P7 = bs.measure("P7", "controller release + reacquire, no change: 1 GiB ÷ 1 KiB transcript (cffi)")(
    measure_p7
)
P2C = bs.measure("P2c", "owned compaction append through the controller: naive ÷ cffi")(
    measure_p2_controller
)


# ------------------------------------------------------------------------------------------
# One turn with the real lock: T1 (1 GiB ÷ 1 MiB) and T2 (÷ the same syscalls done directly).
# ------------------------------------------------------------------------------------------

_TURN_LINE = (
    b'{"type":"message","id":"00000000","parentId":null,"timestamp":"2026-01-01T00:00:00.000Z",'
    b'"message":{"role":"assistant","content":[{"type":"text","text":"ok"}]}}\n'
)


class _OwnLoop:
    """A controller with the real session write lock on its own event loop, pinned to one
    backend, and an O_APPEND descriptor of its transcript for the owned appends."""

    def __init__(self, path: Path, backend: str, **options: Any) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND)
        with _backend.use(backend):
            self.ctl = self.loop.run_until_complete(SessionFenceController.create(path, **options))

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.ctl.dispose())
        finally:
            self.loop.close()
            os.close(self.fd)


def _race(bench: bs.Bench, runs: Mapping[str, Any], op: str) -> dict[str, bs.Stats]:
    """Calibrate each run's ``op`` (a method taking a repeat count and returning mean ns)
    to the profile's batch and race them interleaved."""
    contenders: dict[str, bs.Contender] = {}
    for key, run in runs.items():
        fn = getattr(run, op)
        contenders[key] = _samples(functools.partial(fn, bs.calibrate(fn, bench.profile.batch_ns)))
    return bs.race(contenders, bench.rounds)


class TurnBench(_OwnLoop):
    """One controller with the real session write lock (tail mode): a turn is an owned
    append under ``write_lock()`` (the retained lock), ``release_for_prompt()`` and
    ``reacquire_after_prompt()``, as a fleet worker's turn without the model call."""

    def __init__(self, path: Path, backend: str = "cffi", **options: Any) -> None:
        super().__init__(path, backend, **options)
        self.loop.run_until_complete(self._turns(2))  # activates the fence, warms up

    def _append(self) -> None:
        os.write(self.fd, _TURN_LINE)

    async def _turns(self, n: int) -> int:
        clock = time.perf_counter_ns
        ctl, append = self.ctl, self._append
        t0 = clock()
        for _ in range(n):
            async with ctl.write_lock():
                append()
            await ctl.release_for_prompt()
            await ctl.reacquire_after_prompt()
        return clock() - t0

    def turns(self, n: int = 1) -> float:
        ns = self.loop.run_until_complete(self._turns(n))
        if self.ctl.has_takeover:  # pragma: no cover
            raise AssertionError(f"unexpected takeover: {self.ctl.takeover!r}")
        return ns / n


class SyscallFloor:
    """The system calls of one turn made directly from Python, nothing else: the owned
    append and its refresh (write, stat, pread of the tail window and the suffix, fstat),
    the release (flock unlock, close), the reacquire (open, flock, write of the owner record,
    fstat) and the fence check (stat, pread of the tail window, fstat)."""

    def __init__(self, path: Path, window: int = 4096) -> None:
        import fcntl  # POSIX only: T2 is skipped elsewhere

        self.fcntl = fcntl
        self.path = str(path)
        self.lock_path = str(path) + ".floor.lock"
        self.window = window
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.rfd = os.open(path, os.O_RDONLY)
        self.lfd = self._lock()
        self.record = (
            b'{"pid":1,"host":"h","starttime":null,"created_at":"2026-01-01T00:00:00.000Z",'
            b'"max_hold_ms":300000,"generation":1,"token":"0123456789abcdef"}\n'
        )

    def _lock(self) -> int:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        self.fcntl.flock(fd, self.fcntl.LOCK_EX | self.fcntl.LOCK_NB)
        return fd

    def turns(self, n: int = 1) -> float:
        clock = time.perf_counter_ns
        fcntl, path, rfd, w, line = self.fcntl, self.path, self.rfd, self.window, _TURN_LINE
        t0 = clock()
        for _ in range(n):
            os.write(self.fd, line)
            size = os.stat(path).st_size
            os.pread(rfd, w + len(line), size - w - len(line))
            os.fstat(rfd)
            fcntl.flock(self.lfd, fcntl.LOCK_UN)
            os.close(self.lfd)
            self.lfd = self._lock()
            os.pwrite(self.lfd, self.record, 0)
            os.fstat(self.lfd)
            os.stat(path)
            os.pread(rfd, w, size - w)
            os.fstat(rfd)
        return (clock() - t0) / n

    def close(self) -> None:
        for fd in (self.fd, self.rfd, self.lfd):
            os.close(fd)


def measure_turn(
    bench: bs.Bench, large: int = 1 * bs.GiB, small: int = 1 * bs.MiB
) -> list[bs.Result]:
    if bench.profile.name == "tiny":
        large, small = bench.profile.p1_sizes
    turns: dict[str, Any] = {}
    try:
        for size in (large, small):
            for name in bench.impls:
                path = bench.transcript(size, f"turn-{name}")
                bs.warm(path)
                turns[f"{name}@{size}"] = TurnBench(path, name)
        turns["floor"] = SyscallFloor(bench.transcript(small, "turn-floor"))
        stats = _race(bench, turns, "turns")
    finally:
        for tb in turns.values():
            tb.close()
    a, b, floor = stats[f"cffi@{large}"], stats[f"cffi@{small}"], stats["floor"]
    pa, pb = stats[f"python@{large}"], stats[f"python@{small}"]
    sizes = f"{bs.format_bytes(large)} / {bs.format_bytes(small)}"
    return [
        bs.Result(
            "T1",
            "turn_size",
            f"one turn (append + release + reacquire, tail mode), {bs.format_bytes(large)} ÷ "
            f"{bs.format_bytes(small)}",
            a.median / b.median,
            f"cffi {bs.format_bytes(large)} ÷ cffi {bs.format_bytes(small)}",
            bs.Target("<=", 1.3),
            {
                "python": bs.Figure(f"{bs.format_ns(pa.median)} / {bs.format_ns(pb.median)}", pa),
                "cffi": bs.Figure(f"{bs.format_ns(a.median)} / {bs.format_ns(b.median)}", a),
            },
            a.min / b.min,
            {"large": large, "small": small, "lock": "real"},
            note=f"cells: {sizes} transcript; real lock, owned append under write_lock()",
        ),
        bs.Result(
            "T2",
            "turn_floor",
            "one turn ÷ the same syscalls done directly",
            b.median / floor.median,
            "cffi turn ÷ syscall floor",
            bs.Target("<=", 3),
            {
                "baseline": bs._time_fig(floor, "floor "),
                "python": bs._time_fig(pb),
                "cffi": bs._time_fig(b),
            },
            b.min / floor.min,
            {"size": small, "lock": "real"},
            note="floor: write, stat, pread, fstat; flock unlock, close; open, flock, "
            "record write, fstat; stat, pread, fstat (from Python)",
        ),
    ]


TURN = bs.measure("T1", "one turn with the real lock: 1 GiB ÷ 1 MiB, and ÷ its syscall floor")(
    measure_turn
)


class JournalTurnBench(TurnBench):
    """A turn as ``TurnBench`` (real lock, tail mode) whose owned append is journaled as a
    claimant's ``SessionManager`` journals it (``journal=True``: the record, then the line,
    under the journal's lock; the fence reads the new records at each check), or plain
    (``journal=False``: no claim, no record, no journal read)."""

    def __init__(self, path: Path, *, journal: bool, backend: str = "cffi") -> None:
        self.journal = journal
        super().__init__(path, backend, journal=journal)

    def _append(self) -> None:
        if not self.journal:
            os.write(self.fd, _TURN_LINE)
            return
        with journaled(str(self.path), self.ctl.writer, self.fd) as commit:
            start = os.fstat(self.fd).st_size
            commit.intent(start, _TURN_LINE, None)
            os.write(self.fd, _TURN_LINE)
            commit.landed(os.lseek(self.fd, 0, os.SEEK_CUR) - len(_TURN_LINE))


def measure_journal_turn(
    bench: bs.Bench, large: int = 1 * bs.GiB, small: int = 1 * bs.MiB
) -> list[bs.Result]:
    if bench.profile.name == "tiny":
        large, small = bench.profile.p1_sizes
    turns: dict[str, JournalTurnBench] = {}
    try:
        for size in (large, small):
            for journal in (True, False):
                for name in bench.impls:
                    path = bench.transcript(size, f"jturn-{int(journal)}-{name}")
                    bs.warm(path)
                    kind = "journal" if journal else "plain"
                    turns[f"{kind}-{name}@{size}"] = JournalTurnBench(
                        path, journal=journal, backend=name
                    )
        stats = _race(bench, turns, "turns")
    finally:
        for tb in turns.values():
            tb.close()
    jl, js = stats[f"journal-cffi@{large}"], stats[f"journal-cffi@{small}"]
    pl, ps = stats[f"plain-cffi@{large}"], stats[f"plain-cffi@{small}"]
    yl, ys = stats[f"journal-python@{large}"], stats[f"journal-python@{small}"]
    sizes = f"{bs.format_bytes(large)} / {bs.format_bytes(small)}"
    return [
        bs.Result(
            "J1",
            "journal_turn_cost",
            f"one turn with the journal ÷ without, {bs.format_bytes(small)}",
            js.median / ps.median,
            "journaled turn ÷ plain turn",
            bs.Target("<=", 2),
            {
                "baseline": bs._time_fig(ps, "plain "),
                "python": bs._time_fig(ys, "journal "),
                "cffi": bs._time_fig(js, "journal "),
            },
            js.min / ps.min,
            {"size": small, "lock": "real"},
            note="claimant append: record + line under the journal lock; the fence reads the "
            "new records at release and reacquire",
        ),
        bs.Result(
            "J2",
            "journal_turn_size",
            f"one journaled turn, {bs.format_bytes(large)} ÷ {bs.format_bytes(small)}",
            jl.median / js.median,
            f"journal {bs.format_bytes(large)} ÷ journal {bs.format_bytes(small)}",
            bs.Target("<=", 1.3),
            {
                "baseline": bs.Figure(
                    f"plain {bs.format_ns(pl.median)} / {bs.format_ns(ps.median)}", pl
                ),
                "python": bs.Figure(
                    f"journal {bs.format_ns(yl.median)} / {bs.format_ns(ys.median)}", yl
                ),
                "cffi": bs.Figure(
                    f"journal {bs.format_ns(jl.median)} / {bs.format_ns(js.median)}", jl
                ),
            },
            jl.min / js.min,
            {"large": large, "small": small, "lock": "real"},
            note=f"cells: {sizes} transcript",
        ),
    ]


JOURNAL_TURN = bs.measure(
    "J1", "one turn with the owned-write journal ÷ without, and 1 GiB ÷ 1 MiB"
)(measure_journal_turn)


class FullOwnedBench(_OwnLoop):
    """``verify="full"`` with the real lock: owned appends made under the retained lock
    (a write, then ``refresh_after_owned_write(written)``), as many as a turn makes. The
    whole-content proof belongs to the next fence check, not to each append."""

    def __init__(self, path: Path, backend: str = "cffi") -> None:
        super().__init__(path, backend, verify="full", journal=False)
        self.loop.run_until_complete(self.ctl.release_for_prompt())  # the one digest
        self.loop.run_until_complete(self.ctl.reacquire_after_prompt())

    def appends(self, n: int = 1) -> float:
        clock = time.perf_counter_ns
        ctl, fd = self.ctl, self.fd
        t0 = clock()
        for _ in range(n):
            os.write(fd, _TURN_LINE)
            ctl.refresh_after_owned_write(_TURN_LINE)
        took = clock() - t0
        if ctl.has_takeover or not ctl.holds_lock:  # pragma: no cover
            raise AssertionError(f"unexpected takeover: {ctl.takeover!r}")
        return took / n


def measure_full_owned(
    bench: bs.Bench, large: int = 1 * bs.GiB, small: int = 1 * bs.MiB
) -> list[bs.Result]:
    if bench.profile.name == "tiny":
        large, small = bench.profile.p1_sizes
    runs: dict[str, FullOwnedBench] = {}
    try:
        for size in (large, small):
            for name in bench.impls:
                path = bench.transcript(size, f"full-owned-{name}")
                bs.warm(path)
                runs[f"{name}@{size}"] = FullOwnedBench(path, name)
        stats = _race(bench, runs, "appends")
    finally:
        for fb in runs.values():
            fb.close()
    a, b = stats[f"cffi@{large}"], stats[f"cffi@{small}"]
    pa, pb = stats[f"python@{large}"], stats[f"python@{small}"]
    return [
        bs.Result(
            "F1",
            "full_owned_append",
            f'verify="full" owned append under the held lock, {bs.format_bytes(large)} ÷ '
            f"{bs.format_bytes(small)}",
            a.median / b.median,
            f"cffi {bs.format_bytes(large)} ÷ cffi {bs.format_bytes(small)}",
            bs.Target("<=", 1.5),
            {
                "python": bs.Figure(f"{bs.format_ns(pa.median)} / {bs.format_ns(pb.median)}", pa),
                "cffi": bs.Figure(f"{bs.format_ns(a.median)} / {bs.format_ns(b.median)}", a),
            },
            a.min / b.min,
            {"large": large, "small": small, "lock": "real", "verify": "full"},
            note="write + refresh_after_owned_write(written) under the retained lock; the "
            "whole-content proof is the next fence check's (one per prompt window)",
        )
    ]


FULL_OWNED = bs.measure(
    "F1", 'verify="full" owned append under the held lock: 1 GiB ÷ 1 MiB (no digest per append)'
)(measure_full_owned)
