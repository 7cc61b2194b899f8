"""Platform primitives of the session write lock: open, OS lock, positional I/O.

POSIX uses ``flock`` because it belongs to the open file description: unlike ``lockf`` /
``F_SETLK`` it survives the process closing some other descriptor of the same file, and the
kernel drops it when the holder dies. Windows uses ``msvcrt.locking`` (``LockFile`` under
the hood) on one byte far past the record, because Windows byte-range locks are mandatory
and a lock over the record would stop contenders from reading who holds it.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time

if sys.platform != "win32":
    import fcntl

from .. import _util
from .._util import session_key

__all__ = [
    "BLOCKING_WAIT",
    "CREATION_GRACE_NS",
    "DEFAULT_MODE",
    "IS_WINDOWS",
    "MAX_RECORD_BYTES",
    "check_mode",
    "close_quietly",
    "fstat_regular",
    "lock_blocking",
    "lock_path_for",
    "open_lock_file",
    "read_at",
    "recently_created_by_another_user",
    "still_names",
    "try_lock",
    "unlock",
    "write_at",
]

IS_WINDOWS = sys.platform == "win32"

#: Whether a waiter can block in the kernel until the lock is free (``flock(LOCK_EX)`` in a
#: waiter thread) instead of polling. Windows polls: ``msvcrt.locking`` has no blocking
#: mode without its own one-second retry loop.
BLOCKING_WAIT = not IS_WINDOWS

# A record larger than this is not ours (ours are ~300 bytes); it is treated as garbage
# without reading it, so a 5 MB junk file costs one fstat per poll, not a 5 MB read.
MAX_RECORD_BYTES = 1 << 20

# Windows: the locked byte lives here, past any record, so readers never hit the region.
# msvcrt.locking() locks from the current position, which the CRT keeps in a C long.
_WIN_LOCK_OFFSET = 0x7FFF_FFF0

#: Permission bits of a lock file created without ``mode=``: owner read and write only.
DEFAULT_MODE = 0o600

# A lock file another user created this recently may still have its creator's umask-narrowed
# mode, about to be widened by the creator's fchmod (see open_lock_file).
CREATION_GRACE_NS = 1_000_000_000

# Rounds of "open the existing file / create it exclusively" before giving up on a path
# that keeps vanishing and reappearing under us (a cleaner racing creators).
_CREATE_ROUNDS = 8

_CONTENDED = frozenset(
    {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK)}
)


_COMMON_FLAGS = (
    getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOINHERIT", 0) | getattr(os, "O_BINARY", 0)
)
if sys.platform != "win32":
    # O_NONBLOCK: a FIFO planted at the lock path must not hang the open. Whether the
    # file is regular is checked by the caller's fstat/lstat (one syscall fewer here).
    _COMMON_FLAGS |= os.O_NOFOLLOW | os.O_NONBLOCK
_RW_FLAGS = os.O_RDWR | _COMMON_FLAGS
_RO_FLAGS = os.O_RDONLY | _COMMON_FLAGS


def _refuse_symlink(lock_path: str) -> OSError:
    return OSError(errno.ELOOP, "lock path is a symlink; refusing to follow it", lock_path)


def read_at(fd: int, size: int, offset: int = 0) -> bytes:
    """``_util.read_at``: up to ``size`` bytes at ``offset``, in one ``pread`` when it can."""
    if _HAS_PREAD:
        chunk = os.pread(fd, size, offset)
        if len(chunk) == size or not chunk:
            return chunk
        return chunk + _util.read_at(fd, size - len(chunk), offset + len(chunk))
    return _util.read_at(fd, size, offset)  # pragma: no cover - Windows


def write_at(fd: int, data: bytes, offset: int = 0) -> None:
    """``_util.write_at``: all of ``data`` at ``offset``, in one ``pwrite`` when it can."""
    if _HAS_PREAD:
        written = os.pwrite(fd, data, offset)
        if written == len(data):
            return
        if written <= 0:
            raise OSError(errno.EIO, "short positional write")
        data, offset = data[written:], offset + written
    _util.write_at(fd, data, offset)


_HAS_PREAD = hasattr(os, "pread") and hasattr(os, "pwrite")


def check_mode(mode: object) -> int:
    """``mode`` as lock-file permission bits: within ``0o777``, including owner read and
    write (``0o600``), without which the lock could not be opened again."""
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise TypeError(f"mode must be an int such as 0o660, not {type(mode).__name__}")
    if mode < 0 or mode & ~0o777 or mode & 0o600 != 0o600:
        raise ValueError(
            f"mode must be permission bits within 0o777 that include 0o600 (owner read and "
            f"write), got {oct(mode)}"
        )
    return mode


def open_lock_file(
    lock_path: str, *, create: bool = True, write: bool = True, mode: int = DEFAULT_MODE
) -> int:
    """Open the lock file without following a symlink in its last component.

    Raises ``OSError(ELOOP)`` for a symlink (its target is never opened, let alone
    truncated) and ``PermissionError`` for a directory we may not create in (including a
    read-only filesystem: the caller must see a permission problem at once, not a
    timeout). Callers check that the file is regular with ``fstat_regular``.

    A file this call creates gets exactly ``mode`` (POSIX): it is created exclusively and,
    when the umask narrowed the mode, widened with ``fchmod``. An existing file's mode is
    never changed. On Windows ``mode`` is not used (the file inherits the folder's ACL).
    """
    flags = _RW_FLAGS if write else _RO_FLAGS
    if sys.platform == "win32":
        if create:
            flags |= os.O_CREAT
        # No O_NOFOLLOW here: refuse a link (or junction) by lstat before opening and
        # compare identities after, so a link planted in between is still refused.
        try:
            before = os.lstat(lock_path)
        except FileNotFoundError:
            before = None
        if before is not None and not stat.S_ISREG(before.st_mode):
            raise _refuse_symlink(lock_path)
        fd = os.open(lock_path, flags, DEFAULT_MODE)
        try:
            after = os.lstat(lock_path)
            st = os.fstat(fd)
            if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (
                st.st_dev,
                st.st_ino,
            ):
                raise _refuse_symlink(lock_path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    try:
        return _open_or_create(lock_path, flags, mode) if create else os.open(lock_path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(lock_path):
            raise _refuse_symlink(lock_path) from None
        if exc.errno == errno.EROFS:
            raise PermissionError(
                errno.EROFS, "cannot create lock file on a read-only filesystem", lock_path
            ) from None
        raise


def _open_or_create(lock_path: str, flags: int, mode: int) -> int:
    # The existing file first (the common case, one syscall). Without O_CREAT this also
    # works in a sticky directory (e.g. /tmp) on another user's file, which refuses
    # O_CREAT (protected_regular).
    for _ in range(_CREATE_ROUNDS):
        try:
            return os.open(lock_path, flags)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(lock_path, flags | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            continue  # another process created it meanwhile: open theirs
        _exact_mode(fd, mode)
        return fd
    return os.open(lock_path, flags)


def _exact_mode(fd: int, mode: int) -> None:
    """Give a file we just created exactly ``mode``: the umask only ever removes bits."""
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)
    except OSError:
        pass  # a filesystem without POSIX permission bits (FAT, some FUSE) decides itself


def recently_created_by_another_user(lock_path: str) -> bool:
    """Whether the lock file is another user's and was created (or chmod'ed) just now.

    Such a file may still have the mode its creator's umask left, for the instant before
    the creator's ``fchmod`` gives it the requested mode (e.g. ``0o660``): a contender's
    ``PermissionError`` on it is worth one more poll. After ``CREATION_GRACE_NS`` it is a
    real permission problem.
    """
    if sys.platform == "win32":
        return False
    try:
        st = os.lstat(lock_path)
    except OSError:
        return False
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_uid != os.geteuid()
        and time.time_ns() - st.st_ctime_ns < CREATION_GRACE_NS
    )


def fstat_regular(fd: int, lock_path: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "lock path is not a regular file", lock_path)
    if st.st_nlink > 1:
        # A hard link shares its content with another name (O_NOFOLLOW does not see it):
        # writing the owner record into it would overwrite that file, e.g. a transcript.
        raise OSError(
            errno.EMLINK, "lock file has other hard links; refusing to write into it", lock_path
        )
    return st


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """One non-blocking attempt at the OS lock; ``False`` means someone else holds it."""
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBRLCK if shared else msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            if exc.errno in _CONTENDED:
                return False
            raise
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        # EACCES is what some systems return for contention; anything else (ENOLCK,
        # EOPNOTSUPP on filesystems without flock) fails closed instead of looping.
        if exc.errno in _CONTENDED:
            return False
        raise
    return True


def unlock(fd: int) -> None:
    """Explicit unlock: it also releases copies of the descriptor a fork/exec still holds."""
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


def lock_blocking(fd: int) -> None:
    """Wait in the kernel until the exclusive lock is ours (POSIX only; ``BLOCKING_WAIT``).

    Meant for a waiter thread: nothing interrupts it but the lock becoming free (or the
    holder dying), so whoever calls it must be ready to undo a success nobody wants any
    more. A blocked ``flock`` costs no CPU, and the kernel wakes it the moment the holder
    unlocks, closes or dies.
    """
    if sys.platform == "win32":  # pragma: no cover - BLOCKING_WAIT is False there
        raise OSError(errno.ENOSYS, "no blocking lock wait on Windows")
    fcntl.flock(fd, fcntl.LOCK_EX)


def close_quietly(fd: int) -> None:
    # try/except, not contextlib.suppress: this is on every release's path.
    try:  # noqa: SIM105
        os.close(fd)
    except OSError:
        pass


def still_names(fd: int, lock_path: str) -> os.stat_result | None:
    """``fstat(fd)`` if the path still names the locked inode and it is linked, else None.

    Unlinking or replacing a lock file lets a waiter lock the orphaned inode while a
    newcomer locks the fresh one; both would think they hold the lock. Re-checking after
    locking closes that door for everyone who follows the protocol.
    """
    st = fstat_regular(fd, lock_path)
    if st.st_nlink == 0:
        return None
    try:
        now = os.lstat(lock_path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        return None
    return st


# Per absolute transcript path (as given, after abspath): its key, its lock path and the
# real path checked on the fast path (see lock_path_for). Bounded; cleared when full.
_keys: dict[str, tuple[str, str]] = {}
_KEYS_MAX = 4096


def lock_path_for(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(key, lock_path)`` for a transcript path.

    The key is the real path of the transcript when it exists, else the real path of its
    folder plus its name, so a symlink to the file or to its folder shares one lock.

    Resolving the real path costs an ``lstat`` per path component, on every acquisition;
    so an existing transcript's key is remembered, and reused while one ``lstat`` shows
    that it still holds. A key is remembered only when the path, as given, already was
    the real path of a regular file (no symlink anywhere in it). It is reused while the
    last component is still not a symlink: then ``<path>.lock`` is the same directory
    entry as ``<realpath>.lock`` whatever happened to the folders above (a folder moved
    and replaced by a symlink to its new place resolves to the same folder), so every
    process still locks the same file. Anything else (a path through a symlink, a
    transcript that does not exist yet, Windows) is resolved afresh each time.
    """
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"path must be str or os.PathLike[str], not {type(text).__name__}")
    absolute = text if _is_plain_absolute(text) else os.path.abspath(text)
    hit = _keys.get(absolute)
    if hit is not None:
        try:
            mode = os.lstat(absolute).st_mode
        except OSError:
            mode = 0
        if stat.S_ISREG(mode):
            return hit
        _keys.pop(absolute, None)
    name = os.path.basename(absolute)
    if not name or text.endswith((os.sep, os.altsep or os.sep)):
        raise ValueError(f"not a transcript path: {text!r}")
    key = session_key(absolute)  # the one rule the controller's trust registry uses too
    found = key, key + ".lock"
    if key == absolute and not IS_WINDOWS:
        try:
            regular = stat.S_ISREG(os.lstat(absolute).st_mode)
        except OSError:
            regular = False
        if regular:
            if len(_keys) >= _KEYS_MAX:
                _keys.clear()
            _keys[absolute] = found
    return found


def _is_plain_absolute(text: str) -> bool:
    """Whether ``abspath(text) == text`` for sure, without normalising: an absolute POSIX
    path with no ``.``/``..``/empty components and no trailing separator."""
    if IS_WINDOWS or not text.startswith("/") or text.startswith("//"):
        return False
    return (
        "/./" not in text
        and "/../" not in text
        and "//" not in text
        and not (text.endswith(("/", "/.", "/..")))
    )
