"""``sessionfence inspect`` and the CLI's bad-input contract (SPEC §7)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sessionfence import SessionManager, acquire_session_write_lock, fingerprint
from sessionfence.cli import main


@pytest.fixture
def session(tmp_path: Path) -> Path:
    path = tmp_path / "s.jsonl"
    manager = SessionManager.open(path)
    manager.append_message({"role": "user", "content": "hi"})
    manager.append_message({"role": "assistant", "content": "hello"})
    return path


def test_json_report(session: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(session)]) == 0
    report = json.loads(capsys.readouterr().out)
    fp = fingerprint(session)
    assert report["fingerprint"]["size"] == fp.size
    assert report["fingerprint"]["ino"] == fp.ino
    assert int(report["fingerprint"]["tail_hash"], 16) == fp.tail_hash
    assert report["lock"]["held"] is False
    assert report["transcript"]["entries"] == 2
    assert report["transcript"]["last_entry"]["message"]["content"] == "hello"
    assert report["transcript"]["torn_tail"] is None


def test_shows_the_lock_holder_and_a_torn_tail(
    session: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with open(session, "ab") as f:
        f.write(b'{"type":"message","id":"dead')
    with acquire_session_write_lock(session):
        assert main(["inspect", str(session)]) == 0
    out = capsys.readouterr().out
    assert "lock         held by pid=" in out
    assert "torn tail of 28 bytes" in out
    assert "2 entries" in out


def test_shows_the_claim_and_what_is_wrong_with_the_journal(
    session: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sessionfence import append_as_cotenant, claim_session, journal_path_for

    assert main(["inspect", str(session)]) == 0
    assert "journal      none" in capsys.readouterr().out
    claim_session(session, run_id="worker-7")
    claim_session(session, run_id="worker-8")
    append_as_cotenant(session, {"type": "custom", "customType": "note"}, writer="gateway")
    assert main(["inspect", "--json", str(session)]) == 0
    journal = json.loads(capsys.readouterr().out)["journal"]
    assert journal["claim"] == {"run_id": "worker-8", "revision": 2}
    assert journal["records"] == {"claim": 2, "append": 1}
    assert journal["covered_end"] == session.stat().st_size and journal["problem"] is None
    assert main(["inspect", str(session)]) == 0
    assert "claim        run worker-8 revision 2" in capsys.readouterr().out
    raw = bytearray(Path(journal_path_for(session)).read_bytes())
    raw[-100] ^= 1  # edit the last record
    Path(journal_path_for(session)).write_bytes(bytes(raw))
    assert main(["inspect", str(session)]) == 0
    assert "journal      PROBLEM: journal record 3: record CRC mismatch" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "{dir}/missing.jsonl"], "no such file"),
        (["inspect", "{dir}"], "is a directory"),
        (["inspect", "{dir}/garbage.txt"], "not a transcript"),
        (["inspect", "{dir}/s.jsonl", "--window", "-1"], "--window must be between"),
        (["inspect", "{dir}/s.jsonl", "--window", "many"], "invalid int value"),
        (["no-such-command"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(session: Path, args: list[str], message: str) -> None:
    (session.parent / "garbage.txt").write_text("not json\n")
    argv = [a.format(dir=session.parent) for a in args]
    out = subprocess.run(
        [sys.executable, "-m", "sessionfence", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert message in lines[0]


def test_closed_pipe_is_not_a_traceback(session: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sessionfence", "inspect", "--json", *[str(session)] * 200],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err
