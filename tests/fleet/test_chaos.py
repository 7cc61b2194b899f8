"""Each chaos kind does what its ground-truth record says, on a real transcript.

The fence verdicts themselves are the controller's business; here the point is that the
injector is honest: a "same-size rewrite with mtime restored" really keeps size and mtime and
changes one byte, a "replace with the same bytes" really is a new inode with equal content,
the ids it reports as removed are exactly the ones gone, and every line stays valid JSON.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from sessionfence import ChangeKind, SessionManager, check_append, content_digest, fingerprint
from sessionfence.fleet.chaos import KINDS, apply_event, chaos_kinds, mirror_line
from sessionfence.fleet.transcripts import (
    FOREIGN_ID_BASE,
    last_lines,
    line_ids,
    make_transcripts,
)


@pytest.fixture
def transcript(tmp_path: Path) -> str:
    """A header plus ~64 KiB of padding: head and middle lie outside the 4 KiB tail window."""
    return make_transcripts(str(tmp_path / "s"), 1, 64 * 1024)[0]


def _ids(path: str) -> list[str]:
    return line_ids(Path(path).read_bytes())


def _all_json(path: str) -> bool:
    data = Path(path).read_bytes()
    if not data.endswith(b"\n"):
        return False
    for raw in data.split(b"\n")[:-1]:
        json.loads(raw)
    return True


def test_make_transcripts_writes_valid_sessions_with_unique_ids(tmp_path: Path) -> None:
    paths = make_transcripts(str(tmp_path / "s"), 3, 300_000)
    assert len(paths) == 3
    headers = set()
    for path in paths:
        assert os.path.getsize(path) >= 300_000
        manager = SessionManager.open(path)
        assert manager.malformed_lines == 0
        assert manager.torn_tail is None
        assert manager.header is not None
        headers.add(manager.header["id"])
        ids = [e["id"] for e in manager.entries]
        assert len(ids) == len(set(ids))
        assert all(int(i, 16) < FOREIGN_ID_BASE for i in ids)
    assert len(headers) == 3
    # (beside each transcript: the index its open wrote, docs/transcripts.md)
    names = sorted(n for n in os.listdir(tmp_path / "s") if not n.endswith(".idx"))
    assert names == [os.path.basename(p) for p in paths]


def test_make_transcripts_without_padding_is_a_header(tmp_path: Path) -> None:
    (path,) = make_transcripts(str(tmp_path / "s"), 1, 0)
    assert json.loads(Path(path).read_bytes())["type"] == "session"
    assert last_lines(path, 3) == []


def test_last_lines_reads_whole_lines_longer_than_its_first_chunk(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = [
        b'{"type":"session"}\n',
        b'{"id":"a"}\n',
        b'{"id":"b","x":"' + b"y" * 200_000 + b'"}\n',
    ]
    lines.append(b'{"id":"c"}\n')
    path.write_bytes(b"".join(lines))
    found = last_lines(str(path), 2)
    assert [line for _, line in found] == lines[2:]
    assert found[0][0] == len(lines[0]) + len(lines[1])
    assert [line for _, line in last_lines(str(path), 10)] == lines[1:]


def _apply(kind: str, path: str, seed: int = 1) -> dict[str, object]:
    return apply_event(kind, path, random.Random(seed))


@pytest.mark.parametrize("kind", ["foreign-append", "disguised-append"])
def test_appends_add_one_whole_foreign_line(transcript: str, kind: str) -> None:
    before = fingerprint(transcript)
    result = _apply(kind, transcript)
    change = check_append(transcript, before)
    assert change.kind is ChangeKind.APPENDED
    assert change.appended is not None
    (entry,) = [json.loads(raw) for raw in change.appended.splitlines()]
    assert result["added"] == [entry["id"]]
    assert int(entry["id"], 16) >= FOREIGN_ID_BASE
    if kind == "disguised-append" and entry["type"] == "message":
        assert entry["message"]["provider"] == "fleet-sim"  # shaped like a worker's own


@pytest.mark.parametrize("seed", range(4))
def test_truncate_removes_whole_lines_and_reports_their_ids(transcript: str, seed: int) -> None:
    ids = _ids(transcript)
    before = fingerprint(transcript)
    result = _apply("truncate", transcript, seed)
    assert check_append(transcript, before).kind is ChangeKind.TRUNCATED
    removed = result["removed"]
    assert isinstance(removed, list) and 1 <= len(removed) <= 3
    assert _ids(transcript) + removed == ids
    assert _all_json(transcript)


def test_truncate_regrow_passes_the_old_size_with_foreign_lines(transcript: str) -> None:
    before = fingerprint(transcript)
    result = _apply("truncate-regrow", transcript)
    assert os.path.getsize(transcript) > before.size
    assert check_append(transcript, before).kind is ChangeKind.REWRITTEN
    assert _all_json(transcript)
    assert _ids(transcript)[-len(result["added"]) :] == result["added"]  # type: ignore[arg-type]


def test_truncate_of_a_header_only_file_falls_back_to_an_append(tmp_path: Path) -> None:
    (path,) = make_transcripts(str(tmp_path / "s"), 1, 0)
    result = _apply("truncate", path)
    assert result["applied"] == "foreign-append"
    assert len(_ids(path)) == 2  # header id + the foreign line


def test_replace_keeps_the_bytes_and_changes_the_inode(transcript: str) -> None:
    data = Path(transcript).read_bytes()
    before = fingerprint(transcript)
    _apply("replace-same-bytes", transcript)
    assert check_append(transcript, before).kind is ChangeKind.REPLACED
    assert Path(transcript).read_bytes() == data
    assert not os.path.exists(transcript + ".chaos-replace")


@pytest.mark.parametrize("where", ["head", "middle", "tail"])
def test_same_size_rewrite_restores_mtime_and_changes_one_byte(transcript: str, where: str) -> None:
    data = Path(transcript).read_bytes()
    st = os.stat(transcript)
    before = fingerprint(transcript)
    result = _apply(f"rewrite-{where}", transcript)
    after = Path(transcript).read_bytes()
    assert len(after) == len(data)
    assert os.stat(transcript).st_mtime_ns == st.st_mtime_ns
    diffs = [i for i in range(len(data)) if data[i] != after[i]]
    assert diffs == [result["offset"]]
    assert _all_json(transcript)
    # The altered line keeps its id, which is reported so the line check exempts it.
    altered_ids = result["altered"]
    assert isinstance(altered_ids, list) and len(altered_ids) == 1
    altered = altered_ids[0]
    assert altered in _ids(transcript)
    kind = check_append(transcript, before).kind
    if where == "tail":
        assert kind is ChangeKind.REWRITTEN
    else:  # outside the tail window: only ctime (and the content digest) can tell
        assert diffs[0] < before.size - before.tail_len
        assert kind is ChangeKind.TOUCHED
        assert content_digest(transcript) != content_digest_of(data, transcript)


def content_digest_of(data: bytes, beside: str) -> int:
    other = beside + ".copy"
    Path(other).write_bytes(data)
    try:
        return content_digest(other)
    finally:
        os.unlink(other)


def test_rewrite_head_then_append_looks_like_a_plain_append_to_the_tail(transcript: str) -> None:
    assert KINDS["rewrite-head+append"].full_only
    before = fingerprint(transcript)
    old_prefix = content_digest(transcript)
    _apply("rewrite-head+append", transcript)
    assert check_append(transcript, before).kind is ChangeKind.APPENDED
    assert content_digest(transcript, before.size) != old_prefix


@pytest.mark.parametrize("kind", ["touch", "chmod"])
def test_metadata_events_keep_the_content(transcript: str, kind: str) -> None:
    data = Path(transcript).read_bytes()
    before = fingerprint(transcript)
    os.utime(transcript, ns=(0, before.mtime_ns - 10**9))  # so a touch visibly moves mtime
    before = fingerprint(transcript)
    _apply(kind, transcript)
    assert check_append(transcript, before).kind is ChangeKind.TOUCHED
    assert Path(transcript).read_bytes() == data
    assert not KINDS[kind].takeover


def test_tail_mode_never_draws_what_it_cannot_see() -> None:
    assert "rewrite-head+append" in chaos_kinds("full")
    assert "rewrite-head+append" not in chaos_kinds("tail")
    assert set(chaos_kinds("full")) == set(KINDS)


def test_mirror_lines_are_transcript_only_openclaw_messages() -> None:
    entry_id, line = mirror_line(random.Random(3), "00000001")
    entry = json.loads(line)
    assert entry["id"] == entry_id
    assert entry["parentId"] == "00000001"
    message = entry["message"]
    assert (message["role"], message["provider"], message["model"]) == (
        "assistant",
        "openclaw",
        "delivery-mirror",
    )


def test_rewrites_never_break_an_escape(tmp_path: Path) -> None:
    # Lines full of \n escapes: changing the n of one would leave invalid JSON.
    path = tmp_path / "t.jsonl"
    text = "\\n".join(["ab", "n", "cd"] * 20)
    line = '{"type":"message","id":"0000000%d","message":{"content":[{"text":"%s"}]}}\n'
    path.write_text('{"type":"session"}\n' + "".join(line % (i, text) for i in range(3)))
    for seed in range(200):
        _apply("rewrite-middle", str(path), seed)
        assert _all_json(str(path))


def test_mirror_metadata_records_have_a_valid_entry_base() -> None:
    from sessionfence.fleet.chaos import _metadata_line

    seen = set()
    for seed in range(30):
        entry_id, line = _metadata_line(random.Random(seed), "00000007")
        entry = json.loads(line)
        seen.add(entry["type"])
        assert entry["id"] == entry_id
        assert entry["parentId"] == "00000007"
        assert entry["timestamp"].endswith("Z")
        if entry["type"] == "custom":
            assert entry["customType"].strip()
        elif entry["type"] == "label":
            assert entry["targetId"] == "00000007"  # a target the session knows
        else:
            assert isinstance(entry["name"], str)
    assert seen == {"custom", "label", "session_info"}
