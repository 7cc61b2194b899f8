"""The transcript model and the controller on a PostgreSQL session: what only a store has
(its local copy kept in step, rewrites in the database, imported sessions, batches), against
a real server."""

from __future__ import annotations

import errno
import json
import os
import sys
import uuid
from typing import Any

import psycopg
import pytest

from sessionfence import (
    SessionFenceController,
    SessionManager,
    SessionTakeoverError,
    TranscriptNeedsMigrationError,
)
from sessionfence.journal import SessionWriter
from sessionfence.store import AsyncPostgresStore, PostgresStore, StoreSessionManager, _mirror


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def new_id() -> str:
    return "s-" + uuid.uuid4().hex[:12]


def exported(store: PostgresStore, sid: str, tmp_path: Any) -> bytes:
    dest = os.path.join(tmp_path, f"{sid}.export.jsonl")
    store.export_jsonl(sid, dest)
    with open(dest, "rb") as f:
        return f.read()


def local_copy(manager: SessionManager) -> bytes:
    with open(manager.path, "rb") as f:
        return f.read()


def test_local_copy_follows_the_store_byte_for_byte(pg_store: PostgresStore, tmp_path: Any) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    writer = pg_store.claim(sid, run_id="run-a")
    manager = SessionManager.open(sid, store=pg_store, writer=writer)
    assert isinstance(manager, StoreSessionManager)
    for n in range(4):
        manager.append_message(user(f"own {n}"))
        # other writers land between our appends: copied in front of ours, in store order
        pg_store.append_as_cotenant(sid, {"type": "message", "message": user(f"co {n}")})
        pg_store.append_unfenced(sid, b"{not json")
    manager.append_message(user("last"))
    assert local_copy(manager) == exported(pg_store, sid, tmp_path)
    manager.refresh()
    fresh = SessionManager.open(sid, store=pg_store)
    assert [e["id"] for e in manager.entries] == [e["id"] for e in fresh.entries]
    assert manager.malformed_lines == fresh.malformed_lines == 4
    assert manager.leaf_id == fresh.leaf_id


def test_rewritten_lines_in_the_database_are_read_as_they_are_now(
    pg_store: PostgresStore, pg_url: str
) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    writer = pg_store.claim(sid, run_id="run-a")
    manager = SessionManager.open(sid, store=pg_store, writer=writer)
    first = manager.append_message(user("original"))
    manager.append_message(user("second"))
    edited = json.loads(pg_store.read_lines(sid)[1])
    edited["message"]["content"] = "edited in the database"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE sf_test.sf_entries SET line = %s WHERE session_id = %s AND seq = 1",
            (json.dumps(edited).encode(), sid),
        )
    manager.refresh()
    got = manager.get_entry(first)
    assert got is not None and got["message"]["content"] == "edited in the database"
    assert [e["message"]["content"] for e in manager.entries][1] == "second"


def test_a_session_deleted_from_the_store_reads_as_missing(
    pg_store: PostgresStore, pg_url: str
) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    manager = SessionManager.open(sid, store=pg_store)
    assert manager.header is not None
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DELETE FROM sf_test.sf_entries WHERE session_id = %s", (sid,))
        conn.execute("DELETE FROM sf_test.sf_sessions WHERE session_id = %s", (sid,))
    manager.reload()
    assert manager.header is None and len(manager.entries) == 0
    assert not os.path.exists(manager.path)


def test_imported_session_with_unterminated_last_line(
    pg_store: PostgresStore, tmp_path: Any
) -> None:
    src = os.path.join(tmp_path, "in.jsonl")
    header = {"type": "session", "version": 3, "id": "h", "timestamp": "t", "cwd": "/"}
    line = {"type": "message", "id": "aa", "parentId": None, "timestamp": "t"}
    with open(src, "wb") as f:  # the last line lacks its newline: a complete entry
        f.write((json.dumps(header) + "\n" + json.dumps(line | {"message": user("x")})).encode())
    sid = new_id()
    pg_store.import_jsonl(sid, src)
    writer = pg_store.claim(sid, run_id="run-a")
    manager = SessionManager.open(sid, store=pg_store, writer=writer)
    assert manager.unterminated_last_line
    ident = manager.append_message(user("after"))
    assert local_copy(manager) == exported(pg_store, sid, tmp_path)
    fresh = SessionManager.open(sid, store=pg_store)
    assert [e["id"] for e in fresh.entries] == ["aa", ident]
    assert fresh.get_entry(ident)["parentId"] == "aa"  # type: ignore[index]


def test_long_sessions_are_copied_in_batches(pg_store: PostgresStore, tmp_path: Any) -> None:
    src = os.path.join(tmp_path, "long.jsonl")
    n = 25_000  # more than two batches of the copy
    with open(src, "wb") as f:
        f.write(b'{"type":"session","version":3,"id":"h","timestamp":"t","cwd":"/"}\n')
        parent = None
        for i in range(n):
            ident = f"e{i:07d}"
            entry = {"type": "message", "id": ident, "parentId": parent, "timestamp": "t"}
            f.write((json.dumps(entry | {"message": user(str(i))}) + "\n").encode())
            parent = ident
    sid = new_id()
    pg_store.import_jsonl(sid, src)
    manager = SessionManager.open(sid, store=pg_store)
    assert len(manager.entries) == n
    assert manager.leaf_id == f"e{n - 1:07d}"
    assert local_copy(manager) == exported(pg_store, sid, tmp_path)


def test_appends_need_a_writer_and_nothing_lands_without_one(pg_store: PostgresStore) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    manager = SessionManager.open(sid, store=pg_store)
    with pytest.raises(ValueError, match="writer"):
        manager.append_message(user("who am I"))
    assert len(pg_store.read_lines(sid)) == 1
    manager.writer = SessionWriter.cotenant("hook")
    manager.append_message(user("a hook"))
    assert len(pg_store.read_lines(sid)) == 2


def test_the_local_copy_is_private_and_removed(pg_store: PostgresStore) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    a = SessionManager.open(sid, store=pg_store)
    b = SessionManager.open(sid, store=pg_store)
    assert a.path != b.path  # never shared, even in one process
    assert os.stat(a.path).st_mode & 0o077 == 0
    directory = os.path.dirname(a.path)
    a.close()  # type: ignore[attr-defined]
    assert not os.path.exists(directory)
    del b  # garbage collection removes it too


def test_a_manager_needs_the_synchronous_store(pg_url: str) -> None:
    store = AsyncPostgresStore(pg_url, schema="sf_test")
    with pytest.raises(TypeError, match="PostgresStore"):
        SessionManager.open(new_id(), store=store)  # type: ignore[arg-type]


async def test_file_only_options_are_refused_on_postgresql(pg_store: PostgresStore) -> None:
    with pytest.raises(ValueError, match="journal=False"):
        await SessionFenceController.create(new_id(), store=pg_store, journal=False)
    with pytest.raises(ValueError, match="no write lock"):
        await SessionFenceController.create(new_id(), store=pg_store, acquire=lambda p, **o: 0)
    with pytest.raises(ValueError, match="verify"):
        await SessionFenceController.create(new_id(), store=pg_store, verify="some")  # type: ignore[call-overload]


async def test_a_controller_on_an_async_store_leaves_it_open(pg_url: str) -> None:
    store = AsyncPostgresStore(pg_url, schema="sf_test")
    sid = new_id()
    await store.create_session(sid)
    ctl = await SessionFenceController.create(sid, store=store, run_id="run-a")
    assert ctl.session_file == f"postgresql:{sid}"
    await ctl.dispose()
    writer = await store.claim(sid, run_id="run-b")  # the store still works
    assert writer.revision == ctl.revision + 1
    await store.aclose()


# -- the copy kept between managers (PostgresStore(cache_dir=...)) ------------------------


@pytest.fixture
def cached(pg_url: str, tmp_path: Any) -> Any:
    store = PostgresStore(pg_url, schema="sf_test", cache_dir=os.path.join(tmp_path, "cache"))
    try:
        yield store
    finally:
        store.close()


def grow(store: PostgresStore, sid: str, n: int) -> None:
    for i in range(n):
        store.append_as_cotenant(sid, {"type": "message", "message": user(f"m{i}")})


def test_a_cached_copy_is_resumed_with_only_the_new_lines(cached: PostgresStore) -> None:
    sid = new_id()
    cached.create_session(sid)
    grow(cached, sid, 20)
    first = SessionManager.open(sid, store=cached)
    assert first.lines_copied == 21  # type: ignore[attr-defined]
    path = first.path
    first.close()  # type: ignore[attr-defined]
    assert os.path.exists(path)  # kept for the next manager
    grow(cached, sid, 3)
    second = SessionManager.open(sid, store=cached)
    assert second.path == path
    assert second.lines_copied == 3  # type: ignore[attr-defined]
    assert [e["id"] for e in second.entries] == [
        e["id"]
        for e in SessionManager.open(
            sid, store=PostgresStore(cached.conninfo, schema="sf_test")
        ).entries
    ]
    writer = cached.claim(sid, run_id="run-a")
    second.writer = writer
    second.append_message(user("own"))
    second.close()  # type: ignore[attr-defined]
    third = SessionManager.open(sid, store=cached)
    assert third.lines_copied == 0  # type: ignore[attr-defined]
    assert len(third.entries) == 24


def test_a_busy_cached_copy_is_not_shared(cached: PostgresStore) -> None:
    sid = new_id()
    cached.create_session(sid)
    a = SessionManager.open(sid, store=cached)
    b = SessionManager.open(sid, store=cached)  # a holds the cached copy: b gets its own
    assert os.path.dirname(a.path) == cached.cache_dir
    assert os.path.dirname(b.path) != cached.cache_dir
    b.close()  # type: ignore[attr-defined]
    a.close()  # type: ignore[attr-defined]
    c = SessionManager.open(sid, store=cached)
    assert c.path == a.path


@pytest.mark.parametrize("damage", ["edited", "truncated", "state", "rewritten"])
def test_any_doubt_about_a_cached_copy_copies_again(
    cached: PostgresStore, pg_url: str, damage: str
) -> None:
    sid = new_id()
    cached.create_session(sid)
    grow(cached, sid, 5)
    first = SessionManager.open(sid, store=cached)
    path = first.path
    first.close()  # type: ignore[attr-defined]
    if damage == "edited":  # same size, other bytes at the end
        with open(path, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"X}\n")
    elif damage == "truncated":  # e.g. a process killed while copying
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 10)
    elif damage == "state":
        with open(path[: -len(".jsonl")] + ".state", "w") as f:
            f.write("{not json")
    else:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE sf_test.sf_entries SET line = line WHERE session_id = %s AND seq = 2",
                (sid,),
            )
    again = SessionManager.open(sid, store=cached)
    assert again.lines_copied == 6  # type: ignore[attr-defined]
    assert again.malformed_lines == 0
    with open(path, "rb") as f:
        assert f.read() == b"".join(cached.read_lines(sid))


def test_entries_outlive_their_manager(pg_store: PostgresStore) -> None:
    import gc

    sid = new_id()
    pg_store.create_session(sid)
    grow(pg_store, sid, 3)
    entries = SessionManager.open(sid, store=pg_store, index=True).entries
    gc.collect()  # the manager is gone; its copy stays while its rows are referenced
    assert [e["message"]["content"] for e in entries] == ["m0", "m1", "m2"]


# -- regressions from a review ----------------------------------------------------------


def recreate(pg_url: str, store: PostgresStore, sid: str) -> None:
    """Delete the session and make it again under the same id (its generation restarts)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DELETE FROM sf_test.sf_entries WHERE session_id = %s", (sid,))
        conn.execute("DELETE FROM sf_test.sf_sessions WHERE session_id = %s", (sid,))
    store.create_session(sid)


@pytest.mark.parametrize("cache", [False, True])
def test_a_session_made_again_under_its_id_is_copied_again(
    pg_url: str, tmp_path: Any, cache: bool
) -> None:
    cache_dir = os.path.join(tmp_path, "cache") if cache else None
    store = PostgresStore(pg_url, schema="sf_test", cache_dir=cache_dir)
    sid = new_id()
    store.create_session(sid)
    grow(store, sid, 3)
    manager = SessionManager.open(sid, store=store)
    if cache:
        manager.close()
    recreate(pg_url, store, sid)
    grow(store, sid, 3)  # as many lines as before: only the session row's birth differs
    if cache:
        manager = SessionManager.open(sid, store=store)
    else:
        manager.refresh()
    with open(manager.path, "rb") as f:
        assert f.read() == b"".join(store.read_lines(sid))
    assert [e["id"] for e in manager.entries] == [
        json.loads(x)["id"] for x in store.read_lines(sid)[1:]
    ]
    store.close()


def test_a_cached_copy_edited_in_its_middle_is_copied_again(cached: PostgresStore) -> None:
    sid = new_id()
    cached.create_session(sid)
    grow(cached, sid, 3)
    first = SessionManager.open(sid, store=cached)
    path = first.path
    first.close()
    with open(path, "r+b") as f:  # same size, same inode, the last line untouched
        data = f.read()
        f.seek(data.index(b"m0"))
        f.write(b"XX")
    again = SessionManager.open(sid, store=cached)
    assert again.lines_copied == 4  # type: ignore[attr-defined]
    assert [e["message"]["content"] for e in again.entries] == ["m0", "m1", "m2"]


def test_a_copy_changed_behind_the_manager_is_copied_again(pg_store: PostgresStore) -> None:
    """e.g. migrate_transcript run on the copy a migration error named: the store still
    holds the session as it was, and so does the model after the next sync."""
    sid = new_id()
    pg_store.create_session(sid)
    grow(pg_store, sid, 2)
    manager = SessionManager.open(sid, store=pg_store, writer=SessionWriter.cotenant("hook"))
    with open(manager.path, "ab") as f:
        f.write(b'{"type":"custom","customType":"only in the copy","id":"aaaa0001"}\n')
    manager.append_message(user("own"))
    manager.refresh()
    with open(manager.path, "rb") as f:
        assert f.read() == b"".join(pg_store.read_lines(sid))
    assert not manager.has_entry("aaaa0001")


def test_a_stored_v1_session_is_refused_naming_the_session(
    pg_store: PostgresStore, tmp_path: Any
) -> None:
    src = os.path.join(tmp_path, "v1.jsonl")
    with open(src, "wb") as f:
        f.write(b'{"type":"session","id":"old","timestamp":"t","cwd":"/"}\n')
        f.write(b'{"type":"message","timestamp":"t","message":{"role":"user","content":"x"}}\n')
    sid = new_id()
    pg_store.import_jsonl(sid, src)
    manager = SessionManager.open(sid, store=pg_store, writer=SessionWriter.cotenant("hook"))
    with pytest.raises(TranscriptNeedsMigrationError) as info:
        manager.append_message(user("y"))
    assert info.value.session_file == f"postgresql:{sid}"
    assert "import_jsonl" in str(info.value)
    assert len(pg_store.read_lines(sid)) == 2


def test_an_append_that_committed_is_not_reported_failed(
    pg_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local copy cannot be written (a full disk, injected) after the store committed:
    the append still succeeds (raising would invite a retry, a duplicate), the model has
    the entry, and the next sync copies the session again."""
    sid = new_id()
    pg_store.create_session(sid)
    manager = SessionManager.open(sid, store=pg_store, writer=SessionWriter.cotenant("bot"))
    real = _mirror.StoreMirror._write

    def full_disk(self: Any, target: str, lines: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_mirror.StoreMirror, "_write", full_disk)
    ident = manager.append_message(user("turn 1"))
    assert manager.leaf_id == ident
    monkeypatch.setattr(_mirror.StoreMirror, "_write", real)
    manager.refresh()
    assert [e["id"] for e in manager.entries] == [ident]
    with open(manager.path, "rb") as f:
        assert f.read() == b"".join(pg_store.read_lines(sid))


def test_a_closed_manager_refuses_before_the_store(pg_store: PostgresStore) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    manager = SessionManager.open(sid, store=pg_store, writer=SessionWriter.cotenant("bot"))
    manager.close()
    manager.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        manager.append_message(user("after close"))
    with pytest.raises(ValueError, match="closed"):
        manager.refresh()
    assert len(pg_store.read_lines(sid)) == 1


def test_a_forked_child_leaves_the_parents_copy(pg_store: PostgresStore) -> None:
    sid = new_id()
    pg_store.create_session(sid)
    manager = SessionManager.open(sid, store=pg_store)
    pid = os.fork()
    if pid == 0:  # the child exits normally: finalizers run
        try:
            sys.exit(0)
        finally:
            import weakref

            weakref.finalize._exitfunc()  # type: ignore[attr-defined]  # what exit runs
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.path.exists(manager.path)


async def test_a_truncate_of_the_lines_fails_fences_closed(pg_url: str) -> None:
    """TRUNCATE fires no row trigger; the schema's statement trigger (version 3) moves every
    session's end back, so the fence sees a truncation and the copy is made again."""
    schema = "sf_trunc_" + uuid.uuid4().hex[:8]
    store = PostgresStore(pg_url, schema=schema)
    try:
        sid = new_id()
        manager = SessionManager.open(sid, store=store)
        ctl = await SessionFenceController.create(sid, store=store, run_id="run-a")
        manager.writer = ctl.writer
        async with ctl.write_lock():
            manager.append_message(user("hi"))
        await ctl.release_for_prompt()
        store._run(lambda c: c.execute(f'TRUNCATE "{schema}".sf_entries'))
        with pytest.raises(SessionTakeoverError) as info:
            await ctl.reacquire_after_prompt()
        assert info.value.reason == "truncated"
        await ctl.dispose()
        manager.refresh()
        assert manager.header is None and len(manager.entries) == 0
        assert os.path.getsize(manager.path) == 0
    finally:
        store._run(lambda c: c.execute(f'DROP SCHEMA "{schema}" CASCADE'))
        store.close()
