"""merge_foreign_entries (reference §5.5), guard_session_manager and
is_expected_compaction_append (reference §7)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sessionfence
from sessionfence import (
    SessionManager,
    content_digest,
    fingerprint,
    guard_session_manager,
    is_expected_compaction_append,
)
from sessionfence._callbacks import MergeResult


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def mirror(ident: str, parent: str | None, *, side: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "type": "message",
        "id": ident,
        "parentId": parent,
        "timestamp": "2026-01-01T00:00:00.000Z",
        "message": {
            "role": "assistant",
            "provider": "openclaw",
            "model": "delivery-mirror",
            "content": [{"type": "text", "text": "sent"}],
        },
    }
    if side:
        entry["appendMode"] = "side"
    return entry


def foreign_append(path: Path, *entries: dict[str, Any]) -> bytes:
    data = b"".join(line(e) for e in entries)
    with open(path, "ab") as f:
        f.write(data)
    return data


@pytest.fixture
def session(transcript: Path) -> tuple[SessionManager, str, str]:
    m = SessionManager.open(transcript)
    u = m.append_message({"role": "user", "content": "q"})
    a = m.append_message({"role": "assistant", "content": "a"})
    return m, u, a


# --------------------------------------------------------------------------------------
# merge_foreign_entries
# --------------------------------------------------------------------------------------


def test_merge_reparents_onto_a_side_branch(
    transcript: Path, session: tuple[SessionManager, str, str]
) -> None:
    m, u, a = session
    e1 = mirror("f0000001", "whatever")
    e2 = mirror("f0000002", "f0000001")
    raw = foreign_append(transcript, e1, e2)
    assert m.merge_foreign_entries([e1, e2], appended=raw) is None  # persist_leaf False
    assert m.leaf_id == a  # the visible leaf never moves
    assert m.side_cursor == "f0000002"
    assert m.get_entry("f0000001")["parentId"] == a  # type: ignore[index]
    assert m.get_entry("f0000002")["parentId"] == "f0000001"  # type: ignore[index]
    assert [e["id"] for e in m.branch()] == [u, a]  # side entries stay off the branch
    assert [e["id"] for e in m.branch("f0000002")] == [u, a, "f0000001", "f0000002"]
    assert e1["parentId"] == "whatever"  # the caller's dicts are not modified
    assert m.digest.intdigest() == content_digest(transcript)
    # a later merge continues the same side branch
    e3 = mirror("f0000003", None)
    m.merge_foreign_entries([e3], appended=foreign_append(transcript, e3))
    assert m.get_entry("f0000003")["parentId"] == "f0000002"  # type: ignore[index]
    # an own append hangs off the visible leaf and closes the side branch
    own = m.append_message({"role": "user", "content": "next"})
    assert m.get_entry(own)["parentId"] == a  # type: ignore[index]
    assert m.side_cursor == own
    assert m.digest.intdigest() == content_digest(transcript)


def test_merge_applies_labels_and_names(
    transcript: Path, session: tuple[SessionManager, str, str]
) -> None:
    m, u, _ = session
    base = {"parentId": None, "timestamp": "t"}
    entries = [
        {"type": "custom", "id": "c0000001", "customType": "hook", "data": {"k": 1}, **base},
        {"type": "label", "id": "l0000001", "targetId": u, "label": "start", **base},
        {"type": "label", "id": "l0000002", "targetId": "c0000001", "label": "hooked", **base},
        {"type": "session_info", "id": "s0000001", "name": "  Renamed  ", **base},
    ]
    m.merge_foreign_entries(entries, appended=foreign_append(transcript, *entries))
    assert m.labels == {u: "start", "c0000001": "hooked"}
    assert m.session_name == "Renamed"
    clear = {"type": "label", "id": "l0000003", "targetId": u, **base}
    m.merge_foreign_entries([clear], appended=foreign_append(transcript, clear))
    assert m.labels == {"c0000001": "hooked"}


def test_merge_refuses_duplicates_without_changing_anything(
    transcript: Path, session: tuple[SessionManager, str, str]
) -> None:
    m, _, a = session
    before_entries = m.entries
    with pytest.raises(ValueError, match=f"{a} already exists"):
        m.merge_foreign_entries([mirror("f0000001", None), mirror(a, None)])
    with pytest.raises(ValueError, match="f0000001 already exists"):
        m.merge_foreign_entries([mirror("f0000001", None), mirror("f0000001", None)])
    assert m.entries == before_entries
    assert m.get_entry("f0000001") is None and m.side_cursor == a


def test_merge_refuses_unknown_label_targets(session: tuple[SessionManager, str, str]) -> None:
    m, _, _ = session
    label = {"type": "label", "id": "l1", "parentId": None, "timestamp": "t", "targetId": "zz"}
    with pytest.raises(ValueError, match="unknown entry 'zz'"):
        m.merge_foreign_entries([label])
    assert m.get_entry("l1") is None


def test_merge_refuses_entries_without_ids_and_headers(
    session: tuple[SessionManager, str, str],
) -> None:
    m, _, _ = session
    with pytest.raises(ValueError, match="no id"):
        m.merge_foreign_entries([{"type": "custom", "customType": "x"}])
    with pytest.raises(ValueError, match="header"):
        m.merge_foreign_entries([{"type": "session", "id": "h"}])


def side_leaf(ident: str, parent: str | None, target: str | None, append_parent: Any) -> Any:
    return {
        "type": "leaf",
        "id": ident,
        "parentId": parent,
        "timestamp": "t",
        "targetId": target,
        "appendParentId": append_parent,
        "appendMode": "side",
    }


def test_merge_accepts_a_side_leaf_control_that_keeps_the_branch(
    transcript: Path, session: tuple[SessionManager, str, str]
) -> None:
    m, _, a = session
    e1 = mirror("f0000001", a)
    ctl = side_leaf("c0000001", "f0000001", a, "f0000001")
    raw = foreign_append(transcript, e1, ctl)
    # e1 alone would make a reader take it as the leaf, but the foreign writer's own side
    # control pins the leaf back: the reader's view equals ours, nothing to persist.
    assert m.merge_foreign_entries([e1, ctl], True, appended=raw) is None
    assert m.leaf_id == a and m.side_cursor == "f0000001"
    assert m.get_entry("c0000001") == ctl
    again = SessionManager.open(transcript)
    assert again.leaf_id == a and again.side_cursor == "f0000001"


@pytest.mark.parametrize(
    "bad",
    [
        lambda a: side_leaf("c1", "f0000001", "f0000001", "f0000001"),  # moves the leaf
        lambda a: side_leaf("c1", "f0000001", a, a),  # moves the side cursor back
        lambda a: side_leaf("c1", "elsewhere", a, "f0000001"),  # wrong raw parent
        lambda a: {**side_leaf("c1", "f0000001", a, "f0000001"), "appendMode": None},
        lambda a: {  # an active leaf control
            "type": "leaf",
            "id": "c1",
            "parentId": "f0000001",
            "timestamp": "t",
            "targetId": a,
        },
    ],
)
def test_merge_refuses_leaf_controls_that_change_the_active_branch(
    session: tuple[SessionManager, str, str], bad: Callable[[str], dict[str, Any]]
) -> None:
    m, _, a = session
    with pytest.raises(ValueError, match="would change the active branch"):
        m.merge_foreign_entries([mirror("f0000001", a), bad(a)])
    assert m.get_entry("f0000001") is None and m.leaf_id == a


def test_persist_leaf_writes_a_side_control_and_returns_the_fingerprint(
    transcript: Path, session: tuple[SessionManager, str, str]
) -> None:
    m, u, a = session
    e1 = mirror("f0000001", a)
    e2 = {"type": "custom", "id": "c0000001", "parentId": "f0000001", "timestamp": "t"}
    e2["customType"] = "hook"
    raw = foreign_append(transcript, e1, e2)
    result = m.merge_foreign_entries([e1, e2], persist_leaf=True, appended=raw)
    assert isinstance(result, MergeResult)
    assert result.session_file_snapshot == fingerprint(transcript)
    assert result.requires_reload is False
    last = json.loads(transcript.read_bytes().splitlines()[-1])
    assert result.published_entries == [{"kind": "id", "id": last["id"]}]
    assert last == {
        "type": "leaf",
        "id": last["id"],
        "parentId": "c0000001",  # the raw tail of the file
        "timestamp": last["timestamp"],
        "targetId": a,  # the visible leaf
        "appendParentId": "c0000001",  # the side cursor
        "appendMode": "side",
    }
    assert m.leaf_id == a and m.side_cursor == "c0000001"
    assert m.digest.intdigest() == content_digest(transcript)
    # A fresh reader sees the same tree state.
    again = SessionManager.open(transcript)
    assert again.leaf_id == a and again.side_cursor == "c0000001"
    assert [e["id"] for e in again.branch()] == [u, a]
    # Merging side-mode entries afterwards needs no new control.
    e3 = mirror("f0000003", "x", side=True)
    assert m.merge_foreign_entries([e3], True, appended=foreign_append(transcript, e3)) is None
    assert m.side_cursor == "f0000003"
    assert SessionManager.open(transcript).side_cursor == "f0000003"


def test_persist_leaf_returns_none_when_nothing_needs_persisting(
    transcript: Path, session: tuple[SessionManager, str, str]
) -> None:
    m, _, a = session
    assert m.merge_foreign_entries([], persist_leaf=True) is None
    e1 = mirror("f0000001", a, side=True)  # a side entry: a reader keeps the leaf anyway
    size_after = transcript.stat().st_size + len(line(e1))
    assert m.merge_foreign_entries([e1], True, appended=foreign_append(transcript, e1)) is None
    assert transcript.stat().st_size == size_after  # no control line written


def test_merge_then_reopen_without_persist_moves_the_readers_leaf(
    transcript: Path, session: tuple[SessionManager, str, str]
) -> None:
    # Why persist_leaf exists: without the control a reader takes the mirror as the leaf.
    m, _, a = session
    e1 = mirror("f0000001", a)
    m.merge_foreign_entries([e1], appended=foreign_append(transcript, e1))
    assert m.leaf_id == a
    assert SessionManager.open(transcript).leaf_id == "f0000001"


def test_leaf_controls_in_the_file_are_followed_on_open(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    rows = [
        {"type": "session"},
        {"type": "message", "id": "root", "parentId": None, "message": {}},
        {"type": "message", "id": "gone", "parentId": "root", "message": {}},
        {"type": "leaf", "id": "rew", "parentId": "gone", "targetId": "root"},
        {"type": "message", "id": "next", "parentId": "rew", "message": {}},
        {"type": "leaf", "id": "bad", "parentId": "next", "targetId": "nope"},  # ignored
    ]
    path.write_bytes(b"".join(line(r) for r in rows))
    m = SessionManager.open(path)
    assert m.leaf_id == "next"
    # "next" hangs off the control, which stands for its target
    assert [e["id"] for e in m.branch()] == ["root", "next"]
    assert m.get_entry("bad") is not None  # kept, its id is taken


# --------------------------------------------------------------------------------------
# guard_session_manager
# --------------------------------------------------------------------------------------


def test_guard_is_idempotent(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    calls: list[str] = []
    guarded = guard_session_manager(m, on_message_persisted=lambda: calls.append("first"))
    assert guarded is m
    again = guard_session_manager(guarded, on_message_persisted=lambda: calls.append("second"))
    assert again is m
    m.append_message({"role": "user", "content": "x"})
    assert calls == ["first"]  # wrapped once, first options in force


def test_guard_calls_on_message_persisted_after_each_message(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    seen: list[int] = []
    guard_session_manager(
        m, on_message_persisted=lambda: seen.append(transcript.read_bytes().count(b"\n"))
    )
    m.append_message({"role": "user", "content": "x"})
    m.append_custom("not a message")
    m.append_message({"role": "assistant", "content": "y"})
    assert seen == [2, 4]  # after the line reached the file; custom appends do not notify
    with pytest.raises(ValueError):
        m.append_message({"bad": float("nan")})
    assert seen == [2, 4]  # a failed append does not notify


def test_guard_routes_compaction_through_persistence(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    first = m.append_message({"role": "user", "content": "x"})
    seen: dict[str, Any] = {}

    def persistence(append: Callable[[], Any], validate: Callable[[Any, str], bool]) -> Any:
        size = transcript.stat().st_size
        assert "before" not in seen
        seen["before"] = size
        entry_id = append()
        appended = transcript.read_bytes()[size:].decode()
        seen["valid"] = validate(entry_id, appended)
        seen["validator"] = validate
        return entry_id

    guard_session_manager(m, with_compaction_persistence=persistence)
    ident = m.append_compaction("sum", first, 42, details={"files": []}, from_hook=True)
    assert seen["valid"] is True and seen["validator"] is is_expected_compaction_append
    assert m.leaf_id == ident
    assert m.get_entry(ident)["tokensBefore"] == 42  # type: ignore[index]


def test_guard_without_persistence_appends_directly(transcript: Path) -> None:
    m = guard_session_manager(SessionManager.open(transcript))
    ident = m.append_compaction("s", "x", 1)
    assert m.leaf_id == ident


def test_guard_wires_to_the_controller_shape(transcript: Path) -> None:
    """owned_file_write(run, validate_append) and refresh_after_owned_write() as the
    controller spells them: the wrappers need nothing else."""

    class FakeController:
        def __init__(self) -> None:
            self.refreshes = 0
            self.validated: list[bool] = []

        def owned_file_write(
            self, run: Callable[[], Any], validate_append: Callable[[Any, str], bool]
        ) -> Any:
            before = fingerprint(transcript)
            result = run()
            change = sessionfence.check_append(transcript, before)
            assert change.appended is not None
            self.validated.append(validate_append(result, change.appended.decode()))
            return result

        def refresh_after_owned_write(self) -> None:
            self.refreshes += 1

    ctl = FakeController()
    m = guard_session_manager(
        SessionManager.open(transcript),
        with_compaction_persistence=ctl.owned_file_write,
        on_message_persisted=ctl.refresh_after_owned_write,
    )
    a = m.append_message({"role": "user", "content": "x"})
    m.append_compaction("sum", a, 10)
    assert ctl.refreshes == 1 and ctl.validated == [True]


# --------------------------------------------------------------------------------------
# is_expected_compaction_append
# --------------------------------------------------------------------------------------

GOOD = '{"type":"compaction","id":"abcd1234","parentId":null,"summary":"s"}'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD + "\n", True),
        (GOOD, True),  # the newline is not required by the check itself
        ("\n\n" + GOOD + "\n\n  \n", True),  # empty lines dropped
        ("  " + GOOD + " \r\n", True),  # trimmed
        ("\ufeff" + GOOD + "\n", True),  # JS trim strips U+FEFF
        (GOOD.encode() + b"\n", True),  # bytes accepted
        ("", False),
        ("\n \n", False),
        (GOOD + "\n" + GOOD + "\n", False),  # two lines
        (GOOD + "\n{}\n", False),
        ('{"type":"compaction","id":"other"}\n', False),
        ('{"type":"message","id":"abcd1234"}\n', False),
        ('{"id":"abcd1234"}\n', False),
        ('["compaction","abcd1234"]\n', False),
        ('{"type":"compaction","id":"abcd1234"\n', False),  # not JSON
        ('{"type":"compaction","id":"abcd1234","x":NaN}\n', False),  # NaN is not JSON
        ('{"type":"compaction","id":["abcd1234"]}\n', False),
        ('"{\\"type\\":\\"compaction\\"}"\n', False),
    ],
)
def test_is_expected_compaction_append(text: str | bytes, expected: bool) -> None:
    assert is_expected_compaction_append("abcd1234", text) is expected


def test_is_expected_compaction_append_id_must_be_a_string() -> None:
    assert is_expected_compaction_append(1, '{"type":"compaction","id":1}') is False
    assert is_expected_compaction_append(None, '{"type":"compaction","id":null}') is False


def test_lazy_exports() -> None:
    import sessionfence.transcript as t

    assert sessionfence.SessionManager is t.SessionManager
    assert sessionfence.guard_session_manager is t.guard_session_manager
    assert sessionfence.is_expected_compaction_append is t.is_expected_compaction_append


def test_reload_keeps_the_guard(transcript: Path) -> None:
    calls: list[int] = []
    m = guard_session_manager(
        SessionManager.open(transcript), on_message_persisted=lambda: calls.append(1)
    )
    m.reload()
    m.append_message({"role": "user", "content": "x"})
    assert calls == [1]


def test_merge_into_a_never_created_transcript_asks_for_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    m = SessionManager.open(path)  # missing: the manager holds no header
    e1 = mirror("f0000001", None)
    path.write_bytes(line({"type": "session"}) + line(e1))
    result = m.merge_foreign_entries([e1], persist_leaf=True)
    assert result is not None and result.requires_reload
    assert result.session_file_snapshot == fingerprint(path)
    assert path.read_bytes().count(b"\n") == 2  # nothing written


def test_persist_leaf_accounts_for_earlier_unpersisted_merges(
    transcript: Path, session: tuple[SessionManager, str, str]
) -> None:
    # A first merge without persist_leaf leaves a reader's leaf on the mirror; a later
    # merge of a mere side entry must still pin the leaf, or a reader stays wrong.
    m, _, a = session
    e1 = mirror("f0000001", a)
    m.merge_foreign_entries([e1], appended=foreign_append(transcript, e1))
    e2 = mirror("f0000002", "f0000001", side=True)
    result = m.merge_foreign_entries([e2], True, appended=foreign_append(transcript, e2))
    assert result is not None and result.session_file_snapshot == fingerprint(transcript)
    again = SessionManager.open(transcript)
    assert again.leaf_id == a and again.side_cursor == "f0000002"
