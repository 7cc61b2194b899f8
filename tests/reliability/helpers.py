"""Shared oracles and workers of the reliability suite (``tests/reliability/test_*.py``).

No tests here and no pytest import at module level, so forked workers stay cheap. The
oracles are independent of the code under test: they read raw bytes and monotonic
timestamps, never sessionfence's own view of the file.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

# fork, not spawn: a worker starts in ~1 ms instead of ~100 ms, which is what lets the
# suite run thousands of real processes inside the CI budget.
FORK = multiprocessing.get_context("fork")
WAIT = 60.0  # bound on any hand-shake with a child; reaching it is a failure, not a retry
HEADER = (
    b'{"type":"session","version":3,"id":"reliability",'
    b'"timestamp":"2026-01-01T00:00:00.000Z","cwd":"/"}\n'
)
BIG = 64 << 10


def open_fds() -> int:
    # Collect first: an earlier test's unreachable file object closing mid-case would
    # otherwise make the count move for reasons that have nothing to do with this case.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def pad_for(writer: int, seq: int, size: int) -> str:
    # Deterministic, different per (writer, seq), so a line glued from two writes or a
    # line shifted by a foreign byte fails its CRC instead of passing as someone else's.
    unit = f"{writer:03d}.{seq:06d}|"
    return (unit * (size // len(unit) + 1))[:size]


def payload(writer: int, seq: int, size: int) -> dict[str, Any]:
    pad = pad_for(writer, seq, size)
    return {"w": writer, "s": seq, "crc": zlib.crc32(pad.encode()), "pad": pad}


def raw_line(writer: int, seq: int, size: int) -> bytes:
    """A transcript entry built by hand (a ``custom`` entry), for chunked raw appends."""
    entry = {
        "type": "custom",
        "customType": "reliability",
        "id": f"w{writer}s{seq}",
        "parentId": None,
        "timestamp": "2026-01-01T00:00:00.000Z",
        "data": payload(writer, seq, size),
    }
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def payload_of(entry: Any) -> dict[str, Any] | None:
    """The reliability payload in a parsed line (a message appended by SessionManager or a
    raw custom entry), else None."""
    if not isinstance(entry, dict):
        return None
    if entry.get("type") == "custom":
        data = entry.get("data")
    elif entry.get("type") == "message":
        data = (entry.get("message") or {}).get("content")
    else:
        return None
    return data if isinstance(data, dict) and "crc" in data else None


def payload_intact(data: dict[str, Any]) -> bool:
    pad = data.get("pad")
    return isinstance(pad, str) and zlib.crc32(pad.encode()) == data["crc"]


def sweep_overlaps(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Pairs (enter, enter of the interval it overlaps) over closed hold intervals."""
    overlaps: list[tuple[int, int]] = []
    latest_leave, latest_enter = -1, -1
    for enter, leave in sorted(intervals):
        if leave < enter:
            raise ValueError(f"interval ends before it starts: {(enter, leave)}")
        if enter <= latest_leave:
            overlaps.append((enter, latest_enter))
        if leave > latest_leave:
            latest_leave, latest_enter = leave, enter
    return overlaps


@dataclass
class LineVerdict:
    lines: int = 0
    big_lines: int = 0
    unparsable: list[int] = field(default_factory=list)  # line numbers
    corrupt: list[tuple[int, int]] = field(default_factory=list)  # CRC mismatch
    duplicated: list[tuple[int, int]] = field(default_factory=list)
    missing: list[tuple[int, int]] = field(default_factory=list)
    out_of_order: list[tuple[int, int]] = field(default_factory=list)
    foreign: int = 0  # parsable lines that carry no payload (beyond the header)
    torn_end: bool = False

    @property
    def clean(self) -> bool:
        return not (
            self.unparsable
            or self.corrupt
            or self.duplicated
            or self.missing
            or self.out_of_order
            or self.foreign
            or self.torn_end
        )


def check_lines(raw: bytes, expected: dict[int, int]) -> LineVerdict:
    """Line oracle: ``expected`` maps writer -> number of sequence numbers 0..n-1 it wrote.
    Every (writer, seq) must appear exactly once, whole, and in per-writer order."""
    verdict = LineVerdict(torn_end=bool(raw) and not raw.endswith(b"\n"))
    body = raw[len(HEADER) :] if raw.startswith(HEADER) else raw
    seen: set[tuple[int, int]] = set()
    last: dict[int, int] = {}
    for number, line in enumerate(body.split(b"\n")[:-1] if body else []):
        verdict.lines += 1
        try:
            data = payload_of(json.loads(line))
        except ValueError:
            verdict.unparsable.append(number)
            continue
        if data is None:
            verdict.foreign += 1
            continue
        key = (data["w"], data["s"])
        if not payload_intact(data):
            verdict.corrupt.append(key)
        if len(line) > BIG:
            verdict.big_lines += 1
        if key in seen:
            verdict.duplicated.append(key)
        seen.add(key)
        if data["s"] <= last.get(data["w"], -1):
            verdict.out_of_order.append(key)
        last[data["w"]] = data["s"]
    verdict.missing = [
        (w, s) for w, n in sorted(expected.items()) for s in range(n) if (w, s) not in seen
    ]
    return verdict


def line_size(writer: int, seq: int, big_every: int) -> int:
    """Mostly small lines (cheap), and every ``big_every``-th line past 64 KiB: larger
    than PIPE_BUF and a page, where a write is no longer one copy in the kernel."""
    if (seq + writer) % big_every == 0:
        return BIG + 1024 + (seq * 7919 + writer * 104729) % (32 << 10)
    return 40 + (seq * 31 + writer * 17) % 260


def write_chunks(fd: int, data: bytes, parts: int) -> None:
    """Several separate appends for one line: with no exclusion, another writer's bytes
    would land between them and tear the line, which the line oracle sees."""
    step = max(1, len(data) // parts)
    offset = 0
    while offset < len(data):
        end = len(data) if len(data) - offset < 2 * step else offset + step
        view = memoryview(data)[offset:end]
        while view:
            view = view[os.write(fd, view) :]
        offset = end


def exclusion_worker(
    path: str, out_path: str, writer: int, cycles: int, big_every: int, start: Any
) -> None:
    """Lock, append one line (even seq: SessionManager.append_message, one write; odd seq:
    a raw entry in three writes), unlock; log the monotonic hold interval of each cycle."""
    from sessionfence import acquire_session_write_lock
    from sessionfence.transcript import SessionManager

    manager = SessionManager.open(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    intervals: list[tuple[int, int]] = []
    # Everyone parses the file before anyone appends (a parse racing appends would retry
    # and could give up), and everyone starts appending at once.
    start.wait(WAIT)
    try:
        for seq in range(cycles):
            size = line_size(writer, seq, big_every)
            message = {"role": "user", "content": payload(writer, seq, size)}
            data = raw_line(writer, seq, size) if seq % 2 else b""
            lock = acquire_session_write_lock(path, timeout=WAIT)
            # enter after the lock is ours, leave before it is given back: the interval
            # lies inside the hold, so two intervals that touch mean two holders.
            enter = time.monotonic_ns()
            if seq % 2:
                write_chunks(fd, data, 3)
            else:
                manager.append_message(message)
            leave = time.monotonic_ns()
            lock.release()
            intervals.append((enter, leave))
    finally:
        os.close(fd)
    with open(out_path, "w", encoding="ascii") as fh:
        fh.writelines(f"{enter} {leave}\n" for enter, leave in intervals)


@dataclass
class ExclusionRun:
    intervals: list[tuple[int, int]]
    raw: bytes
    seconds: float


def run_exclusion(directory: str, writers: int, cycles: int, big_every: int) -> ExclusionRun:
    path = os.path.join(directory, "session.jsonl")
    with open(path, "wb") as fh:
        fh.write(HEADER)
    start = FORK.Barrier(writers + 1)
    procs = []
    for writer in range(writers):
        out = os.path.join(directory, f"intervals-{writer}.txt")
        proc = FORK.Process(
            target=exclusion_worker, args=(path, out, writer, cycles, big_every, start)
        )
        proc.start()
        procs.append(proc)
    start.wait(WAIT)
    began = time.monotonic()
    deadline = began + 10 * WAIT
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    seconds = time.monotonic() - began
    codes = [p.exitcode for p in procs]
    for proc in procs:
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    if codes != [0] * writers:
        raise AssertionError(f"worker exit codes {codes}")
    intervals: list[tuple[int, int]] = []
    for writer in range(writers):
        with open(os.path.join(directory, f"intervals-{writer}.txt"), encoding="ascii") as fh:
            rows = [tuple(map(int, row.split())) for row in fh]
        if len(rows) != cycles:
            raise AssertionError(f"writer {writer} logged {len(rows)} of {cycles} holds")
        intervals += rows  # type: ignore[arg-type]
    with open(path, "rb") as fh:
        raw = fh.read()
    return ExclusionRun(intervals, raw, seconds)
