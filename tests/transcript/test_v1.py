"""Pre-tree (v1) sessions: read as the linear chain they are, appends refused until the file
is migrated the way pi-mono migrates it (issue 11 item 1).

The migration rules are pi-mono's ``migrateV1ToV2``/``migrateV2ToV3``
(``packages/coding-agent/src/core/session-manager.ts``); each expectation below names the
rule it checks. New names are reached through the package at run time, so the module still
imports (and its reading tests fail on behaviour) on a version without them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sessionfence
from sessionfence import SessionManager, _jsonl, acquire_session_write_lock
from sessionfence.transcript import _io as tio

FIXTURES = Path(__file__).parents[1] / "fixtures" / "transcripts"
HEX8 = re.compile(r"^[0-9a-f]{8}$")


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
def v1(tmp_path: Path) -> Path:
    target = tmp_path / "pi_v1_session.jsonl"
    shutil.copyfile(FIXTURES / "pi_v1_session.jsonl", target)
    return target


def file_objects(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_bytes().split(b"\n") if x.strip()]


def migrate(path: Path, **kwargs: Any) -> Any:
    return sessionfence.migrate_transcript(path, **kwargs)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def test_v1_session_reads_as_a_linear_chain(v1: Path, parser: str) -> None:
    originals = file_objects(v1)[1:]
    m = SessionManager.open(v1)
    # the references give the model every message of it; so must we
    assert m.leaf_id is not None
    branch = m.branch()
    assert branch == originals  # every entry, in file order, root to leaf
    assert m.get_entry(m.leaf_id) is originals[-1] or m.get_entry(m.leaf_id) == originals[-1]
    assert m.entries == originals
    assert m.torn_tail is None and m.malformed_lines == 0


def test_v1_in_memory_ids_name_positions_as_first_kept_entry_index_does(v1: Path) -> None:
    m = SessionManager.open(v1)
    assert m.pre_tree and m.needs_migration and m.format_version == 1
    assert m.leaf_id == "v1:10"
    compaction = m.get_entry("v1:7")
    assert compaction is not None and compaction["type"] == "compaction"
    kept = m.get_entry(f"v1:{compaction['firstKeptEntryIndex']}")
    assert kept is not None and kept["message"]["content"][0]["text"].startswith("Done")
    assert [e["type"] for e in m.children("v1:6")] == ["compaction"]
    assert m.children(None)[0]["type"] == "model_change"


def test_appends_to_a_v1_session_are_refused_with_how_to_migrate(v1: Path) -> None:
    raw = v1.read_bytes()
    m = SessionManager.open(v1)
    with pytest.raises(Exception) as info:
        m.append_message({"role": "user", "content": "more"})
    assert type(info.value).__name__ == "TranscriptNeedsMigrationError"
    assert "sessionfence migrate" in str(info.value) and str(v1) in str(info.value)
    with pytest.raises(sessionfence.TranscriptNeedsMigrationError):
        m.append_compaction("s", m.leaf_id or "", 1)
    assert v1.read_bytes() == raw


def test_header_with_an_id_but_no_version_needs_migration_even_with_tree_entries(
    tmp_path: Path,
) -> None:
    # pi-mono migrates on the header alone (version ?? 1) and replaces every id
    path = tmp_path / "s.jsonl"
    path.write_bytes(
        b'{"type":"session","id":"s1","timestamp":"t","cwd":"/"}\n'
        b'{"type":"message","id":"aa","parentId":null,"message":{"role":"user","content":"q"}}\n'
    )
    m = SessionManager.open(path)
    assert not m.pre_tree and m.needs_migration and m.leaf_id == "aa"
    with pytest.raises(sessionfence.TranscriptNeedsMigrationError):
        m.append_custom("x")


def test_a_file_created_by_an_append_is_current(tmp_path: Path) -> None:
    m = SessionManager.open(tmp_path / "new.jsonl")
    assert m.format_version is None and not m.needs_migration
    m.append_custom("x")
    assert m.format_version == 3 and not m.needs_migration and not m.pre_tree


def test_a_bare_header_stays_appendable_as_spec_6_requires(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"type":"session"}\n{"type":"custom","id":"c1","parentId":null}\n')
    m = SessionManager.open(path)
    assert not m.pre_tree and not m.needs_migration
    m.append_custom("x")


# --------------------------------------------------------------------------------------
# Migration
# --------------------------------------------------------------------------------------


def test_migration_produces_the_references_shape(v1: Path, parser: str) -> None:
    raw = v1.read_bytes()
    before = file_objects(v1)
    result = migrate(v1)
    assert result.changed and result.from_version == 1 and result.to_version == 3
    assert result.entries == len(before) - 1 and result.kept_lines == 0
    # the backup holds the original bytes, beside the transcript
    assert result.backup is not None and Path(result.backup).read_bytes() == raw
    assert Path(result.backup).parent == v1.parent
    assert re.fullmatch(
        r"pi_v1_session\.jsonl\.bak-v1-\d{8}T\d{6}\.\d{3}Z", Path(result.backup).name
    )
    after = file_objects(v1)
    header = after[0]
    # migrateV1ToV2/V2ToV3: the header gets version (2, then 3) as its last key
    assert list(header) == [*before[0], "version"] and header["version"] == 3
    previous = None
    for old, new in zip(before[1:], after[1:], strict=True):
        # every entry: a new 8-hex id and the previous entry as parent, keys appended last
        assert HEX8.match(new["id"]) and new["parentId"] == previous
        previous = new["id"]
        if old["type"] == "compaction":
            # firstKeptEntryIndex (an index into the file's parsed lines, header = 0)
            # becomes firstKeptEntryId, after id and parentId; the index is deleted
            assert list(new) == [
                *(k for k in old if k != "firstKeptEntryIndex"),
                "id",
                "parentId",
                "firstKeptEntryId",
            ]
            assert new["firstKeptEntryId"] == after[old["firstKeptEntryIndex"]]["id"]
        else:
            assert list(new) == [*old, "id", "parentId"]
        if old["type"] == "message" and old["message"]["role"] == "hookMessage":
            assert new["message"]["role"] == "custom"  # v2 -> v3
            assert new["message"] == {**old["message"], "role": "custom"}
        elif old["type"] != "compaction":
            assert {k: v for k, v in new.items() if k not in ("id", "parentId")} == old
    assert len({e["id"] for e in after[1:]}) == len(after) - 1
    # each line as JSON.stringify writes it, the lines joined by "\n" plus a final "\n"
    text = v1.read_bytes()
    assert text == b"".join(_jsonl.dumps_line(o) for o in after)


def test_after_migration_the_same_chain_is_appendable(v1: Path) -> None:
    before = SessionManager.open(v1).branch()
    migrate(v1)
    m = SessionManager.open(v1)
    assert not m.pre_tree and not m.needs_migration and m.format_version == 3
    strip = [
        {
            k: v
            for k, v in e.items()
            if k not in ("id", "parentId", "firstKeptEntryIndex", "firstKeptEntryId")
        }
        for e in m.branch()
    ]
    expected = [{k: v for k, v in e.items() if k not in ("firstKeptEntryIndex",)} for e in before]
    expected[7]["message"] = {**expected[7]["message"], "role": "custom"}
    assert strip == expected
    leaf = m.leaf_id
    ident = m.append_message({"role": "user", "content": "after the migration"})
    again = SessionManager.open(v1)
    assert again.leaf_id == ident and again.get_entry(ident)["parentId"] == leaf  # type: ignore[index]
    # a second run finds a current file: nothing written, no second backup
    second = migrate(v1)
    assert not second.changed and second.backup is None and second.from_version == 3
    assert len(list(v1.parent.glob("*.bak-*"))) == 1


def test_migration_keeps_what_it_cannot_parse_and_maps_old_ids(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"type":"session","id":"s","timestamp":"t","cwd":"/"}\n'
        b'{"type":"message","message":{"role":"user","content":"a"}}\n'
        b"\n"
        b"not json at all\n"
        b"[1,2]\n"
        b'{"type":"custom","id":"old1","parentId":null,"customType":"x"}\n'
        b'{"type":"compaction","summary":"s","firstKeptEntryIndex":99,"firstKeptEntryId":"k","tokensBefore":1}\n'
        b'{"type":"compaction","summary":"s","firstKeptEntryIndex":0,"tokensBefore":1}\n'
        b'{"type":"message","message":{"role":"user","content":"last"}}'  # no final newline
    )
    result = migrate(path)
    assert result.entries == 5 and result.kept_lines == 2 and result.blank_lines == 1
    lines = path.read_bytes().split(b"\n")
    assert lines[2:4] == [b"not json at all", b"[1,2]"]  # kept byte for byte, in place
    objs = [json.loads(x) for x in lines if x.startswith(b"{")]
    assert result.id_map == {"old1": objs[2]["id"]}
    # index out of range: no target, the old firstKeptEntryId stays (pi-mono assigns nothing)
    assert objs[3]["firstKeptEntryId"] == "k" and "firstKeptEntryIndex" not in objs[3]
    # index of the header: no firstKeptEntryId either
    assert "firstKeptEntryId" not in objs[4] and "firstKeptEntryIndex" not in objs[4]
    assert path.read_bytes().endswith(b"\n") and not path.read_bytes().startswith(b"\xef")
    m = SessionManager.open(path)
    assert m.leaf_id == objs[-1]["id"] and len(m.branch()) == 5


def test_a_v2_session_is_migrated_keeping_its_ids(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(
        b'{"type":"session","version":2,"id":"s","timestamp":"t","cwd":"/"}\n'
        b'{"type":"message","id":"a1","parentId":null,"message":{"role":"hookMessage","content":"h","n":1.0}}\n'
    )
    result = migrate(path)
    assert result.changed and result.from_version == 2 and result.entries == 0
    assert path.read_bytes() == (
        b'{"type":"session","version":3,"id":"s","timestamp":"t","cwd":"/"}\n'
        b'{"type":"message","id":"a1","parentId":null,"message":{"role":"custom","content":"h","n":1}}\n'
    )


def test_migration_never_overwrites_an_existing_backup(
    v1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tio, "utc_stamp", lambda: "20260101T000000.000Z")
    taken = v1.parent / f"{v1.name}.bak-v1-20260101T000000.000Z"
    taken.write_bytes(b"an older backup")
    result = migrate(v1)
    assert result.backup == f"{taken}-1"
    assert taken.read_bytes() == b"an older backup"


def test_migration_keeps_permissions_leaves_no_temp_file_and_follows_symlinks(
    v1: Path, tmp_path: Path
) -> None:
    os.chmod(v1, 0o640)
    link = tmp_path / "link.jsonl"
    link.symlink_to(v1)
    result = migrate(link)
    assert result.changed and link.is_symlink()
    assert (v1.stat().st_mode & 0o777) == 0o640
    assert Path(result.backup).parent == v1.parent  # type: ignore[arg-type]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names
    assert not SessionManager.open(link).pre_tree


def test_dry_run_writes_nothing(v1: Path) -> None:
    raw = v1.read_bytes()
    result = migrate(v1, dry_run=True)
    assert result.changed and result.backup is None and result.entries == 10
    assert v1.read_bytes() == raw
    assert not list(v1.parent.glob("*.bak-*"))


def test_torn_and_foreign_files_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(b'{"type":"session","id":"s"}\n{"type":"message","mess')
    with pytest.raises(sessionfence.TornTranscriptError):
        migrate(torn)
    claude = tmp_path / "claude.jsonl"
    shutil.copyfile(FIXTURES / "claude_code_log.jsonl", claude)
    with pytest.raises(sessionfence.NotASessionError, match="Claude Code log"):
        migrate(claude)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "claude.jsonl",
        "torn.jsonl",
    ]


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_migration_waits_for_the_write_lock(v1: Path) -> None:
    raw = v1.read_bytes()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the holder
        try:
            acquire_session_write_lock(v1, timeout=10)
            os.write(ready_w, b"L")
            signal.pause()
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"L"
        with pytest.raises(sessionfence.SessionWriteLockTimeoutError):
            migrate(v1, lock_timeout=0)
        assert v1.read_bytes() == raw and not list(v1.parent.glob("*.bak-*"))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)
    # free again: it migrates
    assert migrate(v1, lock_timeout=10).changed


def test_migration_inside_a_held_lock_of_this_process(v1: Path) -> None:
    with acquire_session_write_lock(v1, timeout=0):
        assert migrate(v1, lock_timeout=0).changed


def test_a_writer_that_ignores_the_lock_makes_the_migration_give_up(
    v1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tio.write_all

    def and_a_rogue_append(fd: int, data: bytes) -> None:
        real(fd, data)
        if data.startswith(b'{"type":"session","id"'):  # the temp file of the new content
            with open(v1, "ab") as f:
                f.write(b'{"type":"message","message":{"role":"user","content":"rogue"}}\n')

    monkeypatch.setattr(tio, "write_all", and_a_rogue_append)
    with pytest.raises(sessionfence.TranscriptChangedError, match="nothing was replaced"):
        migrate(v1)
    monkeypatch.undo()
    assert b"rogue" in v1.read_bytes()  # the rogue line was not overwritten
    assert SessionManager.open(v1).pre_tree
    leftovers = [
        p.name for p in v1.parent.iterdir() if ".bak-" in p.name or p.name.endswith(".tmp")
    ]
    assert leftovers == []
