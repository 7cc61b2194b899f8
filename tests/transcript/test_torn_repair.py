"""``repair_torn_tail()`` against concurrent appenders and failing disks (issue 10 item 6).

Faults are injected as in ``test_reliability_faults.py``: the ``os`` module one sessionfence
module sees is swapped for a proxy, so only the code under test meets the fault; the files
are real. The concurrent appenders are real forked processes that follow the write-lock
protocol.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sessionfence
from sessionfence import SessionManager, _util, acquire_session_write_lock
from sessionfence.transcript import _io as tio
from sessionfence.transcript import _manager as transcript_module

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork and POSIX faults")

HEADER = (
    b'{"type":"session","version":3,"id":"r","timestamp":"2026-01-01T00:00:00.000Z","cwd":"/"}\n'
)
BASE = HEADER + b'{"type":"custom","id":"e1","parentId":null,"customType":"x"}\n'
TORN = b'{"type":"custom","id":"torn","parentId":"e1","customType":"x","da'
WAIT = 60.0


class FaultyOS:
    """``os`` as one module sees it, with some functions replaced."""

    def __init__(self, **replaced: Callable[..., Any]) -> None:
        self._replaced = replaced

    def __getattr__(self, name: str) -> Any:
        return self._replaced.get(name) or getattr(os, name)


def quarantines(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.torn-*"))


# --------------------------------------------------------------------------------------
# A failing quarantine write leaves no copy, and the transcript uncut
# --------------------------------------------------------------------------------------


def _failing(site: str, kind: str, at: int) -> dict[str, Callable[..., Any]]:
    calls = {"n": 0}
    real = getattr(os, site)

    def call(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] < at:
            return real(*args)
        if kind == "short" and calls["n"] == at:
            fd, data = args
            return real(fd, bytes(data)[: max(1, len(data) // 2)])
        if site == "close":
            real(*args)  # Linux frees the descriptor even when close reports an error
        code = errno.EIO if kind == "EIO" else errno.ENOSPC
        raise OSError(code, os.strerror(code))

    return {site: call}


@pytest.mark.parametrize(
    ("site", "kind", "at"),
    [
        ("write", "ENOSPC", 1),  # a full disk: the copy would be an empty file
        ("write", "short", 1),  # half written, then the disk is full: a partial copy
        ("write", "EIO", 1),
        ("fsync", "EIO", 1),  # written, but not known to be on disk
        ("close", "EIO", 1),
    ],
)
def test_a_failing_quarantine_write_leaves_no_partial_copy_and_cuts_nothing(
    tmp_path: Path, site: str, kind: str, at: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(BASE + TORN)
    m = SessionManager.open(path)
    faulty = FaultyOS(**_failing(site, kind, at))
    monkeypatch.setattr(tio, "os", faulty)
    monkeypatch.setattr(_util, "os", faulty)  # the shared write_all / fsync_dir
    with pytest.raises(OSError) as info:
        m.repair_torn_tail()
    monkeypatch.undo()
    assert info.value.errno in (errno.ENOSPC, errno.EIO)
    assert path.read_bytes() == BASE + TORN  # not truncated: the torn bytes are still here
    assert quarantines(tmp_path) == []  # and no empty or partial .torn-* file
    assert m.torn_tail == (len(BASE), len(TORN))
    # with the disk back, the repair goes through
    q = m.repair_torn_tail()
    assert q is not None and Path(q).read_bytes() == TORN and path.read_bytes() == BASE


def test_a_failing_truncate_keeps_the_copy_only_if_the_file_may_be_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(BASE + TORN)
    m = SessionManager.open(path)
    monkeypatch.setattr(transcript_module, "os", FaultyOS(**_failing("ftruncate", "EIO", 1)))
    with pytest.raises(OSError):
        m.repair_torn_tail()
    monkeypatch.undo()
    # the truncate did not happen: the transcript still holds the bytes, the copy is gone
    assert path.read_bytes() == BASE + TORN and quarantines(tmp_path) == []


# --------------------------------------------------------------------------------------
# An append racing with the truncate
# --------------------------------------------------------------------------------------


def _appender(path: Path, go: int, report: int, line: bytes) -> None:
    """Forked child: on "go", append ``line`` under the write lock, openclaw-style (a
    separating newline first when the file does not end in one). Reports "A" when it
    appended at once, "B" when the lock was busy (it then waits for it), then "D"."""
    try:
        os.read(go, 1)
        try:
            lock = acquire_session_write_lock(path, timeout=0)
            busy = False
        except sessionfence.SessionWriteLockTimeoutError:
            os.write(report, b"B")
            lock = acquire_session_write_lock(path, timeout=WAIT)
            busy = True
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        size = os.fstat(fd).st_size
        separator = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
        os.write(fd, separator + line)
        os.close(fd)
        lock.release()
        if not busy:
            os.write(report, b"A")
        os.write(report, b"D")
    finally:
        os._exit(0)


def test_an_append_landing_at_the_truncate_point_is_never_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The appender is released exactly between the repair's last size check and its
    ``ftruncate``: without the write lock its line would be cut off and would be in no
    quarantine copy either. Under the lock it waits, and lands after the repair."""
    path = tmp_path / "s.jsonl"
    path.write_bytes(BASE + TORN)
    line = b'{"type":"custom","id":"late","parentId":"e1","customType":"appended"}\n'
    go_r, go_w = os.pipe()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the appender
        _appender(path, go_r, report_w, line)
    os.close(go_r)
    os.close(report_w)
    heard: list[bytes] = []
    real_ftruncate = os.ftruncate

    def ftruncate_after_an_append(fd: int, length: int) -> None:
        os.write(go_w, b"g")
        heard.append(os.read(report_r, 1))  # "A": it appended; "B": the lock kept it out
        real_ftruncate(fd, length)

    try:
        monkeypatch.setattr(transcript_module, "os", FaultyOS(ftruncate=ftruncate_after_an_append))
        m = SessionManager.open(path)
        quarantine = m.repair_torn_tail()
        monkeypatch.undo()
        rest = b""
        while chunk := os.read(report_r, 16):
            rest += chunk
    finally:
        os.close(go_w)
        _, status = os.waitpid(pid, 0)
        os.close(report_r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert quarantine is not None and Path(quarantine).read_bytes() == TORN
    data = path.read_bytes()
    assert line in data, f"the appended line was lost (appender said {heard})"
    assert heard == [b"B"] and rest == b"D"
    assert data == BASE + line  # after the repair: no separator needed any more
    assert SessionManager.open(path).leaf_id == "late"


def test_repair_waits_for_a_lock_held_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(BASE + TORN)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the holder
        try:
            acquire_session_write_lock(path, timeout=WAIT)
            os.write(ready_w, b"L")
            signal.pause()
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"L"
        m = SessionManager.open(path)
        with pytest.raises(sessionfence.SessionWriteLockTimeoutError):
            m.repair_torn_tail(lock_timeout=0)
        assert path.read_bytes() == BASE + TORN and quarantines(tmp_path) == []
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)
    assert m.repair_torn_tail(lock_timeout=WAIT) is not None
    assert path.read_bytes() == BASE


def test_repair_under_a_lock_this_process_holds_does_not_wait_for_itself(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(BASE + TORN)
    with acquire_session_write_lock(path, timeout=0):
        q = SessionManager.open(path).repair_torn_tail(lock_timeout=0)
    assert q is not None and path.read_bytes() == BASE


# --------------------------------------------------------------------------------------
# A real concurrent appender, many repairs
# --------------------------------------------------------------------------------------


def _steady_appender(path: Path, stop: int, acks: int) -> None:
    """Forked child: appends under the lock until ``stop`` is readable, acknowledging each
    id it wrote; a torn tail makes it skip that round (SessionManager refuses)."""
    try:
        os.set_blocking(stop, False)
        seq = 0
        while True:
            try:
                if os.read(stop, 1) is not None:
                    break
            except BlockingIOError:
                pass
            with acquire_session_write_lock(path, timeout=WAIT):
                manager = SessionManager.open(path)
                try:
                    ident = manager.append_custom("appender", {"seq": seq})
                except sessionfence.TornTranscriptError:
                    ident = None
            if ident is not None:
                os.write(acks, ident.encode() + b"\n")
            seq += 1
            # Leave the lock free most of the time: a contender polls every 50 ms, and an
            # appender that re-locks at once would starve it on a loaded machine.
            time.sleep(0.005)
    finally:
        os._exit(0)


def test_repairs_racing_a_real_appender_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(BASE)
    stop_r, stop_w = os.pipe()
    acks_r, acks_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the appender
        os.close(stop_w)
        os.close(acks_r)
        _steady_appender(path, stop_r, acks_w)
    os.close(stop_r)
    os.close(acks_w)
    injected: list[bytes] = []
    copies: list[str] = []
    try:
        for round_ in range(12):  # each repair waits out the torn-tail settle time
            torn = b'{"type":"custom","id":"torn%d","parentId":null,"da' % round_
            # a writer dying mid-line, under the lock as any writer
            with acquire_session_write_lock(path, timeout=WAIT), open(path, "ab") as f:
                f.write(torn)
            injected.append(torn)
            quarantine = SessionManager.open(path).repair_torn_tail(lock_timeout=WAIT)
            if quarantine is not None:
                copies.append(quarantine)
    finally:
        os.write(stop_w, b"s")
        os.close(stop_w)
        _, status = os.waitpid(pid, 0)
        acked = b""
        while chunk := os.read(acks_r, 65536):
            acked += chunk
        os.close(acks_r)
    assert os.waitstatus_to_exitcode(status) == 0
    final = SessionManager.open(path)
    assert final.torn_tail is None and final.malformed_lines == 0
    present = [e.get("id") for e in final.entries]
    ids = acked.decode().split()
    assert ids, "the appender never got a line in"
    assert all(present.count(i) == 1 for i in ids), "an acknowledged line was lost or doubled"
    # every torn line went to exactly one quarantine copy, byte for byte
    assert sorted(Path(q).read_bytes() for q in copies) == sorted(injected)
    assert b"torn" not in path.read_bytes()
