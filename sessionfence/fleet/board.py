"""Per-session state in shared memory: the ground truth chaos and the mirror act on.

One row of int64 per session, written only by the worker running the session's current
attempt (and by the supervisor when that worker dies), read by the chaos and mirror
processes *while they hold the session's write lock*. Because a worker flips its phase to
RELEASED before it gives the lock up and to HOLDING only after it has it back, a reader that
holds the lock and sees RELEASED or REACQUIRING knows the attempt's fence check for that
window has not run yet: whatever it writes now must be judged by that check.

Processes that append through ``append_as_cotenant`` (the delivery mirror, the co-tenants)
cannot read the board under the write lock: that function takes the lock itself. They hold
the session's *gate* (a process-shared lock, one per stripe of sessions) from their look at
the board until their appends returned, and chaos takes the gate too (without waiting,
under the write lock) before an edit: so chaos never edits between an appender's look and
its append. Chaos also compares the transcript's size with its size when the window opened
(``open_size``): whoever appended in this window, chaos then only appends, replaces or
touches, never cuts or rewrites what was just written.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "APPENDED",
    "CHAOS_ACTED",
    "CLAIMED",
    "EDITED_OUT_OF_WINDOW",
    "HOLDING",
    "IDLE",
    "PHASE_NAMES",
    "REACQUIRING",
    "RELEASED",
    "Board",
]

IDLE, HOLDING, RELEASED, REACQUIRING = 0, 1, 2, 3
# Window marks (see Board.mark). CHAOS_ACTED and CLAIMED keep chaos and a supersession out
# of each other's window, so a detection there has one cause.
EDITED_OUT_OF_WINDOW, APPENDED, CHAOS_ACTED, CLAIMED = 1, 2, 4, 8
PHASE_NAMES = {IDLE: "idle", HOLDING: "holding", RELEASED: "released", REACQUIRING: "reacquiring"}

_ATTEMPT, _PHASE, _WINDOW, _TAINT, _TURNS, _OPEN_SIZE = range(6)
_FIELDS = 6
_GATE_STRIPES = 64


class Board:
    """Shared rows plus a stop flag; pickles into forked children as the same memory."""

    def __init__(self, sessions: int, ctx: Any) -> None:
        self.sessions = sessions
        self._rows: Any = ctx.RawArray("q", sessions * _FIELDS)
        self._stop: Any = ctx.RawValue("q", 0)
        self._gates: list[Any] = [ctx.Lock() for _ in range(min(sessions, _GATE_STRIPES))]

    def _at(self, session: int, field: int) -> int:
        return int(self._rows[session * _FIELDS + field])

    def _put(self, session: int, field: int, value: int) -> None:
        self._rows[session * _FIELDS + field] = value

    # -- written by the worker that runs the session (or the supervisor after a death)
    def start_attempt(self, session: int, attempt: int) -> None:
        self._put(session, _PHASE, IDLE)
        self._put(session, _WINDOW, 0)
        self._put(session, _TAINT, 0)
        self._put(session, _ATTEMPT, attempt)

    def set_phase(self, session: int, phase: int) -> None:
        self._put(session, _PHASE, phase)

    def open_window(self, session: int, window: int, size: int = -1) -> None:
        """Enter released window ``window``; called while the lock is still held, with the
        transcript's ``size`` at that moment."""
        self._put(session, _TAINT, 0)
        self._put(session, _OPEN_SIZE, size)
        self._put(session, _WINDOW, window)
        self._put(session, _PHASE, RELEASED)

    def count_turn(self, session: int) -> None:
        self._put(session, _TURNS, self._at(session, _TURNS) + 1)

    # -- written by chaos and the mirror under the lock. In tail mode an edit outside the tail
    # window must not share a window with an append (tail mode cannot see that by design), so
    # each foreign writer marks what it did and checks what the other did.
    def mark(self, session: int, flag: int) -> None:
        self._put(session, _TAINT, self._at(session, _TAINT) | flag)

    def marked(self, session: int, flag: int) -> bool:
        return self._at(session, _TAINT) & flag != 0

    def open_size(self, session: int) -> int:
        """The transcript's size when the current window opened (-1: unknown)."""
        return self._at(session, _OPEN_SIZE)

    def gate(self, session: int) -> Any:
        """The session's gate (see the module doc): a process-shared lock."""
        return self._gates[session % len(self._gates)]

    def snapshot(self, session: int) -> tuple[int, int, int]:
        """(attempt, phase, window) of the session."""
        return self._at(session, _ATTEMPT), self._at(session, _PHASE), self._at(session, _WINDOW)

    def turns(self) -> int:
        return sum(self._at(s, _TURNS) for s in range(self.sessions))

    def stop(self) -> None:
        self._stop.value = 1

    @property
    def stopping(self) -> bool:
        return bool(self._stop.value)
