"""Randomized schedules (SPEC §9): owned-only schedules never trip the fence; a foreign
event that changes content is detected at the next reacquire; metadata-only events
(touch, chmod) are not takeovers. ``verify="full"`` also catches a disguised append (an
edit outside the tail window followed by a benign append), which ``verify="tail"`` by
design accepts.

A benign delivery mirror is an unowned write: as in the original (reference §5.8), an owned
synchronous write or publication right after one starts from an untrusted state and is not
published, so the next fence check rejects both. Schedules therefore put the mirror after
the window's owned writes.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionfence import SessionTakeoverError
from sessionfence.controller import reset_for_tests

from .helpers import (
    MergeSpy,
    append_entries,
    line,
    make,
    mirror_message,
    owned_step,
    rewrite_in_place,
    user_message,
)

pytestmark = pytest.mark.usefixtures("backend")

OWNED_STEPS = ("compaction", "publication", "ordinary", "refresh")
FOREIGN = (
    "append_user",
    "disguised_append",
    "truncate",
    "truncate_regrow",
    "replace_same_bytes",
    "rewrite_head",
    "rewrite_middle",
    "rewrite_tail",
    "touch",
    "chmod",
)
HARMLESS = {"touch", "chmod"}


def _flip(data: bytearray, offset: int) -> None:
    data[offset] = ord("A") if data[offset] != ord("A") else ord("B")


def foreign(path: Path, event: str) -> None:
    data = bytearray(path.read_bytes())
    st_before = path.stat()
    if event == "append_user":
        append_entries(path, user_message("foreign"))
    elif event == "disguised_append":
        _flip(data, 40)
        rewrite_in_place(path, bytes(data), keep_mtime=True)
        append_entries(path, mirror_message("looks benign"))
    elif event == "truncate":
        rewrite_in_place(path, bytes(data[:-10]))
    elif event == "truncate_regrow":
        cut = bytes(data[: len(data) // 2])
        rewrite_in_place(path, cut + line(user_message("regrown")).encode() * 200)
    elif event == "replace_same_bytes":
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(bytes(data))
        os.replace(tmp, path)
    elif event.startswith("rewrite_"):
        where = {"rewrite_head": 40, "rewrite_middle": len(data) // 2, "rewrite_tail": -30}
        _flip(data, where[event])
        rewrite_in_place(path, bytes(data), keep_mtime=True)
    elif event == "touch":
        os.utime(path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns + 5_000_000))
    elif event == "chmod":
        os.chmod(path, 0o600 if (st_before.st_mode & 0o777) != 0o600 else 0o640)
    else:  # pragma: no cover
        raise AssertionError(event)


async def run_schedule(
    path: Path, verify: str, turns: list[tuple[list[str], bool]], event: str | None, at: int
) -> tuple[bool, int | None]:
    """Returns (takeover seen, turn index where it was raised). ``verify`` may end in
    "+merge": the controller then has a merge callback (which accepts everything)."""
    path.write_text(
        line({"type": "session"}) + "".join(line(user_message(f"m{i}")) for i in range(80))
    )
    mode, _, merge = verify.partition("+")
    ctl = await make(path, verify=mode, merge_foreign_entries=MergeSpy() if merge else None)
    for index, (steps, mirror) in enumerate(turns):
        await ctl.release_for_prompt()
        for step in steps:
            await owned_step(ctl, path, step)
        if event is not None and index == at:
            foreign(path, event)
        if mirror:
            append_entries(path, mirror_message())
        try:
            await ctl.reacquire_after_prompt()
            await ctl.with_write_lock(lambda: append_entries(path, user_message("reply")))
        except SessionTakeoverError:
            return True, index
    return ctl.has_takeover, None


turns_strategy = st.lists(
    st.tuples(st.lists(st.sampled_from(OWNED_STEPS), max_size=3), st.booleans()),
    min_size=1,
    max_size=4,
)
Turns = list[tuple[list[str], bool]]


def _run(verify: str, turns: Turns, event: str | None, at: int) -> tuple[bool, Any]:
    reset_for_tests()
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(run_schedule(Path(tmp) / "s.jsonl", verify, turns, event, at))


@pytest.mark.parametrize("verify", ["tail", "full", "tail+merge", "full+merge"])
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(turns=turns_strategy)
def test_owned_only_schedules_never_trip_the_fence(verify: str, turns: Turns) -> None:
    taken, _ = _run(verify, turns, None, 0)
    assert not taken


@pytest.mark.parametrize("verify", ["tail", "full", "tail+merge", "full+merge"])
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(turns=turns_strategy, event=st.sampled_from(FOREIGN), at=st.integers(0, 3))
def test_foreign_content_changes_are_detected_at_the_next_reacquire(
    verify: str, turns: Turns, event: str, at: int
) -> None:
    at = at % len(turns)
    taken, where = _run(verify, turns, event, at)
    # A same-size edit outside the tail window followed by a benign append is an append
    # whose old tail window is intact: only verify="full" can see the edit.
    disguised = event == "disguised_append" or (
        turns[at][1] and event in ("rewrite_head", "rewrite_middle")
    )
    detected = event not in HARMLESS and not (disguised and verify.startswith("tail"))
    assert taken == detected, (event, verify)
    if detected:
        assert where == at
