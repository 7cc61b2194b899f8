"""The supervisor: sets up the run, routes sessions to workers, kills and respawns them.

Routing is done here rather than through a shared queue: a worker SIGKILLed while it holds a
``multiprocessing.Queue``'s internal lock would wedge every other reader, and the supervisor
must know exactly which attempt died. Each worker has its own pipe; a session is handed to at
most one worker at a time and goes back to the pending list when its attempt ends (completed,
stopped on a takeover, or killed) until it has completed its planned attempts.

The supervisor is also the one that SIGKILLs workers at random points (it knows the pid is
still its child, so a recycled pid is never hit), and it tells a worker in its task when to
die half-way through writing a line, which leaves a torn tail for the next attempt.

Ctrl-C belongs to the supervisor alone. Every child ignores SIGINT from its first
instruction (the signal is blocked while it is forked, so none slips through before that),
which keeps a terminal's ^C, sent to the whole foreground process group, from printing a
``KeyboardInterrupt`` traceback per child. The supervisor takes the first ^C as "stop":
it dispatches nothing more and raises the board's stop flag; the chaos, mirror, co-tenant
and supersession processes stop visiting windows, and each running attempt ends at its next
turn boundary (after the fence check of its last released window, so every window it opened
is judged)
with the outcome ``interrupted``. Attempts still running after ``_INTERRUPT_GRACE`` seconds
(a large transcript still being parsed) are SIGKILLed like any killed attempt. The run then
ends normally and its report covers what ran. A second ^C abandons the run at once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from .board import PHASE_NAMES, Board
from .chaos import chaos_main, mirror_main
from .config import FleetConfig
from .cotenants import cotenant_main, supersede_main
from .logs import LogWriter
from .transcripts import make_transcripts
from .worker import Task, worker_main

__all__ = ["FleetAbortedError", "Progress", "RunResult", "run_fleet"]

_SIGKILLED = -getattr(signal, "SIGKILL", 9)  # a POSIX exit status; never seen on Windows
_WAIT_SLICE = 0.1
# A worker that dies on its own is a bug; past this many the run stops rather than respawn
# a broken worker forever.
_MAX_CRASHES = 10
_STALL_SECONDS = 120.0
_JOIN_TIMEOUT = 20.0
# After a ^C, how long running attempts get to reach a turn boundary before they are killed.
_INTERRUPT_GRACE = 10.0


class FleetAbortedError(RuntimeError):
    """The run cannot go on (workers keep crashing); the logs say why."""


@dataclass
class Progress:
    """What the live display shows."""

    attempts_done: int = 0
    attempts_planned: int = 0
    turns: int = 0
    elapsed: float = 0.0
    kills: int = 0
    takeovers: int = 0
    interrupted: bool = False  # ^C: the running attempts are winding down


@dataclass
class RunResult:
    run_dir: str
    session_dir: str
    log_dir: str
    paths: list[str]
    setup_seconds: float
    elapsed: float
    padding_end: int
    respawns: int = 0
    kills_sent: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    foreign_exitcodes: dict[str, int | None] = field(default_factory=dict)
    interrupted: bool = False  # stopped by ^C: the figures cover what ran until then


def _child_main(target: Callable[..., None], *args: Any) -> None:
    """Entry of every fleet child process: ignore ^C, then unblock it (see the module doc)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    target(*args)


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Hold SIGINT back while a child is started: the child inherits the blocked signal and
    ignores it before unblocking it; here it is delivered when the block is lifted."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: children ignore ^C on entry
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass
class _Slot:
    index: int
    incarnation: int = 0
    proc: Any = None
    conn: Connection | None = None
    task: Task | None = None
    kill_at: float | None = None
    kill_sent: bool = False
    dispatched_at: float = 0.0


class _Supervisor:
    def __init__(
        self, cfg: FleetConfig, run_dir: str, on_progress: Callable[[Progress], None]
    ) -> None:
        self.cfg = cfg
        # fork on Linux: workers start in milliseconds and respawns stay cheap. Elsewhere
        # spawn (macOS system libraries are not fork-safe; Windows has no fork); every
        # process argument below is picklable for that.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        self.ctx: Any = multiprocessing.get_context(method)
        self.on_progress = on_progress
        self.session_dir = os.path.join(run_dir, "sessions")
        self.log_dir = os.path.join(run_dir, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self.run_dir = run_dir
        self.board = Board(cfg.sessions, self.ctx)
        self.rng = random.Random(f"{cfg.seed}:supervisor")
        self.log = LogWriter(os.path.join(self.log_dir, "supervisor.jsonl"))
        self.slots = [_Slot(i) for i in range(cfg.workers)]
        self.pending: deque[int] = deque(range(cfg.sessions))
        self.completed = [0] * cfg.sessions
        self.kills = [0] * cfg.sessions
        self.next_attempt = 1
        self.progress = Progress(attempts_planned=cfg.sessions * cfg.attempts)
        self.foreign: dict[str, Any] = {}
        self.foreign_exitcodes: dict[str, int | None] = {}
        self.respawns = 0
        self.kills_sent = 0
        self.outcomes: dict[str, int] = {}
        self.paths: list[str] = []
        # Length of one attempt, to place kills uniformly inside attempts: a guess at first,
        # then the mean of the attempts seen (parsing a large transcript dominates it).
        think = (cfg.think_min + cfg.think_max) / 2
        self.attempt_estimate = cfg.turns * (think + 0.003) + 0.01
        self.attempt_seconds: list[float] = []
        self.crashes = 0
        self.interrupted = False

    # processes ------------------------------------------------------------------------------

    def spawn(self, slot: _Slot) -> None:
        parent, child = self.ctx.Pipe()
        slot.incarnation += 1
        proc = self.ctx.Process(
            target=_child_main,
            args=(
                worker_main,
                slot.index,
                slot.incarnation,
                child,
                self.board,
                self.cfg,
                self.log_dir,
            ),
            name=f"fleet-worker-{slot.index}",
            daemon=True,
        )
        with _sigint_blocked():
            proc.start()
        child.close()
        slot.proc, slot.conn, slot.task, slot.kill_at = proc, parent, None, None
        slot.kill_sent = False

    def start_foreign(self) -> None:
        cfg = self.cfg
        verify = cfg.verify_mode
        procs: list[tuple[str, Callable[..., None], tuple[Any, ...]]] = []
        if cfg.chaos > 0:
            kinds = [list(cfg.chaos_kinds)] if cfg.chaos_kinds else []
            procs.append(("chaos", chaos_main, (cfg.chaos, verify, *self._seeded("chaos"), *kinds)))
        if cfg.mirror > 0:
            procs.append(("mirror", mirror_main, (cfg.mirror, verify, *self._seeded("mirror"))))
        cotenants = cfg.cotenants if cfg.cotenant_rate > 0 else 0
        for i in range(1, cotenants + 1):
            name = f"cotenant-{i}"
            args = (cfg.cotenant_rate, verify, *self._seeded(name), name, cfg.cotenant_retry)
            procs.append((name, cotenant_main, args))
        if cfg.supersede > 0:
            procs.append(("supersede", supersede_main, (cfg.supersede, *self._seeded("supersede"))))
        for name, target, args in procs:
            proc = self.ctx.Process(
                target=_child_main,
                args=(target, self.paths, self.board, *args),
                name=f"fleet-{name}",
                daemon=True,
            )
            with _sigint_blocked():
                proc.start()
            self.foreign[name] = proc

    def _seeded(self, name: str) -> tuple[str, str]:
        """A foreign writer's seed and log path."""
        return f"{self.cfg.seed}:{name}", os.path.join(self.log_dir, f"{name}.jsonl")

    # routing ---------------------------------------------------------------------------------

    def dispatch(self) -> None:
        cfg = self.cfg
        for slot in self.slots:
            if not self.pending:
                return
            if slot.task is not None or slot.conn is None:
                continue
            s = self.pending.popleft()
            attempt = self.next_attempt
            self.next_attempt += 1
            torn_at = None
            kill_at = None
            if self.kills[s] < cfg.max_kills_per_session:
                roll = self.rng.random()
                if roll < cfg.torn_rate:
                    # Early in the attempt: with chaos most attempts stop on a takeover
                    # within a few windows, and a later crash point would rarely be reached.
                    torn_at = self.rng.randrange(min(cfg.turns, 3))
                elif roll < cfg.torn_rate + cfg.kill_rate:
                    if self.attempt_seconds:
                        self.attempt_estimate = sum(self.attempt_seconds) / len(
                            self.attempt_seconds
                        )
                    kill_at = time.monotonic() + self.rng.uniform(0, self.attempt_estimate)
            task = Task(s, attempt, self.paths[s], torn_at)
            self.board.start_attempt(s, attempt)
            self.log.write({"t": "dispatch", "slot": slot.index, "session": s, "attempt": attempt})
            slot.task, slot.kill_at = task, kill_at
            slot.dispatched_at = time.monotonic()
            # If it died already, its sentinel reports it and the session is requeued.
            with contextlib.suppress(OSError):
                slot.conn.send(task)

    def finish(self, slot: _Slot, attempt: int, outcome: str) -> None:
        task = slot.task
        if task is None or task.attempt != attempt:
            return
        slot.task, slot.kill_at = None, None
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if outcome == "interrupted":  # ended early by ^C: neither done nor to be redone
            return
        if outcome in ("completed", "takeover"):
            self.attempt_seconds.append(time.monotonic() - slot.dispatched_at)
        self.progress.attempts_done += 1
        if outcome == "takeover":
            self.progress.takeovers += 1
        self.completed[task.session] += 1
        if self.completed[task.session] < self.cfg.attempts:
            self.pending.append(task.session)

    def drain(self, slot: _Slot) -> None:
        conn = slot.conn
        while conn is not None and slot.task is not None:
            try:
                if not conn.poll():
                    return
                attempt, outcome = conn.recv()
            except Exception:
                # A peer killed half-way through a send leaves anything on the pipe; its
                # sentinel reports the death and the attempt is requeued.
                return
            self.finish(slot, attempt, outcome)

    def buried(self, slot: _Slot) -> None:
        """The worker in ``slot`` exited: requeue its attempt's session, start a new one."""
        self.drain(slot)
        proc = slot.proc
        proc.join()
        task = slot.task
        # Killed on purpose: by us, or by itself half-way through a line as its task said.
        killed = (
            proc.exitcode == _SIGKILLED
            or slot.kill_sent
            or (task is not None and task.torn_at_turn is not None and proc.exitcode != 0)
        )
        record: dict[str, Any] = {
            "t": "death",
            "slot": slot.index,
            "incarnation": slot.incarnation,
            "exitcode": proc.exitcode,
            "killed": killed,
            "attempt": task.attempt if task else None,
            "session": task.session if task else None,
        }
        self.log.write(record)
        if task is not None:
            s = task.session
            self.board.start_attempt(s, 0)  # no attempt runs on it now
            if killed:
                self.kills[s] += 1
                self.progress.kills += 1
                self.pending.append(s)
            else:
                # A crash is a bug: count the attempt as done so the run still ends.
                self.finish(slot, task.attempt, "crash")
        if not killed:
            self.crashes += 1
            if self.crashes > _MAX_CRASHES:
                raise FleetAbortedError(
                    f"workers crashed {self.crashes} times (exit status {proc.exitcode}); "
                    f"see {self.log_dir}"
                )
        if slot.conn is not None:
            slot.conn.close()
        self.respawns += 1
        self.spawn(slot)

    def kill_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.task is not None and slot.kill_at is not None and slot.kill_at <= now:
                self.drain(slot)
                if slot.task is None or slot.kill_at is None:
                    continue
                slot.kill_at = None
                # Where the attempt was when it died (it may move on before the signal lands).
                _, phase, _ = self.board.snapshot(slot.task.session)
                self.log.write(
                    {
                        "t": "kill",
                        "slot": slot.index,
                        "attempt": slot.task.attempt,
                        "phase": PHASE_NAMES.get(phase, str(phase)),
                    }
                )
                self.kills_sent += 1
                slot.kill_sent = True
                slot.proc.kill()

    def kill_running(self) -> None:
        """After the grace period of a ^C: kill the attempts that did not stop by themselves
        (counted as killed attempts: their events are void, their lines still checked)."""
        for slot in self.slots:
            if slot.task is not None and not slot.kill_sent:
                _, phase, _ = self.board.snapshot(slot.task.session)
                self.log.write(
                    {
                        "t": "interrupt-kill",
                        "slot": slot.index,
                        "attempt": slot.task.attempt,
                        "phase": PHASE_NAMES.get(phase, str(phase)),
                    }
                )
                slot.kill_sent = True
                slot.proc.kill()

    def done(self) -> bool:
        return not self.pending and all(slot.task is None for slot in self.slots)

    def idle(self) -> bool:
        return all(slot.task is None for slot in self.slots)

    # ^C -------------------------------------------------------------------------------------

    def on_sigint(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            raise KeyboardInterrupt  # a second ^C: abandon the run
        self.interrupted = True

    @contextlib.contextmanager
    def sigint_handled(self) -> Iterator[None]:
        """The first ^C sets a flag the loop acts on (see the module doc)."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers live in the main thread; ^C is its business there
            return
        previous = signal.signal(signal.SIGINT, self.on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    # the run -----------------------------------------------------------------------------

    def run(self) -> RunResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.paths = make_transcripts(self.session_dir, cfg.sessions, cfg.padding_bytes)
        padding_end = os.path.getsize(self.paths[0])
        setup = time.perf_counter() - t0
        self.log.write({"t": "setup", "seconds": setup, "bytes": padding_end})
        started = time.perf_counter()
        with self.sigint_handled():
            abandoned = False
            try:
                self.loop(started)
            except KeyboardInterrupt:
                abandoned = True
                raise
            finally:
                elapsed = time.perf_counter() - started
                self.shutdown(hurry=abandoned)
        return RunResult(
            run_dir=self.run_dir,
            session_dir=self.session_dir,
            log_dir=self.log_dir,
            paths=self.paths,
            setup_seconds=setup,
            elapsed=elapsed,
            padding_end=padding_end,
            respawns=self.respawns,
            kills_sent=self.kills_sent,
            outcomes=dict(self.outcomes),
            foreign_exitcodes=dict(self.foreign_exitcodes),
            interrupted=self.interrupted,
        )

    def loop(self, started: float) -> None:
        cfg = self.cfg
        for slot in self.slots:
            self.spawn(slot)
        self.start_foreign()
        last_shown = 0.0
        # A run that stops moving (a wedged lock, a worker stuck in a syscall) must end
        # with an error, not hang: allow for parsing a large transcript in between.
        stall_limit = _STALL_SECONDS + cfg.transcript_mb / 10
        moved_at, last_turns, last_done = time.monotonic(), -1, -1
        stopped_at: float | None = None
        while True:
            if self.interrupted and stopped_at is None:
                stopped_at = time.monotonic()
                self.board.stop()
                running = [s.task.attempt for s in self.slots if s.task is not None]
                self.log.write({"t": "interrupt", "running": running})
                self.progress.interrupted = True
                self.show(started)
            if stopped_at is None:
                self.dispatch()
                if self.done():
                    break
            elif self.idle():
                break
            elif time.monotonic() - stopped_at > _INTERRUPT_GRACE:
                self.kill_running()
            turns = self.board.turns()
            if (turns, self.progress.attempts_done) != (last_turns, last_done):
                moved_at, last_turns, last_done = (
                    time.monotonic(),
                    turns,
                    self.progress.attempts_done,
                )
            elif time.monotonic() - moved_at > stall_limit:
                raise FleetAbortedError(
                    f"no turn and no attempt ended for {stall_limit:.0f} s; see {self.log_dir}"
                )
            now = time.monotonic()
            deadlines = [s.kill_at - now for s in self.slots if s.kill_at is not None]
            timeout = max(0.0, min([_WAIT_SLICE, *deadlines]))
            waitables: list[Any] = []
            for slot in self.slots:
                waitables.append(slot.proc.sentinel)
                if slot.conn is not None:
                    waitables.append(slot.conn)
            ready = set(wait(waitables, timeout))
            for slot in self.slots:
                if slot.conn is not None and slot.conn in ready:
                    self.drain(slot)
            for slot in self.slots:
                if slot.proc.sentinel in ready or not slot.proc.is_alive():
                    self.buried(slot)
            if stopped_at is None:
                self.kill_due()
            if time.perf_counter() - last_shown >= _WAIT_SLICE:
                last_shown = time.perf_counter()
                self.show(started)
        self.show(started)

    def show(self, started: float) -> None:
        self.progress.turns = self.board.turns()
        self.progress.elapsed = time.perf_counter() - started
        self.on_progress(self.progress)

    def shutdown(self, hurry: bool = False) -> None:
        """Stop every child and wait for it. ``hurry`` (a second ^C): kill them now."""
        self.board.stop()
        for slot in self.slots:
            if slot.conn is not None:
                with contextlib.suppress(OSError):
                    slot.conn.send(None)
        deadline = time.monotonic() + (0.0 if hurry else _JOIN_TIMEOUT)
        procs = [slot.proc for slot in self.slots if slot.proc is not None]
        for proc in [*procs, *self.foreign.values()]:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        # A foreign writer that died early made the run quieter than asked: the report
        # must say so rather than pass on fewer events.
        self.foreign_exitcodes = {name: p.exitcode for name, p in self.foreign.items()}
        for name, code in self.foreign_exitcodes.items():
            self.log.write({"t": "foreign-exit", "name": name, "exitcode": code})
        for slot in self.slots:
            if slot.conn is not None:
                slot.conn.close()
        self.log.close()


def run_fleet(
    cfg: FleetConfig, run_dir: str, on_progress: Callable[[Progress], None] = lambda p: None
) -> RunResult:
    """Run the fleet in ``run_dir`` (created if needed) and return where everything is."""
    return _Supervisor(cfg, run_dir, on_progress).run()
