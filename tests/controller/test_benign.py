"""Controller scenarios 26-41 and 45-55 of reference §9.1: what an unowned change may be
(benign appends, merges, identical rewrites) and what is a takeover.

Deliberate differences (SPEC §5.2):
- 41 (a delivery-mirror append that migrates a legacy linear transcript is accepted) is
  inverted: the legacy v1 migration rewrite is not ported, a rewrite is a takeover.
- 54 (a transcript over 32 MiB fails closed on any metadata change) is inverted: a
  same-size change is judged by content for any size.

28 and 32 run with the real SessionManager as the merge callback. This port's manager has
no deferred first flush and never rewrites the whole transcript, so what remains of them is
the merge of foreign metadata around the manager's own first turn and reply.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sessionfence import BenignPolicy, MergeResult, SessionTakeoverError, fingerprint
from sessionfence.transcript import SessionManager, guard_session_manager

from .helpers import (
    Locks,
    MergeSpy,
    append_entries,
    assistant_message,
    compaction,
    entry,
    line,
    make,
    mirror_message,
    read_entries,
    rewrite_in_place,
    user_message,
    write_at,
)

pytestmark = pytest.mark.usefixtures("backend")

MiB = 1 << 20


async def released(path: Path, **options: Any) -> Any:
    ctl = await make(path, **options)
    await ctl.release_for_prompt()
    return ctl


# -- benign appends -----------------------------------------------------------------------------


async def test_26_allows_global_metadata_while_prompt_lock_is_released(session_file: Path) -> None:
    merge = MergeSpy()
    ctl = await released(session_file, merge_foreign_entries=merge)
    appended = [
        entry("custom", customType="openclaw.note", data={"x": 1}),
        entry("label", targetId="abcd1234", label="pinned"),
        entry("session_info", name="Trip planning"),
        entry("session_info"),  # a name-less record clears the title
    ]
    append_entries(session_file, *appended)
    await ctl.with_write_lock(lambda: None)
    assert merge.calls == [appended]
    assert not ctl.has_takeover


async def test_27_rejects_global_metadata_when_the_session_cannot_resync(
    session_file: Path,
) -> None:
    ctl = await released(session_file)
    append_entries(session_file, entry("session_info", name="renamed"))
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.with_write_lock(lambda: None)
    assert caught.value.reason == "foreign-append"
    assert "merge callback" in (caught.value.detail or "")


async def test_26b_allows_transcript_only_mirrors_without_a_merge_callback(
    session_file: Path,
) -> None:
    ctl = await released(session_file)
    append_entries(session_file, mirror_message("delivered"), mirror_message("again"))
    await ctl.reacquire_after_prompt()
    await ctl.with_write_lock(lambda: None)
    assert not ctl.has_takeover


async def _managed(path: Path) -> tuple[Any, SessionManager]:
    """A controller whose merge callback is the session manager's, wired as the original."""
    manager = SessionManager.open(path)
    ctl = await make(
        path, merge_foreign_entries=lambda e: manager.merge_foreign_entries(e, persist_leaf=True)
    )
    guard_session_manager(manager, on_message_persisted=ctl.refresh_after_owned_write)
    return ctl, manager


def _messages(path: Path) -> list[Any]:
    return [e for e in SessionManager.open(path).entries if e.get("type") == "message"]


async def test_28_preserves_the_first_user_turn_while_merging_global_metadata(
    tmp_path: Path,
) -> None:
    path = tmp_path / "new.jsonl"
    ctl, manager = await _managed(path)
    user_id = await ctl.with_write_lock(
        lambda: manager.append_message({"role": "user", "content": "first question"})
    )
    await ctl.release_for_prompt()
    hook = SessionManager.open(path)  # another writer while the model thinks
    hook.append_custom("openclaw.note", {"k": 1})
    hook.append_session_info("Trip planning")
    await ctl.reacquire_after_prompt()
    reopened = SessionManager.open(path)
    assert reopened.session_name == "Trip planning"
    assert reopened.leaf_id == user_id  # the persisted side leaf keeps the user turn visible
    await ctl.with_write_lock(
        lambda: manager.append_message({"role": "assistant", "content": "answer"})
    )
    final = SessionManager.open(path)
    assert [e["message"]["role"] for e in _messages(path)] == ["user", "assistant"]
    assert any(e.get("customType") == "openclaw.note" for e in final.entries)
    assert not ctl.has_takeover


async def test_32_preserves_foreign_metadata_when_a_stale_manager_appends_its_reply(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.jsonl"
    ctl, manager = await _managed(path)
    user_id = await ctl.with_write_lock(
        lambda: manager.append_message({"role": "user", "content": "q"})
    )
    await ctl.release_for_prompt()
    other = SessionManager.open(path)
    other.append_custom("openclaw.note")
    other.append_label(user_id, "important")
    other.append_session_info("Named elsewhere")
    await ctl.reacquire_after_prompt()  # the stale manager merges all three
    assert manager.session_name == "Named elsewhere"
    assert manager.labels == {user_id: "important"}
    await ctl.with_write_lock(
        lambda: manager.append_message({"role": "assistant", "content": "reply"})
    )
    final = SessionManager.open(path)
    assert final.session_name == "Named elsewhere" and final.labels == {user_id: "important"}
    assert [e["message"]["role"] for e in _messages(path)] == ["user", "assistant"]
    assert not ctl.has_takeover


def _leaf_persisting_merge(path: Path, calls: list[list[Any]]) -> Any:
    """A merge callback that, like the session manager with persist_leaf, writes a side
    ``leaf`` control after the merged entries and reports exactly what it wrote."""

    def merge(entries: list[Any]) -> MergeResult:
        calls.append(entries)
        leaf = entry(
            "leaf",
            parent_id=entries[-1]["id"],
            targetId="base0000",
            appendParentId=entries[-1]["id"],
            appendMode="side",
        )
        append_entries(path, leaf)
        return MergeResult(
            session_file_snapshot=fingerprint(path),
            published_entries=[{"kind": "id", "id": leaf["id"]}],
        )

    return merge


async def test_29_persists_the_restored_leaf_before_returning_from_a_merge(
    session_file: Path,
) -> None:
    calls: list[list[Any]] = []
    ctl = await released(
        session_file, merge_foreign_entries=_leaf_persisting_merge(session_file, calls)
    )
    mirror = mirror_message("side delivery", appendMode="side")
    append_entries(session_file, mirror)
    await ctl.with_write_lock(lambda: None)
    last = read_entries(session_file)[-1]
    assert last["type"] == "leaf" and last["appendMode"] == "side"
    assert last["appendParentId"] == mirror["id"]
    assert calls == [[mirror]]
    await ctl.with_write_lock(lambda: None)  # the leaf it wrote is part of its fence
    assert not ctl.has_takeover


async def test_30_publishes_the_restoring_leaf_for_every_active_fence(session_file: Path) -> None:
    calls_a: list[list[Any]] = []
    a = await released(
        session_file, merge_foreign_entries=_leaf_persisting_merge(session_file, calls_a)
    )
    merge_b = MergeSpy()
    b = await released(session_file, merge_foreign_entries=merge_b)
    mirror = mirror_message("side delivery", appendMode="side")
    append_entries(session_file, mirror)
    await a.with_write_lock(lambda: None)
    size_after_a = session_file.stat().st_size
    await b.with_write_lock(lambda: None)
    assert session_file.stat().st_size == size_after_a  # b wrote no second leaf
    leaf = read_entries(session_file)[-1]
    assert [[e["id"] for e in c] for c in merge_b.calls] == [[mirror["id"], leaf["id"]]]
    assert not a.has_takeover and not b.has_takeover


async def test_31_reloads_a_trusted_rewrite_for_every_active_fence(session_file: Path) -> None:
    first_user = user_message("first question")

    def flush_merge(entries: list[Any]) -> MergeResult:
        # The first turn was never flushed: the manager rewrites the whole file.
        text = line({"type": "session"}) + line(first_user) + "".join(line(e) for e in entries)
        tmp = session_file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, session_file)
        return MergeResult(session_file_snapshot=fingerprint(session_file), requires_reload=True)

    reloads: list[str] = []
    a = await released(session_file, merge_foreign_entries=flush_merge)
    b = await released(
        session_file,
        merge_foreign_entries=MergeSpy(),
        reload_session_file=lambda: reloads.append("b"),
    )
    append_entries(session_file, entry("session_info", name="named"))
    await a.with_write_lock(lambda: None)
    await b.with_write_lock(lambda: None)
    assert reloads == ["b"]
    assert not a.has_takeover and not b.has_takeover


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "custom"},
        {"type": "custom", "customType": " "},
        {"type": "label", "label": "x"},
        {"type": "label", "targetId": "abcd1234", "label": 7},
        {"type": "session_info", "name": 3},
    ],
    ids=["custom-no-type", "custom-blank-type", "label-no-target", "label-number", "name-number"],
)
async def test_33_rejects_malformed_control_entries_while_released(
    session_file: Path, bad: dict[str, Any]
) -> None:
    merge = MergeSpy()
    ctl = await released(session_file, merge_foreign_entries=merge)
    fields = dict(bad)
    append_entries(session_file, entry(fields.pop("type"), **fields))
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.with_write_lock(lambda: None)
    assert caught.value.reason == "foreign-append" and merge.calls == []


@pytest.mark.parametrize(
    "bad",
    [
        entry("model_change", provider="anthropic", modelId="opus"),
        entry("thinking_level_change", thinkingLevel="high"),
        {"type": "message", "id": "abcd1234", "message": {"role": "user", "content": "hi"}},
        entry("custom_message", customType="x", content="hi", display=True),
        compaction(),
        entry("branch_summary", fromId="root", summary="s"),
        entry("leaf", targetId=None),
    ],
    ids=["model", "thinking", "user", "custom_message", "compaction", "branch", "leaf"],
)
async def test_34_rejects_prompt_affecting_entries_while_released(
    session_file: Path, bad: dict[str, Any]
) -> None:
    merge = MergeSpy()
    ctl = await released(session_file, merge_foreign_entries=merge)
    append_entries(session_file, bad)
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.with_write_lock(lambda: None)
    assert caught.value.reason == "foreign-append" and merge.calls == []
    assert caught.value.detail is not None and "offset 19" in caught.value.detail


async def test_35_detects_takeover_at_prompt_reacquire(session_file: Path) -> None:
    ctl = await released(session_file)
    append_entries(session_file, assistant_message("another worker"))
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.reacquire_after_prompt()
    assert caught.value.phase == "prompt_reacquire"
    assert caught.value.session_file == str(session_file)
    assert not ctl.holds_lock


async def test_36_allows_owned_steering_writes_before_reacquire(session_file: Path) -> None:
    ctl = await released(session_file)
    steering = user_message("steer left")
    await ctl.with_write_lock(
        lambda: append_entries(session_file, steering), publish_owned_write=True
    )
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover
    assert read_entries(session_file)[-1] == steering


async def test_37_allows_delivery_mirror_appends_while_released(session_file: Path) -> None:
    locks = Locks()
    merge = MergeSpy()
    ctl = await released(session_file, locks=locks, merge_foreign_entries=merge)
    mirror = mirror_message("delivered to the channel")
    append_entries(session_file, mirror)
    await ctl.with_write_lock(lambda: None)
    await ctl.dispose()
    assert merge.calls == [[mirror]]
    assert len(locks.releases) == 2 and not ctl.has_takeover


async def test_38_allows_side_mirrors_with_side_leaf_controls(session_file: Path) -> None:
    merge = MergeSpy()
    ctl = await released(session_file, merge_foreign_entries=merge)
    first = mirror_message("one")
    leaf = entry("leaf", targetId="base0000", appendParentId=first["id"], appendMode="side")
    sides = [mirror_message(f"side {i}", appendMode="side") for i in range(3)]
    append_entries(session_file, first, leaf, *sides)
    await ctl.with_write_lock(lambda: None)
    assert merge.calls == [[first, leaf, *sides]]
    assert not ctl.has_takeover


async def test_39_rejects_active_leaf_controls_while_released(session_file: Path) -> None:
    merge = MergeSpy()
    ctl = await released(session_file, merge_foreign_entries=merge)
    append_entries(session_file, entry("leaf", targetId="base0000"))
    with pytest.raises(SessionTakeoverError):
        await ctl.with_write_lock(lambda: None)
    assert merge.calls == []


async def test_40_allows_mixed_mirror_and_metadata_appends(session_file: Path) -> None:
    merge = MergeSpy()
    ctl = await released(session_file, merge_foreign_entries=merge)
    appended = [
        mirror_message("m"),
        entry("label", targetId="abcd1234", label="x"),
        entry("session_info", name="n"),
    ]
    append_entries(session_file, *appended)
    await ctl.with_write_lock(lambda: None)
    assert merge.calls == [appended]


async def test_41_inverted_legacy_migration_rewrite_is_a_takeover(session_file: Path) -> None:
    legacy = {"type": "message", "timestamp": "t", "message": {"role": "user", "content": "q"}}
    session_file.write_text(line({"type": "session"}) + line(legacy))
    ctl = await released(session_file, merge_foreign_entries=MergeSpy())
    migrated = {"type": "message", "id": "abcd1234", "parentId": None, **legacy}
    rewrite_in_place(
        session_file,
        (
            line({"type": "session", "version": 2}) + line(migrated) + line(mirror_message())
        ).encode(),
    )
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.reacquire_after_prompt()
    assert caught.value.reason == "rewritten"


# -- rewrites, drift and external edits -----------------------------------------------------------


async def test_45_still_rejects_external_edits_before_reacquire(session_file: Path) -> None:
    locks = Locks()
    ctl = await released(session_file, locks=locks)
    append_entries(session_file, user_message("external"))
    with pytest.raises(SessionTakeoverError):
        await ctl.reacquire_after_prompt()
    assert locks.acquisitions == 2 and len(locks.releases) == 2


async def test_46_allows_ctime_only_drift_while_released(session_file: Path) -> None:
    ctl = await released(session_file)
    before = fingerprint(session_file)
    os.chmod(session_file, 0o600 if (session_file.stat().st_mode & 0o777) != 0o600 else 0o640)
    assert fingerprint(session_file).ctime_ns != before.ctime_ns
    await ctl.with_write_lock(lambda: None)
    assert not ctl.has_takeover


async def test_47_allows_a_byte_identical_in_place_rewrite(session_file: Path) -> None:
    locks = Locks()
    ctl = await released(session_file, locks=locks)
    rewrite_in_place(session_file, session_file.read_bytes())
    await ctl.reacquire_after_prompt()
    assert len(locks.releases) == 1
    await ctl.dispose()
    assert len(locks.releases) == 2 and not ctl.has_takeover


async def test_48_rejects_a_same_size_rewrite_with_other_content(session_file: Path) -> None:
    big = line({"type": "session"}) + "".join(line(user_message(f"m{i}")) for i in range(200))
    session_file.write_text(big)
    ctl = await released(session_file)
    data = bytearray(session_file.read_bytes())
    data[30] = ord("X") if data[30] != ord("X") else ord("Y")  # outside the tail window
    rewrite_in_place(session_file, bytes(data), keep_mtime=True)
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.with_write_lock(lambda: None)
    assert caught.value.reason == "rewritten"


async def test_49_trusts_owned_writes_after_accepting_ctime_drift(session_file: Path) -> None:
    locks = Locks()
    ctl = await released(session_file, locks=locks)
    os.chmod(session_file, 0o640)
    await ctl.with_write_lock(
        lambda: append_entries(session_file, user_message("owned")), publish_owned_write=True
    )
    await ctl.with_write_lock(lambda: None)
    assert locks.acquisitions == 3 and len(locks.releases) == 3 and not ctl.has_takeover


def make_large(path: Path, size: int) -> None:
    """A sparse transcript of ``size`` bytes: a header, zeros, and a final newline."""
    with open(path, "wb") as handle:
        handle.write(line({"type": "session"}).encode())
        handle.truncate(size - 1)
        handle.seek(size - 1)
        handle.write(b"\n")


async def test_50_allows_a_byte_identical_rewrite_of_a_large_transcript(
    session_file: Path,
) -> None:
    make_large(session_file, 8 * MiB + 1)
    ctl = await released(session_file)
    write_at(session_file, 4 * MiB, b"\0")  # same byte: new mtime, same content
    await ctl.with_write_lock(lambda: None)
    assert not ctl.has_takeover


async def test_51_rejects_changed_bytes_of_a_large_transcript(session_file: Path) -> None:
    make_large(session_file, 8 * MiB + 1)
    ctl = await released(session_file)
    write_at(session_file, 4 * MiB, b"x")
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.with_write_lock(lambda: None)
    assert caught.value.reason == "rewritten"


async def test_52_rejects_same_inode_same_size_rewrite_of_one_byte(session_file: Path) -> None:
    ctl = await released(session_file)
    rewrite_in_place(session_file, session_file.read_bytes().replace(b"session", b"sessioN"))
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.with_write_lock(lambda: None)
    assert caught.value.reason == "rewritten"


async def test_53_rejects_truncated_transcript_rewrites(session_file: Path) -> None:
    ctl = await released(session_file)
    rewrite_in_place(session_file, session_file.read_bytes()[:-1])
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.with_write_lock(lambda: None)
    assert caught.value.reason == "truncated"


async def test_54_inverted_judges_metadata_changes_of_huge_transcripts_by_content(
    session_file: Path,
) -> None:
    make_large(session_file, 32 * MiB + 1)
    ctl = await released(session_file)
    st = session_file.stat()
    os.utime(session_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    await ctl.with_write_lock(lambda: None)  # the original failed closed here
    assert not ctl.has_takeover
    await ctl.release_for_prompt()
    write_at(session_file, 16 * MiB, b"x")
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.reacquire_after_prompt()
    assert caught.value.reason == "rewritten"


async def test_55_still_rejects_external_edits_after_reacquire(session_file: Path) -> None:
    locks = Locks()
    ctl = await released(session_file, locks=locks)
    await ctl.reacquire_after_prompt()
    append_entries(session_file, user_message("edit while we hold the lock"))
    cleanup = await ctl.acquire_for_cleanup()
    cleanup.release()
    assert ctl.has_takeover and ctl.takeover is not None
    assert ctl.takeover.phase == "cleanup"
    assert locks.acquisitions == 2 and len(locks.releases) == 2


# -- the replaceable benign policy (SPEC §5.3) ---------------------------------------------------


async def test_benign_policy_can_name_another_frameworks_mirror_entries(
    session_file: Path,
) -> None:
    relay = entry(
        "message",
        message={"role": "assistant", "content": "relayed", "provider": "acme", "model": "relay"},
    )
    default = await released(session_file)
    append_entries(session_file, relay)
    with pytest.raises(SessionTakeoverError):
        await default.reacquire_after_prompt()

    other = session_file.with_name("other.jsonl")
    other.write_text(line({"type": "session"}))
    policy = BenignPolicy(provider="acme", transcript_only_models={"relay"})
    ctl = await released(other, benign_policy=policy)
    append_entries(other, relay)
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover


async def test_benign_policy_subclass_classifies_its_own_entry_types(session_file: Path) -> None:
    class NotesAreBenign(BenignPolicy):
        def classify_entry(self, entry: Any) -> str | None:
            if isinstance(entry, dict) and entry.get("type") == "acme_note":
                return "transcript-only"
            return super().classify_entry(entry)

    ctl = await released(session_file, benign_policy=NotesAreBenign())
    append_entries(session_file, {"type": "acme_note", "text": "hi"}, mirror_message())
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover


async def test_unowned_appends_over_one_mib_are_takeovers(session_file: Path) -> None:
    ctl = await released(session_file)
    big = mirror_message("x" * 1000)
    append_entries(session_file, *([big] * 1200))  # > 1 MiB of otherwise benign lines
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.reacquire_after_prompt()
    assert caught.value.reason == "foreign-append"
    assert "exceeds" in (caught.value.detail or "")
