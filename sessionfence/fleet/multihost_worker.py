"""A worker "host" of the multi-host fleet (``sessionfence.fleet.multihost``).

Run as ``python -m sessionfence.fleet.multihost_worker CONFIG_JSON``. It shares no file with
the other hosts (in its own network namespace when the fleet can make them): it reaches the
sessions only through its own store connection, takes its orders on stdin (one JSON object
a line) and reports on stdout (one JSON object a line): each claim, every acknowledged
append (its idempotency key and entry id), each turn, each foreign event its rogue client
made, and how each attempt ended.

Roles: ``worker`` (runs attempts: claim with a lease, then turns of own append, prompt
window, the reply appended after the window, fence check; the lease is ended at the end)
and ``cotenant`` (appends gateway messages as a co-tenant with idempotency keys, some
retried).

**The rogue client.** An attempt's order may carry a chaos plan for its prompt windows:
foreign lines written by a writer that ignores sessionfence (``append_unfenced``: benign
ones the fence must accept, hostile ones it must detect), ``UPDATE``/``DELETE`` of stored
lines in SQL, or a claim by another run (a supersession of this live worker). They are
made by a rogue client: another connection (its own ``application_name``) that this host
drives inside the window, after the fence was released and before its check, so the
moment of every foreign event is exact ground truth, as the file fleet's chaos is (it acts
under the lock inside released windows). The supervisor's own chaos (SIGSTOP, SIGKILL,
``pg_terminate_backend``, server restarts) comes from outside, at moments it picks.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from ..controller import SessionFenceController
from ..errors import SessionSupersededError, SessionTakeoverError
from ..transcript import SessionManager
from .chaos import mutation_offset
from .transcripts import foreign_id, message_line, now_iso

#: Kinds of foreign events the rogue client makes in a prompt window: benign ones the
#: fence must accept (and merge), hostile ones it must detect as a takeover.
BENIGN_KINDS = ("mirror", "metadata")
HOSTILE_KINDS = (
    "foreign-user",
    "garbage",
    "id-reuse",
    "rewritten-copy",
    "sql-update",
    "sql-delete",
)


def emit(**record: Any) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _store_async(cfg: dict[str, Any]) -> Any:
    if cfg["store"] == "file":
        from ..store import FileStore

        return FileStore(cfg["root"])
    from ..store import AsyncPostgresStore

    return AsyncPostgresStore(
        cfg["url"],
        schema=cfg["schema"],
        application_name=cfg["app"],
        unreachable_timeout=cfg.get("unreachable_timeout", 60.0),
    )


def _msg(role: str, text: str) -> dict[str, Any]:
    return {"type": "message", "message": {"role": role, "content": text}}


class _Lease:
    """The attempt's lease on the server's clock (PostgreSQL only; the file store's claim
    is its lock). Claimed without force: while another run's lease runs (a host that was
    SIGKILLed or SIGSTOPped keeps it until it expires) the claim is refused and tried
    again. Every append of the claimant renews it on the server; after a fence check the
    host renews it itself when no append did for a third of its length; it is ended when
    the attempt is over."""

    def __init__(self, store: Any, cfg: dict[str, Any], session_id: str) -> None:
        self.store = store
        self.seconds = float(cfg.get("lease_s") or 0.0)
        self.enabled = cfg["store"] != "file" and self.seconds > 0
        self.session_id = session_id
        self.renewed_at = time.monotonic()
        self.waits = 0
        self.renewals = 0

    async def claim(self, run: str) -> None:
        if not self.enabled:
            return
        from ..store import SessionClaimHeldError

        deadline = time.monotonic() + 30 * self.seconds + 60
        while True:
            try:
                await self.store.claim(self.session_id, run, lease=self.seconds, force=False)
                break
            except SessionClaimHeldError:
                if time.monotonic() > deadline:
                    raise
                self.waits += 1
                await asyncio.sleep(min(0.05, self.seconds / 10))
        self.renewed_at = time.monotonic()

    def appended(self) -> None:
        self.renewed_at = time.monotonic()  # the append renewed it on the server

    async def keep(self, writer: Any) -> None:
        if self.enabled and time.monotonic() - self.renewed_at > self.seconds / 3:
            await self.store.renew_lease(self.session_id, writer)
            self.renewals += 1
            self.renewed_at = time.monotonic()

    async def release(self, writer: Any) -> None:
        if self.enabled and writer is not None:
            await self.store.release_lease(self.session_id, writer)


class _Rogue:
    """The rogue client (see the module doc): a synchronous store on its own connection."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self._store: Any = None

    @property
    def store(self) -> Any:
        if self._store is None:
            from ..store import PostgresStore

            self._store = PostgresStore(
                self.cfg["url"],
                schema=self.cfg["schema"],
                application_name=self.cfg["app"] + "-rogue",
                unreachable_timeout=self.cfg.get("unreachable_timeout", 60.0),
            )
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return list(self.store._run(lambda c: c.execute(sql, params).fetchall()))

    def act(self, kind: str, sid: str, run: str, rng: random.Random, mine: str) -> dict[str, Any]:
        """Make one foreign event of ``kind`` on ``sid``; ``mine`` is the id of the
        worker's last entry. Returns what it did (ids added, lines removed or altered)."""
        q = self.store.sql.q
        if kind == "supersede":
            claimer = f"supersede-{run}"
            writer = self.store.claim(sid, run_id=claimer)  # forced: the worker is live
            return {"claimer": claimer, "revision": writer.revision}
        if kind in ("mirror", "id-reuse"):
            from .chaos import mirror_line

            ident, line = mirror_line(rng, mine)
            if kind == "id-reuse":  # a benign line by content, but it reuses an entry's id
                line = line.replace(f'"id":"{ident}"'.encode(), f'"id":"{mine}"'.encode(), 1)
                ident = mine
            self.store.append_unfenced(sid, line)
            return {"added": [ident]}
        if kind == "metadata":
            ident = foreign_id(rng)
            entry = {
                "type": "custom",
                "id": ident,
                "parentId": mine,
                "timestamp": now_iso(),
                "customType": "delivery-receipt",
                "data": {"channel": "rogue", "ok": True},
            }
            self.store.append_unfenced(sid, json.dumps(entry, separators=(",", ":")).encode())
            return {"added": [ident]}
        if kind == "foreign-user":
            ident = foreign_id(rng)
            message = {"role": "user", "content": [{"type": "text", "text": "injected"}]}
            self.store.append_unfenced(sid, message_line(ident, mine, message))
            return {"added": [ident]}
        if kind == "garbage":
            self.store.append_unfenced(
                sid, b'{"type":"message","id":"' + os.urandom(3).hex().encode()
            )
            return {"added": []}
        if kind == "rewritten-copy":
            # The session's last line again, one letter of its text changed: same id.
            rows = self._rows(
                f"SELECT line, entry_id FROM {q}.sf_entries WHERE session_id = %s "
                "AND seq > 0 AND entry_id IS NOT NULL ORDER BY seq DESC LIMIT 1",
                (sid,),
            )
            line, ident = bytes(rows[0][0]), rows[0][1]
            self.store.append_unfenced(sid, _altered(line, rng))
            return {"added": [], "copied": ident}
        if kind == "sql-update":
            rows = self._rows(
                f"SELECT seq, line FROM {q}.sf_entries WHERE session_id = %s AND seq > 0 "
                "ORDER BY seq DESC LIMIT 20",
                (sid,),
            )
            seq, line = rng.choice(rows)
            done = self._rows(
                f"UPDATE {q}.sf_entries SET line = %s WHERE session_id = %s AND seq = %s "
                "RETURNING entry_id, coalesce(idempotency_key, ''), role",
                (_altered(bytes(line), rng), sid, seq),
            )
            return {"altered": [list(r) for r in done]}
        if kind == "sql-delete":
            done = self._rows(
                f"DELETE FROM {q}.sf_entries WHERE session_id = %s AND seq > 0 AND seq > "
                f"(SELECT last_seq FROM {q}.sf_sessions WHERE session_id = %s) - %s "
                "RETURNING entry_id, coalesce(idempotency_key, ''), role",
                (sid, sid, rng.randint(1, 2)),
            )
            return {"removed": [list(r) for r in done]}
        raise ValueError(f"unknown rogue event kind {kind!r}")


_ALTERED_KEYS = (b'"text":"', b'"content":"', b'"customType":"', b'"timestamp":"', b'"type":"')


def _altered(line: bytes, rng: random.Random) -> bytes:
    """``line`` with one lower-case letter of a string value changed (still valid JSON)."""
    at = mutation_offset(line, rng, _ALTERED_KEYS)
    if at is None:
        return line + b" "
    new = rng.choice([c for c in b"abcdefghijklmnopqrstuvwxyz" if c != line[at]])
    return line[:at] + bytes([new]) + line[at + 1 :]


class _Plan:
    """The chaos plan of one attempt for its prompt windows (``order["chaos"]``):
    ``{"windows": {turn: [[kind, "before"|"after"], ...]}}``: events the rogue client makes
    in that window, before or after the reply is appended (both before the check)."""

    def __init__(self, order: Mapping[str, Any], rogue: _Rogue | None) -> None:
        chaos = order.get("chaos") or {}
        self.windows: dict[int, list[list[str]]] = {
            int(t): list(events) for t, events in (chaos.get("windows") or {}).items()
        }
        self.rogue = rogue
        self.rng = random.Random(order["seed"] ^ 0x5EED)

    async def act(self, turn: int, when: str, sid: str, run: str, mine: str) -> None:
        for kind, at in self.windows.get(turn, ()):
            if at != when or self.rogue is None:
                continue
            rogue = self.rogue
            done = await asyncio.to_thread(rogue.act, kind, sid, run, self.rng, mine)
            emit(ev="foreign", session=sid, run=run, turn=turn, kind=kind, at=when, **done)


async def run_attempt(
    store: Any,
    cfg: dict[str, Any],
    order: dict[str, Any],
    rogue: _Rogue | None = None,
    model_store: Any = None,
) -> None:
    """One attempt, written as an agent loop is on either store: the public controller and
    transcript model opened with ``store=`` (``SessionFenceController.create(id,
    store=...)``, ``SessionManager.open(id, store=...)``); claim, turns of own append,
    prompt window, the reply appended after the window, fence check."""
    rng = random.Random(order["seed"])
    sid, run = order["session"], order["run"]
    plan = _Plan(order, rogue)
    lease = _Lease(store, cfg, sid)
    started = time.monotonic()
    await lease.claim(run)  # waits while another run's lease runs (a failover)
    # The model of the session: on PostgreSQL a local copy kept in this host's cache
    # between attempts (only the lines added since are copied); on files the file.
    manager = SessionManager.open(sid, store=model_store if model_store is not None else store)
    merged: list[str] = []

    def merge(entries: list[Any]) -> Any:
        merged.extend(str(e.get("id")) for e in entries if isinstance(e, dict))
        return manager.merge_foreign_entries(entries)

    try:
        ctl = await SessionFenceController.create(
            sid, store=store, run_id=run, merge_foreign_entries=merge
        )
    except BaseException:
        manager.close()
        raise
    manager.writer = ctl.writer
    claimed_at = time.monotonic()
    emit(ev="claimed", session=sid, run=run, revision=ctl.revision, waits=lease.waits,
         wait_s=round(claimed_at - started, 4))  # fmt: skip
    turns = 0
    outcome, detail = "completed", None
    pending_key: str | None = None
    timing = {"append": 0.0, "check": 0.0, "think": 0.0, "appends": 0, "checks": 0}

    async def append(role: str, text: str, key: str) -> str:
        t0 = time.perf_counter()
        async with ctl.write_lock():
            ident = manager.append_message({"role": role, "content": text}, idempotency_key=key)
        timing["append"] += time.perf_counter() - t0
        lease.appended()
        emit(ev="ack", session=sid, run=run, key=key, id=ident, revision=ctl.revision)
        return ident

    try:
        for turn in range(cfg["turns"]):
            pending_key = f"{run}:{turn}:u"
            ident = await append("user", f"turn {turn}", pending_key)
            pending_key = None
            await ctl.release_for_prompt()
            await plan.act(turn, "before", sid, run, ident)
            t0 = time.perf_counter()
            await asyncio.sleep(rng.uniform(cfg["think_min"], cfg["think_max"]))
            timing["think"] += time.perf_counter() - t0
            # The reply is written right after the model call, before any fence check: a
            # run that was superseded meanwhile (paused past its lease, or claimed by
            # another run) must be refused here, at commit. (A write scope inside the
            # prompt window checks first: the manager appends directly, as a late tool
            # would.)
            pending_key = f"{run}:{turn}:a"
            t0 = time.perf_counter()
            ident = manager.append_message(
                {"role": "assistant", "content": f"reply {turn}"}, idempotency_key=pending_key
            )
            timing["append"] += time.perf_counter() - t0
            timing["appends"] += 2
            lease.appended()
            emit(ev="ack", session=sid, run=run, key=pending_key, id=ident,
                 revision=ctl.revision)  # fmt: skip
            pending_key = None
            await plan.act(turn, "after", sid, run, ident)
            t0 = time.perf_counter()
            await ctl.reacquire_after_prompt()
            timing["check"] += time.perf_counter() - t0
            timing["checks"] += 1
            await lease.keep(ctl.writer)
            turns += 1
            emit(ev="turn", session=sid, run=run, turn=turn)
    except SessionSupersededError as exc:
        outcome = "superseded"
        detail = {
            "at": "commit" if pending_key is not None else "check",
            "turn": turns,
            "key": pending_key,
            "superseded_by": exc.superseded_by,
            "new_revision": exc.new_revision,
            # A write after the supersession was seen, straight to the store (the fence's
            # refusal is sticky and would not ask): the store must refuse it at commit.
            "late": await _late_write(store, sid, ctl.writer, f"{run}:late"),
        }
    except SessionTakeoverError as exc:
        outcome = "takeover"
        detail = {"reason": exc.reason, "detail": exc.detail, "turn": turns}
    finally:
        try:
            await ctl.dispose()
            await lease.release(ctl.writer)
        finally:
            manager.close()
    emit(
        ev="attempt",
        session=sid,
        run=run,
        outcome=outcome,
        detail=detail,
        turns=turns,
        merged=merged,
        seconds=time.monotonic() - started,
        claim_waits=lease.waits,
        renewals=lease.renewals,
        timing=timing,
    )


async def _late_write(store: Any, sid: str, writer: Any, key: str) -> str:
    try:
        if store.kind == "file":
            await asyncio.to_thread(
                store.append, sid, _msg("assistant", "late"), writer=writer, idempotency_key=key
            )
        else:
            await store.append(sid, _msg("assistant", "late"), writer=writer, idempotency_key=key)
    except SessionSupersededError:
        return "refused"
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"
    return "landed"


async def cotenant_loop(store: Any, cfg: dict[str, Any]) -> None:
    rng = random.Random(cfg["seed"])
    sessions = cfg["sessions"]
    n = 0
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        await asyncio.sleep(rng.uniform(0.002, 0.02))
        sid = rng.choice(sessions)
        n += 1
        if rng.random() < 0.7:
            key = f"{cfg['name']}:{n}"
            entry = _msg("user", f"inbound {n}")
            if cfg["store"] == "file":
                ident = await asyncio.to_thread(
                    store.append_as_cotenant, sid, entry, writer="gateway", idempotency_key=key
                )
            else:
                ident = await store.append_as_cotenant(
                    sid, entry, writer="gateway", idempotency_key=key
                )
            emit(ev="ack", session=sid, run="gateway", key=key, id=ident, revision=None)
            if rng.random() < 0.3:  # a retry after a lost acknowledgement: a no-op
                if cfg["store"] == "file":
                    again = await asyncio.to_thread(
                        store.append_as_cotenant, sid, entry, writer="gateway", idempotency_key=key
                    )
                else:
                    again = await store.append_as_cotenant(
                        sid, entry, writer="gateway", idempotency_key=key
                    )
                emit(ev="retry", session=sid, key=key, same=again == ident)


def _model_store(cfg: dict[str, Any], cache_dir: str) -> Any:
    """The synchronous store the transcript model reads and appends through (the fence's
    store is asynchronous): on PostgreSQL with this host's own cache of session copies."""
    if cfg["store"] == "file":
        return None  # the fence's FileStore serves the model too
    from ..store import PostgresStore

    return PostgresStore(
        cfg["url"],
        schema=cfg["schema"],
        application_name=cfg["app"],  # the supervisor finds (and kills) a host by its name
        unreachable_timeout=cfg.get("unreachable_timeout", 60.0),
        cache_dir=cache_dir,
    )


async def main_async(cfg: dict[str, Any]) -> None:
    store = _store_async(cfg)
    rogue = _Rogue(cfg) if cfg["store"] != "file" else None
    cache = tempfile.TemporaryDirectory(prefix="sessionfence-host-")  # this host's own
    model_store = _model_store(cfg, cache.name)
    try:
        if cfg["role"] == "cotenant":
            await cotenant_loop(store, cfg)
            return
        emit(ev="ready", pid=os.getpid())
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            order = json.loads(line)
            if order.get("op") == "stop":
                return
            try:
                await run_attempt(store, cfg, order, rogue, model_store)
            except Exception as exc:  # reported, never silent
                detail = {"error": f"{type(exc).__name__}: {exc}"}
                emit(ev="attempt", session=order["session"], run=order["run"],
                     outcome="error", detail=detail, turns=0, seconds=0.0)  # fmt: skip
    finally:
        if rogue is not None:
            rogue.close()
        if model_store is not None:
            model_store.close()
        close = getattr(store, "aclose", None)
        if close is not None:
            await close()
        cache.cleanup()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    asyncio.run(main_async(cfg))


if __name__ == "__main__":
    main()
