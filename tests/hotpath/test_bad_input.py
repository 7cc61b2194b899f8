"""Bad input gets a clear error on both backends, never a crash or a silent answer."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

from sessionfence import MISSING


@pytest.mark.parametrize("window", [-1, (1 << 20) + 1, -(1 << 70)])
def test_window_out_of_range(impl: ModuleType, tmp_path: Path, window: int) -> None:
    path = tmp_path / "t"
    path.write_bytes(b"x")
    for call in (
        lambda: impl.fingerprint(path, window=window),
        lambda: impl.fingerprint_many([path], window=window),
        lambda: impl.check_append(path, MISSING, window=window),
    ):
        with pytest.raises(ValueError, match="window must be between 0 and 1048576"):
            call()


@pytest.mark.parametrize("window", [1.5, "4096", None, True])
def test_window_wrong_type(impl: ModuleType, tmp_path: Path, window: object) -> None:
    with pytest.raises(TypeError, match="window must be an int"):
        impl.fingerprint(tmp_path, window=window)


def test_directory(impl: ModuleType, tmp_path: Path) -> None:
    for call in (
        lambda: impl.fingerprint(tmp_path),
        lambda: impl.check_append(tmp_path, MISSING),
        lambda: impl.read_range(tmp_path, 0, 0),
        lambda: impl.content_digest(tmp_path),
    ):
        with pytest.raises(IsADirectoryError) as info:
            call()
        assert info.value.errno == errno.EISDIR
        assert str(tmp_path) in str(info.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_not_a_regular_file_and_does_not_block(impl: ModuleType, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as info:
        impl.fingerprint(fifo)
    assert info.value.errno == errno.EINVAL


def test_symlink_loop(impl: ModuleType, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(OSError) as info:
        impl.fingerprint(a)
    assert info.value.errno == errno.ELOOP


def test_embedded_nul(impl: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="null"):
        impl.fingerprint(str(tmp_path / "a\0b"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop privileges")
def test_permission_denied(impl: ModuleType) -> None:
    """A forked child drops to an unprivileged user (root bypasses permission bits); no exec,
    so the interpreter's own location does not matter."""
    tmp = Path(tempfile.mkdtemp(prefix="sf-perm-", dir=tempfile.gettempdir()))
    try:
        tmp.chmod(0o755)
        path = tmp / "secret.jsonl"
        path.write_bytes(b"x\n")
        path.chmod(0o600)
        if os.geteuid() != 0 and os.access(path, os.R_OK):
            pytest.skip("cannot make a file unreadable for this user")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: report what the backend raised, then leave without cleanup
            try:
                os.close(read_end)
                if os.geteuid() == 0:
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                try:
                    impl.fingerprint(path)
                    verdict = "no error"
                except PermissionError as exc:
                    verdict = f"denied {exc.errno} {exc.filename}"
                except BaseException as exc:
                    verdict = f"other {exc!r}"
                os.write(write_end, verdict.encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            verdict = pipe.read().decode()
        os.waitpid(pid, 0)
        assert verdict == f"denied {errno.EACCES} {path}"
    finally:
        shutil.rmtree(tmp)
