"""``sessionfence fleet`` end to end: real worker processes, real lock, controller, transcripts.

Runs go through a subprocess, as a user runs them, and are judged by the report's own ground
truth; nothing here asserts a timing. Bad input is checked in-process (it fails before any
process starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sessionfence.cli import main

REPORT_KEYS = {
    "config",
    "run",
    "latency",
    "takeovers",
    "benign",
    "workers",
    "locks",
    "lines",
    "foreign_writers",
    "foreign_exitcodes",
    "errors",
    "error_count",
    "run_dir",
    "failures",
    "ok",
}
LATENCY_KEYS = {
    "lock_wait",
    "fence_check",
    "turn",
    "append",
    "release",
    "publish",
    "attempt_open",
    "attempt_create",
}
TAKEOVER_KEYS = {"injected", "detected", "missed", "false", "void", "late", "ordering_anomalies"}
# The monkeypatches below reach the worker processes only through fork (Linux's start method).
forked = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="patches reach workers through fork"
)
LINE_KEYS = {"acknowledged", "lost", "duplicated", "damaged", "torn", "removed_by_chaos"}


def fleet(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    """Run ``sessionfence fleet --json --quiet ARGS``; (exit status, report, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "sessionfence", "fleet", "--json", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env=env,
    )
    assert "Traceback" not in done.stderr, done.stderr
    report: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, report, done.stderr


def assert_clean(report: dict[str, Any]) -> None:
    assert report["ok"], report["failures"]
    assert report["failures"] == []
    takeovers, lines = report["takeovers"], report["lines"]
    assert takeovers["missed"] == takeovers["false"] == takeovers["ordering_anomalies"] == 0
    assert lines["lost"] == lines["duplicated"] == lines["damaged"] == lines["torn"] == 0
    assert report["errors"] == []
    assert report["locks"]["overlapping_holds"] == 0
    assert report["locks"]["holds_logged"] > 0


def test_defaults_pass_with_every_figure_reported(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    code, report, _ = fleet(env=env)
    assert code == 0
    assert set(report) >= REPORT_KEYS
    assert set(report["latency"]) >= LATENCY_KEYS
    assert set(report["takeovers"]) >= TAKEOVER_KEYS
    assert set(report["lines"]) >= LINE_KEYS
    for figure in ("lock_wait", "fence_check", "turn"):
        summary = report["latency"][figure]
        assert summary["count"] == report["run"]["turns"]
        assert 0 <= summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert report["run"]["turns_per_s"] > 0
    assert_clean(report)
    cfg = report["config"]
    assert (cfg["workers"], cfg["sessions"], cfg["turns"], cfg["chaos"]) == (4, 8, 10, 0.0)
    assert cfg["verify"] == "full"
    # No chaos: every attempt runs all its turns, and the mirror's appends are all accepted.
    assert report["run"]["attempts"] == {"completed": 24}
    assert report["run"]["turns"] == 8 * 3 * 10
    assert report["takeovers"]["injected"] == 0
    assert report["benign"]["events"] == report["benign"]["accepted"]
    assert report["lines"]["acknowledged"] >= 240
    assert report["latency"]["publish"]["count"] > 0  # owned writes in released windows
    # The temporary run directory is gone.
    assert report["run_dir"] is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("sessionfence-fleet-")]


def test_chaos_run_detects_every_injected_takeover(tmp_path: Path) -> None:
    code, report, _ = fleet(
        "--workers", "2", "--sessions", "3", "--turns", "6", "--chaos", "0.5", "--seed", "7"
    )
    assert code == 0, report["failures"]
    assert_clean(report)
    takeovers = report["takeovers"]
    assert takeovers["injected"] > 0
    assert takeovers["detected"] == takeovers["injected"]
    assert report["run"]["attempts"].get("takeover", 0) > 0
    # A takeover must not keep the attempt's parsed transcript alive into the next parse.
    assert report["workers"]["transcripts_kept_between_attempts"] == 0
    for kind, row in takeovers["by_kind"].items():
        assert row.get("detected", 0) == row.get("injected", 0), kind


def test_tail_mode_blind_spot_is_reported_as_missed_with_exit_1(tmp_path: Path) -> None:
    # Forcing the one combination tail mode cannot see proves the oracle can fail a run.
    code, report, _ = fleet(
        "--workers", "2", "--sessions", "3", "--turns", "6", "--chaos", "0.5", "--seed", "3",
        "--verify", "tail", "--chaos-kinds", "rewrite-head+append",
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert code == 1
    # A failed run keeps its directory: the logs are the evidence.
    assert report["run_dir"] is not None
    assert (Path(report["run_dir"]) / "logs" / "chaos.jsonl").exists()
    assert report["takeovers"]["missed"] > 0
    assert report["takeovers"]["by_kind"]["rewrite-head+append"]["missed"] > 0
    assert any("missed" in failure for failure in report["failures"])
    assert report["lines"]["lost"] == 0


def test_text_report_and_kept_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "sessionfence", "fleet", "--quiet", "--sessions", "2",
         "--workers", "2", "--turns", "3", "--dir", str(run_dir)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for label in ("turns", "lock wait", "fence check", "takeovers", "lines", "verdict"):
        assert label in done.stdout
    assert "PASS" in done.stdout
    assert f"run directory kept: {run_dir}" in done.stdout
    sessions = sorted(p.name for p in (run_dir / "sessions").iterdir() if p.suffix == ".jsonl")
    assert sessions == ["session-0000.jsonl", "session-0001.jsonl"]
    assert (run_dir / "logs" / "supervisor.jsonl").exists()


def test_progress_line_goes_to_stderr_when_not_a_terminal() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sessionfence", "fleet", "--json", "--sessions", "1",
         "--workers", "1", "--turns", "2", "--attempts", "1"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0
    assert json.loads(done.stdout)["ok"]
    assert "fleet: " in done.stderr and "attempts" in done.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--workers", "-1"], "--workers"),
        (["--workers", "0"], "--workers"),
        (["--sessions", "x"], "--sessions"),
        (["--turns", "-3"], "--turns"),
        (["--attempts", "0"], "--attempts"),
        (["--transcript-mb", "-1"], "--transcript-mb"),
        (["--transcript-mb", "nan"], "--transcript-mb"),
        (["--chaos", "1.5"], "--chaos"),
        (["--chaos", "-0.1"], "--chaos"),
        (["--seed", "-1"], "--seed"),
        (["--verify", "both"], "--verify"),
        (["--chaos-kinds", "fire"], "chaos kinds"),
        (["--cotenants", "-1"], "--cotenants"),
        (["--cotenants", "two"], "--cotenants"),
        (["--cotenant-rate", "2"], "--cotenant-rate"),
        (["--supersede", "1.5"], "--supersede"),
        (["--supersede", "inf"], "--supersede"),
        (["--sessions", "10000", "--transcript-mb", "100000"], "GiB free"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    assert main(["fleet", *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("sessionfence fleet: error: ")
    assert needle in err


def test_dir_must_be_empty_and_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    assert main(["fleet", "--dir", str(tmp_path / "busy")]) == 2
    assert main(["fleet", "--dir", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "not a directory" in err
    assert err.count("\n") == 2


@pytest.mark.slow
@pytest.mark.parametrize("verify", ["full", "tail"])
@pytest.mark.parametrize("seed", ["11", "12", "13"])
def test_long_chaos_run_with_kills(verify: str, seed: str) -> None:
    code, report, _ = fleet(
        "--workers", "8", "--sessions", "24", "--turns", "20", "--attempts", "6",
        "--chaos", "0.3", "--seed", seed, "--transcript-mb", "2", "--verify", verify,
    )  # fmt: skip
    assert code == 0, report["failures"]
    assert_clean(report)
    assert report["takeovers"]["injected"] > 50
    assert report["workers"]["killed"] > 0
    torn = report["workers"]["torn_tails"]
    assert torn["injected"] > 0
    assert torn["detected"] >= torn["injected"]
    assert torn["undetected"] == 0


@forked
def test_workers_that_keep_crashing_abort_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sessionfence.fleet import supervisor

    def broken_worker(*args: object) -> None:
        os._exit(3)

    monkeypatch.setattr(supervisor, "worker_main", broken_worker)
    run_dir = tmp_path / "run"
    # Each crash uses up at most one of the 20 planned attempts: the abort comes first.
    args = ["--quiet", "--sessions", "1", "--attempts", "20", "--dir", str(run_dir)]
    assert main(["fleet", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sessionfence fleet: aborted: workers crashed")
    assert err.count("\n") == 1
    deaths = (run_dir / "logs" / "supervisor.jsonl").read_text().count('"exitcode":3')
    assert deaths > 10


@forked
def test_an_attempt_that_fails_is_reported_not_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sessionfence.fleet import worker

    async def failing_attempt(*args: object) -> str:
        raise OSError(5, "injected I/O error")

    monkeypatch.setattr(worker, "run_attempt", failing_attempt)
    code = main(["fleet", "--quiet", "--json", "--sessions", "2", "--dir", str(tmp_path / "r")])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["run"]["attempts"] == {"error": 6}
    assert "6 attempts ended in an error" in report["failures"]
    assert "injected I/O error" in report["errors"][0]["error"]


@forked
def test_a_run_that_stops_moving_is_aborted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from sessionfence.fleet import supervisor, worker

    async def stuck_attempt(*args: object) -> str:
        await asyncio.Event().wait()  # never set: a worker wedged in its attempt
        return "completed"

    monkeypatch.setattr(worker, "run_attempt", stuck_attempt)
    monkeypatch.setattr(supervisor, "_STALL_SECONDS", 0.5)
    monkeypatch.setattr(supervisor, "_JOIN_TIMEOUT", 0.5)
    args = ["--quiet", "--sessions", "1", "--transcript-mb", "0", "--dir", str(tmp_path / "r")]
    assert main(["fleet", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sessionfence fleet: aborted: no turn and no attempt ended")
