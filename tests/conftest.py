"""Shared fixtures. Every hot-path test takes ``impl`` and so runs on both backends."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from sessionfence import _backend
from sessionfence._backend import IMPLEMENTATIONS, HotPath


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-cffi",
        action="store_true",
        default=False,
        help="deselect the C-backend tests (pure-Python installs only)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--no-cffi"):
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("cffi") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(
    scope="session",
    params=[pytest.param("cffi", marks=pytest.mark.cffi), "python"],
    ids=str,
)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """The backend module under test. A missing C extension is an error, never a skip."""
    return importlib.import_module(IMPLEMENTATIONS[request.param])


@pytest.fixture
def transcript(tmp_path: Path) -> Path:
    path = tmp_path / "session.jsonl"
    path.write_bytes(b'{"type":"session"}\n')
    return path


@pytest.fixture(
    name="backend", params=[pytest.param("cffi", marks=pytest.mark.cffi), "python"], ids=str
)
def backend_fixture(request: pytest.FixtureRequest) -> Iterator[HotPath]:
    """Controllers and managers created in the test use this backend (``_backend.use``),
    with the process-wide fence state reset around the test."""
    from sessionfence.controller import reset_for_tests

    with _backend.use(request.param) as impl:
        reset_for_tests()
        yield impl
        reset_for_tests()


@pytest.fixture(name="session_file")
def session_file_fixture(tmp_path: Path) -> Path:
    """A transcript holding only a session header."""
    path = tmp_path / "session.jsonl"
    path.write_bytes(b'{"type":"session"}\n')
    return path


@pytest.fixture
def no_lock_left_held() -> Iterator[None]:
    """After the test, this process holds no session write lock: a leaked hold would skew
    later lock tests (the tests that use it dispose of every controller they create)."""
    yield
    from sessionfence.lock import _registry

    assert not _registry.held, "a test left a session write lock held"
