"""sessionfence: know in microseconds whether a shared JSONL transcript changed behind you.

The hot path (fingerprints, append checks, digests) comes from the C backend when it is
built, else from the pure-Python one; ``BACKEND`` says which. Lock, transcript and
controller names are loaded on first use so ``import sessionfence`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _backend
from ._types import MISSING, Change, ChangeKind, Fingerprint, same_stat
from ._version import __version__
from .errors import (
    NotASessionError,
    SessionFileOwnerTimeoutError,
    SessionTakeoverError,
    SessionWriteLockAcquireError,
    SessionWriteLockStaleError,
    SessionWriteLockTimeoutError,
    TornTranscriptError,
    TranscriptFormatError,
    TranscriptNeedsMigrationError,
    UnstableFileError,
)

_impl = _backend.load()

BACKEND: str = _impl.NAME
fingerprint = _impl.fingerprint
fingerprint_many = _impl.fingerprint_many
check_append = _impl.check_append
read_range = _impl.read_range
content_digest = _impl.content_digest
FileProbe = _impl.FileProbe
RollingDigest = _impl.RollingDigest

# Public names that live in the heavier modules, imported on first attribute access.
_LAZY = {
    "lock": (
        "acquire_session_write_lock",
        "acquire_session_write_lock_async",
        "SessionWriteLock",
        "LockInfo",
        "LockInheritedError",
        "inspect_lock",
        "clean_stale_locks",
    ),
    "transcript": (
        "MigrationResult",
        "SessionManager",
        "TranscriptChangedError",
        "guard_session_manager",
        "is_expected_compaction_append",
        "migrate_transcript",
    ),
    "controller": (
        "SessionFenceController",
        "MergeResult",
        "BenignPolicy",
        "acquire_session_file_owner",
        "reset_for_tests",
    ),
}
_LAZY_INDEX = {name: module for module, names in _LAZY.items() for name in names}

if TYPE_CHECKING:
    from ._impl_py import FileProbe as FileProbe
    from ._impl_py import RollingDigest as RollingDigest


def __getattr__(name: str) -> Any:
    module = _LAZY_INDEX.get(name)
    if module is None:
        raise AttributeError(f"module 'sessionfence' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sessionfence.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_INDEX))


__all__ = [
    "BACKEND",
    "MISSING",
    "Change",
    "ChangeKind",
    "FileProbe",
    "Fingerprint",
    "NotASessionError",
    "RollingDigest",
    "SessionFileOwnerTimeoutError",
    "SessionTakeoverError",
    "SessionWriteLockAcquireError",
    "SessionWriteLockStaleError",
    "SessionWriteLockTimeoutError",
    "TornTranscriptError",
    "TranscriptFormatError",
    "TranscriptNeedsMigrationError",
    "UnstableFileError",
    "__version__",
    "check_append",
    "content_digest",
    "fingerprint",
    "fingerprint_many",
    "read_range",
    "same_stat",
    *_LAZY_INDEX,
]
