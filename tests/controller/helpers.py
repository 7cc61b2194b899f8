"""Helpers of the controller tests: transcript lines, external writers, an injected
counting lock, a merge spy (no tests of its own).

The fixtures live in ``tests/conftest.py``: controller test modules say
``pytestmark = pytest.mark.usefixtures("backend")``, which runs each test once with the C
hot path and once with the pure-Python one (``_backend.use``) and resets all
process-wide fence state around it; ``session_file`` is a header-only transcript.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sessionfence import SessionWriteLockStaleError, SessionWriteLockTimeoutError
from sessionfence.controller import SessionFenceController
from sessionfence.transcript import (
    is_expected_compaction_append as is_expected_compaction,
)

LOCK_OPTIONS = {"timeout": 60.0, "stale": 1800.0, "max_hold": 300.0}


# -- transcript lines -------------------------------------------------------------------------


def new_id() -> str:
    return secrets.token_hex(4)


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def entry(kind: str, parent_id: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "id": new_id(), "parentId": parent_id, "timestamp": now_iso(), **fields}


def mirror_message(text: str = "mirrored", **extra: Any) -> dict[str, Any]:
    message = {
        "role": "assistant",
        "content": [{"type": "text", "text": text}],
        "provider": "openclaw",
        "model": "delivery-mirror",
    }
    return entry("message", message=message, **extra)


def user_message(text: str = "hello") -> dict[str, Any]:
    return entry("message", message={"role": "user", "content": text})


def assistant_message(text: str = "answer") -> dict[str, Any]:
    message = {"role": "assistant", "content": [{"type": "text", "text": text}]}
    return entry("message", message=message, provider="anthropic", model="claude")


def compaction(summary: str = "summary", first_kept: str = "00000000") -> dict[str, Any]:
    return entry("compaction", summary=summary, firstKeptEntryId=first_kept, tokensBefore=1234)


def line(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


def append_entries(path: Path, *entries: Any) -> bytes:
    """An external writer: one write of whole lines, as a delivery mirror would. Returns
    the bytes written (what ``refresh_after_owned_write(written)`` is told it wrote)."""
    data = "".join(line(e) for e in entries).encode("utf-8")
    with open(path, "ab") as handle:
        handle.write(data)
    return data


def append_raw(path: Path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


def rewrite_in_place(path: Path, data: bytes, *, keep_mtime: bool = False) -> None:
    """Same inode, new bytes (optionally with the old mtime put back)."""
    st = os.stat(path)
    with open(path, "r+b") as handle:
        handle.write(data)
        handle.truncate(len(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def write_at(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes in place (same inode, same size when within the file)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def read_entries(path: Path) -> list[Any]:
    return [json.loads(x) for x in path.read_text("utf-8").splitlines() if x.strip()]


def compaction_append(
    path: Path, *, interleave: Callable[[], None] | None = None
) -> Callable[[], str]:
    """A session manager's appendCompaction: appends one compaction line, returns its id.
    ``interleave`` runs between the open and the write (an external writer racing it)."""

    def run() -> str:
        item = compaction()
        if interleave is not None:
            interleave()
        append_entries(path, item)
        return str(item["id"])

    return run


# -- an injected lock that counts -------------------------------------------------------------


class FakeLock:
    """A lock with a synchronous release, like the real SessionWriteLock."""

    def __init__(self, locks: Locks, label: str) -> None:
        self.locks = locks
        self.label = label
        self.released = 0

    def release(self) -> None:
        self.released += 1
        self.locks.events.append(f"release:{self.label}")
        self.locks.releases.append(self.label)


class AsyncFakeLock(FakeLock):
    """A lock whose release is a coroutine that can be held open by a gate."""

    async def release(self) -> None:  # type: ignore[override]
        self.released += 1
        self.locks.events.append(f"release:{self.label}")
        gate = self.locks.release_gates.get(self.label)
        if gate is not None:
            self.locks.events.append(f"release-start:{self.label}")
            await gate.wait()
            self.locks.events.append(f"release-end:{self.label}")
        self.locks.releases.append(self.label)


class Locks:
    """``acquire`` for SessionFenceController.create that records every call, hands out
    labelled locks, and can fail (timeout/stale) or block on chosen acquisitions."""

    def __init__(self, labels: list[str] | None = None, *, async_release: bool = False) -> None:
        self.labels = list(labels or [])
        self.calls: list[tuple[Any, dict[str, Any]]] = []
        self.events: list[str] = []
        self.releases: list[str] = []
        self.handed: list[FakeLock] = []
        self.failures: dict[int, BaseException] = {}
        self.acquire_gates: dict[int, asyncio.Event] = {}
        self.release_gates: dict[str, asyncio.Event] = {}
        self.async_release = async_release

    @property
    def acquisitions(self) -> int:
        return len(self.calls)

    def fail(self, index: int, kind: str = "timeout") -> None:
        error: BaseException
        if kind == "stale":
            error = SessionWriteLockStaleError("pid=1 alive=true", "x.lock", ["too-old"])
        else:
            error = SessionWriteLockTimeoutError(60000, "pid=1 alive=true", "x.lock")
        self.failures[index] = error

    async def __call__(self, path: Any, **options: Any) -> FakeLock:
        index = len(self.calls)
        self.calls.append((path, options))
        gate = self.acquire_gates.get(index)
        if gate is not None:
            await gate.wait()
        if index in self.failures:
            raise self.failures[index]
        label = self.labels[index] if index < len(self.labels) else f"lock{index}"
        self.events.append(f"acquire:{label}")
        lock = (AsyncFakeLock if self.async_release else FakeLock)(self, label)
        self.handed.append(lock)
        return lock


async def spin(until: Callable[[], bool] | None = None, *, limit: int = 200) -> None:
    """Yield to the event loop (no wall-clock wait) until ``until()`` holds, or a fixed
    number of turns when no condition is given. Fails loudly instead of hanging."""
    for _ in range(limit):
        if until is not None and until():
            return
        await asyncio.sleep(0)
    if until is not None and not until():
        raise AssertionError("condition not reached after yielding to the event loop")


async def make(path: Path, locks: Locks | None = None, **options: Any) -> SessionFenceController:
    return await SessionFenceController.create(
        path, acquire=locks if locks is not None else Locks(), **options
    )


class MergeSpy:
    """A merge callback that records what it was given."""

    def __init__(self, result: Any = None) -> None:
        self.calls: list[list[Any]] = []
        self.result = result

    def __call__(self, entries: list[Any]) -> Any:
        self.calls.append(entries)
        return self.result


async def owned_step(ctl: Any, path: Path, step: str) -> None:
    """One owned action of the schedule tests: a compaction (owned_file_write with the
    validator), a publication, an ordinary write scope, or an append vouched for with
    refresh_after_owned_write(written)."""
    if step == "compaction":
        ctl.owned_file_write(compaction_append(path), is_expected_compaction)
    elif step == "publication":
        steer = user_message("steer")
        await ctl.with_write_lock(
            lambda: append_entries(path, steer),
            publish_owned_write=True,
            resolve_published_entries=lambda _: [{"kind": "id", "id": steer["id"]}],
        )
    elif step == "ordinary":
        await ctl.with_write_lock(lambda: append_entries(path, user_message("mine")))
    elif step == "refresh":
        ctl.refresh_after_owned_write(append_entries(path, user_message("persisted")))
    else:  # pragma: no cover
        raise AssertionError(step)
