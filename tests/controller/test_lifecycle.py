"""Controller scenarios 80-92 and 98 of reference §9.1: the held lock's lifecycle around
takeovers, deferred releases, reacquisition, cleanup and disposal, and lock errors.

Left out (SPEC §5.2 item 5): 93-97 test the original's provider stream-function wrappers
(re-wrapping a rebuilt stream function, not stacking wrappers) and its ``maxRetries``
defaults; they are replaced by ``prompt_released()``, whose contract 92 tests below.
Scenarios 80 and 98 use the real session write lock.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sessionfence import (
    SessionTakeoverError,
    SessionWriteLockStaleError,
    SessionWriteLockTimeoutError,
)
from sessionfence.controller import SessionFenceController

from .helpers import (
    Locks,
    append_entries,
    make,
    mirror_message,
    read_entries,
    spin,
    user_message,
)

pytestmark = pytest.mark.usefixtures("backend")


async def real(path: Path, **options: Any) -> SessionFenceController:
    return await SessionFenceController.create(
        path, timeout=options.pop("timeout", 0.25), **options
    )


async def test_80_releases_retained_lock_after_takeover_for_the_next_inbound_run(
    session_file: Path,
) -> None:
    ctl = await real(session_file)
    await ctl.release_for_prompt()
    await ctl.reacquire_after_prompt()
    append_entries(session_file, user_message("external while held"))
    with pytest.raises(SessionTakeoverError):
        await ctl.with_write_lock(lambda: None)
    assert not ctl.holds_lock
    inbound = await real(session_file)  # would time out if the takeover kept the lock
    await inbound.with_write_lock(
        lambda: append_entries(session_file, user_message("next-inbound"))
    )
    with pytest.raises(SessionTakeoverError):
        await ctl.with_write_lock(lambda: append_entries(session_file, user_message("late")))
    texts = [e.get("message", {}).get("content") for e in read_entries(session_file)]
    assert "next-inbound" in texts and "late" not in texts
    await inbound.dispose()
    await ctl.dispose()


async def test_81_waits_for_active_retained_writers_before_releasing_a_takeover_lock(
    session_file: Path,
) -> None:
    locks = Locks(["prep", "held"])
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()
    await ctl.reacquire_after_prompt()
    running = asyncio.Event()
    finish = asyncio.Event()

    async def long_write() -> None:
        running.set()
        await finish.wait()
        locks.events.append("long-write-end")

    first = ctl.with_write_lock(long_write)
    await running.wait()
    append_entries(session_file, user_message("external"))
    second = ctl.with_write_lock(lambda: None)
    await spin(lambda: ctl.has_takeover)
    await spin()
    assert "release:held" not in locks.events
    finish.set()
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(r, SessionTakeoverError) for r in results)
    assert locks.events.index("long-write-end") < locks.events.index("release:held")
    assert locks.releases == ["prep", "held"]


async def test_82_defers_abort_release_requested_inside_a_scope_until_it_ends(
    session_file: Path,
) -> None:
    locks = Locks(["prep"])
    ctl = await make(session_file, locks)

    async def write() -> None:
        locks.events.append("write-start")
        await ctl.release_for_abort()  # would wait for itself: deferred instead
        assert ctl.holds_lock
        locks.events.append("write-end")

    await ctl.with_write_lock(write)
    assert locks.events == ["acquire:prep", "write-start", "write-end", "release:prep"]
    assert ctl.fence_active and not ctl.holds_lock


async def test_83_controls_held_lock_across_deferred_release_reacquire_and_prompt_release(
    session_file: Path,
) -> None:
    locks = Locks(["prep", "reacquired", "cleanup"])
    ctl = await make(session_file, locks)
    await ctl.with_write_lock(ctl.release_for_abort)
    await ctl.reacquire_after_prompt()
    await ctl.release_for_prompt()
    lock = await ctl.acquire_for_cleanup()
    lock.release()
    await ctl.dispose()
    assert locks.acquisitions == 3
    assert locks.releases == ["prep", "reacquired", "cleanup"]


async def test_84_releases_a_reacquired_lock_that_resolves_after_disposal(
    session_file: Path,
) -> None:
    locks = Locks(["prep", "late"])
    gate = asyncio.Event()
    locks.acquire_gates[1] = gate
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()
    reacquire = asyncio.ensure_future(ctl.reacquire_after_prompt())
    await spin(lambda: locks.acquisitions == 2)
    await ctl.dispose()
    gate.set()
    await reacquire
    assert locks.releases == ["prep", "late"]
    assert not ctl.holds_lock


async def test_85_waits_for_in_flight_reacquire_before_cleanup_adopts_its_lock(
    session_file: Path,
) -> None:
    locks = Locks(["prep", "reacquired"])
    locks.fail(2)  # cleanup must not acquire a third lock
    gate = asyncio.Event()
    merged: list[Any] = []

    async def merge(entries: list[Any]) -> None:
        merged.append(entries)
        await gate.wait()

    ctl = await make(session_file, locks, merge_foreign_entries=merge)
    await ctl.release_for_prompt()
    append_entries(session_file, mirror_message())
    reacquire = asyncio.ensure_future(ctl.reacquire_after_prompt())
    await spin(lambda: bool(merged))
    cleanup = asyncio.ensure_future(ctl.acquire_for_cleanup())
    await spin()
    assert not cleanup.done()
    gate.set()
    await reacquire
    lock = await cleanup
    assert locks.acquisitions == 2 and len(merged) == 1
    lock.release()
    assert locks.releases == ["prep", "reacquired"]
    assert not ctl.has_takeover


async def test_86_does_not_retry_cleanup_acquisition_after_reacquire_contention(
    session_file: Path,
) -> None:
    locks = Locks(["prep"])
    locks.fail(1)
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()
    with pytest.raises(SessionWriteLockTimeoutError):
        await ctl.reacquire_after_prompt()
    assert ctl.takeover is not None and ctl.takeover.reason == "lock-timeout"
    assert ctl.takeover.phase == "prompt_reacquire"
    lock = await ctl.acquire_for_cleanup()
    lock.release()
    assert locks.acquisitions == 2


async def test_87_makes_a_late_prompt_reacquire_a_noop_after_cleanup_starts(
    session_file: Path,
) -> None:
    locks = Locks(["prep", "cleanup"])
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()
    lock = await ctl.acquire_for_cleanup()
    await ctl.reacquire_after_prompt()
    lock.release()
    assert locks.acquisitions == 2
    assert locks.releases == ["prep", "cleanup"]


async def test_88_cleanup_inside_a_write_scope_does_not_self_deadlock(session_file: Path) -> None:
    locks = Locks(["prep"])
    locks.fail(1)  # the fresh acquisition cleanup falls back to
    ctl = await make(session_file, locks)
    handed: list[Any] = []

    async def write() -> None:
        handed.append(await ctl.acquire_for_cleanup())

    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.with_write_lock(write)
    assert caught.value.reason == "lock-timeout" and caught.value.phase == "cleanup"
    handed[0].release()  # a no-op lock
    assert locks.releases == ["prep"] and not ctl.holds_lock


async def test_89_returns_a_noop_cleanup_lock_after_reacquire_times_out(session_file: Path) -> None:
    locks = Locks(["prep"])
    locks.fail(1)
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()
    with pytest.raises(SessionWriteLockTimeoutError):
        await ctl.reacquire_after_prompt()
    lock = await ctl.acquire_for_cleanup()
    lock.release()
    await ctl.dispose()
    assert locks.releases == ["prep"] and ctl.has_takeover


@pytest.mark.parametrize(
    ("kind", "error", "reason"),
    [
        ("timeout", SessionWriteLockTimeoutError, "lock-timeout"),
        ("stale", SessionWriteLockStaleError, "lock-stale"),
    ],
)
async def test_90_91_skip_cleanup_reacquisition_after_a_post_prompt_lock_error(
    session_file: Path, kind: str, error: type[BaseException], reason: str
) -> None:
    locks = Locks(["prep"])
    locks.fail(1, kind)
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()
    ran: list[int] = []
    with pytest.raises(error):
        await ctl.with_write_lock(lambda: ran.append(1))
    assert ran == []
    assert ctl.takeover is not None and ctl.takeover.reason == reason
    assert ctl.takeover.phase == "fence_check"
    lock = await ctl.acquire_for_cleanup()
    lock.release()
    assert locks.acquisitions == 2
    with pytest.raises(SessionTakeoverError):  # takeover is sticky
        await ctl.with_write_lock(lambda: None)


async def test_92_prompt_released_releases_around_the_model_call(session_file: Path) -> None:
    locks = Locks(["prep", "reacquired"])
    ctl = await make(session_file, locks)
    async with ctl.prompt_released():
        locks.events.append("stream")
        assert not ctl.holds_lock
    assert ctl.holds_lock
    assert locks.events == ["acquire:prep", "release:prep", "stream", "acquire:reacquired"]


async def test_92b_prompt_released_reacquire_error_replaces_the_outcome(session_file: Path) -> None:
    ctl = await make(session_file)
    with pytest.raises(SessionTakeoverError) as caught:
        async with ctl.prompt_released():
            append_entries(session_file, user_message("someone else"))
    assert caught.value.phase == "prompt_reacquire"


async def test_98_prompt_appends_do_not_block_session_locked_hook_writes(
    session_file: Path,
) -> None:
    from sessionfence.lock import acquire_session_write_lock_async

    ctl = await real(session_file, timeout=5.0)
    await ctl.release_for_prompt()
    hook_holds = asyncio.Event()
    hook_done = asyncio.Event()

    async def hook() -> None:
        async with await acquire_session_write_lock_async(session_file, timeout=5.0):
            hook_holds.set()
            append_entries(session_file, mirror_message("hook delivery"))
            await hook_done.wait()

    hook_task = asyncio.ensure_future(hook())
    await hook_holds.wait()
    answer = user_message("prompt-stream append")
    append = ctl.with_write_lock(
        lambda: append_entries(session_file, answer), publish_owned_write=True
    )
    await spin()
    assert not append.done()  # waits for the hook's lock, does not fail
    hook_done.set()
    await asyncio.gather(hook_task, append)
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover
    entries = read_entries(session_file)
    assert entries[-1] == answer and entries[-2]["message"]["content"][0]["text"] == "hook delivery"
    await ctl.dispose()
