"""Explicit ownership in the fleet: co-tenant processes and supersession (issue 13).

- A **co-tenant** (``--cotenants N``) is what a gateway delivering an inbound user message
  is to an agent run: a process that is not the session's claimant and appends to it while
  the claimant is in a released window. Its entries are user messages, which the content
  rules would take as a takeover (``foreign-append``); they go through
  ``append_as_cotenant``, which journals them, so the claimant's fence accepts them without
  judging their content and hands them to its merge callback. Each append carries an
  idempotency key; some are retried with the same key and another proposed id, as a
  gateway retries a delivery whose acknowledgement it lost: the retry must return the first
  append's id and write nothing.
- A **supersession** (``--supersede RATE``) is a new attempt of the same session claiming it
  while the current attempt is in a prompt window: a ``SessionFenceController`` created
  with its own ``run_id`` under the session's write lock, which writes a claim with a new
  revision to the journal, then goes away. The current attempt must stop at its next fence
  check with ``SessionSupersededError`` (reason ``superseded``), and its late append, tried
  through its journaled session manager, must be refused before a byte lands.

The supersession process holds the write lock itself (so it can check, under the lock, that
the window is still open and read the transcript's exact size at the claim) and lends that
lock to the new controller through ``create(acquire=...)``; ``claim_session`` would take
the lock on its own.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Sequence
from typing import Any

from ..controller import SessionFenceController
from .board import CHAOS_ACTED, CLAIMED, Board
from .logs import LogWriter
from .transcripts import cotenant_entry, foreign_id
from .windows import (
    EntryMaker,
    append_in_window,
    chosen_windows,
    idempotent_retry,
    new_stats,
    visit_windows,
)

__all__ = ["cotenant_main", "supersede_main"]


def cotenant_main(
    paths: list[str],
    board: Board,
    rate: float,
    verify: str,
    seed: str,
    log_path: str,
    name: str,
    retry_share: float,
) -> None:
    """Process entry of the co-tenant ``name`` (also its writer run id)."""
    rng = random.Random(seed)
    log = LogWriter(log_path)
    stats = new_stats()
    stats["retries"] = 0
    serial = 0

    def user_message(_added: Sequence[str]) -> tuple[dict[str, Any], str]:
        nonlocal serial
        serial += 1
        return cotenant_entry(rng, name, foreign_id(rng)), f"{name}-{serial}"

    makers: list[EntryMaker] = [user_message]
    for s, attempt, window in chosen_windows(len(paths), board, rng, rate, stats):
        retry = None
        if rng.random() < retry_share:
            retry = idempotent_retry(paths[s], name, foreign_id(rng))
        event = append_in_window(
            paths[s], board, s, attempt, window, makers, name, verify, stats, retry=retry
        )
        if event is None:
            continue
        event.update(kind="cotenant", source=name)
        stats["retries"] += "retry" in event
        log.write(event)
        stats["events"] += 1
    log.write({"source": name, "stats": stats})
    log.close()


class _Lent:
    """The supersession process's held lock, lent to a new controller: the controller's
    ``release`` (at dispose) leaves it held; the process releases it itself."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self.generation = lock.generation

    @property
    def held(self) -> Any:
        return getattr(self._lock, "held", None)

    def is_intact(self) -> bool:
        intact = getattr(self._lock, "is_intact", None)
        return bool(intact()) if callable(intact) else True

    def release(self) -> None:
        pass


async def _claim(path: str, run_id: str, lock: Any) -> SessionFenceController:
    def lend(*_args: Any, **_options: Any) -> _Lent:
        return _Lent(lock)

    ctl = await SessionFenceController.create(path, run_id=run_id, acquire=lend)
    await ctl.dispose()
    return ctl


def supersede_main(paths: list[str], board: Board, rate: float, seed: str, log_path: str) -> None:
    """Process entry: claim sessions in released windows (see the module doc)."""
    rng = random.Random(seed)
    log = LogWriter(log_path)
    loop = asyncio.new_event_loop()
    serial = 0

    def act(s: int, attempt: int, window: int, lock: Any) -> dict[str, Any] | None:
        nonlocal serial
        if board.marked(s, CHAOS_ACTED):
            return None  # chaos acted in this window: the detection must have one cause
        serial += 1
        run_id = f"supersede-s{s}-{serial}"
        size = os.path.getsize(paths[s])  # nobody writes: we hold the lock
        board.mark(s, CLAIMED)
        ctl = loop.run_until_complete(_claim(paths[s], run_id, lock))
        return {
            "kind": "supersede",
            "takeover": True,
            "content_changing": False,
            "run_id": run_id,
            "revision": ctl.revision,
            "claim_offset": size,
        }

    try:
        stats = visit_windows(paths, board, rng, rate, act, log, "supersede")
    finally:
        loop.close()
    log.write({"source": "supersede", "stats": stats})
    log.close()
