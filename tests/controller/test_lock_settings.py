"""The controller's lock times: concrete defaults, operator overrides, explicit arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sessionfence import SessionFenceController, reset_for_tests


class _Lock:
    def release(self) -> None:
        pass


@pytest.fixture(autouse=True)
def _clean_registry() -> Any:
    reset_for_tests()
    yield
    reset_for_tests()


async def _options_seen(path: Path, **kwargs: Any) -> dict[str, float]:
    seen: list[dict[str, float]] = []

    def acquire(session_file: str, **options: float) -> _Lock:
        seen.append(options)
        return _Lock()

    ctl = await SessionFenceController.create(path, acquire=acquire, **kwargs)
    await ctl.dispose()
    return seen[0]


async def test_defaults_reach_acquire_as_numbers(
    transcript: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TIMEOUT", "STALE", "MAX_HOLD"):
        monkeypatch.delenv(f"SESSIONFENCE_LOCK_{name}_MS", raising=False)
    assert await _options_seen(transcript) == {"timeout": 60.0, "stale": 1800.0, "max_hold": 300.0}


async def test_operator_overrides_apply_and_explicit_arguments_win(
    transcript: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SESSIONFENCE_LOCK_TIMEOUT_MS", "2500")
    monkeypatch.setenv("SESSIONFENCE_LOCK_STALE_MS", "90000")
    monkeypatch.setenv("SESSIONFENCE_LOCK_MAX_HOLD_MS", "1e3")  # not decimal digits: ignored
    assert await _options_seen(transcript) == {"timeout": 2.5, "stale": 90.0, "max_hold": 300.0}
    explicit = await _options_seen(transcript, timeout=1.0, max_hold=7.0)
    assert explicit == {"timeout": 1.0, "stale": 90.0, "max_hold": 7.0}


async def test_bad_lock_times_are_refused_before_locking(transcript: Path) -> None:
    with pytest.raises(ValueError, match="stale"):
        await _options_seen(transcript, stale=0)
