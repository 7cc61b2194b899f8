"""The controller never adopts a change it did not make (issue 10 §2, SPEC §5.2 item 6),
and the smaller fence defects of issue 10 §3.

Every test runs on both hot-path backends (``backend`` fixture).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sessionfence import SessionFenceController, SessionTakeoverError
from sessionfence.lock import inspect_lock
from sessionfence.transcript import SessionManager, guard_session_manager

from .helpers import (
    Locks,
    append_entries,
    line,
    make,
    mirror_message,
    user_message,
    write_at,
)

pytestmark = pytest.mark.usefixtures("backend", "no_lock_left_held")


# -- foreign edits made before our own append ---------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    cut = data.rstrip(b"\n").rfind(b"\n") + 1  # drop the last line
    with open(path, "r+b") as f:
        f.truncate(cut)


def _rewrite_head(path: Path) -> None:
    # Same size, inside the header line (the whole file is inside the tail window here).
    data = path.read_bytes()
    at = data.index(b'"session"') + 1
    write_at(path, at, b"S")


def _inject_user_line(path: Path) -> None:
    append_entries(path, user_message("injected by someone else"))


EDITS: dict[str, Callable[[Path], None]] = {
    "truncate": _truncate,
    "rewrite-head": _rewrite_head,
    "inject-user-line": _inject_user_line,
}


async def _guarded(path: Path, verify: str) -> tuple[SessionFenceController, SessionManager]:
    ctl = await SessionFenceController.create(path, verify=verify)  # type: ignore[arg-type]
    manager = guard_session_manager(
        SessionManager.open(path), on_message_persisted=ctl.refresh_after_owned_write
    )
    manager.append_message({"role": "user", "content": "first"})
    await ctl.release_for_prompt()
    await ctl.reacquire_after_prompt()
    manager.append_message({"role": "assistant", "content": "second"})
    return ctl, manager


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize("held", [True, False], ids=["lock-held", "lock-released"])
@pytest.mark.parametrize("verify", ["tail", "full"])
async def test_refresh_after_owned_write_never_adopts_a_foreign_edit_made_before_it(
    session_file: Path, verify: str, held: bool, edit: str
) -> None:
    ctl, manager = await _guarded(session_file, verify)
    if not held:
        await ctl.release_for_prompt()
    EDITS[edit](session_file)
    # Our own append, after the foreign edit; the guard calls refresh_after_owned_write.
    manager.append_message({"role": "user", "content": "ours, after the edit"})
    assert not ctl.has_takeover
    with pytest.raises(SessionTakeoverError):
        if held:
            await ctl.release_for_prompt()  # the held period is fenced too
        else:
            await ctl.reacquire_after_prompt()
    assert ctl.has_takeover
    await ctl.dispose()


async def test_refresh_after_owned_write_adopts_exactly_own_bytes(session_file: Path) -> None:
    ctl, _ = await _guarded(session_file, "tail")
    await ctl.release_for_prompt()  # own appends while held: no takeover
    await ctl.reacquire_after_prompt()
    ours = append_entries(session_file, user_message("written by hand"))
    ctl.refresh_after_owned_write(ours)  # told the bytes: adopted
    other = append_entries(session_file, user_message("someone else"))
    ctl.refresh_after_owned_write(other + b"x")  # bytes differ: not adopted
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.release_for_prompt()
    assert caught.value.reason == "foreign-append"
    await ctl.dispose()


async def test_a_foreign_line_between_two_own_lines_is_not_adopted(session_file: Path) -> None:
    ctl, manager = await _guarded(session_file, "tail")
    write = manager._write  # inject a foreign line between two own writes

    def racing_write(entry: Any, idempotency_key: str | None = None) -> Any:
        append_entries(session_file, user_message("foreign, just before ours"))
        return write(entry, idempotency_key)

    manager._write = racing_write  # type: ignore[method-assign]
    manager.append_message({"role": "user", "content": "ours"})
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.release_for_prompt()
    assert caught.value.reason == "foreign-append"


# -- release_for_prompt fences the held period ----------------------------------------------


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize("verify", ["tail", "full"])
async def test_release_for_prompt_judges_a_change_made_while_the_lock_was_held(
    session_file: Path, verify: str, edit: str
) -> None:
    locks = Locks()
    ctl = await make(session_file, locks, verify=verify)
    await ctl.release_for_prompt()
    await ctl.reacquire_after_prompt()
    EDITS[edit](session_file)
    with pytest.raises(SessionTakeoverError):
        await ctl.release_for_prompt()
    assert locks.handed[-1].released == 1  # the lock is released all the same
    with pytest.raises(SessionTakeoverError):
        await ctl.with_write_lock(lambda: None)  # sticky


async def test_release_for_abort_records_a_held_period_takeover_without_raising(
    session_file: Path,
) -> None:
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    await ctl.reacquire_after_prompt()
    _truncate(session_file)
    await ctl.release_for_abort()
    assert ctl.takeover is not None and ctl.takeover.reason == "truncated"


async def test_owned_appends_and_benign_appends_while_held_are_not_takeovers(
    session_file: Path,
) -> None:
    ctl, manager = await _guarded(session_file, "full")
    await ctl.with_write_lock(lambda: append_entries(session_file, user_message("scoped")))
    manager.append_message({"role": "assistant", "content": "guarded"})
    await ctl.release_for_prompt()
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover
    await ctl.dispose()


@pytest.mark.parametrize("edit", ["truncate", "rewrite-head"])
async def test_a_write_scope_does_not_adopt_a_non_append(session_file: Path, edit: str) -> None:
    ctl = await make(session_file)
    append_entries(session_file, user_message("one"), user_message("two"))
    await ctl.release_for_prompt()
    with pytest.raises(SessionTakeoverError):
        await ctl.with_write_lock(lambda: EDITS[edit](session_file))


# -- owned_file_write publishes only a proven append ----------------------------------------


@pytest.mark.parametrize("edit", ["truncate", "rewrite-head"])
@pytest.mark.parametrize("verify", ["tail", "full"])
async def test_owned_file_write_without_validator_publishes_only_an_append(
    session_file: Path, verify: str, edit: str
) -> None:
    ctl = await make(session_file, verify=verify)
    append_entries(session_file, user_message("one"), user_message("two"))
    await ctl.release_for_prompt()
    ctl.owned_file_write(lambda: EDITS[edit](session_file))
    with pytest.raises(SessionTakeoverError):
        await ctl.reacquire_after_prompt()


async def test_owned_file_write_after_a_foreign_line_publishes_nothing(session_file: Path) -> None:
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    append_entries(session_file, user_message("foreign"))
    ctl.owned_file_write(lambda: append_entries(session_file, user_message("ours")))
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.reacquire_after_prompt()
    assert caught.value.reason == "foreign-append"


async def test_owned_file_write_without_validator_publishes_a_managers_append(
    session_file: Path,
) -> None:
    manager = SessionManager.open(session_file)
    ctl = await make(session_file, verify="full")
    await ctl.release_for_prompt()
    ctl.owned_file_write(lambda: manager.append_message({"role": "user", "content": "ours"}))
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover


async def test_owned_file_write_without_validator_does_not_publish_unknown_bytes(
    session_file: Path,
) -> None:
    # Raw bytes with no validator cannot be told from a foreign line written meanwhile.
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    ctl.owned_file_write(
        lambda: (
            append_entries(session_file, user_message("foreign, during run"))
            + append_entries(session_file, user_message("ours"))
        )
    )
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.reacquire_after_prompt()
    assert caught.value.reason == "foreign-append"


async def test_owned_file_write_with_an_exact_validator_publishes_raw_bytes(
    session_file: Path,
) -> None:
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    ours = line(user_message("ours"))
    ctl.owned_file_write(
        lambda: append_entries(session_file, json.loads(ours)),
        lambda _result, text: text == ours,
    )
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover


# -- a lock lost while held ---------------------------------------------------------------------

_OTHER_WRITER = """
import sys
from sessionfence.lock import acquire_session_write_lock
path, data = sys.argv[1], sys.argv[2]
with acquire_session_write_lock(path, timeout=10):
    with open(path, "a") as f:
        f.write(data)
"""


def _other_process_appends(path: Path, data: str) -> None:
    subprocess.run([sys.executable, "-c", _OTHER_WRITER, str(path), data], check=True, timeout=60)


async def _wait_force_released(path: Path) -> None:
    deadline = time.monotonic() + 30
    while inspect_lock(path).held:
        assert time.monotonic() < deadline, "the watchdog never force-released the lock"
        await asyncio.sleep(0.02)


async def test_a_force_released_lock_is_a_takeover_not_an_adoption(session_file: Path) -> None:
    ctl = await SessionFenceController.create(session_file, max_hold=0.3)
    await ctl.release_for_prompt()
    await ctl.reacquire_after_prompt()
    await _wait_force_released(session_file)  # a long tool call outlived the max hold
    _other_process_appends(session_file, line(user_message("the next holder's line")))
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.release_for_prompt()
    assert caught.value.reason == "lock-lost"
    await ctl.dispose()


async def test_a_write_after_the_lock_was_force_released_raises_lock_lost(
    session_file: Path,
) -> None:
    ctl = await SessionFenceController.create(session_file, max_hold=0.3)
    await ctl.release_for_prompt()
    await ctl.reacquire_after_prompt()
    await _wait_force_released(session_file)
    wrote: list[int] = []
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.with_write_lock(lambda: wrote.append(1))
    assert caught.value.reason == "lock-lost" and wrote == []
    await ctl.dispose()


async def test_refresh_after_the_lock_was_lost_records_lock_lost(session_file: Path) -> None:
    ctl, manager = await _guarded(session_file, "tail")
    held = ctl._hold.lock  # replace the lock file under the held lock
    lock_path = held.lock_path
    os.replace(session_file, session_file.with_suffix(".keep"))
    os.replace(session_file.with_suffix(".keep"), session_file)
    os.unlink(lock_path)
    assert not held.is_intact()
    manager.append_message({"role": "user", "content": "after the lock file vanished"})
    assert ctl.takeover is not None and ctl.takeover.reason == "lock-lost"
    await ctl.dispose()


# -- §3: smaller fence defects ----------------------------------------------------------------


async def test_a_deeply_nested_foreign_line_is_a_foreign_append_takeover(
    session_file: Path,
) -> None:
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    depth = 100_000  # 200 KB of nested arrays: deeper than any interpreter stack
    with open(session_file, "a") as f:
        f.write("[" * depth + "]" * depth + "\n")
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.reacquire_after_prompt()
    assert caught.value.reason == "foreign-append"
    cleanup = await ctl.acquire_for_cleanup()  # no RecursionError here either
    cleanup.release()


async def test_cleanup_with_a_deeply_nested_foreign_line_gives_a_noop_lock(
    session_file: Path,
) -> None:
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    with open(session_file, "a") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n")
    cleanup = await ctl.acquire_for_cleanup()
    cleanup.release()
    assert ctl.takeover is not None and ctl.takeover.reason == "foreign-append"


async def test_a_mirror_line_reusing_an_existing_id_is_refused(session_file: Path) -> None:
    manager = SessionManager.open(session_file)
    first = manager.append_message({"role": "user", "content": "q"})
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    clash = mirror_message("delivered")
    clash["id"] = first
    append_entries(session_file, clash)
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.reacquire_after_prompt()
    assert caught.value.reason == "foreign-append"
    assert "reuses the entry id" in (caught.value.detail or "")


async def test_two_mirror_lines_with_one_id_are_refused(session_file: Path) -> None:
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    a, b = mirror_message("a"), mirror_message("b")
    b["id"] = a["id"]
    append_entries(session_file, a, b)
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.reacquire_after_prompt()
    assert caught.value.reason == "foreign-append"


async def test_a_mirror_line_with_a_new_id_is_still_accepted(session_file: Path) -> None:
    manager = SessionManager.open(session_file)
    manager.append_message({"role": "user", "content": "q"})
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    append_entries(session_file, mirror_message("delivered"))
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover


async def test_cancelling_reacquire_during_an_async_merge_marks_nothing(
    session_file: Path,
) -> None:
    entered = asyncio.Event()
    never = asyncio.Event()
    calls: list[int] = []

    async def merge(entries: list[Any]) -> None:
        calls.append(len(entries))
        if len(calls) == 1:
            entered.set()
            await never.wait()

    ctl = await make(session_file, merge_foreign_entries=merge)
    await ctl.release_for_prompt()
    append_entries(session_file, mirror_message("delivered"))
    task = asyncio.ensure_future(ctl.reacquire_after_prompt())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ctl.takeover is None
    assert not ctl.holds_lock
    await ctl.reacquire_after_prompt()  # the next try merges and passes
    assert not ctl.has_takeover and calls == [1, 1]


async def test_own_published_entries_are_never_merged_back(session_file: Path) -> None:
    manager = SessionManager.open(session_file)
    ctl = await make(session_file, merge_foreign_entries=manager.merge_foreign_entries)
    await ctl.release_for_prompt()
    written = await ctl.with_write_lock(
        lambda: manager.append_message({"role": "user", "content": "steer"}),
        publish_owned_write=True,
        resolve_published_entries=lambda entry_id: [{"kind": "id", "id": entry_id}],
    )
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover
    ids = [json.loads(x).get("id") for x in session_file.read_text().splitlines()]
    assert ids.count(written) == 1
    assert [e["id"] for e in manager.entries].count(written) == 1


# -- acquire_for_cleanup with an async release ------------------------------------------------


async def test_cleanup_release_with_an_async_release_is_done_when_it_returns(
    session_file: Path,
) -> None:
    locks = Locks(async_release=True)
    ctl = await make(session_file, locks)
    cleanup = await ctl.acquire_for_cleanup()
    cleanup.release()  # from inside the running loop
    assert locks.handed[-1].released == 1 and locks.releases[-1] == locks.handed[-1].label


def test_cleanup_release_with_an_async_release_outside_a_loop(session_file: Path) -> None:
    locks = Locks(async_release=True)

    async def take() -> Any:
        ctl = await make(session_file, locks)
        return await ctl.acquire_for_cleanup()

    cleanup = asyncio.run(take())
    assert locks.releases == []
    cleanup.release()  # the loop is gone: released here all the same
    assert locks.releases == [locks.handed[-1].label]
    cleanup.release()  # idempotent
    assert len(locks.releases) == 1


async def test_cleanup_arelease_awaits_an_async_release(session_file: Path) -> None:
    locks = Locks(async_release=True)
    ctl = await make(session_file, locks)
    cleanup = await ctl.acquire_for_cleanup()
    await cleanup.arelease()
    assert locks.releases == [locks.handed[-1].label]


# -- found by review: metadata during a publication, trust before the first release, windows --


@pytest.mark.parametrize("verify", ["tail", "full"])
async def test_a_chmod_by_others_during_a_publication_that_wrote_nothing_passes(
    session_file: Path, verify: str
) -> None:
    ctl = await SessionFenceController.create(session_file, verify=verify)  # type: ignore[arg-type]
    await ctl.release_for_prompt()
    await ctl.reacquire_after_prompt()
    mode = session_file.stat().st_mode & 0o777
    await ctl.with_write_lock(
        lambda: os.chmod(session_file, mode ^ 0o040), publish_owned_write=True
    )
    assert not ctl.has_takeover
    await ctl.dispose()


@pytest.mark.parametrize("verify", ["tail", "full"])
async def test_a_guarded_append_before_the_first_release_is_trusted(
    session_file: Path, verify: str
) -> None:
    ctl = await SessionFenceController.create(session_file, verify=verify)  # type: ignore[arg-type]
    manager = guard_session_manager(
        SessionManager.open(session_file), on_message_persisted=ctl.refresh_after_owned_write
    )
    manager.append_message({"role": "user", "content": "before the first release"})
    assert ctl.trusted_snapshot() is not None
    await ctl.dispose()


@pytest.mark.parametrize("verify", ["tail", "full"])
async def test_publish_owned_snapshot_takes_a_fingerprint_of_another_window(
    session_file: Path, verify: str
) -> None:
    from sessionfence import fingerprint

    ctl = await SessionFenceController.create(session_file, verify=verify, window=64)  # type: ignore[arg-type]
    await ctl.release_for_prompt()
    await ctl.reacquire_after_prompt()
    results: list[bool] = []

    def block() -> None:
        append_entries(session_file, user_message("x" * 200))
        results.append(ctl.publish_owned_snapshot(fingerprint(session_file)))  # 4 KiB window

    await ctl.with_write_lock(block)
    assert results == [True] and not ctl.has_takeover
    await ctl.dispose()
