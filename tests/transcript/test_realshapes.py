"""Reading and appending to files shaped like real ones (issue 11 items 2, 3 and 4).

The fixtures in ``tests/fixtures/transcripts`` were written by ``JSON.stringify`` (node) from
hand-made objects in the shapes pi-mono and openclaw write (see their README). Every test
that reads one runs with each JSON parser, and the ones about digests on both backends.
New names (``NotASessionError``, ...) are reached through the package at run time, so the
module still imports, and its tests fail on behaviour, on a version without them.
"""

from __future__ import annotations

import os
import pickle
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import sessionfence
from sessionfence import SessionManager, _jsonl, content_digest
from sessionfence.transcript import _io as tio

FIXTURES = Path(__file__).parents[1] / "fixtures" / "transcripts"

V3_IDS = [
    "a1b2c3d4",
    "b2c3d4e5",
    "c3d4e5f6",
    "d4e5f6a7",
    "e5f6a7b8",
    "f6a7b8c9",
    "a7b8c9d0",
    "b8c9d0e1",
    "c9d0e1f2",
    "d0e1f2a3",
    "e1f2a3b4",
    "f2a3b4c5",
    "a3b4c5d6",
    "b4c5d6e7",
]


@pytest.fixture(params=["json", "msgspec", "orjson"])
def parser(request: pytest.FixtureRequest) -> Iterator[str]:
    name: str = request.param
    if name != "json" and name not in _jsonl.available_fast_parsers():
        pytest.skip(f"{name} is not installed (optional extra)")
    old = _jsonl.set_fast_parser(None if name == "json" else name)
    try:
        yield name
    finally:
        _jsonl.set_fast_parser(old)


@pytest.fixture
def backend(impl: ModuleType, monkeypatch: pytest.MonkeyPatch) -> str:
    """The manager's fingerprints and digests come from this backend."""
    monkeypatch.setattr(sessionfence, "fingerprint", impl.fingerprint)
    monkeypatch.setattr(sessionfence, "RollingDigest", impl.RollingDigest)
    name: str = impl.NAME
    return name


def copy(tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copyfile(FIXTURES / name, target)
    return target


def ids(entries: list[dict[str, Any]]) -> list[Any]:
    return [e.get("id") for e in entries]


# --------------------------------------------------------------------------------------
# The v3 shape: the agreement that already held must keep holding
# --------------------------------------------------------------------------------------


def test_v3_session_reads_as_the_references_read_it(
    tmp_path: Path, parser: str, backend: str
) -> None:
    path = copy(tmp_path, "openclaw_v3_session.jsonl")
    m = SessionManager.open(path)
    assert m.header is not None and m.header["version"] == 3
    assert ids(m.entries) == V3_IDS
    assert m.leaf_id == "b4c5d6e7"
    assert ids(m.branch()) == V3_IDS  # one linear path, every type on it
    assert m.labels == {"c3d4e5f6": "first question"}
    assert m.session_name == "Wetter Zürich"
    assert m.torn_tail is None and m.malformed_lines == 0
    assert m.digest.intdigest() == content_digest(path) and m.digest_size == path.stat().st_size


# --------------------------------------------------------------------------------------
# Item 2: a complete last line without its newline is not torn
# --------------------------------------------------------------------------------------


def test_complete_last_line_without_newline_is_the_leaf(
    tmp_path: Path, parser: str, backend: str
) -> None:
    path = copy(tmp_path, "openclaw_v3_unterminated.jsonl")
    raw = path.read_bytes()
    assert not raw.endswith(b"\n")
    m = SessionManager.open(path)
    # the same model as the terminated file: nothing moved back one entry
    assert ids(m.entries) == V3_IDS and m.leaf_id == "b4c5d6e7"
    assert ids(m.branch()) == V3_IDS
    assert m.torn_tail is None
    # the digest covers every byte, so the controller can seed its fence from the parse
    assert m.digest_size == len(raw) == m.parsed_fingerprint.size
    assert m.digest.intdigest() == content_digest(path)


def test_append_after_an_unterminated_line_writes_the_separator_in_the_same_write(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = copy(tmp_path, "openclaw_v3_unterminated.jsonl")
    raw = path.read_bytes()
    m = SessionManager.open(path)
    writes: list[bytes] = []
    real_write = os.write

    def spy(fd: int, data: Any) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(tio.os, "write", spy)
    ident = m.append_message({"role": "user", "content": "und dann?"})
    monkeypatch.undo()
    line = _jsonl.dumps_line(m.get_entry(ident))
    assert writes == [b"\n" + line]  # one os.write: separator and record together
    assert path.read_bytes() == raw + b"\n" + line
    assert m.get_entry(ident)["parentId"] == "b4c5d6e7"  # type: ignore[index]
    # the manager's digest rolled over exactly the bytes written, separator included
    assert m.digest_size == path.stat().st_size
    assert m.digest.intdigest() == content_digest(path)
    again = SessionManager.open(path)
    assert again.leaf_id == ident and ids(again.branch()) == [*V3_IDS, ident]
    assert again.torn_tail is None and again.malformed_lines == 0


def test_repair_leaves_a_complete_unterminated_line_in_the_transcript(tmp_path: Path) -> None:
    path = copy(tmp_path, "openclaw_v3_unterminated.jsonl")
    raw = path.read_bytes()
    m = SessionManager.open(path)
    assert m.repair_torn_tail() is None
    assert path.read_bytes() == raw
    assert list(tmp_path.glob("*.torn-*")) == []
    assert SessionManager.open(path).leaf_id == "b4c5d6e7"


def test_an_unterminated_line_appearing_after_open_gets_its_separator(tmp_path: Path) -> None:
    path = copy(tmp_path, "openclaw_v3_session.jsonl")
    m = SessionManager.open(path)
    foreign = b'{"type":"custom","id":"0f0f0f0f","parentId":"b4c5d6e7","customType":"x"}'
    with open(path, "ab") as f:
        f.write(foreign)  # another writer that leaves the newline out
    ident = m.append_custom("mine")
    data = path.read_bytes()
    assert data.endswith(foreign + b"\n" + _jsonl.dumps_line(m.get_entry(ident)))
    assert m.torn_tail is None
    m.sync_digest()  # the foreign bytes were not ours: the digest catches up by reading them
    assert m.digest.intdigest() == content_digest(path)
    reread = SessionManager.open(path)
    assert ids(reread.entries)[-2:] == ["0f0f0f0f", ident] and reread.malformed_lines == 0


def test_a_stalled_writers_late_newline_leaves_at_most_a_blank_line(tmp_path: Path) -> None:
    # A writer that stops just before its final newline cannot be told from a finished
    # line that lacks one. Its late newline then follows our record: a blank line, which
    # every reader skips; no two records ever share a line.
    path = copy(tmp_path, "openclaw_v3_session.jsonl")
    m = SessionManager.open(path)
    theirs = b'{"type":"custom","id":"1e1e1e1e","parentId":"b4c5d6e7","customType":"slow"}'
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, theirs)
        ident = m.append_custom("mine")
        os.write(fd, b"\n")  # the stalled writer finishes
    finally:
        os.close(fd)
    reread = SessionManager.open(path)
    assert ids(reread.entries)[-2:] == ["1e1e1e1e", ident]
    assert reread.malformed_lines == 0 and reread.torn_tail is None
    assert path.read_bytes().endswith(b"\n\n")


def test_an_in_flight_append_is_still_waited_for(tmp_path: Path) -> None:
    # The end-of-file check still watches a last line that is still growing; once the
    # writer finishes its line, our record follows it directly (no blank line).
    path = copy(tmp_path, "openclaw_v3_session.jsonl")
    m = SessionManager.open(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b'{"type":"custom","id":"2d2d2d2d","parentId":"b4c5d6e7","custo')
    started = threading.Event()

    def finish() -> None:
        started.wait()
        os.write(fd, b'mType":"late"}\n')

    writer = threading.Thread(target=finish)
    writer.start()
    try:
        started.set()
        ident = m.append_custom("mine")
    finally:
        writer.join()
        os.close(fd)
    reread = SessionManager.open(path)
    assert ids(reread.entries)[-2:] == ["2d2d2d2d", ident]
    assert b"\n\n" not in path.read_bytes()


@pytest.mark.parametrize(
    "tail",
    [b'{"type":"custom","id":"x","pa', b"[1,2]", b"42", b"   ", b'{"a":1} trailing'],
    ids=["half-object", "array", "number", "blank", "object-then-text"],
)
def test_a_last_line_that_is_not_a_json_object_is_still_torn(tmp_path: Path, tail: bytes) -> None:
    path = copy(tmp_path, "openclaw_v3_session.jsonl")
    good = path.read_bytes()
    path.write_bytes(good + tail)
    m = SessionManager.open(path)
    assert m.torn_tail == (len(good), len(tail)) and m.leaf_id == "b4c5d6e7"
    with pytest.raises(sessionfence.TornTranscriptError):
        m.append_custom("x")
    assert path.read_bytes() == good + tail
    q = m.repair_torn_tail()
    assert q is not None and Path(q).read_bytes() == tail and path.read_bytes() == good


# --------------------------------------------------------------------------------------
# Item 3: openclaw's tree rules (parentless rows, unknown types)
# --------------------------------------------------------------------------------------


def test_parentless_rows_and_unknown_types_follow_openclaw(tmp_path: Path, parser: str) -> None:
    path = copy(tmp_path, "openclaw_parentless_and_reset.jsonl")
    m = SessionManager.open(path)
    # the parentless delivery mirror continues the visible leaf; the reset row is kept
    # but does not move the leaf; the parentless user message continues from the mirror
    assert m.leaf_id == "10000005"
    assert ids(m.branch()) == ["10000001", "10000002", "10000003", "10000005"]
    assert ids(m.branch("10000003")) == ["10000001", "10000002", "10000003"]
    assert m.get_entry("10000004") is not None  # an unknown type is still an entry
    assert ids(m.entries) == ["10000001", "10000002", "10000003", "10000004", "10000005"]
    assert ids(m.children("10000003")) == ["10000004", "10000005"]


def test_an_unknown_type_at_the_end_does_not_move_the_leaf(tmp_path: Path) -> None:
    path = copy(tmp_path, "openclaw_parentless_and_reset.jsonl")
    with open(path, "ab") as f:
        f.write(b'{"type":"reset","id":"10000006","parentId":"10000005","reason":"daily"}\n')
        f.write(b'{"type":"plugin_state","id":"10000007","parentId":"10000006","x":1}\n')
    m = SessionManager.open(path)
    assert m.leaf_id == "10000005"
    ident = m.append_message({"role": "user", "content": "next"})
    assert m.get_entry(ident)["parentId"] == "10000005"  # type: ignore[index]
    assert SessionManager.open(path).leaf_id == ident


def test_a_leaf_control_naming_an_unknown_row_stands_for_its_known_parent(
    tmp_path: Path,
) -> None:
    path = copy(tmp_path, "openclaw_parentless_and_reset.jsonl")
    with open(path, "ab") as f:
        f.write(b'{"type":"leaf","id":"10000008","parentId":"10000005","targetId":"10000004"}\n')
    m = SessionManager.open(path)
    assert m.leaf_id == "10000003"  # the reset row's parent
    assert ids(m.branch()) == ["10000001", "10000002", "10000003"]


def test_a_merged_unknown_row_leaves_the_readers_leaf_alone(tmp_path: Path) -> None:
    path = copy(tmp_path, "openclaw_v3_session.jsonl")
    m = SessionManager.open(path)
    row = {"type": "reset", "id": "3c3c3c3c", "parentId": "b4c5d6e7", "reason": "idle"}
    line = _jsonl.dumps_line(row)
    with open(path, "ab") as f:
        f.write(line)
    assert m.merge_foreign_entries([row], appended=line) is None
    assert m.get_entry("3c3c3c3c") is not None and m.leaf_id == "b4c5d6e7"
    assert SessionManager.open(path).leaf_id == m.leaf_id
    assert m.digest.intdigest() == content_digest(path)


# --------------------------------------------------------------------------------------
# Item 4: files that are not sessions
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "looks_like"),
    [("claude_code_log.jsonl", "Claude Code log"), ("plain_chat_log.jsonl", "plain chat log")],
)
def test_appending_to_a_file_that_is_not_a_session_fails_and_writes_nothing(
    tmp_path: Path, parser: str, name: str, looks_like: str
) -> None:
    path = copy(tmp_path, name)
    raw = path.read_bytes()
    m = SessionManager.open(path)
    for append in (
        lambda: m.append_message({"role": "user", "content": "x"}),
        lambda: m.append_custom("x"),
        lambda: m.append_compaction("s", "a", 1),
    ):
        with pytest.raises(Exception) as info:
            append()
        assert type(info.value).__name__ == "NotASessionError"
        assert looks_like in str(info.value) and str(path) in str(info.value)
        assert path.read_bytes() == raw
    assert os.listdir(tmp_path) == [name]
    # reading says so too
    assert m.not_a_session is not None and looks_like in m.not_a_session


@pytest.mark.parametrize(
    ("data", "looks_like"),
    [
        (b"hello there\nthis is a chat log\n", "no line is JSON"),
        (b"[1,2]\n", "array"),
        (b'{"type":"message","id":"a","parentId":null}\n', "'message' entry"),
        (b'{"some":"record"}\n', "without a session type"),
    ],
)
def test_other_first_lines_are_described(tmp_path: Path, data: bytes, looks_like: str) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(data)
    m = SessionManager.open(path)
    assert m.not_a_session is not None and looks_like in m.not_a_session
    with pytest.raises(sessionfence.NotASessionError):
        m.append_custom("x")
    assert path.read_bytes() == data


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n\n",
        b'{"type":"session"}\n',
        b'not json\n{"type":"session","version":3,"id":"h"}\n',  # skipped as the refs skip it
        b'{"type":"sess',  # a header being written: torn, not "not a session"
    ],
)
def test_sessions_and_empty_files_are_not_flagged(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(data)
    assert SessionManager.open(path).not_a_session is None
    assert SessionManager.open(tmp_path / "missing.jsonl").not_a_session is None


def test_format_errors_survive_pickling() -> None:
    for error in (
        sessionfence.NotASessionError("/x.jsonl", "a plain chat log"),
        sessionfence.TranscriptNeedsMigrationError("/x.jsonl", 1.0),
    ):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
        assert isinstance(back, sessionfence.TranscriptFormatError)
