"""``sessionfence fleet --store postgresql``: worker hosts on a PostgreSQL store (small runs
against real throwaway servers): paused writers taken over after their lease expired,
SIGKILLs (some between an append's send and its acknowledgement), foreign content from a
rogue client, supersessions of live workers, server restarts and killed connections; the
oracle's verdicts, the report's keys and the CLI's flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from sessionfence.fleet.multihost import MultihostConfig, run_multihost
from sessionfence.store import TempPostgres

from .conftest import pg_skip_reason

pytestmark = pytest.mark.skipif(pg_skip_reason() is not None, reason=str(pg_skip_reason()))


def _check_invariants(report: dict[str, Any]) -> None:
    assert report["passed"], report["failures"]
    assert report["lost"] == report["duplicated"] == 0
    assert report["fencing"]["late_writes_landed"] == 0
    assert report["takeovers"]["missed"] == report["takeovers"]["false"] == 0
    assert report["takeovers"]["unexplained_supersessions"] == 0
    assert report["supersede"]["missed"] == 0
    assert report["lines"]["foreign_lost"] == report["lines"]["foreign_unexpected"] == 0


def test_fleet_with_every_kind_of_chaos() -> None:
    # Chaos 0.5: every attempt gets a host event, each kind once before any repeats.
    report = run_multihost(
        MultihostConfig(
            store="postgresql",
            workers=3,
            sessions=4,
            turns=12,
            attempts=3,
            chaos=0.5,
            seed=5,
            lease_s=0.5,
            transcript_mb=0.1,
        )
    )
    _check_invariants(report)
    f, w, tk, sp = report["fencing"], report["workers"], report["takeovers"], report["supersede"]
    # Paused past its lease, taken over by another host, refused when it resumed.
    assert f["paused"] >= 1
    assert f["late_writes_refused"] == f["paused_attempts_superseded"] >= 1
    # Taken over once the server's clock said the lease had expired: 0.5 s from the last
    # append, which came a turn at most (well under 0.1 s) before the stop.
    assert f["lease_expired_after_s"]["min"] >= 0.4
    # SIGKILLed hosts, respawned (kills between send and acknowledgement: the next test).
    assert w["killed"] >= 2 and w["respawned"] == w["killed"] and w["crashed"] == 0
    # A live worker claimed by another run: its next append or check refused.
    assert sp["injected"] >= 1 and sp["detected"] == sp["injected"]
    assert sp["late_writes_refused"] == sp["injected"]
    assert tk["detected"] == tk["injected"]
    assert report["benign"]["unaccepted"] == 0
    assert report["server_restarts"] == 1
    assert report["transcript_bytes_at_start"] >= 100 * 1024


def test_kill_between_send_and_acknowledgement() -> None:
    """Every host event a SIGKILL while an append waits on the server: the append lands
    after its host died, unacknowledged; nothing acknowledged is lost, nothing twice. (No
    server restart here: one between the kill and the commit would void the append, which
    is allowed, an unacknowledged append may or may not land, but not what is tested.)"""
    report = run_multihost(
        MultihostConfig(
            store="postgresql",
            workers=2,
            sessions=2,
            turns=16,
            attempts=2,
            chaos=0.5,
            seed=3,
            lease_s=0.3,
            max_kills_per_session=2,
            chaos_kinds=("kill-inflight",),
        )
    )
    _check_invariants(report)
    w = report["workers"]
    assert report["server_restarts"] == 0
    assert w["killed_between_send_and_ack"] >= 1
    assert report["lines"]["landed_unacknowledged"] >= w["killed_between_send_and_ack"]


def test_supersede_flag_on_live_workers() -> None:
    report = run_multihost(
        MultihostConfig(
            store="postgresql", workers=2, sessions=3, turns=8, attempts=2, supersede=0.2, seed=2
        )
    )
    _check_invariants(report)
    sp = report["supersede"]
    assert sp["injected"] >= 1 and sp["detected"] == sp["injected"]
    assert sp["late_writes_refused"] == sp["injected"] and sp["late_write_errors"] == 0
    assert report["fencing"]["paused"] == 0 and report["workers"]["killed"] == 0
    assert report["server_restarts"] == 0  # restarts come with --chaos only


def test_fleet_cli_on_an_existing_server(pg_url: str) -> None:
    del pg_url  # the session's server must not be restarted; use one of our own
    with TempPostgres(durable=False) as server:
        out = subprocess.run(
            [sys.executable, "-m", "sessionfence", "fleet", "--store", server.url,
             "--workers", "2", "--sessions", "2", "--turns", "6", "--chaos", "0.5",
             "--seed", "1", "--transcript-mb", "0.2", "--verify", "full", "--mirror", "0.5",
             "--json"],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr + out.stdout
        report = json.loads(out.stdout)
        assert report["passed"]
        assert report["server_restarts"] == 0
        assert report["server_restarts_skipped"] == 1
        assert report["server"] == "existing"
        skipped = {s["what"]: s["why"] for s in report["skipped"]}
        assert "existing server" in skipped["server restart"]
        assert "existing server" in skipped["network namespaces"]
        assert report["network"]["namespaces"] is False
        flags = {n["flag"]: n for n in report["not_applicable"]}
        assert set(flags) == {"--verify", "--mirror", "--cotenant-rate", "--dir"}
        assert flags["--verify"]["given"] and flags["--mirror"]["given"]
        assert not flags["--dir"]["given"]
        assert "--verify does not apply across hosts" in out.stderr
        assert report["transcript_bytes_at_start"] >= 200 * 1024
        # Live progress: plain lines on stderr with --json (no terminal codes).
        assert "fleet: " in out.stderr and "\x1b[" not in out.stderr


def test_fleet_cli_text_report_and_quiet() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sessionfence", "fleet", "--store", "postgresql",
         "--workers", "2", "--sessions", "2", "--turns", "4", "--quiet"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr + out.stdout
    assert "result               PASSED" in out.stdout
    assert "not applicable       --verify" in out.stdout
    assert out.stderr == ""  # --quiet: no progress


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network namespaces need root"
)
def test_hosts_in_network_namespaces() -> None:
    import shutil

    if shutil.which("ip") is None:
        pytest.skip("no 'ip' tool")
    report = run_multihost(
        MultihostConfig(store="postgresql", workers=2, sessions=2, turns=4, attempts=1)
    )
    assert report["passed"], report["failures"]
    assert report["network"]["namespaces"] is True
    assert "network namespace" in report["hosts"]
    names = report["network"]["names"]
    assert len(names) == 3  # 2 workers and the co-tenant host
    # Removed after the run (other runs' namespaces may exist meanwhile).
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(line.split()[0] in names for line in left.splitlines() if line), left


def test_file_store_runs_the_same_workload() -> None:
    report = run_multihost(MultihostConfig(store="file", workers=2, sessions=2, turns=4))
    assert report["passed"], report["failures"]
    assert report["network"]["namespaces"] is False
