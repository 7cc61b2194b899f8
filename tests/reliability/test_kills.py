"""Reliability R2 (SPEC §9, lock-anchors §7 rows 1 and 12): a holder SIGKILLed at random points.

Every kill point is a fresh victim process (``os.fork``) that acquires the session write
lock and appends lines: some through ``SessionManager.append_message`` (one write), some
as raw entries written in several chunks so a kill can leave a torn tail. The victim
reports each step on a pipe (``S`` started, ``L`` locked, ``C`` chunk written, ``A`` line
acknowledged: its append returned, ``R`` released). A seeded plan picks the step after
which it dies: either the victim stops at exactly that step (blocked on a pipe that is
never written) or it runs on and the kill lands wherever it is by then (possibly inside
a large ``write``, which the kernel may cut short). After each kill:

- the next acquire succeeds on its first attempt (``timeout=0``), with a larger generation;
- the bytes before the victim's are untouched, and every acknowledged line is present,
  whole and in order (plus at most the one line whose ack the kill cut off);
- a last line without its newline is reported by ``SessionManager.open(...).torn_tail``,
  an append refuses it with ``TornTranscriptError`` and writes nothing, and
  ``repair_torn_tail()`` moves exactly the torn bytes to the quarantine file.

Kill points run in independent lanes (one transcript each, in parallel processes): the
torn-tail checks wait out a settle period, which parallel lanes overlap.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sessionfence import TornTranscriptError, acquire_session_write_lock
from sessionfence.transcript import SessionManager

from .helpers import (
    BIG,
    FORK,
    HEADER,
    WAIT,
    open_fds,
    payload,
    payload_intact,
    payload_of,
    raw_line,
)

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="fork, SIGKILL and /proc"),
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

# A dead holder's flock is gone when the kernel closes its descriptors: the next acquire
# must succeed on its first non-blocking attempt (timeout=0), with no staleness period.
# The wall time is reported, not asserted, so a loaded CI machine cannot fail the test.


@dataclass(frozen=True)
class Line:
    seq: int
    size: int
    chunks: int  # 0: SessionManager.append_message; n >= 2: raw entry in n writes


@dataclass(frozen=True)
class Plan:
    victim: int
    lines: tuple[Line, ...]
    stop_after: int  # index of the step token after which the victim dies
    exact: bool  # stop exactly there, or run on and be killed wherever it is

    @property
    def tokens(self) -> int:
        # S, L, per line (chunks - 1) C tokens and one A, R
        return 3 + sum(max(line.chunks - 1, 0) + 1 for line in self.lines)


def make_plan(rng: random.Random, victim: int) -> Plan:
    lines = []
    for seq in range(rng.randint(0, 4)):
        big = rng.random() < 0.15
        size = BIG + rng.randrange(1 << 16) if big else rng.randint(20, 600)
        chunks = 0 if rng.random() < 0.4 else rng.randint(2, 5)
        lines.append(Line(seq, size, chunks))
    plan = Plan(victim, tuple(lines), 0, rng.random() < 0.7)
    return Plan(victim, plan.lines, rng.randrange(plan.tokens), plan.exact)


def victim_main(path: str, plan: Plan, report: int, gate: int) -> None:
    """Runs in the forked victim; never returns (``os._exit``)."""
    step = 0

    def mark(token: bytes) -> None:
        nonlocal step
        os.write(report, token)
        if plan.exact and step == plan.stop_after:
            os.read(gate, 1)  # blocks until the SIGKILL: nobody writes the gate
        step += 1

    try:
        mark(b"S")
        lock = acquire_session_write_lock(path, timeout=WAIT)
        mark(b"L")
        manager = SessionManager.open(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        for line in plan.lines:
            data = payload(plan.victim, line.seq, line.size)
            if line.chunks == 0:
                manager.append_message({"role": "user", "content": data})
            else:
                raw = raw_line(plan.victim, line.seq, line.size)
                step_size = len(raw) // line.chunks
                for part in range(line.chunks):
                    end = len(raw) if part == line.chunks - 1 else (part + 1) * step_size
                    view = memoryview(raw)[part * step_size : end]
                    while view:
                        view = view[os.write(fd, view) :]
                    if part < line.chunks - 1:
                        mark(b"C")
            mark(b"A")
        os.close(fd)
        lock.release()
        mark(b"R")
    except BaseException:
        traceback.print_exc()
        os._exit(3)
    os._exit(0)


def run_victim(path: str, plan: Plan) -> bytes:
    """Forks the victim, kills it after its planned step, returns every token it sent."""
    report_r, report_w = os.pipe()
    gate_r, gate_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - victim
        os.close(report_r)
        os.close(gate_w)
        victim_main(path, plan, report_w, gate_r)
    os.close(report_w)
    os.close(gate_r)
    seen = b""
    try:
        while len(seen) <= plan.stop_after:
            token = os.read(report_r, 1)
            if not token:
                break  # the victim exited on its own (a racy plan past its last step)
            seen += token
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        # Tokens written before death are still in the pipe: they are acks too.
        while chunk := os.read(report_r, 4096):
            seen += chunk
    finally:
        os.close(report_r)
        os.close(gate_w)
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, -signal.SIGKILL):
        raise AssertionError(f"victim {plan.victim} failed on its own (exit {code})")
    return seen


def own_seqs(raw: bytes, victim: int) -> list[int]:
    seqs = []
    for line in raw.split(b"\n")[:-1]:
        data = payload_of(json.loads(line))
        assert data is not None and payload_intact(data), line[:200]
        if data["w"] == victim:
            seqs.append(data["s"])
    return seqs


def check_after_kill(
    path: str, plan: Plan, tokens: bytes, before: bytes, counts: Counter[str]
) -> bytes:
    """All post-kill assertions for one kill point; returns the file's bytes after repair."""
    acked = tokens.count(b"A")
    counts[f"after_{chr(tokens[-1]) if tokens else '-'}"] += 1
    raw = Path(path).read_bytes()
    # Nothing the victim did may touch what was there before it.
    assert raw.startswith(before), f"victim {plan.victim} changed earlier bytes"
    end = raw.rfind(b"\n") + 1
    whole, torn = raw[:end], raw[end:]
    seqs = own_seqs(whole[len(before) :], plan.victim)
    # Every acknowledged line is there, whole and in order; the kill may also have cut off
    # the ack of one line that was completely written.
    assert seqs == list(range(len(seqs))), seqs
    assert acked <= len(seqs) <= min(acked + 1, len(plan.lines)), (acked, seqs, tokens)

    manager = SessionManager.open(path)
    assert manager.malformed_lines == 0
    if not torn:
        assert manager.torn_tail is None
        return raw
    counts["torn"] += 1
    line = plan.lines[len(seqs)]
    if line.chunks:
        # the torn bytes are a proper prefix of the line that was being written
        expected = raw_line(plan.victim, line.seq, line.size)
        assert expected.startswith(torn) and len(torn) < len(expected)
    else:  # cut inside the manager's single write (a kill during a large write)
        counts["torn_in_single_write"] += 1
        assert torn.startswith(b"{") and b"\n" not in torn
    assert manager.torn_tail == (end, len(torn))
    with pytest.raises(TornTranscriptError) as refused:
        manager.append_message({"role": "user", "content": "must not land after a torn line"})
    assert (refused.value.offset, refused.value.length) == (end, len(torn))
    assert Path(path).read_bytes() == raw, "an append landed after a torn line"
    quarantine = manager.repair_torn_tail()
    assert quarantine is not None
    assert Path(quarantine).read_bytes() == torn
    os.unlink(quarantine)
    assert Path(path).read_bytes() == whole
    assert SessionManager.open(path).torn_tail is None
    return whole


def kill_lane(directory: str, lane: int, seed: int, points: int) -> dict[str, Any]:
    path = os.path.join(directory, f"lane-{lane}.jsonl")
    Path(path).write_bytes(HEADER)
    rng = random.Random(seed * 1_000_003 + lane)
    counts: Counter[str] = Counter()
    latencies: list[float] = []
    generation = 0
    before = HEADER
    fds = open_fds()
    for victim in range(points):
        plan = make_plan(rng, victim)
        counts["exact" if plan.exact else "racy"] += 1
        tokens = run_victim(path, plan)
        counts["acked_lines"] += tokens.count(b"A")
        began = time.monotonic()
        lock = acquire_session_write_lock(path, timeout=0)
        latencies.append(time.monotonic() - began)
        # each holder's generation is larger than every earlier one, the victim's included
        assert lock.generation >= generation + (2 if b"L" in tokens else 1)
        generation = lock.generation
        try:
            before = check_after_kill(path, plan, tokens, before, counts)
        finally:
            lock.release()
    assert open_fds() == fds, "descriptor leak across kill points"
    final = SessionManager.open(path)
    assert final.torn_tail is None and final.malformed_lines == 0
    counts["kills"] = points
    return {"counts": dict(counts), "max_latency": max(latencies)}


def _lane_entry(conn: Any, directory: str, lane: int, seed: int, points: int) -> None:
    try:
        conn.send(("ok", kill_lane(directory, lane, seed, points)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_kill_points(directory: str, seed: int, lanes: int, per_lane: int) -> dict[str, Any]:
    workers = []
    for lane in range(lanes):
        parent, child = FORK.Pipe(duplex=False)
        proc = FORK.Process(target=_lane_entry, args=(child, directory, lane, seed, per_lane))
        proc.start()
        child.close()
        workers.append((proc, parent))
    total: Counter[str] = Counter()
    latency = 0.0
    errors = []
    for proc, conn in workers:
        if not conn.poll(20 * WAIT):
            proc.kill()
            errors.append("lane timed out")
        else:
            status, value = conn.recv()
            if status == "ok":
                total.update(value["counts"])
                latency = max(latency, value["max_latency"])
            else:
                errors.append(value)
        proc.join(WAIT)
    assert not errors, "\n".join(errors)
    return {"counts": dict(total), "max_latency": latency}


def _report(result: dict[str, Any]) -> None:
    counts = result["counts"]
    print(
        f"\nkills: {counts['kills']} kill points ({counts.get('exact', 0)} exact, "
        f"{counts.get('racy', 0)} racy), {counts.get('acked_lines', 0)} acknowledged lines "
        f"intact, {counts.get('torn', 0)} torn tails detected and quarantined "
        f"({counts.get('torn_in_single_write', 0)} inside a single write); last step seen: "
        + ", ".join(f"{k[6:]}={v}" for k, v in sorted(counts.items()) if k.startswith("after_"))
        + f"; next acquire: first attempt, <= {result['max_latency'] * 1000:.1f} ms"
    )


@pytest.mark.timeout(180)
def test_240_sigkill_points_lose_no_acknowledged_line_and_never_append_after_a_torn_one(
    tmp_path: Path,
) -> None:
    result = run_kill_points(str(tmp_path), seed=20261124, lanes=8, per_lane=30)
    counts = result["counts"]
    assert counts["kills"] == 240
    # The plan must actually reach the interesting places, or the test proves little.
    assert counts["torn"] >= 20
    assert counts.get("after_S", 0) >= 5  # before the lock was taken
    assert counts.get("after_L", 0) >= 5  # holding, nothing written yet
    assert counts.get("after_C", 0) >= 20  # mid-line
    assert counts.get("after_A", 0) >= 20  # between acknowledged lines
    _report(result)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_slow_2000_sigkill_points(tmp_path: Path) -> None:
    result = run_kill_points(str(tmp_path), seed=7, lanes=20, per_lane=100)
    assert result["counts"]["kills"] == 2000
    _report(result)
