"""The fleet across hosts: ``sessionfence fleet --store postgresql[://...]``.

Worker "hosts" (separate processes, ``multihost_worker``) share no file: each reaches the
sessions only through its own connection to the PostgreSQL store; the supervisor gives
them attempts over a pipe and they report every acknowledged append. A co-tenant host
delivers gateway messages (idempotency keys, some retried). Chaos that only a multi-host
system has (docs/multihost.md, "The fleet across hosts"):

- **paused writer**: a worker is SIGSTOPped in the middle of an attempt, another host
  claims its session meanwhile, then the worker is resumed: the write it had pending must
  be refused at commit (``late_writes_refused``); one that landed after the new claim
  (``late_writes_landed``) fails the run;
- **server restart**: ``pg_ctl restart -m fast`` on a server the fleet started itself
  (on an existing server it is reported as skipped);
- **killed connections**: ``pg_terminate_backend`` on a worker's backend.

The oracle reads the store at the end: every acknowledged append is there exactly once
(by its idempotency key), no line of a superseded revision landed after the claim that
superseded it, every supersession a worker saw was one chaos made, and no other takeover
was raised. Exit 0 only when all of that holds.

The same runner drives a ``FileStore`` (``store="file"``, one host: sessions in files),
so the benchmark compares the two on the same workload.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

__all__ = ["MultihostConfig", "cli_run", "run_multihost"]


@dataclass(frozen=True)
class MultihostConfig:
    store: str = "postgresql"  # "postgresql" (throwaway server), a URL, or "file"
    workers: int = 4
    sessions: int = 8
    attempts: int = 3
    turns: int = 10
    chaos: float = 0.0
    seed: int = 0
    think_min: float = 0.002
    think_max: float = 0.008
    cotenants: int = 1
    pause_s: float = 0.3  # how long a paused worker stays stopped
    keep: bool = False


_TERMINATE = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s"


class _Host:
    """One worker process and the thread that reads its reports."""

    def __init__(self, name: str, cfg: dict[str, Any], events: queue.Queue[Any]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sessionfence.fleet.multihost_worker", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.busy: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self._read, args=(events,), daemon=True)
        self.thread.start()

    def _read(self, events: queue.Queue[Any]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                events.put((self.name, json.loads(line)))
        events.put((self.name, {"ev": "exit"}))

    def send(self, order: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(order) + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            os.kill(self.proc.pid, signal.SIGCONT)
        with contextlib.suppress(Exception):
            self.send({"op": "stop"})
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _pad_lines(n: int) -> list[dict[str, Any]]:
    return [
        {"type": "message", "message": {"role": "user" if i % 2 == 0 else "assistant",
                                        "content": f"padding {i} " + "x" * 200}}
        for i in range(n)
    ]  # fmt: skip


def run_multihost(config: MultihostConfig, *, progress: Any = None) -> dict[str, Any]:
    """Run the fleet and return its report (a JSON-able dict; ``passed`` decides the exit)."""
    from ..store import FileStore, PostgresStore, TempPostgres

    rng = random.Random(config.seed)
    server: TempPostgres | None = None
    root: str | None = None
    schema = "sf_fleet_" + uuid.uuid4().hex[:8]
    started_server = False
    t0 = time.monotonic()
    if config.store == "file":
        root = tempfile.mkdtemp(prefix="sessionfence-fleet-files-")
        admin: Any = FileStore(root)
        url = None
    else:
        if config.store == "postgresql":
            server = TempPostgres(durable=True).start()
            started_server = True
            url = server.url
        else:
            url = config.store
        admin = PostgresStore(url, schema=schema, application_name="sf-fleet-supervisor")
    setup_s = time.monotonic() - t0
    sessions = [f"s{i:03d}" for i in range(config.sessions)]
    hosts: list[_Host] = []
    cotenant_hosts: list[_Host] = []
    events: queue.Queue[Any] = queue.Queue()
    acks: list[dict[str, Any]] = []
    attempts: list[dict[str, Any]] = []
    chaos_claims: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    retries_same = [0, 0]
    try:
        for sid in sessions:
            admin.create_session(sid)
            for entry in _pad_lines(20):
                admin.append_as_cotenant(sid, entry, writer="import")
        base = {
            "store": "file" if config.store == "file" else "postgresql",
            "url": url,
            "schema": schema,
            "root": root,
            "turns": config.turns,
            "think_min": config.think_min,
            "think_max": config.think_max,
            "sessions": sessions,
        }
        for w in range(config.workers):
            name = f"sf-fleet-w{w}"
            hosts.append(_Host(name, {**base, "role": "worker", "name": name}, events))
        for c in range(config.cotenants):
            name = f"sf-fleet-gw{c}"
            cfg = {**base, "role": "cotenant", "name": name, "seed": config.seed * 100 + c}
            cotenant_hosts.append(_Host(name, cfg, events))
        by_name = {h.name: h for h in hosts}
        ready: set[str] = set()
        done: Counter[str] = Counter()
        started: Counter[str] = Counter()
        queue_: list[str] = list(sessions)
        busy_sessions: set[str] = set()
        pending_chaos: dict[str, str] = {}  # host name -> planned chaos for its attempt
        t_run = time.monotonic()
        restart_at = (
            t_run + rng.uniform(0.3, 1.0) if config.chaos > 0 and config.store != "file" else None
        )
        turns_done = 0

        def assign() -> None:
            for host in hosts:
                if host.name not in ready or host.busy is not None:
                    continue
                pick = next((s for s in queue_ if s not in busy_sessions), None)
                if pick is None:
                    return
                queue_.remove(pick)
                busy_sessions.add(pick)
                started[pick] += 1
                run = f"{host.name[9:]}-{pick}-{started[pick]}-{uuid.uuid4().hex[:6]}"
                order = {"session": pick, "run": run, "seed": rng.randrange(1 << 30)}
                host.busy = order
                host.send(order)
                # No paused writer on the file store: a worker stopped while it holds the
                # session's flock would stall the claimer (one host: nothing to fence).
                if config.chaos > 0 and config.store != "file" and rng.random() < config.chaos:
                    pending_chaos[host.name] = rng.choice(["pause", "pause", "terminate"])

        while True:
            assign()
            if all(h.busy is None for h in hosts) and not queue_ and ready:
                break
            if restart_at is not None and time.monotonic() >= restart_at:
                restart_at = None
                if started_server and server is not None:
                    server.restart("fast")
                    counts["server_restarts"] += 1
                else:
                    counts["server_restarts_skipped"] += 1
            try:
                name, ev = events.get(timeout=0.05)
            except queue.Empty:
                continue
            kind = ev.get("ev")
            if kind == "ready":
                ready.add(name)
            elif kind == "ack":
                acks.append(ev)
            elif kind == "retry":
                retries_same[0] += 1
                retries_same[1] += bool(ev.get("same"))
            elif kind == "claimed" and name in pending_chaos:
                host = by_name[name]
                chaos = pending_chaos.pop(name)
                time.sleep(rng.uniform(0.0, config.think_max * 3))
                if chaos == "pause":
                    os.kill(host.proc.pid, signal.SIGSTOP)
                    counts["paused"] += 1
                    time.sleep(config.pause_s / 3)
                    claimer = f"chaos-{uuid.uuid4().hex[:8]}"
                    writer = admin.claim(ev["session"], run_id=claimer)
                    chaos_claims.append(
                        {"session": ev["session"], "run": claimer, "revision": writer.revision,
                         "victim": ev["run"]}
                    )  # fmt: skip
                    time.sleep(config.pause_s * 2 / 3)
                    os.kill(host.proc.pid, signal.SIGCONT)
                else:
                    rows = admin._run(lambda c, n=name: c.execute(_TERMINATE, (n,)).fetchall())
                    counts["backends_terminated"] += len(rows)
            elif kind == "attempt":
                host = by_name[name]
                host.busy = None
                pending_chaos.pop(name, None)
                attempts.append(ev)
                turns_done += int(ev.get("turns", 0))
                sid = ev["session"]
                busy_sessions.discard(sid)
                if ev["outcome"] == "completed":
                    done[sid] += 1
                if done[sid] < config.attempts and started[sid] < config.attempts * 4:
                    queue_.append(sid)
                if progress is not None:
                    progress(len(attempts))
            elif kind == "exit" and name in by_name and by_name[name].busy is not None:
                raise RuntimeError(f"worker host {name} exited during an attempt")
        run_s = time.monotonic() - t_run
        for h in cotenant_hosts:
            with contextlib.suppress(ProcessLookupError):
                h.proc.terminate()
            h.proc.wait()
        # Drain the reports still in the pipes (the co-tenants' last acknowledgements).
        for h in cotenant_hosts:
            h.thread.join(timeout=10)
        while True:
            try:
                name, ev = events.get_nowait()
            except queue.Empty:
                break
            if ev.get("ev") == "ack":
                acks.append(ev)
        report = _oracle(config, admin, sessions, acks, attempts, chaos_claims, counts)
        report.update(
            {
                "store": "file" if config.store == "file" else "postgresql",
                "server": "throwaway (started by the fleet)"
                if started_server
                else ("existing" if config.store != "file" else None),
                "hosts": f"{config.workers} worker processes + {config.cotenants} co-tenant, "
                "no shared files (network namespaces: not used)",
                "workers": config.workers,
                "sessions": config.sessions,
                "turns": turns_done,
                "setup_s": round(setup_s, 3),
                "elapsed_s": round(run_s, 3),
                "turns_per_s": round(turns_done / run_s, 1) if run_s > 0 else 0.0,
                "cotenant_retries": {"count": retries_same[0], "same_id": retries_same[1]},
                "chaos": config.chaos,
                "seed": config.seed,
            }
        )
        report["passed"] = (
            report["lost"] == 0
            and report["duplicated"] == 0
            and report["fencing"]["late_writes_landed"] == 0
            and report["takeovers"]["false"] == 0
            and report["takeovers"]["unexplained_supersessions"] == 0
            and report["errors"] == 0
            and retries_same[0] == retries_same[1]
        )
        return report
    finally:
        for h in hosts + cotenant_hosts:
            h.stop()
        if config.store not in ("file", "postgresql") and not config.keep:
            with contextlib.suppress(Exception):
                admin._run(lambda c: c.execute(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.close()
        if server is not None:
            server.stop()
        if root is not None and not config.keep:
            shutil.rmtree(root, ignore_errors=True)


def _oracle(
    config: MultihostConfig,
    admin: Any,
    sessions: list[str],
    acks: list[dict[str, Any]],
    attempts: list[dict[str, Any]],
    chaos_claims: list[dict[str, Any]],
    counts: Counter[str],
) -> dict[str, Any]:
    """Judge the run against the store's final content."""
    lost = duplicated = late_landed = 0
    examples: list[str] = []
    for sid in sessions:
        lines = [ln for ln in admin.read_lines(sid) if ln.strip()]
        values = [json.loads(ln) for ln in lines[1:]]
        id_count = Counter(v.get("id") for v in values)
        duplicated += sum(c - 1 for c in id_count.values() if c > 1)
        acked = [a for a in acks if a["session"] == sid]
        for a in acked:
            if id_count.get(a["id"], 0) != 1:
                lost += 1
                if len(examples) < 5:
                    examples.append(f"{sid}: acknowledged entry {a['id']} ({a['key']}) missing")
        if config.store != "file":
            rows = admin.entries(sid)
            keys = Counter(r[5] for r in rows if r[5])
            duplicated += sum(c - 1 for c in keys.values() if c > 1)
            claims = admin.claims(sid)
            at_seq = {rev: seq for rev, _run, _sup, seq in claims}
            for seq, _line, role, _run, revision, _key in rows:
                nxt = at_seq.get(revision + 1)
                if role == "claimant" and nxt is not None and seq > nxt:
                    late_landed += 1
                    if len(examples) < 5:
                        examples.append(f"{sid}: line {seq} of revision {revision} landed late")
    chaos_revisions = {(c["session"], c["revision"]) for c in chaos_claims}
    victims = {c["victim"] for c in chaos_claims}
    superseded = [a for a in attempts if a["outcome"] == "superseded"]
    refused = sum(1 for a in superseded if (a.get("detail") or {}).get("at") == "commit")
    unexplained = sum(
        1
        for a in superseded
        if (a["session"], (a.get("detail") or {}).get("new_revision")) not in chaos_revisions
    )
    false = sum(1 for a in attempts if a["outcome"] == "takeover")
    errors = sum(1 for a in attempts if a["outcome"] == "error")
    for a in attempts:
        if a["outcome"] in ("takeover", "error") and len(examples) < 5:
            examples.append(f"{a['session']} {a['run']}: {a['outcome']} {a.get('detail')}")
    outcomes = Counter(a["outcome"] for a in attempts)
    return {
        "attempts": dict(outcomes),
        "acked": len(acks),
        "lost": lost,
        "duplicated": duplicated,
        "fencing": {
            "paused": counts["paused"],
            "late_writes_refused": refused,
            "late_writes_landed": late_landed,
            "superseded_at_check": len(superseded) - refused,
            "paused_attempts_superseded": sum(1 for a in superseded if a["run"] in victims),
        },
        "server_restarts": counts["server_restarts"],
        "server_restarts_skipped": counts["server_restarts_skipped"],
        "backends_terminated": counts["backends_terminated"],
        "takeovers": {"false": false, "unexplained_supersessions": unexplained},
        "errors": errors,
        "examples": examples,
    }


def _text(report: dict[str, Any]) -> str:
    f = report["fencing"]
    rows = [
        ("fleet", f"{report['workers']} worker hosts, {report['sessions']} sessions, "
                  f"store {report['store']} ({report['server']}), chaos {report['chaos']}, "
                  f"seed {report['seed']}"),
        ("hosts", report["hosts"]),
        ("attempts", ", ".join(f"{k} {v}" for k, v in sorted(report["attempts"].items()))),
        ("turns", f"{report['turns']} in {report['elapsed_s']} s = "
                  f"{report['turns_per_s']} turns/s"),
        ("acknowledged", f"{report['acked']} appends: lost {report['lost']}, "
                         f"duplicated {report['duplicated']}"),
        ("fencing", f"paused {f['paused']}, late writes refused {f['late_writes_refused']}, "
                    f"landed {f['late_writes_landed']}"),
        ("server", f"restarts {report['server_restarts']} (skipped "
                   f"{report['server_restarts_skipped']}), backends terminated "
                   f"{report['backends_terminated']}"),
        ("takeovers", f"false {report['takeovers']['false']}, unexplained supersessions "
                      f"{report['takeovers']['unexplained_supersessions']}"),
        ("result", "PASSED" if report["passed"] else "FAILED"),
    ]  # fmt: skip
    out = [f"{k:<20} {v}" for k, v in rows]
    out += [f"{'':<20} {e}" for e in report["examples"]]
    return "\n".join(out)


def cli_run(args: Any) -> int:
    """``sessionfence fleet --store postgresql[://...]`` (dispatched from cli/fleet.py)."""
    from ..cli import CliError
    from ..store import PostgresBinariesMissing

    def number(name: str, text: str, kind: type) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise CliError(f"{name} must be a number, got {text!r}") from None

    store = args.store
    if store in ("postgres", "postgresql"):
        store = "postgresql"
    elif not store.startswith(("postgresql://", "postgres://")):
        raise CliError(f"--store must be 'postgresql' or a postgresql:// URL, not {store!r}")
    config = MultihostConfig(
        store=store,
        workers=number("--workers", args.workers, int),
        sessions=number("--sessions", args.sessions, int),
        attempts=number("--attempts", args.attempts, int),
        turns=number("--turns", args.turns, int),
        chaos=number("--chaos", args.chaos, float),
        seed=number("--seed", args.seed, int),
        cotenants=max(1, number("--cotenants", args.cotenants, int)),
        keep=bool(args.keep),
    )
    try:
        report = run_multihost(config)
    except (PostgresBinariesMissing, ImportError) as exc:
        print(f"sessionfence fleet: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"sessionfence fleet: aborted: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(_text(report))
    return 0 if report["passed"] else 1
