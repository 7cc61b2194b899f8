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

Co-tenants and supersession (issue 13). A co-tenant append must be *accepted*: handed to a
worker's merge callback by its fence (logged ``merged``), or held by a later attempt's parse
(logged ``parsed``). Otherwise it is *void* when its window ended in a detected takeover or
supersession or its attempt was killed, *unjudged* when it was not placed in any window
(its attempt ended while it was made, windows.py) and no one saw it, and *unaccepted* (a
failure) when its window's check passed. A supersession is judged like a takeover, but
apart: *detected* only with reason ``superseded``; and no line of the superseded attempt may
lie at or past the claim's offset in the final transcript (a *late write* that landed).

Lines. Every id a worker acknowledged (its append returned) must be in its transcript exactly
once and whole (it parses and its text matches the CRC written with it), unless chaos logged
that it truncated the line away; a line chaos rewrote in place must still be there once (its
CRC no longer counts). Every line the mirror or chaos added must be there once too, unless
truncated away; so must every co-tenant line (and whole), and no id proposed by an
idempotent retry may be there at all. Any line that does not parse, or a file that does not
end with a newline, is a torn line; every half-line a dying worker left must have been found
by the next attempt on that session and moved to a quarantine file.
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
    "CotenantVerdict",
    "Facts",
    "LineVerdict",
    "TakeoverVerdict",
    "collect_facts",
    "count_overlaps",
    "judge_cotenants",
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
    # Issue 13: co-tenant appends (their own list: judged by acceptance, not as benign
    # events), what the workers' fences merged and their parses held, and the late writes
    # tried after a detected supersession.
    cotenant_events: list[dict[str, Any]] = field(default_factory=list)
    merged: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    parsed: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    acks_by_attempt: dict[tuple[int, int], list[str]] = field(
        default_factory=lambda: defaultdict(list)
    )
    late_refused: list[dict[str, Any]] = field(default_factory=list)
    late_errors: list[dict[str, Any]] = field(default_factory=list)
    late_landed: list[dict[str, Any]] = field(default_factory=list)

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
            facts.acks_by_attempt[int(record["s"]), int(record["a"])].append(str(record["id"]))
        elif kind == "merged":
            facts.merged[int(record["s"])].update(record.get("ids") or ())
        elif kind == "parsed":
            facts.parsed[int(record["s"])].update(record.get("ids") or ())
        elif kind == "late-refused":
            facts.late_refused.append(record)
        elif kind == "late-error":
            facts.late_errors.append(record)
        elif kind == "late-landed":
            facts.late_landed.append(record)
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
    names = ["chaos.jsonl", "mirror.jsonl", "supersede.jsonl"]
    names += sorted(n for n in os.listdir(log_dir) if n.startswith("cotenant-"))
    for name in names:
        path = os.path.join(log_dir, name)
        if not os.path.exists(path):
            continue
        for record in read_log(path):
            if "stats" in record:
                source = str(record["source"])
                if source.startswith("cotenant-"):
                    # One row for all co-tenant processes.
                    row = facts.foreign_stats.setdefault("cotenants", {})
                    for key, value in record["stats"].items():
                        row[key] = row.get(key, 0) + int(value)
                else:
                    facts.foreign_stats[source] = dict(record["stats"])
                continue
            if record.get("kind") == "cotenant":
                facts.cotenant_events.append(record)
            else:
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
    unplaced_events: int = 0  # appends through append_as_cotenant not placed in a window
    supersede_injected: int = 0
    supersede_detected: int = 0
    supersede_missed: int = 0
    supersede_void: int = 0
    supersede_late: int = 0
    supersede_missed_examples: list[dict[str, Any]] = field(default_factory=list)
    # (session, entry id) of each placed or void co-tenant append: how its window ended,
    # "passed", "void-detected" (a detected takeover or supersession), "void-killed",
    # "false" (a detection nothing injected explains).
    cotenant_windows: dict[tuple[int, str], str] = field(default_factory=dict)
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
        kind = str(e.get("kind"))
        if int(e["attempt"]) in dead_attempts:
            verdict.void_events += 1
            if kind == "supersede":
                verdict.supersede_void += 1
            if kind == "cotenant":
                for entry_id in e.get("added") or ():
                    verdict.cotenant_windows[int(e["session"]), str(entry_id)] = "void-killed"
            continue
        if e.get("placed") is False:
            # Appended through append_as_cotenant while the attempt ended: no window to
            # judge it in (its lines are still checked; the co-tenant ones by acceptance).
            verdict.unplaced_events += 1
            continue
        by_window[_key(e, "session", "attempt", "window")].append(e)

    for key, window_events in by_window.items():
        detection = detection_at.get(key)
        check_gen = int(detection.get("gen") or 0) if detection else checked_gen.get(key, 0)
        caused = False
        cotenant_ids: list[tuple[int, str]] = []
        for e in sorted(window_events, key=lambda r: int(r.get("gen") or 0)):
            kind = str(e.get("kind"))
            gen = int(e.get("gen") or 0)
            if check_gen and gen > check_gen:
                verdict.late_events += 1
                if kind == "supersede":
                    verdict.supersede_late += 1
                if detection is None:
                    verdict.ordering_anomalies += 1
                continue
            if kind == "cotenant":
                # Judged once the window's cause is known (below) and by acceptance.
                cotenant_ids.extend((key[0], str(i)) for i in e.get("added") or ())
                continue
            if kind == "supersede":
                # Judged apart from the chaos takeovers: its own counts, its own reason.
                verdict.supersede_injected += 1
                if detection is not None and detection.get("reason") == "superseded":
                    verdict.supersede_detected += 1
                    caused = True
                else:
                    verdict.supersede_missed += 1
                    if len(verdict.supersede_missed_examples) < examples:
                        verdict.supersede_missed_examples.append(dict(e))
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
        status = "passed" if detection is None else "void-detected" if caused else "false"
        for where in cotenant_ids:
            verdict.cotenant_windows[where] = status
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
    cotenant: int = 0  # co-tenant lines that must be there once and whole
    cotenant_lost: int = 0
    cotenant_duplicated: int = 0
    cotenant_damaged: int = 0
    retry_duplicates: int = 0  # ids proposed by idempotent retries that are in the file
    late_landed: int = 0  # lines of a superseded attempt past its successor's claim
    late_ids: list[str] = field(default_factory=list)
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
    cotenant: Mapping[int, set[str]] | None = None,
    absent: Mapping[int, set[str]] | None = None,
    late_after: Mapping[int, list[tuple[set[str], int]]] | None = None,
    shape_only_below: int = 0,
    examples: int = 5,
) -> LineVerdict:
    """Parse every transcript and hold each acknowledged id to "exactly once and whole",
    and each line a foreign writer added to "exactly once", unless chaos removed it.

    ``cotenant``: ids co-tenants appended, held to "exactly once and whole" too.
    ``absent``: ids that must not be in the file (proposed by idempotent retries).
    ``late_after``: per session, ``(ids of a superseded attempt, claim offset)``: any of
    those lines at or past the offset landed after the successor's claim.

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
        theirs = (cotenant or {}).get(session, _NO_IDS)
        acked_set = set(acked) | theirs
        lates = (late_after or {}).get(session, [])
        watched = set().union(*(late for late, _ in lates)) if lates else _NO_IDS
        at: dict[str, list[int]] = defaultdict(list)  # offsets of the watched ids
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
                if entry["id"] in watched:
                    at[entry["id"]].append(start)
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
        for entry_id in sorted(theirs - gone):
            verdict.cotenant += 1
            count = ids.get(entry_id, 0)
            if count == 0:
                verdict.cotenant_lost += 1
            elif count > 1:
                verdict.cotenant_duplicated += 1
            elif entry_id not in changed and not text_intact(entries.get(entry_id)):
                verdict.cotenant_damaged += 1
            else:
                continue
            _example(verdict, examples, f"session {session}: co-tenant {entry_id} x{count}")
        for entry_id in sorted((absent or {}).get(session, _NO_IDS)):
            if ids.get(entry_id, 0):
                verdict.retry_duplicates += 1
                _example(verdict, examples, f"session {session}: retry wrote {entry_id}")
        for late, claim_offset in lates:
            for entry_id in sorted(late):
                if any(offset >= claim_offset for offset in at.get(entry_id, ())):
                    verdict.late_landed += 1
                    verdict.late_ids.append(entry_id)
                    _example(
                        verdict,
                        examples,
                        f"session {session}: {entry_id} landed past the claim at {claim_offset}",
                    )
    return verdict


@dataclass
class CotenantVerdict:
    appended: int = 0  # entries co-tenants appended (append_as_cotenant returned)
    accepted: int = 0  # merged by a worker's fence, or held by a later attempt's parse
    merged: int = 0
    parsed: int = 0
    void: int = 0  # not accepted: its window ended in a detected takeover, or was killed
    unaccepted: int = 0  # not accepted, and its window's check passed (or was false)
    unplaced: int = 0  # appended while its attempt ended (see windows.py)
    unjudged: int = 0  # unplaced and neither accepted nor void: no fence saw it
    refused: int = 0  # appends refused (a torn tail left by a dying worker)
    errors: int = 0  # appends (co-tenants' or the mirror's) that failed otherwise
    retries: int = 0
    retry_mismatches: int = 0  # a retry that did not return the first append's id
    examples: list[str] = field(default_factory=list)


def judge_cotenants(
    events: Iterable[Mapping[str, Any]],
    windows: Mapping[tuple[int, str], str],
    merged: Mapping[int, set[str]],
    parsed: Mapping[int, set[str]],
    examples: int = 5,
) -> CotenantVerdict:
    """Every co-tenant append must be *accepted*: its entry handed to a worker's merge
    callback by the fence (``merged``), or read by a later attempt's parse of the file
    (``parsed``: it landed between attempts). One that was neither is *void* when its
    window ended in a detected takeover or supersession, or its attempt was killed (nobody
    was left to accept it), and *unaccepted* (a failure) when its window's check passed."""
    verdict = CotenantVerdict()
    for e in events:
        s = int(e["session"])
        error = e.get("error")
        if error:
            if str(error).startswith("TornTranscriptError"):
                verdict.refused += 1
            else:
                verdict.errors += 1
                if len(verdict.examples) < examples:
                    verdict.examples.append(f"session {s}: {error}")
        retry = e.get("retry")
        if retry:
            verdict.retries += 1
            if retry.get("returned") != retry.get("id"):
                verdict.retry_mismatches += 1
                if len(verdict.examples) < examples:
                    verdict.examples.append(f"session {s}: retry {retry}")
        placed = e.get("placed", True)
        verdict.unplaced += not placed
        for entry_id in e.get("added") or ():
            verdict.appended += 1
            if entry_id in merged.get(s, ()):
                verdict.accepted += 1
                verdict.merged += 1
                continue
            if entry_id in parsed.get(s, ()):
                verdict.accepted += 1
                verdict.parsed += 1
                continue
            status = windows.get((s, str(entry_id)))
            if status in ("void-detected", "void-killed"):
                verdict.void += 1
            elif status is None and not placed:
                verdict.unjudged += 1
            else:
                verdict.unaccepted += 1
                if len(verdict.examples) < examples:
                    verdict.examples.append(f"session {s}: {entry_id} not accepted ({status})")
    return verdict


def _example(verdict: LineVerdict, limit: int, text: str) -> None:
    if len(verdict.examples) < limit:
        verdict.examples.append(text)
