"""Operator views of session write locks: ``inspect_lock``, ``list_locks``, ``clean_stale_locks``.

None of them creates a lock file, and none holds a lock for longer than a few syscalls,
so a writer polling meanwhile loses at most one poll.

Which ``*.lock`` files in a directory are session locks (``list_locks`` lists only these and
``clean_stale_locks`` removes only these; ``scan_locks`` also names the others): a regular
file ``<name>.lock`` with no other hard links, where ``<name>`` beside it is either absent
(the session was deleted) or a regular file (the transcript: a symlinked transcript's lock
lives beside its target), and whose content is

- a sessionfence owner record (``_record.is_owner_record``: every field of the record
  sessionfence writes, with its type; docs/design.md, "Owner record"), or
- empty, and ``<name>`` is a session transcript (its first line is a ``"type":"session"``
  header). A first acquirer killed between locking and writing its record leaves such a
  file; an empty ``<name>.lock`` beside anything else (or nothing) may be another tool's
  lock file (py-filelock, for one, leaves empty ``<file>.lock`` files) and is left alone.

Anything else (``poetry.lock``, ``yarn.lock``, ``Cargo.lock``, ``composer.lock``, a lock
file written by openclaw's own lock, garbage) is never locked, rewritten or removed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Union

from . import _os
from . import _record as _rec
from . import _registry as _reg

__all__ = [
    "LockInfo",
    "OtherLockFile",
    "clean_stale_locks",
    "inspect_lock",
    "list_locks",
    "scan_locks",
]

PathLike = Union[str, "os.PathLike[str]"]

_log = logging.getLogger("sessionfence.lock")

_SUFFIX = ".lock"
# A session header line must fit in this much for an empty lock file to count as ours.
_HEADER_PROBE = 1 << 16


@dataclass(frozen=True)
class LockInfo:
    """What ``inspect_lock`` sees: whether the OS lock is held, and the last owner record."""

    held: bool
    lock_path: str
    owner: dict[str, Any] | None
    age: float | None
    stale_reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OtherLockFile:
    """A ``*.lock`` entry that is not a session lock, and why; it is left alone."""

    path: str
    reason: str


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
    """``LockInfo`` for every session lock file directly in ``directory``, by name.

    Other ``*.lock`` files are skipped (see the module docstring for the rule, and
    ``scan_locks`` for a listing that names them).
    """
    return scan_locks(directory, stale=stale)[0]


def scan_locks(
    directory: PathLike, *, stale: float | None = None
) -> tuple[list[LockInfo], list[OtherLockFile]]:
    """The session lock files directly in ``directory``, and every other ``*.lock`` entry.

    Other entries are only looked at (an ``lstat``, at most one read of 1 MiB): never
    locked, written or removed.
    """
    limit = _rec.stale_setting(stale)
    with os.scandir(os.fspath(directory)) as it:
        found = sorted((e for e in it if e.name.endswith(_SUFFIX)), key=lambda e: e.path)
    infos: list[LockInfo] = []
    others: list[OtherLockFile] = []
    for entry in found:
        lock_path = entry.path
        try:
            verdict = _scan_one(lock_path, entry, limit)
        except FileNotFoundError:
            continue  # removed meanwhile
        if isinstance(verdict, LockInfo):
            infos.append(verdict)
        else:
            others.append(OtherLockFile(lock_path, verdict))
    return infos, others


def _scan_one(lock_path: str, entry: os.DirEntry[str], stale: float) -> LockInfo | str:
    """A session lock's ``LockInfo``, or why the entry is not a session lock."""
    if entry.is_symlink():
        return "a symlink"
    if not _is_regular(entry):
        return "not a regular file"
    try:
        fd = _reg.open_tracked(lock_path, create=False, write=False)
    except FileNotFoundError:
        raise
    except OSError as exc:
        return f"cannot open it: {exc.strerror or exc}"
    try:
        verdict = _classify(fd, lock_path)
        if isinstance(verdict, str):
            return verdict
        # Probed only once the file is known to be ours: another tool's lock file is
        # never locked, not even shared for a moment.
        held = _reg.held_here(lock_path) is not None or not _os.try_lock(fd, shared=True)
        if not held:
            # Our shared lock keeps every writer out, so this read is the final word.
            verdict = _classify(fd, lock_path)
            if isinstance(verdict, str):
                return verdict
    finally:
        _reg.close_tracked(fd)
    record = verdict[0]
    reasons = _rec.stale_reasons(record, stale) if held else []
    age = _rec.record_age(record) if record is not None else None
    return LockInfo(held=held, lock_path=lock_path, owner=record, age=age, stale_reasons=reasons)


def _classify(fd: int, lock_path: str) -> tuple[_rec.OwnerRecord | None] | str:
    """``(record,)`` if the open file is a session lock (record None when it is empty),
    else the reason it is not. Reads at most ``MAX_RECORD_BYTES``."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_nlink > 1:
        return "has other hard links"
    transcript = lock_path[: -len(_SUFFIX)]
    name = os.path.basename(transcript)
    if not name:
        return "no transcript name"
    try:
        beside = os.lstat(transcript)
    except FileNotFoundError:
        beside = None
    if beside is not None and not stat.S_ISREG(beside.st_mode):
        return f"{name} beside it is not a regular file"
    if st.st_size > _os.MAX_RECORD_BYTES:
        return "no sessionfence owner record"
    if st.st_size == 0:
        if beside is not None and _has_session_header(transcript):
            return (None,)
        return f"empty, and no session transcript {name} beside it"
    record = _rec.parse_record(_os.read_at(fd, st.st_size))
    if _rec.is_owner_record(record):
        return (record,)
    return "no sessionfence owner record"


def _has_session_header(path: str) -> bool:
    """Whether the file at ``path`` is regular and starts with a session header line."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        head = _os.read_at(fd, _HEADER_PROBE)
    except OSError:
        return False
    finally:
        _os.close_quietly(fd)
    try:
        value = json.loads(head.split(b"\n", 1)[0])
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and value.get("type") == "session"


def _is_regular(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


def _remove_if_free(lock_path: str) -> bool:
    """Unlink a session lock file nobody holds, without ever unlinking a held one.

    We take the lock ourselves before unlinking, and only unlink the inode we locked.
    Anyone who opened the old inode meanwhile finds it unlinked after locking (nlink 0)
    and retries on a fresh file, so removal cannot split the lock in two. Whether the
    file is a session lock is decided again under that lock, from what it holds now.
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
        if isinstance(_classify(fd, lock_path), str):
            return False  # not (or no longer) a session lock: not ours to remove
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
    """Remove the session lock files in ``directory`` that no process holds; return them.

    Only session lock files count (see the module docstring): other ``*.lock`` files
    (``poetry.lock``, ``Cargo.lock``, garbage, an empty file with no session transcript
    beside it), held lock files, symlinks and other non-regular files are left alone.
    Removing a free lock file also drops its generation counter; processes that saw it
    keep counting up.
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
            if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.EINVAL, errno.EMLINK):
                raise
    return removed
