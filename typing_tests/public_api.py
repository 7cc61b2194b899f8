"""User code against sessionfence's public API; type-checked by ``mypy --strict``, never run.

See README.md here. The README's examples come first (as functions, so nothing runs at
import), then one use of every other public name, then the mistakes mypy must reject.
"""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path
from typing import Any

from typing_extensions import assert_type

import sessionfence as sf
from sessionfence import (
    SessionFenceController,
    SessionManager,
    SessionTakeoverError,
    SessionWriteLock,
    acquire_session_write_lock,
    acquire_session_write_lock_async,
)
from sessionfence.lock import LockInfo

# -- README: "Using it" ---------------------------------------------------------------------


def readme_check_append() -> None:
    with open("session.jsonl", "wb") as f:
        f.write(b'{"type":"session"}\n')
    before = sf.fingerprint("session.jsonl")  # stat + XXH3-64 of the last 4 KiB
    # the lock is released, the model thinks; meanwhile another writer appends a line:
    with open("session.jsonl", "ab") as f:
        f.write(b'{"type":"custom","customType":"note"}\n')
    change = sf.check_append("session.jsonl", before)
    assert change.kind is sf.ChangeKind.APPENDED
    new_lines = change.appended  # the bytes appended since (None above max_suffix, 1 MiB)
    assert new_lines == b'{"type":"custom","customType":"note"}\n'


# -- README: the controller ------------------------------------------------------------------


async def call_model(branch: list[dict[str, Any]]) -> dict[str, Any]:  # stub: your model
    await asyncio.sleep(0.01)
    return {"role": "assistant", "content": f"6 x 7 = 42 ({len(branch)} entries read)"}


async def readme_controller() -> None:
    ctl = await SessionFenceController.create("session.jsonl")  # takes the write lock
    try:
        manager = SessionManager.open("session.jsonl")  # read under the lock
        manager.append_message({"role": "user", "content": "What is 6 x 7?"})
        async with ctl.prompt_released():  # lock released while the model runs
            reply = await call_model(manager.branch())
        # leaving the block took the lock back and checked the fence: a takeover raises there,
        await ctl.with_write_lock(lambda: manager.append_message(reply))  # and in any write
        print("appended", manager.leaf_id)
    except SessionTakeoverError as exc:  # someone else changed the transcript: stop
        print("taken over:", exc.phase, exc.reason, exc.detail)  # where, which check, why
    finally:
        await ctl.dispose()  # releases the lock whatever happened


# -- README: a published write ---------------------------------------------------------------


async def steer(ctl: SessionFenceController, manager: SessionManager) -> str:
    return await ctl.with_write_lock(
        lambda: manager.append_message({"role": "user", "content": "steer"}),
        publish_owned_write=True,
        resolve_published_entries=lambda entry_id: [{"kind": "id", "id": entry_id}],
    )


async def readme_publication() -> None:
    manager = SessionManager.open("session.jsonl")
    manager.append_message({"role": "user", "content": "hi"})
    ctl = await SessionFenceController.create("session.jsonl")
    await ctl.release_for_prompt()  # its model thinks
    peer_view = SessionManager.open("session.jsonl")  # a second attempt on the session
    peer = await SessionFenceController.create(
        "session.jsonl", merge_foreign_entries=peer_view.merge_foreign_entries
    )
    try:
        await peer.release_for_prompt()  # the peer's model thinks too
        entry_id = await steer(ctl, manager)
        await peer.reacquire_after_prompt()  # its fence check merges the published entry
        assert peer_view.get_entry(entry_id) is not None
    finally:
        await peer.dispose()
        await ctl.dispose()


# -- The hot path: exact types, never Any ----------------------------------------------------


def hot_path(path: Path) -> None:
    assert_type(sf.BACKEND, str)
    assert_type(sf.__version__, str)
    before = sf.fingerprint(path, window=8192)
    assert_type(before, sf.Fingerprint)
    assert_type(sf.fingerprint_many([path, str(path)]), list[sf.Fingerprint])
    change = sf.check_append(os.fspath(path), before, window=4096, max_suffix=1 << 20)
    assert_type(change, sf.Change)
    assert_type(change.kind, sf.ChangeKind)
    assert_type(change.appended, bytes | None)
    if change.kind is sf.ChangeKind.APPENDED and change.appended is None:
        assert_type(sf.read_range(path, before.size, change.after.size - before.size), bytes)
    assert_type(sf.same_stat(before, change.after), bool)
    assert_type(sf.content_digest(path), int)
    assert_type(sf.MISSING, sf.Fingerprint)
    digest = sf.RollingDigest.from_file(path, before.size)
    digest.update(b"{}\n")
    assert_type(digest.copy().intdigest(), int)
    with sf.FileProbe(path) as probe:
        assert_type(probe.check_append(probe.fingerprint()), sf.Change)


# -- The lock --------------------------------------------------------------------------------


def lock(path: Path) -> None:
    held = acquire_session_write_lock(path, timeout=math.inf, max_hold=600.0, mode=0o660)
    assert_type(held, SessionWriteLock)
    with held:
        assert_type(held.generation, int)
        assert_type(held.lock_path, str)
    info = sf.inspect_lock(path)
    assert_type(info, LockInfo)
    assert_type(info.stale_reasons, list[str])
    assert_type(sf.clean_stale_locks(path.parent), list[str])
    try:
        acquire_session_write_lock(path, timeout=0)
    except sf.SessionWriteLockTimeoutError as exc:
        assert_type(exc.timeout_ms, float)
        assert_type(exc.lock_path, str)
    except sf.SessionWriteLockStaleError as exc:
        assert_type(exc.stale_reasons, list[str])


async def lock_async(path: Path) -> None:
    async with await acquire_session_write_lock_async(path, reentrant_owner="run-7") as held:
        assert_type(held, SessionWriteLock)


# -- Errors ----------------------------------------------------------------------------------


def errors(exc: Exception) -> None:
    if isinstance(exc, SessionTakeoverError):
        assert_type(exc.before, sf.Fingerprint | None)
        assert_type(exc.reason, str | None)
    if isinstance(exc, TimeoutError):  # both timeouts are TimeoutError
        pass
    timeout: TimeoutError = sf.SessionFileOwnerTimeoutError(10.0, "session.jsonl")
    lock_timeout: TimeoutError = sf.SessionWriteLockTimeoutError(1.0, "pid=1", "x.lock")
    inherited: RuntimeError = sf.LockInheritedError("x.lock")
    changed: RuntimeError = sf.TranscriptChangedError("emptied")
    print(timeout, lock_timeout, inherited, changed)


# -- Transcripts -----------------------------------------------------------------------------


def transcripts(path: Path) -> None:
    manager = sf.SessionManager.open(path)
    assert_type(manager.append_message({"role": "user", "content": "hi"}), str)
    assert_type(manager.leaf_id, str | None)
    guarded = sf.guard_session_manager(manager)
    assert_type(guarded, sf.SessionManager)
    assert_type(sf.is_expected_compaction_append("id-1", b"{}\n"), bool)
    assert_type(sf.migrate_transcript(path), sf.MigrationResult)
    # Large transcripts: the index, the model context, incremental reloads, lazy entries.
    big = sf.SessionManager.open(path, index=None, progress=lambda done, total: None)
    assert_type(big.context_entries(), list[dict[str, Any]])
    settings = big.context_settings()
    assert_type(settings, sf.ContextSettings)
    assert_type(settings.thinking_level, str | None)
    assert_type(settings.model, sf.ContextModel | None)
    assert_type(big.refresh(), int)
    assert_type(len(big.entries), int)
    assert_type(big.entries[0], dict[str, Any])
    sf.SessionManager.open(path, index="yes")  # type: ignore[arg-type]


# -- Writer claims and the owned-write journal -----------------------------------------------


async def ownership(path: Path) -> None:
    ctl = await SessionFenceController.create(path, run_id="worker-1", journal=True)
    assert_type(ctl.run_id, str)
    assert_type(ctl.revision, int)
    writer: sf.SessionWriter = ctl.writer
    manager = SessionManager.open(path, writer=writer)
    assert_type(manager.append_message({"role": "user"}, idempotency_key="k1"), str)
    gateway = sf.SessionWriter.cotenant("gateway")
    assert_type(sf.append_as_cotenant(path, {"type": "custom"}, writer=gateway), str)
    assert_type(sf.claim_session(path, run_id="worker-2"), sf.SessionWriter)
    info = sf.inspect_journal(path)
    assert_type(info, sf.JournalInfo)
    assert_type(info.problem, str | None)
    assert_type(sf.repair_journal(path), str | None)
    assert_type(sf.journal_path_for(path), str)
    try:
        await ctl.reacquire_after_prompt()
    except sf.SessionSupersededError as exc:
        assert_type(exc.superseded_by, str | None)
        base: SessionTakeoverError = exc
        print(base)
    except sf.JournalError as exc:
        assert_type(exc.detail, str)
    sync = sf.SyncSessionFenceController.create(path, run_id="worker-3")
    assert_type(sync.writer, sf.SessionWriter)


# -- One agent loop on either store (docs/multihost.md) --------------------------------------


async def either_store(url_or_dir: str) -> None:
    from sessionfence.store import FileStore, PostgresStore, open_store

    store = open_store(url_or_dir)
    manager = SessionManager.open("s1", store=store)
    ctl = await SessionFenceController.create(
        "s1", store=store, merge_foreign_entries=manager.merge_foreign_entries
    )
    assert_type(ctl, sf.FenceController)
    manager.writer = ctl.writer
    async with ctl.write_lock():
        assert_type(manager.append_message({"role": "user"}, idempotency_key="t1"), str)
    async with ctl.prompt_released():
        pass
    task = ctl.with_write_lock(lambda: manager.append_message({"role": "assistant"}))
    assert_type(await task, str)
    assert_type(ctl.takeover, SessionTakeoverError | None)
    await ctl.dispose()
    files = await SessionFenceController.create("s2", store=FileStore("/tmp/x"))
    assert_type(files, sf.FenceController)
    pg = await SessionFenceController.create("s3", store=PostgresStore("postgresql://h/db"))
    assert_type(pg.revision, int)
    plain = await SessionFenceController.create("/tmp/x.jsonl")
    assert_type(plain, SessionFenceController)
    checked: sf.FenceController = plain  # the file controller is a FenceController too
    print(checked)


# -- Mistakes a type checker must reject (each ignore must be needed) ------------------------


def mistakes(path: Path, before: sf.Fingerprint) -> None:
    sf.fingerprint("x", windw=3)  # type: ignore[call-arg]
    acquire_session_write_lock(path, timout=1)  # type: ignore[call-arg]
    acquire_session_write_lock(path, mode="660")  # type: ignore[arg-type]
    sf.check_append(path, "before")  # type: ignore[arg-type]
    sf.check_append(path, before, max_sufix=10)  # type: ignore[call-arg]
    sf.read_range(path, 0)  # type: ignore[call-arg]
    SessionManager.open(path, windw=3)  # type: ignore[call-arg]
    print(sf.SessionTakeoverError("x").reason + 1)  # type: ignore[operator]
    print(sf.fingerprnt)  # type: ignore[attr-defined]
    sf.append_as_cotenant(path, {"type": "custom"}, idempotency_key=7)  # type: ignore[arg-type]
    sf.SessionWriter(role="owner")  # type: ignore[arg-type]
    SessionManager.open("s1", store="postgresql://h/db")  # type: ignore[arg-type]
