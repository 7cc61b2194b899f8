"""Windows file status and opening the way the C backend does them (imported on win32 only).

The pure backend must produce the numbers of ``csrc/sessionfence.c`` bit for bit, and plain
``os`` calls differ from it on Windows:

- ``os.stat``/``os.fstat`` put the *creation* time in ``st_ctime_ns`` (CPython keeps it there
  for compatibility, 3.12+ included), while a fingerprint's ``ctime_ns`` is NTFS
  ``ChangeTime``, the status-change time that POSIX calls ctime.
- ``st_dev``/``st_ino`` come from ``FILE_ID_INFO`` on CPython >= 3.12 but from
  ``BY_HANDLE_FILE_INFORMATION`` before; the C backend uses ``FILE_ID_INFO`` (64-bit volume
  serial, low 64 bits of the file id) everywhere, falling back like 3.12 does.
- ``os.open`` shares read and write but not delete, so while the pure ``FileProbe`` holds a
  transcript, nobody else can delete it or rename it away. The C backend opens with
  ``FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE``.
- A file deleted while someone holds it open stays "delete pending" under its name; the C
  backend treats it as missing (``os.stat`` raises ``PermissionError`` for it).

``stat``, ``fstat`` and ``open`` below are drop-in replacements for the three ``os``
functions the pure backend uses (``os_view()`` is ``os`` with them swapped in, which
``_impl_py`` binds as its ``os`` on win32). They return ``os.stat_result`` objects with the
C backend's ``st_dev``, ``st_ino``, ``st_size``, ``st_nlink`` (0 when delete pending),
``st_mtime_ns`` and ``st_ctime_ns`` (ChangeTime).

Still different on Windows and left as is: the pure path reads with ``lseek`` + ``read`` on
its private descriptor (no ``pread``), and a rename *over* a file someone holds open needs
the renamer to use POSIX rename semantics (``os.replace``/``MoveFileExW`` fails there with
either backend; see docs/platforms.md).
"""

from __future__ import annotations

import os
import stat as stat_mod
import sys

if sys.platform != "win32":  # pragma: no cover - the module is Windows-only by design
    raise ImportError("sessionfence._winstat is for Windows only")

import ctypes
import msvcrt
import types
from ctypes import wintypes
from typing import Union

__all__ = ["fstat", "open", "os_view", "stat"]

_Path = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

_EPOCH_TICKS = 116444736000000000  # 1970-01-01 in FILETIME ticks (100 ns since 1601)
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


def filetime_ns(ticks: int) -> int:
    """FILETIME ticks to ns since 1970, exactly as ``sf_filetime_to_ns`` in sessionfence.c:
    0 ("not recorded", FAT has no ChangeTime) stays 0, out-of-range values saturate."""
    if ticks == 0:
        return 0
    return max(_INT64_MIN, min(_INT64_MAX, (ticks - _EPOCH_TICKS) * 100))


# Fixed-width fields (DWORD = 32 bits, BOOLEAN = 8 bits; a FILETIME is two DWORDs, 4-byte
# aligned), so the layouts are the Windows ones whatever the host: checked by size below.
class _FileBasicInfo(ctypes.Structure):
    _fields_ = [
        ("CreationTime", ctypes.c_int64),
        ("LastAccessTime", ctypes.c_int64),
        ("LastWriteTime", ctypes.c_int64),
        ("ChangeTime", ctypes.c_int64),
        ("FileAttributes", ctypes.c_uint32),
    ]


class _FileStandardInfo(ctypes.Structure):
    _fields_ = [
        ("AllocationSize", ctypes.c_int64),
        ("EndOfFile", ctypes.c_int64),
        ("NumberOfLinks", ctypes.c_uint32),
        ("DeletePending", ctypes.c_ubyte),
        ("Directory", ctypes.c_ubyte),
    ]


class _FileIdInfo(ctypes.Structure):
    _fields_ = [("VolumeSerialNumber", ctypes.c_uint64), ("FileId", ctypes.c_ubyte * 16)]


class _ByHandleFileInformation(ctypes.Structure):
    _fields_ = [
        ("dwFileAttributes", ctypes.c_uint32),
        ("ftCreationTime", ctypes.c_uint32 * 2),
        ("ftLastAccessTime", ctypes.c_uint32 * 2),
        ("ftLastWriteTime", ctypes.c_uint32 * 2),
        ("dwVolumeSerialNumber", ctypes.c_uint32),
        ("nFileSizeHigh", ctypes.c_uint32),
        ("nFileSizeLow", ctypes.c_uint32),
        ("nNumberOfLinks", ctypes.c_uint32),
        ("nFileIndexHigh", ctypes.c_uint32),
        ("nFileIndexLow", ctypes.c_uint32),
    ]


_SIZES = tuple(
    ctypes.sizeof(t)
    for t in (_FileBasicInfo, _FileStandardInfo, _FileIdInfo, _ByHandleFileInformation)
)
if _SIZES != (40, 24, 24, 52):  # pragma: no cover
    raise ImportError(f"sessionfence._winstat: unexpected Win32 structure sizes {_SIZES}")

_FILE_BASIC_INFO = 0  # FILE_INFO_BY_HANDLE_CLASS values
_FILE_STANDARD_INFO = 1
_FILE_ID_INFO = 18
_GENERIC_READ = 0x80000000
_FILE_READ_ATTRIBUTES = 0x0080
_SHARE_ALL = 0x1 | 0x2 | 0x4  # FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE
_OPEN_EXISTING = 3
_FILE_ATTRIBUTE_NORMAL = 0x80
_FILE_ATTRIBUTE_READONLY = 0x1
_FILE_ATTRIBUTE_DIRECTORY = 0x10
_FILE_FLAG_BACKUP_SEMANTICS = 0x02000000
_FILE_TYPE_DISK, _FILE_TYPE_CHAR, _FILE_TYPE_PIPE = 1, 2, 3
_ERROR_ACCESS_DENIED = 5
_ERROR_FILE_NOT_FOUND = 2
_STATUS_DELETE_PENDING = 0xC0000056
_INVALID_HANDLE_VALUE = ctypes.c_void_p(-1).value

_k32 = ctypes.WinDLL("kernel32", use_last_error=True)
_ntdll = ctypes.WinDLL("ntdll")

_CreateFileW = _k32.CreateFileW
_CreateFileW.argtypes = [
    wintypes.LPCWSTR,
    wintypes.DWORD,
    wintypes.DWORD,
    ctypes.c_void_p,
    wintypes.DWORD,
    wintypes.DWORD,
    wintypes.HANDLE,
]
_CreateFileW.restype = wintypes.HANDLE
_CloseHandle = _k32.CloseHandle
_CloseHandle.argtypes = [wintypes.HANDLE]
_CloseHandle.restype = wintypes.BOOL
_GetInfoEx = _k32.GetFileInformationByHandleEx
_GetInfoEx.argtypes = [wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p, wintypes.DWORD]
_GetInfoEx.restype = wintypes.BOOL
_GetInfo = _k32.GetFileInformationByHandle
_GetInfo.argtypes = [wintypes.HANDLE, ctypes.POINTER(_ByHandleFileInformation)]
_GetInfo.restype = wintypes.BOOL
_GetFileType = _k32.GetFileType
_GetFileType.argtypes = [wintypes.HANDLE]
_GetFileType.restype = wintypes.DWORD
_RtlGetLastNtStatus = _ntdll.RtlGetLastNtStatus
_RtlGetLastNtStatus.argtypes = []
_RtlGetLastNtStatus.restype = ctypes.c_ulong


def _error(winerror: int, path: object) -> OSError:
    # OSError maps winerror to errno itself (2/3 -> ENOENT, 5 -> EACCES, ...).
    return OSError(0, ctypes.FormatError(winerror).strip(), path, winerror)


def _missing(path: object) -> FileNotFoundError:
    return FileNotFoundError(2, "The system cannot find the file specified", path)


def _create(path: _Path, access: int, flags: int) -> int:
    """CreateFileW with every share mode; raises like os.open, a pending delete as ENOENT."""
    name = os.fsdecode(path)
    handle = _CreateFileW(name, access, _SHARE_ALL, None, _OPEN_EXISTING, flags, None)
    if handle is None or handle == _INVALID_HANDLE_VALUE:
        winerror = ctypes.get_last_error()
        # Read right after the failing call: the NTSTATUS behind ERROR_ACCESS_DENIED.
        if winerror == _ERROR_ACCESS_DENIED and _RtlGetLastNtStatus() == _STATUS_DELETE_PENDING:
            raise _missing(path)
        raise _error(winerror, path)
    return int(handle)


def _info(handle: int, cls: int, buf: ctypes.Structure) -> bool:
    return bool(_GetInfoEx(handle, cls, ctypes.byref(buf), ctypes.sizeof(buf)))


def _stat_handle(handle: int, path: object) -> os.stat_result:
    basic = _FileBasicInfo()
    std = _FileStandardInfo()
    if not _info(handle, _FILE_BASIC_INFO, basic) or not _info(handle, _FILE_STANDARD_INFO, std):
        raise _error(ctypes.get_last_error(), path)
    ident = _FileIdInfo()
    low = 0
    if _info(handle, _FILE_ID_INFO, ident):
        low = int.from_bytes(bytes(ident.FileId)[:8], "little")
    if low:
        dev, ino = int(ident.VolumeSerialNumber), low
    else:  # FAT and old servers: the older call (what CPython < 3.12 reports)
        info = _ByHandleFileInformation()
        if not _GetInfo(handle, ctypes.byref(info)):
            raise _error(ctypes.get_last_error(), path)
        dev = int(info.dwVolumeSerialNumber)
        ino = (int(info.nFileIndexHigh) << 32) | int(info.nFileIndexLow)
    attrs = int(basic.FileAttributes)
    if std.Directory or attrs & _FILE_ATTRIBUTE_DIRECTORY:
        mode = stat_mod.S_IFDIR | 0o555
    else:
        kind = _GetFileType(handle)
        mode = {_FILE_TYPE_CHAR: stat_mod.S_IFCHR, _FILE_TYPE_PIPE: stat_mod.S_IFIFO}.get(
            kind, stat_mod.S_IFREG if kind == _FILE_TYPE_DISK else 0
        )
        mode |= 0o444 if attrs & _FILE_ATTRIBUTE_READONLY else 0o666
    nlink = 0 if std.DeletePending else int(std.NumberOfLinks)
    size = int(std.EndOfFile)
    atime, mtime, ctime = (
        filetime_ns(int(t)) for t in (basic.LastAccessTime, basic.LastWriteTime, basic.ChangeTime)
    )
    extra = {
        "st_atime": atime / 1e9,
        "st_mtime": mtime / 1e9,
        "st_ctime": ctime / 1e9,
        "st_atime_ns": atime,
        "st_mtime_ns": mtime,
        "st_ctime_ns": ctime,
        "st_file_attributes": attrs,
    }
    seq = (mode, ino, dev, nlink, 0, 0, size, atime // 10**9, mtime // 10**9, ctime // 10**9)
    return os.stat_result(seq, extra)


def fstat(fd: int) -> os.stat_result:
    """``os.fstat`` with the C backend's numbers (ChangeTime as ``st_ctime_ns``)."""
    return _stat_handle(msvcrt.get_osfhandle(fd), fd)


def stat(path: _Path) -> os.stat_result:
    """``os.stat`` (symlinks followed) with the C backend's numbers; a delete-pending file
    raises ``FileNotFoundError``."""
    handle = _create(path, _FILE_READ_ATTRIBUTES, _FILE_FLAG_BACKUP_SEMANTICS)
    try:
        st = _stat_handle(handle, path)
    finally:
        _CloseHandle(handle)
    if st.st_nlink == 0:
        raise _missing(path)
    return st


def open(path: _Path, flags: int = 0, mode: int = 0o777) -> int:
    """Opens an existing file for reading, sharing read, write *and delete* (``os.open``
    shares no delete), and returns a CRT file descriptor that owns the handle. ``flags`` and
    ``mode`` are accepted for ``os.open`` compatibility; the open is always read-only,
    binary and not inherited. A delete-pending file raises ``FileNotFoundError``."""
    del flags, mode
    handle = _create(path, _GENERIC_READ, _FILE_ATTRIBUTE_NORMAL)
    try:
        std = _FileStandardInfo()
        if _info(handle, _FILE_STANDARD_INFO, std) and std.DeletePending:
            raise _missing(path)
        fd: int = msvcrt.open_osfhandle(handle, os.O_RDONLY | getattr(os, "O_NOINHERIT", 0))
    except BaseException:
        _CloseHandle(handle)
        raise
    return fd


def os_view() -> types.ModuleType:
    """A copy of the ``os`` namespace with ``stat``, ``fstat`` and ``open`` replaced by the
    functions above: the pure backend binds it as its ``os`` on Windows, so its code (and
    tests that monkeypatch ``_impl_py.os``) stays the same on every platform."""
    view = types.ModuleType("os", os.__doc__)
    view.__dict__.update(vars(os))
    view.__dict__.update(stat=stat, fstat=fstat, open=open)
    return view
