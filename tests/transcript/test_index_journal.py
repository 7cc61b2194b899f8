"""The journal position in the transcript index (issue 15): the index records where the
owned-write journal (``<transcript>.fence``) stood when it was written, and a warm open
trusts the index only if the journal's records since all announce bytes at or past the
indexed size. Real transcripts, real journals (claims, co-tenant and journaled appends,
compaction); whatever the journal says, the open gives what a full parse gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sessionfence import SessionManager, _jsonl, append_as_cotenant, claim_session, journal_path_for
from sessionfence.journal._file import compact, locked_journal, scan
from sessionfence.transcript import _index
from tests.transcript.test_index import full, state

BLOCK = _index.BLOCK


def realistic(path: Path, size: int = 3 * BLOCK + 999, seed: int = 5) -> None:
    from sessionfence.bench.transcript import write_session

    write_session(path, size, seed=seed, compact_every=200_000)


def note(n: int) -> dict[str, object]:
    return {"type": "custom", "customType": "note", "data": {"n": n}}


def opened(path: Path) -> SessionManager:
    """An open checked against a full parse."""
    manager = SessionManager.open(path)
    assert state(manager) == full(path)
    return manager


def recorded(path: Path) -> dict[str, object] | None:
    found = _index.read_index(str(path))
    assert found is not None
    position: dict[str, object] | None = found.meta["journal"]
    return position


def file_checks_pass(path: Path) -> bool:
    """What the index's own proofs (identity, size, tail, header, last block) say."""
    found = _index.read_index(str(path))
    assert found is not None
    fd = os.open(path, os.O_RDONLY)
    try:
        return _index.validate(found, fd, os.fstat(fd))
    finally:
        os.close(fd)


def test_no_journal_then_and_none_now(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    realistic(path)
    SessionManager.open(path, index=True)
    assert recorded(path) is None
    assert not os.path.exists(journal_path_for(path))
    assert opened(path)._index_opened


def test_a_journal_created_since_vouches_when_it_starts_past_the_index(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    realistic(path)
    SessionManager.open(path, index=True)
    assert recorded(path) is None
    claim_session(path, run_id="worker-1")
    for n in range(3):
        append_as_cotenant(path, note(n), writer="gateway")
    assert opened(path)._index_opened


def test_the_index_records_the_position_and_later_records_past_it_are_fine(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.jsonl"
    realistic(path)
    writer = claim_session(path, run_id="worker-1")
    append_as_cotenant(path, note(0), writer="gateway")
    SessionManager.open(path, index=True)
    position = recorded(path)
    found = scan(journal_path_for(path), None)
    assert found is not None and found.header is not None
    assert position == {
        "salt": found.header.salt.hex(),
        "seq": found.position.seq,
        "chain": found.position.chain.hex(),
    }
    # journaled appends since: a co-tenant's, the claimant's own, a new claim
    append_as_cotenant(path, note(1), writer="gateway")
    own = SessionManager.open(path, writer=writer)
    own.append_message({"role": "user", "content": "journaled"})
    claim_session(path, run_id="worker-2")
    assert opened(path)._index_opened


def claim_elsewhere(path: Path, run_id: str) -> None:
    """A claim by another process (this one's writers refuse a journal replaced under them,
    as they should)."""
    code = (
        "import sys; from sessionfence import claim_session; "
        "claim_session(sys.argv[1], run_id=sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, str(path), run_id], check=True, timeout=120)


def test_another_journal_or_none_any_more_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    realistic(path)
    claim_elsewhere(path, "worker-1")
    SessionManager.open(path, index=True)
    assert recorded(path) is not None
    jpath = journal_path_for(path)
    os.unlink(jpath)  # deleted: its records are gone
    assert file_checks_pass(path)
    assert not opened(path)._index_opened  # rebuilt (and rewritten with no journal)
    assert recorded(path) is None
    assert opened(path)._index_opened
    claim_elsewhere(path, "worker-2")  # a journal that was not there: fine ...
    assert opened(path)._index_opened
    os.unlink(_index.index_path_for(path))
    SessionManager.open(path)  # ... and is recorded when the index is written again
    salt = recorded(path)["salt"]  # type: ignore[index]
    os.unlink(jpath)
    claim_elsewhere(path, "worker-3")  # replaced by another journal (another salt)
    found = scan(jpath, None)
    assert found is not None and found.header is not None
    assert found.header.salt.hex() != salt
    assert not opened(path)._index_opened


def test_a_journal_compacted_past_the_position_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    realistic(path)
    claim_session(path, run_id="worker-1")
    SessionManager.open(path, index=True)
    for n in range(5):
        append_as_cotenant(path, note(n), writer="gateway")
    jpath = journal_path_for(path)
    with locked_journal(jpath, None) as fd:
        assert compact(fd, jpath, None, keep=2)  # the recorded record is dropped
    assert not opened(path)._index_opened
    assert opened(path)._index_opened  # the rebuilt index records the compacted journal


def _journaled_rewrite(path: Path, at: int) -> int:
    """A journaled writer cuts the transcript at ``at`` (a line start) and writes, as one
    journaled append, a line of the same length but other content; the rest of the old
    bytes follow (unjournaled) and one more line, so the file grows and every byte the
    index's own checks read (tail window, header, last block) is unchanged. Returns the
    journal record's start."""
    raw = path.read_bytes()
    old_line = raw[at : raw.index(b"\n", at) + 1]
    os.truncate(path, at)
    writer = claim_session(path, run_id="rewriter")
    manager = SessionManager.open(path, writer=writer, index=False)
    entry = {
        "type": "custom",
        "id": "facade01",
        "parentId": manager.leaf_id,
        "timestamp": "2026-12-05T00:00:00.000Z",
        "customType": "rewritten",
        "data": "",
    }
    entry["data"] = "x" * (len(old_line) - len(_jsonl.dumps_line(entry)))
    assert len(_jsonl.dumps_line(entry)) == len(old_line)
    size_before = os.path.getsize(path)
    manager.append_entry(entry)
    assert os.path.getsize(path) == at + len(old_line) == size_before + len(old_line)
    with open(path, "ab") as f:
        f.write(raw[at + len(old_line) :])
        f.write(json.dumps(note(99)).encode() + b"\n")
    return at


def test_a_journaled_rewrite_of_the_prefix_distrusts_the_index(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    realistic(path)
    claim_session(path, run_id="worker-1")
    SessionManager.open(path, index=True)
    size = _index.read_index(str(path)).size  # type: ignore[union-attr]
    raw = path.read_bytes()
    at = raw.index(b"\n", BLOCK // 3) + 1  # a line in block 0, far from the last block
    _journaled_rewrite(path, at)
    assert os.path.getsize(path) > size
    # The index's own proofs cannot see it (block 0 is not read when the file grew) ...
    assert file_checks_pass(path)
    # ... the journal does: a record after the recorded position starts below the size.
    found = scan(journal_path_for(path), None)
    assert found is not None and any(r.start < size for r in found.records)
    manager = opened(path)
    assert not manager._index_opened
    assert manager.get_entry("facade01") is not None  # the rewritten line, as it is now


def test_inspect_shows_the_index_and_its_journal_position(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sessionfence.cli import main

    path = tmp_path / "s.jsonl"
    realistic(path)
    assert main(["inspect", str(path)]) == 0  # no index yet: this open writes it
    out = capsys.readouterr().out
    assert "written by this open" in out
    assert "journal position: no journal when it was written" in out
    claim_session(path, run_id="worker-1")
    append_as_cotenant(path, note(1), writer="gateway")
    os.unlink(_index.index_path_for(path))
    SessionManager.open(path)  # the index, with the journal's position
    assert main(["inspect", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)["index"]
    found = scan(journal_path_for(path), None)
    assert found is not None and found.header is not None
    assert report["exists"] and report["used_by_open"] and report["journal_vouches"]
    assert report["size"] == os.path.getsize(path)
    assert report["journal"]["seq"] == found.position.seq == 2
    assert report["journal"]["salt"] == found.header.salt.hex()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "the open went through it" in out
    assert f"journal position: after record 2 of journal {found.header.salt.hex()[:12]}" in out
    assert "the records since vouch for the indexed prefix" in out
    # A journaled rewrite of the prefix: the open does not trust the index and rebuilds it.
    _journaled_rewrite(path, path.read_bytes().index(b"\n", BLOCK // 3) + 1)
    assert main(["inspect", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)["index"]
    assert report["found_before_open"] and not report["used_by_open"]
    assert report["journal_vouches"]  # the rebuilt one, at the journal's new position
    assert report["journal"]["seq"] > 2
