"""Hot-path benchmarks: naive / python / cffi side by side, one group per operation and size.

    pytest benchmarks/test_bench_hotpath.py --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=min,median,ops

Each group holds the paths of one operation at one size, so pytest-benchmark prints them
next to each other. ``sessionfence bench`` turns the same operations into the ratios of
the performance targets (docs/design.md); this file is for looking closer (histograms,
--benchmark-compare, CodSpeed).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sessionfence._types import ChangeKind
from sessionfence.bench import _suite as benchsuite

KiB = benchsuite.KiB
MiB = benchsuite.MiB
GiB = benchsuite.GiB

Benchmark = Any  # pytest-benchmark's fixture ships no type stubs


def _size(size: int) -> Any:
    sid = benchsuite.size_id(size)
    marks = [pytest.mark.bench_large] if size >= 100 * MiB else []
    return pytest.param(size, id=sid, marks=marks)


# 1 GiB is sparse (a real JSONL tail); the others are streamed JSONL.
SIZES = [_size(s) for s in (1 * KiB, 1 * MiB, 100 * MiB, 1 * GiB)]
DIGEST_SIZES = [_size(s) for s in (1 * MiB, 100 * MiB)]


@pytest.fixture(params=["naive", pytest.param("cffi", marks=pytest.mark.cffi), "python"], ids=str)
def path_kind(request: pytest.FixtureRequest) -> str:
    """The three ways to validate an append: without sessionfence, pure, C."""
    value: str = request.param
    return value


def _impl(kind: str) -> ModuleType:
    import importlib

    return importlib.import_module(f"sessionfence._impl_{'cffi' if kind == 'cffi' else 'py'}")


# --- fingerprint ------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_fingerprint(
    benchmark: Benchmark, impl: ModuleType, make_transcript: Callable[[int], Path], size: int
) -> None:
    path = str(make_transcript(size))
    benchmark.group = f"fingerprint-{benchsuite.size_id(size)}"
    fp = benchmark(impl.fingerprint, path)
    assert fp.size == size


def test_probe_fingerprint_unchanged(
    benchmark: Benchmark, impl: ModuleType, make_transcript: Callable[[int], Path]
) -> None:
    path = str(make_transcript(1 * MiB))
    benchmark.group = "probe-unchanged-1MiB"
    with impl.FileProbe(path) as probe:
        probe.fingerprint()
        fp = benchmark(probe.fingerprint)
    assert fp.exists


def test_os_stat_baseline(benchmark: Benchmark, make_transcript: Callable[[int], Path]) -> None:
    """The floor P3 compares FileProbe.fingerprint() against."""
    path = str(make_transcript(1 * MiB))
    benchmark.group = "probe-unchanged-1MiB"
    st = benchmark(os.stat, path)
    assert st.st_size == 1 * MiB


def test_fingerprint_many(
    benchmark: Benchmark, impl: ModuleType, many_transcripts: list[str]
) -> None:
    benchmark.group = f"fingerprint_many-{len(many_transcripts)}"
    fps = benchmark(impl.fingerprint_many, many_transcripts)
    assert len(fps) == len(many_transcripts)


@pytest.mark.parametrize("threads", [1, 2])
def test_fingerprint_many_threads(
    benchmark: Benchmark, impl: ModuleType, many_transcripts: list[str], threads: int
) -> None:
    """The same work (the list twice) on 1 or 2 threads: time ratio = throughput ratio."""
    benchmark.group = f"fingerprint_many-threads-{impl.NAME}"
    fn = impl.fingerprint_many
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(fn, [many_transcripts] * threads))  # start the workers before timing

        def twice() -> None:
            if threads == 1:
                fn(many_transcripts)
                fn(many_transcripts)
            else:
                for f in [pool.submit(fn, many_transcripts) for _ in range(2)]:
                    f.result()

        benchmark(twice)


# --- append validation ------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_check_after_append(
    benchmark: Benchmark, path_kind: str, make_transcript: Callable[[int], Path], size: int
) -> None:
    """Proving that a 1 KiB append was only that: the 'after' half of owned validation.

    naive: re-read the whole file as UTF-8 and compare it with the text read before the
    append (read in the untimed setup). python/cffi: ``check_append(before)``. The file is
    restored to its size before every round.
    """
    path = make_transcript(size)
    benchmark.group = f"append-check-{benchsuite.size_id(size)}"
    v = benchsuite.AppendValidation(path)
    line = v.line

    if path_kind == "naive":
        text = line.decode()

        def setup_naive() -> tuple[tuple[Any, ...], dict[str, Any]]:
            v.reset()
            with open(path, "rb") as f:
                before = f.read().decode("utf-8")
            v.append()
            return (before,), {}

        def check_naive(before: str) -> bool:
            with open(path, "rb") as f:
                after = f.read().decode("utf-8")
            return after.startswith(before) and after[len(before) :] == text

        rounds = 3 if size >= 100 * MiB else 50
        ok = benchmark.pedantic(check_naive, setup=setup_naive, rounds=rounds, warmup_rounds=1)
        v.reset()  # other tests share the file
        assert ok
        return

    impl = _impl(path_kind)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        v.reset()
        before = impl.fingerprint(path)
        v.append()
        return (path, before), {}

    change = benchmark.pedantic(impl.check_append, setup=setup, rounds=300, warmup_rounds=5)
    v.reset()
    assert change.kind is ChangeKind.APPENDED and change.appended == line


# --- content digest ---------------------------------------------------------------------


@pytest.fixture(params=["read", pytest.param("cffi", marks=pytest.mark.cffi), "python"], ids=str)
def digest_kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def _read_all(path: str) -> int:
    with open(path, "rb") as f:
        return len(f.read())


@pytest.mark.parametrize("size", DIGEST_SIZES)
def test_content_digest(
    benchmark: Benchmark, digest_kind: str, make_transcript: Callable[[int], Path], size: int
) -> None:
    """content_digest against the plain read of the same file into memory (P6)."""
    path = str(make_transcript(size))
    benchmark.group = f"digest-{benchsuite.size_id(size)}"
    if digest_kind == "read":
        assert benchmark(_read_all, path) == size
    else:
        digest = benchmark(_impl(digest_kind).content_digest, path)
        assert digest == _impl("python" if digest_kind == "cffi" else "cffi").content_digest(path)
