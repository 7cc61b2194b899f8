"""Two real processes appending to one transcript: O_APPEND single writes never interleave
bytes inside a line, including lines far larger than a pipe buffer or a page."""

from __future__ import annotations

import itertools
import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from sessionfence import SessionManager, content_digest

WRITERS = 2
PER_WRITER = 150


def payload(writer: int, seq: int) -> str:
    # Sizes from tiny to 256 KiB, most of them above 4 KiB, different per writer so that
    # lines of different lengths race each other.
    size = (37, 4097, 9000, 65_537, 262_144)[(seq + writer) % 5] + seq
    return (f"<{writer}:{seq}>" * (size // 8 + 1))[:size]


def writer_main(path: str, writer: int, start: Any, done: Any) -> None:
    manager = SessionManager.open(path)
    start.wait()
    for seq in range(PER_WRITER):
        if seq % 3 == 2:
            manager.append_custom("probe", {"w": writer, "seq": seq, "text": payload(writer, seq)})
        else:
            manager.append_message(
                {"role": "user", "w": writer, "seq": seq, "content": payload(writer, seq)}
            )
    done.put(writer)


@pytest.mark.timeout(120)
def test_two_processes_appending_never_interleave(transcript: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(WRITERS)
    done = ctx.Queue()
    procs = [
        ctx.Process(target=writer_main, args=(str(transcript), w, start, done))
        for w in range(WRITERS)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
        assert p.exitcode == 0
    assert sorted(done.get(timeout=5) for _ in procs) == list(range(WRITERS))

    raw = transcript.read_bytes()
    assert raw.endswith(b"\n")
    rows = raw.split(b"\n")[:-1]
    assert len(rows) == 1 + WRITERS * PER_WRITER
    seen: dict[int, list[int]] = {w: [] for w in range(WRITERS)}
    for row in rows[1:]:
        entry = json.loads(row)  # every line is one whole record
        body = entry["message"] if entry["type"] == "message" else entry["data"]
        text = body["content"] if entry["type"] == "message" else body["text"]
        assert text == payload(body["w"], body["seq"])
        seen[body["w"]].append(body["seq"])
    for w in range(WRITERS):
        assert seen[w] == list(range(PER_WRITER))  # each writer's lines in its own order

    m = SessionManager.open(transcript)
    assert m.malformed_lines == 0 and m.torn_tail is None
    assert len(m.entries) == WRITERS * PER_WRITER
    assert m.digest.intdigest() == content_digest(transcript)
    # Both writers' lines interleave at line granularity (the race really happened) or
    # not at all; either way each writer's chain of parentIds is intact.
    for w in range(WRITERS):
        chain = [
            e
            for e in m.entries
            if (e.get("message") or e.get("data") or {}).get("w") == w  # type: ignore[union-attr]
        ]
        assert chain[0]["parentId"] is None
        for prev, cur in itertools.pairwise(chain):
            assert cur["parentId"] == prev["id"]


LOCKED_PER_WRITER = 30


def locked_writer_main(path: str, writer: int, start: Any, done: Any) -> None:
    from sessionfence.lock import acquire_session_write_lock

    manager = SessionManager.open(path)
    start.wait()
    for seq in range(LOCKED_PER_WRITER):
        lock = acquire_session_write_lock(path, timeout=60)
        try:
            # Under the lock nobody else writes: catch up with the other writer's lines,
            # append, and the digest must match the file exactly.
            manager.reload()
            manager.append_message(
                {"role": "user", "w": writer, "seq": seq, "content": payload(writer, seq)[:9000]}
            )
            if manager.digest.intdigest() != content_digest(path):
                raise AssertionError("digest out of step under the lock")
        finally:
            lock.release()
    done.put(writer)


@pytest.mark.timeout(120)
def test_two_processes_under_the_session_lock_build_one_chain(transcript: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(WRITERS)
    done = ctx.Queue()
    procs = [
        ctx.Process(target=locked_writer_main, args=(str(transcript), w, start, done))
        for w in range(WRITERS)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(100)
        assert p.exitcode == 0
    assert sorted(done.get(timeout=5) for _ in procs) == list(range(WRITERS))
    m = SessionManager.open(transcript)
    assert m.malformed_lines == 0 and m.torn_tail is None
    assert len(m.entries) == WRITERS * LOCKED_PER_WRITER
    # Each append saw every earlier line: one linear conversation across both processes.
    assert m.branch() == m.entries
    assert m.entries[0]["parentId"] is None
