"""Filesystems whose timestamps are coarser than the writes, for the racy-stat tests.

This machine's kernel stamps ext4 and tmpfs with fine-grained times, which hides same-tick
races; most production kernels do not. ``ramfs`` stamps in jiffies (the coarse clock), and
an ext2 image with 128-byte inodes stores whole seconds. Mounting needs root; without it
the fixtures skip and say why (CI runs as root, so there they always run).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SKIP_REASON = "mounting a coarse-timestamp filesystem (ramfs, ext2 loop image) needs root"


_SBIN = "/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"


def _tool(name: str) -> str | None:
    """``name`` on PATH, or in the sbin folders a non-login root shell may lack."""
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and _tool("mount") is not None


def _run(*argv: str) -> None:
    tool = _tool(argv[0])
    if tool is None:
        raise RuntimeError(f"{argv[0]} is missing (CI installs e2fsprogs and mount)")
    subprocess.run([tool, *argv[1:]], check=True, capture_output=True, timeout=60)


def _umount(mnt: str) -> None:
    umount = _tool("umount") or "umount"
    for _ in range(50):
        done = subprocess.run([umount, mnt], capture_output=True, timeout=60)
        if done.returncode == 0:
            return
        time.sleep(0.1)  # a child that had the mount as its cwd may still be exiting
    subprocess.run([umount, "-l", mnt], capture_output=True, timeout=60)


@contextlib.contextmanager
def ramfs() -> Iterator[Path]:
    """A fresh ramfs mount: jiffy timestamps, no size limit (and no free-space figure)."""
    if not can_mount():
        pytest.skip(SKIP_REASON)
    mnt = tempfile.mkdtemp(prefix="sf-ramfs-")
    try:
        _run("mount", "-t", "ramfs", "-o", "mode=0755", "ramfs", mnt)
    except (OSError, subprocess.CalledProcessError) as exc:
        os.rmdir(mnt)
        raise RuntimeError(f"mount -t ramfs failed as root: {exc}") from exc
    try:
        yield Path(mnt)
    finally:
        _umount(mnt)
        os.rmdir(mnt)


@contextlib.contextmanager
def ext2_image(size_mb: int = 64) -> Iterator[Path]:
    """A loop-mounted ext2 image with 128-byte inodes: timestamps in whole seconds."""
    if not can_mount():
        pytest.skip(SKIP_REASON)
    if _tool("mkfs.ext2") is None:
        raise RuntimeError("mkfs.ext2 is missing: install e2fsprogs")
    work = tempfile.mkdtemp(prefix="sf-ext2-")
    image = os.path.join(work, "fs.img")
    mnt = os.path.join(work, "mnt")
    os.mkdir(mnt)
    try:
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        _run("mkfs.ext2", "-q", "-F", "-I", "128", "-b", "1024", image)
        _run("mount", "-o", "loop", image, mnt)
    except (OSError, subprocess.CalledProcessError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"ext2 loop mount failed as root: {exc}") from exc
    try:
        yield Path(mnt)
    finally:
        _umount(mnt)
        shutil.rmtree(work, ignore_errors=True)


def same_tick_rewrite(path: Path, offset: int, data: bytes) -> bool:
    """Overwrite ``data`` at ``offset`` and report whether the stat stayed identical
    (dev, ino, size, mtime, ctime): the racy case the fence must still catch."""
    before = os.stat(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    after = os.stat(path)
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    )
