"""Operator views of session write locks: ``inspect_lock``, ``list_locks``, ``clean_stale_locks``.

None of them creates a lock file, and none holds a lock for longer than a few syscalls,
so a writer polling meanwhile loses at most one poll.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Union

from . import _lock_os as _os
from . import _lock_record as _rec
from . import _lock_registry as _reg

__all__ = ["LockInfo", "clean_stale_locks", "inspect_lock", "list_locks"]

PathLike = Union[str, "os.PathLike[str]"]

_log = logging.getLogger("sessionfence.lock")


@dataclass(frozen=True)
class LockInfo:
    """What ``inspect_lock`` sees: whether the OS lock is held, and the last owner record."""

    held: bool
    lock_path: str
    owner: dict[str, Any] | None
    age: float | None
    stale_reasons: list[str] = field(default_factory=list)


def _inspect_lock_file(lock_path: str, stale: float) -> LockInfo:
    try:
        fd = _reg.open_tracked(lock_path, create=False, write=False)
    except FileNotFoundError:
        return LockInfo(held=False, lock_path=lock_path, owner=None, age=None)
    try:
        size = _os.fstat_regular(fd, lock_path).st_size
        raw = _os.read_at(fd, size) if size <= _os.MAX_RECORD_BYTES else b""
        # A shared probe conflicts only with an exclusive holder, so inspectors never
        # block each other, and closing the descriptor drops it at once (tracked, so a
        # fork meanwhile does not leave the child holding the probe).
        held = _reg.held_here(lock_path) is not None or not _os.try_lock(fd, shared=True)
    finally:
        _reg.close_tracked(fd)
    record = _rec.parse_record(raw)
    reasons = _rec.stale_reasons(record, stale) if held else []
    age = _rec.record_age(record) if record is not None else None
    return LockInfo(held=held, lock_path=lock_path, owner=record, age=age, stale_reasons=reasons)


def inspect_lock(path: PathLike, *, stale: float | None = None) -> LockInfo:
    """The lock state of the transcript at ``path``; never creates or changes the lock file.

    ``stale_reasons`` is what a contender would report (empty unless the OS lock is held
    by a live process other than this one whose record is too old or past its max hold).
    """
    _, lock_path = _os.lock_path_for(path)
    return _inspect_lock_file(lock_path, _rec.stale_setting(stale))


def list_locks(directory: PathLike, *, stale: float | None = None) -> list[LockInfo]:
    """``LockInfo`` for every ``*.lock`` regular file directly in ``directory``, by name."""
    limit = _rec.stale_setting(stale)
    infos = []
    with os.scandir(os.fspath(directory)) as it:
        names = sorted(e.path for e in it if e.name.endswith(".lock") and _is_regular(e))
    for lock_path in names:
        try:
            infos.append(_inspect_lock_file(lock_path, limit))
        except FileNotFoundError:
            continue
    return infos


def _is_regular(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


def _remove_if_free(lock_path: str) -> bool:
    """Unlink a lock file nobody holds, without ever unlinking a held one.

    We take the lock ourselves before unlinking, and only unlink the inode we locked.
    Anyone who opened the old inode meanwhile finds it unlinked after locking (nlink 0)
    and retries on a fresh file, so removal cannot split the lock in two.
    """
    try:
        fd = _reg.open_tracked(lock_path, create=False)
    except FileNotFoundError:
        return False
    try:
        _os.fstat_regular(fd, lock_path)
        with _reg.registry_lock:
            ours = lock_path in _reg.claimed
        if ours or not _os.try_lock(fd):
            return False
        if _os.still_names(fd, lock_path) is None:
            return False
        if not _os.IS_WINDOWS:
            os.unlink(lock_path)
            return True
        # Windows cannot unlink an open file; after closing, a newcomer who opened it
        # keeps it open, which makes the unlink fail rather than split the lock.
        _os.unlock(fd)
    finally:
        _reg.close_tracked(fd)
    try:
        os.unlink(lock_path)
    except (PermissionError, FileNotFoundError):
        return False
    return True


def clean_stale_locks(directory: PathLike) -> list[str]:
    """Remove the lock files in ``directory`` that no process holds; return their paths.

    Held lock files, symlinks and other non-regular files are left alone. Removing a free
    lock file also drops its generation counter; processes that saw it keep counting up.
    """
    removed = []
    for info in list_locks(directory):
        if info.held:
            continue
        try:
            if _remove_if_free(info.lock_path):
                removed.append(info.lock_path)
                _log.info("removed unheld session lock: %s", info.lock_path)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.EINVAL):
                raise
    return removed
