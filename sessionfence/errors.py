"""Every error sessionfence raises on purpose; all are importable from ``sessionfence``.

Each error keeps what it reports as attributes (a path, a timeout, the fingerprints a
takeover was judged on), pickles and unpickles with all of them (``__reduce__``), so it can
cross a process boundary (``multiprocessing``, ``concurrent.futures``) intact, and prints
as ``sessionfence.<Name>``. The two timeouts are also ``TimeoutError``, so code that waits
on several things can catch one class. Messages are part of the API and do not change.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._types import Fingerprint

__all__ = [
    "JournalError",
    "LockInheritedError",
    "NotASessionError",
    "SessionFileOwnerTimeoutError",
    "SessionSupersededError",
    "SessionTakeoverError",
    "SessionWriteLockAcquireError",
    "SessionWriteLockStaleError",
    "SessionWriteLockTimeoutError",
    "TornTranscriptError",
    "TranscriptChangedError",
    "TranscriptFormatError",
    "TranscriptNeedsMigrationError",
    "UnstableFileError",
]


def _reduce(error: BaseException, *args: object) -> tuple[Any, ...]:
    """``__reduce__`` of an error built from ``args``; extra state (``__notes__``, attributes
    a caller added) travels in ``__dict__`` as it does for a plain exception."""
    return (type(error), args, dict(error.__dict__) or None)


class UnstableFileError(OSError):
    """The file kept changing while it was stat'ed and read, so no stable state was seen.

    An ``OSError`` with ``errno.EAGAIN`` and ``filename`` set to the path; ``attempts`` is
    how many stat-read-stat rounds were tried. Retrying later usually succeeds.
    """

    def __init__(self, path: Any, attempts: int) -> None:
        super().__init__(
            errno.EAGAIN, f"file kept changing during {attempts} stable-read attempts", path
        )
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self, self.filename, self.attempts)


class SessionWriteLockAcquireError(Exception):
    """Base of the errors raised when the session write lock cannot be taken.

    ``lock_path`` is the lock file, ``owner`` describes its holder as read from the owner
    record (``pid=123 host=h alive=true ageMs=5000``).
    """

    lock_path: str
    owner: str


class SessionWriteLockTimeoutError(SessionWriteLockAcquireError, TimeoutError):
    """The lock stayed held by someone else for the whole ``timeout``.

    ``timeout_ms`` is the budget that ran out (``math.inf`` is shown as ``inf``). Also a
    ``TimeoutError`` (without an ``errno``).
    """

    def __init__(self, timeout_ms: float, owner: str, lock_path: str) -> None:
        shown = "inf" if timeout_ms == float("inf") else str(int(timeout_ms))
        super().__init__(f"session file locked (timeout {shown}ms): {owner} {lock_path}")
        self.timeout_ms = timeout_ms
        self.owner = owner
        self.lock_path = lock_path

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self, self.timeout_ms, self.owner, self.lock_path)


class SessionWriteLockStaleError(SessionWriteLockAcquireError):
    """The lock is held by a live process whose hold looks stale; raised at once.

    ``stale_reasons`` lists why: ``too-old`` (the record is older than ``stale``) and/or
    ``hold-exceeded`` (past the holder's own max hold). A live holder's lock is never
    broken: stop that process, or wait.
    """

    def __init__(self, owner: str, lock_path: str, stale_reasons: list[str]) -> None:
        reasons = list(stale_reasons) or ["unknown"]
        super().__init__(f"session file lock stale ({', '.join(reasons)}): {owner} {lock_path}")
        self.owner = owner
        self.lock_path = lock_path
        self.stale_reasons = reasons

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self, self.owner, self.lock_path, self.stale_reasons)


#: Where a takeover can be detected (``SessionTakeoverError.phase``).
TAKEOVER_PHASES = frozenset({"prompt_reacquire", "cleanup", "fence_check"})
#: Why a takeover was declared (``SessionTakeoverError.reason``).
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
        "lock-lost",
        "superseded",
        "journal-invalid",
    }
)


class SessionTakeoverError(Exception):
    """The controller saw a change to the transcript that it does not own; stop writing.

    ``phase`` says where it was seen (``prompt_reacquire``, ``cleanup``, ``fence_check``),
    ``reason`` which check tripped (``replaced``, ``truncated``, ``rewritten``, ``deleted``,
    ``created``, ``foreign-append``, ``merge-rejected``, ``reload-failed``,
    ``lock-timeout``, ``lock-stale``, ``lock-lost``, ``superseded``, ``journal-invalid``),
    ``before`` and ``after`` are the fingerprints compared, and ``detail`` is free text
    (e.g. the first foreign entry). A supersession is raised as the subclass
    ``SessionSupersededError``.
    """

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

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(
            self, self.session_file, self.phase, self.reason, self.before, self.after, self.detail
        )


class SessionSupersededError(SessionTakeoverError):
    """Another run claimed the session: this run must stop writing (reason ``superseded``).

    ``run_id``/``revision`` are this run's claim, ``superseded_by``/``new_revision`` the
    claim that replaced it. Raised by the fence check that finds the new claim in the
    session's journal, and by a claimant's append, under the lock, right before its bytes
    would land: a superseded run never appends after its successor.
    """

    def __init__(
        self,
        session_file: str,
        phase: str | None = None,
        run_id: str | None = None,
        revision: int | None = None,
        superseded_by: str | None = None,
        new_revision: int | None = None,
        before: Fingerprint | None = None,
        after: Fingerprint | None = None,
    ) -> None:
        detail = (
            f"run {run_id} (revision {revision}) was superseded by run {superseded_by} "
            f"(revision {new_revision})"
        )
        super().__init__(session_file, phase, "superseded", before, after, detail)
        self.run_id = run_id
        self.revision = revision
        self.superseded_by = superseded_by
        self.new_revision = new_revision

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(
            self,
            self.session_file,
            self.phase,
            self.run_id,
            self.revision,
            self.superseded_by,
            self.new_revision,
            self.before,
            self.after,
        )


class JournalError(Exception):
    """A session's owned-write journal (``<transcript>.fence``) cannot be trusted: it is
    torn, edited, truncated or was replaced. Raised to writers, who must not extend it;
    ``sessionfence inspect`` says what is wrong and ``repair_journal(path)`` moves it aside
    and starts a new one (every active fence then fails closed with ``journal-invalid``).
    ``journal_path`` is the file, ``detail`` what is wrong."""

    def __init__(self, journal_path: str, detail: str) -> None:
        super().__init__(f"session journal cannot be trusted ({detail}): {journal_path}")
        self.journal_path = journal_path
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self, self.journal_path, self.detail)


class TornTranscriptError(Exception):
    """The transcript's last line is half-written; appending would glue two records.

    ``offset`` and ``length`` locate the torn bytes. ``SessionManager.repair_torn_tail()``
    moves them aside (under the write lock); nothing was written.
    """

    def __init__(self, session_file: str, offset: int, length: int) -> None:
        super().__init__(
            f"transcript ends with a torn line ({length} bytes at offset {offset}); "
            f"run repair_torn_tail() before appending: {session_file}"
        )
        self.session_file = session_file
        self.offset = offset
        self.length = length

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self, self.session_file, self.offset, self.length)


class SessionFileOwnerTimeoutError(TimeoutError):
    """Waiting for this process's current owner of the session file timed out.

    ``acquire_session_file_owner(path, timeout=...)`` raises it after ``timeout_ms``.
    A ``TimeoutError`` (without an ``errno``).
    """

    def __init__(self, timeout_ms: float, session_file: str) -> None:
        super().__init__(
            f"timed out waiting for session file owner after {int(timeout_ms)}ms: {session_file}"
        )
        self.timeout_ms = timeout_ms
        self.session_file = session_file

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self, self.timeout_ms, self.session_file)


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
        return _reduce(self, self.session_file, self.looks_like)


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
        return _reduce(self, self.session_file, self.version)


class TranscriptChangedError(RuntimeError):
    """The file changed in a way a ``SessionManager`` cannot append to or repair safely: it
    was emptied behind the manager, it grew while a torn tail was being repaired, or it
    changed while it was being migrated. Nothing was replaced or truncated; reopen it."""


class LockInheritedError(RuntimeError):
    """A lock handle was used in a process forked from its holder; the child holds nothing.

    ``lock_path`` is the lock file. Take the lock again in the child if it needs one.
    """

    def __init__(self, lock_path: str) -> None:
        super().__init__(
            f"session write lock was inherited across fork; the child does not hold it: {lock_path}"
        )
        self.lock_path = lock_path

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self, self.lock_path)


# Shown (repr, tracebacks) and pickled by their public name, as anyio and trio do:
# ``sessionfence.SessionTakeoverError``, which resolves because the package imports every
# error eagerly.
for _cls in (globals()[_name] for _name in __all__):
    _cls.__module__ = "sessionfence"
del _cls
