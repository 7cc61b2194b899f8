"""The fleet's rogue client (``multihost_worker._Rogue``) against a real fence: each
hostile kind of foreign event the fleet injects must be detected by the next check as a
takeover, each benign kind accepted and merged, and a claim by another run refused at the
next append (or check). The fleet's verdicts rest on these kinds meaning what they say."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest

from sessionfence import SessionSupersededError, SessionTakeoverError
from sessionfence.fleet.multihost_worker import BENIGN_KINDS, HOSTILE_KINDS, _Rogue
from sessionfence.store import PostgresStore


def msg(role: str, text: str) -> dict[str, Any]:
    return {"type": "message", "message": {"role": role, "content": text}}


@pytest.fixture
def rogue(pg_url: str) -> Any:
    r = _Rogue({"url": pg_url, "schema": "sf_test", "app": "test-host"})
    yield r
    r.close()


async def _window(pg_store: PostgresStore, rogue: _Rogue, kind: str, where: str) -> Any:
    """One prompt window with the rogue's event in it, then the check; returns what the
    check raised (None when it passed) and the merged entries."""
    sid = "r-" + uuid.uuid4().hex[:10]
    pg_store.create_session(sid)
    for i in range(5):
        pg_store.append_as_cotenant(sid, msg("user", f"earlier {i}"), writer="import")
    merged: list[Any] = []
    fence = await pg_store.open_fence(sid, run_id="run-a", merge_foreign_entries=merged.extend)
    try:
        mine = await fence.append(msg("user", "question"))
        await fence.release_for_prompt()
        rng = random.Random(kind)
        if where == "before":
            rogue.act(kind, sid, "run-a", rng, mine)
        try:
            mine = await fence.append(msg("assistant", "reply"))
            if where == "after":
                rogue.act(kind, sid, "run-a", rng, mine)
            await fence.reacquire_after_prompt()
        except SessionTakeoverError as exc:
            return exc, merged
        return None, merged
    finally:
        await fence.dispose()


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("kind", HOSTILE_KINDS)
async def test_hostile_kind_is_a_takeover(
    pg_store: PostgresStore, rogue: _Rogue, kind: str, where: str
) -> None:
    raised, _ = await _window(pg_store, rogue, kind, where)
    assert isinstance(raised, SessionTakeoverError), kind
    assert not isinstance(raised, SessionSupersededError)
    expected = {"sql-update": ("rewritten",), "sql-delete": ("rewritten", "truncated")}
    assert raised.reason in expected.get(kind, ("foreign-append",))


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("kind", BENIGN_KINDS)
async def test_benign_kind_is_accepted_and_merged(
    pg_store: PostgresStore, rogue: _Rogue, kind: str, where: str
) -> None:
    raised, merged = await _window(pg_store, rogue, kind, where)
    assert raised is None
    assert len(merged) == 1


@pytest.mark.parametrize("where", ["before", "after"])
async def test_supersede_is_refused_at_commit_or_check(
    pg_store: PostgresStore, rogue: _Rogue, where: str
) -> None:
    raised, _ = await _window(pg_store, rogue, "supersede", where)
    assert isinstance(raised, SessionSupersededError)
    assert raised.phase == ("fence_check" if where == "before" else "prompt_reacquire")
