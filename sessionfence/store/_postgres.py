"""The PostgreSQL store: sessions in tables, the fencing check and the append in one
transaction (docs/multihost.md).

``PostgresStore`` (psycopg 3, synchronous) and ``AsyncPostgresStore`` (``AsyncConnection``)
share their SQL and the interpretation of its results (``_Sql``, ``_entry_fields``,
``_append_outcome``); each only runs statements. Every write is one statement in one
autocommit transaction, a server-side function (``sf_append``, ``sf_claim``): no row lock is
held across a client round trip, so a client paused (SIGSTOP) or cut off mid-call blocks
nobody, and a claim made while it is paused is checked when its append finally runs.

Connection loss and server restarts: every operation is retried on a fresh connection,
with backoff, until ``unreachable_timeout`` seconds have passed, then
``StoreUnavailableError``. Appends are safe to retry: each carries an idempotency key (a
fresh one when the caller gives none), so a retry of an append that landed before its
acknowledgement was lost returns that entry instead of writing it twice.

psycopg is imported on first use: the core package needs only cffi and xxhash
(``pip install 'sessionfence[postgres]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any, TypeVar

from .._jsonl import dumps_line, loads_line
from .._util import iso_utc
from ..controller._classify import BenignPolicy
from ..errors import NotASessionError, SessionSupersededError, TornTranscriptError
from ..journal._writer import SessionWriter, new_run_id
from ._base import AppendResult, MergeFn, SessionClaimHeldError, StoreUnavailableError
from ._schema import MIGRATIONS, SCHEMA_VERSION, check_schema_name, migration_sql

__all__ = [
    "AsyncPostgresStore",
    "FenceRead",
    "LeaseState",
    "PostgresStore",
    "StoredLine",
    "load_psycopg",
]

T = TypeVar("T")

DEFAULT_SCHEMA = "sessionfence"
_MIGRATION_LOCK = 0x5E55_10F3_0000_0001  # pg_advisory_xact_lock key (transaction-scoped)
#: Most lines one fence read fetches; a longer backlog is read in several round trips.
FENCE_BATCH = 10_000


def load_psycopg() -> ModuleType:
    """``psycopg``, or an ImportError that says how to install it."""
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the PostgreSQL store needs psycopg 3: pip install 'sessionfence[postgres]' "
            "(or pip install 'psycopg[binary]>=3.1')"
        ) from exc
    return psycopg


def session_label(session_id: str) -> str:
    """How errors name a session of this store (their ``session_file``)."""
    return f"postgresql:{session_id}"


@dataclass(frozen=True)
class StoredLine:
    """One line of a session as a fence reads it."""

    seq: int
    line: bytes  # without its newline
    entry_id: str | None
    role: str
    writer_run_id: str | None
    revision: int


@dataclass(frozen=True)
class FenceRead:
    """One fence read: the claim in force, the session's end, its rewrite generation and
    the lines after the position asked for (at most ``FENCE_BATCH``)."""

    writer_run_id: str | None
    revision: int
    last_seq: int
    generation: int
    lines: list[StoredLine]


class _Sql:
    def __init__(self, schema: str) -> None:
        q = '"' + check_schema_name(schema) + '"'
        self.schema = schema
        self.q = q
        self.version_table = (
            f"CREATE TABLE IF NOT EXISTS {q}.sf_schema_version "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        self.version_exists = f"SELECT to_regclass('{q}.sf_schema_version') IS NOT NULL"
        self.current_version = f"SELECT coalesce(max(version), 0) FROM {q}.sf_schema_version"
        self.record_version = f"INSERT INTO {q}.sf_schema_version (version) VALUES (%s)"
        self.claim = f"SELECT * FROM {q}.sf_claim(%s, %s, %s, %s)"
        self.append = f"SELECT * FROM {q}.sf_append(%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        self.renew = f"SELECT * FROM {q}.sf_renew(%s, %s, %s)"
        self.release = f"SELECT * FROM {q}.sf_release(%s, %s, %s)"
        self.lease = (
            "SELECT writer_run_id, revision, lease_until, lease_until IS NOT NULL AND "
            f"lease_until > now() FROM {q}.sf_sessions WHERE session_id = %s"
        )
        self.create = (
            f"WITH s AS (INSERT INTO {q}.sf_sessions (session_id, last_seq) VALUES (%s, 0) "
            "ON CONFLICT DO NOTHING RETURNING session_id) "
            f"INSERT INTO {q}.sf_entries (session_id, seq, line, entry_type, role) "
            "SELECT session_id, 0, %s, 'session', 'header' FROM s RETURNING seq"
        )
        self.head = f"SELECT last_seq, last_entry_id FROM {q}.sf_sessions WHERE session_id = %s"
        # One statement, one snapshot: the claim row and the lines after the fence's
        # position (keyset on the primary key: O(log n + new lines)).
        self.fence_read = (
            "SELECT s.writer_run_id, s.revision, s.last_seq, s.generation, "
            "e.seq, e.line, e.entry_id, e.role, e.writer_run_id, e.revision "
            f"FROM {q}.sf_sessions s LEFT JOIN LATERAL ("
            f"SELECT * FROM {q}.sf_entries e WHERE e.session_id = s.session_id "
            "AND e.seq > %s ORDER BY e.seq LIMIT %s) e ON true "
            "WHERE s.session_id = %s ORDER BY e.seq"
        )
        self.known_ids = (
            f"SELECT DISTINCT entry_id FROM {q}.sf_entries WHERE session_id = %s "
            "AND entry_id = ANY(%s) AND seq <= %s"
        )
        self.lines = (
            f"SELECT line, terminated FROM {q}.sf_entries WHERE session_id = %s ORDER BY seq"
        )
        self.import_session = (
            f"INSERT INTO {q}.sf_sessions (session_id, last_seq, last_entry_id) VALUES (%s, %s, %s)"
        )
        self.imported = (
            f"UPDATE {q}.sf_sessions SET last_seq = %s, last_entry_id = %s WHERE session_id = %s"
        )
        self.copy_entries = (
            f"COPY {q}.sf_entries (session_id, seq, line, terminated, entry_id, entry_type, "
            "role) FROM STDIN"
        )
        self.foreign = (
            f"WITH s AS (UPDATE {q}.sf_sessions SET last_seq = last_seq + 1, "
            "updated_at = now() WHERE session_id = %s RETURNING last_seq, revision) "
            f"INSERT INTO {q}.sf_entries (session_id, seq, line, entry_id, entry_type, role, "
            "revision) SELECT %s, last_seq, %s, %s, %s, 'foreign', revision FROM s "
            "RETURNING seq"
        )
        self.claims = (
            f"SELECT revision, run_id, superseded_run, at_seq FROM {q}.sf_claims "
            "WHERE session_id = %s ORDER BY revision"
        )


def _parse(line: bytes) -> Any:
    """The line's JSON value (as the transcript readers parse it), or None."""
    try:
        return loads_line(line)[0] if line.strip() else None
    except (ValueError, RecursionError):
        return None


def _line_facts(line: bytes) -> tuple[str | None, str | None]:
    """``(entry id, type)`` of a line, as far as it parses."""
    value = _parse(line)
    if not isinstance(value, dict):
        return None, None
    ident, kind = value.get("id"), value.get("type")
    return (
        ident if isinstance(ident, str) and kind != "session" else None,
        kind if isinstance(kind, str) else None,
    )


def _entry_fields(entry: Mapping[str, Any], parent: str | None) -> tuple[str, bytes, str]:
    """The line of ``entry`` as the file store writes it: ``type``, ``id`` (8 hex digits
    when absent), ``parentId`` (``parent`` when absent), ``timestamp``, then the entry's own
    fields; returns ``(id, line without newline, type)``."""
    kind = entry.get("type")
    if not isinstance(kind, str) or not kind or kind == "session":
        raise ValueError("an entry needs a non-empty string 'type' other than 'session'")
    ident = entry.get("id")
    if ident is not None and (not isinstance(ident, str) or not ident):
        raise ValueError("an entry's 'id' must be a non-empty string")
    fields: dict[str, Any] = {"type": kind}
    fields["id"] = ident if isinstance(ident, str) else os.urandom(4).hex()
    fields["parentId"] = entry.get("parentId", parent)
    fields["timestamp"] = entry.get("timestamp", iso_utc())
    for key, value in entry.items():
        fields.setdefault(key, value)
    return str(fields["id"]), dumps_line(fields)[:-1], kind


def default_header() -> dict[str, Any]:
    from ..transcript._io import uuid7

    return {"type": "session", "version": 3, "id": uuid7(), "timestamp": iso_utc(), "cwd": "/"}


def _header_line(header: Mapping[str, Any] | None) -> bytes:
    value = dict(header) if header is not None else default_header()
    if value.get("type") != "session":
        raise ValueError("a session header needs type 'session'")
    return dumps_line(value)[:-1]


_APPEND_TRIES = 1000  # rebuilt lines before giving up (racing writers, taken ids)


@dataclass
class _AppendCall:
    """One append being made: what to send, and how many times the line was rebuilt."""

    session_id: str
    entry: Mapping[str, Any]
    writer: SessionWriter
    key: str
    explicit_parent: bool
    entry_id: str = ""
    line: bytes = b""
    kind: str = ""
    expect: int | None = None
    # (last seq, last entry id) of the session, read before an entry without parentId
    head: tuple[int, str | None] | None = None

    def needs_head(self) -> bool:
        return not self.explicit_parent and self.head is None

    def take_head(self, row: Any) -> None:
        if row is None:
            raise KeyError(f"no such session: {self.session_id}")
        self.head = (int(row[0]), row[1])

    def params(self) -> tuple[Any, ...]:
        """The ``sf_append`` arguments for the next try."""
        head = self.head
        return self.build(
            head[1] if head else None, None if self.explicit_parent or not head else head[0]
        )

    def take(self, row: Any) -> AppendResult | None:
        """The result of a try; None: try again (the session moved on under an entry
        hung on its last one, or a generated id was taken)."""
        outcome = _append_outcome(self, row)
        if isinstance(outcome, AppendResult):
            return outcome
        if outcome == "moved":
            self.head = (int(row[1]), row[6])
        elif outcome == "id-taken":
            if "id" in self.entry:
                raise ValueError(f"entry {self.entry['id']} already exists")
            self.line = b""  # a fresh id
        else:  # pragma: no cover - the function returns no other status
            raise RuntimeError(f"sf_append: {outcome}")
        return None

    def build(self, parent: str | None, expect: int | None) -> tuple[Any, ...]:
        if not self.explicit_parent or not self.line:
            self.entry_id, self.line, self.kind = _entry_fields(self.entry, parent)
        self.expect = expect
        return (
            self.session_id,
            self.line,
            self.entry_id,
            self.kind,
            self.writer.role,
            self.writer.run_id,
            self.writer.revision,
            self.key,
            expect,
        )


def _append_outcome(call: _AppendCall, row: Any) -> AppendResult | str:
    """An ``AppendResult``, or the status to act on (``moved``, ``id-taken``)."""
    status = row[0]
    if status == "ok":
        return AppendResult(call.entry_id, int(row[1]))
    if status == "duplicate":
        return AppendResult(str(row[3]), int(row[1]), duplicate=True)
    if status == "superseded":
        w = call.writer
        raise SessionSupersededError(
            session_label(call.session_id), "fence_check", w.run_id, w.revision, row[4], row[5]
        )
    if status == "missing":
        raise KeyError(f"no such session: {call.session_id}")
    return str(status)


def _claim_outcome(session_id: str, run_id: str, row: Any) -> tuple[SessionWriter, Any]:
    status = row[0]
    if status == "missing":
        raise KeyError(f"no such session: {session_id}")
    if status == "held":
        until = row[7].isoformat() if row[7] is not None else None
        raise SessionClaimHeldError(session_id, row[3], until)
    return SessionWriter(run_id, role="claimant", revision=int(row[1])), row


def _renew_outcome(session_id: str, writer: SessionWriter, row: Any) -> Any:
    """The new ``lease_until`` (None: the claim has no lease); ``SessionSupersededError``
    when the claim is not the writer's any more."""
    status = row[0]
    if status == "missing":
        raise KeyError(f"no such session: {session_id}")
    if status == "superseded":
        raise SessionSupersededError(
            session_label(session_id), "lease", writer.run_id, writer.revision, row[1], row[2]
        )
    return row[3] if status == "ok" else None


def _release_outcome(session_id: str, row: Any) -> bool:
    if row[0] == "missing":
        raise KeyError(f"no such session: {session_id}")
    return bool(row[0] == "ok")


@dataclass(frozen=True)
class LeaseState:
    """A session's claim as the server sees it now: who holds it, at which revision, until
    when its lease runs (None: no lease) and whether it still runs (server clock)."""

    writer_run_id: str | None
    revision: int
    lease_until: Any
    live: bool


def _lease_state(session_id: str, row: Any) -> LeaseState:
    if row is None:
        raise KeyError(f"no such session: {session_id}")
    return LeaseState(row[0], int(row[1]), row[2], bool(row[3]))


def _fence_read(rows: list[Any]) -> FenceRead | None:
    if not rows:
        return None
    first = rows[0]
    lines = [
        StoredLine(int(r[4]), bytes(r[5]), r[6], r[7], r[8], int(r[9]))
        for r in rows
        if r[4] is not None
    ]
    return FenceRead(first[0], int(first[1]), int(first[2]), int(first[3]), lines)


class _Importer:
    """The rows of an imported JSONL file, made as the file is read (a file of gigabytes
    never sits in memory whole): ``rows(f)`` yields one ``sf_entries`` row per line, in
    order, and refuses a file that is not a session and a torn last line; then ``count``
    and ``last_id`` say what the session row needs."""

    def __init__(self, session_id: str, src: str) -> None:
        self.session_id = session_id
        self.src = src
        self.count = 0
        self.last_id: str | None = None
        self.header_seen = False

    def rows(self, f: Any) -> Iterator[tuple[Any, ...]]:
        offset = 0
        for raw in f:  # binary: split on b"\n" only, each line with its newline
            terminated = raw.endswith(b"\n")
            line = raw[:-1] if terminated else raw
            if not terminated and not isinstance(_parse(line), dict):
                raise TornTranscriptError(self.src, offset, len(line))
            offset += len(raw)
            ident, kind = _line_facts(line)
            role = "import"
            if kind == "session" and not self.header_seen:
                role = "header"
            if kind is not None or ident is not None:
                if not self.header_seen and role != "header":
                    raise NotASessionError(self.src, "its first JSON line is not a session header")
                self.header_seen = True
            if ident is not None:
                self.last_id = ident
            yield (self.session_id, self.count, line, terminated, ident, kind, role)
            self.count += 1
        if not self.header_seen:
            raise NotASessionError(self.src, "it has no session header")


def _joined(rows: Iterator[tuple[bytes, bool]]) -> Iterator[bytes]:
    """Lines as the file holds them: a line after an unterminated one gets the separating
    newline first, as the file store's append writes it."""
    pending = False
    for line, terminated in rows:
        if pending:
            yield b"\n"
        yield bytes(line) + (b"\n" if terminated else b"")
        pending = not terminated


class _Retry:
    """Backoff until a deadline, then ``StoreUnavailableError``."""

    def __init__(self, label: str, timeout: float) -> None:
        self.label = label
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.delay = 0.02
        self.attempts = 0

    def next_delay(self, exc: BaseException) -> float:
        self.attempts += 1
        if time.monotonic() + self.delay > self.deadline:
            raise StoreUnavailableError(self.label, self.timeout, f"{type(exc).__name__}: {exc}")
        delay = self.delay
        self.delay = min(self.delay * 2, 0.5)
        return delay


def _redacted(conninfo: str) -> str:
    """The connection string without a password, for messages."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(conninfo)
    except Exception:
        return "postgresql"
    host = params.get("host", "localhost")
    port = params.get("port", "5432")
    return f"postgresql://{host}:{port}/{params.get('dbname', '')}"


class _Common:
    """Options shared by the two clients."""

    kind = "postgresql"

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        connect_timeout: float = 5.0,
        unreachable_timeout: float = 30.0,
        application_name: str = "sessionfence",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.psycopg = load_psycopg()
        # Where managers keep their local copies of sessions between opens (one host;
        # docs/multihost.md); None: each manager copies the session into a temporary one.
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.conninfo = conninfo
        self.schema = check_schema_name(schema)
        self.sql = _Sql(schema)
        self.connect_timeout = connect_timeout
        self.unreachable_timeout = unreachable_timeout
        self.application_name = application_name
        self.label = _redacted(conninfo)
        self.reconnects = 0
        self._retryable: tuple[type[BaseException], ...] = (
            self.psycopg.OperationalError,
            self.psycopg.InterfaceError,
        )

    def _connect_kwargs(self) -> dict[str, Any]:
        return {
            "autocommit": True,
            "connect_timeout": max(1, int(self.connect_timeout)),
            "application_name": self.application_name,
        }

    def _append_call(
        self,
        session_id: str,
        entry: Mapping[str, Any],
        writer: SessionWriter,
        idempotency_key: str | None,
    ) -> _AppendCall:
        key = idempotency_key if idempotency_key is not None else "auto:" + uuid.uuid4().hex
        return _AppendCall(session_id, entry, writer, key, "parentId" in entry)


class PostgresStore(_Common):
    """Sessions in PostgreSQL, synchronous (psycopg 3). Thread-safe (one connection,
    used under a lock). ``conninfo``: a ``postgresql://`` URL or libpq key/value string;
    ``schema``: where the tables live (created and migrated on first use)."""

    def __init__(self, conninfo: str, **options: Any) -> None:
        super().__init__(conninfo, **options)
        self._conn: Any = None
        self._lock = threading.RLock()

    # connection -------------------------------------------------------------------------------

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            conn = self.psycopg.connect(self.conninfo, **self._connect_kwargs())
            try:
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _migrate(self, conn: Any) -> None:
        if conn.execute(self.sql.version_exists).fetchone()[0]:
            current = conn.execute(self.sql.current_version).fetchone()[0]
            if current == SCHEMA_VERSION:
                return
        for version, sql in MIGRATIONS:
            # One transaction per version, under the transaction-scoped lock; the version
            # is read again under it (another client may have migrated meanwhile).
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.sql.q}")
                conn.execute(self.sql.version_table)
                current = conn.execute(self.sql.current_version).fetchone()[0]
                _check_version(current)
                if version > current:
                    conn.execute(migration_sql(sql, self.schema).encode())
                    conn.execute(self.sql.record_version, (version,))

    def _run(self, op: Callable[[Any], T]) -> T:
        retry = _Retry(self.label, self.unreachable_timeout)
        with self._lock:
            while True:
                try:
                    return op(self._connection())
                except self._retryable as exc:
                    self.reconnects += 1
                    self._drop()
                    time.sleep(retry.next_delay(exc))

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _exec_one(sql: str, params: tuple[Any, ...], conn: Any) -> Any:
        return conn.execute(sql, params).fetchone()

    def schema_version(self) -> int:
        return int(self._run(lambda c: c.execute(self.sql.current_version).fetchone()[0]))

    # sessions ---------------------------------------------------------------------------------

    def create_session(self, session_id: str, header: Mapping[str, Any] | None = None) -> None:
        line = _header_line(header)

        def op(conn: Any) -> None:
            if conn.execute(self.sql.create, (session_id, line)).fetchone() is None:
                raise FileExistsError(f"session already exists: {session_id}")

        self._run(op)

    def claim(
        self,
        session_id: str,
        run_id: str | None = None,
        *,
        lease: float | None = None,
        force: bool = True,
    ) -> SessionWriter:
        """Claim the session for ``run_id`` (a fresh id when None); the run that held it is
        superseded. With ``lease`` (seconds) the claim expires on the server's clock, and
        ``force=False`` refuses (``SessionClaimHeldError``) while another run's lease runs."""
        run = run_id if run_id is not None else new_run_id()
        row = self._run(
            lambda c: c.execute(self.sql.claim, (session_id, run, lease, force)).fetchone()
        )
        return _claim_outcome(session_id, run, row)[0]

    def renew_lease(self, session_id: str, writer: SessionWriter) -> Any:
        """Renew the lease of ``writer``'s claim on the server's clock, without writing;
        returns the new ``lease_until`` (None when the claim has no lease). Raises
        ``SessionSupersededError`` when another run or revision holds the session (nothing
        changed). A claimant's every append renews its lease as well."""
        params = (session_id, writer.run_id, writer.revision)
        row = self._run(partial(self._exec_one, self.sql.renew, params))
        return _renew_outcome(session_id, writer, row)

    def release_lease(self, session_id: str, writer: SessionWriter) -> bool:
        """End the lease of ``writer``'s claim (its work on the session is done: the next
        claimant need not wait for the lease to expire). False when the claim is not the
        writer's any more (nothing changed). The claim stays until another run claims."""
        params = (session_id, writer.run_id, writer.revision)
        return _release_outcome(
            session_id, self._run(partial(self._exec_one, self.sql.release, params))
        )

    def lease_state(self, session_id: str) -> LeaseState:
        """The session's claim and lease as the server sees them now (its clock)."""
        row = self._run(partial(self._exec_one, self.sql.lease, (session_id,)))
        return _lease_state(session_id, row)

    def append(
        self,
        session_id: str,
        entry: Mapping[str, Any],
        *,
        writer: SessionWriter,
        idempotency_key: str | None = None,
    ) -> AppendResult:
        """Append one entry as ``writer``, in one transaction that checks a claimant's
        claim: ``SessionSupersededError`` when another run claimed the session, and nothing
        was written. Without ``parentId`` the entry hangs on the session's last entry (read,
        then checked at commit: rebuilt if the session moved on meanwhile)."""
        call = self._append_call(session_id, entry, writer, idempotency_key)
        for _ in range(_APPEND_TRIES):
            if call.needs_head():
                call.take_head(
                    self._run(lambda c: c.execute(self.sql.head, (session_id,)).fetchone())
                )
            result = call.take(self._run(partial(self._exec_one, self.sql.append, call.params())))
            if result is not None:
                return result
        raise RuntimeError("append kept racing other writers")  # pragma: no cover

    def append_as_cotenant(
        self,
        session_id: str,
        entry: Mapping[str, Any],
        *,
        writer: SessionWriter | str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        who = writer if isinstance(writer, SessionWriter) else SessionWriter.cotenant(writer)
        if who.role != "co-tenant":
            raise ValueError("append_as_cotenant needs a co-tenant writer")
        return self.append(session_id, entry, writer=who, idempotency_key=idempotency_key).entry_id

    def append_unfenced(self, session_id: str, line: bytes) -> None:
        text = line[:-1] if line.endswith(b"\n") else line
        ident, kind = _line_facts(text)
        params = (session_id, session_id, text, ident, kind)
        row = self._run(lambda c: c.execute(self.sql.foreign, params).fetchone())
        if row is None:
            raise KeyError(f"no such session: {session_id}")

    def fence_read(self, session_id: str, after_seq: int) -> FenceRead | None:
        params = (after_seq, FENCE_BATCH, session_id)
        rows = self._run(lambda c: c.execute(self.sql.fence_read, params).fetchall())
        return _fence_read(rows)

    def claims(self, session_id: str) -> list[tuple[int, str, str | None, int]]:
        """The session's claims in order: ``(revision, run_id, superseded_run, at_seq)``."""
        rows = self._run(lambda c: c.execute(self.sql.claims, (session_id,)).fetchall())
        return [(int(r[0]), r[1], r[2], int(r[3])) for r in rows]

    def entries(self, session_id: str) -> list[tuple[int, bytes, str, str | None, int, str]]:
        """Every line with its attribution: ``(seq, line, role, run_id, revision, key)``."""
        sql = (
            "SELECT seq, line, role, writer_run_id, revision, coalesce(idempotency_key, '') "
            f"FROM {self.sql.q}.sf_entries WHERE session_id = %s ORDER BY seq"
        )
        rows = self._run(lambda c: c.execute(sql, (session_id,)).fetchall())
        return [(int(r[0]), bytes(r[1]), r[2], r[3], int(r[4]), r[5]) for r in rows]

    # export / import --------------------------------------------------------------------------

    def read_lines(self, session_id: str) -> list[bytes]:
        def op(conn: Any) -> list[bytes]:
            rows = conn.execute(self.sql.lines, (session_id,)).fetchall()
            if not rows:
                raise KeyError(f"no such session: {session_id}")
            return list(_joined(iter((bytes(r[0]), bool(r[1])) for r in rows)))

        return self._run(op)

    def export_jsonl(self, session_id: str, dest: str) -> int:
        """Write the session to ``dest`` (replaced atomically) as the JSONL file it is,
        byte for byte; returns the size. Streams: memory does not grow with the session."""
        tmp = f"{dest}.tmp-{os.getpid()}"

        def op(conn: Any) -> int:
            size = 0
            with open(tmp, "wb") as f, conn.cursor() as cur:
                rows = cur.stream(self.sql.lines, (session_id,))
                for chunk in _joined((bytes(r[0]), bool(r[1])) for r in rows):
                    f.write(chunk)
                    size += len(chunk)
            return size

        try:
            size = self._run(op)
            if size == 0:
                raise KeyError(f"no such session: {session_id}")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return size

    def import_jsonl(self, session_id: str, src: str) -> int:
        """Create ``session_id`` from the JSONL file ``src``, byte for byte (blank and
        malformed lines too: an export gives the same file back); returns the line count.
        Lines stream into ``COPY`` as the file is read, in one transaction (memory does
        not grow with the file). Refuses a file that is not a session and a torn last
        line (nothing is created then)."""

        def op(conn: Any) -> int:
            importer = _Importer(session_id, src)
            with open(src, "rb") as f, conn.transaction():
                conn.execute(self.sql.import_session, (session_id, -1, None))
                with conn.cursor() as cur, cur.copy(self.sql.copy_entries) as copy:
                    for row in importer.rows(f):
                        copy.write_row(row)
                conn.execute(self.sql.imported, (importer.count - 1, importer.last_id, session_id))
            return importer.count

        return self._run(op)

    # fences -----------------------------------------------------------------------------------

    def async_twin(self) -> AsyncPostgresStore:
        """An ``AsyncPostgresStore`` on the same server and schema, with the same options
        (its own connection, made on first use; the caller closes it)."""
        return AsyncPostgresStore(
            self.conninfo,
            schema=self.schema,
            connect_timeout=self.connect_timeout,
            unreachable_timeout=self.unreachable_timeout,
            application_name=self.application_name,
        )

    async def open_fence(
        self,
        session_id: str,
        *,
        run_id: str | None = None,
        benign_policy: BenignPolicy | None = None,
        merge_foreign_entries: MergeFn | None = None,
    ) -> Any:
        """A fence on its own async connection (closed by ``dispose``)."""
        store = self.async_twin()
        try:
            return await store.open_fence(
                session_id,
                run_id=run_id,
                benign_policy=benign_policy,
                merge_foreign_entries=merge_foreign_entries,
                _owns_store=True,
            )
        except BaseException:
            await store.aclose()
            raise


def _check_version(current: int) -> None:
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"the database's sessionfence schema is version {current}, newer than this "
            f"library knows ({SCHEMA_VERSION}): upgrade sessionfence"
        )


class AsyncPostgresStore(_Common):
    """Sessions in PostgreSQL, asyncio (psycopg 3 ``AsyncConnection``); the methods of
    ``PostgresStore`` as coroutines, and the fence. One connection, used under a lock."""

    def __init__(self, conninfo: str, **options: Any) -> None:
        super().__init__(conninfo, **options)
        self._conn: Any = None
        self._lock: asyncio.Lock | None = None

    async def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            conn = await self.psycopg.AsyncConnection.connect(
                self.conninfo, **self._connect_kwargs()
            )
            try:
                await self._migrate(conn)
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _migrate(self, conn: Any) -> None:
        if (await (await conn.execute(self.sql.version_exists)).fetchone())[0]:
            current = (await (await conn.execute(self.sql.current_version)).fetchone())[0]
            if current == SCHEMA_VERSION:
                return
        for version, sql in MIGRATIONS:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.sql.q}")
                await conn.execute(self.sql.version_table)
                current = (await (await conn.execute(self.sql.current_version)).fetchone())[0]
                _check_version(current)
                if version > current:
                    await conn.execute(migration_sql(sql, self.schema).encode())
                    await conn.execute(self.sql.record_version, (version,))

    async def _run(self, op: Callable[[Any], Awaitable[T]]) -> T:
        if self._lock is None:
            self._lock = asyncio.Lock()
        retry = _Retry(self.label, self.unreachable_timeout)
        async with self._lock:
            while True:
                try:
                    return await op(await self._connection())
                except self._retryable as exc:
                    self.reconnects += 1
                    await self._drop()
                    await asyncio.sleep(retry.next_delay(exc))

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _one(self, sql: str, params: tuple[Any, ...]) -> Any:
        async def op(conn: Any) -> Any:
            return await (await conn.execute(sql, params)).fetchone()

        return await self._run(op)

    async def create_session(
        self, session_id: str, header: Mapping[str, Any] | None = None
    ) -> None:
        if await self._one(self.sql.create, (session_id, _header_line(header))) is None:
            raise FileExistsError(f"session already exists: {session_id}")

    async def claim(
        self,
        session_id: str,
        run_id: str | None = None,
        *,
        lease: float | None = None,
        force: bool = True,
    ) -> SessionWriter:
        run = run_id if run_id is not None else new_run_id()
        return (await self._claim(session_id, run, lease, force))[0]

    async def _claim(
        self, session_id: str, run: str, lease: float | None, force: bool
    ) -> tuple[SessionWriter, Any]:
        row = await self._one(self.sql.claim, (session_id, run, lease, force))
        return _claim_outcome(session_id, run, row)

    async def renew_lease(self, session_id: str, writer: SessionWriter) -> Any:
        params = (session_id, writer.run_id, writer.revision)
        return _renew_outcome(session_id, writer, await self._one(self.sql.renew, params))

    async def release_lease(self, session_id: str, writer: SessionWriter) -> bool:
        params = (session_id, writer.run_id, writer.revision)
        return _release_outcome(session_id, await self._one(self.sql.release, params))

    async def lease_state(self, session_id: str) -> LeaseState:
        return _lease_state(session_id, await self._one(self.sql.lease, (session_id,)))

    async def append(
        self,
        session_id: str,
        entry: Mapping[str, Any],
        *,
        writer: SessionWriter,
        idempotency_key: str | None = None,
    ) -> AppendResult:
        call = self._append_call(session_id, entry, writer, idempotency_key)
        for _ in range(_APPEND_TRIES):
            if call.needs_head():
                call.take_head(await self._one(self.sql.head, (session_id,)))
            result = call.take(await self._one(self.sql.append, call.params()))
            if result is not None:
                return result
        raise RuntimeError("append kept racing other writers")  # pragma: no cover

    async def append_as_cotenant(
        self,
        session_id: str,
        entry: Mapping[str, Any],
        *,
        writer: SessionWriter | str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        who = writer if isinstance(writer, SessionWriter) else SessionWriter.cotenant(writer)
        if who.role != "co-tenant":
            raise ValueError("append_as_cotenant needs a co-tenant writer")
        result = await self.append(session_id, entry, writer=who, idempotency_key=idempotency_key)
        return result.entry_id

    async def fence_read(self, session_id: str, after_seq: int) -> FenceRead | None:
        async def op(conn: Any) -> list[Any]:
            cur = await conn.execute(self.sql.fence_read, (after_seq, FENCE_BATCH, session_id))
            return list(await cur.fetchall())

        return _fence_read(await self._run(op))

    async def known_ids(self, session_id: str, ids: list[str], upto_seq: int) -> set[str]:
        async def op(conn: Any) -> list[Any]:
            cur = await conn.execute(self.sql.known_ids, (session_id, ids, upto_seq))
            return list(await cur.fetchall())

        return {r[0] for r in await self._run(op)}

    async def open_fence(
        self,
        session_id: str,
        *,
        run_id: str | None = None,
        benign_policy: BenignPolicy | None = None,
        merge_foreign_entries: MergeFn | None = None,
        _owns_store: bool = False,
    ) -> Any:
        """Claim the session for ``run_id`` and return its ``PostgresFence``."""
        from ._fence import PostgresFence

        return await PostgresFence.open(
            self,
            session_id,
            run_id=run_id,
            benign_policy=benign_policy,
            merge_foreign_entries=merge_foreign_entries,
            owns_store=_owns_store,
        )
