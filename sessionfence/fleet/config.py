"""What a fleet run is asked to do, checked once, and the knobs derived from it."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FULL_VERIFY_MAX_MB", "FleetConfig", "FleetConfigError"]

# Above this size a full-content proof per accepted append would be paid for every window,
# so `--verify` defaults to tail there (tail reads only the window and the suffix:
# docs/design.md, "Verify modes").
FULL_VERIFY_MAX_MB = 64.0

VERIFY_MODES = ("full", "tail")


class FleetConfigError(ValueError):
    """An option value that cannot run; the CLI turns it into a one-line error (exit 2)."""


@dataclass(frozen=True)
class FleetConfig:
    workers: int = 4
    sessions: int = 8
    turns: int = 10
    transcript_mb: float = 1.0
    chaos: float = 0.0
    seed: int = 0
    verify: str | None = None  # None: full up to FULL_VERIFY_MAX_MB, tail above
    attempts: int = 3  # completed attempts per session before it leaves the queue
    # Delivery-mirror appends: probability per released window (benign traffic, always on).
    mirror: float = 0.25
    # Simulated model call, seconds (uniform); the lock is released meanwhile.
    think_min: float = 0.002
    think_max: float = 0.008
    compaction: float = 0.1  # probability per turn of a compaction through the guarded manager
    # Probability per released window of an owned in-process publication (with_write_lock
    # with publish_owned_write) during the model call, as an in-process mirror makes one.
    publish: float = 0.15
    # Kills are bounded so a run always ends: at most this many per session.
    max_kills_per_session: int = 3
    lock_timeout: float = 60.0
    # None: every kind the verify mode can see (chaos.chaos_kinds); else exactly these.
    chaos_kinds: tuple[str, ...] | None = None
    # Co-tenant processes (append_as_cotenant: user messages, not benign by content), and
    # the probability per released window that each of them appends.
    cotenants: int = 0
    cotenant_rate: float = 0.25
    # Share of co-tenant appends retried with the same idempotency key (must be a no-op).
    cotenant_retry: float = 0.3
    # Probability per released window that a new attempt claims the session (supersession).
    supersede: float = 0.0

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("--workers", 1 <= self.workers <= 256, "between 1 and 256"),
            ("--sessions", 1 <= self.sessions <= 10_000, "between 1 and 10000"),
            ("--turns", 1 <= self.turns <= 100_000, "between 1 and 100000"),
            (
                "--transcript-mb",
                math.isfinite(self.transcript_mb) and 0 <= self.transcript_mb <= 100_000,
                "between 0 and 100000",
            ),
            ("--chaos", math.isfinite(self.chaos) and 0 <= self.chaos <= 1, "between 0 and 1"),
            ("--seed", 0 <= self.seed < 2**63, "a non-negative integer"),
            ("--attempts", 1 <= self.attempts <= 1000, "between 1 and 1000"),
            ("mirror rate", 0 <= self.mirror <= 1, "between 0 and 1"),
            ("--cotenants", 0 <= self.cotenants <= 64, "between 0 and 64"),
            (
                "--cotenant-rate",
                math.isfinite(self.cotenant_rate) and 0 <= self.cotenant_rate <= 1,
                "between 0 and 1",
            ),
            ("co-tenant retry share", 0 <= self.cotenant_retry <= 1, "between 0 and 1"),
            (
                "--supersede",
                math.isfinite(self.supersede) and 0 <= self.supersede <= 1,
                "between 0 and 1",
            ),
            ("publish rate", 0 <= self.publish <= 1, "between 0 and 1"),
            ("compaction rate", 0 <= self.compaction <= 1, "between 0 and 1"),
            ("think time", 0 <= self.think_min <= self.think_max <= 60, "0 <= min <= max <= 60"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise FleetConfigError(f"{name} must be {expected}")
        if self.chaos_kinds is not None:
            from .chaos import KINDS

            unknown = sorted(set(self.chaos_kinds) - set(KINDS))
            if unknown or not self.chaos_kinds:
                raise FleetConfigError(
                    f"unknown chaos kinds {unknown}; known: {', '.join(KINDS)}"
                    if unknown
                    else "chaos kinds must not be empty"
                )
        if self.verify is not None and self.verify not in VERIFY_MODES:
            raise FleetConfigError(
                f"--verify must be one of {', '.join(VERIFY_MODES)}, got {self.verify!r}"
            )

    @property
    def verify_mode(self) -> str:
        if self.verify is not None:
            return self.verify
        return "full" if self.transcript_mb <= FULL_VERIFY_MAX_MB else "tail"

    @property
    def padding_bytes(self) -> int:
        return int(self.transcript_mb * 1024 * 1024)

    @property
    def kill_rate(self) -> float:
        """Probability that a dispatched attempt is SIGKILLed by the supervisor."""
        return min(0.5, self.chaos / 2)

    @property
    def torn_rate(self) -> float:
        """Probability that an attempt dies half-way through writing a line (a torn tail)."""
        return min(0.25, self.chaos / 4)
