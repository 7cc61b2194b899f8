"""Fixtures for the store tests: a real, throwaway PostgreSQL server (initdb + pg_ctl in a
temporary directory, session-scoped; no mocks), and ``store`` parametrized over the file
store and the PostgreSQL store so the shared tests run against both."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from sessionfence.store import FileStore, PostgresStore, TempPostgres, find_pg_bindir

try:
    import psycopg  # noqa: F401

    HAVE_PSYCOPG = True
except ImportError:  # pragma: no cover
    HAVE_PSYCOPG = False


def pg_skip_reason() -> str | None:
    if not HAVE_PSYCOPG:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    if os.environ.get("SESSIONFENCE_TEST_PG_URL"):
        return None
    if find_pg_bindir() is None:
        return "no PostgreSQL server binaries (apt-get install postgresql)"
    return None


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A server for the whole test session: SESSIONFENCE_TEST_PG_URL, or a throwaway one."""
    reason = pg_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    url = os.environ.get("SESSIONFENCE_TEST_PG_URL")
    if url:
        yield url
        return
    server = TempPostgres(durable=False).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[PostgresStore]:
    store = PostgresStore(pg_url, schema="sf_test", unreachable_timeout=20.0)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(params=["file", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[object]:
    if request.param == "file":
        yield FileStore(tmp_path)
        return
    pg = request.getfixturevalue("pg_store")
    yield pg


@pytest.fixture
def session_id(store: object) -> str:
    sid = "s-" + uuid.uuid4().hex[:12]
    store.create_session(sid)  # type: ignore[attr-defined]
    return sid
