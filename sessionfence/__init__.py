"""sessionfence: know in microseconds whether a shared JSONL transcript changed behind you.

The hot path (fingerprints, append checks, digests) comes from the C backend when it is
built, else from the pure-Python one; ``BACKEND`` says which. Lock, transcript and
controller names are loaded on first use so ``import sessionfence`` stays cheap.
"""

# General layout:
#
# sessionfence/_impl_cffi.py (over the compiled sessionfence/_ffi) and
# sessionfence/_impl_py.py are the two hot-path implementations: fingerprint, check_append,
# read_range, content_digest, FileProbe, RollingDigest, with identical results.
# _backend.py picks one (SESSIONFENCE_BACKEND); _types.py holds the values they return
# (Fingerprint, Change, ChangeKind) and the argument checks they share.
#
# errors.py holds every public error. lock/ is the session write lock (an OS lock on a
# sidecar <transcript>.lock), transcript/ the JSONL transcript model (SessionManager,
# migration), journal/ the owned-write journal and writer claims (<transcript>.fence),
# controller/ the fence controller built on them, sync.py its blocking facade.
# The private root modules (_jsonl, _ownership, ...) are rules those share.
#
# cli/, fleet/ and bench/ are the command line and the tools behind it; the library never
# imports them.
#
# This file is the public API. The hot path and the errors are imported eagerly (they are
# light and used at once). Everything else is imported on first attribute access by
# __getattr__ below, because `import sessionfence.lock` costs asyncio (~25 ms) and the
# controller more: `import sessionfence` must stay cheap for processes that only
# fingerprint. Type checkers read the `if TYPE_CHECKING:` block instead, which imports
# every lazy name for real (`from .x import Y as Y`, so mypy and pyright see the exact
# types); tests/test_exports.py keeps that block equal to _LAZY, the runtime map.
#
# Every public class and function prints as `sessionfence.X` (`__module__` is rewritten,
# as anyio and trio do), and pickles by that name, which resolves.

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _backend
from ._exports import present_as
from ._types import MISSING, Change, ChangeKind, Fingerprint, same_stat
from ._version import __version__
from .errors import (
    JournalError,
    LockInheritedError,
    NotASessionError,
    SessionFileOwnerTimeoutError,
    SessionSupersededError,
    SessionTakeoverError,
    SessionWriteLockAcquireError,
    SessionWriteLockStaleError,
    SessionWriteLockTimeoutError,
    TornTranscriptError,
    TranscriptChangedError,
    TranscriptFormatError,
    TranscriptNeedsMigrationError,
    UnstableFileError,
)

_impl = _backend.active()  # decided once; the library's objects use the same

#: The hot path in use: ``"cffi"`` (the C extension) or ``"python"``.
BACKEND: str = _impl.NAME

if TYPE_CHECKING:
    # Both backends have the same signatures (a Protocol in _backend checks it); the pure
    # one is what type checkers and readers see.
    from ._impl_py import FileProbe as FileProbe
    from ._impl_py import ManyProbe as ManyProbe
    from ._impl_py import RollingDigest as RollingDigest
    from ._impl_py import check_append as check_append
    from ._impl_py import content_digest as content_digest
    from ._impl_py import fingerprint as fingerprint
    from ._impl_py import fingerprint_many as fingerprint_many
    from ._impl_py import read_range as read_range

    # The lazy names, exactly the keys of _LAZY.
    from .controller import BenignPolicy as BenignPolicy
    from .controller import FenceController as FenceController
    from .controller import MergeResult as MergeResult
    from .controller import SessionFenceController as SessionFenceController
    from .controller import acquire_session_file_owner as acquire_session_file_owner
    from .controller import reset_for_tests as reset_for_tests
    from .journal import JournalInfo as JournalInfo
    from .journal import SessionWriter as SessionWriter
    from .journal import append_as_cotenant as append_as_cotenant
    from .journal import claim_session as claim_session
    from .journal import inspect_journal as inspect_journal
    from .journal import journal_path_for as journal_path_for
    from .journal import repair_journal as repair_journal
    from .lock import LockInfo as LockInfo
    from .lock import SessionWriteLock as SessionWriteLock
    from .lock import acquire_session_write_lock as acquire_session_write_lock
    from .lock import acquire_session_write_lock_async as acquire_session_write_lock_async
    from .lock import clean_stale_locks as clean_stale_locks
    from .lock import inspect_lock as inspect_lock
    from .sync import SyncSessionFenceController as SyncSessionFenceController
    from .transcript import ContextModel as ContextModel
    from .transcript import ContextSettings as ContextSettings
    from .transcript import MigrationResult as MigrationResult
    from .transcript import SessionManager as SessionManager
    from .transcript import guard_session_manager as guard_session_manager
    from .transcript import is_expected_compaction_append as is_expected_compaction_append
    from .transcript import migrate_transcript as migrate_transcript
else:
    fingerprint = _impl.fingerprint
    fingerprint_many = _impl.fingerprint_many
    check_append = _impl.check_append
    read_range = _impl.read_range
    content_digest = _impl.content_digest
    FileProbe = _impl.FileProbe
    ManyProbe = _impl.ManyProbe
    RollingDigest = _impl.RollingDigest

# Public names that live in the heavier subpackages: name -> subpackage, imported on first
# attribute access.
_LAZY: dict[str, str] = {
    "BenignPolicy": "controller",
    "FenceController": "controller",
    "MergeResult": "controller",
    "SessionFenceController": "controller",
    "acquire_session_file_owner": "controller",
    "reset_for_tests": "controller",
    "SyncSessionFenceController": "sync",
    "JournalInfo": "journal",
    "SessionWriter": "journal",
    "append_as_cotenant": "journal",
    "claim_session": "journal",
    "inspect_journal": "journal",
    "journal_path_for": "journal",
    "repair_journal": "journal",
    "LockInfo": "lock",
    "SessionWriteLock": "lock",
    "acquire_session_write_lock": "lock",
    "acquire_session_write_lock_async": "lock",
    "clean_stale_locks": "lock",
    "inspect_lock": "lock",
    "ContextModel": "transcript",
    "ContextSettings": "transcript",
    "MigrationResult": "transcript",
    "SessionManager": "transcript",
    "guard_session_manager": "transcript",
    "is_expected_compaction_append": "transcript",
    "migrate_transcript": "transcript",
}

__all__ = [
    "BACKEND",
    "MISSING",
    "BenignPolicy",
    "Change",
    "ChangeKind",
    "ContextModel",
    "ContextSettings",
    "FenceController",
    "FileProbe",
    "Fingerprint",
    "JournalError",
    "JournalInfo",
    "LockInfo",
    "LockInheritedError",
    "ManyProbe",
    "MergeResult",
    "MigrationResult",
    "NotASessionError",
    "RollingDigest",
    "SessionFenceController",
    "SessionFileOwnerTimeoutError",
    "SessionManager",
    "SessionSupersededError",
    "SessionTakeoverError",
    "SessionWriteLock",
    "SessionWriteLockAcquireError",
    "SessionWriteLockStaleError",
    "SessionWriteLockTimeoutError",
    "SessionWriter",
    "SyncSessionFenceController",
    "TornTranscriptError",
    "TranscriptChangedError",
    "TranscriptFormatError",
    "TranscriptNeedsMigrationError",
    "UnstableFileError",
    "__version__",
    "acquire_session_file_owner",
    "acquire_session_write_lock",
    "acquire_session_write_lock_async",
    "append_as_cotenant",
    "check_append",
    "claim_session",
    "clean_stale_locks",
    "content_digest",
    "fingerprint",
    "fingerprint_many",
    "guard_session_manager",
    "inspect_journal",
    "inspect_lock",
    "is_expected_compaction_append",
    "journal_path_for",
    "migrate_transcript",
    "read_range",
    "repair_journal",
    "reset_for_tests",
    "same_stat",
]

present_as(
    __name__,
    [
        Change,
        ChangeKind,
        Fingerprint,
        same_stat,
        fingerprint,
        fingerprint_many,
        check_append,
        read_range,
        content_digest,
        FileProbe,
        ManyProbe,
        RollingDigest,
    ],
)


# Hidden from type checkers: a module-level __getattr__ would make every misspelt
# `sessionfence.X` an Any instead of an error.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        present_as(__name__, [value])
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    """Only the public API (``__all__``), not the modules and helpers this file imports."""
    return sorted(__all__)
