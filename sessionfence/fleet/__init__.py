"""``sessionfence fleet``: a multi-process agent fleet on real transcripts, with chaos.

Workers run attempts (reacquire + fence check, owned appends, compactions, release for a
simulated model call) on shared transcripts; a delivery mirror appends benign lines in the
released windows, co-tenants append user messages there (both through
``append_as_cotenant``), new attempts claim sessions in them (supersession); a chaos
process makes foreign edits of every kind (docs/fleet.md, "Chaos kinds") and the supervisor
SIGKILLs workers. Every event is logged as ground truth and the oracle checks the fence's
verdicts and every acknowledged line against it.
"""

from __future__ import annotations

from .config import FleetConfig, FleetConfigError
from .report import ProgressDisplay, build_report, render_text
from .supervisor import FleetAbortedError, RunResult, run_fleet

__all__ = [
    "FleetAbortedError",
    "FleetConfig",
    "FleetConfigError",
    "ProgressDisplay",
    "RunResult",
    "build_report",
    "render_text",
    "run_fleet",
]
