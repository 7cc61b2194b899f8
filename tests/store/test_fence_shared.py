"""The fence semantics, tested once against both stores (``store`` is parametrized over the
file store and a real PostgreSQL server): owned, co-tenant, benign by policy, takeover,
superseded, idempotency keys."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sessionfence import SessionSupersededError, SessionTakeoverError
from sessionfence._jsonl import dumps_line
from sessionfence._util import iso_utc


def msg(role: str, text: str) -> dict[str, Any]:
    return {"type": "message", "message": {"role": role, "content": text}}


def raw_line(entry: dict[str, Any], parent: str | None = None) -> bytes:
    fields = {"type": entry["type"], "id": entry.get("id", "f00d" + str(id(entry))[-4:])}
    fields["parentId"] = parent
    fields["timestamp"] = iso_utc()
    for k, v in entry.items():
        fields.setdefault(k, v)
    return dumps_line(fields)


MIRROR = {
    "type": "message",
    "message": {
        "role": "assistant",
        "provider": "openclaw",
        "model": "delivery-mirror",
        "content": "mirrored",
    },
}


def ids(lines: list[bytes]) -> list[str]:
    return [json.loads(x)["id"] for x in lines[1:] if x.strip()]


async def test_owned_turns_no_takeover(store: Any, session_id: str) -> None:
    fence = await store.open_fence(session_id, run_id="run-a")
    try:
        written = []
        for turn in range(3):
            written.append(await fence.append(msg("user", f"q{turn}")))
            await fence.release_for_prompt()
            await fence.reacquire_after_prompt()
            written.append(await fence.append(msg("assistant", f"a{turn}")))
        assert ids(store.read_lines(session_id)) == written
        parents = [json.loads(x).get("parentId") for x in store.read_lines(session_id)[2:]]
        assert parents == written[:-1]  # a chain: each hangs on the previous own entry
    finally:
        await fence.dispose()


async def test_cotenant_append_is_accepted_and_merged(store: Any, session_id: str) -> None:
    merged: list[Any] = []
    fence = await store.open_fence(
        session_id, run_id="run-a", merge_foreign_entries=lambda e: merged.extend(e)
    )
    try:
        await fence.append(msg("user", "hi"))
        await fence.release_for_prompt()
        delivered = store.append_as_cotenant(
            session_id, msg("user", "and also"), writer="gateway", idempotency_key="in-1"
        )
        await fence.reacquire_after_prompt()  # a user line by content, a co-tenant's by record
        assert [e["id"] for e in merged] == [delivered]
        await fence.append(msg("assistant", "ok"))
    finally:
        await fence.dispose()


async def test_idempotency_key_retry_is_a_noop(store: Any, session_id: str) -> None:
    first = store.append_as_cotenant(session_id, msg("user", "x"), idempotency_key="k1")
    again = store.append_as_cotenant(session_id, msg("user", "x"), idempotency_key="k1")
    assert first == again
    assert ids(store.read_lines(session_id)) == [first]


async def test_claimant_idempotency_key(store: Any, session_id: str) -> None:
    fence = await store.open_fence(session_id, run_id="run-a")
    try:
        a = await fence.append(msg("user", "x"), idempotency_key="turn-1")
        b = await fence.append(msg("user", "x"), idempotency_key="turn-1")
        assert a == b
        assert ids(store.read_lines(session_id)) == [a]
    finally:
        await fence.dispose()


async def test_benign_unfenced_append_is_accepted(store: Any, session_id: str) -> None:
    merged: list[Any] = []
    fence = await store.open_fence(
        session_id, run_id="run-a", merge_foreign_entries=lambda e: merged.extend(e)
    )
    try:
        last = await fence.append(msg("user", "hi"))
        await fence.release_for_prompt()
        store.append_unfenced(session_id, raw_line({**MIRROR, "id": "m1rr0r01"}, last))
        store.append_unfenced(
            session_id, raw_line({"type": "custom", "customType": "x", "id": "c0ffee01"}, last)
        )
        await fence.reacquire_after_prompt()
        assert [e["id"] for e in merged] == ["m1rr0r01", "c0ffee01"]
    finally:
        await fence.dispose()


async def test_foreign_user_message_is_a_takeover(store: Any, session_id: str) -> None:
    fence = await store.open_fence(session_id, run_id="run-a")
    try:
        last = await fence.append(msg("user", "hi"))
        await fence.release_for_prompt()
        store.append_unfenced(
            session_id, raw_line({**msg("user", "intruder"), "id": "bad00001"}, last)
        )
        with pytest.raises(SessionTakeoverError) as info:
            await fence.reacquire_after_prompt()
        assert info.value.reason == "foreign-append"
        assert not isinstance(info.value, SessionSupersededError)
    finally:
        await fence.dispose()


async def test_unparseable_foreign_line_is_a_takeover(store: Any, session_id: str) -> None:
    fence = await store.open_fence(session_id, run_id="run-a")
    try:
        await fence.append(msg("user", "hi"))
        await fence.release_for_prompt()
        store.append_unfenced(session_id, b"{not json\n")
        with pytest.raises(SessionTakeoverError) as info:
            await fence.reacquire_after_prompt()
        assert info.value.reason == "foreign-append"
    finally:
        await fence.dispose()


async def test_benign_line_reusing_an_id_is_a_takeover(store: Any, session_id: str) -> None:
    fence = await store.open_fence(session_id, run_id="run-a", merge_foreign_entries=lambda e: None)
    try:
        mine = await fence.append(msg("user", "hi"))
        await fence.release_for_prompt()
        store.append_unfenced(session_id, raw_line({**MIRROR, "id": mine}, mine))
        with pytest.raises(SessionTakeoverError) as info:
            await fence.reacquire_after_prompt()
        assert "reuses the entry id" in (info.value.detail or "")
    finally:
        await fence.dispose()


async def test_supersession_is_visible_and_late_write_refused(store: Any, session_id: str) -> None:
    fence = await store.open_fence(session_id, run_id="run-a")
    try:
        await fence.append(msg("user", "hi"))
        revision = fence.revision
        await fence.release_for_prompt()
        successor = store.claim(session_id, run_id="run-b")
        assert successor.revision == revision + 1
        with pytest.raises(SessionSupersededError) as info:
            await fence.reacquire_after_prompt()
        assert info.value.reason == "superseded"
        assert (info.value.superseded_by, info.value.new_revision) == ("run-b", revision + 1)
        before = store.read_lines(session_id)
        with pytest.raises(SessionSupersededError):
            await fence.append(msg("assistant", "late"))
        assert store.read_lines(session_id) == before  # the late write never landed
    finally:
        await fence.dispose()


async def test_superseded_writer_refused_at_commit_without_a_check(
    store: Any, session_id: str
) -> None:
    """The append itself checks the claim (no fence check in between)."""
    old = store.claim(session_id, run_id="run-a")
    store.append(session_id, msg("user", "1"), writer=old)
    store.claim(session_id, run_id="run-b")
    before = store.read_lines(session_id)
    with pytest.raises(SessionSupersededError) as info:
        store.append(session_id, msg("user", "late"), writer=old)
    assert info.value.superseded_by == "run-b"
    assert store.read_lines(session_id) == before


async def test_same_run_reclaim_keeps_revision(store: Any, session_id: str) -> None:
    a = store.claim(session_id, run_id="run-a")
    again = store.claim(session_id, run_id="run-a")
    assert a.revision == again.revision


async def test_export_import_round_trip(store: Any, session_id: str, tmp_path: Any) -> None:
    store.append_as_cotenant(session_id, msg("user", 'héllo \u2028 "q" 1e21'))
    out = tmp_path / "out.jsonl"
    store.export_jsonl(session_id, str(out))
    assert out.read_bytes() == b"".join(store.read_lines(session_id))
    store.import_jsonl(session_id + "-copy", str(out))
    assert store.read_lines(session_id + "-copy") == store.read_lines(session_id)


async def test_superseded_claimant_retry_is_refused_even_if_it_landed(
    store: Any, session_id: str
) -> None:
    """The claim is checked before the idempotency key for a claimant: a superseded run's
    retry of an append that landed is refused, as any other write of that run."""
    old = store.claim(session_id, run_id="run-a")
    first = store.append(session_id, msg("user", "1"), writer=old, idempotency_key="turn-1")
    # While it holds the claim, the retry is a no-op that returns the landed entry.
    again = store.append(session_id, msg("user", "1"), writer=old, idempotency_key="turn-1")
    assert again.entry_id == first.entry_id
    store.claim(session_id, run_id="run-b")
    before = store.read_lines(session_id)
    with pytest.raises(SessionSupersededError) as info:
        store.append(session_id, msg("user", "1"), writer=old, idempotency_key="turn-1")
    assert info.value.superseded_by == "run-b"
    assert store.read_lines(session_id) == before


async def test_cotenant_retry_is_answered_whoever_claims(store: Any, session_id: str) -> None:
    """A co-tenant has no claim to check: its retry returns the landed entry after any
    number of claims."""
    first = store.append_as_cotenant(session_id, msg("user", "in"), idempotency_key="in-7")
    store.claim(session_id, run_id="run-a")
    store.claim(session_id, run_id="run-b")
    again = store.append_as_cotenant(session_id, msg("user", "in"), idempotency_key="in-7")
    assert again == first
    assert ids(store.read_lines(session_id)) == [first]
