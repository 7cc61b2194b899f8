"""The store abstraction: where sessions live (docs/multihost.md, "Stores").

A *store* holds sessions: a transcript's lines in order, the writer claim (run id and
revision) and who wrote each line. Two implementations with the same semantics:

- ``FileStore``: today's JSONL files, write lock and owned-write journal (one host; the
  embedded default; behaviour unchanged, it only adapts the existing API);
- ``PostgresStore`` / ``AsyncPostgresStore``: tables in PostgreSQL (many hosts), where the
  fencing check and the append commit in one transaction.

A *store fence* (``StoreFence``) is one run's fence on one session: it claims the session,
appends as the claimant, releases for a prompt window and, at reacquire, judges what others
wrote meanwhile exactly as ``SessionFenceController`` does: its own appends are owned,
co-tenants' are accepted, unattributed lines go through the ``BenignPolicy``, anything else
is a takeover, and a newer claim is ``SessionSupersededError``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..controller._classify import BenignPolicy
from ..journal._writer import SessionWriter

__all__ = [
    "AppendResult",
    "MergeFn",
    "SessionStore",
    "StoreFence",
    "StoreUnavailableError",
]

#: The merge callback of a store fence: receives the accepted foreign entries (co-tenant
#: and benign), in order; may be async; its return value is ignored.
MergeFn = Callable[[list[Any]], Awaitable[object] | object]


class StoreUnavailableError(ConnectionError, TimeoutError):
    """The store's server could not be reached (or kept dropping the connection) for the
    whole ``timeout`` (seconds). Nothing was acknowledged that did not land: an append that
    raises this may or may not have landed; retry it with the same idempotency key."""

    def __init__(self, store: str, timeout: float, cause: str) -> None:
        super().__init__(f"store unreachable for {timeout:g} s ({cause}): {store}")
        self.store = store
        self.timeout = timeout
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.store, self.timeout, self.cause))


class SessionClaimHeldError(RuntimeError):
    """A lease-based claim was refused: another run's lease (on the server's clock) has not
    expired. ``holder`` is that run, ``lease_until`` when its lease ends (ISO text)."""

    def __init__(self, session_id: str, holder: str | None, lease_until: str | None) -> None:
        super().__init__(f"session {session_id} is claimed by {holder} until {lease_until}")
        self.session_id = session_id
        self.holder = holder
        self.lease_until = lease_until

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.session_id, self.holder, self.lease_until))


@dataclass(frozen=True)
class AppendResult:
    """What an append did: the entry's id, its position (``seq``: line number, header = 0)
    and whether it is a retry that found the entry already there (``duplicate``)."""

    entry_id: str
    seq: int
    duplicate: bool = False


@runtime_checkable
class StoreFence(Protocol):
    """One run's fence on one session (``await store.open_fence(session_id, ...)``)."""

    @property
    def run_id(self) -> str: ...

    @property
    def revision(self) -> int: ...

    async def append(self, entry: Mapping[str, Any], *, idempotency_key: str | None = None) -> str:
        """Append ``entry`` as this run (the claimant); refused with
        ``SessionSupersededError`` once another run claimed the session."""
        ...

    async def release_for_prompt(self) -> None: ...

    async def reacquire_after_prompt(self) -> None:
        """The fence check: raises ``SessionTakeoverError`` (or ``SessionSupersededError``)
        when the session changed in a way this run does not own."""
        ...

    async def dispose(self) -> None: ...


@runtime_checkable
class SessionStore(Protocol):
    """Where sessions live. Synchronous methods; fences are async (as the controller)."""

    kind: str

    def create_session(self, session_id: str, header: Mapping[str, Any] | None = None) -> None:
        """Create a session with its header line (default: a v3 header)."""
        ...

    def claim(self, session_id: str, run_id: str | None = None) -> SessionWriter:
        """Claim the session for ``run_id``; the run that held it is superseded."""
        ...

    def append(
        self,
        session_id: str,
        entry: Mapping[str, Any],
        *,
        writer: SessionWriter,
        idempotency_key: str | None = None,
    ) -> AppendResult:
        """Append one entry as ``writer`` (claimant: claim checked at commit)."""
        ...

    def append_as_cotenant(
        self,
        session_id: str,
        entry: Mapping[str, Any],
        *,
        writer: SessionWriter | str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Append one entry beside the claimant; returns its id."""
        ...

    def append_unfenced(self, session_id: str, line: bytes) -> None:
        """Append raw line bytes as a writer that ignores sessionfence would (another tool,
        chaos in the fleet, tests): no claim, no attribution; the fence judges them by
        content."""
        ...

    def read_lines(self, session_id: str) -> list[bytes]:
        """The session's lines, exactly, each with its newline (as in the JSONL file)."""
        ...

    def export_jsonl(self, session_id: str, dest: str) -> int:
        """Write the session as a JSONL file; returns its size in bytes."""
        ...

    def import_jsonl(self, session_id: str, src: str) -> int:
        """Create a session from a JSONL file, byte for byte; returns the line count."""
        ...

    async def open_fence(
        self,
        session_id: str,
        *,
        run_id: str | None = None,
        benign_policy: BenignPolicy | None = None,
        merge_foreign_entries: MergeFn | None = None,
    ) -> StoreFence: ...

    def close(self) -> None: ...
