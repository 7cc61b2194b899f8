"""Per-session state in shared memory: the ground truth chaos and the mirror act on.

One row of int64 per session, written only by the worker running the session's current
attempt (and by the supervisor when that worker dies), read by the chaos and mirror
processes *while they hold the session's write lock*. Because a worker flips its phase to
RELEASED before it gives the lock up and to HOLDING only after it has it back, a reader that
holds the lock and sees RELEASED or REACQUIRING knows the attempt's fence check for that
window has not run yet: whatever it writes now must be judged by that check.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "APPENDED",
    "EDITED_OUT_OF_WINDOW",
    "HOLDING",
    "IDLE",
    "PHASE_NAMES",
    "REACQUIRING",
    "RELEASED",
    "Board",
]

IDLE, HOLDING, RELEASED, REACQUIRING = 0, 1, 2, 3
# Window marks (see Board.mark).
EDITED_OUT_OF_WINDOW, APPENDED = 1, 2
PHASE_NAMES = {IDLE: "idle", HOLDING: "holding", RELEASED: "released", REACQUIRING: "reacquiring"}

_ATTEMPT, _PHASE, _WINDOW, _TAINT, _TURNS = range(5)
_FIELDS = 5


class Board:
    """Shared rows plus a stop flag; pickles into forked children as the same memory."""

    def __init__(self, sessions: int, ctx: Any) -> None:
        self.sessions = sessions
        self._rows: Any = ctx.RawArray("q", sessions * _FIELDS)
        self._stop: Any = ctx.RawValue("q", 0)

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

    def open_window(self, session: int, window: int) -> None:
        """Enter released window ``window``; called while the lock is still held."""
        self._put(session, _TAINT, 0)
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
