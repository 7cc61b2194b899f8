"""PostgreSQL store measures for ``sessionfence bench`` (issue 14; docs/multihost.md).

- **S1**: one turn on the PostgreSQL store (the claimant's append, committed with its claim
  check, plus the fence check that reads the lines since the last one), on a 100-entry
  session ÷ on a large session (1,000,000 entries in the full profile; 200,000 quick,
  20,000 tiny), interleaved round by round; target <= 1.5: the keyset read costs O(new
  lines), not O(session). The large session is made on the server with ``generate_series``
  (one statement, no million round trips).
- **S2** (informational): fleet throughput, turns/s on the PostgreSQL store ÷ on the file
  store, the same workload (``sessionfence.fleet.multihost``, no chaos) in the same run.

Both need a PostgreSQL server: a throwaway one is started from the installed binaries
(``SESSIONFENCE_BENCH_PG_URL`` names an existing one instead). Without psycopg or the
binaries, the measures are reported as skipped with the reason, and do not fail the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

from . import _suite as bs

__all__ = ["measure_s1", "measure_s2"]

_LARGE = {"full": 1_000_000, "quick": 200_000, "tiny": 20_000}
_TURNS = {"full": 400, "quick": 100, "tiny": 20}


def _skip_reason() -> str | None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'sessionfence[postgres]')"
    if os.environ.get("SESSIONFENCE_BENCH_PG_URL"):
        return None
    from ..store import find_pg_bindir

    if find_pg_bindir() is None:
        return "no PostgreSQL server binaries (apt-get install postgresql)"
    return None


@contextlib.contextmanager
def _server() -> Iterator[str]:
    url = os.environ.get("SESSIONFENCE_BENCH_PG_URL")
    if url:
        yield url
        return
    from ..store import TempPostgres

    with TempPostgres(durable=False) as server:
        yield server.url


# The store's work is SQL and Python: no C path, as for the lock (bench/lock.py).
_NO_C = bs.Figure("same (no C path)")


def _skipped(mid: str, case: str, title: str, reason: str) -> list[bs.Result]:
    return [
        bs.Result(
            mid,
            case,
            title,
            0.0,
            "skipped",
            bs.Target("<=", 1.5),
            {"python": bs.Figure("skipped"), "cffi": _NO_C},
            note=f"skipped: {reason}",
            informational=True,
        )
    ]


_S1_TITLE = "PostgreSQL turn (claim-checked append + keyset fence check): 1M ÷ 100 entries"


@bs.measure("S1", _S1_TITLE)
def measure_s1(bench: bs.Bench) -> list[bs.Result]:
    reason = _skip_reason()
    if reason is not None:
        return _skipped("S1", "turn", _S1_TITLE, reason)
    large = _LARGE.get(bench.profile.name, 200_000)
    turns = _TURNS.get(bench.profile.name, 100)
    with _server() as url:
        return asyncio.run(_s1(url, large, turns, max(3, bench.slow_rounds)))


async def _s1(url: str, large: int, turns: int, rounds: int) -> list[bs.Result]:
    from ..store import AsyncPostgresStore, PostgresStore

    schema = "sf_bench_" + uuid.uuid4().hex[:8]
    admin = PostgresStore(url, schema=schema)
    small_id, large_id = "small", "large"
    try:
        t0 = time.perf_counter()
        for sid, n in ((small_id, 100), (large_id, large)):
            admin.create_session(sid)
            _generate(admin, sid, n)
        setup_s = time.perf_counter() - t0
        store = AsyncPostgresStore(url, schema=schema)
        try:
            fences = {
                sid: await store.open_fence(sid, run_id="bench-" + sid)
                for sid in (small_id, large_id)
            }
            samples: dict[str, list[float]] = {small_id: [], large_id: []}
            entry = {"type": "message", "message": {"role": "assistant", "content": "x" * 200}}
            for _ in range(rounds + 1):  # the first round warms up and is dropped
                for sid, fence in fences.items():
                    start = time.perf_counter_ns()
                    for _t in range(turns):
                        await fence.append(entry)
                        await fence.reacquire_after_prompt()
                    samples[sid].append((time.perf_counter_ns() - start) / turns)
            for fence in fences.values():
                await fence.dispose()
        finally:
            await store.aclose()
    finally:
        with contextlib.suppress(Exception):
            admin._run(lambda c: c.execute(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.close()
    small = bs.Stats.of(samples[small_id][1:])
    big = bs.Stats.of(samples[large_id][1:])
    return [
        bs.Result(
            "S1",
            "turn",
            f"PostgreSQL turn (append + fence check): {large:,} ÷ 100 entries",
            big.median / small.median,
            f"{large:,} ÷ 100 entries",
            bs.Target("<=", 1.5),
            {
                "baseline": bs.time_figure(small, "100: "),
                "python": bs.time_figure(big),
                "cffi": _NO_C,
            },
            big.min / small.min,
            {"large_entries": large, "turns_per_round": turns, "setup_s": round(setup_s, 2)},
            note="throwaway local server (fsync off), one connection, localhost round trips",
        )
    ]


def _generate(admin: Any, session_id: str, n: int) -> None:
    """``n`` message entries made on the server in one statement (generate_series)."""
    q = admin.sql.q
    sql = (
        f"WITH g AS (INSERT INTO {q}.sf_entries (session_id, seq, line, entry_id, entry_type, "
        "role) SELECT %s, i, convert_to(format("
        '\'{"type":"message","id":"g%%s","parentId":%%s,"timestamp":"2026-01-01T00:00:00.000Z",'
        '"message":{"role":"user","content":"padding %%s"}}\', i, '
        "CASE WHEN i = 1 THEN 'null' ELSE '\"g' || (i - 1) || '\"' END, i), 'UTF8'), "
        "'g' || i, 'message', 'import' FROM generate_series(1, %s) AS i RETURNING seq) "
        f"UPDATE {q}.sf_sessions SET last_seq = (SELECT max(seq) FROM g), "
        "last_entry_id = 'g' || (SELECT max(seq) FROM g) WHERE session_id = %s"
    )
    admin._run(lambda c: c.execute(sql, (session_id, n, session_id)))
    admin._run(lambda c: c.execute(f"ANALYZE {q}.sf_entries"))


_S2_TITLE = "fleet throughput, PostgreSQL store ÷ file store (same workload)"


@bs.measure("S2", _S2_TITLE)
def measure_s2(bench: bs.Bench) -> list[bs.Result]:
    reason = _skip_reason()
    if reason is not None:
        return _skipped("S2", "fleet", _S2_TITLE, reason)
    from ..fleet.multihost import MultihostConfig, run_multihost

    quick = bench.profile.name != "full"
    shape: dict[str, Any] = (
        {"workers": 2, "sessions": 4, "turns": 6, "attempts": 2}
        if quick
        else {"workers": 4, "sessions": 8, "turns": 20, "attempts": 3}
    )
    with _server() as url:
        pg = run_multihost(MultihostConfig(store=url, **shape))
    files = run_multihost(MultihostConfig(store="file", **shape))
    ratio = pg["turns_per_s"] / files["turns_per_s"] if files["turns_per_s"] else 0.0
    # Where a turn's time goes on each store (medians over attempts, from the hosts).
    pg_turn, file_turn = pg.get("per_turn") or {}, files.get("per_turn") or {}
    return [
        bs.Result(
            "S2",
            "fleet",
            _S2_TITLE,
            ratio,
            "turns/s PostgreSQL ÷ files",
            bs.Target(">=", 0.0),
            {
                "baseline": bs.Figure(f"files {files['turns_per_s']:.0f} turns/s", unit="turns/s"),
                "python": bs.Figure(f"pg {pg['turns_per_s']:.0f} turns/s", unit="turns/s"),
                "cffi": _NO_C,
            },
            params={
                **shape,
                "pg_passed": pg["passed"],
                "files_passed": files["passed"],
                "pg_per_turn": pg_turn,
                "files_per_turn": file_turn,
            },
            note=_s2_note(pg_turn, file_turn),
            informational=True,
        )
    ]


def _s2_note(pg: dict[str, Any], files: dict[str, Any]) -> str:
    """What bounds S2, from the hosts' own timings (medians over attempts)."""
    if not pg or not files:
        return "no per-turn timings"

    def store_ms(t: dict[str, Any]) -> float:
        return float(t["appends"] * t["append_ms"] + t["check_ms"])

    return (
        f"per turn: model call {pg['think_ms']:.2f} ms on both (simulated, 2-8 ms); store "
        f"{store_ms(pg):.2f} ms on PostgreSQL ({pg['appends']:.0f} appends of "
        f"{pg['append_ms']:.2f} ms + fence read {pg['check_ms']:.2f} ms, one round trip each, "
        f"one connection per host) vs {store_ms(files):.2f} ms on files (lock + journal); "
        "the rest is attempt setup (claim with lease, fence open, lease release)"
    )
