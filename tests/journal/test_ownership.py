"""Explicit ownership across processes (issue 13), with real processes, files and locks:
co-tenant appends accepted without a false takeover, foreign bytes beside them still a
takeover, SIGKILL at every step of a journaled append, a damaged journal failing closed,
supersession visible at the fence and refused at commit, idempotent retries."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sessionfence import (
    JournalError,
    SessionFenceController,
    SessionManager,
    SessionSupersededError,
    SessionTakeoverError,
    SessionWriter,
    acquire_session_write_lock,
    append_as_cotenant,
    claim_session,
    inspect_journal,
    repair_journal,
)
from sessionfence.journal._writer import journaled
from tests.controller.helpers import append_entries, line, user_message
from tests.journal.helpers import damage_journal, die, in_child, journal_of

pytestmark = pytest.mark.usefixtures("backend")


# -- what the child processes do ---------------------------------------------------------------


def cotenant_append(path: str, text: str, key: str | None = None) -> str:
    entry = {"type": "message", "message": {"role": "user", "content": text}}
    return append_as_cotenant(path, entry, writer="gateway", idempotency_key=key)


def fresh_cotenant_append(path: str, text: str) -> str:
    """As a process that never saw the journal before (a forked child inherits what its
    parent last read of it)."""
    from sessionfence.journal._writer import forget_all

    forget_all()
    return cotenant_append(path, text)


STEPS = ["before-record", "after-record", "after-bytes", "after-commit"]


def killed_append(path: str, step: str, role: str, key: str | None = None) -> None:
    """A journaled append that SIGKILLs its own process at ``step``."""
    if role == "claimant":
        writer = claim_session(path, run_id="doomed")
    else:
        writer = SessionWriter.cotenant("gateway")
    data = line(user_message(f"killed {step}")).encode()
    with acquire_session_write_lock(path):
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        with journaled(path, writer, fd, want_keys=key is not None) as commit:
            if step == "before-record":
                die()
            size = os.fstat(fd).st_size
            commit.intent(size, data, key)
            if step == "after-record":
                die()
            os.write(fd, data)
            if step == "after-bytes":
                die()
            commit.landed(size)
        die()


def claim_as(path: str, run_id: str) -> int:
    return claim_session(path, run_id=run_id).revision


# -- the claimant's side ------------------------------------------------------------------------


class Attempt:
    """A claimant: a journaled SessionManager and a controller that merges into it."""

    def __init__(self, manager: SessionManager, ctl: SessionFenceController) -> None:
        self.manager = manager
        self.ctl = ctl
        self.merged: list[Any] = []

    @classmethod
    async def start(cls, path: Path, **options: Any) -> Attempt:
        manager = SessionManager.open(path)
        attempt = cls.__new__(cls)
        attempt.manager = manager
        attempt.merged = []

        def merge(entries: list[Any]) -> Any:
            attempt.merged.extend(entries)
            return manager.merge_foreign_entries(entries)

        attempt.ctl = await SessionFenceController.create(
            path, merge_foreign_entries=merge, **options
        )
        manager.writer = attempt.ctl.writer
        return attempt

    async def turn(self, text: str = "answer") -> str:
        async with self.ctl.write_lock():
            return self.manager.append_message({"role": "assistant", "content": text})


async def test_a_controller_claims_the_session_and_inspect_shows_it(session_file: Path) -> None:
    first = await Attempt.start(session_file, run_id="run-one")
    info = inspect_journal(session_file)
    assert (info.claim_run, info.claim_revision, info.problem) == ("run-one", 1, None)
    assert first.ctl.writer == SessionWriter("run-one", role="claimant", revision=1)
    await first.ctl.dispose()
    second = await Attempt.start(session_file, run_id="run-two")
    info = inspect_journal(session_file)
    assert (info.claim_run, info.claim_revision) == ("run-two", 2)
    assert info.records == {"claim": 2}
    await second.ctl.dispose()


async def test_cotenant_appends_from_another_process_are_accepted_every_window(
    session_file: Path,
) -> None:
    attempt = await Attempt.start(session_file)
    delivered = []
    for turn in range(5):
        await attempt.turn(f"turn {turn}")
        async with attempt.ctl.prompt_released():
            status, value = in_child(cotenant_append, str(session_file), f"user {turn}", f"k{turn}")
            assert status == "ok", value
            delivered.append(value)
    assert not attempt.ctl.has_takeover
    assert [e["id"] for e in attempt.merged] == delivered
    assert all(attempt.manager.get_entry(i) is not None for i in delivered)
    assert inspect_journal(session_file).problem is None
    await attempt.ctl.dispose()


@pytest.mark.parametrize("foreign_first", [True, False], ids=["foreign-first", "foreign-after"])
async def test_foreign_bytes_beside_a_cotenant_record_are_a_takeover(
    session_file: Path, foreign_first: bool
) -> None:
    attempt = await Attempt.start(session_file)
    await attempt.turn()
    await attempt.ctl.release_for_prompt()
    if foreign_first:
        append_entries(session_file, user_message("foreign, unjournaled"))
    assert in_child(cotenant_append, str(session_file), "delivered")[0] == "ok"
    if not foreign_first:
        append_entries(session_file, user_message("foreign, unjournaled"))
    with pytest.raises(SessionTakeoverError) as caught:
        await attempt.ctl.reacquire_after_prompt()
    assert caught.value.reason == "foreign-append"
    assert all("unjournaled" not in str(e) for e in attempt.merged)
    await attempt.ctl.dispose()


@pytest.mark.parametrize("step", STEPS)
async def test_a_cotenant_killed_at_any_step_leaves_a_state_read_correctly(
    session_file: Path, step: str
) -> None:
    attempt = await Attempt.start(session_file)
    await attempt.turn()
    await attempt.ctl.release_for_prompt()
    assert in_child(killed_append, str(session_file), step, "co-tenant") == (None, None)
    await attempt.ctl.reacquire_after_prompt()  # never a false takeover
    landed = step in ("after-bytes", "after-commit")
    assert [e["message"]["content"] for e in attempt.merged] == (
        [f"killed {step}"] if landed else []
    )
    # The next writer voids a dead intent and goes on; the fence accepts its append.
    await attempt.ctl.release_for_prompt()
    assert in_child(cotenant_append, str(session_file), "next")[0] == "ok"
    await attempt.ctl.reacquire_after_prompt()
    assert attempt.merged[-1]["message"]["content"] == "next"
    assert inspect_journal(session_file).problem is None
    await attempt.ctl.dispose()


async def test_foreign_bytes_after_a_dead_intent_are_not_adopted(session_file: Path) -> None:
    attempt = await Attempt.start(session_file)
    await attempt.turn()
    await attempt.ctl.release_for_prompt()
    assert in_child(killed_append, str(session_file), "after-record", "co-tenant")[0] is None
    # A writer that ignores the journal appends where the dead intent said bytes would go.
    append_entries(session_file, user_message("foreign, where the intent pointed"))
    with pytest.raises(SessionTakeoverError) as caught:
        await attempt.ctl.reacquire_after_prompt()
    assert caught.value.reason == "foreign-append"
    await attempt.ctl.dispose()


@pytest.mark.parametrize("step", STEPS)
async def test_a_claimant_killed_at_any_step_leaves_the_next_attempt_working(
    session_file: Path, step: str
) -> None:
    assert in_child(killed_append, str(session_file), step, "claimant") == (None, None)
    attempt = await Attempt.start(session_file)
    manager = attempt.manager
    landed = step in ("after-bytes", "after-commit")
    assert [e["message"]["content"] for e in manager.entries] == (
        [f"killed {step}"] if landed else []
    )
    await attempt.turn()
    async with attempt.ctl.prompt_released():
        assert in_child(cotenant_append, str(session_file), "delivered")[0] == "ok"
    assert not attempt.ctl.has_takeover
    assert inspect_journal(session_file).problem is None
    await attempt.ctl.dispose()


@pytest.mark.parametrize("how", ["torn", "deleted", "edited", "truncated", "replaced"])
async def test_a_damaged_journal_fails_closed(session_file: Path, how: str) -> None:
    attempt = await Attempt.start(session_file)
    await attempt.turn()
    await attempt.ctl.release_for_prompt()
    damage_journal(session_file, how)
    with pytest.raises(SessionTakeoverError) as caught:
        await attempt.ctl.reacquire_after_prompt()
    assert caught.value.reason == "journal-invalid"
    assert caught.value.detail
    await attempt.ctl.dispose()
    if how in ("torn", "edited"):
        # What is wrong is said; a fresh writer refuses to extend it; repair moves it aside.
        assert inspect_journal(session_file).problem
        status, value = in_child(fresh_cotenant_append, str(session_file), "refused")
        assert status == "error" and "JournalError" in value
        aside = repair_journal(session_file)
        assert aside is not None and Path(aside).exists()
        assert inspect_journal(session_file).problem is None
        assert in_child(cotenant_append, str(session_file), "after repair")[0] == "ok"


async def test_a_journal_edited_inside_an_unread_record_fails_closed(session_file: Path) -> None:
    attempt = await Attempt.start(session_file)
    await attempt.turn()
    await attempt.ctl.release_for_prompt()
    assert in_child(cotenant_append, str(session_file), "one")[0] == "ok"
    assert in_child(cotenant_append, str(session_file), "two")[0] == "ok"
    journal = journal_of(session_file)
    raw = bytearray(journal.read_bytes())
    raw[-2 * 128 + 50] ^= 1  # the record of "one", which the fence has not read yet
    journal.write_bytes(bytes(raw))
    with pytest.raises(SessionTakeoverError) as caught:
        await attempt.ctl.reacquire_after_prompt()
    assert caught.value.reason == "journal-invalid"
    await attempt.ctl.dispose()


async def test_supersession_is_seen_at_the_fence_and_late_writes_are_refused_at_commit(
    session_file: Path,
) -> None:
    attempt = await Attempt.start(session_file, run_id="old-run")
    await attempt.turn()
    await attempt.ctl.release_for_prompt()
    status, revision = in_child(claim_as, str(session_file), "new-run")
    assert (status, revision) == ("ok", 2)
    size = session_file.stat().st_size
    # A late write from the prompt window, straight through the manager: refused at commit.
    with pytest.raises(SessionSupersededError):
        attempt.manager.append_message({"role": "assistant", "content": "late"})
    with pytest.raises(SessionSupersededError) as caught:
        await attempt.ctl.reacquire_after_prompt()
    error = caught.value
    assert isinstance(error, SessionTakeoverError) and error.reason == "superseded"
    assert (error.run_id, error.revision, error.superseded_by, error.new_revision) == (
        "old-run",
        1,
        "new-run",
        2,
    )
    assert "new-run" in str(error.detail)
    with pytest.raises(SessionSupersededError):
        await attempt.ctl.with_write_lock(lambda: None)  # sticky, and as the subclass
    with pytest.raises(SessionSupersededError):
        attempt.manager.append_message({"role": "assistant", "content": "later"})
    assert session_file.stat().st_size == size  # nothing landed after the new claim
    await attempt.ctl.dispose()


async def test_an_idempotent_retry_after_a_killed_writer_returns_the_landed_entry(
    session_file: Path,
) -> None:
    assert in_child(killed_append, str(session_file), "after-commit", "co-tenant", "k1")[0] is None
    written = [e for e in SessionManager.open(session_file).entries]
    assert len(written) == 1
    entry = {"type": "message", "message": {"role": "user", "content": "killed after-commit"}}
    again = append_as_cotenant(session_file, entry, idempotency_key="k1")
    assert again == written[0]["id"]
    assert len(SessionManager.open(session_file).entries) == 1
    # A key whose intent never landed is written on retry.
    assert in_child(killed_append, str(session_file), "after-record", "co-tenant", "k2")[0] is None
    fresh = append_as_cotenant(session_file, entry, idempotency_key="k2")
    assert [e["id"] for e in SessionManager.open(session_file).entries] == [again, fresh]


class _FstatFailsAfterWrite:
    """``os`` for the manager module whose second ``fstat`` (the one after the write)
    fails: the line landed, the acknowledgement is lost."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fstat(self, fd: int) -> os.stat_result:
        self.calls += 1
        if self.calls == 2:
            raise OSError(5, "fstat failed after the write")
        return os.fstat(fd)


async def test_an_idempotent_retry_after_a_lost_acknowledgement_in_process(
    session_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sessionfence.transcript._manager as manager_module

    attempt = await Attempt.start(session_file)
    manager = attempt.manager
    message = {"role": "assistant", "content": "exactly once"}
    async with attempt.ctl.write_lock():
        monkeypatch.setattr(manager_module, "os", _FstatFailsAfterWrite())
        with pytest.raises(OSError, match="fstat failed"):
            manager.append_message(message, idempotency_key="turn-7")
        monkeypatch.undo()
        assert manager.entries == []  # the manager never learnt it landed
        ident = manager.append_message(message, idempotency_key="turn-7")
    assert [e["id"] for e in manager.entries] == [ident]
    assert [e["id"] for e in SessionManager.open(session_file).entries] == [ident]
    await attempt.ctl.release_for_prompt()
    await attempt.ctl.reacquire_after_prompt()
    assert not attempt.ctl.has_takeover
    await attempt.ctl.dispose()


async def test_compaction_keeps_what_an_active_fence_needs_and_every_key(
    session_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sessionfence.journal._file as journal_file
    import sessionfence.journal._writer as journal_writer

    monkeypatch.setattr(journal_writer, "COMPACT_AT", 40)
    monkeypatch.setattr(journal_file, "KEEP_RECORDS", 8)

    def many(path: str, n: int) -> list[str]:
        return [cotenant_append(path, f"m{i}", f"key-{i}") for i in range(n)]

    attempt = await Attempt.start(session_file)
    await attempt.turn()
    await attempt.ctl.release_for_prompt()
    status, ids = in_child(many, str(session_file), 120)
    assert status == "ok"
    info = inspect_journal(session_file)
    assert info.base_seq > 1 and info.problem is None  # compacted
    assert info.base_seq <= attempt.ctl._journal.position.seq + 1  # what the fence needs
    await attempt.ctl.reacquire_after_prompt()
    assert [e["id"] for e in attempt.merged] == ids
    await attempt.ctl.dispose()
    # Keys of compacted records survive in the header's table.
    entry = {"type": "message", "message": {"role": "user", "content": "m0"}}
    assert append_as_cotenant(session_file, entry, idempotency_key="key-0") == ids[0]


async def test_without_the_journal_the_fence_judges_by_content(session_file: Path) -> None:
    ctl = await SessionFenceController.create(session_file, journal=False)
    assert not journal_of(session_file).exists()
    await ctl.release_for_prompt()
    append_entries(session_file, user_message("unjournaled"))
    with pytest.raises(SessionTakeoverError) as caught:
        await ctl.reacquire_after_prompt()
    assert caught.value.reason == "foreign-append"
    await ctl.dispose()


def test_a_claimant_writer_must_hold_the_current_claim(session_file: Path) -> None:
    writer = claim_session(session_file, run_id="first")
    manager = SessionManager.open(session_file, writer=writer)
    manager.append_message({"role": "user", "content": "ok"})
    claim_session(session_file, run_id="second")
    with pytest.raises(SessionSupersededError) as caught:
        manager.append_message({"role": "user", "content": "too late"})
    assert caught.value.superseded_by == "second"
    with pytest.raises(ValueError):
        SessionManager.open(session_file).append_message({}, idempotency_key="k")
    with pytest.raises(ValueError):
        append_as_cotenant(session_file, {"type": "session"})


def test_a_holder_of_the_lock_appends_and_claims_with_its_reentrant_owner(
    session_file: Path,
) -> None:
    entry = {"type": "message", "message": {"role": "user", "content": "held"}}
    with acquire_session_write_lock(session_file, reentrant_owner="gateway-7"):
        ident = append_as_cotenant(session_file, entry, reentrant_owner="gateway-7")
        writer = claim_session(session_file, run_id="w", reentrant_owner="gateway-7")
    assert [e["id"] for e in SessionManager.open(session_file).entries] == [ident]
    assert (writer.run_id, writer.revision) == ("w", 1)


# -- regressions found by review -----------------------------------------------------------------


async def test_a_dead_intent_under_a_longer_benign_line_is_judged_by_content(
    session_file: Path,
) -> None:
    from tests.controller.helpers import mirror_message

    attempt = await Attempt.start(session_file)
    await attempt.turn()
    await attempt.ctl.release_for_prompt()
    assert in_child(killed_append, str(session_file), "after-record", "co-tenant")[0] is None
    mirrored = mirror_message("a delivery mirror line, longer than the dead intent " * 3)
    append_entries(session_file, mirrored)  # a writer that ignores the journal
    assert in_child(cotenant_append, str(session_file), "after it")[0] == "ok"
    await attempt.ctl.reacquire_after_prompt()  # no false takeover
    assert attempt.merged[0]["id"] == mirrored["id"]
    assert attempt.merged[-1]["message"]["content"] == "after it"
    await attempt.ctl.dispose()


async def test_an_append_landing_while_another_writer_waits_is_never_voided(
    session_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import sessionfence.journal._writer as journal_writer
    from sessionfence.journal._file import journal_path_for, scan

    attempt = await Attempt.start(session_file)
    await attempt.turn()
    await attempt.ctl.release_for_prompt()
    real = journal_writer.locked_journal
    fired: list[int] = []

    def racing(jpath: str, create_at: int | None) -> Any:
        if not fired:  # a co-tenant appends between the claimant's first look and its lock
            fired.append(1)
            inbound = threading.Thread(
                target=cotenant_append, args=(str(session_file), "inbound", "k1")
            )
            inbound.start()
            inbound.join()
        return real(jpath, create_at)

    monkeypatch.setattr(journal_writer, "locked_journal", racing)
    attempt.manager.append_message({"role": "assistant", "content": "own, without the lock"})
    monkeypatch.undo()
    found = scan(journal_path_for(session_file), None)
    assert found is not None and all(r.type_name != "void" for r in found.records)
    cotenant_append(str(session_file), "inbound", "k1")  # the retry finds its entry
    assert session_file.read_text().count('"inbound"') == 1
    await attempt.ctl.reacquire_after_prompt()
    assert not attempt.ctl.has_takeover
    await attempt.ctl.dispose()


def test_a_failed_compaction_never_fails_an_append_that_landed(
    session_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import sessionfence.journal._file as journal_file
    import sessionfence.journal._writer as journal_writer

    monkeypatch.setattr(journal_writer, "COMPACT_AT", 2)
    monkeypatch.setattr(journal_file, "KEEP_RECORDS", 1)

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_file.os, "fsync", full_disk)
    ids = [cotenant_append(str(session_file), f"m{i}") for i in range(5)]
    monkeypatch.undo()
    assert [e["id"] for e in SessionManager.open(session_file).entries] == ids
    assert not list(session_file.parent.glob("*.compact-*"))
    assert inspect_journal(session_file).problem is None


def _append_then_wait(path: str, go: Any, done: Any) -> None:
    cotenant_append(path, "first")
    done.put("first")
    go.wait()
    cotenant_append(path, "second")
    done.put("second")


def test_a_child_forked_with_the_parents_journal_descriptor_is_never_locked_out(
    session_file: Path,
) -> None:
    """The parent drops its descriptor of a compacted journal while holding its lock; a
    child forked earlier shares that open file description and must not keep the lock."""
    import multiprocessing

    from sessionfence.journal import _file as journal_file
    from sessionfence.journal import journal_path_for

    fork = multiprocessing.get_context("fork")
    cotenant_append(str(session_file), "parent")  # the parent keeps a journal descriptor
    go, done = fork.Event(), fork.Queue()
    child = fork.Process(target=_append_then_wait, args=(str(session_file), go, done))
    child.start()
    try:
        assert done.get(timeout=30) == "first"
        jpath = journal_path_for(session_file)

        def compact_now() -> bool:
            with journal_file.locked_journal(jpath, None) as fd:
                return journal_file.compact(fd, jpath, None, keep=1)

        assert in_child(compact_now) == ("ok", True)
        cotenant_append(str(session_file), "parent again")  # locks the old file, drops it
        go.set()
        assert done.get(timeout=30) == "second"
    finally:
        child.kill()
        child.join()


def test_a_writer_refuses_a_journal_truncated_under_its_eyes(session_file: Path) -> None:
    claim_session(session_file, run_id="A")
    claim_session(session_file, run_id="B")
    cotenant_append(str(session_file), "known")
    journal = journal_of(session_file)
    os.truncate(journal, journal.stat().st_size - 2 * 128)  # B's claim and the append gone
    with pytest.raises(JournalError, match="truncated"):
        cotenant_append(str(session_file), "refused")


async def test_a_damaged_header_does_not_break_a_release(session_file: Path) -> None:
    attempt = await Attempt.start(session_file)
    await attempt.turn()
    journal = journal_of(session_file)
    raw = bytearray(journal.read_bytes())
    raw[20] ^= 1  # inside the header's CRC-covered fields
    journal.write_bytes(bytes(raw))
    await attempt.ctl.release_for_prompt()  # the slot is best effort: no raw error
    assert not attempt.ctl.holds_lock
    await attempt.ctl.dispose()
    assert inspect_journal(session_file).problem


def test_a_carried_key_whose_bytes_were_rewritten_is_not_answered(
    session_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sessionfence.journal._file as journal_file
    import sessionfence.journal._writer as journal_writer

    monkeypatch.setattr(journal_writer, "COMPACT_AT", 2)
    monkeypatch.setattr(journal_file, "KEEP_RECORDS", 1)
    first = cotenant_append(str(session_file), "AAAA", "k")
    for i in range(3):
        cotenant_append(str(session_file), f"f{i}")  # compaction carries "k" into the header
    assert inspect_journal(session_file).base_seq > 1
    data = session_file.read_bytes()
    session_file.write_bytes(data.replace(first.encode(), b"deadbeef").replace(b"AAAA", b"BBBB"))
    again = cotenant_append(str(session_file), "AAAA", "k")
    assert again not in (first, "deadbeef")  # written anew, never the rewritten entry's id
