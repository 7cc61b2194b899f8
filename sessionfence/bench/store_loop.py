"""The agent loop on a PostgreSQL session, through the public API (docs/multihost.md, "The
controller and the model on either store").

- **S3**: one turn as an agent loop writes it on either store (``SessionFenceController``
  and ``SessionManager`` opened with ``store=``): a write scope with the manager's append
  (committed with its claim check, copied to the manager's local copy), the release for
  the prompt (a fence check) and the reacquire (another); on a 100-entry session ÷ on a
  large one (1,000,000 entries in the full profile; 200,000 quick, 20,000 tiny),
  interleaved round by round; target <= 1.5. Opening the managers (copying the sessions)
  is setup, not timed.

Needs a PostgreSQL server, as S1 (``bench/store.py``): skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from . import _suite as bs
from .store import _LARGE, _NO_C, _TURNS, _generate, _server, _skip_reason, _skipped

__all__ = ["measure_s3"]

_S3_TITLE = "agent-loop turn on PostgreSQL (controller + manager, store=): 1M ÷ 100 entries"


@bs.measure("S3", _S3_TITLE)
def measure_s3(bench: bs.Bench) -> list[bs.Result]:
    reason = _skip_reason()
    if reason is not None:
        return _skipped("S3", "loop", _S3_TITLE, reason)
    large = _LARGE.get(bench.profile.name, 200_000)
    turns = _TURNS.get(bench.profile.name, 100)
    with _server() as url:
        return asyncio.run(_s3(url, large, turns, max(3, bench.slow_rounds)))


async def _s3(url: str, large: int, turns: int, rounds: int) -> list[bs.Result]:
    from ..controller import SessionFenceController
    from ..store import AsyncPostgresStore, PostgresStore
    from ..transcript import SessionManager

    schema = "sf_bench_" + uuid.uuid4().hex[:8]
    store = PostgresStore(url, schema=schema)
    fences = AsyncPostgresStore(url, schema=schema)
    loops: dict[str, tuple[Any, Any]] = {}
    try:
        t0 = time.perf_counter()
        for sid, n in (("small", 100), ("large", large)):
            store.create_session(sid)
            _generate(store, sid, n)
            manager = SessionManager.open(sid, store=store)
            ctl = await SessionFenceController.create(
                sid, store=fences, run_id="bench-" + sid, merge_foreign_entries=lambda e: None
            )
            manager.writer = ctl.writer
            loops[sid] = (ctl, manager)
        setup_s = time.perf_counter() - t0
        samples: dict[str, list[float]] = {sid: [] for sid in loops}
        message = {"role": "assistant", "content": "x" * 200}
        for _ in range(rounds + 1):  # the first round warms up and is dropped
            for sid, (ctl, manager) in loops.items():
                start = time.perf_counter_ns()
                for _t in range(turns):
                    async with ctl.write_lock():
                        manager.append_message(message)
                    await ctl.release_for_prompt()
                    await ctl.reacquire_after_prompt()
                samples[sid].append((time.perf_counter_ns() - start) / turns)
        for ctl, manager in loops.values():
            await ctl.dispose()
            manager.close()
    finally:
        await fences.aclose()
        with contextlib.suppress(Exception):
            store._run(lambda c: c.execute(f'DROP SCHEMA "{schema}" CASCADE'))
        store.close()
    small = bs.Stats.of(samples["small"][1:])
    big = bs.Stats.of(samples["large"][1:])
    return [
        bs.Result(
            "S3",
            "loop",
            f"agent-loop turn on PostgreSQL (controller + manager): {large:,} ÷ 100 entries",
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
            note="write scope + manager append + release + reacquire; throwaway local server",
        )
    ]
