"""The fleet across hosts: ``sessionfence fleet --store postgresql[://...]``.

Worker "hosts" (separate processes, ``multihost_worker``) share no file: each reaches the
sessions only through its own connections to the PostgreSQL store (from its own network
namespace, over a veth link, when the fleet can make namespaces: root with ``ip``, and a
server it started); the supervisor gives them attempts over a pipe and they report every
acknowledged append. A co-tenant host delivers gateway messages (idempotency keys, some
retried). Every attempt claims its session with a lease on the server's clock, without
force: a host that dies or stalls keeps the session until its lease expires, then another
host takes it over. Chaos (docs/multihost.md, "The fleet across hosts"):

- **paused writer**: a worker is SIGSTOPped mid-attempt; once its lease has expired by the
  server's clock, another host claims the session (without force) and runs the next
  attempt; then the paused one is resumed: the write it had pending must be refused at
  commit (``late_writes_refused``); one that landed after the new claim
  (``late_writes_landed``) fails the run;
- **SIGKILL**: a worker host is killed mid-attempt, at a random point or between an
  append's send and its acknowledgement (the supervisor holds the session row until the
  append is seen waiting on the server, kills the host, then lets the append commit: it
  lands unacknowledged); the session is taken over by another host after the lease expires;
- **foreign content** and **supersession**: in chosen prompt windows, the worker host's
  rogue client (its own connection) writes benign unfenced lines the fence must accept,
  hostile ones it must detect (a foreign user message, a garbage line, an id reuse, a
  rewritten copy of a line, an ``UPDATE`` or ``DELETE`` of stored lines), or claims the
  session as another run while the worker is live (its next append or check must be
  refused);
- **server restart**: ``pg_ctl restart -m fast`` on a server the fleet started itself
  (on an existing server it is reported as skipped);
- **killed connections**: ``pg_terminate_backend`` on a worker's backend.

The oracle reads the store at the end: every acknowledged append is there exactly once (by
its idempotency key, with its id) unless chaos deleted it, nothing is there twice, no line
of a superseded revision landed after the claim that superseded it, every supersession a
worker saw was one chaos made, every hostile foreign event was detected in its window and
every benign one accepted, and no other takeover was raised. Exit 0 only when all of that
holds.

The same runner drives a ``FileStore`` (``store="file"``, one host: sessions in files, no
chaos), so the benchmark compares the two on the same workload.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import math
import os
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from .multihost_worker import BENIGN_KINDS, HOSTILE_KINDS

__all__ = ["KINDS", "MultihostConfig", "cli_run", "run_multihost"]


@dataclass(frozen=True)
class MultihostConfig:
    store: str = "postgresql"  # "postgresql" (throwaway server), a URL, or "file"
    workers: int = 4
    sessions: int = 8
    attempts: int = 3  # attempts per session that end in a verdict (not killed)
    turns: int = 10
    chaos: float = 0.0
    supersede: float = 0.0  # probability per prompt window of a claim by another run
    seed: int = 0
    think_min: float = 0.002
    think_max: float = 0.008
    cotenants: int = 1
    transcript_mb: float = 0.05  # generated transcript imported per session (import_jsonl)
    lease_s: float = 1.0  # claims' lease on the server's clock
    max_kills_per_session: int = 3
    netns: bool | None = None  # None: network namespaces when the fleet can make them
    keep: bool = False
    # None: every kind; else only these (host events, foreign kinds: KINDS below).
    chaos_kinds: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.chaos_kinds is not None:
            unknown = sorted(set(self.chaos_kinds) - set(KINDS))
            if unknown or not self.chaos_kinds:
                raise ValueError(
                    f"unknown chaos kinds {unknown}; known: {', '.join(KINDS)}"
                    if unknown
                    else "chaos kinds must not be empty"
                )

    def allows(self, kind: str) -> bool:
        return self.chaos_kinds is None or kind in self.chaos_kinds


_TERMINATE = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s"
_WAITING_APPEND = (
    "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
    "AND wait_event_type = 'Lock' AND query LIKE '%%sf_append%%'"
)
# Chaos on the host of an attempt (at most one per attempt, so that a detection has one
# cause), with weights.
_HOST_CHAOS = {"pause": 3, "kill": 2, "kill-inflight": 2, "terminate": 2, "supersede": 2}
# A paused host is resumed after this long at most (see _Run.unstick).
_PAUSE_LIMIT = 60.0
#: Every chaos kind, for ``--chaos-kinds``: host events, the server restart (once per
#: run), then foreign content.
KINDS = (*_HOST_CHAOS, "restart", *HOSTILE_KINDS, *BENIGN_KINDS)


class _Host:
    """One host process (restarted after a SIGKILL: a new incarnation) and the thread
    that reads its reports."""

    def __init__(
        self, name: str, cfg: dict[str, Any], events: queue.Queue[Any], prefix: list[str]
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.events = events
        self.prefix = prefix
        self.incarnation = 0
        self.busy: dict[str, Any] | None = None
        self.ready = False
        self.paused = False
        self.killed = False
        self.start()

    def start(self) -> None:
        self.incarnation += 1
        self.app = f"{self.name}.{self.incarnation}"
        cfg = {**self.cfg, "app": self.app}
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "sessionfence.fleet.multihost_worker",
                json.dumps(cfg),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            # A terminal's ^C is the supervisor's alone: it stops the hosts itself.
            start_new_session=True,
        )
        self.busy, self.ready, self.paused, self.killed = None, False, False, False
        self.thread = threading.Thread(
            target=self._read, args=(self.proc, self.incarnation), daemon=True
        )
        self.thread.start()

    def _read(self, proc: subprocess.Popen[str], incarnation: int) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.put((self.name, incarnation, json.loads(line)))
        self.events.put((self.name, incarnation, {"ev": "exit"}))

    @property
    def free(self) -> bool:
        return self.ready and self.busy is None and not self.paused

    def send(self, order: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(order) + "\n")
        self.proc.stdin.flush()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        with contextlib.suppress(Exception):
            self.send({"op": "stop"})
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Network:
    """One network namespace per host, linked to the root namespace by a veth pair on a
    /30 of its own; the server listens on the root ends. Needs root and ``ip``."""

    def __init__(self, hosts: int, rng: random.Random) -> None:
        self.token = uuid.uuid4().hex[:4]
        self.namespaces: list[str] = []
        self.links: list[str] = []
        taken = subprocess.run(
            ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(50):
            self.prefix = f"10.{rng.randrange(64, 128)}.{rng.randrange(256)}"
            if f" {self.prefix}." not in taken:
                break
        self.server_ips = [f"{self.prefix}.{4 * i + 1}" for i in range(hosts)]
        try:
            for i in range(hosts):
                ns, a, b = f"sf-{self.token}-{i}", f"sf{self.token}{i}a", f"sf{self.token}{i}b"
                self._ip("netns", "add", ns)
                self.namespaces.append(ns)
                self._ip("link", "add", a, "type", "veth", "peer", "name", b)
                self.links.append(a)
                self._ip("link", "set", b, "netns", ns)
                self._ip("addr", "add", f"{self.prefix}.{4 * i + 1}/30", "dev", a)
                self._ip("link", "set", a, "up")
                self._ip("-n", ns, "addr", "add", f"{self.prefix}.{4 * i + 2}/30", "dev", b)
                self._ip("-n", ns, "link", "set", b, "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @property
    def cidr(self) -> str:
        return f"{self.prefix}.0/24"

    @staticmethod
    def _ip(*args: str) -> None:
        out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise OSError(f"ip {' '.join(args)}: {out.stderr.strip()}")

    def prefix_for(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[i]]

    def close(self) -> None:
        for ns in self.namespaces:  # deleting a namespace deletes its end of the veth pair
            with contextlib.suppress(Exception):
                self._ip("netns", "del", ns)
        for link in self.links:
            with contextlib.suppress(Exception):
                subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)
        self.namespaces, self.links = [], []


def _network_unavailable(config: MultihostConfig, hosts: int) -> str | None:
    """Why the hosts cannot get network namespaces of their own (None: they can)."""
    if config.netns is False or os.environ.get("SESSIONFENCE_FLEET_NETNS") == "0":
        return "turned off"
    if config.store != "postgresql":
        return (
            "an existing server: the fleet cannot make it listen on the namespaces' links"
            if config.store != "file"
            else "the file store is one host"
        )
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces and veth links"
    if shutil.which("ip") is None:
        return "needs the 'ip' tool (iproute2)"
    if hosts > 60:
        return "more than 60 hosts"
    return None


class _Progress:
    """Feeds the file fleet's live display (report.ProgressDisplay) at most 10 times a s."""

    def __init__(self, sink: Callable[[Any], None] | None, planned: int) -> None:
        self.sink = sink
        self.shown = 0.0
        self.state: Any = None
        if sink is not None:
            from .supervisor import Progress

            self.state = Progress(attempts_planned=planned)

    def update(
        self,
        started: float,
        attempts: int,
        turns: int,
        kills: int,
        takeovers: int,
        force: bool = False,
    ) -> None:
        if self.sink is None:
            return
        now = time.monotonic()
        if not force and now - self.shown < 0.1:
            return
        self.shown = now
        st = self.state
        st.attempts_done, st.turns, st.kills, st.takeovers = attempts, turns, kills, takeovers
        st.elapsed = now - started
        self.sink(st)


class _Run:
    """The supervisor of one run: hosts, routing, chaos, and what they reported."""

    def __init__(
        self, config: MultihostConfig, admin: Any, url: str | None, server: Any, progress: Any
    ) -> None:
        self.config = config
        self.admin = admin
        self.url = url
        self.server = server
        self.pg = config.store != "file"
        self.rng = random.Random(config.seed)
        self.events: queue.Queue[Any] = queue.Queue()
        self.hosts: list[_Host] = []
        self.cotenant_hosts: list[_Host] = []
        self.by_name: dict[str, _Host] = {}
        self.sessions = [f"s{i:03d}" for i in range(config.sessions)]
        self.queue: list[str] = list(self.sessions)
        self.owner: dict[str, str] = {}  # session -> host running its current attempt
        self.orders: dict[str, dict[str, Any]] = {}  # run -> its order and what befell it
        self.started: Counter[str] = Counter()
        self.done: Counter[str] = Counter()
        self.kills_per_session: Counter[str] = Counter()
        self.acks: list[dict[str, Any]] = []
        self.attempts: list[dict[str, Any]] = []
        self.foreign: list[dict[str, Any]] = []
        self.chaos_claims: list[dict[str, Any]] = []
        self.kills: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.retries = [0, 0]
        self.turns = 0
        self.pending_failovers: list[str] = []  # runs of paused hosts whose lease expired
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.tick = itertools.count()
        self.restart_thread: threading.Thread | None = None
        self.stopping = False
        self.errors: list[str] = []
        self.tracing = os.environ.get("SESSIONFENCE_FLEET_TRACE") == "1"
        self.t0 = time.monotonic()
        self.progress = _Progress(progress, config.sessions * config.attempts)
        self.deck = [k for k in _HOST_CHAOS if config.allows(k)]
        self.rng.shuffle(self.deck)

    # timers -----------------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (when, next(self.tick), action))

    def run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, action = heapq.heappop(self.timers)
            started = time.monotonic()
            action()
            if time.monotonic() - started > 0.2:
                self.trace(f"slow chaos step: {time.monotonic() - started:.3f} s")

    # routing ----------------------------------------------------------------------------

    def plan(self, session: str) -> tuple[str | None, dict[int, list[list[str]]]]:
        """The chaos of one attempt: at most one host event, and foreign events in its
        prompt windows (hostile ones only when no host event may cause a detection)."""
        cfg, rng = self.config, self.rng
        if not self.pg or (cfg.chaos <= 0 and cfg.supersede <= 0):
            return None, {}
        host: str | None = None
        kinds = {k: w for k, w in _HOST_CHAOS.items() if cfg.allows(k)}
        if len(self.hosts) < 2:
            kinds.pop("pause", None)  # nobody to take the session over
        if self.kills_per_session[session] >= cfg.max_kills_per_session:
            kinds.pop("kill", None)
            kinds.pop("kill-inflight", None)
        if kinds and cfg.chaos > 0 and rng.random() < min(1.0, 2 * cfg.chaos):
            # Every kind once per run first (in a random order), then by weight.
            host = next((k for k in self.deck if k in kinds), None)
            if host is not None:
                self.deck.remove(host)
            else:
                host = rng.choices(list(kinds), list(kinds.values()))[0]
        # A supersession: the host event, or by --supersede's coin per window.
        sup_turn: int | None = None
        if host == "supersede":
            sup_turn = rng.randrange(cfg.turns)
        elif cfg.supersede > 0 and host in (None, "terminate"):
            sup_turn = next((t for t in range(cfg.turns) if rng.random() < cfg.supersede), None)
        hostile_ok = host in (None, "terminate") and sup_turn is None
        hostile = [k for k in HOSTILE_KINDS if cfg.allows(k)]
        benign = [k for k in BENIGN_KINDS if cfg.allows(k)]
        windows: dict[int, list[list[str]]] = {}
        for turn in range(cfg.turns):
            events: list[list[str]] = []
            ends = False
            if cfg.chaos > 0 and rng.random() < cfg.chaos / 2:
                ends = hostile_ok and bool(hostile) and (not benign or rng.random() < 0.6)
                pool = hostile if ends else benign
                if pool:
                    events.append([rng.choice(pool), rng.choice(("before", "after"))])
            if turn == sup_turn:
                events.append(["supersede", rng.choice(("before", "after"))])
            if events:
                windows[turn] = events
            if ends:
                break  # the attempt ends on its hostile event: nothing after it
        if host in ("kill", "kill-inflight"):
            # A host killed right after its rogue client wrote could not report the line.
            windows = {}
        return host, windows

    def assign(self) -> None:
        for victim in list(self.pending_failovers):
            host = next((h for h in self.hosts if h.free), None)
            if host is None:
                return
            self.pending_failovers.remove(victim)
            info = self.orders[victim]
            self.dispatch(host, info["session"], None, {}, failover_of=victim)
        for host in self.hosts:
            if not host.free:
                continue
            pick = next((s for s in self.queue if s not in self.owner), None)
            if pick is None:
                return
            self.queue.remove(pick)
            chaos, windows = self.plan(pick)
            self.dispatch(host, pick, chaos, windows)

    def dispatch(
        self,
        host: _Host,
        session: str,
        chaos: str | None,
        windows: dict[int, list[list[str]]],
        failover_of: str | None = None,
    ) -> None:
        self.started[session] += 1
        run = f"{host.name[9:]}-{session}-{self.started[session]}-{uuid.uuid4().hex[:6]}"
        order = {
            "session": session,
            "run": run,
            "seed": self.rng.randrange(1 << 30),
            "chaos": {"windows": {str(t): e for t, e in windows.items()}},
        }
        info = {
            **order,
            "host": host.name,
            "app": host.app,
            "host_chaos": chaos,
            "failover_of": failover_of,
            "sent": time.monotonic(),
        }
        if chaos is not None and chaos != "supersede":
            info["chaos_turn"] = self.rng.randrange(max(1, self.config.turns - 2))
        self.orders[run] = info
        self.owner[session] = host.name
        host.busy = info
        host.send(order)

    # chaos ------------------------------------------------------------------------------

    def running(self, host: _Host, run: str) -> bool:
        return host.busy is not None and host.busy["run"] == run and not host.killed

    def on_claimed(self, host: _Host, ev: dict[str, Any]) -> None:
        info = self.orders.get(ev["run"])
        if info is None:
            return
        now = time.monotonic()
        info["claimed"] = now
        info["revision"] = ev["revision"]
        self.counts["claim_waits"] += int(ev.get("waits") or 0)
        self.trace(f"claimed {ev['run']} rev {ev['revision']} after {ev.get('wait_s')} s")
        if ev.get("waits"):
            self.counts["claims_that_waited"] += 1
        victim_run = info.get("failover_of")
        if victim_run is not None:
            victim = self.orders[victim_run]
            self.chaos_claims.append(
                {
                    "session": ev["session"],
                    "run": ev["run"],
                    "revision": ev["revision"],
                    "victim": victim_run,
                    "kind": "pause",
                }
            )
            pause = victim["pause"]
            pause["failover_claimed"] = now - pause["stopped"]
            paused_host = self.by_name[victim["host"]]
            self.at(now + self.rng.uniform(0.0, 0.02), lambda: self.resume(paused_host))
            return
        if info.get("chaos_turn") == 0:
            self.trigger(host, ev["run"])

    def trigger(self, host: _Host, run: str) -> None:
        """Start the attempt's host chaos, within the next turn: it fires on the worker's
        own turn reports, so it lands mid-attempt whatever attempts last."""
        info = self.orders[run]
        kind = info["host_chaos"]
        delay = self.rng.uniform(0.0, self.config.think_max + 0.002)
        actions: dict[str, Callable[[], None]] = {
            "pause": lambda: self.pause(host, run),
            "kill": lambda: self.kill(host, run, None),
            "kill-inflight": lambda: self.hold_row(host, run),
            "terminate": lambda: self.terminate(host, run),
        }
        if kind in actions:
            self.trace(f"{kind} {run} in {delay * 1000:.1f} ms")
            self.at(time.monotonic() + delay, actions[kind])

    def skipped(self, kind: str, what: str) -> None:
        """The attempt ended before its chaos: another attempt gets that kind."""
        self.counts[what] += 1
        self.deck.append(kind)

    def trace(self, text: str) -> None:
        if self.tracing:
            print(f"[{time.monotonic() - self.t0:8.3f}] {text}", file=sys.stderr, flush=True)

    def pause(self, host: _Host, run: str) -> None:
        if not self.running(host, run):
            self.skipped("pause", "pauses_skipped")  # the attempt ended first
            return
        if not any(h is not host and not h.paused for h in self.hosts):
            # Another host must be left to take the session over.
            self.skipped("pause", "pauses_skipped")
            return
        host.signal(signal.SIGSTOP)
        host.paused = True
        self.trace(f"SIGSTOP {host.app} ({run})")
        info = self.orders[run]
        info["pause"] = {"stopped": time.monotonic(), "host": host.name}
        self.counts["paused"] += 1
        self.at(time.monotonic() + 0.05, lambda: self.wait_lease(host, run))
        self.at(time.monotonic() + _PAUSE_LIMIT, lambda: self.unstick(host, run))

    def unstick(self, host: _Host, run: str) -> None:
        """A safety net: a host still stopped this long (no failover could be made) is
        resumed, and the run says so."""
        pause = self.orders[run].get("pause") or {}
        if host.paused and "failover_claimed" not in pause:
            pause["cancelled"] = True
            with contextlib.suppress(ValueError):
                self.pending_failovers.remove(run)
            self.errors_note(f"{run}: no failover within {_PAUSE_LIMIT:.0f} s; resumed")
            self.resume(host)

    def wait_lease(self, host: _Host, run: str) -> None:
        """Poll the server until the paused host's lease has expired by its clock."""
        info = self.orders[run]
        if not host.paused or info.get("pause", {}).get("cancelled"):
            return
        state = self.admin.lease_state(info["session"])
        if state.live and state.writer_run_id == run:
            self.at(time.monotonic() + 0.05, lambda: self.wait_lease(host, run))
            return
        info["pause"]["lease_expired"] = time.monotonic() - info["pause"]["stopped"]
        self.pending_failovers.append(run)
        self.trace(f"lease of {run} expired: failover")

    def resume(self, host: _Host) -> None:
        if host.paused:
            host.paused = False
            host.signal(signal.SIGCONT)
            self.trace(f"SIGCONT {host.app}")

    def kill(self, host: _Host, run: str, mode: str | None) -> None:
        if not self.running(host, run):
            if mode is None:
                self.skipped("kill", "kills_skipped")
            return
        host.killed = True
        host.signal(signal.SIGKILL)
        info = self.orders[run]
        info["killed"] = mode or "random point"
        self.trace(f"SIGKILL {host.app} ({run}, {info['killed']})")
        self.kills.append({"session": info["session"], "run": run, "mode": info["killed"]})
        self.kills_per_session[info["session"]] += 1

    def hold_row(self, host: _Host, run: str) -> None:
        """Kill between an append's send and its acknowledgement: hold the session row
        (FOR UPDATE) until the host's next append is seen waiting for it on the server,
        SIGKILL the host, then let the append run: it commits, unacknowledged."""
        if not self.running(host, run):
            self.skipped("kill-inflight", "kills_skipped")
            return
        info = self.orders[run]
        conn: Any = None
        try:
            conn = self.admin.psycopg.connect(
                self.url, autocommit=False, application_name="sf-fleet-chaos"
            )
            conn.execute(
                f"SELECT 1 FROM {self.admin.sql.q}.sf_sessions WHERE session_id = %s FOR UPDATE",
                (info["session"],),
            )
        except Exception as exc:  # the server is restarting: a kill at a random point
            self.errors_note(f"hold_row: {exc!r}")
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            self.kill(host, run, None)
            return
        self.at(time.monotonic(), lambda: self.watch_row(host, run, conn, time.monotonic()))

    def watch_row(self, host: _Host, run: str, conn: Any, since: float) -> None:
        seen = False
        with contextlib.suppress(Exception):
            rows = self.admin._run(lambda c: c.execute(_WAITING_APPEND, (host.app,)).fetchall())
            seen = bool(rows)
        if not seen and time.monotonic() - since < 3.0 and self.running(host, run):
            self.at(time.monotonic() + 0.003, lambda: self.watch_row(host, run, conn, since))
            return
        self.kill(host, run, "between send and acknowledgement" if seen else None)
        if host.killed:
            with contextlib.suppress(Exception):
                host.proc.wait(timeout=10)  # dead before its append may run
        with contextlib.suppress(Exception):
            conn.rollback()
        with contextlib.suppress(Exception):
            conn.close()

    def terminate(self, host: _Host, run: str) -> None:
        if not self.running(host, run):
            self.skipped("terminate", "terminations_skipped")
            return
        rows = self.admin._run(lambda c: c.execute(_TERMINATE, (host.app,)).fetchall())
        self.counts["terminations"] += 1
        self.counts["backends_terminated"] += sum(1 for r in rows if r[0])

    def restart_server(self) -> None:
        if self.server is None:
            self.counts["server_restarts_skipped"] += 1
            return

        def restart() -> None:
            try:
                self.trace("pg_ctl restart -m fast")
                self.server.restart("fast")
                self.counts["server_restarts"] += 1
                self.trace("server restarted")
            except Exception as exc:  # pragma: no cover - reported
                self.errors_note(f"server restart failed: {exc}")

        self.restart_thread = threading.Thread(target=restart, daemon=True)
        self.restart_thread.start()

    def errors_note(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)

    # events -----------------------------------------------------------------------------

    def on_attempt(self, host: _Host, ev: dict[str, Any]) -> None:
        info = self.orders.get(ev["run"], {})
        if host.busy is not None and host.busy["run"] == ev["run"]:
            host.busy = None
        self.attempts.append(ev)
        pause = info.get("pause")
        if pause is not None and host.paused:
            # It ended before the stop (its report was on its way): nothing to take over.
            pause["cancelled"] = True
            with contextlib.suppress(ValueError):
                self.pending_failovers.remove(ev["run"])
            self.resume(host)
        victim = info.get("failover_of")
        if victim is not None and "claimed" not in info:
            # The failover attempt failed before it claimed: resume its victim anyway.
            self.errors_note(f"failover {ev['run']} of {victim} ended unclaimed")
            vpause = self.orders[victim].get("pause") or {}
            vpause["cancelled"] = True
            self.resume(self.by_name[self.orders[victim]["host"]])
        sid = ev["session"]
        if self.owner.get(sid) != host.name:
            return  # superseded after a failover: the session's attempt runs elsewhere
        del self.owner[sid]
        if ev["outcome"] in ("completed", "takeover", "superseded"):
            self.done[sid] += 1
        self.requeue(sid)

    def requeue(self, sid: str) -> None:
        cfg = self.config
        if self.done[sid] < cfg.attempts and self.started[sid] < cfg.attempts * 4:
            self.queue.append(sid)

    def on_exit(self, host: _Host, incarnation: int) -> None:
        if incarnation != host.incarnation:
            return
        info = host.busy
        if info is not None:
            sid = info["session"]
            if not host.killed:
                self.counts["crashed"] += 1
                self.errors_note(f"host {host.name} died during {info['run']}")
            if self.owner.get(sid) == host.name:
                del self.owner[sid]
                self.requeue(sid)
        elif not host.killed:
            self.counts["crashed"] += 1
            self.errors_note(f"host {host.name} exited")
        self.counts["respawned"] += 1
        host.start()

    def handle(self, name: str, incarnation: int, ev: dict[str, Any]) -> None:
        kind = ev.get("ev")
        if kind == "ack":
            self.acks.append(ev)
            return
        if kind == "retry":
            self.retries[0] += 1
            self.retries[1] += bool(ev.get("same"))
            return
        host = self.by_name.get(name)
        if host is None:  # a co-tenant host: it runs until the end of the run
            if kind == "exit" and not self.stopping:
                self.counts["crashed"] += 1
                self.errors_note(f"co-tenant host {name} exited during the run")
            return
        if kind == "exit":
            self.on_exit(host, incarnation)
        elif kind == "ready" and incarnation == host.incarnation:
            host.ready = True
        elif kind == "claimed":
            self.on_claimed(host, ev)
        elif kind == "turn":
            self.turns += 1
            info = self.orders.get(ev["run"])
            if info is not None and info.get("chaos_turn") == int(ev["turn"]) + 1:
                self.trigger(host, ev["run"])
        elif kind == "foreign":
            self.foreign.append(ev)
            if ev["kind"] == "supersede":
                self.chaos_claims.append(
                    {
                        "session": ev["session"],
                        "run": ev["claimer"],
                        "revision": ev["revision"],
                        "victim": ev["run"],
                        "kind": "supersede",
                    }
                )
        elif kind == "attempt":
            self.on_attempt(host, ev)

    def state(self) -> str:
        """What every host is doing (for a stalled run's error)."""
        hosts = [
            f"{h.app}: {'paused ' if h.paused else ''}"
            f"{h.busy['run'] if h.busy else ('idle' if h.ready else 'starting')}"
            for h in self.hosts
        ]
        return (
            f"hosts [{'; '.join(hosts)}], queue {self.queue}, owners {self.owner}, "
            f"failovers waiting {self.pending_failovers}, notes {self.errors}"
        )

    def finished(self) -> bool:
        return (
            not self.queue
            and not self.owner
            and not self.pending_failovers
            and all(h.busy is None for h in self.hosts)
        )

    def loop(self, base: dict[str, Any], prefixes: list[list[str]], urls: list[str]) -> float:
        cfg = self.config
        for w in range(cfg.workers):
            name = f"sf-fleet-w{w}"
            host_cfg = {**base, "role": "worker", "name": name, "url": urls[w]}
            host = _Host(name, host_cfg, self.events, prefixes[w])
            self.hosts.append(host)
            self.by_name[name] = host
        for c in range(cfg.cotenants):
            i = cfg.workers + c
            name = f"sf-fleet-gw{c}"
            host_cfg = {
                **base,
                "role": "cotenant",
                "name": name,
                "url": urls[i],
                "seed": cfg.seed * 100 + c,
            }
            self.cotenant_hosts.append(_Host(name, host_cfg, self.events, prefixes[i]))
        # The run's clock starts when every worker host is up (a process start is no turn).
        deadline = time.monotonic() + 120
        while not all(h.ready for h in self.hosts):
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker hosts did not start: {self.state()}")
            with contextlib.suppress(queue.Empty):
                self.handle(*self.events.get(timeout=0.1))
        t_run = time.monotonic()
        if cfg.chaos > 0 and self.pg and cfg.allows("restart"):
            self.at(t_run + self.rng.uniform(0.3, 1.0), self.restart_server)
        last_move, last_state = time.monotonic(), (0, 0)
        while True:
            self.run_timers()
            self.assign()
            if self.finished() and any(h.ready for h in self.hosts):
                break
            timeout = 0.05
            if self.timers:
                timeout = max(0.0, min(timeout, self.timers[0][0] - time.monotonic()))
            try:
                name, incarnation, ev = self.events.get(timeout=timeout)
                self.handle(name, incarnation, ev)
                while True:  # drain what else arrived
                    name, incarnation, ev = self.events.get_nowait()
                    self.handle(name, incarnation, ev)
            except queue.Empty:
                pass
            takeovers = sum(1 for a in self.attempts if a["outcome"] != "completed")
            done = sum(self.done.values())
            self.progress.update(t_run, done, self.turns, len(self.kills), takeovers)
            state = (self.turns, len(self.attempts))
            if state != last_state:
                last_move, last_state = time.monotonic(), state
            elif time.monotonic() - last_move > 180:
                raise RuntimeError(f"no turn and no attempt ended for 180 s: {self.state()}")
        run_s = time.monotonic() - t_run
        takeovers = sum(1 for a in self.attempts if a["outcome"] != "completed")
        self.progress.update(
            t_run, sum(self.done.values()), self.turns, len(self.kills), takeovers, force=True
        )
        if self.restart_thread is not None:
            self.restart_thread.join(timeout=120)
        self.stopping = True
        for h in self.cotenant_hosts:
            with contextlib.suppress(ProcessLookupError):
                h.proc.terminate()
            h.proc.wait()
        for h in self.cotenant_hosts:
            h.thread.join(timeout=10)
        while True:  # the co-tenants' last acknowledgements
            try:
                name, incarnation, ev = self.events.get_nowait()
            except queue.Empty:
                break
            if ev.get("ev") in ("ack", "retry"):
                self.handle(name, incarnation, ev)
        return run_s


def _setup_sessions(admin: Any, sessions: list[str], transcript_mb: float) -> int:
    """Each session: a transcript of ``transcript_mb`` made by the file fleet's generator,
    imported with ``import_jsonl`` (streamed into the store). It is generated once and
    imported into every session, then removed: the hosts never see a file. Returns its
    size in bytes."""
    from .transcripts import make_transcripts

    tmp = tempfile.mkdtemp(prefix="sessionfence-fleet-import-")
    try:
        (path,) = make_transcripts(tmp, 1, int(transcript_mb * 1024 * 1024))
        for sid in sessions:
            admin.import_jsonl(sid, path)
        return os.path.getsize(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_multihost(config: MultihostConfig, *, progress: Any = None) -> dict[str, Any]:
    """Run the fleet and return its report (a JSON-able dict; ``passed`` decides the exit).
    ``progress``: called with a ``supervisor.Progress`` while it runs (the live display)."""
    from ..store import FileStore, PostgresStore, TempPostgres

    server: Any = None
    network: _Network | None = None
    root: str | None = None
    schema = "sf_fleet_" + uuid.uuid4().hex[:8]
    hosts = config.workers + config.cotenants
    skipped: list[dict[str, str]] = []
    t0 = time.monotonic()
    net_reason = _network_unavailable(config, hosts)
    admin: Any = None
    run: _Run | None = None
    try:
        if net_reason is None:
            try:
                network = _Network(hosts, random.Random(f"{config.seed}:net"))
            except (OSError, subprocess.SubprocessError) as exc:
                net_reason = f"could not be made: {exc}"
        if config.store == "file":
            root = tempfile.mkdtemp(prefix="sessionfence-fleet-files-")
            admin = FileStore(root)
            url = None
            urls: list[Any] = [None] * hosts
        else:
            if config.store == "postgresql":
                listen = ("127.0.0.1", *(network.server_ips if network else ()))
                trusted = (network.cidr,) if network else ()
                server = TempPostgres(durable=True, listen=listen, trusted_networks=trusted)
                server.start()
                url = server.url
            else:
                url = config.store
            admin = PostgresStore(url, schema=schema, application_name="sf-fleet-supervisor")
            urls = [server.url_for(ip) for ip in network.server_ips] if network else [url] * hosts
        sessions = [f"s{i:03d}" for i in range(config.sessions)]
        transcript_bytes = _setup_sessions(admin, sessions, config.transcript_mb)
        setup_s = time.monotonic() - t0
        base = {
            "store": "file" if config.store == "file" else "postgresql",
            "schema": schema,
            "root": root,
            "turns": config.turns,
            "think_min": config.think_min,
            "think_max": config.think_max,
            "sessions": sessions,
            "lease_s": config.lease_s,
        }
        prefixes = [network.prefix_for(i) for i in range(hosts)] if network else [[]] * hosts
        run = _Run(config, admin, url, server if config.store == "postgresql" else None, progress)
        run_s = run.loop(base, prefixes, urls)
        if net_reason is not None:
            skipped.append({"what": "network namespaces", "why": net_reason})
        if config.chaos > 0 and config.store == "file":
            skipped.append(
                {
                    "what": "chaos",
                    "why": "the file store runs without chaos here "
                    "(the file fleet, without --store, has its own)",
                }
            )
        if run.counts["server_restarts_skipped"]:
            skipped.append(
                {
                    "what": "server restart",
                    "why": "an existing server: only a server the fleet started is restarted",
                }
            )
        report = _oracle(run)
        report.update(
            {
                "store": "file" if config.store == "file" else "postgresql",
                "server": "throwaway (started by the fleet)"
                if config.store == "postgresql"
                else ("existing" if config.store != "file" else None),
                "hosts": f"{config.workers} worker processes + {config.cotenants} co-tenant, "
                "no shared files, "
                + (
                    f"each in its own network namespace (veth links, {network.cidr})"
                    if network
                    else "one network namespace"
                ),
                "network": {
                    "namespaces": network is not None,
                    "detail": f"veth links on {network.cidr}" if network else net_reason,
                    "names": list(network.namespaces) if network else [],
                },
                "config": {
                    "workers": config.workers,
                    "sessions": config.sessions,
                    "turns": config.turns,
                    "attempts_per_session": config.attempts,
                    "transcript_mb": config.transcript_mb,
                    "chaos": config.chaos,
                    "supersede": config.supersede,
                    "cotenants": config.cotenants,
                    "lease_s": config.lease_s,
                    "seed": config.seed,
                },
                "sessions": config.sessions,
                "setup_s": round(setup_s, 3),
                "transcript_bytes_at_start": transcript_bytes,
                "elapsed_s": round(run_s, 3),
                "turns_per_s": round(report["turns"] / run_s, 1) if run_s > 0 else 0.0,
                "chaos": config.chaos,
                "seed": config.seed,
                "skipped": skipped,
                "not_applicable": [],
            }
        )
        report["failures"] = _failures(report)
        report["passed"] = not report["failures"]
        return report
    finally:
        if run is not None:
            for h in run.hosts + run.cotenant_hosts:
                h.stop()
        if admin is not None:
            if config.store not in ("file", "postgresql") and not config.keep:
                with contextlib.suppress(Exception):
                    admin._run(lambda c: c.execute(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.close()
        if server is not None:
            server.stop()
        if network is not None:
            network.close()
        if root is not None and not config.keep:
            shutil.rmtree(root, ignore_errors=True)


def _rows(run: _Run, sid: str) -> list[tuple[int, str, str | None, int, str, str | None]]:
    """``(seq, role, writer run, revision, key, entry id)`` of every line of a session."""
    admin = run.admin
    if not run.pg:
        out: list[tuple[int, str, str | None, int, str, str | None]] = []
        for seq, raw in enumerate(admin.read_lines(sid)):
            with contextlib.suppress(ValueError):
                value = json.loads(raw)
                if seq > 0 and isinstance(value, dict):
                    out.append((seq, "line", None, 0, "", value.get("id")))
        return out
    sql = (
        "SELECT seq, role, writer_run_id, revision, coalesce(idempotency_key, ''), entry_id "
        f"FROM {admin.sql.q}.sf_entries WHERE session_id = %s ORDER BY seq"
    )
    rows = admin._run(lambda c: c.execute(sql, (sid,)).fetchall())
    return [(int(r[0]), r[1], r[2], int(r[3]), r[4], r[5]) for r in rows]


def _oracle(run: _Run) -> dict[str, Any]:
    """Judge the run against the store's final content and the hosts' reports."""
    examples: list[str] = []

    def example(text: str) -> None:
        if len(examples) < 8:
            examples.append(text)

    removed_keys: set[str] = set()
    removed_foreign = 0
    altered_keys: set[str] = set()
    unfenced = 0
    for e in run.foreign:
        for _ident, key, role in e.get("removed") or ():
            if key:
                removed_keys.add(key)
            removed_foreign += role == "foreign"
        for _ident, key, _role in e.get("altered") or ():
            if key:
                altered_keys.add(key)
        unfenced += e["kind"] not in ("supersede", "sql-update", "sql-delete")
    acks_by_session: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for a in run.acks:
        acks_by_session[a["session"]].append(a)
    acked_keys = {a["key"] for a in run.acks}
    lines = Counter[str]()
    late_landed = 0
    late_by_claim: dict[tuple[str, int], int] = {}
    unacked_by_run: Counter[str] = Counter()
    for sid in run.sessions:
        rows = _rows(run, sid)
        by_key: dict[str, list[Any]] = defaultdict(list)
        ids: Counter[str] = Counter()
        for row in rows:
            seq, role, writer, revision, key, ident = row
            if key:
                by_key[key].append(row)
            if role in ("claimant", "co-tenant", "line") and ident:
                ids[ident] += 1
            if role == "foreign":
                lines["foreign_found"] += 1
            if role == "claimant" and key not in acked_keys and writer is not None:
                unacked_by_run[writer] += 1
        dup = sum(c - 1 for c in ids.values() if c > 1)
        dup += sum(len(v) - 1 for v in by_key.values() if len(v) > 1)
        lines["duplicated"] += dup
        if dup:
            example(f"{sid}: {dup} lines twice")
        for a in acks_by_session[sid]:
            lines["acknowledged"] += 1
            if a["key"] in removed_keys:
                lines["removed_by_chaos"] += 1
                continue
            lines["altered_by_chaos"] += a["key"] in altered_keys
            if not run.pg:
                if ids.get(a["id"], 0) != 1:
                    lines["lost"] += 1
                    example(f"{sid}: acknowledged entry {a['id']} ({a['key']}) missing")
                continue
            found = by_key.get(a["key"], [])
            if not found or found[0][5] != a["id"]:
                lines["lost"] += 1
                example(f"{sid}: acknowledged entry {a['id']} ({a['key']}) missing")
        if run.pg:
            claims = run.admin.claims(sid)
            at_seq = {rev: seq for rev, _run, _sup, seq in claims}
            for seq, role, _writer, revision, _key, _ident in rows:
                nxt = at_seq.get(revision + 1)
                if role == "claimant" and nxt is not None and seq > nxt:
                    late_landed += 1
                    late_by_claim[sid, revision + 1] = late_by_claim.get((sid, revision + 1), 0) + 1
                    example(f"{sid}: line {seq} of revision {revision} landed late")
    expected_foreign = unfenced - removed_foreign
    foreign_lost = max(0, expected_foreign - lines["foreign_found"])
    foreign_extra = max(0, lines["foreign_found"] - expected_foreign)

    # Attempts, foreign events and supersessions -------------------------------------------
    attempts = {a["run"]: a for a in run.attempts}
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in run.foreign:
        by_run[e["run"]].append(e)
    tk: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    sup: Counter[str] = Counter()
    missed_examples: list[dict[str, Any]] = []
    false_examples: list[dict[str, Any]] = []
    sup_missed_examples: list[dict[str, Any]] = []
    benign: Counter[str] = Counter()
    for run_id, events in by_run.items():
        att = attempts.get(run_id)
        detail = (att or {}).get("detail") or {}
        outcome = (att or {}).get("outcome")
        passed = int((att or {}).get("turns") or 0)
        at_turn = detail.get("turn") if outcome in ("takeover", "superseded") else None
        merged = set((att or {}).get("merged") or ())
        hostile_at = {e["turn"] for e in events if e["kind"] in HOSTILE_KINDS}
        for e in events:
            kind = e["kind"]
            if kind == "supersede":
                if att is None:
                    sup["void"] += 1
                    continue
                sup["injected"] += 1
                if outcome == "superseded" and detail.get("new_revision") == e["revision"]:
                    sup["detected"] += 1
                elif e["turn"] < passed or outcome == "completed":
                    sup["missed"] += 1
                    if len(sup_missed_examples) < 5:
                        sup_missed_examples.append({**e, "outcome": outcome})
                else:
                    sup["void"] += 1
                continue
            if att is None:  # its host was SIGKILLed: no check judged it
                if kind in HOSTILE_KINDS:
                    tk["void"] += 1
                else:
                    benign["void"] += 1
                continue
            if kind in HOSTILE_KINDS:
                tk["injected"] += 1
                by_kind[kind]["injected"] += 1
                if outcome == "takeover" and at_turn == e["turn"]:
                    tk["detected"] += 1
                    by_kind[kind]["detected"] += 1
                    reasons[kind][str(detail.get("reason"))] += 1
                elif e["turn"] < passed or outcome == "completed":
                    tk["missed"] += 1
                    by_kind[kind]["missed"] += 1
                    if len(missed_examples) < 5:
                        missed_examples.append({**e, "outcome": outcome})
                else:
                    tk["void"] += 1
                continue
            benign["events"] += 1
            by_kind[kind]["benign"] += 1
            if e["turn"] < passed:
                if set(e.get("added") or ()) <= merged:
                    benign["accepted"] += 1
                    by_kind[kind]["accepted"] += 1
                else:
                    benign["unaccepted"] += 1
                    example(f"{e['session']} {run_id}: {kind} {e.get('added')} not merged")
            elif not (outcome == "takeover" and at_turn == e["turn"] and e["turn"] in hostile_at):
                # Its window's check raised with no hostile event in it (a false takeover,
                # counted below), or the attempt ended otherwise first.
                benign["void"] += 1
            else:
                benign["void"] += 1  # its window also held the hostile event it ended on
    explained = {(c["session"], c["revision"]) for c in run.chaos_claims}
    for a in run.attempts:
        detail = a.get("detail") or {}
        if a["outcome"] == "takeover":
            turn = detail.get("turn")
            if not any(
                e["turn"] == turn and e["kind"] in HOSTILE_KINDS for e in by_run.get(a["run"], ())
            ):
                tk["false"] += 1
                if len(false_examples) < 5:
                    false_examples.append(a)
        elif (
            a["outcome"] == "superseded"
            and (a["session"], detail.get("new_revision")) not in explained
        ):
            tk["unexplained_supersessions"] += 1
            example(f"{a['session']} {a['run']}: superseded by {detail.get('superseded_by')}")
        elif a["outcome"] == "error":
            example(f"{a['session']} {a['run']}: error {detail}")

    # Paused writers and supersessions of live ones ---------------------------------------
    fencing: Counter[str] = Counter()
    for info in run.orders.values():
        pause = info.get("pause")
        if pause is None or pause.get("cancelled") or "failover_claimed" not in pause:
            continue
        fencing["paused"] += 1
        paused = attempts.get(info["run"])
        if paused is None:
            continue
        detail = paused.get("detail") or {}
        if paused["outcome"] == "superseded":
            fencing["paused_attempts_superseded"] += 1
            if detail.get("at") == "commit":
                fencing["pending_writes_refused"] += 1
                fencing["late_writes_refused"] += 1
            else:
                fencing["superseded_at_check"] += 1
                fencing["late_writes_refused"] += detail.get("late") == "refused"
            fencing["late_writes_tried_landed"] += detail.get("late") == "landed"
        else:
            fencing["paused_after_last_write"] += 1
    supersede_runs = {c["victim"] for c in run.chaos_claims if c["kind"] == "supersede"}
    for a in run.attempts:
        detail = a.get("detail") or {}
        if a["outcome"] != "superseded" or a["run"] not in supersede_runs:
            continue
        late = str(detail.get("late"))
        if detail.get("at") == "commit":
            sup["late_writes_refused"] += 1  # its pending write
            sup["refused_at_commit"] += 1
        elif late == "refused":
            sup["late_writes_refused"] += 1
        if late == "landed":
            sup["late_writes_landed"] += 1
        elif late.startswith("error"):
            sup["late_write_errors"] += 1
    sup_claims = {
        (c["session"], c["revision"]) for c in run.chaos_claims if c["kind"] == "supersede"
    }
    sup["late_writes_landed"] += sum(n for k, n in late_by_claim.items() if k in sup_claims)
    outcomes = Counter(a["outcome"] for a in run.attempts)
    kills = Counter(k["mode"] for k in run.kills)
    unacked = sum(unacked_by_run[k["run"]] for k in run.kills)
    turns = run.turns
    return {
        "attempts": dict(sorted(outcomes.items())),
        "turns": turns,
        "acked": lines["acknowledged"],
        "lost": lines["lost"],
        "duplicated": lines["duplicated"],
        "lines": {
            "acknowledged": lines["acknowledged"],
            "lost": lines["lost"],
            "duplicated": lines["duplicated"],
            "removed_by_chaos": lines["removed_by_chaos"],
            "altered_by_chaos": lines["altered_by_chaos"],
            "landed_unacknowledged": unacked,
            "foreign": expected_foreign,
            "foreign_lost": foreign_lost,
            "foreign_unexpected": foreign_extra,
        },
        "fencing": {
            "paused": fencing["paused"],
            "late_writes_refused": fencing["late_writes_refused"],
            "late_writes_landed": late_landed + fencing["late_writes_tried_landed"],
            "pending_writes_refused": fencing["pending_writes_refused"],
            "superseded_at_check": fencing["superseded_at_check"],
            "paused_attempts_superseded": fencing["paused_attempts_superseded"],
            "paused_after_last_write": fencing["paused_after_last_write"],
            "pauses_skipped": run.counts["pauses_skipped"],
            "lease_expired_after_s": _spread(
                [
                    i["pause"]["lease_expired"]
                    for i in run.orders.values()
                    if "lease_expired" in i.get("pause", {})
                ]
            ),
        },
        "leases": {
            "lease_s": run.config.lease_s if run.pg else None,
            "claims_that_waited": run.counts["claims_that_waited"],
            "claim_retries": run.counts["claim_waits"],
            "renewals_without_append": sum(int(a.get("renewals") or 0) for a in run.attempts),
        },
        "server_restarts": run.counts["server_restarts"],
        "server_restarts_skipped": run.counts["server_restarts_skipped"],
        "backends_terminated": run.counts["backends_terminated"],
        # pg_terminate_backend issued on a host's connection (0 backends when the host was
        # reconnecting just then), and those skipped because the attempt ended first.
        "terminations": run.counts["terminations"],
        "terminations_skipped": run.counts["terminations_skipped"],
        "workers": {
            "killed": len(run.kills),
            "killed_between_send_and_ack": kills["between send and acknowledgement"],
            "killed_at_random_point": kills["random point"],
            "kills_skipped": run.counts["kills_skipped"],
            "respawned": run.counts["respawned"],
            "crashed": run.counts["crashed"],
        },
        "takeovers": {
            "injected": tk["injected"],
            "detected": tk["detected"],
            "missed": tk["missed"],
            "false": tk["false"],
            "void": tk["void"],
            "late": 0,  # events are made inside their window, before its check
            "unexplained_supersessions": tk["unexplained_supersessions"],
            "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
            "reasons": {k: dict(sorted(v.items())) for k, v in sorted(reasons.items())},
            "missed_examples": missed_examples,
            "false_examples": false_examples,
        },
        "benign": {
            "events": benign["events"],
            "accepted": benign["accepted"],
            "unaccepted": benign["unaccepted"],
            "void": benign["void"],
        },
        "supersede": {
            "injected": sup["injected"],
            "detected": sup["detected"],
            "missed": sup["missed"],
            "void": sup["void"],
            "late": 0,
            "refused_at_commit": sup["refused_at_commit"],
            "late_writes_refused": sup["late_writes_refused"],
            "late_write_errors": sup["late_write_errors"],
            "late_writes_landed": sup["late_writes_landed"],
            "missed_examples": sup_missed_examples,
        },
        "cotenant_retries": {"count": run.retries[0], "same_id": run.retries[1]},
        "per_turn": _per_turn(run.attempts),
        "errors": outcomes["error"] + run.counts["crashed"],
        "supervisor_notes": run.errors,
        "examples": examples,
    }


def _spread(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"min": round(min(values), 3), "max": round(max(values), 3), "count": len(values)}


def _per_turn(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a turn's time goes: the simulated model call and the store's round trips;
    per attempt its means, then the median over attempts (an attempt stopped by SIGSTOP or
    waiting out a server restart does not skew them)."""
    per: dict[str, list[float]] = defaultdict(list)
    for a in attempts:
        t = a.get("timing") or {}
        if not t.get("checks"):
            continue
        per["think_ms"].append(t["think"] / t["checks"] * 1000)
        per["append_ms"].append(t["append"] / max(1, t["appends"]) * 1000)
        per["check_ms"].append(t["check"] / t["checks"] * 1000)
        per["appends"].append(t["appends"] / t["checks"])
    if not per:
        return {}
    out: dict[str, Any] = {k: round(statistics.median(v), 3) for k, v in per.items()}
    out["attempts"] = len(per["think_ms"])
    return out


def _failures(report: dict[str, Any]) -> list[str]:
    f, sp, tk = report["fencing"], report["supersede"], report["takeovers"]
    lines = report["lines"]
    checks = [
        (report["lost"], "acknowledged appends lost"),
        (report["duplicated"], "lines twice"),
        (f["late_writes_landed"], "late writes landed after a newer claim"),
        (tk["missed"], "hostile foreign events missed"),
        (tk["false"], "false takeovers"),
        (tk["unexplained_supersessions"], "supersessions no chaos made"),
        (sp["missed"], "supersessions missed"),
        (sp["late_writes_landed"], "late writes of superseded attempts landed"),
        (sp["late_write_errors"], "late writes not refused with SessionSupersededError"),
        (report["benign"]["unaccepted"], "benign foreign lines not accepted"),
        (lines["foreign_lost"], "foreign lines lost"),
        (lines["foreign_unexpected"], "foreign lines nobody wrote"),
        (report["errors"], "attempts ended in an error or hosts crashed"),
        (
            report["cotenant_retries"]["count"] - report["cotenant_retries"]["same_id"],
            "idempotent retries that did not return the first append's id",
        ),
    ]
    return [f"{n} {what}" for n, what in checks if n]


def _text(report: dict[str, Any]) -> str:
    f, tk, sp, w = report["fencing"], report["takeovers"], report["supersede"], report["workers"]
    lines = report["lines"]
    per = report.get("per_turn") or {}
    rows = [
        ("fleet", f"{report['config']['workers']} worker hosts, {report['sessions']} sessions, "
                  f"store {report['store']} ({report['server']}), chaos {report['chaos']}, "
                  f"supersede {report['config']['supersede']}, seed {report['seed']}"),
        ("hosts", report["hosts"]),
        ("attempts", ", ".join(f"{k} {v}" for k, v in sorted(report["attempts"].items()))),
        ("turns", f"{report['turns']} in {report['elapsed_s']} s = "
                  f"{report['turns_per_s']} turns/s"
                  + (f"  (per turn: model {per['think_ms']} ms, {per['appends']} appends of "
                     f"{per['append_ms']} ms, check {per['check_ms']} ms)" if per else "")),
        ("acknowledged", f"{report['acked']} appends: lost {report['lost']}, "
                         f"duplicated {report['duplicated']}, removed by chaos "
                         f"{lines['removed_by_chaos']}, landed unacknowledged "
                         f"{lines['landed_unacknowledged']}"),
        ("fencing", f"paused {f['paused']}, late writes refused {f['late_writes_refused']}, "
                    f"landed {f['late_writes_landed']} (pending write refused at commit "
                    f"{f['pending_writes_refused']}, superseded at check "
                    f"{f['superseded_at_check']}, paused after its last write "
                    f"{f['paused_after_last_write']})"),
        ("leases", f"{report['leases']['lease_s']} s on the server clock; claims that waited "
                   f"for one {report['leases']['claims_that_waited']}"),
        ("server", f"restarts {report['server_restarts']} (skipped "
                   f"{report['server_restarts_skipped']}), backends terminated "
                   f"{report['backends_terminated']}"),
        ("workers", f"SIGKILLed {w['killed']} ({w['killed_between_send_and_ack']} between "
                    f"an append's send and its acknowledgement), respawned {w['respawned']}, "
                    f"crashed {w['crashed']}"),
        ("takeovers", f"injected {tk['injected']}, detected {tk['detected']}, missed "
                      f"{tk['missed']}, false {tk['false']} (void {tk['void']}); unexplained "
                      f"supersessions {tk['unexplained_supersessions']}"),
        ("benign", f"{report['benign']['events']}, accepted {report['benign']['accepted']} "
                   f"(void {report['benign']['void']})"),
        ("supersessions", f"injected {sp['injected']}, detected {sp['detected']}, missed "
                          f"{sp['missed']}; late writes refused {sp['late_writes_refused']}, "
                          f"landed {sp['late_writes_landed']}"),
    ]  # fmt: skip
    for kind, row in tk["by_kind"].items():
        parts = ", ".join(f"{k} {v}" for k, v in sorted(row.items()))
        if tk["reasons"].get(kind):
            parts += "  [" + ", ".join(f"{r} {n}" for r, n in tk["reasons"][kind].items()) + "]"
        rows.append((f"  {kind}", parts))
    for item in report.get("skipped", ()):
        rows.append(("skipped", f"{item['what']}: {item['why']}"))
    for item in report.get("not_applicable", ()):
        given = " (given, ignored)" if item.get("given") else ""
        rows.append(("not applicable", f"{item['flag']}{given}: {item['why']}"))
    rows.append(
        ("result", "PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"]))
    )
    out = [f"{k:<20} {v}" for k, v in rows]
    out += [f"{'':<20} {e}" for e in report["examples"]]
    return "\n".join(out)


# Flags of `sessionfence fleet` that only the file fleet has: (flag, argparse dest, default,
# why it does not apply across hosts).
_FILE_ONLY = (
    ("--verify", "verify", None, "verify modes prove a file's bytes; the store's fence reads "
     "lines by sequence number, and rewrites show as a generation change"),
    ("--mirror", "mirror", "0.25", "the delivery mirror appends in the file fleet's windows; "
     "here the rogue client's benign lines and the co-tenant hosts stand for it"),
    ("--cotenant-rate", "cotenant_rate", "0.25", "co-tenant hosts deliver at their own pace "
     "(every 2-20 ms), not per released window"),
    ("--dir", "dir", None, "no run directory: sessions live in the store, and reports come "
     "over pipes"),
)  # fmt: skip


def not_applicable(args: Any) -> list[dict[str, Any]]:
    """The file-only flags, each with why it does not apply and whether it was given."""
    out = []
    for flag, dest, default, why in _FILE_ONLY:
        value = getattr(args, dest, default)
        out.append({"flag": flag, "given": value != default, "why": why})
    return out


class _Plain:
    """A stream that says it is no terminal: the live display prints plain lines."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def cli_run(args: Any) -> int:
    """``sessionfence fleet --store postgresql[://...]`` (dispatched from cli/fleet.py)."""
    from ..cli import CliError
    from ..store import PostgresBinariesMissing
    from .report import ProgressDisplay

    def number(name: str, text: str, kind: type, low: float, high: float) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise CliError(f"{name} must be a number, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise CliError(f"{name} must be between {low:g} and {high:g}")
        return value

    store = args.store
    if store in ("postgres", "postgresql"):
        store = "postgresql"
    elif not store.startswith(("postgresql://", "postgres://")):
        raise CliError(f"--store must be 'postgresql' or a postgresql:// URL, not {store!r}")
    kinds: tuple[str, ...] | None = None
    if getattr(args, "chaos_kinds", None):
        # The kinds of this fleet (docs/multihost.md), not the file fleet's.
        kinds = tuple(k.strip() for k in args.chaos_kinds.split(",") if k.strip())
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            raise CliError(
                f"--chaos-kinds: unknown across hosts: {', '.join(unknown) or '(none given)'}; "
                f"known: {', '.join(KINDS)}"
            )
    config = MultihostConfig(
        store=store,
        workers=number("--workers", args.workers, int, 1, 256),
        sessions=number("--sessions", args.sessions, int, 1, 10_000),
        attempts=number("--attempts", args.attempts, int, 1, 1000),
        turns=number("--turns", args.turns, int, 1, 100_000),
        chaos=number("--chaos", args.chaos, float, 0, 1),
        supersede=number("--supersede", args.supersede, float, 0, 1),
        seed=number("--seed", args.seed, int, 0, 2**63 - 1),
        cotenants=max(1, number("--cotenants", args.cotenants, int, 0, 64)),
        transcript_mb=number("--transcript-mb", args.transcript_mb, float, 0, 100_000),
        keep=bool(args.keep),
        chaos_kinds=kinds,
    )
    skipped_flags = not_applicable(args)
    for item in skipped_flags:
        if item["given"]:
            print(
                f"sessionfence fleet: {item['flag']} does not apply across hosts: {item['why']}",
                file=sys.stderr,
            )
    quiet = bool(getattr(args, "quiet", False))
    stream: Any = _Plain(sys.stderr) if args.json else sys.stderr
    display = ProgressDisplay(enabled=not quiet, stream=stream)
    try:
        try:
            report = run_multihost(config, progress=display)
        finally:
            display.close()
    except (PostgresBinariesMissing, ImportError) as exc:
        print(f"sessionfence fleet: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # hosts, server and namespaces were removed on the way out
        print("sessionfence fleet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"sessionfence fleet: aborted: {exc}", file=sys.stderr)
        return 1
    report["not_applicable"] = skipped_flags
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(_text(report))
    return 0 if report["passed"] else 1
