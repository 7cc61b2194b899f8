"""A worker "host" of the multi-host fleet (``sessionfence.fleet.multihost``).

Run as ``python -m sessionfence.fleet.multihost_worker CONFIG_JSON``. It shares no file with
the other hosts: it reaches the sessions only through its own store connection, takes its
orders on stdin (one JSON object a line) and reports on stdout (one JSON object a line):
every acknowledged append (its idempotency key and entry id), and how each attempt ended.

Roles: ``worker`` (runs attempts: claim, then turns of own append, prompt window, the reply
appended after the window, fence check) and ``cotenant`` (appends gateway messages as a
co-tenant with idempotency keys, some retried, and benign unfenced mirror lines).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from typing import Any

from ..errors import SessionSupersededError, SessionTakeoverError


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
        application_name=cfg["name"],
        unreachable_timeout=cfg.get("unreachable_timeout", 60.0),
    )


def _msg(role: str, text: str) -> dict[str, Any]:
    return {"type": "message", "message": {"role": role, "content": text}}


async def run_attempt(store: Any, cfg: dict[str, Any], order: dict[str, Any]) -> None:
    rng = random.Random(order["seed"])
    sid, run = order["session"], order["run"]
    started = time.monotonic()
    fence = await store.open_fence(sid, run_id=run, merge_foreign_entries=lambda e: None)
    emit(ev="claimed", session=sid, run=run, revision=fence.revision)
    turns = 0
    outcome, detail = "completed", None
    pending_key: str | None = None
    try:
        for turn in range(cfg["turns"]):
            key = f"{run}:{turn}:u"
            pending_key = key
            ident = await fence.append(_msg("user", f"turn {turn}"), idempotency_key=key)
            emit(ev="ack", session=sid, run=run, key=key, id=ident, revision=fence.revision)
            await fence.release_for_prompt()
            await asyncio.sleep(rng.uniform(cfg["think_min"], cfg["think_max"]))
            # The reply is written right after the model call, before any fence check: a
            # run that was superseded meanwhile (paused past its claim) must be refused
            # here, at commit.
            key = f"{run}:{turn}:a"
            pending_key = key
            ident = await fence.append(_msg("assistant", f"reply {turn}"), idempotency_key=key)
            emit(ev="ack", session=sid, run=run, key=key, id=ident, revision=fence.revision)
            pending_key = None
            await fence.reacquire_after_prompt()
            turns += 1
    except SessionSupersededError as exc:
        outcome = "superseded"
        detail = {
            "at": "commit" if pending_key is not None else "check",
            "key": pending_key,
            "superseded_by": exc.superseded_by,
            "new_revision": exc.new_revision,
        }
    except SessionTakeoverError as exc:
        outcome, detail = "takeover", {"reason": exc.reason, "detail": exc.detail}
    finally:
        await fence.dispose()
    emit(
        ev="attempt",
        session=sid,
        run=run,
        outcome=outcome,
        detail=detail,
        turns=turns,
        seconds=time.monotonic() - started,
    )


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


async def main_async(cfg: dict[str, Any]) -> None:
    store = _store_async(cfg)
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
                await run_attempt(store, cfg, order)
            except Exception as exc:  # reported, never silent
                detail = {"error": repr(exc)}
                emit(ev="attempt", session=order["session"], run=order["run"],
                     outcome="error", detail=detail, turns=0, seconds=0.0)  # fmt: skip
    finally:
        close = getattr(store, "aclose", None)
        if close is not None:
            await close()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    asyncio.run(main_async(cfg))


if __name__ == "__main__":
    main()
