"""The fleet oracle on synthetic logs: every way a run can go wrong turns the verdict to FAIL.

Each test writes the logs a run would leave (worker, chaos, mirror, supervisor) and the final
transcripts, then builds the report exactly as ``sessionfence fleet`` does.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from sessionfence.fleet.config import FleetConfig
from sessionfence.fleet.oracle import count_overlaps, judge_takeovers, verify_lines
from sessionfence.fleet.report import build_report, failures, percentile
from sessionfence.fleet.supervisor import RunResult
from sessionfence.fleet.transcripts import (
    checked_text,
    cotenant_entry,
    message_line,
    owned_message,
)

HEADER = b'{"type":"session","version":3,"id":"h","timestamp":"t","cwd":"/"}\n'


class Run:
    """A synthetic run directory: one transcript per session, logs, then a report."""

    def __init__(self, root: Path, sessions: int = 1) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir()
        self.paths = []
        for s in range(sessions):
            path = root / f"session-{s}.jsonl"
            path.write_bytes(HEADER)
            self.paths.append(str(path))
        self.exitcodes: dict[str, int | None] = {"chaos": 0, "mirror": 0}

    def log(self, name: str, **record: Any) -> None:
        with open(self.logs / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def owned(self, session: int, entry_id: str, attempt: int = 1, ack: bool = True) -> bytes:
        """Append a worker line to the transcript and (by default) acknowledge it."""
        line = message_line(entry_id, None, owned_message(random.Random(entry_id), "t"))
        with open(self.paths[session], "ab") as f:
            f.write(line)
        if ack:
            self.log("worker-000-0001.jsonl", t="ack", s=session, a=attempt, id=entry_id)
        return line

    def turn(self, session: int, attempt: int, window: int, gen: int) -> None:
        self.log(
            "worker-000-0001.jsonl",
            t="turn",
            s=session,
            a=attempt,
            w=window,
            gen=gen,
            n=1,
            append=0.001,
            release=0.001,
            wait=0.0001,
            reacquire=0.0002,
            fence=0.0001,
            turn=0.002,
        )

    def event(self, kind: str, takeover: bool, attempt: int, window: int, gen: int) -> None:
        self.log(
            "chaos.jsonl",
            source="chaos",
            kind=kind,
            takeover=takeover,
            content_changing=takeover,
            session=0,
            attempt=attempt,
            window=window,
            gen=gen,
        )

    def detect(self, attempt: int, window: int, gen: int, reason: str = "rewritten") -> None:
        self.log(
            "worker-000-0001.jsonl",
            t="detect",
            s=0,
            a=attempt,
            w=window,
            gen=gen,
            reason=reason,
            phase="prompt_reacquire",
        )

    def death(self, attempt: int, exitcode: int = -9) -> None:
        self.log("supervisor.jsonl", t="death", attempt=attempt, session=0, exitcode=exitcode)

    def report(self) -> dict[str, Any]:
        result = RunResult(
            run_dir=str(self.root),
            session_dir=str(self.root),
            log_dir=str(self.logs),
            paths=self.paths,
            setup_seconds=0.0,
            elapsed=1.0,
            padding_end=len(HEADER),
            foreign_exitcodes=self.exitcodes,
        )
        return build_report(FleetConfig(sessions=len(self.paths)), result)


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run(tmp_path)


def test_a_clean_run_passes_and_reports_every_figure(run: Run) -> None:
    run.owned(0, "0a000001")
    run.turn(0, 1, 1, gen=2)
    mirror = {"kind": "mirror", "takeover": False, "session": 0, "attempt": 1, "window": 1}
    run.log("mirror.jsonl", source="mirror", gen=1, **mirror)
    run.event("foreign-append", True, attempt=1, window=2, gen=3)
    run.detect(attempt=1, window=2, gen=4, reason="foreign-append")
    report = run.report()
    assert report["ok"], report["failures"]
    assert report["takeovers"]["injected"] == report["takeovers"]["detected"] == 1
    assert report["takeovers"]["reasons"] == {"foreign-append": {"foreign-append": 1}}
    assert report["benign"] == {"events": 1, "accepted": 1}
    assert report["lines"]["acknowledged"] == 1
    assert report["latency"]["lock_wait"]["p50_ms"] == pytest.approx(0.1)


def test_a_missed_takeover_fails(run: Run) -> None:
    run.event("rewrite-middle", True, attempt=1, window=1, gen=1)
    run.turn(0, 1, 1, gen=2)  # the window's check passed: the edit went unseen
    report = run.report()
    assert not report["ok"]
    assert report["takeovers"]["missed"] == 1
    assert report["takeovers"]["missed_examples"][0]["kind"] == "rewrite-middle"
    assert "1 injected takeovers missed" in report["failures"]


def test_a_takeover_in_a_window_with_only_benign_events_is_false(run: Run) -> None:
    run.event("touch", False, attempt=1, window=1, gen=1)
    run.detect(attempt=1, window=1, gen=2)
    report = run.report()
    assert report["takeovers"]["false"] == 1
    assert report["benign"]["accepted"] == 0
    assert not report["ok"]


def test_a_takeover_in_a_quiet_window_is_false(run: Run) -> None:
    run.detect(attempt=1, window=3, gen=7)
    assert run.report()["takeovers"]["false"] == 1


def test_a_detection_before_the_event_does_not_count_as_detecting_it(run: Run) -> None:
    # The check took the lock (gen 2) before chaos did (gen 3): that detection was caused
    # by something else, and the event came after the window was judged.
    run.event("truncate", True, attempt=1, window=1, gen=3)
    run.detect(attempt=1, window=1, gen=2)
    report = run.report()
    assert report["takeovers"]["false"] == 1
    assert report["takeovers"]["late"] == 1
    assert report["takeovers"]["detected"] == 0


def test_an_event_after_a_passed_check_is_an_ordering_anomaly(run: Run) -> None:
    run.turn(0, 1, 1, gen=2)
    run.event("foreign-append", True, attempt=1, window=1, gen=5)
    report = run.report()
    assert report["takeovers"]["ordering_anomalies"] == 1
    assert not report["ok"]


def test_events_of_a_killed_attempt_are_void_not_missed(run: Run) -> None:
    run.event("truncate", True, attempt=1, window=2, gen=4)
    run.event("touch", False, attempt=1, window=1, gen=2)
    run.detect(attempt=1, window=1, gen=3)  # written just before the kill: void as well
    run.death(attempt=1)
    report = run.report()
    assert report["ok"], report["failures"]
    assert report["takeovers"]["void"] == 2
    assert report["takeovers"]["missed"] == report["takeovers"]["false"] == 0
    assert report["workers"]["killed"] == 1


def test_a_lost_acknowledged_line_fails(run: Run) -> None:
    run.owned(0, "0a000001")
    run.log("worker-000-0001.jsonl", t="ack", s=0, a=1, id="0b000002")  # never in the file
    report = run.report()
    assert report["lines"]["lost"] == 1
    assert not report["ok"]


def test_a_line_chaos_logged_as_removed_is_not_lost(run: Run) -> None:
    run.log("worker-000-0001.jsonl", t="ack", s=0, a=1, id="0b000002")
    truncate = {"kind": "truncate", "takeover": True, "session": 0, "attempt": 1, "window": 1}
    run.log("chaos.jsonl", source="chaos", gen=3, removed=["0b000002"], **truncate)
    run.detect(attempt=1, window=1, gen=4, reason="truncated")
    report = run.report()
    assert report["ok"], report["failures"]
    assert report["lines"]["removed_by_chaos"] == 1


def test_a_duplicated_line_fails(run: Run) -> None:
    line = run.owned(0, "0a000001")
    with open(run.paths[0], "ab") as f:
        f.write(line)
    assert run.report()["lines"]["duplicated"] == 1


def test_a_damaged_line_fails(run: Run) -> None:
    run.owned(0, "0a000001")
    data = Path(run.paths[0]).read_bytes()
    text, _ = checked_text(random.Random("0a000001"), "t")
    assert text.encode() in data
    pos = data.index(text.encode()) + 3
    flipped = data[:pos] + (b"x" if data[pos : pos + 1] != b"x" else b"y") + data[pos + 1 :]
    Path(run.paths[0]).write_bytes(flipped)
    report = run.report()
    assert report["lines"]["damaged"] == 1
    assert not report["ok"]


def test_a_torn_last_line_fails(run: Run) -> None:
    run.owned(0, "0a000001")
    with open(run.paths[0], "ab") as f:
        f.write(b'{"type":"message","id":"0c0000')
    report = run.report()
    assert report["lines"]["torn"] == 1
    assert report["lines"]["lost"] == 0
    assert not report["ok"]


def test_a_torn_tail_the_next_attempt_missed_fails(run: Run) -> None:
    run.log("worker-000-0001.jsonl", t="torn-inject", s=0, a=1, offset=100, bytes=10)
    run.death(attempt=1)
    report = run.report()
    assert report["workers"]["torn_tails"]["undetected"] == 1
    assert not report["ok"]
    run.log("worker-000-0002.jsonl", t="torn", s=0, a=2, offset=100, length=10, repaired=True)
    report = run.report()
    assert report["workers"]["torn_tails"] == {
        "injected": 1,
        "detected": 1,
        "repaired": 1,
        "undetected": 0,
        "quarantined": 0,
    }
    assert report["failures"] == ["1 torn tails repaired without a quarantine copy"]
    Path(run.paths[0] + ".torn-20260101T000000.000Z").write_bytes(b"{")
    report = run.report()
    assert report["ok"], report["failures"]


def test_a_dead_chaos_process_fails_the_run(run: Run) -> None:
    run.exitcodes = {"chaos": 1, "mirror": 0}
    report = run.report()
    assert any("foreign writer" in f for f in report["failures"])


def test_a_crashed_worker_and_an_attempt_error_fail(run: Run) -> None:
    run.death(attempt=1, exitcode=1)
    run.log("worker-000-0001.jsonl", t="error", s=0, a=2, error="boom")
    report = run.report()
    assert report["workers"]["crashed"] == 1
    assert len(report["errors"]) == report["error_count"] == 2
    assert not report["ok"]


def test_a_torn_log_record_is_not_an_acknowledgement(run: Run) -> None:
    with open(run.logs / "worker-000-0001.jsonl", "a") as f:
        f.write('{"t":"ack","s":0,"a":1,"id":"0d00')
    assert run.report()["lines"]["acknowledged"] == 0


def test_judge_takeovers_counts_each_kind() -> None:
    events = [
        {"kind": "truncate", "takeover": True, "session": 0, "attempt": 1, "window": 1, "gen": 1},
        {"kind": "chmod", "takeover": False, "session": 0, "attempt": 2, "window": 1, "gen": 3},
    ]
    detections = [{"s": 0, "a": 1, "w": 1, "gen": 2, "reason": "truncated"}]
    verdict = judge_takeovers(events, detections, set())
    assert verdict.by_kind == {
        "truncate": {"injected": 1, "detected": 1},
        "chmod": {"benign": 1, "accepted": 1},
    }


def test_verify_lines_checks_the_padding_for_shape_only_below_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    pad = b'{"type":"message","id":"00000001","parentId":null,"junk":\n'  # not JSON
    path.write_bytes(HEADER + pad)
    assert verify_lines({0: str(path)}, {}).torn == 1
    shaped = verify_lines({0: str(path)}, {}, shape_only_below=os.path.getsize(path))
    assert shaped.torn == 0
    assert shaped.lines == 2


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([5.0], 99) == 5.0


def test_failures_lists_nothing_for_a_clean_report(run: Run) -> None:
    assert failures(run.report()) == []


def test_a_line_chaos_altered_must_still_be_there_once(run: Run) -> None:
    run.owned(0, "0a000001")
    data = Path(run.paths[0]).read_bytes()
    text, _ = checked_text(random.Random("0a000001"), "t")
    pos = data.index(text.encode()) + 3
    flipped = data[:pos] + (b"x" if data[pos : pos + 1] != b"x" else b"y") + data[pos + 1 :]
    Path(run.paths[0]).write_bytes(flipped)
    rewrite = {"kind": "rewrite-tail", "takeover": True, "session": 0, "attempt": 1, "window": 1}
    run.log("chaos.jsonl", source="chaos", gen=3, altered=["0a000001"], **rewrite)
    run.detect(attempt=1, window=1, gen=4)
    report = run.report()
    assert report["ok"], report["failures"]
    assert report["lines"]["altered_by_chaos"] == 1
    with open(run.paths[0], "ab") as f:  # ... but not twice
        f.write(flipped[len(HEADER) :])
    assert run.report()["lines"]["duplicated"] == 1


def test_mirror_and_chaos_lines_must_survive(run: Run) -> None:
    mirror = {"kind": "mirror", "takeover": False, "session": 0, "attempt": 1, "window": 1}
    run.owned(0, "9a000001", ack=False)  # the mirror's line is in the file
    run.log("mirror.jsonl", source="mirror", gen=1, added=["9a000001"], **mirror)
    report = run.report()
    assert report["ok"], report["failures"]
    assert report["lines"]["foreign"] == 1
    run.log("mirror.jsonl", source="mirror", gen=2, added=["9b000002"], **{**mirror, "window": 2})
    report = run.report()
    assert report["lines"]["foreign_lost"] == 1
    assert "1 mirror or chaos lines lost" in report["failures"]
    # Unless chaos truncated it away, as it logged.
    truncate = {"kind": "truncate", "takeover": True, "session": 0, "attempt": 1, "window": 3}
    run.log("chaos.jsonl", source="chaos", gen=5, removed=["9b000002"], **truncate)
    run.detect(attempt=1, window=3, gen=6, reason="truncated")
    assert run.report()["ok"]


def test_overlapping_lock_holds_are_counted_per_session() -> None:
    holds = [(0, 0.0, 2.0), (0, 2.0, 3.0), (1, 0.5, 5.0), (0, 2.5, 4.0), (1, 5.0, 6.0)]
    assert count_overlaps(holds) == 1  # session 0: [2, 3] and [2.5, 4]
    assert count_overlaps([(0, 0.0, 10.0), (0, 1.0, 2.0), (0, 3.0, 4.0)]) == 2
    assert count_overlaps([]) == 0


def test_two_holders_at_once_fail_the_run(run: Run) -> None:
    run.log("worker-000-0001.jsonl", t="hold", s=0, a=1, gen=1, start=1.0, end=2.0)
    assert run.report()["locks"] == {"holds_logged": 1, "overlapping_holds": 0}
    mirror = {"kind": "mirror", "takeover": False, "session": 0, "attempt": 1, "window": 1}
    run.log("mirror.jsonl", source="mirror", gen=2, hold=[1.5, 1.6], **mirror)
    report = run.report()
    assert report["locks"]["overlapping_holds"] == 1
    assert "1 overlapping holds of a session write lock" in report["failures"]


# -- issue 13: co-tenant appends and supersession ------------------------------------------


def _cotenant(
    run: Run,
    entry_id: str,
    attempt: int = 1,
    window: int = 1,
    *,
    copies: int = 1,
    placed: bool = True,
    retry: dict[str, Any] | None = None,
) -> None:
    """A co-tenant append: ``copies`` of its line in the transcript, and its log record."""
    entry = cotenant_entry(random.Random(entry_id), "cotenant-1", entry_id)
    line = (json.dumps({**entry, "parentId": None, "timestamp": "t"}) + "\n").encode()
    with open(run.paths[0], "ab") as f:
        f.write(line * copies)
    record: dict[str, Any] = {
        "takeover": False,
        "content_changing": True,
        "added": [entry_id],
        "keys": [f"k-{entry_id}"],
        "session": 0,
        "attempt": attempt,
        "window": window,
        "pre_window": window,
        "placed": placed,
        "kind": "cotenant",
        "source": "cotenant-1",
    }
    if retry is not None:
        record["retry"] = retry
    run.log("cotenant-1.jsonl", **record)


def _merged(run: Run, entry_id: str, attempt: int = 1, window: int = 1) -> None:
    run.log("worker-000-0001.jsonl", t="merged", s=0, a=attempt, w=window, ids=[entry_id])


def _supersede(run: Run, attempt: int = 1, window: int = 1, gen: int = 2) -> int:
    """A claim in the window, at the transcript's current end; returns that offset."""
    offset = os.path.getsize(run.paths[0])
    run.log(
        "supersede.jsonl",
        kind="supersede",
        takeover=True,
        content_changing=False,
        run_id=f"supersede-s0-{attempt}",
        revision=2,
        claim_offset=offset,
        source="supersede",
        session=0,
        attempt=attempt,
        window=window,
        gen=gen,
    )
    return offset


def test_a_cotenant_append_merged_by_the_fence_is_accepted(run: Run) -> None:
    run.owned(0, "00000001")
    _cotenant(run, "a0000001")
    _merged(run, "a0000001")
    run.turn(0, 1, 1, gen=3)
    report = run.report()
    assert report["ok"], report["failures"]
    ct = report["cotenant"]
    assert (ct["appended"], ct["accepted"], ct["merged"], ct["unaccepted"]) == (1, 1, 1, 0)
    assert report["takeovers"]["false"] == 0


def test_a_cotenant_append_the_next_parse_held_is_accepted(run: Run) -> None:
    _cotenant(run, "a0000002")
    run.detect(1, 1, gen=3, reason="superseded")  # a false takeover, counted as such
    run.log("worker-000-0001.jsonl", t="parsed", s=0, a=2, w=0, how="open", ids=["a0000002"])
    report = run.report()
    assert report["cotenant"]["parsed"] == 1 and report["cotenant"]["unaccepted"] == 0
    assert report["takeovers"]["false"] == 1  # nothing injected explains that detection


def test_a_cotenant_append_not_merged_in_a_passed_window_fails(run: Run) -> None:
    _cotenant(run, "a0000003")
    run.turn(0, 1, 1, gen=3)
    report = run.report()
    assert report["cotenant"]["unaccepted"] == 1
    assert not report["ok"]
    assert any("co-tenant appends not accepted" in f for f in report["failures"])


def test_a_cotenant_append_in_a_detected_takeover_window_is_void(run: Run) -> None:
    _cotenant(run, "a0000004")
    run.event("foreign-append", True, attempt=1, window=1, gen=2)
    run.detect(1, 1, gen=3, reason="foreign-append")
    report = run.report()
    assert report["ok"], report["failures"]
    assert report["cotenant"]["void"] == 1 and report["cotenant"]["accepted"] == 0


def test_a_cotenant_append_of_a_killed_attempt_is_void(run: Run) -> None:
    _cotenant(run, "a0000005", placed=False)
    run.death(1)
    report = run.report()
    assert report["ok"], report["failures"]
    assert report["cotenant"]["void"] == 1


def test_an_unplaced_cotenant_append_nobody_saw_is_unjudged_not_failed(run: Run) -> None:
    _cotenant(run, "a0000006", placed=False)
    report = run.report()
    assert report["ok"], report["failures"]
    assert report["cotenant"]["unjudged"] == 1 and report["takeovers"]["unplaced"] == 1


def test_a_detection_with_only_cotenant_appends_in_its_window_is_false(run: Run) -> None:
    _cotenant(run, "a0000007")
    _merged(run, "a0000007")
    run.detect(1, 1, gen=3, reason="foreign-append")
    report = run.report()
    assert report["takeovers"]["false"] == 1
    assert any("false takeovers" in f for f in report["failures"])


@pytest.mark.parametrize("copies", [0, 2])
def test_a_cotenant_line_lost_or_duplicated_fails(run: Run, copies: int) -> None:
    _cotenant(run, "a0000008", copies=copies)
    _merged(run, "a0000008")
    run.turn(0, 1, 1, gen=3)
    report = run.report()
    ct = report["cotenant"]
    assert (ct["lost"], ct["duplicated"]) == ((1, 0) if copies == 0 else (0, 1))
    what = "lost" if copies == 0 else "duplicated"
    assert f"1 co-tenant lines {what}" in report["failures"]


def test_a_damaged_cotenant_line_fails(run: Run) -> None:
    _cotenant(run, "a0000009")
    _merged(run, "a0000009")
    path = Path(run.paths[0])
    path.write_bytes(path.read_bytes().replace(b"inbound", b"Inbound"))
    report = run.report()
    assert report["cotenant"]["damaged"] == 1 and not report["ok"]


def test_an_idempotent_retry_must_return_the_first_id_and_write_nothing(run: Run) -> None:
    good = {"key": "k", "id": "a000000a", "proposed": "b000000a", "returned": "a000000a"}
    _cotenant(run, "a000000a", retry=good)
    _merged(run, "a000000a")
    run.turn(0, 1, 1, gen=3)
    report = run.report()
    assert report["ok"], report["failures"]
    assert report["cotenant"]["idempotent_retries"] == 1
    # A retry that appended again: another id returned, and its line in the file.
    bad = {"key": "k2", "id": "a000000b", "proposed": "b000000b", "returned": "b000000b"}
    _cotenant(run, "a000000b", retry=bad, window=2)
    _merged(run, "a000000b", window=2)
    _cotenant(run, "b000000b", window=2)
    run.turn(0, 1, 2, gen=5)
    report = run.report()
    ct = report["cotenant"]
    assert (ct["retry_mismatches"], ct["retry_duplicates"]) == (1, 1)
    assert not report["ok"]


def test_a_detected_supersession_with_its_late_write_refused_passes(run: Run) -> None:
    run.owned(0, "00000001")
    _supersede(run)
    run.detect(1, 1, gen=3, reason="superseded")
    run.log("worker-000-0001.jsonl", t="late-refused", s=0, a=1, w=1, by="supersede-s0-1")
    report = run.report()
    assert report["ok"], report["failures"]
    sp = report["supersede"]
    assert (sp["injected"], sp["detected"], sp["missed"]) == (1, 1, 0)
    assert (sp["late_writes_refused"], sp["late_writes_landed"]) == (1, 0)
    assert report["takeovers"]["false"] == 0 and report["takeovers"]["injected"] == 0


@pytest.mark.parametrize("check", ["passed", "other-reason"])
def test_a_supersession_not_detected_fails(run: Run, check: str) -> None:
    _supersede(run)
    if check == "passed":
        run.turn(0, 1, 1, gen=3)
    else:
        run.detect(1, 1, gen=3, reason="lock-lost")
    report = run.report()
    assert report["supersede"]["missed"] == 1
    assert "1 supersessions not detected (reason superseded)" in report["failures"]


def test_a_late_write_past_the_claim_is_flagged(run: Run) -> None:
    run.owned(0, "00000001")  # before the claim: fine
    _supersede(run)
    run.detect(1, 1, gen=3, reason="superseded")
    run.owned(0, "00000002")  # the superseded attempt's line after the claim
    run.log("worker-000-0001.jsonl", t="late-landed", s=0, a=1, w=1, id="00000002")
    report = run.report()
    sp = report["supersede"]
    assert sp["late_writes_landed"] == 1
    assert "1 late writes of superseded attempts landed" in report["failures"]
    # Another attempt's line past the claim is no late write.
    run.owned(0, "00000003", attempt=2)
    assert run.report()["supersede"]["late_writes_landed"] == 1


def test_a_late_write_refused_the_wrong_way_fails(run: Run) -> None:
    _supersede(run)
    run.detect(1, 1, gen=3, reason="superseded")
    run.log("worker-000-0001.jsonl", t="late-error", s=0, a=1, w=1, error="JournalError: x")
    report = run.report()
    assert report["supersede"]["late_write_errors"] == 1 and not report["ok"]
