"""``sessionfence inspect`` with bad arguments among good ones (issue 10).

Every bad argument (missing, directory, FIFO, unreadable, not a transcript, a bad lock
path) gets one ``sessionfence inspect: error: ...`` line on stderr, every good one is still
reported, and the exit status is 2 when any argument was bad. Nothing hangs: each run has a
deadline, and a run past it fails the test instead of blocking it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionfence import SessionManager
from sessionfence.cli import main as cli_main

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX files (FIFOs, permissions)"),
    pytest.mark.timeout(180),
]

DEADLINE = 60.0  # generous: a correct run takes well under a second
PREFIX = "sessionfence inspect: error: "


def _transcript(path: Path, text: str) -> Path:
    manager = SessionManager.open(path)
    manager.append_message({"role": "user", "content": text})
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "sessionfence", *argv],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"sessionfence {' '.join(argv)} hung (killed after {DEADLINE}s): {exc}")


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert all(line.startswith(PREFIX) for line in lines), stderr
    return lines


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    good = _transcript(tmp_path / "good.jsonl", "first")
    also = _transcript(tmp_path / "also.jsonl", "second")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    directory = tmp_path / "dir.jsonl"
    directory.mkdir()
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"not json\n")
    badlock = _transcript(tmp_path / "badlock.jsonl", "third")
    os.symlink(tmp_path / "elsewhere", str(badlock) + ".lock")
    return {
        "good": good,
        "also": also,
        "fifo": fifo,
        "dir": directory,
        "missing": tmp_path / "missing.jsonl",
        "garbage": garbage,
        "badlock": badlock,
    }


def test_fifo_does_not_hang(files: dict[str, Path]) -> None:
    out = _run(["inspect", str(files["fifo"])])
    assert out.returncode == 2
    assert out.stdout == ""
    [line] = _error_lines(out.stderr)
    assert "not a regular file" in line and str(files["fifo"]) in line


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("fifo", "not a regular file"),
        ("dir", "is a directory"),
        ("missing", "no such file"),
        ("garbage", "not a transcript"),
        ("badlock", "lock"),
    ],
)
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_one_bad_argument_does_not_hide_the_good_ones(
    files: dict[str, Path], bad: str, message: str, as_json: bool
) -> None:
    argv = ["inspect", *(["--json"] if as_json else [])]
    argv += [str(files["good"]), str(files[bad]), str(files["also"])]
    out = _run(argv)
    assert out.returncode == 2
    [line] = _error_lines(out.stderr)
    assert message in line and str(files[bad]) in line
    if as_json:
        reports = [json.loads(text) for text in out.stdout.splitlines()]
        assert [r["file"] for r in reports] == [str(files["good"]), str(files["also"])]
        assert [r["transcript"]["entries"] for r in reports] == [1, 1]
    else:
        names = [line for line in out.stdout.splitlines() if not line.startswith(" ")]
        assert names == [str(files["good"]), str(files["also"])]


def test_every_bad_argument_gets_its_own_line(files: dict[str, Path]) -> None:
    bad = ["fifo", "dir", "missing", "garbage", "badlock"]
    out = _run(["inspect", "--json", str(files["good"]), *(str(files[b]) for b in bad)])
    assert out.returncode == 2
    lines = _error_lines(out.stderr)
    assert len(lines) == len(bad)
    for name, line in zip(bad, lines, strict=True):
        assert str(files[name]) in line
    assert [json.loads(t)["file"] for t in out.stdout.splitlines()] == [str(files["good"])]


def test_all_good_is_exit_0(files: dict[str, Path]) -> None:
    out = _run(["inspect", str(files["good"]), str(files["also"])])
    assert out.returncode == 0 and out.stderr == ""


# --- unreadable files -----------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can enter (pytest's tmp_path is private to its user)."""
    base = Path(tempfile.mkdtemp(prefix="sf-inspect-"))
    try:
        base.chmod(0o755)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _cli_as_nobody(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in a forked child that dropped root's privileges to nobody.

    A subprocess cannot be used: the interpreter lives where nobody may not read. The
    child reuses the parent's already imported modules; the parent warms them up first.
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 99
        try:
            os.close(out_r)
            os.close(err_r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            sys.stdout = io.TextIOWrapper(os.fdopen(out_w, "wb"), encoding="utf-8")
            sys.stderr = io.TextIOWrapper(os.fdopen(err_w, "wb"), encoding="utf-8")
            code = cli_main(argv)
        except BaseException:
            # What the real command would show for an uncaught error: a traceback.
            traceback.print_exc(file=sys.stderr)
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(BaseException):
                    stream.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    deadline = time.monotonic() + DEADLINE
    status = None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"sessionfence {' '.join(argv)} hung as nobody")
        else:
            time.sleep(0.01)
    with os.fdopen(out_r, "rb") as fh:
        stdout = fh.read().decode()
    with os.fdopen(err_r, "rb") as fh:
        stderr = fh.read().decode()
    return os.waitstatus_to_exitcode(status), stdout, stderr


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_unreadable_file_is_one_line_and_the_rest_is_reported(
    shared_dir: Path, as_json: bool
) -> None:
    good = _transcript(shared_dir / "good.jsonl", "readable")
    secret = _transcript(shared_dir / "secret.jsonl", "private")
    good.chmod(0o644)
    flags = ["--json"] if as_json else []
    argv = ["inspect", *flags, str(secret), str(good)]
    if os.geteuid() == 0:
        secret.chmod(0o600)  # root's, so nobody may not read it
        # Warm up every module inspect imports, so the child never reads the interpreter's
        # files (private to root) after dropping privileges.
        assert cli_main(["inspect", *flags, str(good)]) == 0
        code, stdout, stderr = _cli_as_nobody(argv)
    else:
        secret.chmod(0o000)
        done = _run(argv)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    assert code == 2, stderr
    [line] = _error_lines(stderr)
    assert "permission denied" in line and str(secret) in line
    if as_json:
        assert [json.loads(t)["file"] for t in stdout.splitlines()] == [str(good)]
    else:
        assert stdout.splitlines()[0] == str(good)
        assert "1 entries" in stdout
