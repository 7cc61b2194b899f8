"""SessionManager: parsing, appends, tree, torn tails, digest bookkeeping (SPEC §6)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sessionfence
from sessionfence import (
    SessionManager,
    TornTranscriptError,
    UnstableFileError,
    _jsonl,
    content_digest,
    fingerprint,
)
from sessionfence.transcript import TranscriptChangedError
from sessionfence.transcript import _io as tio

ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HEX8 = re.compile(r"^[0-9a-f]{8}$")


@pytest.fixture(params=["json", "msgspec", "orjson"])
def parser(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test with the stdlib parser and with each optional fast parser installed."""
    name: str = request.param
    if name != "json" and name not in _jsonl.available_fast_parsers():
        pytest.skip(f"{name} is not installed (optional extra)")
    old = _jsonl.set_fast_parser(None if name == "json" else name)
    try:
        yield name
    finally:
        _jsonl.set_fast_parser(old)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_bytes().split(b"\n") if x]


def write(path: Path, *objs: Any, raw: bytes = b"") -> None:
    body = b"".join(json.dumps(o, separators=(",", ":")).encode() + b"\n" for o in objs)
    path.write_bytes(body + raw)


HEADER = {"type": "session", "version": 3, "id": "hdr", "timestamp": "t", "cwd": "/"}


def msg(ident: str, parent: str | None, text: str = "x", **extra: Any) -> dict[str, Any]:
    return {
        "type": "message",
        "id": ident,
        "parentId": parent,
        "timestamp": "2026-01-01T00:00:00.000Z",
        "message": {"role": "user", "content": text},
        **extra,
    }


# --------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------


def test_missing_file_starts_empty_and_first_append_writes_header_and_entry(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.jsonl"
    m = SessionManager.open(path)
    assert m.header is None and m.entries == [] and m.leaf_id is None
    assert m.parsed_fingerprint == sessionfence.MISSING
    assert m.digest_size == 0 and m.torn_tail is None
    assert not path.exists()
    ident = m.append_message({"role": "user", "content": "hello"})
    got = lines(path)
    assert len(got) == 2
    assert got[0]["type"] == "session" and got[0]["version"] == 3
    assert re.fullmatch(r"[0-9a-f-]{36}", got[0]["id"]) and got[0]["id"][14] == "7"
    assert got[1] == m.get_entry(ident)
    assert got[1]["parentId"] is None
    assert m.header == got[0]
    assert m.digest.intdigest() == content_digest(path)


def test_open_does_not_create_a_missing_parent_until_append(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "s.jsonl"
    m = SessionManager.open(path)
    assert not path.parent.exists()
    m.append_custom("boot")
    assert len(lines(path)) == 2


def test_existing_empty_file_gets_a_header_on_first_append(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"")
    m = SessionManager.open(path)
    assert m.parsed_fingerprint.exists and m.parsed_fingerprint.size == 0
    m.append_custom("x", {"a": 1})
    got = lines(path)
    assert [g["type"] for g in got] == ["session", "custom"]


def test_bare_header_accepted(tmp_path: Path, transcript: Path, parser: str) -> None:
    m = SessionManager.open(transcript)
    assert m.header == {"type": "session"}
    assert m.entries == [] and m.malformed_lines == 0
    ident = m.append_message({"role": "user", "content": "hi"})
    got = lines(transcript)
    assert got[0] == {"type": "session"}  # no second header on an existing file
    assert got[1]["id"] == ident and len(got) == 2


def test_parse_tree_and_leaf(tmp_path: Path, parser: str) -> None:
    path = tmp_path / "s.jsonl"
    write(path, HEADER, msg("a", None), msg("b", "a"), msg("c", "b"), msg("d", "b"))
    m = SessionManager.open(path)
    assert m.header == HEADER
    assert [e["id"] for e in m.entries] == ["a", "b", "c", "d"]
    assert m.leaf_id == "d"
    assert [e["id"] for e in m.branch()] == ["a", "b", "d"]
    assert [e["id"] for e in m.branch("c")] == ["a", "b", "c"]
    assert m.branch("nope") == []
    assert m.get_entry("c") == msg("c", "b")
    assert m.get_entry("zzz") is None
    assert [e["id"] for e in m.children("b")] == ["c", "d"]
    assert [e["id"] for e in m.children(None)] == ["a"]


def test_branch_survives_parent_cycles(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    write(path, HEADER, msg("a", "b"), msg("b", "a"))
    m = SessionManager.open(path)
    assert [e["id"] for e in m.branch()] == ["a", "b"]


def test_malformed_lines_skipped_and_counted(tmp_path: Path, parser: str) -> None:
    path = tmp_path / "s.jsonl"
    body = (
        json.dumps(HEADER).encode() + b"\n"
        b"\n"  # blank: skipped, not counted
        b"   \r\n"  # blank too
        b"not json\n"
        b'{"type":"message","id":"a","parentId":null,"timestamp":"t","message":{}}\n'
        b"[1,2,3]\n"  # JSON but not an object: no entry
        b'"text"\n'
        b'{"type":"custom","id":"n","parentId":"a","v":NaN}\n'  # NaN is not JSON
        b'{"type":"custom","id":"i","parentId":"a","v":Infinity}\n'
        b'{"truncated": \n'
        b'{"type":"message","id":"b","parentId":"a","timestamp":"t","message":{}}\r\n'
        b"\xc2\xa0\n"  # NBSP only: JS trim() makes it blank
    )
    path.write_bytes(body)
    m = SessionManager.open(path)
    assert [e["id"] for e in m.entries] == ["a", "b"]
    assert m.malformed_lines == 6
    assert m.leaf_id == "b"
    assert m.torn_tail is None
    assert m.digest.intdigest() == content_digest(path)


def test_non_utf8_bytes_are_replaced_like_node(tmp_path: Path, parser: str) -> None:
    path = tmp_path / "s.jsonl"
    bad = b'{"type":"custom","id":"a","parentId":null,"customType":"x","data":"caf\xe9 \xff"}\n'
    also_bad = b"\xff\xfe{}\n"  # invalid bytes outside a string: not JSON at all
    path.write_bytes(json.dumps(HEADER).encode() + b"\n" + bad + also_bad)
    m = SessionManager.open(path)
    assert m.get_entry("a") is not None
    assert m.get_entry("a")["data"] == "caf\ufffd \ufffd"  # type: ignore[index]
    assert m.invalid_utf8_lines == 1
    assert m.malformed_lines == 1
    assert m.digest.intdigest() == content_digest(path)


def test_leading_bom_is_dropped_like_js_trim(tmp_path: Path, parser: str) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(HEADER).encode() + b"\n")
    m = SessionManager.open(path)
    assert m.header == HEADER and m.malformed_lines == 0


def test_unicode_round_trip(tmp_path: Path, parser: str) -> None:
    path = tmp_path / "s.jsonl"
    m = SessionManager.open(path)
    text = 'naïve — 日本語 🎉 \u2028 line sep \u0000 nul "quote" \\ back\n newline'
    ident = m.append_message({"role": "user", "content": text})
    raw = path.read_bytes()
    assert "日本語 🎉".encode() in raw  # ensure_ascii=False: UTF-8, not \u escapes
    assert raw.count(b"\n") == 2  # the newline inside the text is escaped
    again = SessionManager.open(path)
    assert again.get_entry(ident)["message"]["content"] == text  # type: ignore[index]


def test_lone_surrogate_is_escaped_and_round_trips(tmp_path: Path, parser: str) -> None:
    path = tmp_path / "s.jsonl"
    m = SessionManager.open(path)
    ident = m.append_custom("s", {"v": "a\ud800b"})
    assert b"\\ud800" in path.read_bytes()
    again = SessionManager.open(path)
    assert again.get_entry(ident)["data"] == {"v": "a\ud800b"}  # type: ignore[index]
    assert again.malformed_lines == 0


def test_big_integers_parse_identically_with_either_parser(tmp_path: Path, parser: str) -> None:
    path = tmp_path / "s.jsonl"
    big = 2**70 + 1
    path.write_bytes(
        json.dumps(HEADER).encode()
        + b"\n"
        + f'{{"type":"custom","id":"a","parentId":null,"n":{big},"m":-{big},"f":1e400}}\n'.encode()
    )
    m = SessionManager.open(path)
    entry = m.get_entry("a")
    assert entry is not None
    assert entry["n"] == big and type(entry["n"]) is int
    assert entry["m"] == -big
    assert entry["f"] == float("inf")  # JSON.parse gives Infinity for an overflowing number


def test_huge_entries(tmp_path: Path, parser: str) -> None:
    path = tmp_path / "s.jsonl"
    m = SessionManager.open(path, chunk_size=64 * 1024)  # entries span many read chunks
    big = "é" * (3 * 1024 * 1024)
    a = m.append_message({"role": "user", "content": big})
    b = m.append_custom("small")
    c = m.append_message({"role": "assistant", "content": "z" * (2 * 1024 * 1024)})
    again = SessionManager.open(path, chunk_size=64 * 1024)
    assert [e["id"] for e in again.entries] == [a, b, c]
    assert again.get_entry(a)["message"]["content"] == big  # type: ignore[index]
    assert again.digest.intdigest() == content_digest(path) == m.digest.intdigest()
    assert again.digest_size == path.stat().st_size


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_tiny_read_chunks_give_the_same_model(tmp_path: Path, chunk: int) -> None:
    path = tmp_path / "s.jsonl"
    write(path, HEADER, msg("a", None, "ü" * 50), msg("b", "a"), raw=b'{"torn":')
    ref = SessionManager.open(path)
    m = SessionManager.open(path, chunk_size=chunk)
    assert m.entries == ref.entries and m.torn_tail == ref.torn_tail
    assert m.digest.intdigest() == ref.digest.intdigest() == content_digest(path)


def test_parsed_fingerprint_describes_parsed_bytes(tmp_path: Path, transcript: Path) -> None:
    m = SessionManager.open(transcript)
    assert m.parsed_fingerprint == fingerprint(transcript)
    assert m.digest_size == m.parsed_fingerprint.size
    m2 = SessionManager.open(transcript, window=16)
    assert m2.parsed_fingerprint == fingerprint(transcript, window=16)


def test_open_retries_when_the_file_moves_during_the_parse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.jsonl"
    write(path, HEADER, msg("a", None))
    real = tio.parse_fd
    calls = {"n": 0}

    def racing(fd: int, digest: Any, chunk: int = tio.DEFAULT_CHUNK) -> tio.Loaded:
        calls["n"] += 1
        if calls["n"] == 1:  # a writer appends while the first parse is under way
            with open(path, "ab") as f:
                f.write(json.dumps(msg("b", "a")).encode() + b"\n")
        return real(fd, digest, chunk)

    monkeypatch.setattr(tio, "parse_fd", racing)
    m = SessionManager.open(path)
    assert calls["n"] == 2
    assert [e["id"] for e in m.entries] == ["a", "b"]
    assert m.parsed_fingerprint == fingerprint(path)
    assert m.digest.intdigest() == content_digest(path)


def test_open_gives_up_on_a_file_that_never_holds_still(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.jsonl"
    write(path, HEADER)
    real = tio.parse_fd

    def always_racing(fd: int, digest: Any, chunk: int = tio.DEFAULT_CHUNK) -> tio.Loaded:
        with open(path, "ab") as f:
            f.write(b"{}\n")
        return real(fd, digest, chunk)

    monkeypatch.setattr(tio, "parse_fd", always_racing)
    with pytest.raises(UnstableFileError):
        SessionManager.open(path)


# --------------------------------------------------------------------------------------
# Appending
# --------------------------------------------------------------------------------------


def test_append_shapes_ids_timestamps(tmp_path: Path, transcript: Path) -> None:
    m = SessionManager.open(transcript)
    a = m.append_message({"role": "user", "content": "q"})
    b = m.append_compaction("summary", a, 1234)
    c = m.append_compaction("s2", a, 5, details={"k": [1]}, from_hook=True)
    d = m.append_custom("kind")
    e = m.append_custom("kind", {"x": None})
    f = m.append_label(a, "important")
    g = m.append_session_info("  My session \t")
    got = lines(transcript)[1:]
    assert [x["id"] for x in got] == [a, b, c, d, e, f, g]
    parents = [x["parentId"] for x in got]
    assert parents == [None, a, b, c, d, e, f]
    for x in got:
        assert HEX8.match(x["id"])
        assert ISO_MS_Z.match(x["timestamp"])
        assert list(x)[:4] == ["type", "id", "parentId", "timestamp"]
    assert got[1] == {
        "type": "compaction",
        "id": b,
        "parentId": a,
        "timestamp": got[1]["timestamp"],
        "summary": "summary",
        "firstKeptEntryId": a,
        "tokensBefore": 1234,
    }
    assert got[2]["details"] == {"k": [1]} and got[2]["fromHook"] is True
    assert "data" not in got[3] and got[4]["data"] == {"x": None}
    assert got[5]["targetId"] == a and got[5]["label"] == "important"
    assert got[6]["name"] == "My session"
    assert m.labels == {a: "important"} and m.session_name == "My session"
    assert m.leaf_id == g
    # compact separators, one line each
    raw = transcript.read_bytes().split(b"\n")
    assert all(b", " not in x and b'": ' not in x for x in raw[1:])
    reopened = SessionManager.open(transcript)
    assert reopened.entries == m.entries
    assert reopened.labels == m.labels and reopened.session_name == "My session"


def test_label_clear_and_unknown_target(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    a = m.append_message({"role": "user", "content": "q"})
    m.append_label(a, "x")
    m.append_label(a, None)
    assert m.labels == {}
    with pytest.raises(ValueError, match="no such entry"):
        m.append_label("missing", "x")
    m.append_session_info("n")
    m.append_session_info("   ")
    assert m.session_name is None
    assert SessionManager.open(transcript).session_name is None


def test_timestamps_are_utc_milliseconds() -> None:
    for _ in range(50):
        assert ISO_MS_Z.match(tio.iso_now())


def test_ids_unique_and_collision_fallback(
    transcript: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = SessionManager.open(transcript)
    ids = {m.append_custom("c") for _ in range(300)}
    assert len(ids) == 300 and all(HEX8.match(i) for i in ids)
    # Every 8-hex candidate taken: after 100 tries the id is a full UUID (hex).
    monkeypatch.setattr(tio.os, "urandom", lambda n: b"\x00" * n)
    first = m.append_custom("c")
    assert first == "00000000"
    second = m.append_custom("c")
    assert re.fullmatch(r"[0-9a-f]{32}", second)


def test_nan_and_unserialisable_values_are_refused_before_writing(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    before = transcript.read_bytes()
    with pytest.raises(ValueError):
        m.append_message({"role": "user", "v": float("nan")})
    with pytest.raises(ValueError):
        m.append_custom("x", float("inf"))
    with pytest.raises(TypeError):
        m.append_custom("x", {1, 2})
    assert transcript.read_bytes() == before
    assert m.entries == [] and m.leaf_id is None


def test_append_entry_generic_and_side_mode(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    a = m.append_message({"role": "user", "content": "q"})
    t = m.append_entry({"type": "thinking_level_change", "thinkingLevel": "high"})
    assert m.leaf_id == t and m.get_entry(t)["parentId"] == a  # type: ignore[index]
    s = m.append_entry({"type": "message", "appendMode": "side", "message": {"role": "x"}})
    assert m.leaf_id == t and m.side_cursor == s
    with pytest.raises(ValueError, match="already exists"):
        m.append_entry({"type": "custom", "id": a})
    with pytest.raises(ValueError):
        m.append_entry({"type": "session"})
    re_ = SessionManager.open(transcript)
    assert re_.leaf_id == t and re_.side_cursor == s


def test_appends_reach_the_file_as_single_writes(
    transcript: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = SessionManager.open(transcript)
    writes: list[int] = []
    real_write = os.write

    def spy(fd: int, data: Any) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(tio.os, "write", spy)
    m.append_message({"role": "user", "content": "x" * 200_000})
    assert len(writes) == 1
    assert transcript.read_bytes().endswith(b"\n")


def test_short_write_is_completed(transcript: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = SessionManager.open(transcript)
    real_write = os.write

    def short(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data)[: max(1, len(data) // 3)])

    monkeypatch.setattr(tio.os, "write", short)
    ident = m.append_message({"role": "user", "content": "abc" * 100})
    monkeypatch.undo()
    again = SessionManager.open(transcript)
    assert again.leaf_id == ident and again.torn_tail is None


def test_failed_write_leaves_model_unchanged_and_next_append_refuses(
    transcript: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = SessionManager.open(transcript)
    a = m.append_custom("ok")
    real_write = os.write
    calls = {"n": 0}

    def dies(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data)[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tio.os, "write", dies)
    with pytest.raises(OSError):
        m.append_custom("lost")
    monkeypatch.undo()
    assert m.leaf_id == a and len(m.entries) == 1
    with pytest.raises(TornTranscriptError) as info:
        m.append_custom("next")
    assert info.value.length == 10


def test_appends_keep_the_digest_exact(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    assert m.digest.intdigest() == content_digest(transcript)
    for i in range(20):
        m.append_message({"role": "user", "content": f"m{i}" * i})
        assert m.digest.intdigest() == content_digest(transcript)
        assert m.digest_size == transcript.stat().st_size


def test_foreign_bytes_leave_the_digest_behind_until_synced_or_noted(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    m.append_custom("a")
    size = m.digest_size
    foreign = json.dumps(msg("f1", None)).encode() + b"\n"
    with open(transcript, "ab") as f:
        f.write(foreign)
    m.append_custom("b")  # lands after the foreign line: the digest cannot roll blindly
    assert m.digest_size == size
    assert m.digest.intdigest() == content_digest(transcript, size)
    gained = m.sync_digest()
    assert gained == transcript.stat().st_size - size
    assert m.digest.intdigest() == content_digest(transcript)
    # note_external_bytes: the caller hands over bytes it already read
    more = json.dumps(msg("f2", None)).encode() + b"\n"
    with open(transcript, "ab") as f:
        f.write(more)
    m.note_external_bytes(more)
    m.append_custom("c")
    assert m.digest.intdigest() == content_digest(transcript)
    assert m.digest_size == transcript.stat().st_size


def test_sync_digest_refuses_a_truncated_file(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    m.append_custom("a")
    with open(transcript, "r+b") as f:
        f.truncate(5)
    with pytest.raises(ValueError, match="shorter"):
        m.sync_digest()


def test_created_by_someone_else_after_open(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    m = SessionManager.open(path)
    write(path, HEADER)
    with pytest.raises(FileExistsError):
        m.append_custom("x")
    assert lines(path) == [HEADER]


def test_deleted_after_open_is_not_recreated(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    transcript.unlink()
    with pytest.raises(FileNotFoundError):
        m.append_custom("x")
    assert not transcript.exists()


def test_emptied_behind_the_manager_is_refused(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    transcript.write_bytes(b"")
    with pytest.raises(TranscriptChangedError):
        m.append_custom("x")
    assert transcript.read_bytes() == b""


# --------------------------------------------------------------------------------------
# Torn tails
# --------------------------------------------------------------------------------------


def test_torn_tail_detected_refused_and_repaired(tmp_path: Path, parser: str) -> None:
    path = tmp_path / "s.jsonl"
    write(path, HEADER, msg("a", None))
    good = path.read_bytes()
    torn = b'{"type":"message","id":"b","parentId":"a","message":{"role":"us'
    path.write_bytes(good + torn)
    m = SessionManager.open(path)
    assert m.torn_tail == (len(good), len(torn))
    assert [e["id"] for e in m.entries] == ["a"]  # never parsed into the tree
    assert m.malformed_lines == 0
    assert m.digest.intdigest() == content_digest(path)  # the digest covers every byte
    with pytest.raises(TornTranscriptError) as info:
        m.append_message({"role": "user", "content": "x"})
    assert (info.value.offset, info.value.length) == (len(good), len(torn))
    assert info.value.session_file == str(path)
    assert path.read_bytes() == good + torn  # nothing was glued on
    quarantine = m.repair_torn_tail()
    assert quarantine is not None
    q = Path(quarantine)
    assert q.parent == path.parent
    assert re.fullmatch(r"s\.jsonl\.torn-\d{8}T\d{6}\.\d{3}Z(-\d+)?", q.name)
    assert q.read_bytes() == torn
    assert path.read_bytes() == good
    assert m.torn_tail is None
    assert m.digest.intdigest() == content_digest(path)
    assert m.digest_size == len(good)
    ident = m.append_message({"role": "user", "content": "after"})
    assert SessionManager.open(path).leaf_id == ident
    assert m.digest.intdigest() == content_digest(path)


def test_a_last_line_that_parses_is_an_entry_not_a_torn_tail(tmp_path: Path) -> None:
    # Issue 11 item 2 (the old rule called this torn): only a last line that does not
    # parse as a JSON object is torn. More in test_transcript_realshapes.py.
    path = tmp_path / "s.jsonl"
    write(path, HEADER, raw=json.dumps(msg("a", None)).encode())
    m = SessionManager.open(path)
    assert [e["id"] for e in m.entries] == ["a"] and m.torn_tail is None
    assert m.leaf_id == "a" and m.unterminated_last_line


def test_torn_tail_appearing_after_open_is_refused(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    m.append_custom("a")
    size = transcript.stat().st_size
    with open(transcript, "ab") as f:
        f.write(b'{"half":')
    with pytest.raises(TornTranscriptError) as info:
        m.append_custom("b")
    assert (info.value.offset, info.value.length) == (size, 8)
    assert m.torn_tail == (size, 8)
    q = m.repair_torn_tail()
    assert q is not None and Path(q).read_bytes() == b'{"half":'
    assert m.torn_tail is None and transcript.stat().st_size == size
    m.append_custom("b")
    assert m.digest.intdigest() == content_digest(transcript)


def test_repair_never_overwrites_an_existing_quarantine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.jsonl"
    monkeypatch.setattr(tio.time, "time_ns", lambda: 1_700_000_000_123_456_789)
    taken = tmp_path / "s.jsonl.torn-20231114T221320.123Z"
    taken.write_bytes(b"older")
    write(path, HEADER, raw=b"tail-1")
    q = SessionManager.open(path).repair_torn_tail()
    assert q == str(taken) + "-1"
    assert taken.read_bytes() == b"older" and Path(q).read_bytes() == b"tail-1"


def test_repair_whole_file_torn_and_clean_files(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"type":"sess')
    m = SessionManager.open(path)
    assert m.torn_tail == (0, 13)
    q = m.repair_torn_tail()
    assert q is not None and Path(q).read_bytes() == b'{"type":"sess'
    assert path.read_bytes() == b""
    assert m.digest.intdigest() == content_digest(path)
    assert m.repair_torn_tail() is None  # clean now
    m.append_custom("x")  # an empty file gets a header
    assert [g["type"] for g in lines(path)] == ["session", "custom"]
    assert SessionManager.open(tmp_path / "missing.jsonl").repair_torn_tail() is None


def test_repair_refuses_to_truncate_a_growing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.jsonl"
    write(path, HEADER, raw=b"torn")
    m = SessionManager.open(path)
    real = tio.quarantine_bytes

    def and_a_writer(p: str, data: bytes, mode: int) -> str:
        target = real(p, data, mode)
        with open(path, "ab") as f:
            f.write(b"more\n")
        return target

    monkeypatch.setattr(tio, "quarantine_bytes", and_a_writer)
    with pytest.raises(TranscriptChangedError, match="nothing was truncated"):
        m.repair_torn_tail()
    assert path.read_bytes().endswith(b"tornmore\n")
    # the transcript still holds every byte, so the copy is not kept (issue 10)
    assert list(tmp_path.glob("s.jsonl.torn-*")) == []


def test_repair_rewinds_the_digest_when_it_covered_the_cut(tmp_path: Path) -> None:
    # The torn tail seen at open is cut at a different place (the file was fixed by hand
    # and torn again): the digest is recomputed for the kept prefix.
    path = tmp_path / "s.jsonl"
    write(path, HEADER, raw=b'{"a":')
    m = SessionManager.open(path)
    with open(path, "ab") as f:
        f.write(b"1}\nxx")
    m.sync_digest()
    m.repair_torn_tail()
    assert m.digest.intdigest() == content_digest(path)
    assert m.digest_size == path.stat().st_size


def test_clean_end_scans_back_over_long_lines(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a\n" + b"x" * 200_000)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert tio.clean_end(fd, 200_002) == 2
        assert tio.clean_end(fd, 1) == 0
    finally:
        os.close(fd)


def test_a_tail_still_being_written_is_not_torn(tmp_path: Path) -> None:
    # Another process's append caught mid-copy looks like a torn tail for a moment; the
    # check watches the last byte until the line is complete (settle is generous here so
    # a slow machine cannot turn this into a torn verdict).
    path = tmp_path / "f"
    path.write_bytes(b'{"a":1}\n{"b":')
    fd = os.open(path, os.O_RDONLY)

    def finish() -> None:
        with open(path, "ab") as f:
            for piece in (b"2", b"2", b"}\n"):
                time.sleep(0.005)
                f.write(piece)
                f.flush()

    writer = threading.Thread(target=finish)
    try:
        writer.start()
        size, clean = tio.settled_end(fd, settle=30.0, limit=60.0)
    finally:
        writer.join()
        os.close(fd)
    assert clean and size == path.stat().st_size


def test_a_tail_that_holds_still_is_torn(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b'{"a":1}\n{"b":')
    fd = os.open(path, os.O_RDONLY)
    try:
        assert tio.settled_end(fd, settle=0.01) == (13, False)
        assert tio.settled_end(fd, settle=0.0, limit=0.0) == (13, False)
    finally:
        os.close(fd)


def test_note_external_bytes_checks_the_offset(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    size = m.digest_size
    more = b'{"type":"custom","id":"f1","parentId":null,"customType":"x"}\n'
    with open(transcript, "ab") as f:
        f.write(more)
    with pytest.raises(ValueError, match="digest covers"):
        m.note_external_bytes(more, offset=size + 1)
    assert m.digest_size == size  # a refused call changes nothing
    m.note_external_bytes(more, offset=size)
    assert m.digest.intdigest() == content_digest(transcript)


def test_reload_reparses_in_place(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    a = m.append_custom("mine")
    with open(transcript, "ab") as f:
        f.write(json.dumps(msg("f1", a)).encode() + b"\n")
    m.reload()
    assert m.leaf_id == "f1" and m.get_entry(a) is not None
    assert m.parsed_fingerprint == fingerprint(transcript)
    assert m.digest.intdigest() == content_digest(transcript)


def test_a_torn_tail_repaired_by_someone_else_no_longer_blocks(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    write(path, HEADER, raw=b'{"x":')
    m = SessionManager.open(path)
    assert m.torn_tail is not None
    SessionManager.open(path).repair_torn_tail()
    m.append_custom("after")
    assert m.torn_tail is None
    assert [g["type"] for g in lines(path)] == ["session", "custom"]


def test_parsed_digest_is_frozen_at_open(transcript: Path) -> None:
    m = SessionManager.open(transcript)
    frozen = m.parsed_digest
    assert frozen is not m.digest
    assert frozen.intdigest() == content_digest(transcript)
    size = m.parsed_fingerprint.size
    m.append_custom("x")
    assert frozen.intdigest() == content_digest(transcript, size)  # not rolled
    assert m.digest.intdigest() == content_digest(transcript)
    assert SessionManager.open(transcript.with_name("none.jsonl")).parsed_digest is None


def test_quarantine_keeps_the_transcript_permissions(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    write(path, HEADER, raw=b"torn")
    path.chmod(0o640)
    q = SessionManager.open(path).repair_torn_tail()
    assert q is not None and Path(q).stat().st_mode & 0o777 == 0o640


def test_repr_and_window(transcript: Path) -> None:
    m = SessionManager.open(transcript, window=64)
    ident = m.append_custom("x")
    assert m.window == 64
    assert repr(m) == (
        f"<SessionManager {str(transcript)!r} entries=1 leaf={ident!r} "
        f"digest_size={transcript.stat().st_size}>"
    )


@pytest.mark.parametrize("chunk", [97, 4096, tio.DEFAULT_CHUNK])
def test_long_numbers_across_many_lines_match_the_reference(
    tmp_path: Path, parser: str, chunk: int
) -> None:
    path = tmp_path / "s.jsonl"
    rows: list[bytes] = [json.dumps(HEADER).encode()]
    for i in range(60):
        kind = i % 4
        number = {
            0: f"{2**64 + i}",  # an integer orjson would turn into a float
            1: f"0.{'1' * 25}{i}",  # a long fraction: fine for every parser
            2: f"1.5e{'0' * 20}1",  # a long exponent
            3: f"{i}",
        }[kind]
        rows.append(
            f'{{"type":"custom","id":"e{i:07x}","parentId":null,"n":{number},'
            f'"s":"{"9" * (19 + i)}"}}'.encode()
        )
    path.write_bytes(b"\n".join(rows) + b"\n")
    got = SessionManager.open(path, chunk_size=chunk)
    old = _jsonl.set_fast_parser(None)
    try:
        ref = SessionManager.open(path)
    finally:
        _jsonl.set_fast_parser(old)
    assert got.malformed_lines == ref.malformed_lines == 0
    assert len(got.entries) == 60
    for a, b in zip(got.entries, ref.entries, strict=True):
        assert a == b and type(a["n"]) is type(b["n"])
    assert type(got.get_entry("e0000000")["n"]) is int  # type: ignore[index]


def test_may_hold_long_integer() -> None:
    check = _jsonl.may_hold_long_integer
    assert not check(b"")
    assert check(b'{"a":1234567890123456789}')
    assert not check(b'{"a":0.1234567890123456789}')
    assert not check(b'{"a":1e1234567890123456789}')
    assert check(b'{"a":-1234567890123456789}')
    assert check(b'"12345678901234567890123"')  # inside a string: reported too
    assert check(b'{"f":0.1234567890123456789,"n":1234567890123456789}')
    assert not check(b'{"a":123456789012345678}')


def test_open_errors_propagate(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError):
        SessionManager.open(tmp_path)
    with pytest.raises(ValueError, match="chunk_size"):
        SessionManager.open(tmp_path / "x.jsonl", chunk_size=0)
