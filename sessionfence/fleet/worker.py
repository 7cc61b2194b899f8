"""A fleet worker process: runs attempts on sessions the supervisor hands it, one at a time.

An attempt is what an embedded agent run does to its transcript (docs/design.md, "Attempt
lifecycle"): parse the ``SessionManager`` once, take the write lock with a
``SessionFenceController`` (eager), check the parse still describes the file, guard the
manager, then for each turn append owned entries under the write lock (sometimes a
compaction through the guarded manager, i.e. ``ctl.owned_file_write``), release the lock for
the simulated model call (sometimes making an owned publication meanwhile) and take it back,
which is where the fence check runs.

Everything the oracle needs is logged as it happens, one record per ``os.write``: an entry
id is acknowledged only after its append returned; a detection records the window and the
lock generation of the check, so the oracle can order it against foreign events.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import sys
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .. import fingerprint
from ..controller import SessionFenceController, acquire_session_file_owner
from ..errors import (
    SessionSupersededError,
    SessionTakeoverError,
    SessionWriteLockAcquireError,
)
from ..lock import acquire_session_write_lock_async
from ..transcript import SessionManager, guard_session_manager
from .board import APPENDED, HOLDING, IDLE, REACQUIRING, Board
from .config import FleetConfig
from .logs import LogWriter
from .transcripts import checked_text, cotenant_ids, foreign_id, message_line, owned_message

__all__ = ["Task", "worker_main"]


@dataclass(frozen=True)
class Task:
    session: int
    attempt: int
    path: str
    # Die half-way through writing a line at this turn (a torn tail), or never.
    torn_at_turn: int | None = None


# Every parsed transcript of this process, weakly: between attempts it must be empty, or
# the next parse would double the worker's memory on a large transcript.
_PARSED: weakref.WeakSet[SessionManager] = weakref.WeakSet()


class _HeldLock:
    """The real lock as the controller sees it; its release logs the hold (start after the
    acquisition returned, end before the release): intervals inside the true hold, so two
    that overlap prove two holders at once."""

    def __init__(self, lock: Any, att: _Attempt) -> None:
        self._lock = lock
        self._att = att
        self._start = time.monotonic()
        self._logged = False
        self.generation = int(lock.generation)

    def release(self) -> None:
        if not self._logged:
            self._logged = True
            self._att.record("hold", gen=self.generation, start=self._start, end=time.monotonic())
        self._lock.release()


class _Attempt:
    """One attempt on one session: state shared by the controller's callbacks."""

    def __init__(self, task: Task, cfg: FleetConfig, board: Board, log: LogWriter) -> None:
        self.task = task
        self.cfg = cfg
        self.board = board
        self.log = log
        self.rng = random.Random(f"{cfg.seed}:attempt:{task.attempt}")
        self.manager: SessionManager | None = None
        self.ctl: SessionFenceController | None = None
        self.window = 0
        self.last_wait = 0.0
        self.last_generation = 0

    def record(self, record_type: str, **fields: Any) -> None:
        self.log.write({"t": record_type, "s": self.task.session, "a": self.task.attempt, **fields})

    async def acquire(self, session_file: str, **options: Any) -> Any:
        """The controller's injectable acquire, timed: lock wait is measured here."""
        start = time.perf_counter()
        try:
            lock = await acquire_session_write_lock_async(session_file, **options)
        finally:
            self.last_wait = time.perf_counter() - start
        self.last_generation = int(lock.generation)
        return _HeldLock(lock, self)

    def merge(self, entries: list[Any]) -> Any:
        assert self.manager is not None
        result = self.manager.merge_foreign_entries(entries)
        # Co-tenant entries the fence accepted and handed over: the oracle's "accepted".
        ids = cotenant_ids(entries)
        if ids:
            self.record("merged", w=self.window, ids=ids)
        return result

    def reload(self) -> None:
        assert self.ctl is not None
        self.manager = self.guard(SessionManager.open(self.task.path, writer=self.ctl.writer))
        _PARSED.add(self.manager)
        self.note_parsed(self.manager, "reload")

    def note_parsed(self, manager: SessionManager, how: str) -> None:
        """Co-tenant entries this attempt's parse holds (accepted when the file was read)."""
        ids = cotenant_ids(manager.entries)
        if ids:
            self.record("parsed", w=self.window, how=how, ids=ids)

    async def late_write(self, exc: SessionSupersededError) -> None:
        """After a supersession was detected, append once more as a late writer would (an
        agent loop that did not stop): the journaled manager must refuse it under the lock
        with ``SessionSupersededError`` before a byte lands."""
        ctl, manager = self.ctl, self.manager
        if ctl is None or manager is None:
            return
        lock = None
        if not ctl.holds_lock:
            lock = await self.acquire(self.task.path, timeout=self.cfg.lock_timeout)
        try:
            tag = f"s{self.task.session}a{self.task.attempt}late"
            entry_id = manager.append_message(owned_message(self.rng, tag))
        except SessionSupersededError as refused:
            self.record(
                "late-refused",
                w=self.window,
                by=refused.superseded_by,
                revision=refused.new_revision,
                detected_by=exc.superseded_by,
            )
        except Exception as other:  # the wrong refusal: the oracle fails the run on it
            self.record("late-error", w=self.window, error=f"{type(other).__name__}: {other}")
        else:
            self.ack(entry_id, "late")
            self.record("late-landed", w=self.window, id=entry_id)
        finally:
            if lock is not None:
                lock.release()

    def guard(self, manager: SessionManager) -> SessionManager:
        assert self.ctl is not None
        return guard_session_manager(
            manager,
            with_compaction_persistence=self.ctl.owned_file_write,
            on_message_persisted=self.ctl.refresh_after_owned_write,
        )

    def ack(self, entry_id: str, kind: str) -> None:
        self.record("ack", id=entry_id, kind=kind)

    def die_mid_append(self) -> None:
        """Simulate a crash inside a write: half a line lands, then SIGKILL."""
        text, check = checked_text(self.rng, "torn")
        data = (
            '{"type":"message","id":"ffffffff","parentId":null,"timestamp":"2026-01-01T00:00:00'
            f'.000Z","message":{{"role":"assistant","content":[{{"type":"text","text":"{text}'
            f'"}}],"fleetCheck":"{check}"}}}}\n'
        ).encode()
        # Cut before the closing brace: a line that parses as a whole JSON object is a
        # complete entry that only lacks its newline, not a torn one (SessionManager).
        cut = self.rng.randint(1, len(data) - 2)
        fd = os.open(self.task.path, os.O_WRONLY | os.O_APPEND)
        self.record("torn-inject", offset=os.fstat(fd).st_size, bytes=cut)
        os.write(fd, data[:cut])
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))

    async def publish_in_window(self) -> None:
        """An owned write inside the released window, as an in-process delivery mirror makes
        it: a raw line appended under a short write lock with ``publish_owned_write``; the
        controller checks the fence first, then merges the declared entry into the session
        manager through the merge callback. The reacquire must take it as owned."""
        assert self.ctl is not None and self.manager is not None
        s = self.task.session
        entry_id = foreign_id(self.rng)
        line = message_line(entry_id, self.manager.leaf_id, owned_message(self.rng, "published"))

        def write() -> str:
            # Under the lock: chaos must not follow this append with an edit outside the
            # tail window in tail mode (see board.py).
            self.board.mark(s, APPENDED)
            fd = os.open(self.task.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            return entry_id

        await self.ctl.with_write_lock(
            write,
            publish_owned_write=True,
            resolve_published_entries=lambda result: [{"kind": "id", "id": result}],
        )
        self.ack(entry_id, "published")

    def append_turn(self, turn: int) -> int:
        """Owned appends of one turn (called under the write lock); returns the count."""
        assert self.manager is not None
        if self.task.torn_at_turn == turn:
            self.die_mid_append()
        count = self.rng.randint(1, 3)
        tag = f"s{self.task.session}a{self.task.attempt}t{turn}"
        for _ in range(count):
            self.ack(self.manager.append_message(owned_message(self.rng, tag)), "message")
        if self.rng.random() < self.cfg.compaction and self.manager.leaf_id is not None:
            text, check = checked_text(self.rng, "compacted")
            entry_id = self.manager.append_compaction(
                text, self.manager.leaf_id, self.rng.randint(1000, 90000), {"fleetCheck": check}
            )
            self.ack(entry_id, "compaction")
            count += 1
        return count


async def run_attempt(task: Task, cfg: FleetConfig, board: Board, log: LogWriter) -> str:
    """Run one attempt; returns ``completed``, ``takeover``, ``error`` or ``interrupted``
    (the run was stopped by ^C: the attempt ends at a turn boundary, see supervisor)."""
    if board.stopping:
        return "interrupted"
    # The in-process attempt owner comes first, as in an embedded runner's wiring
    # (docs/design.md, "Attempt lifecycle"); the supervisor never runs two attempts on one
    # session anyway.
    async with await acquire_session_file_owner(task.path, timeout=cfg.lock_timeout):
        return await _owned_attempt(task, cfg, board, log)


async def _owned_attempt(task: Task, cfg: FleetConfig, board: Board, log: LogWriter) -> str:
    att = _Attempt(task, cfg, board, log)
    s = task.session
    started = time.perf_counter()
    # Parse before taking the lock: a large transcript's parse must not hold up every other
    # writer. The lock then proves (by fingerprint) that the parse is still the file's state.
    manager = SessionManager.open(task.path)
    _PARSED.add(manager)
    parsed = time.perf_counter()
    ctl = await SessionFenceController.create(
        task.path,
        timeout=cfg.lock_timeout,
        acquire=att.acquire,
        merge_foreign_entries=att.merge,
        reload_session_file=att.reload,
        verify="full" if cfg.verify_mode == "full" else "tail",
    )
    att.ctl = ctl
    board.set_phase(s, HOLDING)
    created = time.perf_counter()
    outcome = "completed"
    try:
        reparsed = fingerprint(task.path) != manager.parsed_fingerprint
        if reparsed:
            # The file changed since the parse: parse only the lines appended since (a
            # rewrite reloads, through the transcript index), never the whole file.
            manager.refresh()
        # The claimant's appends are journaled (and refused once another run claimed the
        # session): the fence accepts them by their records, a successor's check at commit.
        manager.writer = ctl.writer
        manager = att.guard(manager)
        att.manager = manager
        att.note_parsed(manager, "reparse" if reparsed else "open")
        torn = manager.torn_tail
        if torn is not None:
            # Never append after a torn line: move it to quarantine first (docs/transcripts.md,
            # "Torn-tail repair").
            quarantine = manager.repair_torn_tail()
            att.record("torn", offset=torn[0], length=torn[1], repaired=quarantine is not None)
        elif manager.digest_size == manager.parsed_fingerprint.size:
            # The fence's digest of what the open parsed, from the block hashes of the parse
            # or of the transcript index, the partial last block and the bytes past the
            # index (docs/transcripts.md, "The digest"). Seeded with it, the fence's first
            # activation reads no whole file.
            ctl.seed_content_digest(
                manager.parsed_fingerprint, manager.fence_digest(), manager.digest_size
            )
        att.record(
            "setup",
            open=parsed - started,
            create=created - parsed,
            reparsed=reparsed,
            wait=att.last_wait,
            gen=att.last_generation,
            entries=len(manager.entries),
        )
        for turn in range(cfg.turns):
            if board.stopping:
                # ^C: stop here, holding the lock, after the fence check of the last
                # released window; every window this attempt opened has been judged.
                outcome = "interrupted"
                break
            t0 = time.perf_counter()
            async with ctl.write_lock():
                appended = att.append_turn(turn)
            t1 = time.perf_counter()
            att.window += 1
            # Before the lock is given up (see board.py); the size tells chaos whether
            # anything was appended in the window since.
            board.open_window(s, att.window, os.path.getsize(task.path))
            await ctl.release_for_prompt()
            t2 = time.perf_counter()
            think = att.rng.uniform(cfg.think_min, cfg.think_max)
            publish = 0.0
            if att.rng.random() < cfg.publish:
                await asyncio.sleep(think / 2)
                tp = time.perf_counter()
                await att.publish_in_window()
                publish = time.perf_counter() - tp
                think /= 2
            await asyncio.sleep(think)
            board.set_phase(s, REACQUIRING)
            att.last_wait = 0.0
            t3 = time.perf_counter()
            await ctl.reacquire_after_prompt()
            t4 = time.perf_counter()
            board.set_phase(s, HOLDING)
            board.count_turn(s)
            att.record(
                "turn",
                w=att.window,
                gen=att.last_generation,
                n=appended,
                append=t1 - t0,
                release=t2 - t1,
                wait=att.last_wait,
                reacquire=t4 - t3,
                fence=max(0.0, (t4 - t3) - att.last_wait),
                turn=(t2 - t0) + (t4 - t3),
                publish=publish,
            )
    except SessionTakeoverError as exc:
        outcome = "takeover"
        board.set_phase(s, HOLDING)  # the window is judged: nothing after this counts for it
        att.record(
            "detect",
            w=att.window,
            gen=att.last_generation,
            reason=exc.reason,
            phase=exc.phase,
            detail=exc.detail,
        )
        if isinstance(exc, SessionSupersededError):
            await att.late_write(exc)
    except SessionWriteLockAcquireError as exc:
        outcome = "error"
        att.record("error", w=att.window, error=f"lock: {exc}")
    finally:
        await ctl.dispose()
        board.set_phase(s, IDLE)
        att.manager = None
        att.ctl = None
    ended = time.perf_counter()
    att.record("end", outcome=outcome, elapsed=ended - started, loop=ended - created)
    return outcome


def worker_main(
    slot: int,
    incarnation: int,
    conn: Connection,
    board: Board,
    cfg: FleetConfig,
    log_dir: str,
) -> None:
    """Process entry: serve tasks from ``conn`` until it sends None (or closes)."""
    # The supervisor interrupts with its own signals; a worker never handles ^C itself
    # (the supervisor's child entry ignores it already; this covers a direct call).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log = LogWriter(os.path.join(log_dir, f"worker-{slot:03d}-{incarnation:04d}.jsonl"))
    log.write({"t": "start", "slot": slot, "incarnation": incarnation, "pid": os.getpid()})

    async def serve() -> None:
        while True:
            try:
                task = conn.recv()
            except EOFError:
                return
            if task is None:
                return
            try:
                outcome = await run_attempt(task, cfg, board, log)
            except Exception as exc:  # a bug or an unexpected OS error: report, go on
                log.write(
                    {
                        "t": "error",
                        "s": task.session,
                        "a": task.attempt,
                        "error": repr(exc),
                        "traceback": traceback.format_exc(),
                    }
                )
                board.set_phase(task.session, IDLE)
                outcome = "error"
            # Free the parsed transcript now, not after the next attempt parsed its own
            # (twice the memory). First let the loop run the callbacks still queued (a
            # finished write task's done-callback holds its exception, whose traceback
            # holds the attempt's frames); then collect the reference cycles (callbacks,
            # the guard's bound methods) the manager and the controller sit in.
            for _ in range(3):
                await asyncio.sleep(0)
            gc.collect()
            if _PARSED:  # should never happen; the report shows the worst case
                log.write({"t": "alive", "a": task.attempt, "transcripts": len(_PARSED)})
            conn.send((task.attempt, outcome))

    asyncio.run(serve())
    # Peak memory: a worker holds one parsed transcript at a time (SessionManager keeps
    # every entry), which is what bounds the workers a machine can run on big transcripts.
    try:
        import resource
    except ImportError:  # Windows
        pass
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            peak_kb //= 1024  # bytes there
        log.write({"t": "stop", "slot": slot, "maxrss_mb": round(peak_kb / 1024, 1)})
    log.close()
