"""Session write lock next to ``filelock.FileLock``, measured in the same run.

    pytest benchmarks/test_bench_lock.py --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=min,median,mean,ops

Two measures, each for both locks:

- ``lock-uncontended``: acquire + release of a free lock in one process, and its floor
  (``floor``: open + flock + pwrite of a prepared record + close, done directly).
  sessionfence does more per hold than the floor (an identity re-check, reading the
  previous record and writing its own, marking it free on release); this is its price.
- ``lock-handoff``: two processes ping-pong through the lock. The parent holds it while the
  child waits inside ``acquire``; each round the parent releases and the timer stops when
  the child reports that it got the lock (so the pipe's latency is included; ``sessionfence
  bench --only L1`` times the hand-off itself). filelock polls every 50 ms, so its latency
  is dominated by where in its poll the waiter was: the setup of each round sleeps a random
  fraction of the poll interval so the phase is uniform, as it is in real use. sessionfence's
  waiter blocks in the kernel and is woken by the release.

The ratios (sessionfence / filelock and sessionfence / floor, medians) are printed at the
end of the module.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

filelock = pytest.importorskip("filelock")

from sessionfence import acquire_session_write_lock  # noqa: E402
from sessionfence.bench.lock import lock_floor  # noqa: E402
from sessionfence.lock import POLL_INTERVAL  # noqa: E402

Benchmark = Any  # pytest-benchmark's fixture ships no type stubs

CTX = multiprocessing.get_context("spawn")
WAIT = 30.0
HANDOFF_ROUNDS = 100

_medians: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_ratios(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    lines = []
    for group in ("lock-uncontended", "lock-handoff"):
        ours = _medians.get((group, "sessionfence"))
        theirs = _medians.get((group, "filelock"))
        if ours is None or theirs is None:
            continue
        lines.append(
            f"{group}: sessionfence {ours * 1e6:,.1f} us, filelock {theirs * 1e6:,.1f} us, "
            f"ratio sessionfence/filelock {ours / theirs:.2f} (medians)"
        )
    mine, floor = (_medians.get(("lock-uncontended", k)) for k in ("sessionfence", "floor"))
    if mine is not None and floor is not None:
        lines.append(
            f"lock-uncontended: floor {floor * 1e6:,.1f} us, "
            f"ratio sessionfence/floor {mine / floor:.2f} (medians; target <= 2)"
        )
    if not lines:
        return
    # Module teardown output is captured like a test's; the ratios belong on the terminal.
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        reporter.write_sep("-", "session write lock vs filelock (same run)")
        for line in lines:
            reporter.write_line(line)


def _remember(benchmark: Benchmark, group: str, name: str) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        _medians[(group, name)] = stats.stats.median


def _locker(kind: str, transcript: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(acquire, release)`` for one lock implementation on one transcript."""
    if kind == "sessionfence":
        held: list[Any] = []

        def acquire() -> None:
            held.append(acquire_session_write_lock(transcript, timeout=WAIT))

        def release() -> None:
            held.pop().release()

        return acquire, release
    lock = filelock.FileLock(transcript + ".filelock", timeout=WAIT)
    return lock.acquire, lock.release


KINDS = ["sessionfence", "filelock"]


@pytest.mark.benchmark(group="lock-uncontended")
@pytest.mark.parametrize("kind", [*KINDS, "floor"])
def test_acquire_release_uncontended(benchmark: Benchmark, tmp_path: Path, kind: str) -> None:
    transcript = tmp_path / "session.jsonl"
    transcript.write_bytes(b'{"type":"session"}\n')
    if kind == "floor":
        acquire_session_write_lock(transcript).release()
        record = Path(str(transcript) + ".lock").read_bytes()
        benchmark(lock_floor(str(transcript) + ".floor", record))
        _remember(benchmark, "lock-uncontended", kind)
        return
    acquire, release = _locker(kind, str(transcript))

    def once() -> None:
        acquire()
        release()

    benchmark(once)
    _remember(benchmark, "lock-uncontended", kind)


def handoff_child(conn: Connection, kind: str, transcript: str) -> None:
    """Wait in acquire, report the moment of success, release on request; repeat."""
    acquire, release = _locker(kind, transcript)
    while conn.recv() == "wait":
        conn.send("waiting")
        acquire()
        conn.send("got")
        assert conn.recv() == "release"
        release()
        conn.send("released")


@pytest.mark.benchmark(group="lock-handoff")
@pytest.mark.parametrize("kind", KINDS)
def test_handoff_between_two_processes(benchmark: Benchmark, tmp_path: Path, kind: str) -> None:
    transcript = tmp_path / "session.jsonl"
    transcript.write_bytes(b'{"type":"session"}\n')
    acquire, release = _locker(kind, str(transcript))
    conn, child_end = CTX.Pipe()
    child = CTX.Process(target=handoff_child, args=(child_end, kind, str(transcript)))
    child.start()
    child_end.close()
    rng = random.Random(1234)
    first = [True]

    def expect(message: str) -> None:
        if not conn.poll(WAIT):
            raise AssertionError(f"hand-off child did not send {message!r}")
        got = conn.recv()
        assert got == message, got

    def setup() -> None:
        # Take the lock back from the child (not on the first round), then let the child
        # start waiting, and give its poll a random phase before the timed release.
        if not first[0]:
            conn.send("release")
            expect("released")
        first[0] = False
        acquire()
        conn.send("wait")
        expect("waiting")
        time.sleep(rng.uniform(0.001, POLL_INTERVAL))

    def handoff() -> None:
        release()
        expect("got")

    try:
        benchmark.pedantic(handoff, setup=setup, rounds=HANDOFF_ROUNDS, iterations=1)
        _remember(benchmark, "lock-handoff", kind)
        conn.send("release")
        expect("released")
        conn.send("stop")
        child.join(WAIT)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        conn.close()
    assert os.path.exists(str(transcript))
