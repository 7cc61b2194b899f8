"""``sessionfence migrate FILE...`` (issue 11 item 1): the command line of
``migrate_transcript``, with the CLI's bad-input contract (one line, exit status 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sessionfence import SessionManager, acquire_session_write_lock
from sessionfence.cli import main

FIXTURES = Path(__file__).parents[1] / "fixtures" / "transcripts"


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    target = tmp_path / "old.jsonl"
    shutil.copyfile(FIXTURES / "pi_v1_session.jsonl", target)
    return target


def test_migrates_and_reports_the_backup(v1: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = v1.read_bytes()
    assert main(["migrate", str(v1)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{v1}: migrated v1 -> v3, 10 entries given ids"
    backup = out[1].removeprefix("  backup ")
    assert Path(backup).read_bytes() == raw
    m = SessionManager.open(v1)
    assert m.format_version == 3 and not m.needs_migration and len(m.branch()) == 10
    # again: nothing to do, exit 0
    assert main(["migrate", str(v1)]) == 0
    assert capsys.readouterr().out == f"{v1}: already version 3, nothing to do\n"


def test_dry_run_and_json(v1: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = v1.read_bytes()
    assert main(["migrate", "--dry-run", "--json", str(v1)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["changed"] and report["dry_run"] and report["backup"] is None
    assert (report["from_version"], report["to_version"], report["entries"]) == (1, 3, 10)
    assert v1.read_bytes() == raw


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("claude", "Claude Code log"),
        ("torn", "torn line"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, message: str
) -> None:
    path = tmp_path / "x.jsonl"
    if setup == "directory":
        path.mkdir()
    elif setup == "claude":
        shutil.copyfile(FIXTURES / "claude_code_log.jsonl", path)
    elif setup == "torn":
        path.write_bytes(b'{"type":"session","id":"s"}\n{"type":"mess')
    before = path.read_bytes() if path.is_file() else None
    assert main(["migrate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sessionfence migrate: error: ") and message in err
    assert err.count("\n") == 1
    if before is not None:
        assert path.read_bytes() == before


def test_a_held_lock_is_reported_after_the_timeout(
    v1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = v1.read_bytes()
    # held by another process: a subprocess runs the command while this process holds it
    with acquire_session_write_lock(v1, timeout=0):
        done = subprocess.run(
            [sys.executable, "-m", "sessionfence", "migrate", "--timeout", "0", str(v1)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert "could not take the session write lock" in done.stderr
    assert v1.read_bytes() == raw


def test_listed_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "migrate" in capsys.readouterr().out
