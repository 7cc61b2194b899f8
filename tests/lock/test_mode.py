"""``mode=``: the permission bits of a lock file the acquisition creates (issue 12).

The default stays ``0o600``. A created lock file gets exactly the requested mode whatever
the umask (it is widened with ``fchmod``), an existing one keeps its mode, and with
``0o660`` processes of two users of one group share a session's lock, checked with real
users (as root) in forked children.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sessionfence import acquire_session_write_lock, acquire_session_write_lock_async
from sessionfence.lock import _os as lock_os

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits"),
    pytest.mark.timeout(60),
]


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for the test; restored afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    try:
        yield lambda value: os.umask(value) and None
    finally:
        os.umask(saved)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077], ids=oct)
def test_default_mode_is_0600_whatever_the_umask(
    tmp_path: Path, umask: Callable[[int], None], mask: int
) -> None:
    umask(mask)
    with acquire_session_write_lock(tmp_path / "s.jsonl") as held:
        assert _mode(held.lock_path) == 0o600


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077], ids=oct)
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o660, 0o666], ids=oct)
def test_created_lock_file_gets_exactly_the_mode(
    tmp_path: Path, umask: Callable[[int], None], mask: int, mode: int
) -> None:
    umask(mask)
    with acquire_session_write_lock(tmp_path / "s.jsonl", mode=mode) as held:
        assert _mode(held.lock_path) == mode


async def test_async_acquisition_takes_the_mode_too(
    tmp_path: Path, umask: Callable[[int], None]
) -> None:
    umask(0o077)
    held = await acquire_session_write_lock_async(tmp_path / "s.jsonl", mode=0o660)
    async with held:
        assert _mode(held.lock_path) == 0o660


def test_existing_lock_file_keeps_its_mode(tmp_path: Path) -> None:
    lock_path = tmp_path / "s.jsonl.lock"
    lock_path.touch()
    lock_path.chmod(0o644)
    with acquire_session_write_lock(tmp_path / "s.jsonl", mode=0o660) as held:
        assert held.held
    assert _mode(lock_path) == 0o644
    with acquire_session_write_lock(tmp_path / "s.jsonl", mode=0o600):
        pass
    assert _mode(lock_path) == 0o644


def test_mode_in_a_folder_the_acquisition_creates(
    tmp_path: Path, umask: Callable[[int], None]
) -> None:
    umask(0o077)
    with acquire_session_write_lock(tmp_path / "new" / "s.jsonl", mode=0o660) as held:
        assert _mode(held.lock_path) == 0o660


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("660", TypeError),
        (0o660 * 1.0, TypeError),
        (True, TypeError),
        (None, TypeError),
        (-1, ValueError),
        (0o1660, ValueError),  # sticky bit: not permission bits
        (0o4600, ValueError),  # setuid
        (0o400, ValueError),  # no owner write: the lock could not be reopened
        (0o060, ValueError),
    ],
)
def test_bad_mode_is_refused_before_anything_is_created(
    tmp_path: Path, mode: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="mode must be"):
        acquire_session_write_lock(tmp_path / "s.jsonl", mode=mode)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# -- two users of one group (real users: needs root) ------------------------------------------

ALICE, BOB, FLEET = 4201, 4202, 4242  # uids and the shared gid; no names needed

as_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="switching users needs root"
)


def _as_user(uid: int, action: Callable[[], object]) -> str:
    """Run ``action`` in a forked child running as ``uid`` (group FLEET, umask 022); return
    ``"ok <result>"`` or ``"<ExceptionName>: <message>"``."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # 3.12+ warns about fork() in a threaded process (the lock watchdog is a thread).
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(FLEET)
            os.setuid(uid)
            os.umask(0o022)
            outcome = f"ok {action()}"
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        os.write(write_end, outcome.encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.fixture
def sessions() -> Iterator[Path]:
    """A sessions folder of group FLEET, setgid so files created in it get that group."""
    top = Path(tempfile.mkdtemp(prefix="sessionfence-users-"))
    try:
        top.chmod(0o755)
        folder = top / "sessions"
        folder.mkdir()
        os.chown(folder, 0, FLEET)
        folder.chmod(0o2770)
        yield folder
    finally:
        for child in sorted(top.rglob("*"), reverse=True):
            child.unlink() if not child.is_dir() else child.rmdir()
        top.rmdir()


def _take_and_release(path: Path, **options: object) -> Callable[[], object]:
    def action() -> object:
        settings = {"timeout": 10.0, **options}
        with acquire_session_write_lock(path, **settings) as held:  # type: ignore[arg-type]
            return held.generation

    return action


@as_root
def test_group_shared_lock_file_for_a_multi_user_fleet(sessions: Path) -> None:
    path = sessions / "s.jsonl"
    assert _as_user(ALICE, _take_and_release(path, mode=0o660)) == "ok 1"
    lock = os.stat(str(path) + ".lock")
    assert (stat.S_IMODE(lock.st_mode), lock.st_uid, lock.st_gid) == (0o660, ALICE, FLEET)
    # Bob, of the same group, opens Alice's lock file for writing and takes the lock.
    assert _as_user(BOB, _take_and_release(path)) == "ok 2"
    assert _as_user(ALICE, _take_and_release(path)) == "ok 3"


@as_root
def test_shared_lock_file_in_a_sticky_world_writable_folder(sessions: Path) -> None:
    # /tmp-like: where fs.protected_regular is on, the kernel refuses O_CREAT on another
    # user's file there, so an existing lock file is opened without it.
    sessions.chmod(0o1777)
    path = sessions / "s.jsonl"
    assert _as_user(ALICE, _take_and_release(path, mode=0o660)) == "ok 1"
    assert _as_user(BOB, _take_and_release(path, mode=0o660)) == "ok 2"
    assert _mode(str(path) + ".lock") == 0o660


@as_root
def test_default_mode_keeps_other_users_out(sessions: Path) -> None:
    path = sessions / "private.jsonl"
    assert _as_user(ALICE, _take_and_release(path)) == "ok 1"
    assert _mode(str(path) + ".lock") == 0o600
    assert _as_user(BOB, _take_and_release(path)).startswith("PermissionError: ")


@as_root
def test_contender_waits_out_the_instant_before_the_creators_fchmod(sessions: Path) -> None:
    # Alice created the lock file with her umask's mode and has not widened it to 0o660
    # yet. Bob's PermissionError on it is retried at his next poll, not raised...
    path = sessions / "s.jsonl"
    lock_path = Path(str(path) + ".lock")
    lock_path.touch(mode=0o600)
    os.chown(lock_path, ALICE, FLEET)
    lock_path.chmod(0o600)
    widen_r, widen_w = os.pipe()

    def bob() -> object:
        real = lock_os.recently_created_by_another_user
        lock_os.CREATION_GRACE_NS = 30 * 10**9  # no dependence on how fast this runs

        def seen(lock_path: str) -> bool:
            fresh = real(lock_path)
            if fresh and not told:
                os.write(widen_w, b"x")  # tell the parent "I saw it and will poll again"
                told.append(True)
            return fresh

        told: list[bool] = []

        lock_os.recently_created_by_another_user = seen  # type: ignore[assignment]
        return _take_and_release(path)()

    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(FLEET)
            os.setuid(BOB)
            outcome = f"ok {bob()}"
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        os.write(write_end, outcome.encode())
        os._exit(0)
    os.close(write_end)
    os.close(widen_w)
    assert os.read(widen_r, 1) == b"x"  # Bob hit the PermissionError and polls
    lock_path.chmod(0o660)  # ...Alice's fchmod lands
    result = os.read(read_end, 65536).decode()
    os.waitpid(pid, 0)
    os.close(read_end)
    os.close(widen_r)
    assert result == "ok 1"


@as_root
def test_another_users_unreadable_lock_file_is_reported_at_once(sessions: Path) -> None:
    # ...but once the instant is over, a lock file Bob may not open is a permission
    # problem, reported at once (not after the 30 s timeout).
    path = sessions / "s.jsonl"
    lock_path = Path(str(path) + ".lock")
    lock_path.touch(mode=0o600)
    os.chown(lock_path, ALICE, FLEET)

    def bob() -> object:
        lock_os.CREATION_GRACE_NS = 0
        return _take_and_release(path, timeout=math.inf)()

    outcome = _as_user(BOB, bob)
    assert outcome.startswith("PermissionError: "), outcome
    assert f"[Errno {errno.EACCES}]" in outcome
