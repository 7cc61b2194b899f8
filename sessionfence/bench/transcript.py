"""Large-transcript measures for ``sessionfence bench``: O1-O4 (issue 15, "Large
transcripts").

All of them run on generated realistic sessions (``write_session``): user prompts, assistant
turns with thinking and tool calls, tool results of very different sizes (now and then a
big file dump), a compaction whenever about ``COMPACT_EVERY`` bytes were written since the
last one (its first kept entry a few turns back, as a real compaction keeps the recent
turns), now and then a label, a model or thinking-level change. The files are real (not
sparse): the cold open reads every byte.

- **O1**: ``SessionManager.open(path).context_entries()`` through a valid index, large ÷ 1 MiB
  transcript, target <= 5 (the open parses only the model context).
- **O2**: peak RSS of a fresh interpreter that does that open on the large transcript
  (``VmHWM`` from ``/proc/self/status``; ``ru_maxrss`` where there is none: on Linux
  ``ru_maxrss`` survives ``exec`` and would report the forking bench process's peak),
  target <= 150 MiB; the same interpreter without the open is shown beside it.
- **O3**: cold open (no index: it is deleted before each round; the open writes it again)
  ÷ a ``json.loads``-per-line loop over the same file, target <= 0.5.
- **O4**: reopen (open + ``context_entries()``) after a 1 KiB append to the large
  transcript ÷ the warm open of O1 at 1 MiB, target <= 5 (the open parses the index's
  prefix never again, only the bytes past it).

The transcript path has no C-specific code: figures go in the ``python`` column, with the
backend the package selected (the ``cffi`` cell says so).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..transcript import SessionManager
from ..transcript._index import index_path_for
from . import _suite as bs

__all__ = ["COMPACT_EVERY", "measure_o1", "measure_o2", "measure_o3", "measure_o4", "write_session"]

KiB = bs.KiB
MiB = 1 << 20
GiB = bs.GiB

#: A compaction after about this many bytes since the previous one (a 200k-token context
#: is about this much JSONL).
COMPACT_EVERY = 768 * KiB

# (large, small) transcript sizes per profile
_SIZES = {"full": (1 * GiB, 1 * MiB), "quick": (48 * MiB, 1 * MiB), "tiny": (1 * MiB, 256 * KiB)}
_ROUNDS = {"full": (9, 3), "quick": (9, 3), "tiny": (3, 1)}  # (warm rounds, cold rounds)
_SAME = bs.Figure("same (no C path)")

_WORDS = (  # noqa: SIM905 - the benchmark's vocabulary, kept readable
    "the of and to in is that for it with as was on be by this are or from at an which "
    "function return import class self value error file path line test result data "
    "session lock fence transcript append write read model prompt tool call output "
    "def async await none true false if else for while try except raise yield lambda "
    "über café naïve 日本語 données — “quoted” emoji 🎉"
).split()


def write_session(
    path: Path, size: int, *, seed: int = 15, compact_every: int = COMPACT_EVERY
) -> Path:
    """A realistic session of about ``size`` bytes (whole lines), written once."""
    rng = random.Random(seed)
    corpus = " ".join(rng.choice(_WORDS) for _ in range(300_000))
    n = 0
    parent: str | None = None
    path_ids: list[str] = []
    since = 0

    def text(lo: int, hi: int) -> str:
        k = rng.randint(lo, hi)
        at = rng.randrange(0, len(corpus) - k)
        return corpus[at : at + k]

    def line(fields: dict[str, Any]) -> bytes:
        nonlocal n, parent
        n += 1
        ident = f"{n:08x}"
        row = {
            "type": fields.pop("type"),
            "id": ident,
            "parentId": parent,
            "timestamp": f"2026-12-05T{(n // 3600) % 24:02d}:{(n // 60) % 60:02d}:"
            f"{n % 60:02d}.{n % 1000:03d}Z",
            **fields,
        }
        parent = ident
        path_ids.append(ident)
        return json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"

    header = {"type": "session", "version": 3, "id": "bench-o", "timestamp": "t", "cwd": "/"}
    with open(path, "wb") as f:
        written = f.write(json.dumps(header, separators=(",", ":")).encode() + b"\n")
        for first in (
            {"type": "session_info", "name": "generated session"},
            {"type": "model_change", "provider": "anthropic", "modelId": "claude-sonnet-4-5"},
        ):
            written += f.write(line(first))
        while written < size:
            rows = [
                line({"type": "message", "message": {"role": "user", "content": text(20, 2000)}})
            ]
            for _ in range(rng.randint(1, 4)):
                call = f"toolu_{rng.getrandbits(64):016x}"
                rows.append(
                    line(
                        {
                            "type": "message",
                            "message": {
                                "role": "assistant",
                                "content": [
                                    {"type": "thinking", "thinking": text(50, 3000)},
                                    {"type": "text", "text": text(10, 1500)},
                                    {
                                        "type": "toolCall",
                                        "id": call,
                                        "name": rng.choice(["bash", "read", "edit", "grep"]),
                                        "arguments": {"command": text(5, 200)},
                                    },
                                ],
                                "provider": "anthropic",
                                "model": "claude-sonnet-4-5",
                                "usage": {"input": rng.randint(0, 5000), "output": 300},
                                "stopReason": "toolUse",
                            },
                        }
                    )
                )
                big = rng.random() < 0.05
                rows.append(
                    line(
                        {
                            "type": "message",
                            "message": {
                                "role": "toolResult",
                                "toolCallId": call,
                                "content": [
                                    {
                                        "type": "text",
                                        "text": text(50_000, 150_000) if big else text(20, 6000),
                                    }
                                ],
                                "isError": rng.random() < 0.1,
                            },
                        }
                    )
                )
            if rng.random() < 0.02:
                rows.append(line({"type": "label", "targetId": path_ids[-2], "label": "mark"}))
            if rng.random() < 0.01:
                rows.append(line({"type": "thinking_level_change", "thinkingLevel": "high"}))
            chunk = b"".join(rows)
            since += len(chunk)
            if since >= compact_every:
                kept = path_ids[max(0, len(path_ids) - 12)]
                chunk += line(
                    {
                        "type": "compaction",
                        "summary": text(1000, 4000),
                        "firstKeptEntryId": kept,
                        "tokensBefore": 180_000,
                    }
                )
                since = 0
            written += f.write(chunk)
    bs.warm(path)
    return path


def _drop_index(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(index_path_for(path))


def _open_context(path: Path) -> int:
    m = SessionManager.open(path)
    return len(m.context_entries())


def _timed(fn: Any) -> list[float]:
    t0 = time.perf_counter_ns()
    fn()
    return [float(time.perf_counter_ns() - t0)]


def _sessions(bench: bs.Bench) -> tuple[Path, Path]:
    large, small = _SIZES.get(bench.profile.name, _SIZES["quick"])
    key = "_o_sessions"
    made: dict[int, Path] | None = getattr(bench, key, None)
    if made is None:
        made = {}
        setattr(bench, key, made)
    for size in (large, small):
        if size not in made:
            made[size] = write_session(bench.path(f"o-{size}"), size)
            SessionManager.open(made[size], index=True)  # writes the index
    return made[large], made[small]


def _rounds(bench: bs.Bench) -> tuple[int, int]:
    return _ROUNDS.get(bench.profile.name, _ROUNDS["quick"])


def _cells(a: bs.Stats, b: bs.Stats) -> dict[bs.Column, bs.Figure]:
    return {
        bs.column("python"): bs.Figure(f"{bs.format_ns(a.median)} / {bs.format_ns(b.median)}", a),
        bs.column("cffi"): _SAME,
    }


@bs.measure("O1", "warm open + context_entries(): large ÷ 1 MiB transcript")
def measure_o1(bench: bs.Bench) -> list[bs.Result]:
    large, small = _sessions(bench)
    warm, _ = _rounds(bench)
    stats = bs.race(
        {
            "large": lambda: _timed(lambda: _open_context(large)),
            "small": lambda: _timed(lambda: _open_context(small)),
        },
        warm,
    )
    a, b = stats["large"], stats["small"]
    return [
        bs.Result(
            "O1",
            "warm_open",
            f"warm open + context_entries(), {bs.format_bytes(large.stat().st_size)} ÷ "
            f"{bs.format_bytes(small.stat().st_size)}",
            a.median / b.median,
            "large ÷ small",
            bs.Target("<=", 5),
            _cells(a, b),
            a.min / b.min,
            {"large": large.stat().st_size, "small": small.stat().st_size},
            note="cells: large / small; through a valid index",
        )
    ]


_RSS_SCRIPT = """
import resource, sys
from sessionfence import SessionManager
if sys.argv[2] == "open":
    m = SessionManager.open(sys.argv[1])
    n = len(m.context_entries())
kib = None
try:  # this process's own peak (Linux): ru_maxrss survives exec, so it would include
    with open("/proc/self/status") as f:  # the peak of the bench process that forked it
        for row in f:
            if row.startswith("VmHWM:"):
                kib = float(row.split()[1])
except OSError:
    pass
if kib is None:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kib = kib / 1024 if sys.platform == "darwin" else kib
print(kib)
"""


def _peak_rss_mib(path: Path, what: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path), what],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return float(out.stdout.strip().splitlines()[-1]) / 1024


@bs.measure("O2", "peak RSS of warm open + context_entries() of the large transcript")
def measure_o2(bench: bs.Bench) -> list[bs.Result]:
    if sys.platform == "win32":  # pragma: no cover - no resource module
        return []
    large, _ = _sessions(bench)
    peak = min(_peak_rss_mib(large, "open") for _ in range(3))
    idle = min(_peak_rss_mib(large, "idle") for _ in range(3))
    return [
        bs.Result(
            "O2",
            "peak_rss",
            f"peak RSS (MiB) of a fresh process: warm open + context_entries(), "
            f"{bs.format_bytes(large.stat().st_size)}",
            peak,
            "MiB (VmHWM, else ru_maxrss)",
            bs.Target("<=", 150),
            {
                bs.column("python"): bs.Figure(f"{peak:.1f} MiB", None, "MiB"),
                bs.column("baseline"): bs.Figure(f"{idle:.1f} MiB (import only)", None, "MiB"),
                bs.column("cffi"): _SAME,
            },
            None,
            {"size": large.stat().st_size},
            note="min of 3 subprocesses; baseline: the same process without the open",
        )
    ]


def _json_loop(path: Path) -> None:
    loads = json.loads
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                loads(raw)


@bs.measure("O3", "cold open (no index) ÷ json.loads per line, large transcript")
def measure_o3(bench: bs.Bench) -> list[bs.Result]:
    large, _ = _sessions(bench)
    _, cold = _rounds(bench)

    def cold_open() -> list[float]:
        _drop_index(large)
        return _timed(lambda: SessionManager.open(large))

    stats = bs.race({"cold": cold_open, "loop": lambda: _timed(lambda: _json_loop(large))}, cold)
    SessionManager.open(large, index=True)  # leave a valid index behind for O4
    a, b = stats["cold"], stats["loop"]
    return [
        bs.Result(
            "O3",
            "cold_open",
            f"cold open (no index, writes it) ÷ json.loads per line, "
            f"{bs.format_bytes(large.stat().st_size)}",
            a.median / b.median,
            "open ÷ loop",
            bs.Target("<=", 0.5),
            {
                bs.column("python"): bs.time_figure(a),
                bs.column("baseline"): bs.time_figure(b),
                bs.column("cffi"): _SAME,
            },
            a.min / b.min,
            {"size": large.stat().st_size},
            note="baseline: for line in file: json.loads(line)",
        )
    ]


@bs.measure("O4", "reopen after a 1 KiB append (large) ÷ warm open (1 MiB)")
def measure_o4(bench: bs.Bench) -> list[bs.Result]:
    large, small = _sessions(bench)
    warm, _ = _rounds(bench)
    writer = SessionManager.open(large)
    payload = "x" * (KiB - 160)

    def reopen() -> list[float]:
        writer.append_message({"role": "user", "content": payload})
        return _timed(lambda: _open_context(large))

    stats = bs.race({"reopen": reopen, "small": lambda: _timed(lambda: _open_context(small))}, warm)
    a, b = stats["reopen"], stats["small"]
    return [
        bs.Result(
            "O4",
            "reopen",
            f"open + context_entries() after a 1 KiB append, "
            f"{bs.format_bytes(large.stat().st_size)} ÷ warm open, "
            f"{bs.format_bytes(small.stat().st_size)}",
            a.median / b.median,
            "reopen large ÷ warm small",
            bs.Target("<=", 5),
            _cells(a, b),
            a.min / b.min,
            {"large": large.stat().st_size, "small": small.stat().st_size, "append": KiB},
            note="cells: large / small; the index is not rewritten for a 1 KiB append",
        )
    ]
