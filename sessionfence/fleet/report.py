"""The fleet report: figures from the logs, the oracle's verdicts, pass or fail, rendering."""

from __future__ import annotations

import glob
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, TextIO

from .config import FleetConfig
from .oracle import (
    CotenantVerdict,
    Facts,
    LineVerdict,
    TakeoverVerdict,
    TornVerdict,
    collect_facts,
    count_overlaps,
    judge_cotenants,
    judge_takeovers,
    judge_torn_tails,
    verify_lines,
)
from .supervisor import Progress, RunResult

__all__ = [
    "ProgressDisplay",
    "build_report",
    "failures",
    "percentile",
    "render_text",
    "summarize",
]

# Transcripts larger than this have their generated padding checked for shape only (a full
# JSON parse of gigabytes the workers never touched would dominate the run).
_SHAPE_ONLY_ABOVE = 64 * 1024 * 1024


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(values: Iterable[float]) -> dict[str, Any]:
    """p50 / p99 / max in milliseconds, and the count."""
    data = [v * 1000 for v in values]
    return {
        "count": len(data),
        "p50_ms": _round(percentile(data, 50)),
        "p99_ms": _round(percentile(data, 99)),
        "max_ms": _round(max(data) if data else None),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def failures(report: Mapping[str, Any]) -> list[str]:
    """Why the run fails (empty when it passes): the exit status rule (docs/fleet.md,
    "When a run fails"). An interrupted run is judged on what ran; it never passes (see
    ``_assemble``)."""
    out = []
    lines = report["lines"]
    takeovers = report["takeovers"]
    torn = report["workers"]["torn_tails"]
    checks = [
        (lines["lost"], "acknowledged lines lost"),
        (lines["duplicated"], "acknowledged lines duplicated"),
        (lines["damaged"], "acknowledged lines damaged"),
        (lines["torn"], "torn or unparseable lines in the final transcripts"),
        (takeovers["missed"], "injected takeovers missed"),
        (takeovers["false"], "false takeovers"),
        (takeovers["ordering_anomalies"], "foreign events after a passed fence check"),
        (torn["undetected"], "torn tails not detected by the next attempt"),
        (
            max(0, torn["repaired"] - torn["quarantined"]),
            "torn tails repaired without a quarantine copy",
        ),
        (report["locks"]["overlapping_holds"], "overlapping holds of a session write lock"),
        (lines["foreign_lost"], "mirror or chaos lines lost"),
        (lines["foreign_duplicated"], "mirror or chaos lines duplicated"),
        (report["workers"]["crashed"], "workers crashed"),
        (report["error_count"], "attempts ended in an error"),
        (
            sum(1 for code in report["foreign_exitcodes"].values() if code != 0),
            "foreign writer processes (chaos, mirror, co-tenants, supersession) died",
        ),
    ]
    cotenant = report.get("cotenant")
    if cotenant is not None:
        checks += [
            (cotenant["unaccepted"], "co-tenant appends not accepted by the claimant's fence"),
            (cotenant["lost"], "co-tenant lines lost"),
            (cotenant["duplicated"], "co-tenant lines duplicated"),
            (cotenant["damaged"], "co-tenant lines damaged"),
            (cotenant["errors"], "co-tenant or mirror appends failed"),
            (
                cotenant["retry_mismatches"],
                "idempotent retries that did not return the first append's id",
            ),
            (cotenant["retry_duplicates"], "idempotent retries that wrote a line"),
        ]
    supersede = report.get("supersede")
    if supersede is not None:
        checks += [
            (supersede["missed"], "supersessions not detected (reason superseded)"),
            (supersede["late_writes_landed"], "late writes of superseded attempts landed"),
            (
                supersede["late_write_errors"],
                "late writes not refused with SessionSupersededError",
            ),
        ]
    for count, what in checks:
        if count:
            out.append(f"{count} {what}")
    return out


def build_report(cfg: FleetConfig, result: RunResult) -> dict[str, Any]:
    facts = collect_facts(result.log_dir)
    takeovers = judge_takeovers(
        [*facts.events, *facts.cotenant_events],
        facts.detections,
        facts.dead_attempts,
        facts.turns,
    )
    torn = judge_torn_tails(facts.torn_injected, facts.torn_found)
    shape_only = result.padding_end if result.padding_end > _SHAPE_ONLY_ABOVE else 0
    cotenant_lines: dict[int, set[str]] = {}
    retry_ids: dict[int, set[str]] = {}
    for e in facts.cotenant_events:
        s = int(e["session"])
        cotenant_lines.setdefault(s, set()).update(e.get("added") or ())
        retry = e.get("retry")
        if retry and retry.get("proposed"):
            retry_ids.setdefault(s, set()).add(str(retry["proposed"]))
    # A supersession's attempt: none of its lines may lie past the claim.
    late_after: dict[int, list[tuple[set[str], int]]] = {}
    for e in facts.events:
        if e.get("kind") == "supersede" and e.get("claim_offset") is not None:
            s, a = int(e["session"]), int(e["attempt"])
            late = set(facts.acks_by_attempt.get((s, a), ()))
            late_after.setdefault(s, []).append((late, int(e["claim_offset"])))
    lines = verify_lines(
        dict(enumerate(result.paths)),
        facts.acks,
        facts.ids_by_session("removed"),
        facts.ids_by_session("altered"),
        facts.ids_by_session("added"),
        cotenant=cotenant_lines,
        absent=retry_ids,
        late_after=late_after,
        shape_only_below=shape_only,
    )
    cotenants = judge_cotenants(
        facts.cotenant_events, takeovers.cotenant_windows, facts.merged, facts.parsed
    )
    torn.quarantined = sum(len(glob.glob(glob.escape(p) + ".torn-*")) for p in result.paths)
    return _assemble(cfg, result, facts, takeovers, torn, lines, cotenants)


def _assemble(
    cfg: FleetConfig,
    result: RunResult,
    facts: Facts,
    takeovers: TakeoverVerdict,
    torn: TornVerdict,
    lines: LineVerdict,
    cotenants: CotenantVerdict | None = None,
) -> dict[str, Any]:
    turns = facts.turns
    if cotenants is None:
        cotenants = CotenantVerdict()
    report: dict[str, Any] = {
        "config": {
            "workers": cfg.workers,
            "sessions": cfg.sessions,
            "turns": cfg.turns,
            "attempts_per_session": cfg.attempts,
            "transcript_mb": cfg.transcript_mb,
            "chaos": cfg.chaos,
            "mirror": cfg.mirror,
            "cotenants": cfg.cotenants,
            "cotenant_rate": cfg.cotenant_rate,
            "supersede": cfg.supersede,
            "seed": cfg.seed,
            "verify": cfg.verify_mode,
            "backend": _backend_name(),
            "chaos_kinds": list(cfg.chaos_kinds) if cfg.chaos_kinds else "all",
        },
        "run": {
            "setup_s": round(result.setup_seconds, 3),
            "elapsed_s": round(result.elapsed, 3),
            "turns": len(turns),
            "turns_per_s": round(len(turns) / result.elapsed, 1) if result.elapsed > 0 else None,
            # One worker's pace while in its turns (model think time included, attempt setup
            # not): what a transcript's size must not change.
            "turns_per_worker_s": (
                round(len(turns) / facts.loop_seconds, 1) if facts.loop_seconds > 0 else None
            ),
            "attempt_open_total_s": round(sum(s["open"] for s in facts.setups), 3),
            # Every released window ends in a check: a passed one (a turn) or a detection.
            "released_windows": len(turns) + len(facts.detections),
            "attempts_planned": cfg.sessions * cfg.attempts,
            "attempts": dict(sorted(result.outcomes.items())),
            "transcript_bytes_at_start": result.padding_end,
        },
        "latency": {
            "lock_wait": summarize(t["wait"] for t in turns),
            "fence_check": summarize(t["fence"] for t in turns),
            "turn": summarize(t["turn"] for t in turns),
            "append": summarize(t["append"] for t in turns),
            "release": summarize(t["release"] for t in turns),
            "publish": summarize(t["publish"] for t in turns if t.get("publish")),
            "attempt_open": summarize(s["open"] for s in facts.setups),
            "attempt_create": summarize(s["create"] for s in facts.setups),
        },
        "takeovers": {
            "injected": takeovers.injected,
            "detected": takeovers.detected,
            "missed": takeovers.missed,
            "false": takeovers.false_takeovers,
            "void": takeovers.void_events,
            "late": takeovers.late_events,
            "ordering_anomalies": takeovers.ordering_anomalies,
            "unseen": takeovers.unseen_events,
            "unseen_detected_later": takeovers.unseen_detected_later,
            "unplaced": takeovers.unplaced_events,
            "by_kind": dict(sorted(takeovers.by_kind.items())),
            "reasons": dict(sorted(takeovers.reasons.items())),
            "missed_examples": takeovers.missed_examples,
            "false_examples": takeovers.false_examples,
        },
        "benign": {"events": takeovers.benign_events, "accepted": takeovers.benign_accepted},
        "cotenant": {
            "appended": cotenants.appended,
            "accepted": cotenants.accepted,
            "merged": cotenants.merged,
            "parsed": cotenants.parsed,
            "void": cotenants.void,
            "unaccepted": cotenants.unaccepted,
            "unplaced": cotenants.unplaced,
            "unjudged": cotenants.unjudged,
            "refused": cotenants.refused,
            "errors": cotenants.errors,
            "idempotent_retries": cotenants.retries,
            "retry_mismatches": cotenants.retry_mismatches,
            "retry_duplicates": lines.retry_duplicates,
            "lost": lines.cotenant_lost,
            "duplicated": lines.cotenant_duplicated,
            "damaged": lines.cotenant_damaged,
            "examples": cotenants.examples,
        },
        "supersede": {
            "injected": takeovers.supersede_injected,
            "detected": takeovers.supersede_detected,
            "missed": takeovers.supersede_missed,
            "void": takeovers.supersede_void,
            "late": takeovers.supersede_late,
            "late_writes_refused": len(facts.late_refused),
            "late_write_errors": len(facts.late_errors),
            "late_writes_landed": len(
                set(lines.late_ids) | {str(r.get("id")) for r in facts.late_landed}
            ),
            "missed_examples": takeovers.supersede_missed_examples,
        },
        "workers": {
            "killed": facts.killed_workers,
            "crashed": facts.crashed_workers,
            "respawned": result.respawns,
            "peak_memory_mb": facts.worker_peak_mb,
            "transcripts_kept_between_attempts": facts.transcripts_kept,
            "killed_in_phase": dict(sorted(facts.kill_phases.items())),
            "killed_mid_line": len(facts.torn_injected),
            "torn_tails": asdict(torn),
        },
        "locks": {
            "holds_logged": len(facts.holds),
            "overlapping_holds": count_overlaps(facts.holds),
        },
        "lines": {
            "acknowledged": lines.acknowledged,
            "lost": lines.lost,
            "duplicated": lines.duplicated,
            "damaged": lines.damaged,
            "torn": lines.torn,
            "removed_by_chaos": lines.removed,
            "altered_by_chaos": lines.altered,
            "foreign": lines.foreign,
            "foreign_lost": lines.foreign_lost,
            "foreign_duplicated": lines.foreign_duplicated,
            "lines_checked": lines.lines,
            "examples": lines.examples,
        },
        "foreign_writers": facts.foreign_stats,
        "foreign_exitcodes": result.foreign_exitcodes,
        "error_count": len(facts.errors),
        "errors": [{k: v for k, v in e.items() if k != "traceback"} for e in facts.errors[:10]],
        "run_dir": result.run_dir,
        "interrupted": result.interrupted,
    }
    report["failures"] = failures(report)
    report["ok"] = not report["failures"] and not result.interrupted
    return report


def _backend_name() -> str:
    import sessionfence

    return str(sessionfence.BACKEND)


def _ms(summary: Mapping[str, Any]) -> str:
    p50, p99 = summary["p50_ms"], summary["p99_ms"]
    if p50 is None:
        return "-"
    return f"p50 {p50:.3f} ms   p99 {p99:.3f} ms"


def render_text(report: Mapping[str, Any], out: TextIO) -> None:
    """The human report: a rich table on a terminal; plain lines anywhere else (a pipe, a
    log), never padded with trailing spaces and never wrapped at a console width."""
    rows = _rows(report)
    if out.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(show_header=False, box=None, pad_edge=False)
            table.add_column(style="bold")
            table.add_column()
            for key, value in rows:
                table.add_row(key, value)
            Console(file=out, highlight=False).print(table)
            return
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}".rstrip(), file=out)


def _rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    cfg = report["config"]
    run = report["run"]
    lat = report["latency"]
    tk = report["takeovers"]
    lines = report["lines"]
    workers = report["workers"]
    torn = workers["torn_tails"]
    attempts = ", ".join(f"{k} {v}" for k, v in run["attempts"].items()) or "-"
    if "attempts_planned" in run:
        attempts += f"  (of {run['attempts_planned']} planned)"
    rows = [
        (
            "fleet",
            f"{cfg['workers']} workers, {cfg['sessions']} sessions x {cfg['attempts_per_session']}"
            f" attempts x {cfg['turns']} turns, {cfg['transcript_mb']} MB transcripts, "
            f"verify={cfg['verify']}, chaos {cfg['chaos']}, seed {cfg['seed']}, "
            f"{cfg['backend']} backend",
        ),
        ("setup", f"{run['setup_s']:.2f} s to write the transcripts"),
        ("attempts", attempts),
        (
            "turns",
            f"{run['turns']} in {run['elapsed_s']:.2f} s = {run['turns_per_s']} turns/s  "
            f"({run['turns_per_worker_s']} turns/s per worker outside attempt setup)",
        ),
        ("lock wait", _ms(lat["lock_wait"])),
        ("fence check", _ms(lat["fence_check"])),
        ("turn (no model)", _ms(lat["turn"])),
        (
            "owned publication",
            _ms(lat["publish"])
            + f"  ({lat['publish']['count']} in released windows, short lock + fence check)",
        ),
        (
            "attempt open",
            _ms(lat["attempt_open"])
            + f"  (parse, once per attempt, {run['attempt_open_total_s']:.2f} s in all)",
        ),
        (
            "takeovers",
            f"injected {tk['injected']}, detected {tk['detected']}, missed {tk['missed']}, "
            f"false {tk['false']}  (void {tk['void']}, late {tk['late']}"
            + (f", unseen by design {tk['unseen']}" if tk.get("unseen") else "")
            + ")",
        ),
        (
            "benign events",
            f"{report['benign']['events']}, accepted {report['benign']['accepted']}",
        ),
        *_ownership_rows(report),
        (
            "workers",
            f"killed {workers['killed']}, crashed {workers['crashed']}, "
            f"respawned {workers['respawned']}, peak memory {workers['peak_memory_mb']:.0f} MB",
        ),
        (
            "kills",
            ", ".join(
                [f"{n} while {p}" for p, n in workers["killed_in_phase"].items()]
                + [f"{workers['killed_mid_line']} half-way through a line"]
            )
            if workers["killed"]
            else "none",
        ),
        (
            "lock holds",
            f"{report['locks']['holds_logged']} logged, "
            f"{report['locks']['overlapping_holds']} overlapping",
        ),
        (
            "torn tails",
            f"injected {torn['injected']}, detected {torn['detected']}, "
            f"repaired {torn['repaired']} (quarantine files {torn['quarantined']})",
        ),
        (
            "lines",
            f"acknowledged {lines['acknowledged']}, lost {lines['lost']}, "
            f"duplicated {lines['duplicated']}, torn {lines['torn']}, damaged "
            f"{lines['damaged']}; by chaos: removed {lines['removed_by_chaos']}, altered "
            f"{lines['altered_by_chaos']}",
        ),
        (
            "foreign lines",
            f"{lines['foreign']} added by the mirror and chaos, lost {lines['foreign_lost']}, "
            f"duplicated {lines['foreign_duplicated']}",
        ),
    ]
    windows = report["run"]["released_windows"]
    for source, stats in sorted(report["foreign_writers"].items()):
        rows.append(
            (
                f"{source} windows",
                f"saw {stats.get('windows_seen', 0)} released windows (workers checked "
                f"{windows} in all), chose "
                f"{stats.get('chosen', 0)}, acted in {stats.get('events', 0)} (lock busy "
                f"{stats.get('lock_busy', 0)}, closed {stats.get('closed', 0)})",
            )
        )
    for kind, row in tk["by_kind"].items():
        parts = ", ".join(f"{k} {v}" for k, v in sorted(row.items()))
        reasons = tk["reasons"].get(kind)
        if reasons:
            parts += "  [" + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) + "]"
        rows.append((f"  {kind}", parts))
    if report.get("interrupted"):
        outcome = "; ".join(report["failures"]) if report["failures"] else None
        verdict = f"INTERRUPTED after {report['run']['elapsed_s']:.2f} s: " + (
            f"FAIL: {outcome}" if outcome else "no failure in what ran"
        )
    else:
        verdict = "PASS" if report["ok"] else "FAIL: " + "; ".join(report["failures"])
    rows.append(("verdict", verdict))
    return rows


def _ownership_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The co-tenant and supersession lines, when the run had any (issue 13)."""
    cfg = report["config"]
    rows = []
    ct = report.get("cotenant")
    if ct is not None and (cfg.get("cotenants") or ct["appended"]):
        rows.append(
            (
                "co-tenants",
                f"appended {ct['appended']}, accepted {ct['accepted']} (merged {ct['merged']}, "
                f"parsed {ct['parsed']}), void {ct['void']}, unaccepted {ct['unaccepted']}  "
                f"(unplaced {ct['unplaced']}, unjudged {ct['unjudged']}, refused "
                f"{ct['refused']}, errors {ct['errors']})",
            )
        )
        rows.append(
            (
                "idempotent retries",
                f"{ct['idempotent_retries']}, other id returned {ct['retry_mismatches']}, "
                f"line written {ct['retry_duplicates']}; co-tenant lines lost {ct['lost']}, "
                f"duplicated {ct['duplicated']}, damaged {ct['damaged']}",
            )
        )
    sp = report.get("supersede")
    if sp is not None and (cfg.get("supersede") or sp["injected"]):
        rows.append(
            (
                "supersessions",
                f"injected {sp['injected']}, detected {sp['detected']}, missed {sp['missed']}  "
                f"(void {sp['void']}, late {sp['late']}); late writes refused "
                f"{sp['late_writes_refused']}, landed {sp['late_writes_landed']}, wrong "
                f"refusal {sp['late_write_errors']}",
            )
        )
    return rows


class ProgressDisplay:
    """Live progress on stderr: a rich bar on a terminal, else a status line every 2 s."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        self._bar: Any = None
        self._task: Any = None
        self._last_line = -math.inf
        self._told_interrupt = False
        if enabled and self._stream.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            except ImportError:
                return
            # Refreshed by hand from the supervisor loop: no refresh thread in a process
            # that forks its workers.
            self._bar = Progress(
                TextColumn("fleet"),
                BarColumn(bar_width=24),
                TextColumn("{task.completed}/{task.total} attempts"),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=Console(file=self._stream),
                auto_refresh=False,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("fleet", total=None, status="")

    def __call__(self, progress: Progress) -> None:
        if not self._enabled:
            return
        rate = progress.turns / progress.elapsed if progress.elapsed > 0 else 0.0
        status = (
            f"{progress.turns} turns ({rate:.0f}/s), {progress.takeovers} takeovers stopped, "
            f"{progress.kills} workers killed"
        )
        if progress.interrupted:  # short: a terminal line has room for little else
            status = f"{progress.turns} turns; interrupted, ending attempts (^C again: abandon)"
        if self._bar is not None:
            self._bar.update(
                self._task,
                total=progress.attempts_planned,
                completed=progress.attempts_done,
                status=status,
            )
            self._bar.refresh()
            return
        tell_interrupt = progress.interrupted and not self._told_interrupt
        if tell_interrupt or progress.elapsed - self._last_line >= 2.0:
            self._told_interrupt = self._told_interrupt or progress.interrupted
            self._last_line = progress.elapsed
            print(
                f"fleet: {progress.attempts_done}/{progress.attempts_planned} attempts, "
                f"{status}, {progress.elapsed:.1f} s",
                file=self._stream,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
