"""Every error sessionfence raises (SPEC §4); all are importable from ``sessionfence``."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._types import Fingerprint

__all__ = [
    "NotASessionError",
    "SessionFileOwnerTimeoutError",
    "SessionTakeoverError",
    "SessionWriteLockAcquireError",
    "SessionWriteLockStaleError",
    "SessionWriteLockTimeoutError",
    "TornTranscriptError",
    "TranscriptFormatError",
    "TranscriptNeedsMigrationError",
    "UnstableFileError",
]


class UnstableFileError(OSError):
    """The file kept changing while it was stat'ed and read; no stable state was seen."""

    def __init__(self, path: Any, attempts: int) -> None:
        super().__init__(
            errno.EAGAIN, f"file kept changing during {attempts} stable-read attempts", path
        )
        self.attempts = attempts


class SessionWriteLockAcquireError(Exception):
    """Base of the errors raised when the session write lock cannot be taken."""

    lock_path: str
    owner: str


class SessionWriteLockTimeoutError(SessionWriteLockAcquireError):
    def __init__(self, timeout_ms: float, owner: str, lock_path: str) -> None:
        shown = "inf" if timeout_ms == float("inf") else str(int(timeout_ms))
        super().__init__(f"session file locked (timeout {shown}ms): {owner} {lock_path}")
        self.timeout_ms = timeout_ms
        self.owner = owner
        self.lock_path = lock_path


class SessionWriteLockStaleError(SessionWriteLockAcquireError):
    def __init__(self, owner: str, lock_path: str, stale_reasons: list[str]) -> None:
        reasons = list(stale_reasons) or ["unknown"]
        super().__init__(f"session file lock stale ({', '.join(reasons)}): {owner} {lock_path}")
        self.owner = owner
        self.lock_path = lock_path
        self.stale_reasons = reasons


TAKEOVER_PHASES = frozenset({"prompt_reacquire", "cleanup", "fence_check"})
TAKEOVER_REASONS = frozenset(
    {
        "replaced",
        "truncated",
        "rewritten",
        "deleted",
        "created",
        "foreign-append",
        "merge-rejected",
        "reload-failed",
        "lock-timeout",
        "lock-stale",
    }
)


class SessionTakeoverError(Exception):
    """The controller saw a change to the transcript that it does not own."""

    def __init__(
        self,
        session_file: str,
        phase: str | None = None,
        reason: str | None = None,
        before: Fingerprint | None = None,
        after: Fingerprint | None = None,
        detail: str | None = None,
    ) -> None:
        message = f"session file changed while prompt lock was released: {session_file}"
        if phase:
            message += f" (phase: {phase})"
        super().__init__(message)
        self.session_file = session_file
        self.phase = phase
        self.reason = reason
        self.before = before
        self.after = after
        self.detail = detail


class TornTranscriptError(Exception):
    """The transcript's last line has no newline; appending would glue two records."""

    def __init__(self, session_file: str, offset: int, length: int) -> None:
        super().__init__(
            f"transcript ends with a torn line ({length} bytes at offset {offset}); "
            f"run repair_torn_tail() before appending: {session_file}"
        )
        self.session_file = session_file
        self.offset = offset
        self.length = length


class SessionFileOwnerTimeoutError(Exception):
    """Waiting for the in-process session file owner timed out."""

    def __init__(self, timeout_ms: float, session_file: str) -> None:
        super().__init__(
            f"timed out waiting for session file owner after {int(timeout_ms)}ms: {session_file}"
        )
        self.timeout_ms = timeout_ms
        self.session_file = session_file


class TranscriptFormatError(Exception):
    """Base of the errors raised when a file is not in a format sessionfence may append to.

    Nothing was written when one is raised.
    """


class NotASessionError(TranscriptFormatError):
    """The file's first JSON line is not a session header (``{"type":"session",...}``): it is
    another kind of JSONL file, such as a Claude Code log or a plain chat log.

    pi-mono replaces such a file with a fresh session when it next opens it, and openclaw
    rewrites it, so appending session entries to it would only feed that rewrite.
    ``looks_like`` describes the file (e.g. ``a Claude Code log ...``).
    """

    def __init__(self, session_file: str, looks_like: str) -> None:
        super().__init__(
            f"not a session transcript: {looks_like}; nothing was written: {session_file}"
        )
        self.session_file = session_file
        self.looks_like = looks_like

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.session_file, self.looks_like))


class TranscriptNeedsMigrationError(TranscriptFormatError):
    """The transcript is in a pre-tree format (a v1 session: its header has no ``version``,
    its entries no ``id``/``parentId``) that pi-mono and openclaw rewrite with new entry ids
    when they next open it, which would orphan anything appended now (its ``parentId``, a
    compaction's ``firstKeptEntryId``). Migrate it first: ``sessionfence migrate FILE``, or
    ``sessionfence.migrate_transcript(path)``, then reopen it.
    """

    def __init__(self, session_file: str, version: float) -> None:
        shown = int(version) if float(version).is_integer() else version
        super().__init__(
            f"transcript is a pre-tree (v{shown}) session, which pi-mono and openclaw rewrite "
            f"with new entry ids on their next open; nothing was written. Migrate it first "
            f"with `sessionfence migrate {session_file}` (or "
            f"sessionfence.migrate_transcript(path)) and reopen it: {session_file}"
        )
        self.session_file = session_file
        self.version = version

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.session_file, self.version))
