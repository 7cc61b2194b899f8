"""How the foreign writers (chaos, the mirror, the co-tenants, supersession) reach the
released windows of the workers' attempts.

Every foreign writer scans the board, flips a coin once for every released window it sees,
and acts in the chosen ones. Two ways to act:

- **Under the write lock** (chaos, supersession: ``visit_windows``): take the session's
  lock without queueing behind the worker, re-read the board, act only if the same window is
  still open. The event is exact ground truth: made after the window's fence snapshot and
  before its check, under a known lock generation.
- **Through ``append_as_cotenant``** (the mirror, the co-tenants: ``append_in_window``),
  which takes the lock itself, so the board cannot be re-read under it. The writer holds the
  session's gate (board.py) from its look at the board until its appends returned, and looks
  again afterwards: when the same attempt is still on the board (not idle), every append
  landed in a window of that attempt no later than the one shown then, before its check (or
  after a check that raised): the event is *placed* in that window. Otherwise (the attempt
  ended meanwhile) it is *unplaced*: its lines are still checked, and the fence or the parse
  that saw them says whether they were accepted.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..errors import SessionWriteLockAcquireError
from ..journal import append_as_cotenant
from ..lock import acquire_session_write_lock
from .board import APPENDED, EDITED_OUT_OF_WINDOW, IDLE, REACQUIRING, RELEASED, Board
from .logs import LogWriter

__all__ = [
    "LOCK_TRY_PAUSE",
    "LOCK_TRY_SECONDS",
    "SCAN_PAUSE",
    "append_in_window",
    "chosen_windows",
    "idempotent_retry",
    "new_stats",
    "try_lock",
    "visit_windows",
    "window_open",
]

# How long a foreign writer keeps trying the lock for one window before giving the window up.
LOCK_TRY_SECONDS = 0.05
LOCK_TRY_PAUSE = 0.0005
SCAN_PAUSE = 0.001
# An idempotent retry is not tied to a window: it may wait for the lock a little longer.
_RETRY_TIMEOUT = 5.0

_OPEN = (RELEASED, REACQUIRING)


def new_stats() -> dict[str, int]:
    return {"windows_seen": 0, "chosen": 0, "events": 0, "lock_busy": 0, "closed": 0}


def window_open(board: Board, s: int, attempt: int, window: int) -> bool:
    now_attempt, phase, now_window = board.snapshot(s)
    return (now_attempt, now_window) == (attempt, window) and phase in _OPEN


def chosen_windows(
    sessions: int, board: Board, rng: random.Random, rate: float, stats: dict[str, int]
) -> Iterator[tuple[int, int, int]]:
    """``(session, attempt, window)`` of the released windows the coin chose, each seen
    once, until the board says stop."""
    seen: dict[int, tuple[int, int]] = {}
    order = list(range(sessions))
    while not board.stopping:
        rng.shuffle(order)
        for s in order:
            attempt, phase, window = board.snapshot(s)
            if phase not in _OPEN or attempt == 0:
                continue
            if seen.get(s) == (attempt, window):
                continue
            seen[s] = (attempt, window)
            stats["windows_seen"] += 1
            if rng.random() >= rate:
                continue
            stats["chosen"] += 1
            yield s, attempt, window
        time.sleep(SCAN_PAUSE)


def try_lock(path: str, board: Board, s: int, attempt: int, window: int) -> Any:
    """Try the lock without queueing behind the worker: give up once the window closes."""
    deadline = time.monotonic() + LOCK_TRY_SECONDS
    while True:
        try:
            return acquire_session_write_lock(path, timeout=0)
        except SessionWriteLockAcquireError:
            pass
        if not window_open(board, s, attempt, window):
            return None
        if time.monotonic() > deadline or board.stopping:
            return None
        time.sleep(LOCK_TRY_PAUSE)


def visit_windows(
    paths: list[str],
    board: Board,
    rng: random.Random,
    rate: float,
    act: Callable[[int, int, int, Any], dict[str, Any] | None],
    log: LogWriter,
    source: str,
    *,
    gated: bool = False,
) -> dict[str, int]:
    """For every chosen window: take the session's lock (and, when ``gated``, its gate,
    without waiting) and, if the same window is still open, call ``act`` and log its
    event."""
    stats = new_stats()
    for s, attempt, window in chosen_windows(len(paths), board, rng, rate, stats):
        lock = try_lock(paths[s], board, s, attempt, window)
        if lock is None:
            stats["lock_busy"] += 1
            continue
        held_from = time.monotonic()
        gate = board.gate(s) if gated else None
        try:
            if gate is not None and not gate.acquire(block=False):
                gate = None
                stats["lock_busy"] += 1  # an appender is between its look and its append
                continue
            if not window_open(board, s, attempt, window):
                stats["closed"] += 1
                continue
            event = act(s, attempt, window, lock)
            if event is None:
                continue
            event.update(
                source=source,
                session=s,
                attempt=attempt,
                window=window,
                gen=lock.generation,
                # Inside the true hold, as the workers log theirs (overlap check).
                hold=[held_from, time.monotonic()],
            )
            log.write(event)
            stats["events"] += 1
        finally:
            if gate is not None:
                gate.release()
            lock.release()
    return stats


class _Closed(Exception):
    """The window closed (or the lock stayed busy) before an append could be made."""


def _append_now(
    path: str,
    board: Board,
    s: int,
    attempt: int,
    window: int,
    entry: dict[str, Any],
    writer: str,
    key: str,
) -> str:
    """``append_as_cotenant`` without queueing behind the worker (see ``try_lock``)."""
    deadline = time.monotonic() + LOCK_TRY_SECONDS
    while True:
        try:
            return append_as_cotenant(path, entry, writer=writer, idempotency_key=key, timeout=0)
        except SessionWriteLockAcquireError:
            pass
        if not window_open(board, s, attempt, window):
            raise _Closed
        if time.monotonic() > deadline or board.stopping:
            raise _Closed
        time.sleep(LOCK_TRY_PAUSE)


EntryMaker = Callable[[Sequence[str]], tuple[dict[str, Any], str]]


def append_in_window(
    path: str,
    board: Board,
    s: int,
    attempt: int,
    window: int,
    makers: Sequence[EntryMaker],
    writer: str,
    verify: str,
    stats: dict[str, int],
    *,
    retry: Callable[[dict[str, Any], str, str], dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """Append the entries ``makers`` build (each gets the ids appended so far and returns
    ``(entry, idempotency key)``) through ``append_as_cotenant`` as ``writer``, inside the
    window, holding the session's gate (see the module doc). ``retry(entry, key, id)``, if
    given, is called once for the first entry, still under the gate, and its record kept.

    Returns the event (``added`` ids, ``keys``, ``placed``, the ``window`` it is placed in,
    ``pre_window`` where it was chosen), or None when nothing was appended."""
    gate = board.gate(s)
    if not gate.acquire(timeout=LOCK_TRY_SECONDS):
        stats["lock_busy"] += 1
        return None
    try:
        if not window_open(board, s, attempt, window):
            stats["closed"] += 1
            return None
        if verify == "tail" and board.marked(s, EDITED_OUT_OF_WINDOW):
            # Tail mode cannot see an edit outside its window followed by an append.
            stats["declined"] = stats.get("declined", 0) + 1
            return None
        board.mark(s, APPENDED)
        added: list[str] = []
        keys: list[str] = []
        first: dict[str, Any] | None = None
        error: str | None = None
        for make in makers:
            entry, key = make(added)
            try:
                added.append(_append_now(path, board, s, attempt, window, entry, writer, key))
            except _Closed:
                break
            except Exception as exc:  # torn tail, journal trouble: logged, judged below
                error = f"{type(exc).__name__}: {exc}"
                break
            keys.append(key)
            if first is None:
                first = entry
        post_attempt, post_phase, post_window = board.snapshot(s)
        retried = None
        if retry is not None and first is not None:
            retried = retry(first, keys[0], added[0])
    finally:
        gate.release()
    if not added and error is None:
        stats["closed"] += 1
        return None
    placed = post_attempt == attempt and post_phase != IDLE
    event: dict[str, Any] = {
        "takeover": False,
        "content_changing": bool(added),
        "added": added,
        "keys": keys,
        "writer": writer,
        "session": s,
        "attempt": attempt,
        "window": post_window if placed else window,
        "pre_window": window,
        "placed": placed,
    }
    if error is not None:
        event["error"] = error
    if retried is not None:
        event["retry"] = retried
    return event


def idempotent_retry(path: str, writer: str, proposed: str) -> Callable[..., dict[str, Any]]:
    """A retry of an append whose acknowledgement was 'lost': the same entry and key with
    another proposed id; the journal must return the first id and write nothing."""

    def retry(entry: dict[str, Any], key: str, first_id: str) -> dict[str, Any]:
        again = {**entry, "id": proposed}
        record: dict[str, Any] = {"key": key, "id": first_id, "proposed": proposed}
        try:
            record["returned"] = append_as_cotenant(
                path, again, writer=writer, idempotency_key=key, timeout=_RETRY_TIMEOUT
            )
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
        return record

    return retry
