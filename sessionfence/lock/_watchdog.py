"""One shared daemon thread that force-releases locks held past their max hold.

A ``threading.Timer`` per acquisition would start a thread per lock; one thread with a heap
of monotonic deadlines costs a heap push per acquisition and nothing while idle.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Watchdog"]

T = TypeVar("T")

_log = logging.getLogger("sessionfence.lock")

# Bound a single wait so a huge (effectively infinite) deadline never overflows the OS
# timer; the loop just waits again.
_MAX_WAIT = 3600.0


class Watchdog(Generic[T]):
    def __init__(self, is_done: Callable[[T], bool], expire: Callable[[T], None]) -> None:
        self._is_done = is_done
        self._expire = expire
        self.reset()

    def reset(self) -> None:
        """Fresh state; also what a forked child needs (the thread did not survive fork)."""
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()
        self._dead = 0
        self._waiting_until = math.inf
        self._thread: threading.Thread | None = None

    def add(self, deadline: float, item: T) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._seq), item))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sessionfence-lock-watchdog", daemon=True
                )
                self._thread.start()
            elif deadline < self._waiting_until:
                # Wake the thread only when it sleeps past the new deadline: with one
                # max_hold, deadlines arrive in order and acquisitions never wake it.
                self._cond.notify()

    def discard(self) -> None:
        """Note that one item finished; compact the heap once dead items dominate it.

        The count is kept without the lock (it is on every release's path): a lost update
        only moves the next compaction, which recounts under the lock.
        """
        self._dead += 1
        if self._dead > 64 and self._dead * 2 > len(self._heap):
            with self._cond:
                self._heap = [e for e in self._heap if not self._is_done(e[2])]
                heapq.heapify(self._heap)
                self._dead = 0

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    # Sleep until the earliest deadline even when its item is already done:
                    # dropping it first would leave the thread waiting with no deadline,
                    # and every later acquisition would have to wake it.
                    if not self._heap:
                        self._waiting_until = math.inf
                        self._cond.wait()
                        continue
                    deadline, _, item = self._heap[0]
                    delay = deadline - time.monotonic()
                    if delay > 0:
                        self._waiting_until = deadline
                        self._cond.wait(min(delay, _MAX_WAIT))
                        continue
                    heapq.heappop(self._heap)
                    if self._is_done(item):
                        self._dead = max(0, self._dead - 1)
                        continue
                    break
                self._waiting_until = -math.inf  # busy: an add need not wake us
            try:
                self._expire(item)
            except Exception:
                _log.exception("session write lock watchdog failed to release a lock")
