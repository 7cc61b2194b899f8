"""Reliability R1 (SPEC §9, lock-anchors §9): N processes x M lock/append/unlock cycles on
one transcript. Two independent oracles: a sweep over the monotonic hold intervals each
process logged (0 overlaps) and a replay of the file's bytes (every (writer, seq) exactly
once, whole, CRC intact, per-writer order kept, file ending in a newline).

Half the appends go through ``SessionManager.append_message`` (one write), half are raw
entries written in three separate writes: only the lock keeps another writer's bytes
from landing between those, so the line oracle also fails when exclusion fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sessionfence.transcript import SessionManager

from .helpers import HEADER, check_lines, raw_line, run_exclusion, sweep_overlaps

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="fork workers and /proc"),
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]


def _assert_exclusive_and_whole(tmp_path: Path, writers: int, cycles: int, big_every: int) -> None:
    run = run_exclusion(str(tmp_path), writers, cycles, big_every)
    assert len(run.intervals) == writers * cycles
    assert sweep_overlaps(run.intervals) == []

    verdict = check_lines(run.raw, dict.fromkeys(range(writers), cycles))
    assert verdict.clean, verdict
    assert verdict.lines == writers * cycles
    # The large lines are what makes a torn or interleaved write possible at all.
    assert verdict.big_lines >= writers * cycles // big_every - writers

    # The model agrees with the oracle: nothing malformed, nothing torn, every line an entry.
    manager = SessionManager.open(tmp_path / "session.jsonl")
    assert manager.torn_tail is None
    assert manager.malformed_lines == 0
    assert len(manager.entries) == writers * cycles
    print(
        f"\nexclusion: {writers} processes x {cycles} cycles = {writers * cycles} appends "
        f"({verdict.big_lines} lines > 64 KiB, {len(run.raw) / 1e6:.1f} MB) in "
        f"{run.seconds:.1f} s; overlaps 0, lost 0, duplicated 0, torn 0"
    )


@pytest.mark.timeout(120)
def test_8_processes_x_500_appends_no_overlap_no_lost_or_torn_line(tmp_path: Path) -> None:
    _assert_exclusive_and_whole(tmp_path, writers=8, cycles=500, big_every=40)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("writers", "cycles"), [(16, 1000), (32, 2000)])
def test_slow_many_processes_x_many_appends(tmp_path: Path, writers: int, cycles: int) -> None:
    _assert_exclusive_and_whole(tmp_path, writers=writers, cycles=cycles, big_every=40)


# The oracles themselves must be able to fail: fed broken inputs, each one says so.


def test_overlap_oracle_flags_touching_and_nested_holds() -> None:
    assert sweep_overlaps([(0, 10), (11, 20), (25, 30)]) == []
    assert sweep_overlaps([(0, 10), (10, 20)]) != []  # a shared instant is two holders
    assert sweep_overlaps([(0, 100), (10, 20), (30, 40)]) == [(10, 0), (30, 0)]
    with pytest.raises(ValueError):
        sweep_overlaps([(5, 4)])


def test_line_oracle_flags_lost_duplicated_torn_reordered_and_glued_lines() -> None:
    lines = [raw_line(0, s, 50) for s in range(3)] + [raw_line(1, 0, 70_000)]
    good = HEADER + b"".join(lines)
    assert check_lines(good, {0: 3, 1: 1}).clean
    assert check_lines(good, {0: 3, 1: 1}).big_lines == 1
    assert check_lines(HEADER + b"".join(lines[1:]), {0: 3, 1: 1}).missing == [(0, 0)]
    assert check_lines(good + lines[0], {0: 3, 1: 1}).duplicated == [(0, 0)]
    assert check_lines(good + lines[0][:20], {0: 3, 1: 1}).torn_end
    swapped = HEADER + lines[1] + lines[0] + lines[2] + lines[3]
    assert check_lines(swapped, {0: 3, 1: 1}).out_of_order == [(0, 0)]
    # another writer's bytes inside a line: unparsable, and that line counts as missing
    a, b = lines[0], lines[3]
    glued = HEADER + a[:30] + b + a[30:] + b"".join(lines[1:3])
    verdict = check_lines(glued, {0: 3, 1: 1})
    assert verdict.unparsable and not verdict.clean
    # a flipped byte inside the padding still parses but fails the CRC
    flipped = bytearray(good)
    flipped[len(HEADER) + 150] ^= 0x01
    assert check_lines(bytes(flipped), {0: 3, 1: 1}).corrupt == [(0, 0)]
