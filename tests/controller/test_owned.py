"""Controller scenarios 42-44 and 56-79 of reference §9.1: owned writes — refreshes, the
synchronous owned (compaction) write, publication helpers, publications and their queue,
and writes by other in-process controllers.

The six scenarios of the original change (the synchronous owned compaction write) are
tests 61, 63, 64, 65, 66 and 67 below, named after them.

Left out here: 62 (compaction through an SQLite transcript owner: SQLite session markers
are not ported, SPEC §5.2 item 5).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sessionfence import SessionTakeoverError, fingerprint
from sessionfence.transcript import SessionManager, guard_session_manager

from .helpers import (
    Locks,
    MergeSpy,
    append_entries,
    compaction,
    compaction_append,
    is_expected_compaction,
    line,
    make,
    mirror_message,
    read_entries,
    spin,
    user_message,
)

pytestmark = pytest.mark.usefixtures("backend")


def ids_of(entries: list[Any]) -> list[str]:
    return [e["id"] for e in entries]


async def watching_peer(path: Path) -> tuple[Any, MergeSpy]:
    """Another controller of the same file, released: at its next fence check its merge
    callback receives every published owned write it has not seen, in file order."""
    spy = MergeSpy()
    peer = await make(path, merge_foreign_entries=spy)
    await peer.release_for_prompt()
    return peer, spy


async def peer_merged_ids(peer: Any, spy: MergeSpy) -> list[str]:
    await peer.with_write_lock(lambda: None)
    assert not peer.has_takeover
    return [i for call in spy.calls for i in ids_of(call)]


# -- ordinary writes ----------------------------------------------------------------------------


async def test_42_refreshes_prompt_fence_after_an_owned_write_throws(session_file: Path) -> None:
    locks = Locks()
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()

    def half_done() -> None:
        append_entries(session_file, user_message("written before the failure"))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await ctl.with_write_lock(half_done)
    await ctl.with_write_lock(lambda: None)
    assert not ctl.has_takeover
    assert locks.acquisitions == 3 and len(locks.releases) == 3


async def test_43_does_not_reuse_a_released_lock_from_inherited_async_context(
    session_file: Path,
) -> None:
    locks = Locks()
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()
    go = asyncio.Event()
    detached: list[asyncio.Task[None]] = []

    async def later() -> None:
        await go.wait()
        await ctl.with_write_lock(lambda: append_entries(session_file, user_message("late")))

    async def outer() -> None:
        append_entries(session_file, user_message("outer"))
        detached.append(asyncio.ensure_future(later()))

    await ctl.with_write_lock(outer)
    assert locks.acquisitions == 2 and len(locks.releases) == 2
    go.set()
    await detached[0]
    lock = await ctl.acquire_for_cleanup()
    lock.release()
    assert locks.acquisitions == 4  # prep, outer, the detached write's own, cleanup
    assert not ctl.has_takeover


async def test_44_keeps_post_provider_writes_owned_after_prompt_returns(session_file: Path) -> None:
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    await ctl.reacquire_after_prompt()
    ctl.refresh_after_owned_write(append_entries(session_file, user_message("final answer")))
    lock = await ctl.acquire_for_cleanup()
    lock.release()
    assert not ctl.has_takeover


async def test_56_refreshes_prompt_fence_after_an_owned_mirror_append(session_file: Path) -> None:
    locks = Locks()
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()
    await ctl.with_write_lock(lambda: append_entries(session_file, user_message("owned")))
    await ctl.with_write_lock(lambda: None)
    assert locks.acquisitions == 3 and not ctl.has_takeover


# -- publication helpers ------------------------------------------------------------------------


async def test_57_authorizes_entry_cache_advancement_only_under_the_trusted_lock(
    session_file: Path,
) -> None:
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    current = fingerprint(session_file)
    assert not ctl.can_advance_entry_cache(current)
    inside: list[bool] = []
    await ctl.with_write_lock(lambda: inside.append(ctl.can_advance_entry_cache(current)))
    assert inside == [True]
    assert not ctl.can_advance_entry_cache(current)


async def test_58_publishes_an_exact_owned_snapshot_only_while_the_lock_is_active(
    session_file: Path,
) -> None:
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    stale = fingerprint(session_file)
    assert not ctl.publish_owned_snapshot(stale)
    seen: list[bool] = []

    def run() -> None:
        seen.append(ctl.publish_owned_snapshot(stale))
        append_entries(session_file, user_message("owned"))
        seen.append(ctl.publish_owned_snapshot(stale))
        seen.append(ctl.publish_owned_snapshot(fingerprint(session_file)))

    await ctl.with_write_lock(run)
    assert seen == [True, False, True]
    assert not ctl.publish_owned_snapshot(fingerprint(session_file))


async def test_59_publishes_only_an_unchanged_repair_validated_snapshot(session_file: Path) -> None:
    ctl = await make(session_file)
    validated = fingerprint(session_file)
    assert ctl.publish_validated_snapshot(validated)
    assert ctl.trusted_snapshot() is not None
    append_entries(session_file, user_message("external"))
    assert not ctl.publish_validated_snapshot(validated)


# -- the synchronous owned (compaction) write: the six scenarios of the original change ------
#
# These use the real SessionManager with guard_session_manager wired as the original wires
# it: compaction persistence -> ctl.owned_file_write, message persisted ->
# ctl.refresh_after_owned_write.


def guarded(path: Path, ctl: Any, *, interleave: Any = None) -> SessionManager:
    manager = SessionManager.open(path)

    def persist(append: Any, validate: Any) -> Any:
        if interleave is None:
            return ctl.owned_file_write(append, validate)

        def racing() -> Any:  # an external writer gets in between stat and append
            interleave()
            return append()

        return ctl.owned_file_write(racing, validate)

    return guard_session_manager(
        manager,
        with_compaction_persistence=persist,
        on_message_persisted=ctl.refresh_after_owned_write,
    )


def compact(manager: SessionManager) -> str:
    first_kept = manager.leaf_id or "00000000"
    return manager.append_compaction("older turns, summarised", first_kept, 4321)


async def test_60_refreshes_prompt_fence_after_an_owned_session_manager_append(
    session_file: Path,
) -> None:
    ctl = await make(session_file)
    manager = guarded(session_file, ctl)
    await ctl.release_for_prompt()
    manager.append_message({"role": "user", "content": "persisted by the manager"})
    await ctl.with_write_lock(lambda: None)
    assert not ctl.has_takeover


async def test_61_refreshes_prompt_fence_after_owned_compaction_append(session_file: Path) -> None:
    ctl = await make(session_file)
    manager = guarded(session_file, ctl)
    await ctl.with_write_lock(lambda: manager.append_message({"role": "user", "content": "q"}))
    await ctl.release_for_prompt()
    entry_id = compact(manager)
    assert read_entries(session_file)[-1]["id"] == entry_id
    await ctl.with_write_lock(lambda: None)
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover


async def test_63_rejects_unowned_external_compaction_append_before_reacquire(
    session_file: Path,
) -> None:
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    append_entries(session_file, compaction())
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.reacquire_after_prompt()
    assert caught.value.phase == "prompt_reacquire"
    assert caught.value.reason == "foreign-append"
    assert "'compaction'" in (caught.value.detail or "")


async def test_64_rejects_external_edit_before_an_owned_compaction_append(
    session_file: Path,
) -> None:
    ctl = await make(session_file)
    manager = guarded(session_file, ctl)
    await ctl.release_for_prompt()
    append_entries(session_file, user_message("external"))
    compact(manager)
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.reacquire_after_prompt()
    assert caught.value.reason == "foreign-append"


async def test_65_rejects_external_edit_interleaved_inside_an_owned_compaction_append(
    session_file: Path,
) -> None:
    ctl = await make(session_file)
    external = lambda: append_entries(session_file, user_message("racing"))  # noqa: E731
    manager = guarded(session_file, ctl, interleave=external)
    await ctl.release_for_prompt()
    compact(manager)
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.reacquire_after_prompt()
    assert caught.value.reason == "foreign-append"


async def test_66_allows_owned_compaction_after_a_later_controller_advanced_the_fence(
    session_file: Path,
) -> None:
    first = await make(session_file)
    await first.release_for_prompt()
    await first.dispose()
    second = await make(session_file)
    manager = guarded(session_file, second)
    for text in ("b's question", "b's follow-up"):
        await second.with_write_lock(
            lambda t=text: manager.append_message({"role": "user", "content": t})
        )
    await second.release_for_prompt()
    compact(manager)
    await second.with_write_lock(lambda: None)
    assert not second.has_takeover


async def test_67_allows_owned_compaction_after_another_controller_published_an_owned_write(
    session_file: Path,
) -> None:
    first = await make(session_file)
    manager = guarded(session_file, first)
    await first.release_for_prompt()
    second = await make(session_file)
    await second.release_for_prompt()
    await second.with_write_lock(
        lambda: append_entries(session_file, user_message("b's steering")),
        publish_owned_write=True,
    )
    # first's fence still shows the old state; its before-state is second's trusted write.
    compact(manager)
    await first.with_write_lock(lambda: None)
    assert not first.has_takeover
    await second.with_write_lock(lambda: None)
    assert not second.has_takeover


async def test_61b_owned_compaction_without_validator_match_is_not_published(
    session_file: Path,
) -> None:
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    # The validator is told a different id: the append is not what was declared.
    ctl.owned_file_write(compaction_append(session_file), lambda _id, text: False)
    with pytest.raises(SessionTakeoverError):
        await ctl.reacquire_after_prompt()


async def test_61c_owned_write_with_validator_needs_an_existing_file(tmp_path: Path) -> None:
    ctl = await make(tmp_path / "missing.jsonl")
    ran: list[int] = []
    with pytest.raises(FileNotFoundError):
        ctl.owned_file_write(lambda: ran.append(1), lambda *_: True)
    assert ran == []


# -- first turn and publications ----------------------------------------------------------------


async def test_68_validates_first_turn_exact_assistant_appends(tmp_path: Path) -> None:
    path = tmp_path / "new.jsonl"
    merge = MergeSpy()
    ctl = await make(path, merge_foreign_entries=merge)
    header = {"type": "session", "version": 3, "id": "0190", "timestamp": "t", "cwd": "/"}
    answer = mirror_message("first turn")

    def write() -> str:
        path.write_text(line(header) + line(answer))
        return str(answer["id"])

    result = await ctl.with_write_lock(
        write,
        publish_owned_write=True,
        resolve_published_entries=lambda entry_id: [
            {"kind": "header", "serialized": line(header).strip()},
            {"kind": "id", "id": entry_id},
        ],
    )
    assert result == answer["id"]
    assert merge.calls == []  # nothing was trusted before the first release
    await ctl.release_for_prompt()
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover


async def test_68b_owned_initialization_of_a_missing_transcript_after_release(
    tmp_path: Path,
) -> None:
    path = tmp_path / "new.jsonl"
    merge = MergeSpy()
    ctl = await make(path, merge_foreign_entries=merge)
    await ctl.release_for_prompt()  # the fence holds "absent", which is trusted
    peer, spy = await watching_peer(path)
    header = {"type": "session", "version": 3, "id": "0190", "timestamp": "t", "cwd": "/"}
    first = user_message("hi")
    await ctl.with_write_lock(
        lambda: path.write_text(line(header) + line(first)),
        publish_owned_write=True,
        resolve_published_entries=lambda _: [
            {"kind": "header", "serialized": line(header).strip()},
            {"kind": "id", "id": first["id"]},
        ],
    )
    # Own published entries are never merged back into the writer (issue 10 §3).
    assert merge.calls == []
    assert await peer_merged_ids(peer, spy) == [first["id"]]
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover


async def test_68c_unowned_creation_is_a_takeover(tmp_path: Path) -> None:
    path = tmp_path / "new.jsonl"
    ctl = await make(path)
    await ctl.release_for_prompt()
    path.write_text(line({"type": "session"}))
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.reacquire_after_prompt()
    assert caught.value.reason == "created"
    assert caught.value.before is not None and not caught.value.before.exists


def _publish_one(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "publish_owned_write": True,
        "resolve_published_entries": lambda _: [{"kind": "id", "id": entry["id"]}],
    }


async def test_69_serializes_concurrent_nested_owned_publications(session_file: Path) -> None:
    merge = MergeSpy()
    ctl = await make(session_file, merge_foreign_entries=merge)
    await ctl.release_for_prompt()
    peer, spy = await watching_peer(session_file)
    first, second = user_message("owned-first"), user_message("owned-second")
    gate = asyncio.Event()

    async def write_first() -> None:
        await gate.wait()
        append_entries(session_file, first)

    async def outer() -> None:
        a = ctl.with_write_lock(write_first, **_publish_one(session_file, first))
        b = ctl.with_write_lock(
            lambda: append_entries(session_file, second), **_publish_one(session_file, second)
        )
        await spin()
        assert not b.done()  # queued behind the blocked first publication
        gate.set()
        await asyncio.gather(a, b)

    await ctl.with_write_lock(outer)
    assert merge.calls == []
    assert await peer_merged_ids(peer, spy) == [first["id"], second["id"]]
    assert not ctl.has_takeover


async def test_70_drains_unawaited_nested_publications_before_publishing_the_parent(
    session_file: Path,
) -> None:
    merge = MergeSpy()
    ctl = await make(session_file, merge_foreign_entries=merge)
    await ctl.release_for_prompt()
    peer, spy = await watching_peer(session_file)
    parent, nested = user_message("parent"), user_message("nested")
    gate = asyncio.Event()
    started: list[asyncio.Task[None]] = []

    async def write_nested() -> None:
        await gate.wait()
        append_entries(session_file, nested)

    def write_parent() -> None:
        append_entries(session_file, parent)
        started.append(ctl.with_write_lock(write_nested, **_publish_one(session_file, nested)))

    publication = ctl.with_write_lock(write_parent, **_publish_one(session_file, parent))
    await spin(lambda: bool(started))
    await spin()
    assert not publication.done() and merge.calls == []
    gate.set()
    await publication
    assert merge.calls == []
    assert await peer_merged_ids(peer, spy) == [parent["id"], nested["id"]]
    await ctl.with_write_lock(lambda: None)
    assert not ctl.has_takeover


async def test_71_drains_unawaited_publications_started_from_an_ordinary_scope(
    session_file: Path,
) -> None:
    merge = MergeSpy()
    ctl = await make(session_file, merge_foreign_entries=merge)
    await ctl.release_for_prompt()
    peer, spy = await watching_peer(session_file)
    entry = user_message("published")
    gate = asyncio.Event()

    async def write() -> None:
        await gate.wait()
        append_entries(session_file, entry)

    scope = ctl.with_write_lock(
        lambda: ctl.with_write_lock(write, **_publish_one(session_file, entry)) and None
    )
    await spin()
    assert not scope.done()
    gate.set()
    await scope
    assert merge.calls == []
    assert await peer_merged_ids(peer, spy) == [entry["id"]]
    assert not ctl.has_takeover


async def test_72_publications_started_during_a_fence_merge_run_after_it_in_order(
    session_file: Path,
) -> None:
    # The merge runs for a benign foreign append at the fence check (own publications are
    # never merged back: the original's variant of this test merged the parent's own
    # entries). A publication the merge starts joins the scope running that check.
    locks = Locks()
    order: list[list[str]] = []
    late_tasks: list[asyncio.Task[None]] = []
    mirrored, late = mirror_message("delivered"), user_message("late")
    ctl: Any = None

    def merge(entries: list[Any]) -> None:
        order.append(ids_of(entries))
        if len(order) == 1:  # while the fence merge runs, a late publication starts
            late_tasks.append(
                ctl.with_write_lock(
                    lambda: append_entries(session_file, late), **_publish_one(session_file, late)
                )
            )

    ctl = await make(session_file, locks, merge_foreign_entries=merge)
    await ctl.release_for_prompt()
    append_entries(session_file, mirrored)  # benign, while released
    await ctl.with_write_lock(lambda: None)
    await late_tasks[0]
    assert order == [[mirrored["id"]]]
    assert locks.acquisitions == 2  # prep, and the scope's lock, shared with the publication
    await ctl.with_write_lock(lambda: None)
    assert not ctl.has_takeover
    assert session_file.read_text().rstrip("\n").endswith(line(late).rstrip("\n"))


async def test_73_rejects_interleaved_rows_and_stops_already_queued_publications(
    session_file: Path,
) -> None:
    merge = MergeSpy()
    ctl = await make(session_file, merge_foreign_entries=merge)
    await ctl.release_for_prompt()
    declared, undeclared, queued = (
        user_message("declared"),
        assistant_like("undeclared"),
        user_message("queued"),
    )
    ran: list[str] = []

    async def outer() -> None:
        a = ctl.with_write_lock(
            lambda: append_entries(session_file, declared, undeclared),
            **_publish_one(session_file, declared),
        )
        b = ctl.with_write_lock(lambda: ran.append("queued"), **_publish_one(session_file, queued))
        results = await asyncio.gather(a, b, return_exceptions=True)
        assert all(isinstance(r, SessionTakeoverError) for r in results)

    with pytest.raises(SessionTakeoverError):
        await ctl.with_write_lock(outer)
    assert ran == [] and merge.calls == []
    assert ctl.has_takeover and ctl.takeover is not None
    assert ctl.takeover.reason == "merge-rejected"


def assistant_like(text: str) -> dict[str, Any]:
    entry = user_message(text)
    entry["message"] = {"role": "assistant", "content": text}
    return entry


async def test_74_preserves_an_outer_failure_when_a_nested_publication_detects_takeover(
    session_file: Path,
) -> None:
    merge = MergeSpy()
    ctl = await make(session_file, merge_foreign_entries=merge)
    await ctl.release_for_prompt()
    declared = user_message("declared")

    async def outer() -> None:
        inner = ctl.with_write_lock(
            lambda: append_entries(session_file, declared, user_message("undeclared")),
            **_publish_one(session_file, declared),
        )
        with pytest.raises(SessionTakeoverError):
            await inner
        raise ValueError("outer failed")

    with pytest.raises(ValueError, match="outer failed"):
        await ctl.with_write_lock(outer)
    assert ctl.has_takeover


async def test_75_deactivates_publication_contexts_inherited_by_delayed_descendants(
    session_file: Path,
) -> None:
    locks = Locks()
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()
    go = asyncio.Event()
    delayed: list[asyncio.Task[None]] = []

    async def descendant() -> None:
        await go.wait()
        await ctl.with_write_lock(lambda: append_entries(session_file, user_message("delayed")))

    def publish() -> None:
        append_entries(session_file, user_message("published"))
        delayed.append(asyncio.ensure_future(descendant()))

    await ctl.with_write_lock(publish, publish_owned_write=True)
    go.set()
    await delayed[0]
    assert locks.acquisitions == 3
    assert not ctl.has_takeover


# -- other controllers and external writers -------------------------------------------------------


async def test_76_rejects_external_edits_while_another_controller_holds_cleanup_lock(
    session_file: Path,
) -> None:
    locks = Locks()
    a = await make(session_file, locks)
    await a.release_for_prompt()
    b = await make(session_file, locks)
    await b.release_for_prompt()
    cleanup = await b.acquire_for_cleanup()
    append_entries(session_file, user_message("external while b holds the lock"))
    cleanup.release()
    await b.dispose()
    with pytest.raises(SessionTakeoverError):
        await a.with_write_lock(lambda: None)
    assert locks.acquisitions == 4 and len(locks.releases) == 4


async def test_77_rejects_external_edits_interleaved_in_a_broad_locked_callback(
    session_file: Path,
) -> None:
    a = await make(session_file)
    await a.release_for_prompt()
    b = await make(session_file)
    await b.release_for_prompt()

    def broad() -> None:
        append_entries(session_file, user_message("b's own"))
        append_entries(session_file, user_message("someone else's"))

    await b.with_write_lock(broad)  # not published: b's fence adopts it, nobody else does
    with pytest.raises(SessionTakeoverError):
        await a.with_write_lock(lambda: None)


async def test_78_rejects_external_edits_even_when_another_controller_releases_afterwards(
    session_file: Path,
) -> None:
    a = await make(session_file)
    await a.release_for_prompt()
    append_entries(session_file, user_message("external"))
    b = await make(session_file)
    await b.release_for_prompt()  # b trusts what it finds; that does not vouch for a
    with pytest.raises(SessionTakeoverError):
        await a.with_write_lock(lambda: None)


async def test_79_rejects_external_edits_even_when_another_controller_appends_afterwards(
    session_file: Path,
) -> None:
    a = await make(session_file)
    await a.release_for_prompt()
    append_entries(session_file, user_message("external"))
    b = await make(session_file)
    await b.with_write_lock(lambda: append_entries(session_file, user_message("b")))
    await b.dispose()
    with pytest.raises(SessionTakeoverError):
        await a.with_write_lock(lambda: None)


async def test_67b_merge_callback_sees_peer_owned_writes_with_their_descriptors(
    session_file: Path,
) -> None:
    merge_a = MergeSpy()
    a = await make(session_file, merge_foreign_entries=merge_a)
    await a.release_for_prompt()
    b = await make(session_file)
    await b.release_for_prompt()
    entry = user_message("b's published")
    await b.with_write_lock(
        lambda: append_entries(session_file, entry), **_publish_one(session_file, entry)
    )
    await a.with_write_lock(lambda: None)
    assert [ids_of(c) for c in merge_a.calls] == [[entry["id"]]]
    assert not a.has_takeover


async def test_66b_merge_callback_rejects_peer_compaction_without_descriptors(
    session_file: Path,
) -> None:
    # §5.8: a recorded owned compaction carries no descriptors, so a fence with a merge
    # callback judges it in unowned mode and refuses the compaction line.
    a = await make(session_file, merge_foreign_entries=MergeSpy())
    await a.release_for_prompt()
    b = await make(session_file)
    await b.release_for_prompt()
    b.owned_file_write(compaction_append(session_file), is_expected_compaction)
    with pytest.raises(SessionTakeoverError):
        await a.with_write_lock(lambda: None)


# -- the async context-manager form of the write scope ------------------------------------------


async def test_write_lock_context_manager_runs_under_a_short_lock(session_file: Path) -> None:
    locks = Locks(["prep", "short"])
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()
    async with ctl.write_lock():
        assert locks.events[-1] == "acquire:short"
        append_entries(session_file, user_message("inside the block"))
        async with ctl.write_lock():  # nested: the same scope, no second acquisition
            append_entries(session_file, user_message("nested"))
    assert locks.releases == ["prep", "short"]
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover


async def test_write_lock_context_manager_publishes_declared_entries(session_file: Path) -> None:
    merge = MergeSpy()
    ctl = await make(session_file, merge_foreign_entries=merge)
    await ctl.release_for_prompt()
    peer, spy = await watching_peer(session_file)
    entry = user_message("published from a block")
    async with ctl.write_lock(
        publish_owned_write=True,
        resolve_published_entries=lambda entry_id: [{"kind": "id", "id": entry_id}],
    ) as scope:
        append_entries(session_file, entry)
        scope.result = entry["id"]
    assert merge.calls == []
    assert await peer_merged_ids(peer, spy) == [entry["id"]]
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover


async def test_write_lock_context_manager_error_releases_and_propagates(
    session_file: Path,
) -> None:
    locks = Locks(["prep", "short"])
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()
    with pytest.raises(KeyError):
        async with ctl.write_lock():
            raise KeyError("inside")
    assert locks.releases == ["prep", "short"] and not ctl.has_takeover


async def test_write_lock_context_manager_refuses_after_takeover(session_file: Path) -> None:
    ctl = await make(session_file)
    await ctl.release_for_prompt()
    append_entries(session_file, user_message("foreign"))
    ran: list[int] = []
    with pytest.raises(SessionTakeoverError):
        async with ctl.write_lock():
            ran.append(1)
    assert ran == []


async def test_cleanup_lock_with_an_async_release_is_released_once(session_file: Path) -> None:
    locks = Locks(["prep", "cleanup"], async_release=True)
    ctl = await make(session_file, locks)
    await ctl.release_for_prompt()
    lock = await ctl.acquire_for_cleanup()
    lock.release()
    lock.release()
    await spin(lambda: "cleanup" in locks.releases)
    await ctl.dispose()
    assert locks.releases == ["prep", "cleanup"]
