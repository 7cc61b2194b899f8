"""PostgreSQL store specifics, against a real throwaway server: schema and migrations,
byte-exact export/import, keyset fence reads, rewrites, leases on the server clock,
concurrency, connection loss, server restart and an unreachable server."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from typing import Any

import pytest

from sessionfence import (
    NotASessionError,
    SessionSupersededError,
    SessionTakeoverError,
    TornTranscriptError,
)
from sessionfence.store import (
    SCHEMA_VERSION,
    AsyncPostgresStore,
    PostgresStore,
    SessionClaimHeldError,
    StoreUnavailableError,
    TempPostgres,
)

from .conftest import pg_skip_reason


def msg(role: str, text: str) -> dict[str, Any]:
    return {"type": "message", "message": {"role": role, "content": text}}


def new_id() -> str:
    return "p-" + uuid.uuid4().hex[:12]


def test_schema_is_created_and_versioned(pg_url: str) -> None:
    store = PostgresStore(pg_url, schema="sf_fresh_" + uuid.uuid4().hex[:6])
    try:
        assert store.schema_version() == SCHEMA_VERSION
        # A second client on the migrated schema: no migration, same version.
        assert PostgresStore(pg_url, schema=store.schema).schema_version() == SCHEMA_VERSION
    finally:
        store.close()


def test_newer_schema_is_refused(pg_url: str) -> None:
    schema = "sf_newer_" + uuid.uuid4().hex[:6]
    store = PostgresStore(pg_url, schema=schema)
    store.schema_version()
    store._run(lambda c: c.execute(f'INSERT INTO "{schema}".sf_schema_version VALUES (%s)', (99,)))
    store.close()
    with pytest.raises(RuntimeError, match="newer than this library"):
        PostgresStore(pg_url, schema=schema).schema_version()


def test_schema_name_is_checked(pg_url: str) -> None:
    with pytest.raises(ValueError):
        PostgresStore(pg_url, schema='x"; drop table y; --')


ODD = (
    b'{"type":"session","version":3,"id":"h","timestamp":"t","cwd":"/"}\n'
    b"\n"
    b'{"type":"message","id":"a1","parentId":null,"timestamp":"t","message":{"role":"user",'
    b'"content":"h\xc3\xa9 \xe2\x80\xa8 \\u0000"}}\r\n'
    b"   \n"
    b"{not json at all\n"
    b'{"type":"custom","customType":"x","id":"b2","parentId":"a1","timestamp":"t"}'
)


def test_import_export_byte_identical(pg_store: PostgresStore, tmp_path: Any) -> None:
    src = tmp_path / "odd.jsonl"
    src.write_bytes(ODD)
    sid = new_id()
    assert pg_store.import_jsonl(sid, str(src)) == 6
    out = tmp_path / "out.jsonl"
    assert pg_store.export_jsonl(sid, str(out)) == len(ODD)
    assert out.read_bytes() == ODD
    # An append after an unterminated last line gets the separating newline, as in a file.
    ident = pg_store.append_as_cotenant(sid, msg("user", "next"))
    pg_store.export_jsonl(sid, str(out))
    data = out.read_bytes()
    assert data.startswith(ODD + b"\n") and data.endswith(b"\n")
    assert f'"id":"{ident}","parentId":"b2"'.encode() in data


def test_import_refuses_torn_tail_and_non_sessions(pg_store: PostgresStore, tmp_path: Any) -> None:
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(ODD[:60] + b"\n" + b'{"type":"mess')
    sid = new_id()
    with pytest.raises(TornTranscriptError) as info:
        pg_store.import_jsonl(sid, str(torn))
    assert info.value.offset == 61  # where the torn line starts
    with pytest.raises(KeyError):  # nothing was created: the COPY was rolled back
        pg_store.read_lines(sid)
    other = tmp_path / "other.jsonl"
    other.write_bytes(b'{"role":"user","content":"hi"}\n')
    with pytest.raises(NotASessionError):
        pg_store.import_jsonl(sid, str(other))
    with pytest.raises(KeyError):
        pg_store.read_lines(sid)
    # The same id imports fine afterwards: the refused imports left nothing behind.
    ok = tmp_path / "ok.jsonl"
    ok.write_bytes(ODD)
    assert pg_store.import_jsonl(sid, str(ok)) == 6
    assert b"".join(pg_store.read_lines(sid)) == ODD


async def test_fence_reads_only_new_lines(pg_store: PostgresStore, tmp_path: Any) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    for i in range(500):
        pg_store.append_as_cotenant(sid, msg("user", str(i)))
    fence = await pg_store.open_fence(sid, run_id="r")
    try:
        assert fence.last_seq == 500
        await fence.append(msg("user", "mine"))
        await fence.release_for_prompt()
        pg_store.append_as_cotenant(sid, msg("user", "gw"))
        await fence.reacquire_after_prompt()
        assert fence.lines_read == 2  # the own line and the co-tenant's, not 502
    finally:
        await fence.dispose()


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("UPDATE {t} SET line = line WHERE session_id = %s AND seq = 1", "rewritten"),
        ("DELETE FROM {t} WHERE session_id = %s AND seq = 2", "truncated"),
    ],
)
async def test_rewrite_behind_the_fence(pg_store: PostgresStore, sql: str, reason: str) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    fence = await pg_store.open_fence(sid, run_id="r")
    try:
        await fence.append(msg("user", "1"))
        await fence.append(msg("user", "2"))
        await fence.reacquire_after_prompt()
        await fence.release_for_prompt()
        table = f'"{pg_store.schema}".sf_entries'
        pg_store._run(lambda c: c.execute(sql.format(t=table), (sid,)))
        with pytest.raises(SessionTakeoverError) as info:
            await fence.reacquire_after_prompt()
        assert info.value.reason == reason
    finally:
        await fence.dispose()


async def test_deleted_session_is_a_takeover(pg_store: PostgresStore) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    fence = await pg_store.open_fence(sid, run_id="r")
    try:
        table = f'"{pg_store.schema}".sf_sessions'
        pg_store._run(lambda c: c.execute(f"DELETE FROM {table} WHERE session_id = %s", (sid,)))
        with pytest.raises(SessionTakeoverError) as info:
            await fence.reacquire_after_prompt()
        assert info.value.reason == "deleted"
    finally:
        await fence.dispose()


def test_lease_uses_the_server_clock(pg_store: PostgresStore) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    pg_store.claim(sid, "a", lease=0.3)
    with pytest.raises(SessionClaimHeldError) as info:
        pg_store.claim(sid, "b", lease=10, force=False)
    assert info.value.holder == "a"
    assert pg_store.claim(sid, "a", lease=0.3, force=False).revision == 1  # renewal
    time.sleep(0.4)
    assert pg_store.claim(sid, "b", lease=10, force=False).revision == 2
    assert [c[1] for c in pg_store.claims(sid)] == ["a", "b"]


def test_concurrent_appends_are_ordered_and_unique(pg_url: str) -> None:
    sid = new_id()
    stores = [PostgresStore(pg_url, schema="sf_test") for _ in range(4)]
    stores[0].create_session(sid)
    got: list[str] = []
    lock = threading.Lock()

    def work(store: PostgresStore, n: int) -> None:
        for i in range(50):
            ident = store.append_as_cotenant(
                sid, msg("user", f"{n}-{i}"), idempotency_key=f"{n}-{i}"
            )
            with lock:
                got.append(ident)

    threads = [threading.Thread(target=work, args=(s, n)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = stores[0].entries(sid)
    assert [r[0] for r in rows] == list(range(201))
    assert len(set(got)) == 200
    # Each line hangs on the line before it (parentId = the session's last entry at commit).
    import json

    values = [json.loads(r[1]) for r in rows[1:]]
    assert all(v["parentId"] == p["id"] for p, v in itertools.pairwise(values))
    for s in stores:
        s.close()


async def test_async_store(pg_url: str) -> None:
    store = AsyncPostgresStore(pg_url, schema="sf_test")
    try:
        sid = new_id()
        await store.create_session(sid)
        a = await store.append_as_cotenant(sid, msg("user", "x"), idempotency_key="k")
        b = await store.append_as_cotenant(sid, msg("user", "x"), idempotency_key="k")
        assert a == b
        fence = await store.open_fence(sid, run_id="r")
        await fence.append(msg("assistant", "y"))
        await fence.reacquire_after_prompt()
    finally:
        await store.aclose()


def test_terminated_backend_is_retried(pg_store: PostgresStore) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    pg_store.append_as_cotenant(sid, msg("user", "1"))
    killer = PostgresStore(pg_store.conninfo, schema="sf_test")
    pid = pg_store._run(lambda c: c.execute("SELECT pg_backend_pid()").fetchone()[0])
    killer._run(lambda c: c.execute("SELECT pg_terminate_backend(%s)", (pid,)))
    killer.close()
    pg_store.append_as_cotenant(sid, msg("user", "2"), idempotency_key="after-kill")
    assert len(pg_store.read_lines(sid)) == 3
    assert pg_store.reconnects >= 1


@pytest.mark.skipif(pg_skip_reason() is not None, reason=str(pg_skip_reason()))
async def test_server_restart_loses_and_duplicates_nothing() -> None:
    with TempPostgres(durable=False) as server:
        store = PostgresStore(server.url, unreachable_timeout=30)
        sid = new_id()
        store.create_session(sid)
        fence = await store.open_fence(sid, run_id="r")
        keys = [f"k{i}" for i in range(40)]
        errors: list[BaseException] = []

        def restart() -> None:
            try:
                time.sleep(0.05)
                server.restart("fast")
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)

        t = threading.Thread(target=restart)
        t.start()
        written = []
        for i, key in enumerate(keys):
            written.append(store.append_as_cotenant(sid, msg("user", str(i)), idempotency_key=key))
            await fence.append(msg("assistant", str(i)), idempotency_key="own-" + key)
            time.sleep(0.005)
        t.join()
        assert not errors and server.restarts == 1
        await fence.reacquire_after_prompt()
        rows = store.entries(sid)
        assert len(rows) == 1 + 2 * len(keys)  # nothing lost, nothing twice
        assert {r[5] for r in rows[1:]} == set(keys) | {"own-" + k for k in keys}
        # A retry of every append after the restart is a no-op.
        again = [store.append_as_cotenant(sid, msg("user", "x"), idempotency_key=k) for k in keys]
        assert again == written
        await fence.dispose()
        store.close()


@pytest.mark.skipif(pg_skip_reason() is not None, reason=str(pg_skip_reason()))
def test_unreachable_server_is_a_clear_error() -> None:
    server = TempPostgres(durable=False).start()
    url = server.url
    server.stop()
    store = PostgresStore(url, unreachable_timeout=1.0, connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        store.create_session("x")
    assert time.monotonic() - started < 5
    assert "unreachable for 1 s" in str(info.value)
    assert "password" not in str(info.value)


def _v1_schema(pg_url: str) -> str:
    """A schema at version 1 exactly as that version created it (its SQL, not the current
    library's), with one session, a claim and lines written through the v1 functions."""
    import psycopg

    from sessionfence.store._schema import MIGRATIONS, migration_sql

    schema = "sf_v1_" + uuid.uuid4().hex[:6]
    q = f'"{schema}"'
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {q}")
        conn.execute(
            f"CREATE TABLE {q}.sf_schema_version (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        assert MIGRATIONS[0][0] == 1
        conn.execute(migration_sql(MIGRATIONS[0][1], schema).encode())
        conn.execute(f"INSERT INTO {q}.sf_schema_version (version) VALUES (1)")
        conn.execute(
            f"INSERT INTO {q}.sf_sessions (session_id, last_seq) VALUES ('old', 0); "
            f"INSERT INTO {q}.sf_entries (session_id, seq, line, entry_type, role) VALUES "
            """('old', 0, '{"type":"session","version":3,"id":"h","timestamp":"t","cwd":"/"}',"""
            " 'session', 'header')"
        )
        conn.execute(f"SELECT * FROM {q}.sf_claim('old', 'run-a', NULL, true)")
        for key, line in (("k1", b'{"type":"message","id":"a1","parentId":null}'),):
            conn.execute(
                f"SELECT * FROM {q}.sf_append('old', %s, 'a1', 'message', 'claimant', "
                "'run-a', 1, %s, 0)",
                (line, key),
            )
        conn.execute(f"SELECT * FROM {q}.sf_claim('old', 'run-b', NULL, true)")
        # Version 1 answered a superseded claimant's retry from its key (the behaviour
        # version 2 changes): proof that this schema is really the old one.
        row = conn.execute(
            f"SELECT status FROM {q}.sf_append('old', 'x', 'a9', 'message', 'claimant', "
            "'run-a', 1, 'k1', NULL)"
        ).fetchone()
        assert row is not None and row[0] == "duplicate"
    return schema


def test_v1_database_migrates_to_the_current_version(pg_url: str) -> None:
    schema = _v1_schema(pg_url)
    store = PostgresStore(pg_url, schema=schema)
    try:
        before = store.read_lines("old")
        assert store.schema_version() == SCHEMA_VERSION == 3
        rows = store._run(
            lambda c: c.execute(
                f'SELECT version FROM "{schema}".sf_schema_version ORDER BY version'
            ).fetchall()
        )
        assert [r[0] for r in rows] == [1, 2, 3]
        assert store.read_lines("old") == before  # data untouched
        assert [c[1] for c in store.claims("old")] == ["run-a", "run-b"]
        # Version 2's claim-first rule on the migrated database.
        from sessionfence.journal import SessionWriter

        old = SessionWriter("run-a", role="claimant", revision=1)
        with pytest.raises(SessionSupersededError):
            store.append("old", msg("user", "retry"), writer=old, idempotency_key="k1")
        # Leases on the migrated database: an append renews them.
        writer = store.claim("old", "run-c", lease=30)
        store.append("old", msg("user", "c"), writer=writer)
        assert store.lease_state("old").live
        # A second client on the migrated schema sees the current version: no migration.
        other = PostgresStore(pg_url, schema=schema)
        assert other.schema_version() == SCHEMA_VERSION
        other.close()
    finally:
        store._run(lambda c: c.execute(f'DROP SCHEMA "{schema}" CASCADE'))
        store.close()


def test_appends_renew_the_lease_on_the_server_clock(pg_store: PostgresStore) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    a = pg_store.claim(sid, "a", lease=0.6)
    for _ in range(4):  # 0.8 s of activity: each append pushes the lease on
        time.sleep(0.2)
        pg_store.append(sid, msg("user", "x"), writer=a)
    with pytest.raises(SessionClaimHeldError):
        pg_store.claim(sid, "b", lease=10, force=False)
    time.sleep(0.3)
    assert pg_store.renew_lease(sid, a) is not None  # renewed without a write
    time.sleep(0.4)
    with pytest.raises(SessionClaimHeldError):
        pg_store.claim(sid, "b", lease=10, force=False)
    state = pg_store.lease_state(sid)
    assert (state.writer_run_id, state.revision, state.live) == ("a", 1, True)
    time.sleep(0.7)  # idle past its lease: expired on the server's clock
    assert not pg_store.lease_state(sid).live
    b = pg_store.claim(sid, "b", lease=10, force=False)
    assert b.revision == 2
    with pytest.raises(SessionSupersededError) as info:
        pg_store.renew_lease(sid, a)  # a renewal never claims back
    assert (info.value.superseded_by, info.value.new_revision) == ("b", 2)
    assert pg_store.lease_state(sid).writer_run_id == "b"


def test_release_ends_the_lease_and_only_the_own(pg_store: PostgresStore) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    a = pg_store.claim(sid, "a", lease=30)
    assert pg_store.release_lease(sid, a)
    b = pg_store.claim(sid, "b", lease=30, force=False)  # no wait: the lease was released
    assert not pg_store.release_lease(sid, a)  # not a's claim any more: nothing changes
    assert pg_store.lease_state(sid).live
    with pytest.raises(SessionClaimHeldError):
        pg_store.claim(sid, "c", lease=30, force=False)
    assert pg_store.renew_lease(sid, b) is not None
    # A claim without a lease: renewing says so (None), claims are not refused.
    c = pg_store.claim(sid, "c")
    assert pg_store.renew_lease(sid, c) is None
    assert pg_store.claim(sid, "d", force=False).revision == c.revision + 1


async def test_lease_kept_by_a_fence_of_the_same_run(pg_store: PostgresStore) -> None:
    """Claim with a lease, then open the fence as the same run: the fence's claim keeps
    the revision and the lease; its appends renew it."""
    sid = new_id()
    pg_store.create_session(sid)
    writer = pg_store.claim(sid, "a", lease=0.5, force=False)
    fence = await pg_store.open_fence(sid, run_id="a")
    try:
        assert fence.revision == writer.revision
        for _ in range(4):
            time.sleep(0.2)
            await fence.append(msg("user", "x"))
        with pytest.raises(SessionClaimHeldError):
            pg_store.claim(sid, "b", lease=10, force=False)
    finally:
        await fence.dispose()


def test_delete_moves_the_default_parent_back(pg_store: PostgresStore) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    first = pg_store.append_as_cotenant(sid, msg("user", "1"))
    pg_store.append_as_cotenant(sid, msg("user", "2"))
    table = f'"{pg_store.schema}".sf_entries'
    pg_store._run(
        lambda c: c.execute(f"DELETE FROM {table} WHERE session_id = %s AND seq = 2", (sid,))
    )
    third = pg_store.append_as_cotenant(sid, msg("user", "3"))
    import json

    lines = pg_store.read_lines(sid)
    assert len(lines) == 3
    assert json.loads(lines[2]) == {**json.loads(lines[2]), "id": third, "parentId": first}
