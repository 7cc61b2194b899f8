"""Ground truth against what the fleet saw: takeovers and lines, judged from the logs.

Takeovers. Chaos and the mirror log every foreign event with the session, the attempt, the
released window it happened in and the lock generation it was made under; workers log every
detection with the window and the generation of the lock they held for the check. Then:

- an event is *void* when its attempt was SIGKILLed (nobody was left to detect it);
- an expected takeover (``takeover: true``) is *detected* when the attempt raised in that
  window with a lock generation after the event's, and *missed* otherwise;
- a detection with no expected takeover before it in its window is a *false takeover*
  (the window held nothing, or only benign events: mirror appends, touch, chmod);
- a benign event in a window that passed its check is *accepted*;
- an *unseen* event is invisible to the verify mode by design (tail mode, an edit outside
  the tail window in the same timestamp tick: see chaos); it is neither to be detected nor
  benign, and a later detection of it in the same attempt is not a false takeover;
- an event made after the window's check (generation above it) is *late*: it was never
  the check's business. Outside the race of a detection it would mean the ground truth is
  broken, and is counted as an ordering anomaly.

Lines. Every id a worker acknowledged (its append returned) must be in its transcript exactly
once and whole (it parses and its text matches the CRC written with it), unless chaos logged
that it truncated the line away; a line chaos rewrote in place must still be there once (its
CRC no longer counts). Every line the mirror or chaos added must be there once too, unless
truncated away. Any line that does not parse, or a file that does not end with a newline, is
a torn line; every half-line a dying worker left must have been found by the next attempt on
that session and moved to a quarantine file.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .logs import read_log, read_logs
from .transcripts import text_intact

__all__ = [
    "Facts",
    "LineVerdict",
    "TakeoverVerdict",
    "collect_facts",
    "count_overlaps",
    "judge_takeovers",
    "judge_torn_tails",
    "verify_lines",
]

Key = tuple[int, int, int]  # (session, attempt, window)


@dataclass
class Facts:
    """Everything the logs of one run say, grouped for judging."""

    events: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] = field(default_factory=list)
    turns: list[dict[str, Any]] = field(default_factory=list)
    setups: list[dict[str, Any]] = field(default_factory=list)
    acks: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    dead_attempts: set[int] = field(default_factory=set)
    killed_workers: int = 0
    crashed_workers: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    torn_injected: list[dict[str, Any]] = field(default_factory=list)
    torn_found: list[dict[str, Any]] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    loop_seconds: float = 0.0  # attempt time after setup (parse + eager lock), summed
    worker_peak_mb: float = 0.0
    transcripts_kept: int = 0  # parsed transcripts still alive between attempts (worst)
    kill_phases: dict[str, int] = field(default_factory=dict)  # supervisor kills by phase
    # (session, start, end) of lock holds, monotonic clock: inside each true hold.
    holds: list[tuple[int, float, float]] = field(default_factory=list)
    foreign_stats: dict[str, dict[str, int]] = field(default_factory=dict)

    def ids_by_session(self, key: str) -> dict[int, set[str]]:
        """Ids foreign writers logged under ``key`` (``removed``, ``altered``, ``added``),
        per session; void attempts included: the bytes changed whoever was running."""
        out: dict[int, set[str]] = defaultdict(set)
        for event in self.events:
            out[int(event["session"])].update(event.get(key) or ())
        return out


def collect_facts(log_dir: str) -> Facts:
    facts = Facts()
    for record in read_logs(log_dir, "worker-"):
        kind = record.get("t")
        if kind == "ack":
            facts.acks[int(record["s"])].append(str(record["id"]))
        elif kind == "turn":
            facts.turns.append(record)
        elif kind == "detect":
            facts.detections.append(record)
        elif kind == "setup":
            facts.setups.append(record)
        elif kind == "error":
            facts.errors.append(record)
        elif kind == "torn-inject":
            facts.torn_injected.append(record)
        elif kind == "torn":
            facts.torn_found.append(record)
        elif kind == "hold":
            facts.holds.append((int(record["s"]), float(record["start"]), float(record["end"])))
        elif kind == "alive":
            facts.transcripts_kept = max(facts.transcripts_kept, int(record["transcripts"]))
        elif kind == "stop":
            facts.worker_peak_mb = max(facts.worker_peak_mb, float(record["maxrss_mb"]))
        elif kind == "end":
            facts.outcomes[str(record["outcome"])] += 1
            facts.loop_seconds += float(record.get("loop") or 0.0)
    for name in ("chaos.jsonl", "mirror.jsonl"):
        path = os.path.join(log_dir, name)
        if not os.path.exists(path):
            continue
        for record in read_log(path):
            if "stats" in record:
                facts.foreign_stats[str(record["source"])] = dict(record["stats"])
                continue
            facts.events.append(record)
            if record.get("hold"):
                start, end = record["hold"]
                facts.holds.append((int(record["session"]), float(start), float(end)))
    supervisor = os.path.join(log_dir, "supervisor.jsonl")
    if os.path.exists(supervisor):
        for record in read_log(supervisor):
            if record.get("t") == "kill":
                phase = str(record.get("phase"))
                facts.kill_phases[phase] = facts.kill_phases.get(phase, 0) + 1
            if record.get("t") != "death":
                continue
            if record.get("attempt"):
                facts.dead_attempts.add(int(record["attempt"]))
            if record.get("killed", record.get("exitcode") == -9):
                facts.killed_workers += 1
            else:
                facts.crashed_workers += 1
                facts.errors.append(record)
    return facts


@dataclass
class TakeoverVerdict:
    injected: int = 0
    detected: int = 0
    missed: int = 0
    false_takeovers: int = 0
    benign_events: int = 0
    benign_accepted: int = 0
    void_events: int = 0
    late_events: int = 0
    ordering_anomalies: int = 0
    unseen_events: int = 0  # invisible to the verify mode by design (see chaos)
    unseen_detected_later: int = 0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)
    missed_examples: list[dict[str, Any]] = field(default_factory=list)
    false_examples: list[dict[str, Any]] = field(default_factory=list)

    def count(self, kind: str, what: str) -> None:
        row = self.by_kind.setdefault(kind, {})
        row[what] = row.get(what, 0) + 1


def _key(record: Mapping[str, Any], session: str, attempt: str, window: str) -> Key:
    return int(record[session]), int(record[attempt]), int(record[window])


def judge_takeovers(
    events: Iterable[Mapping[str, Any]],
    detections: Iterable[Mapping[str, Any]],
    dead_attempts: set[int],
    turns: Iterable[Mapping[str, Any]] = (),
    examples: int = 5,
) -> TakeoverVerdict:
    """Match foreign events with detections window by window (see the module doc)."""
    verdict = TakeoverVerdict()
    detection_at: dict[Key, Mapping[str, Any]] = {}
    for d in detections:
        if int(d["a"]) in dead_attempts:
            continue
        detection_at.setdefault(_key(d, "s", "a", "w"), d)
    checked_gen: dict[Key, int] = {_key(t, "s", "a", "w"): int(t.get("gen") or 0) for t in turns}
    by_window: dict[Key, list[Mapping[str, Any]]] = defaultdict(list)
    unseen_at: dict[tuple[int, int], int] = {}  # (session, attempt) -> first unseen window
    for e in events:
        if int(e["attempt"]) in dead_attempts:
            verdict.void_events += 1
            continue
        by_window[_key(e, "session", "attempt", "window")].append(e)

    for key, window_events in by_window.items():
        detection = detection_at.get(key)
        check_gen = int(detection.get("gen") or 0) if detection else checked_gen.get(key, 0)
        caused = False
        for e in sorted(window_events, key=lambda r: int(r.get("gen") or 0)):
            kind = str(e.get("kind"))
            gen = int(e.get("gen") or 0)
            if check_gen and gen > check_gen:
                verdict.late_events += 1
                if detection is None:
                    verdict.ordering_anomalies += 1
                continue
            if e.get("unseen"):
                # Invisible to this verify mode by design (tail mode, same tick): neither
                # a takeover to detect nor a benign event. A later detection of it in the
                # same attempt is not a false alarm.
                verdict.unseen_events += 1
                verdict.count(kind, "unseen")
                unseen_at[key[:2]] = min(unseen_at.get(key[:2], key[2]), key[2])
                continue
            if e.get("takeover"):
                verdict.injected += 1
                verdict.count(kind, "injected")
                if detection is not None:
                    verdict.detected += 1
                    verdict.count(kind, "detected")
                    reasons = verdict.reasons.setdefault(kind, {})
                    reason = str(detection.get("reason"))
                    reasons[reason] = reasons.get(reason, 0) + 1
                    caused = True
                else:
                    verdict.missed += 1
                    verdict.count(kind, "missed")
                    if len(verdict.missed_examples) < examples:
                        verdict.missed_examples.append(dict(e))
            else:
                verdict.benign_events += 1
                verdict.count(kind, "benign")
                if detection is None:
                    verdict.benign_accepted += 1
                    verdict.count(kind, "accepted")
        if detection is not None and caused:
            detection_at.pop(key)
    # Detections left over had no expected takeover before them in their window.
    for key, d in detection_at.items():
        first_unseen = unseen_at.get(key[:2])
        if first_unseen is not None and first_unseen <= key[2]:
            verdict.unseen_detected_later += 1
            continue
        verdict.false_takeovers += 1
        if len(verdict.false_examples) < examples:
            verdict.false_examples.append(dict(d))
    return verdict


def count_overlaps(holds: Iterable[tuple[int, float, float]]) -> int:
    """Holds of one session's write lock that began before an earlier one ended: two
    holders at once. Every interval lies inside its true hold, so any overlap is real."""
    overlaps = 0
    by_session: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for session, start, end in holds:
        by_session[session].append((start, end))
    for intervals in by_session.values():
        intervals.sort()
        busy_until = -math.inf
        for start, end in intervals:
            if start < busy_until:
                overlaps += 1
            busy_until = max(busy_until, end)
    return overlaps


@dataclass
class TornVerdict:
    injected: int = 0
    detected: int = 0
    repaired: int = 0
    undetected: int = 0
    quarantined: int = 0  # .torn-* files beside the transcripts at the end


def judge_torn_tails(
    injected: Iterable[Mapping[str, Any]], found: Iterable[Mapping[str, Any]]
) -> TornVerdict:
    """Every half-written line a dying worker left must be found (and moved to quarantine)
    by a later attempt on that session, before anything else was appended."""
    verdict = TornVerdict()
    seen = {(int(f["s"]), int(f["offset"])) for f in found}
    for f in found:
        verdict.detected += 1
        verdict.repaired += bool(f.get("repaired"))
    for i in injected:
        verdict.injected += 1
        if (int(i["s"]), int(i["offset"])) not in seen:
            verdict.undetected += 1
    return verdict


@dataclass
class LineVerdict:
    sessions: int = 0
    lines: int = 0
    acknowledged: int = 0
    lost: int = 0
    duplicated: int = 0
    damaged: int = 0
    torn: int = 0
    removed: int = 0  # acknowledged, then truncated away by chaos (logged)
    altered: int = 0  # acknowledged, then rewritten in place by chaos: present, CRC exempt
    foreign: int = 0  # lines the mirror and chaos added (they must survive too)
    foreign_lost: int = 0
    foreign_duplicated: int = 0
    examples: list[str] = field(default_factory=list)


_PAD_PREFIX = b'{"type":"message","id":"'
_NO_IDS: set[str] = set()


def verify_lines(
    paths: Mapping[int, str],
    acks: Mapping[int, Iterable[str]],
    removed: Mapping[int, set[str]] | None = None,
    altered: Mapping[int, set[str]] | None = None,
    foreign: Mapping[int, set[str]] | None = None,
    *,
    shape_only_below: int = 0,
    examples: int = 5,
) -> LineVerdict:
    """Parse every transcript and hold each acknowledged id to "exactly once and whole",
    and each line a foreign writer added to "exactly once", unless chaos removed it.

    ``shape_only_below``: byte offset below which lines are only checked for shape (the
    generated padding of very large transcripts, which no worker writes); 0 parses all.
    """
    verdict = LineVerdict()
    for session, path in sorted(paths.items()):
        verdict.sessions += 1
        with open(path, "rb") as f:
            data = f.read()
        body = data
        if data and not data.endswith(b"\n"):
            verdict.torn += 1
            _example(verdict, examples, f"session {session}: file ends without a newline")
            body = data[: data.rfind(b"\n") + 1]
        gone = (removed or {}).get(session, _NO_IDS)
        changed = (altered or {}).get(session, _NO_IDS)
        acked = list(dict.fromkeys(acks.get(session, ())))
        acked_set = set(acked)
        ids: Counter[str] = Counter()
        entries: dict[str, Any] = {}  # only the acknowledged ones: big files have millions
        offset = 0
        for raw in body.split(b"\n")[:-1]:
            start = offset
            offset += len(raw) + 1
            if not raw.strip():
                continue
            verdict.lines += 1
            if start + len(raw) < shape_only_below and raw.startswith(_PAD_PREFIX):
                ids[raw[len(_PAD_PREFIX) : len(_PAD_PREFIX) + 8].decode("ascii", "replace")] += 1
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                verdict.torn += 1
                _example(verdict, examples, f"session {session}: unparseable line at {start}")
                continue
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                ids[entry["id"]] += 1
                if entry["id"] in acked_set:
                    entries[entry["id"]] = entry
        for entry_id in acked:
            verdict.acknowledged += 1
            if entry_id in gone:
                verdict.removed += 1
                continue
            count = ids.get(entry_id, 0)
            if count == 0:
                verdict.lost += 1
                _example(verdict, examples, f"session {session}: acknowledged {entry_id} lost")
            elif count > 1:
                verdict.duplicated += 1
                _example(verdict, examples, f"session {session}: {entry_id} x{count}")
            elif entry_id in changed:
                verdict.altered += 1
            elif not text_intact(entries.get(entry_id)):
                verdict.damaged += 1
                _example(verdict, examples, f"session {session}: {entry_id} damaged")
        for entry_id in sorted((foreign or {}).get(session, _NO_IDS) - gone):
            verdict.foreign += 1
            count = ids.get(entry_id, 0)
            if count != 1:
                if count == 0:
                    verdict.foreign_lost += 1
                else:
                    verdict.foreign_duplicated += 1
                _example(verdict, examples, f"session {session}: foreign {entry_id} x{count}")
    return verdict


def _example(verdict: LineVerdict, limit: int, text: str) -> None:
    if len(verdict.examples) < limit:
        verdict.examples.append(text)
