"""``sessionfence fleet`` as a new user meets it: Ctrl-C, output without a terminal, and a
report whose every term is documented.

Ctrl-C is sent as a terminal sends it: SIGINT to the whole foreground process group, so the
supervisor and every child get it at once. The run must stop cleanly: no traceback from any
process, exit status 130, the report of what ran (marked interrupted), and no process left
behind. Synchronisation is on the run's own logs (a worker logged a finished turn), never a
fixed sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLEET_DOC = ROOT / "docs" / "fleet.md"

posix_only = pytest.mark.skipif(
    sys.platform == "win32", reason="process groups and SIGINT are POSIX; Windows has Ctrl-C events"
)


def _group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process in process group ``pgid``, from /proc (Linux)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            members.append((int(entry), fields[0]))
    return members


def _turn_logged(log_dir: Path) -> bool:
    """A worker logged a finished turn: the fleet is past setup and running attempts."""
    if not log_dir.is_dir():
        return False
    for log in log_dir.glob("worker-*.jsonl"):
        try:
            if b'"t":"turn"' in log.read_bytes():
                return True
        except OSError:
            pass
    return False


def _wait_for(condition: Any, proc: subprocess.Popen[bytes], what: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert proc.poll() is None, f"the fleet ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no sign of {what} within {limit:.0f} s"
        time.sleep(0.02)  # a poll interval, not the synchronisation


@pytest.fixture
def interrupted_run(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Start a long fleet in its own session, ^C it once it runs; yield the outcome. The text
    run has chaos (kills, a chaos process); the JSON run has none, so that its attempts run
    all their 200 turns unless interrupted."""
    as_json = request.param == "json"
    run_dir = tmp_path / "run"
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    args = [sys.executable, "-m", "sessionfence", "fleet", "--sessions", "4", "--turns", "200"]
    args += ["--chaos", "0" if as_json else "0.2", "--seed", "5", "--dir", str(run_dir)]
    if as_json:
        args.append("--json")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        # A new session: its own process group, as a shell gives a foreground job.
        proc = subprocess.Popen(args, stdout=out, stderr=err, start_new_session=True)
    try:
        _wait_for(lambda: _turn_logged(run_dir / "logs"), proc, "a finished turn", 120)
        members_running = _group_members(proc.pid) if os.path.isdir("/proc") else []
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on ^C
        status = proc.wait(timeout=60)
        left = _group_members(proc.pid) if os.path.isdir("/proc") else []
        yield {
            "status": status,
            "stdout": out_path.read_text(),
            "stderr": err_path.read_text(),
            "members_running": members_running,
            "left": left,
            "run_dir": run_dir,
            "json": as_json,
        }
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            # Never leave a child behind, whatever the test found.
            for pid, _ in _group_members(proc.pid) if os.path.isdir("/proc") else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@posix_only
@pytest.mark.parametrize("interrupted_run", ["text", "json"], indirect=True)
def test_ctrl_c_stops_cleanly_with_the_report_of_what_ran(interrupted_run: Any) -> None:
    run = interrupted_run
    assert run["status"] == 130, run["stdout"] + run["stderr"]
    assert "Traceback" not in run["stderr"], run["stderr"]
    assert "KeyboardInterrupt" not in run["stderr"], run["stderr"]
    if os.path.isdir("/proc"):
        # The supervisor and its children (workers, mirror, chaos) were running ...
        assert len(run["members_running"]) >= 3, run["members_running"]
        # ... and none of them is left, not even as a zombie.
        assert run["left"] == []
    if run["json"]:
        report = json.loads(run["stdout"])
        assert report["interrupted"] is True
        assert report["ok"] is False  # an interrupted run is no pass
        # What ran is still judged against the ground truth, and it holds.
        assert report["failures"] == [], report["failures"]
        assert 0 < report["run"]["turns"] < 4 * 3 * 200
        # Without chaos an attempt ends only by completing its 200 turns or by the ^C.
        assert report["run"]["attempts"].get("interrupted", 0) >= 1, report["run"]["attempts"]
        assert report["lines"]["acknowledged"] > 0
        assert report["foreign_exitcodes"] == {"mirror": 0}
    else:
        out = run["stdout"]
        assert "turns" in out and "lock wait" in out
        verdict = [line for line in out.splitlines() if line.startswith("verdict")]
        assert len(verdict) == 1 and "INTERRUPTED" in verdict[0], out
        # The run directory was given (--dir): it stays, and the report says where.
        assert f"run directory kept: {run['run_dir']}" in out
    # The live progress (a status line without a terminal) was closed, not left half-way:
    # it said it was stopping, and nothing after the report but the report.
    assert "interrupted" in run["stderr"]


def _trailing_space_lines(text: str) -> list[str]:
    return [repr(line) for line in text.splitlines() if line != line.rstrip()]


def test_output_without_a_terminal_has_no_trailing_whitespace(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sessionfence", "fleet", "--sessions", "2", "--workers", "2",
         "--turns", "3", "--attempts", "1", "--dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verdict" in done.stdout and "fleet: " in done.stderr  # the report and a progress line
    assert _trailing_space_lines(done.stdout) == []
    assert _trailing_space_lines(done.stderr) == []


def test_render_text_to_a_pipe_is_plain_and_unpadded() -> None:
    import io

    from sessionfence.fleet.report import render_text

    report = _tiny_report()
    out = io.StringIO()  # not a terminal
    render_text(report, out)
    text = out.getvalue()
    assert _trailing_space_lines(text) == []
    assert "\x1b[" not in text  # no terminal escapes in a log
    # Long values are not wrapped at some console width: one row, one line.
    assert sum(1 for line in text.splitlines() if line.startswith("fleet ")) == 1


def _tiny_report() -> dict[str, Any]:
    """A report built from a real (tiny) run's logs, in process."""
    global _REPORT
    if _REPORT is None:
        done = subprocess.run(
            [sys.executable, "-m", "sessionfence", "fleet", "--json", "--quiet", "--sessions",
             "2", "--workers", "2", "--turns", "2", "--attempts", "1", "--chaos", "0.5",
             "--seed", "1"],
            capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
        _REPORT = json.loads(done.stdout)
    return _REPORT


_REPORT: dict[str, Any] | None = None


# -- docs/fleet.md explains every line and key ----------------------------------------------


def _doc() -> str:
    return FLEET_DOC.read_text(encoding="utf-8")


def _keys(value: Any, prefix: str = "") -> Iterator[str]:
    """Every key path of the JSON report; maps keyed by data (kinds, reasons) stop there."""
    if isinstance(value, dict):
        for key, child in value.items():
            path = f"{prefix}.{key}" if prefix else key
            yield path
            if key in ("by_kind", "reasons", "attempts", "foreign_exitcodes", "killed_in_phase"):
                continue
            yield from _keys(child, path)


def test_docs_explain_every_json_key_of_the_report() -> None:
    doc = _doc()
    report = _tiny_report()
    # A nested summary's keys are documented once for all of them.
    generic = {"count", "p50_ms", "p99_ms", "max_ms"}
    missing = []
    for path in _keys(report):
        last = path.rsplit(".", 1)[-1]
        if path.startswith("foreign_writers.") and path.count(".") == 1:
            continue  # the writer's name (chaos, mirror), documented with its figures
        if last in generic and f"`{last}`" in doc:
            continue
        if f"`{path}`" not in doc and f"`{last}`" not in doc:
            missing.append(path)
    assert missing == [], f"undocumented report keys in {FLEET_DOC.name}: {missing}"


def test_docs_explain_every_line_of_the_text_report_and_every_term() -> None:
    from sessionfence.fleet.chaos import KINDS
    from sessionfence.fleet.report import _rows

    doc = _doc()
    labels = {key.strip() for key, _ in _rows(_tiny_report())} - set(KINDS) - {""}
    assert {"verdict", "takeovers", "lines", "kills"} <= labels
    for label in sorted(labels):
        assert re.search(rf"`{re.escape(label)}`", doc), f"report line {label!r} not explained"
    for kind in KINDS:
        assert f"`{kind}`" in doc, f"chaos kind {kind!r} not explained"
    for term in ("void", "late", "unseen by design", "of minima", "accepted", "benign", "false"):
        assert term in doc, term
    for outcome in ("completed", "takeover", "error", "crash", "interrupted"):
        assert f"`{outcome}`" in doc, outcome


def test_fleet_help_points_to_the_report_guide() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sessionfence", "fleet", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0
    assert "docs/fleet.md" in done.stdout
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/fleet.md)" in readme
