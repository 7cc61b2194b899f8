"""Stores: where sessions live, one host (files) or many (PostgreSQL).

``FileStore`` is today's JSONL + write lock + owned-write journal (the embedded default,
unchanged). ``PostgresStore`` (sync) and ``AsyncPostgresStore`` (asyncio) keep sessions in
PostgreSQL, where the writer claim is checked in the same transaction as every append, so
a superseded run's write never commits, from any host (docs/multihost.md). Both hand out
fences (``await store.open_fence(session_id, run_id=...)``) with the same semantics: owned,
co-tenant, benign by policy, takeover, superseded.

The PostgreSQL store needs psycopg 3 (``pip install 'sessionfence[postgres]'``), imported
only when a PostgreSQL store is made. ``TempPostgres`` starts a throwaway server from the
installed binaries (tests, benchmarks, ``sessionfence fleet --store postgresql``).
"""

from __future__ import annotations

from typing import Any

from ._base import (
    AppendResult,
    MergeFn,
    SessionClaimHeldError,
    SessionStore,
    StoreFence,
    StoreUnavailableError,
)
from ._controller import StoreFenceController
from ._file import FileFence, FileStore
from ._manager import StoreSessionManager
from ._postgres import AsyncPostgresStore, LeaseState, PostgresStore, load_psycopg
from ._schema import SCHEMA_VERSION
from ._server import PostgresBinariesMissing, TempPostgres, find_pg_bindir

__all__ = [
    "SCHEMA_VERSION",
    "AppendResult",
    "AsyncPostgresStore",
    "FileFence",
    "FileStore",
    "LeaseState",
    "MergeFn",
    "PostgresBinariesMissing",
    "PostgresStore",
    "SessionClaimHeldError",
    "SessionStore",
    "StoreFence",
    "StoreFenceController",
    "StoreSessionManager",
    "StoreUnavailableError",
    "TempPostgres",
    "find_pg_bindir",
    "load_psycopg",
    "open_store",
]


def open_store(where: str, **options: Any) -> SessionStore:
    """A ``PostgresStore`` for a ``postgresql://`` / ``postgres://`` URL, else a
    ``FileStore`` rooted at the directory ``where``."""
    if where.startswith(("postgresql://", "postgres://")):
        return PostgresStore(where, **options)
    return FileStore(where, **options)
