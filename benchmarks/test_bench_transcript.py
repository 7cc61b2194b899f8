"""Transcript parse throughput: ``SessionManager.open`` against a plain ``json.loads`` loop.

    pytest benchmarks/test_bench_transcript.py --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=min,median,rounds -s

Contenders, one group per size, all on the same file with a warm page cache:

- ``plain-json-loop``: ``for line in file: values.append(json.loads(line))``, the baseline;
- ``plain-loop-gc-off``: the same loop with the cyclic GC paused, as ``open`` pauses it,
  to show how much of the gain is that alone;
- ``open-json``: ``SessionManager.open`` with the stdlib parser (what a bare install does);
- ``open-msgspec`` / ``open-orjson``: ``SessionManager.open`` with an optional fast parser,
  each skipped when it is not installed; these are cold opens (the index is removed before
  each round), so with msgspec every line takes the skeleton route (docs/transcripts.md,
  "Large transcripts");
- ``full-msgspec``: ``SessionManager.open(index=False)``, the full parse into memory (what
  every open was before the index).

``test_warm_open`` times the open through the index plus ``context_entries()``.

``open`` does more than the loop: it also hashes every byte (XXH3-128 rolling digest),
fingerprints the file before and after, checks each value is an object and builds the tree
index. The summary printed at the end (``-s``) gives MB/s and each ratio to the loop.

Measured 2026-11-24 on the 2-core development machine (CPython 3.11, other jobs running,
load average about 2), 100.1 MB realistic transcript, 17 000 lines, min of 5 rounds:

    plain-json-loop     182-195 MB/s   x1.00
    plain-loop-gc-off   208-217 MB/s   x1.11-1.14
    open-json           224-247 MB/s   x1.23-1.26
    open-orjson         243-264 MB/s   x1.34-1.35
    open-msgspec        341-377 MB/s   x1.88-1.93
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sessionfence import SessionManager, _jsonl
from sessionfence.transcript import _io as _io
from sessionfence.transcript._index import index_path_for

MB = 1_000_000
MiB = 1 << 20

Benchmark = Any  # pytest-benchmark ships no type stubs

SIZES = [
    pytest.param(4 * MiB, id="4MiB"),
    pytest.param(100 * MB, id="100MB", marks=[pytest.mark.bench_large]),
]

_results: dict[int, dict[str, float]] = {}


_VOCABULARY = (
    "the of and to in is that for it with as was on be by this are or from at an which "
    "function return import class self value error file path line test result data "
    "session lock fence transcript append write read model prompt tool call output "
    "def async await none true false if else for while try except raise yield lambda "
    "über café naïve 日本語 données — “quoted” emoji 🎉"
)


def _corpus(rng: random.Random) -> str:
    words = _VOCABULARY.split()
    return " ".join(rng.choice(words) for _ in range(400_000))


def _entries(rng: random.Random, corpus: str) -> Iterator[dict[str, Any]]:
    """Realistic agent turns: user prompt, assistant with thinking and tool calls, tool
    results of very different sizes, now and then a big file dump."""
    parent: str | None = None
    ms = 1_760_000_000_000
    n = 0

    def text(lo: int, hi: int) -> str:
        size = rng.randint(lo, hi)
        start = rng.randrange(0, len(corpus) - size)
        return corpus[start : start + size]

    def entry(message: dict[str, Any]) -> dict[str, Any]:
        nonlocal parent, n, ms
        n += 1
        ms += rng.randint(10, 5000)
        ident = f"{n:08x}"
        row = {
            "type": "message",
            "id": ident,
            "parentId": parent,
            "timestamp": f"2026-11-24T12:{(n // 60) % 60:02d}:{n % 60:02d}.{n % 1000:03d}Z",
            "message": {**message, "timestamp": ms},
        }
        parent = ident
        return row

    while True:
        yield entry({"role": "user", "content": [{"type": "text", "text": text(20, 2000)}]})
        for _ in range(rng.randint(1, 4)):
            call = f"toolu_{rng.getrandbits(64):016x}"
            yield entry(
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": text(50, 3000), "signature": call * 4},
                        {"type": "text", "text": text(10, 1500)},
                        {
                            "type": "toolCall",
                            "id": call,
                            "name": rng.choice(["bash", "read", "edit", "write", "grep"]),
                            "arguments": {"command": text(5, 200), "timeout": 120},
                        },
                    ],
                    "api": "anthropic-messages",
                    "provider": "anthropic",
                    "model": "claude-sonnet-4-5",
                    "usage": {
                        "input": rng.randint(0, 5000),
                        "output": rng.randint(0, 4000),
                        "cacheRead": rng.randint(0, 200_000),
                        "cacheWrite": rng.randint(0, 20_000),
                        "totalTokens": rng.randint(0, 250_000),
                        "cost": {"input": rng.random() / 100, "output": rng.random() / 50},
                    },
                    "stopReason": "toolUse",
                }
            )
            big = rng.random() < 0.05
            yield entry(
                {
                    "role": "toolResult",
                    "toolCallId": call,
                    "toolName": "bash",
                    "content": [
                        {"type": "text", "text": text(50_000, 200_000) if big else text(20, 6000)}
                    ],
                    "isError": rng.random() < 0.1,
                }
            )


def write_realistic_transcript(path: Path, size: int, seed: int = 4) -> Path:
    rng = random.Random(seed)
    corpus = _corpus(rng)
    header = {"type": "session", "version": 3, "id": "bench", "timestamp": "t", "cwd": "/"}
    with open(path, "wb") as f:
        written = f.write(json.dumps(header, separators=(",", ":")).encode() + b"\n")
        for row in _entries(rng, corpus):
            if written >= size:
                break
            data = json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
            f.write(data)
            written += len(data)
    with open(path, "rb") as f:  # warm the page cache: every contender reads from memory
        while f.read(8 * MiB):
            pass
    return path


@pytest.fixture(scope="module")
def transcripts(bench_dir: Path) -> Callable[[int], Path]:
    made: dict[int, Path] = {}

    def get(size: int) -> Path:
        if size not in made:
            made[size] = write_realistic_transcript(bench_dir / f"realistic-{size}.jsonl", size)
        return made[size]

    return get


def plain_json_loop(path: Path) -> list[Any]:
    values = []
    with open(path, "rb") as f:
        for line in f:
            values.append(json.loads(line))
    return values


def plain_json_loop_gc_off(path: Path) -> list[Any]:
    with _io.gc_paused():
        return plain_json_loop(path)


def open_with(fast: str | None, index: bool | None = None) -> Callable[[Path], SessionManager]:
    """A cold open (the index is removed first: every line is parsed), or with
    ``index=False`` the reference full parse into memory."""

    def run(path: Path) -> SessionManager:
        old = _jsonl.set_fast_parser(fast)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(index_path_for(path))
            return SessionManager.open(path, index=index)
        finally:
            _jsonl.set_fast_parser(old)

    return run


def warm_open(path: Path) -> SessionManager:
    """Open through a valid index + the model context (what an agent needs first)."""
    manager = SessionManager.open(path)
    manager.context_entries()
    return manager


CONTENDERS: dict[str, Callable[[Path], Any]] = {
    "plain-json-loop": plain_json_loop,
    "plain-loop-gc-off": plain_json_loop_gc_off,
    "open-json": open_with(None),
    "open-msgspec": open_with("msgspec"),
    "open-orjson": open_with("orjson"),
    "full-msgspec": open_with("msgspec", index=False),
}


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    if not _results:
        return
    print("\n\ntranscript parse throughput (min of rounds)")
    for size, row in sorted(_results.items()):
        base = row.get("plain-json-loop")
        for name, seconds in row.items():
            ratio = f"  x{base / seconds:5.2f} vs plain loop" if base else ""
            print(f"  {size / MB:8.1f} MB  {name:16s} {size / MB / seconds:8.1f} MB/s{ratio}")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_parse(
    benchmark: Benchmark,
    transcripts: Callable[[int], Path],
    size: int,
    contender: str,
    bench_quick: bool,
) -> None:
    parser = contender.removeprefix("open-").removeprefix("full-")
    optional = contender.startswith(("open-", "full-")) and parser != "json"
    if optional and parser not in _jsonl.available_fast_parsers():
        pytest.skip(f"{parser} is not installed (optional extra)")
    path = transcripts(size)
    actual = path.stat().st_size
    benchmark.group = f"transcript parse {actual / MB:.0f} MB"
    run = CONTENDERS[contender]
    rounds = 1 if bench_quick else 5
    result = benchmark.pedantic(run, args=(path,), rounds=rounds, iterations=1, warmup_rounds=0)
    if isinstance(result, SessionManager):
        assert result.malformed_lines == 0 and result.torn_tail is None
        assert result.digest_size == actual
    else:
        assert len(result) > 1
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        seconds = stats.stats.min
        benchmark.extra_info["MB/s"] = round(actual / MB / seconds, 1)
        _results.setdefault(actual, {})[contender] = seconds


@pytest.mark.parametrize("size", [pytest.param(1 * MiB, id="1MiB"), *SIZES])
def test_warm_open(
    benchmark: Benchmark, transcripts: Callable[[int], Path], size: int, bench_quick: bool
) -> None:
    """Open through the index + ``context_entries()``: O(appended bytes + context), not
    O(file) (these generated sessions have no compaction, so their context is the whole
    branch; ``sessionfence bench`` O1/O4 use sessions with periodic compactions)."""
    path = transcripts(size)
    SessionManager.open(path, index=True)  # writes the index
    benchmark.group = "transcript warm open"
    rounds = 3 if bench_quick else 20
    manager = benchmark.pedantic(warm_open, args=(path,), rounds=rounds, iterations=1)
    assert manager.digest_size == path.stat().st_size
