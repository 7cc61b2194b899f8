"""Controller scenarios 1-25 of reference §9.1: trust across attempts, the in-process owner,
the eager lock and its release, drains and retained-lock use.

Every test runs on both hot-path backends (``backend`` fixture). The lock is the injected
counting ``Locks`` unless a scenario needs the real one.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
from pathlib import Path

import pytest

from sessionfence import SessionFileOwnerTimeoutError, SessionTakeoverError
from sessionfence.controller import acquire_session_file_owner
from sessionfence.controller._owner import MAX_TIMER_MS, clamp_timeout_ms

from .helpers import (
    LOCK_OPTIONS,
    Locks,
    append_entries,
    make,
    spin,
    user_message,
)

pytestmark = pytest.mark.usefixtures("backend")


async def test_01_recognizes_unchanged_session_file_trusted_by_previous_prompt_release(
    session_file: Path,
) -> None:
    first = await make(session_file)
    assert first.trusted_snapshot() is None
    await first.release_for_prompt()
    await first.dispose()
    second = await make(session_file)
    trusted = second.trusted_snapshot()
    assert trusted is not None and trusted.exists and trusted.size == session_file.stat().st_size


async def test_02_does_not_trust_session_file_changed_after_previous_prompt_release(
    session_file: Path,
) -> None:
    first = await make(session_file)
    await first.release_for_prompt()
    await first.dispose()
    append_entries(session_file, user_message("external"))
    second = await make(session_file)
    assert second.trusted_snapshot() is None


async def test_03_publishes_known_owned_append_for_next_attempt(session_file: Path) -> None:
    first = await make(session_file)
    written = append_entries(session_file, user_message("mine"))
    first.refresh_after_owned_write(written)  # fence inactive: the new state becomes trusted
    await first.release_for_prompt()
    await first.dispose()
    second = await make(session_file)
    assert second.trusted_snapshot() is not None


def test_04_takeover_error_keeps_message_and_records_phase() -> None:
    plain = SessionTakeoverError("/s.jsonl")
    assert str(plain) == "session file changed while prompt lock was released: /s.jsonl"
    assert plain.phase is None and plain.reason is None
    phased = SessionTakeoverError("/s.jsonl", phase="prompt_reacquire", reason="rewritten")
    assert "(phase: prompt_reacquire)" in str(phased)
    assert phased.session_file == "/s.jsonl"
    assert phased.phase == "prompt_reacquire" and phased.reason == "rewritten"


async def test_05_serializes_attempts_that_share_a_session_file_owner(session_file: Path) -> None:
    owner = await acquire_session_file_owner(session_file)
    second = asyncio.ensure_future(acquire_session_file_owner(session_file))
    await spin()
    assert not second.done()
    owner.release()
    other = await second
    assert other.session_file_key == owner.session_file_key
    other.release()
    owner.release()  # releasing twice is a no-op


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
async def test_06_uses_same_owner_for_symlinked_session_file_paths(session_file: Path) -> None:
    alias = session_file.parent / "alias.jsonl"
    os.symlink(session_file, alias)
    owner = await acquire_session_file_owner(session_file)
    waiter = asyncio.ensure_future(acquire_session_file_owner(alias))
    await spin()
    assert not waiter.done()
    owner.release()
    (await waiter).release()


async def test_07_clamps_oversized_owner_wait_timeouts(session_file: Path) -> None:
    assert clamp_timeout_ms(MAX_TIMER_MS + 1) == MAX_TIMER_MS
    assert clamp_timeout_ms(0.2) == 1
    assert clamp_timeout_ms(float("inf")) is None
    owner = await acquire_session_file_owner(session_file)
    # An oversized timeout arms a (clamped) timer instead of failing at once.
    waiter = asyncio.ensure_future(
        acquire_session_file_owner(session_file, timeout=(MAX_TIMER_MS + 1) / 1000)
    )
    await spin()
    assert not waiter.done()
    owner.release()
    (await waiter).release()


async def test_07b_owner_wait_times_out(session_file: Path) -> None:
    owner = await acquire_session_file_owner(session_file)
    with pytest.raises(SessionFileOwnerTimeoutError):
        await acquire_session_file_owner(session_file, timeout=0.001)
    owner.release()


async def test_08_releases_lock_before_prompt_and_reacquires_for_cleanup(
    session_file: Path,
) -> None:
    locks = Locks(["prep", "cleanup"])
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()
    cleanup = await ctl.acquire_for_cleanup()
    cleanup.release()
    cleanup.release()
    await ctl.dispose()
    assert locks.calls == [(str(session_file), LOCK_OPTIONS)] * 2
    assert locks.releases == ["prep", "cleanup"]


async def test_09_releases_eager_lock_on_dispose_when_cleanup_is_skipped(
    session_file: Path,
) -> None:
    locks = Locks(["prep"])
    ctl = await make(session_file, locks)
    await ctl.dispose()
    await ctl.dispose()
    assert locks.acquisitions == 1
    assert locks.releases == ["prep"]


async def test_10_releases_eager_lock_when_fence_read_throws_during_prompt_release(
    session_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locks = Locks(["prep"])
    ctl = await make(session_file, locks)

    def broken(*_: object) -> None:
        raise OSError(errno.EIO, "I/O error", str(session_file))

    monkeypatch.setattr(ctl._io, "fingerprint", broken)
    monkeypatch.setattr(ctl._io, "observe", broken)
    with pytest.raises(OSError) as caught:
        await ctl.release_for_prompt()
    assert caught.value.errno == errno.EIO
    assert locks.releases == ["prep"]
    assert not ctl.fence_active


async def test_11_abort_release_and_dispose_are_idempotent_in_succession(
    session_file: Path,
) -> None:
    locks = Locks(["prep"])
    ctl = await make(session_file, locks)
    await ctl.release_for_abort()
    await ctl.release_for_abort()
    await ctl.dispose()
    await ctl.dispose()
    assert locks.acquisitions == 1
    assert locks.releases == ["prep"]


async def _blocked_abort(
    session_file: Path,
) -> tuple[Locks, object, asyncio.Event, asyncio.Task[None]]:
    locks = Locks(["prep", "reacquired"], async_release=True)
    gate = asyncio.Event()
    locks.release_gates["prep"] = gate
    ctl = await make(session_file, locks)
    abort = asyncio.ensure_future(ctl.release_for_abort())
    await spin(lambda: "release-start:prep" in locks.events)
    return locks, ctl, gate, abort


async def test_12_waits_for_pending_abort_release_before_dispose_resolves(
    session_file: Path,
) -> None:
    locks, ctl, gate, abort = await _blocked_abort(session_file)
    dispose = asyncio.ensure_future(ctl.dispose())  # type: ignore[attr-defined]
    await spin()
    assert not dispose.done()
    gate.set()
    await asyncio.gather(abort, dispose)
    assert locks.releases == ["prep"]


async def test_13_waits_for_pending_abort_release_before_prompt_release_resolves(
    session_file: Path,
) -> None:
    locks, ctl, gate, abort = await _blocked_abort(session_file)
    release = asyncio.ensure_future(ctl.release_for_prompt())  # type: ignore[attr-defined]
    await spin()
    assert not release.done()
    gate.set()
    await asyncio.gather(abort, release)
    assert locks.releases == ["prep"]


async def test_14_waits_for_pending_abort_release_before_prompt_reacquire(
    session_file: Path,
) -> None:
    locks, ctl, gate, abort = await _blocked_abort(session_file)
    reacquire = asyncio.ensure_future(ctl.reacquire_after_prompt())  # type: ignore[attr-defined]
    await spin()
    assert locks.acquisitions == 1  # acquire not even called while the release runs
    gate.set()
    await asyncio.gather(abort, reacquire)
    assert locks.events == [
        "acquire:prep",
        "release:prep",
        "release-start:prep",
        "release-end:prep",
        "acquire:reacquired",
    ]


async def test_15_waits_for_active_retained_writes_before_abort_release(session_file: Path) -> None:
    locks = Locks(["prep"])
    ctl = await make(session_file, locks)
    running = asyncio.Event()
    finish = asyncio.Event()

    async def write() -> None:
        running.set()
        await finish.wait()

    task = ctl.with_write_lock(write)
    await running.wait()
    abort = asyncio.ensure_future(ctl.release_for_abort())
    await spin()
    assert not abort.done() and locks.releases == []
    finish.set()
    await asyncio.gather(task, abort)
    assert locks.acquisitions == 1 and locks.releases == ["prep"]


async def test_16_marks_retained_lock_use_before_the_write_starts(session_file: Path) -> None:
    locks = Locks(["prep"])
    ctl = await make(session_file, locks)
    order: list[str] = []

    async def write() -> None:
        order.append("write")

    task = ctl.with_write_lock(write)  # not awaited yet
    abort = asyncio.ensure_future(ctl.release_for_abort())
    abort.add_done_callback(lambda _: order.append("released"))
    await asyncio.gather(task, abort)
    assert order == ["write", "released"]
    assert locks.releases == ["prep"]


async def test_17_waits_for_active_retained_writes_before_cleanup_takes_the_lock(
    session_file: Path,
) -> None:
    locks = Locks(["prep"])
    ctl = await make(session_file, locks)
    running = asyncio.Event()
    finish = asyncio.Event()

    async def write() -> None:
        running.set()
        await finish.wait()

    task = ctl.with_write_lock(write)
    await running.wait()
    cleanup = asyncio.ensure_future(ctl.acquire_for_cleanup())
    await spin()
    assert not cleanup.done()
    finish.set()
    await task
    handed = await cleanup
    assert locks.releases == []
    handed.release()
    await ctl.dispose()
    assert locks.acquisitions == 1 and locks.releases == ["prep"]


async def test_18_reacquires_cleanup_lock_when_abort_already_released_the_held_lock(
    session_file: Path,
) -> None:
    locks, ctl, gate, abort = await _blocked_abort(session_file)
    locks.labels[1] = "cleanup"
    cleanup = asyncio.ensure_future(ctl.acquire_for_cleanup())  # type: ignore[attr-defined]
    await spin()
    assert locks.acquisitions == 1
    gate.set()
    await abort
    lock = await cleanup
    assert locks.acquisitions == 2
    assert locks.events.index("release-end:prep") < locks.events.index("acquire:cleanup")
    lock.release()
    await spin(lambda: "cleanup" in locks.releases)


async def test_19_keeps_cleanup_waiting_while_abort_owns_the_drain(session_file: Path) -> None:
    locks = Locks(["prep", "cleanup"], async_release=True)
    gate = asyncio.Event()
    locks.release_gates["prep"] = gate
    ctl = await make(session_file, locks)
    running = asyncio.Event()
    finish = asyncio.Event()

    async def write() -> None:
        running.set()
        await finish.wait()

    task = ctl.with_write_lock(write)
    await running.wait()
    abort = asyncio.ensure_future(ctl.release_for_abort())
    cleanup = asyncio.ensure_future(ctl.acquire_for_cleanup())
    await spin()
    finish.set()
    await task
    await spin(lambda: "release-start:prep" in locks.events)
    assert locks.acquisitions == 1 and not cleanup.done()
    gate.set()
    await abort
    lock = await cleanup
    assert locks.events.index("release-end:prep") < locks.events.index("acquire:cleanup")
    lock.release()
    await spin(lambda: "cleanup" in locks.releases)


async def test_20_dispose_does_not_double_release_a_lock_handed_to_cleanup(
    session_file: Path,
) -> None:
    locks = Locks(["prep"])
    ctl = await make(session_file, locks)
    lock = await ctl.acquire_for_cleanup()
    lock.release()
    await ctl.dispose()
    assert locks.releases == ["prep"]


async def test_21_releases_coarse_lock_on_abort_cleanup_and_writes_under_a_short_lock(
    session_file: Path,
) -> None:
    locks = Locks(["prep", "write"])
    ctl = await make(session_file, locks)
    await ctl.release_for_abort()
    await ctl.with_write_lock(lambda: locks.events.append("run"))
    assert locks.events == ["acquire:prep", "release:prep", "acquire:write", "run", "release:write"]


async def test_22_keeps_fence_active_after_abort_release(session_file: Path) -> None:
    locks = Locks(["prep", "write"])
    ctl = await make(session_file, locks)
    await ctl.release_for_abort()
    append_entries(session_file, user_message("external"))
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.with_write_lock(lambda: None)
    assert caught.value.phase == "fence_check" and caught.value.reason == "foreign-append"
    assert ctl.has_takeover
    assert locks.acquisitions == 2 and locks.releases == ["prep", "write"]


async def test_23_runs_post_prompt_writes_under_a_short_reacquired_lock(session_file: Path) -> None:
    locks = Locks(["prep", "write"])
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()

    def run() -> str:
        assert not ctl.holds_lock  # the short lock is the scope's own
        locks.events.append("run")
        append_entries(session_file, user_message("mine"))
        return "done"

    assert await ctl.with_write_lock(run) == "done"
    assert locks.events[-3:] == ["acquire:write", "run", "release:write"]


async def test_24_reuses_active_post_prompt_lock_for_nested_writes(session_file: Path) -> None:
    locks = Locks(["prep", "outer"])
    locks.fail(2)  # a third acquisition would time out
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()

    async def outer() -> None:
        locks.events.append("outer-start")
        append_entries(session_file, user_message("outer"))
        await ctl.with_write_lock(lambda: locks.events.append("inner"))
        locks.events.append("outer-end")

    await ctl.with_write_lock(outer)
    assert locks.acquisitions == 2
    assert locks.events[2:] == [
        "acquire:outer",
        "outer-start",
        "inner",
        "outer-end",
        "release:outer",
    ]


async def test_25_rejects_post_prompt_writes_when_another_owner_advances_the_file(
    session_file: Path,
) -> None:
    locks = Locks(["prep", "write"])
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()
    append_entries(session_file, user_message("someone else"))
    ran = []
    with pytest.raises(SessionTakeoverError):
        await ctl.with_write_lock(lambda: ran.append(1))
    assert ran == []
    cleanup = await ctl.acquire_for_cleanup()
    cleanup.release()  # a no-op lock after the takeover
    assert locks.releases == ["prep", "write"]
    with pytest.raises(SessionTakeoverError):  # sticky
        await ctl.with_write_lock(lambda: None)
    assert locks.acquisitions == 2
