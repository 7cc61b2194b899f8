"""Reliability, bad input (SPEC §9): bad transcripts and bad lock files through the public API.

Each case gets a clear error or a documented verdict, within one attempt (never a wait
disguised as contention), and no byte that was there is lost or overwritten: every test
compares the files' bytes before and after. Transcripts also go through a real
``SessionFenceController(verify="full")`` release/reacquire: bad content that nobody
changed is not a takeover.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sessionfence import (
    NotASessionError,
    SessionTakeoverError,
    SessionWriteLockAcquireError,
    TornTranscriptError,
    acquire_session_write_lock,
)
from sessionfence.controller import SessionFenceController, reset_for_tests
from sessionfence.transcript import SessionManager

from ..lock.helpers import probe_held
from .helpers import open_fds

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="FIFOs, O_NOFOLLOW, /proc"),
    pytest.mark.timeout(60),
]

HEADER = (
    b'{"type":"session","version":3,"id":"h","timestamp":"2026-01-01T00:00:00.000Z","cwd":"/"}\n'
)
GOOD = b'{"type":"message","id":"g1","parentId":null,"message":{"role":"user","content":"hi"}}\n'
DEEP = b"[" * 100_000 + b"]" * 100_000 + b"\n"

# name -> (bytes, expected verdict of SessionManager.open)
TRANSCRIPTS: dict[str, tuple[bytes, dict[str, Any]]] = {
    "malformed_json_lines": (
        HEADER + b"{bad json\n" + GOOD + b"}{\n" + b'{"unterminated": "x\n',
        {"malformed": 3, "entries": 1, "torn": None},
    ),
    "json_but_not_objects": (
        HEADER + b'[1,2]\n"s"\n42\nnull\ntrue\n' + GOOD,
        {"malformed": 5, "entries": 1, "torn": None},
    ),
    "deep_nesting": (HEADER + DEEP + GOOD, {"malformed": 1, "entries": 1, "torn": None}),
    "nul_and_control_bytes": (
        HEADER + b"\x00\x01\x02\x1b[0m\n" + GOOD,
        {"malformed": 1, "entries": 1, "torn": None},
    ),
    "non_utf8_inside_a_string": (
        HEADER + b'{"type":"message","id":"u","parentId":null,"message":"\xff\xfe\xc3("}\n',
        {"malformed": 0, "invalid_utf8": 1, "entries": 1, "torn": None},
    ),
    "non_utf8_outside_json": (
        HEADER + b"\xff\xfe\xfd\n" + GOOD,
        {"malformed": 1, "entries": 1, "torn": None},
    ),
    "ends_mid_line": (HEADER + GOOD + b'{"type":"mess', {"entries": 1, "torn": (0, 13)}),
    "only_a_partial_line": (b'{"type":"sess', {"entries": 0, "torn": (0, 13), "header": None}),
    "header_is_not_a_session": (
        GOOD + GOOD.replace(b"g1", b"g2"),
        {"entries": 2, "header": None, "not_a_session": True},
    ),
    "second_header_later": (
        HEADER + GOOD + HEADER,
        {"entries": 2, "torn": None},  # kept as an entry, but not a tree node
    ),
    "blank_and_whitespace_lines": (
        HEADER + b"\n   \n\t\n" + GOOD + b"\r\n",
        {"malformed": 0, "entries": 1, "torn": None},
    ),
    "crlf_line_ends": (
        HEADER.replace(b"\n", b"\r\n") + GOOD.replace(b"\n", b"\r\n"),
        {"entries": 1},
    ),
    "bom_then_header": (b"\xef\xbb\xbf" + HEADER + GOOD, {"entries": 1, "malformed": 0}),
    "empty_file": (b"", {"entries": 0, "header": None, "torn": None}),
}


def _check_verdict(manager: SessionManager, data: bytes, expected: dict[str, Any]) -> None:
    assert len(manager.entries) == expected["entries"]
    if "malformed" in expected:
        assert manager.malformed_lines == expected["malformed"]
    if "invalid_utf8" in expected:
        assert manager.invalid_utf8_lines == expected["invalid_utf8"]
    if "header" in expected:
        assert manager.header == expected["header"]
    if "torn" in expected:
        torn = expected["torn"]
        if torn is None:
            assert manager.torn_tail is None
        else:
            # (0, n) in the table means "the last n bytes"
            assert manager.torn_tail == (len(data) - torn[1], torn[1])


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
def test_bad_transcript_verdict_and_nothing_lost(tmp_path: Path, name: str) -> None:
    data, expected = TRANSCRIPTS[name]
    path = tmp_path / "session.jsonl"
    path.write_bytes(data)
    fds = open_fds()
    manager = SessionManager.open(path)
    _check_verdict(manager, data, expected)
    assert path.read_bytes() == data, "opening changed the file"

    message = {"role": "user", "content": "appended after bad input"}
    if expected.get("not_a_session"):
        # another kind of JSONL file: refused whole, nothing written (issue 11)
        assert manager.not_a_session is not None
        with pytest.raises(NotASessionError):
            manager.append_message(message)
        assert path.read_bytes() == data
        assert open_fds() == fds
        return
    assert manager.not_a_session is None
    if manager.torn_tail is not None:
        # never glued onto the torn line; the repair keeps every byte, in the quarantine
        with pytest.raises(TornTranscriptError):
            manager.append_message(message)
        assert path.read_bytes() == data
        offset, _ = manager.torn_tail
        quarantine = manager.repair_torn_tail()
        assert quarantine is not None
        assert Path(quarantine).read_bytes() == data[offset:]
        assert path.read_bytes() == data[:offset]
        data = data[:offset]
    manager.append_message(message)
    after = path.read_bytes()
    if data:
        # the bad bytes stay exactly as they were, one whole line follows them
        assert after.startswith(data)
        added = after[len(data) :]
    else:
        # an empty file gets a session header and the line, as a new transcript does
        fresh = SessionManager.open(path)
        assert fresh.header is not None and fresh.header["type"] == "session"
        added = after[after.index(b"\n") + 1 :]
    assert added.endswith(b"\n") and added.count(b"\n") == 1
    assert SessionManager.open(path).entries[-1]["message"] == message
    assert open_fds() == fds


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
async def test_bad_transcript_is_no_takeover_when_nobody_changes_it(
    tmp_path: Path, name: str
) -> None:
    reset_for_tests()
    data = TRANSCRIPTS[name][0]
    path = tmp_path / "session.jsonl"
    path.write_bytes(data)
    ctl = await SessionFenceController.create(path, verify="full", timeout=5.0)
    try:
        await ctl.release_for_prompt()
        await ctl.reacquire_after_prompt()
        assert not ctl.has_takeover
    finally:
        await ctl.dispose()
    assert path.read_bytes() == data


async def test_bad_transcript_edited_while_released_is_a_takeover(tmp_path: Path) -> None:
    # The bad bytes do not blind the fence: a same-size edit inside them is still seen.
    reset_for_tests()
    data, _ = TRANSCRIPTS["non_utf8_inside_a_string"]
    path = tmp_path / "session.jsonl"
    path.write_bytes(data)
    ctl = await SessionFenceController.create(path, verify="full", timeout=5.0)
    try:
        await ctl.release_for_prompt()
        st = path.stat()
        edited = data.replace(b"\xff\xfe", b"\xfe\xff")
        with open(path, "r+b") as fh:
            fh.write(edited)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(SessionTakeoverError):
            await ctl.reacquire_after_prompt()
    finally:
        await ctl.dispose()


def test_directory_at_transcript_path_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "session.jsonl"
    path.mkdir()
    (path / "keep").write_bytes(b"x")
    with pytest.raises(IsADirectoryError):
        SessionManager.open(path)
    assert (path / "keep").read_bytes() == b"x"


def test_fifo_at_transcript_path_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    # Opening a FIFO for reading would block until a writer appears; the stat first
    # refuses anything that is not a regular file.
    path = tmp_path / "session.jsonl"
    os.mkfifo(path)
    fds = open_fds()
    with pytest.raises(OSError) as refused:
        SessionManager.open(path)
    assert refused.value.errno == errno.EINVAL
    assert open_fds() == fds


def test_missing_transcript_is_created_with_a_header(tmp_path: Path) -> None:
    path = tmp_path / "new" / "session.jsonl"
    manager = SessionManager.open(path)
    assert manager.header is None and manager.entries == []
    manager.append_message({"role": "user", "content": "first"})
    fresh = SessionManager.open(path)
    assert fresh.header is not None and len(fresh.entries) == 1


# -- bad lock files --------------------------------------------------------------------------


def _timed(call: Callable[[], Any]) -> tuple[BaseException | None, float]:
    began = time.monotonic()
    try:
        held = call()
    except BaseException as exc:
        return exc, time.monotonic() - began
    held.release()
    return None, time.monotonic() - began


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@pytest.fixture
def session(tmp_path: Path) -> Path:
    path = tmp_path / "session.jsonl"
    path.write_bytes(HEADER + GOOD)
    return path


def _refused_at_once(session: Path, expected: type[BaseException], err: int | None) -> None:
    error, seconds = _timed(lambda: acquire_session_write_lock(session, timeout=2.0))
    assert isinstance(error, expected), error
    assert not isinstance(error, SessionWriteLockAcquireError)  # not a timeout or stale
    if err is not None:
        assert isinstance(error, OSError) and error.errno == err
    assert seconds < 1.0, "a bad lock file must fail at once, not wait out the timeout"
    assert session.read_bytes() == HEADER + GOOD


def test_lock_path_symlink_is_refused_and_its_target_untouched(
    session: Path, tmp_path: Path
) -> None:
    target = tmp_path / "precious.jsonl"
    target.write_bytes(HEADER + GOOD * 5)
    _lock_path(session).symlink_to(target)
    fds = open_fds()
    _refused_at_once(session, OSError, errno.ELOOP)
    assert target.read_bytes() == HEADER + GOOD * 5
    assert open_fds() == fds


def test_dangling_lock_symlink_is_refused_and_nothing_created(
    session: Path, tmp_path: Path
) -> None:
    _lock_path(session).symlink_to(tmp_path / "nowhere")
    _refused_at_once(session, OSError, errno.ELOOP)
    assert not (tmp_path / "nowhere").exists()


def test_directory_at_lock_path_is_a_clear_error(session: Path) -> None:
    lock_dir = _lock_path(session)
    lock_dir.mkdir()
    (lock_dir / "keep").write_bytes(b"x")
    _refused_at_once(session, IsADirectoryError, errno.EISDIR)
    assert (lock_dir / "keep").read_bytes() == b"x"


def test_fifo_at_lock_path_fails_at_once_without_hanging(session: Path) -> None:
    os.mkfifo(_lock_path(session))
    fds = open_fds()
    _refused_at_once(session, OSError, errno.EINVAL)
    assert open_fds() == fds


@pytest.mark.parametrize(
    "garbage",
    [b"", b"{", b"\xff\xfe\x00garbage", b'{"pid": "x", "generation": -5}', b"\x00" * (2 << 20)],
    ids=["empty", "brace", "binary", "wrong-types", "2MiB-of-NUL"],
)
def test_garbage_lock_file_is_taken_over_when_nobody_holds_it(
    session: Path, garbage: bytes
) -> None:
    # Documented verdict: the lock file is the lock's own; with no flock on it, garbage is a
    # crashed writer's leftover, so the acquirer takes it and writes a fresh record.
    lock_path = _lock_path(session)
    lock_path.write_bytes(garbage)
    held = acquire_session_write_lock(session, timeout=0)
    try:
        assert probe_held(str(lock_path))
        assert held.generation >= 1
        assert lock_path.stat().st_size < 4096
    finally:
        held.release()
    assert session.read_bytes() == HEADER + GOOD


def test_lock_path_hard_linked_to_a_transcript_does_not_overwrite_it(
    session: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.jsonl"
    content = HEADER + GOOD * 20
    other.write_bytes(content)
    os.link(other, _lock_path(session))
    error, _ = _timed(lambda: acquire_session_write_lock(session, timeout=0.5))
    assert other.read_bytes() == content, f"the linked transcript was overwritten ({error})"
    assert isinstance(error, OSError) and "hard links" in str(error)


def test_lock_file_in_a_missing_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "later" / "session.jsonl"
    held = acquire_session_write_lock(path, timeout=0)
    held.release()
    assert _lock_path(path).exists()


def test_bad_lock_file_does_not_hang_the_controller(session: Path) -> None:
    # Through the controller the same lock errors surface as themselves, not a hang.
    os.mkfifo(_lock_path(session))

    async def run() -> None:
        await SessionFenceController.create(session, verify="full", timeout=2.0)

    reset_for_tests()
    began = time.monotonic()
    with pytest.raises(OSError):
        asyncio.run(run())
    assert time.monotonic() - began < 1.0
    assert session.read_bytes() == HEADER + GOOD
