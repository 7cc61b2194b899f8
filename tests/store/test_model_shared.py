"""The controller and the transcript model on either store: the same agent-loop code
(``SessionFenceController.create(id, store=...)``, ``SessionManager.open(id, store=...)``)
runs against the file store and a real PostgreSQL server and must behave the same: owned
turns, co-tenant and benign lines merged into the model, takeovers, supersession seen at the
fence and refused at commit, idempotent appends, refresh and reopen."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sessionfence import (
    FenceController,
    SessionFenceController,
    SessionManager,
    SessionSupersededError,
    SessionTakeoverError,
)

from .test_fence_shared import MIRROR, raw_line


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def contents(entries: Any) -> list[str]:
    return [e["message"]["content"] for e in entries if e.get("type") == "message"]


def model_of(manager: SessionManager) -> dict[str, Any]:
    """What a reader of the session sees, to compare a manager with a fresh open."""
    return {
        "ids": [e["id"] for e in manager.entries],
        "leaf": manager.leaf_id,
        "context": [e["id"] for e in manager.context_entries()],
        "labels": manager.labels,
        "name": manager.session_name,
        "malformed": manager.malformed_lines,
    }


class Attempt:
    """One attempt as an agent loop writes it, on whichever store it is given."""

    def __init__(self, store: Any, session_id: str) -> None:
        self.store = store
        self.session_id = session_id
        self.merged: list[Any] = []

    async def start(self, run_id: str | None = None) -> Attempt:
        self.manager = SessionManager.open(self.session_id, store=self.store)

        def merge(entries: list[Any]) -> Any:
            self.merged.extend(entries)
            return self.manager.merge_foreign_entries(entries)

        self.ctl: FenceController = await SessionFenceController.create(
            self.session_id, store=self.store, merge_foreign_entries=merge, run_id=run_id
        )
        self.manager.writer = self.ctl.writer
        return self

    async def say(self, text: str, key: str | None = None) -> str:
        async with self.ctl.write_lock():
            return self.manager.append_message(user(text), idempotency_key=key)


@pytest.fixture
async def attempt(store: Any, session_id: str) -> AsyncIterator[Attempt]:
    a = await Attempt(store, session_id).start(run_id="run-a")
    try:
        yield a
    finally:
        await a.ctl.dispose()


def reopen(store: Any, session_id: str) -> SessionManager:
    return SessionManager.open(session_id, store=store)


async def test_owned_turns_read_back_the_same(attempt: Attempt) -> None:
    store, sid = attempt.store, attempt.session_id
    assert isinstance(attempt.ctl, FenceController)
    for turn in range(3):
        await attempt.say(f"q{turn}")
        await attempt.ctl.release_for_prompt()
        await attempt.ctl.reacquire_after_prompt()
        await attempt.say(f"a{turn}")
    assert not attempt.ctl.has_takeover
    assert contents(attempt.manager.entries) == ["q0", "a0", "q1", "a1", "q2", "a2"]
    fresh = reopen(store, sid)
    assert model_of(fresh) == model_of(attempt.manager)
    # a chain: each entry hangs on the one before it
    parents = [e["parentId"] for e in fresh.entries]
    assert parents == [None, *[e["id"] for e in fresh.entries][:-1]]


async def test_cotenant_line_is_merged_into_the_model(attempt: Attempt) -> None:
    store, sid = attempt.store, attempt.session_id
    first = await attempt.say("hi")
    await attempt.ctl.release_for_prompt()
    delivered = store.append_as_cotenant(
        sid, {"type": "message", "message": user("also")}, writer="gateway"
    )
    await attempt.ctl.reacquire_after_prompt()
    assert [e["id"] for e in attempt.merged] == [delivered]
    assert attempt.manager.get_entry(delivered) is not None
    reply = await attempt.say("reply")
    # the visible leaf never moved to the merged line: the reply hangs on our own entry
    assert attempt.manager.get_entry(reply)["parentId"] == first  # type: ignore[index]
    fresh = reopen(store, sid)
    assert [e["id"] for e in fresh.entries] == [first, delivered, reply]
    assert fresh.leaf_id == reply


async def test_benign_unfenced_line_is_merged(attempt: Attempt) -> None:
    store, sid = attempt.store, attempt.session_id
    last = await attempt.say("hi")
    await attempt.ctl.release_for_prompt()
    store.append_unfenced(sid, raw_line({**MIRROR, "id": "m1rr0r01"}, last))
    await attempt.ctl.reacquire_after_prompt()
    assert [e["id"] for e in attempt.merged] == ["m1rr0r01"]
    assert not attempt.ctl.has_takeover


@pytest.mark.parametrize("line", [b"{not json\n", b'{"type":"message","id":"x"}\n'])
async def test_foreign_line_is_a_takeover(attempt: Attempt, line: bytes) -> None:
    store, sid = attempt.store, attempt.session_id
    await attempt.say("hi")
    await attempt.ctl.release_for_prompt()
    store.append_unfenced(sid, line)
    with pytest.raises(SessionTakeoverError) as info:
        await attempt.ctl.reacquire_after_prompt()
    assert info.value.reason == "foreign-append"
    assert attempt.ctl.takeover is info.value
    with pytest.raises(SessionTakeoverError):
        async with attempt.ctl.write_lock():
            pass


async def test_write_scope_in_a_prompt_window_checks_first(attempt: Attempt) -> None:
    store, sid = attempt.store, attempt.session_id
    await attempt.say("hi")
    await attempt.ctl.release_for_prompt()
    store.append_unfenced(sid, b"{not json\n")
    before = len(store.read_lines(sid))
    with pytest.raises(SessionTakeoverError):
        await attempt.say("from inside the window")
    assert len(store.read_lines(sid)) == before  # nothing written after the takeover


async def test_supersession_seen_at_the_fence_and_refused_at_commit(attempt: Attempt) -> None:
    store, sid = attempt.store, attempt.session_id
    await attempt.say("hi")
    await attempt.ctl.release_for_prompt()
    store.claim(sid, run_id="run-b")
    before = store.read_lines(sid)
    # a late write from the prompt window, made without any fence check: refused at commit
    with pytest.raises(SessionSupersededError):
        attempt.manager.append_message(user("late"))
    assert store.read_lines(sid) == before
    with pytest.raises(SessionSupersededError) as info:
        await attempt.ctl.reacquire_after_prompt()
    assert info.value.reason == "superseded"
    assert info.value.superseded_by == "run-b"
    assert info.value.new_revision == attempt.ctl.revision + 1


async def test_superseded_while_holding_is_raised_before_the_model_call(
    pg_store: Any,
) -> None:
    """PostgreSQL only: there is no lock, so another host can claim while this run holds
    the session (on files the claim waits for the write lock, i.e. for the prompt window,
    which test_supersession_seen_at_the_fence_and_refused_at_commit covers)."""
    sid = "s-" + uuid.uuid4().hex[:12]
    a = await Attempt(pg_store, sid).start(run_id="run-a")
    try:
        await a.say("hi")
        pg_store.claim(sid, run_id="run-b")
        with pytest.raises(SessionSupersededError):
            await a.ctl.release_for_prompt()  # no model call starts
        assert not a.ctl.holds_lock
    finally:
        await a.ctl.dispose()


async def test_idempotent_appends_survive_a_new_manager(attempt: Attempt) -> None:
    store, sid = attempt.store, attempt.session_id
    first = await attempt.say("once", key="turn-1")
    again = await attempt.say("once", key="turn-1")
    assert again == first
    # a restarted worker (a new manager, same run) retries the append whose ack it lost
    other = SessionManager.open(sid, store=store, writer=attempt.ctl.writer)
    assert other.append_message(user("once"), idempotency_key="turn-1") == first
    lines = [json.loads(x) for x in store.read_lines(sid)[1:]]
    assert [x["id"] for x in lines] == [first]


async def test_refresh_reads_what_others_appended(attempt: Attempt) -> None:
    store, sid = attempt.store, attempt.session_id
    await attempt.say("hi")
    reader = SessionManager.open(sid, store=store)
    await attempt.ctl.release_for_prompt()
    for n in range(3):
        store.append_as_cotenant(sid, {"type": "message", "message": user(f"in {n}")})
    assert reader.refresh() > 0
    assert model_of(reader) == model_of(reopen(store, sid))
    assert contents(reader.entries) == ["hi", "in 0", "in 1", "in 2"]
    assert reader.refresh() == 0  # nothing new: nothing parsed
    await attempt.ctl.reacquire_after_prompt()
    assert contents(attempt.merged) == ["in 0", "in 1", "in 2"]


async def test_the_controller_claims_a_session_that_does_not_exist_yet(store: Any) -> None:
    sid = "s-" + uuid.uuid4().hex[:12]
    a = await Attempt(store, sid).start()
    try:
        ident = await a.say("first words")
        fresh = reopen(store, sid)
        assert fresh.header is not None and fresh.header["type"] == "session"
        assert [e["id"] for e in fresh.entries] == [ident]
    finally:
        await a.ctl.dispose()


async def test_prompt_released_and_with_write_lock(attempt: Attempt) -> None:
    async with attempt.ctl.prompt_released():
        assert not attempt.ctl.holds_lock
    assert attempt.ctl.holds_lock
    ident = await attempt.ctl.with_write_lock(lambda: attempt.manager.append_message(user("x")))
    assert attempt.manager.leaf_id == ident
    await attempt.ctl.dispose()
    assert not attempt.ctl.fence_active
    await attempt.ctl.dispose()  # idempotent


# -- regressions from a review: the same answer on both stores ------------------------------


async def test_release_for_abort_inside_a_write_scope_is_carried_out_at_its_end(
    attempt: Attempt,
) -> None:
    async def abort() -> str:
        await attempt.ctl.release_for_abort()
        assert attempt.ctl.holds_lock  # not yet: the scope is still running
        return "done"

    assert await asyncio.wait_for(attempt.ctl.with_write_lock(abort), 10) == "done"
    assert not attempt.ctl.holds_lock


async def test_overlapping_checks_merge_each_line_once(attempt: Attempt) -> None:
    store, sid = attempt.store, attempt.session_id
    await attempt.say("hi")
    await attempt.ctl.release_for_prompt()
    delivered = store.append_as_cotenant(sid, {"type": "message", "message": user("co")})

    async def noop() -> None:
        await asyncio.sleep(0)

    scope = attempt.ctl.with_write_lock(noop)
    back = asyncio.ensure_future(attempt.ctl.reacquire_after_prompt())
    await asyncio.gather(scope, back)
    assert [e["id"] for e in attempt.merged] == [delivered]
    assert not attempt.ctl.has_takeover


async def test_a_reacquire_cancelled_in_the_merge_is_no_takeover(
    store: Any, session_id: str
) -> None:
    manager = SessionManager.open(session_id, store=store)

    async def slow_merge(entries: list[Any]) -> Any:
        await asyncio.sleep(30)
        return manager.merge_foreign_entries(entries)

    ctl = await SessionFenceController.create(
        session_id, store=store, merge_foreign_entries=slow_merge
    )
    try:
        await ctl.release_for_prompt()
        store.append_as_cotenant(session_id, {"type": "message", "message": user("co")})
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ctl.reacquire_after_prompt(), 0.5)
        assert ctl.takeover is None
    finally:
        await ctl.dispose()


async def test_reload_only_accepts_what_files_accept(store: Any, session_id: str) -> None:
    reloads: list[int] = []
    ctl = await SessionFenceController.create(
        session_id, store=store, reload_session_file=lambda: reloads.append(1)
    )
    try:
        await ctl.release_for_prompt()
        store.append_unfenced(session_id, raw_line({"type": "custom", "customType": "note"}))
        with pytest.raises(SessionTakeoverError) as info:
            await ctl.reacquire_after_prompt()
        assert info.value.reason == "foreign-append"
        assert reloads == []
    finally:
        await ctl.dispose()


async def test_digest_follows_own_appends(attempt: Attempt) -> None:
    await attempt.say("one")
    await attempt.say("two")
    manager = attempt.manager
    with open(manager.path, "rb") as f:
        data = f.read()
    assert manager.digest_size == len(data)
    extra = b'{"type":"custom","customType":"x","id":"c0ffee01","parentId":null}\n'
    manager.note_external_bytes(extra, offset=len(data))  # in step: accepted
    assert manager.digest_size == len(data) + len(extra)
