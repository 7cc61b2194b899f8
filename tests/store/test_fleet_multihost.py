"""``sessionfence fleet --store postgresql``: worker hosts on a PostgreSQL store with
paused-writer, server-restart and killed-connection chaos (a small run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sessionfence.fleet.multihost import MultihostConfig, run_multihost
from sessionfence.store import TempPostgres

from .conftest import pg_skip_reason

pytestmark = pytest.mark.skipif(pg_skip_reason() is not None, reason=str(pg_skip_reason()))


def test_fleet_on_a_throwaway_server_with_chaos() -> None:
    report = run_multihost(
        MultihostConfig(store="postgresql", workers=3, sessions=3, turns=6, chaos=0.6, seed=5)
    )
    assert report["passed"], report
    assert report["fencing"]["paused"] >= 1
    assert report["fencing"]["late_writes_landed"] == 0
    assert report["server_restarts"] == 1
    assert report["lost"] == report["duplicated"] == 0


def test_fleet_cli_on_an_existing_server_skips_the_restart(pg_url: str) -> None:
    del pg_url  # the session's server must not be restarted; use one of our own
    with TempPostgres(durable=False) as server:
        out = subprocess.run(
            [sys.executable, "-m", "sessionfence", "fleet", "--store", server.url,
             "--workers", "2", "--sessions", "2", "--turns", "4", "--chaos", "0.5",
             "--seed", "1", "--json"],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr + out.stdout
        report = json.loads(out.stdout)
        assert report["server_restarts"] == 0
        assert report["server_restarts_skipped"] == 1
        assert report["server"] == "existing"


def test_file_store_runs_the_same_workload(tmp_path: object) -> None:
    report = run_multihost(MultihostConfig(store="file", workers=2, sessions=2, turns=4))
    assert report["passed"], report
