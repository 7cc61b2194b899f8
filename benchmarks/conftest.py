"""Fixtures and options shared by every ``benchmarks/test_bench_*.py`` (pytest-benchmark).

Run: ``pytest benchmarks --benchmark-only --benchmark-group-by=group
--benchmark-columns=min,median,ops``. ``--bench-quick`` (or ``SESSIONFENCE_BENCH_QUICK=1``)
deselects the cases marked ``bench_large`` (give that mark to every size of 100 MiB and more)
so that a CI smoke run stays small.

Generated files live in one temporary directory per session (``TMPDIR`` decides where) and
are removed at the end: pytest's own ``tmp_path`` keeps the last three runs, which is not
what a 1 GiB file should do. Large files are sparse with a real JSONL tail.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sessionfence.bench import _suite as benchsuite

# The one backend fixture, shared with the tests (one map: sessionfence._backend).
from tests.conftest import impl  # noqa: F401

QUICK_ENV = "SESSIONFENCE_BENCH_QUICK"

KiB = benchsuite.KiB
MiB = benchsuite.MiB
GiB = benchsuite.GiB


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-quick",
        action="store_true",
        default=False,
        help=f"benchmarks: small sizes only, for a CI smoke run (or {QUICK_ENV}=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Registered here, not in pyproject, so the default test run knows nothing of it.
    config.addinivalue_line(
        "markers", "bench_large: a large-file benchmark case, deselected by --bench-quick"
    )


def is_quick(config: pytest.Config) -> bool:
    env = os.environ.get(QUICK_ENV, "").strip().lower()
    return bool(config.getoption("--bench-quick")) or env in ("1", "true", "yes", "on")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not is_quick(config):
        return
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        (dropped if item.get_closest_marker("bench_large") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def bench_quick(pytestconfig: pytest.Config) -> bool:
    return is_quick(pytestconfig)


@pytest.fixture(scope="session")
def bench_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sessionfence-benchmarks-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def make_transcript(bench_dir: Path) -> Callable[[int], Path]:
    """``make_transcript(size)``: a generated JSONL transcript, made once per session.

    The page cache is warmed (the whole file read once) before it is handed out, so every
    benchmark measures the hot-cache cost.
    """
    made: dict[int, Path] = {}

    def make(size: int) -> Path:
        if size not in made:
            path = benchsuite.write_transcript(bench_dir / f"t-{size}.jsonl", size)
            benchsuite.warm(path)
            made[size] = path
        return made[size]

    return make


@pytest.fixture(scope="session")
def many_transcripts(bench_dir: Path, bench_quick: bool) -> list[str]:
    """1000 small transcripts (1-16 KiB); 100 in quick mode."""
    count = 100 if bench_quick else 1000
    folder = bench_dir / f"many-{count}"
    folder.mkdir()
    paths = []
    for i in range(count):
        path = benchsuite.write_transcript(folder / f"s{i:05d}.jsonl", KiB * (1 + i % 16))
        paths.append(str(path))
    return paths
