"""Shared fixtures. Every hot-path test takes ``impl`` and so runs on both backends."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

from sessionfence._backend import IMPLEMENTATIONS


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
