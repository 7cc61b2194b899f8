"""Reliability R3 (SPEC §9, lock-anchors §7 rows 6-10): hypothesis schedules of foreign edits
interleaved with owned writes, through a real ``SessionFenceController(verify="full")``.

A schedule is a run of prompt windows (release, actions, reacquire, a held write). Actions
are owned writes (compaction via ``owned_file_write``, a published write, an ordinary
write under the lock, an append adopted with ``refresh_after_owned_write``), metadata-only
events (touch, chmod), benign delivery-mirror appends, and in foreign schedules one
content-changing foreign edit at a drawn place:

- append of a user line, a disguised append (a byte changed outside the tail window, then
  a benign-looking mirror append), an append that mimics the owner's compaction,
- truncate, truncate + regrow (past the old size, or back to exactly the old size with the
  mtime restored), replace by rename with the same bytes,
- a same-size rewrite at a drawn offset in the head, middle or tail, mtime restored.

Oracle: a content-changing edit raises ``SessionTakeoverError`` at the first fence check
after it (at the latest the reacquire that ends its window) and never before it: 0 missed.
Owned-only schedules (with touch, chmod and mirrors) never raise: 0 false takeovers.

Mirrors go after a window's owned writes: an owned write right after an unowned one starts
from an untrusted state and is not published (documented in the controller), so the
combined change is judged foreign. The counts of every kind exercised are asserted and
printed; most schedules use an injected counting ``acquire`` (allowed by SPEC §5) for
speed, and a share runs on the real session write lock.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionfence import SessionTakeoverError
from sessionfence.controller import SessionFenceController, reset_for_tests

from ..controller.helpers import (
    Locks,
    append_entries,
    compaction,
    line,
    mirror_message,
    owned_step,
    rewrite_in_place,
    user_message,
)

OWNED = ("compaction", "publication", "ordinary", "refresh")
HARMLESS = ("touch", "chmod")
CONTENT = (
    "append_user",
    "disguised_append",
    "mimic_owned",
    "truncate",
    "truncate_regrow",
    "truncate_regrow_same_size",
    "replace_same_bytes",
    "rewrite_head",
    "rewrite_middle",
    "rewrite_tail",
)
INITIAL_LINES = 40

# One action: (kind, fraction) where the fraction places an offset or a cut in the file.
Action = tuple[str, float]
Window = list[Action]


def _flip(data: bytearray, offset: int) -> None:
    # Any byte, even a quote or a newline: the fence judges bytes, not JSON.
    data[offset] ^= 0x20 if data[offset] != 0x0A else 0x01


def foreign(path: Path, kind: str, fraction: float, limit: int | None = None) -> None:
    """One foreign event. Offsets and cuts fall in ``[0, limit)``: the bytes the fence has
    vouched for. Bytes a benign writer appended in the same window were never verified,
    so changing them is indistinguishable from that writer having written them so."""
    data = bytearray(path.read_bytes())
    size = len(data) if limit is None else limit
    st0 = path.stat()
    if kind == "append_user":
        append_entries(path, user_message("foreign"))
    elif kind == "disguised_append":
        # the edit lies before the tail window, and the appended line is benign on its own
        _flip(data, int(fraction * (size // 2)))
        rewrite_in_place(path, bytes(data), keep_mtime=True)
        append_entries(path, mirror_message("looks benign"))
    elif kind == "mimic_owned":
        append_entries(path, compaction("not mine"))
    elif kind == "truncate":
        rewrite_in_place(path, bytes(data[: int(fraction * (size - 1))]))
    elif kind == "truncate_regrow":
        cut = int(fraction * size)
        grown = bytes(data[:cut]) + line(user_message("regrown")).encode() * 100
        rewrite_in_place(path, grown[: size + 100 + cut])
    elif kind == "truncate_regrow_same_size":
        cut = int(fraction * (size - 1))
        filler = (line(user_message("regrown")).encode() * (size // 50 + 2))[: size - cut]
        if filler == bytes(data[cut:]):  # pragma: no cover - would not be an edit
            filler = filler[:-1] + b"!"
        rewrite_in_place(path, bytes(data[:cut]) + filler + bytes(data[size:]), keep_mtime=True)
    elif kind == "replace_same_bytes":
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(bytes(data))
        os.utime(tmp, ns=(st0.st_atime_ns, st0.st_mtime_ns))
        os.replace(tmp, path)
    elif kind.startswith("rewrite_"):
        start, span = {
            "rewrite_head": (0, min(200, size)),
            "rewrite_middle": (size // 4, size // 2),
            "rewrite_tail": (max(0, size - 200), min(200, size)),
        }[kind]
        _flip(data, start + int(fraction * (span - 1)))
        rewrite_in_place(path, bytes(data), keep_mtime=True)
    elif kind == "touch":
        os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns + 5_000_000))
    elif kind == "chmod":
        os.chmod(path, 0o600 if (st0.st_mode & 0o777) != 0o600 else 0o640)
    else:  # pragma: no cover
        raise AssertionError(kind)


async def run_schedule(
    path: Path, windows: list[Window], real_lock: bool
) -> tuple[int, int] | None:
    """Plays the schedule; returns (window, action index) where a takeover was raised, with
    index len(window) for the reacquire or the held write that ends the window."""
    path.write_text(
        line({"type": "session"})
        + "".join(line(user_message(f"m{i}")) for i in range(INITIAL_LINES))
    )
    acquire: Callable[..., Any] | None = None if real_lock else Locks()
    ctl = await SessionFenceController.create(path, acquire=acquire, verify="full", timeout=5.0)
    try:
        for w, window in enumerate(windows):
            await ctl.release_for_prompt()
            vouched: int | None = None  # file size before this window's mirrors
            for i, (kind, fraction) in enumerate(window):
                try:
                    if kind in OWNED:
                        await owned_step(ctl, path, kind)
                    elif kind == "mirror":
                        if vouched is None:
                            vouched = path.stat().st_size
                        append_entries(path, mirror_message())
                    else:
                        foreign(path, kind, fraction, vouched)
                except SessionTakeoverError:
                    return w, i
            try:
                await ctl.reacquire_after_prompt()
                await ctl.with_write_lock(lambda: append_entries(path, user_message("reply")))
            except SessionTakeoverError:
                return w, len(window)
        return None
    finally:
        await ctl.dispose()


def play(windows: list[Window], real_lock: bool) -> tuple[int, int] | None:
    reset_for_tests()
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(run_schedule(Path(tmp) / "s.jsonl", windows, real_lock))


fractions = st.floats(0.0, 1.0, allow_nan=False)
owned_action = st.tuples(st.sampled_from(OWNED), fractions)
harmless_action = st.tuples(st.sampled_from(HARMLESS), fractions)


@st.composite
def owned_window(draw: st.DrawFn) -> Window:
    """Owned writes with touch/chmod anywhere among them, then mirrors."""
    actions: Window = draw(st.lists(st.one_of(owned_action, harmless_action), max_size=5))
    mirrors = draw(st.integers(0, 2))
    return actions + [("mirror", 0.0)] * mirrors


owned_schedules = st.lists(owned_window(), min_size=1, max_size=4)


@st.composite
def foreign_schedule(
    draw: st.DrawFn, kinds: tuple[str, ...] = CONTENT
) -> tuple[list[Window], int, int]:
    """An owned-only schedule with one content-changing edit inserted at a drawn place."""
    windows = draw(owned_schedules)
    w = draw(st.integers(0, len(windows) - 1))
    # Anywhere in the window: refresh_after_owned_write adopts only the bytes it is told
    # it wrote, so an edit before a refresh is the fence's business too.
    i = draw(st.integers(0, len(windows[w])))
    event = (draw(st.sampled_from(kinds)), draw(fractions))
    windows[w] = [*windows[w][:i], event, *windows[w][i:]]
    return windows, w, i


def _kinds(windows: list[Window]) -> Counter[str]:
    return Counter(kind for window in windows for kind, _ in window)


def check_owned_only(windows: list[Window], real_lock: bool, counts: Counter[str]) -> None:
    counts.update(_kinds(windows))
    counts["owned_only_schedules"] += 1
    assert play(windows, real_lock) is None, "false takeover on an owned-only schedule"


def check_foreign(
    windows: list[Window], w: int, i: int, real_lock: bool, counts: Counter[str]
) -> None:
    counts.update(_kinds(windows))
    counts["foreign_schedules"] += 1
    raised = play(windows, real_lock)
    event = windows[w][i][0]
    assert raised is not None, f"missed foreign {event} in window {w} at {i}"
    # Detected at the first fence check after the edit: never earlier (that would be a
    # false alarm about the owned writes before it), never in a later window.
    assert raised[0] == w and raised[1] >= i, (event, raised, (w, i))
    counts[f"detected:{event}"] += 1


def _summary(title: str, counts: Counter[str]) -> str:
    return f"\n{title}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


HEALTH = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]


def _foreign_and_owned(
    foreign_examples: int, owned_examples: int, real_lock: bool, per_kind: int = 0
) -> Counter[str]:
    """Random schedules; with ``per_kind``, also that many per content-changing kind, so
    every kind is covered whatever the drawn mix."""
    counts: Counter[str] = Counter()

    @settings(
        max_examples=owned_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=HEALTH,
    )
    @given(windows=owned_schedules)
    def owned_only(windows: list[Window]) -> None:
        check_owned_only(windows, real_lock, counts)

    @settings(
        max_examples=foreign_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=HEALTH,
    )
    @given(schedule=foreign_schedule())
    def with_foreign(schedule: tuple[list[Window], int, int]) -> None:
        check_foreign(*schedule, real_lock, counts)

    owned_only()
    with_foreign()
    for kind in CONTENT if per_kind else ():

        @settings(
            max_examples=per_kind,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=HEALTH,
        )
        @given(schedule=foreign_schedule(kinds=(kind,)))
        def with_kind(schedule: tuple[list[Window], int, int]) -> None:
            check_foreign(*schedule, real_lock, counts)

        with_kind()
    return counts


@pytest.mark.timeout(240)
def test_2000_schedules_every_foreign_edit_detected_no_false_takeover() -> None:
    counts = _foreign_and_owned(foreign_examples=1500, owned_examples=500, real_lock=False)
    assert counts["foreign_schedules"] >= 1500 and counts["owned_only_schedules"] >= 500
    for kind in CONTENT:
        assert counts[f"detected:{kind}"] >= 40, (kind, counts)
    for kind in (*OWNED, *HARMLESS, "mirror"):
        assert counts[kind] >= 100, (kind, counts)
    print(_summary("schedules (injected acquire, verify=full)", counts))


@pytest.mark.timeout(240)
def test_schedules_on_the_real_session_write_lock() -> None:
    counts = _foreign_and_owned(
        foreign_examples=300, owned_examples=100, real_lock=True, per_kind=5
    )
    for kind in CONTENT:
        assert counts[f"detected:{kind}"] >= 5, (kind, counts)
    print(_summary("schedules (real lock, verify=full)", counts))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_slow_5000_schedules() -> None:
    counts = _foreign_and_owned(foreign_examples=4000, owned_examples=1000, real_lock=False)
    for kind in CONTENT:
        assert counts[f"detected:{kind}"] >= 150, (kind, counts)
    print(_summary("slow schedules (injected acquire, verify=full)", counts))


@pytest.mark.parametrize("harmless", HARMLESS)
def test_metadata_only_change_before_a_compaction_is_not_a_takeover(harmless: str) -> None:
    assert play([[(harmless, 0.0), ("compaction", 0.0)]], real_lock=False) is None
