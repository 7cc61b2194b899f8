"""Reliability R4 (SPEC §9, lock-anchors §7 row 11, §9 R4): fault injection on the append, repair
and lock paths, SQLite style: every syscall site x {short write, short write then ENOSPC,
ENOSPC, EIO, EINTR} x {fail once, fail from then on} x call index n = 1 .. (calls the
unfaulted operation makes at that site).

Faults are injected by swapping the ``os`` module seen by sessionfence's own modules for a
proxy (and ``fcntl.flock`` for the lock), so only the code under test sees them. A failing
``close`` closes first and then reports the error, as Linux does. Each case must end in a
documented state:

- append: the transcript is its previous content (error raised, model unchanged), or
  previous + the whole line (success; or an error raised after the write landed), or
  previous + a partial line *reported* by the error and detected afterwards as a torn tail
  that appends refuse and ``repair_torn_tail()`` quarantines byte for byte;
- repair: the transcript still holds its torn tail, or it ends at its last newline and a
  quarantine file holds exactly the torn bytes; never truncated without that copy;
- lock: after a failed acquire nobody holds the lock (independent flock probe) and this
  process claims nothing, so the next acquire succeeds; after release the lock is free
  whatever the release path hit;
- no descriptor leaks (``/proc/self/fd`` counted before and after every case).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sessionfence import (
    TornTranscriptError,
    _util,
    acquire_session_write_lock,
)
from sessionfence.lock import _acquire as lock
from sessionfence.lock import _os as _lock_os
from sessionfence.lock import _registry as _lock_registry
from sessionfence.transcript import SessionManager
from sessionfence.transcript import _io as _transcript_io
from sessionfence.transcript import _manager as transcript

from ..lock.helpers import probe_held
from .helpers import HEADER, open_fds

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/fd and flock"),
    pytest.mark.timeout(240),
]

ERRORS = {"ENOSPC": errno.ENOSPC, "EIO": errno.EIO, "EINTR": errno.EINTR}
KINDS = ("short", "short_enospc", *ERRORS)
WRITES = {"write", "pwrite"}


@dataclass
class Fault:
    site: str
    kind: str  # one of KINDS
    always: bool  # fail from call ``at`` on, or only at call ``at``
    at: int = 1
    after: str | None = None  # count calls only once this other site has been called

    def __str__(self) -> str:
        after = f" after {self.after}" if self.after else ""
        return f"{self.site}:{self.kind}:{'always' if self.always else 'once'}@{self.at}{after}"


class Injector:
    """Counts calls per site and fails the chosen one as the fault says."""

    def __init__(self, fault: Fault | None) -> None:
        self.fault = fault
        self.calls: Counter[str] = Counter()
        self.counted = 0  # calls of the fault's site since its ``after`` site was called
        self.fired = 0

    def wrap(self, site: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[site] += 1
            fault = self.fault
            if fault is None or fault.site != site:
                return real(*args, **kwargs)
            if fault.after is not None and not self.calls[fault.after]:
                return real(*args, **kwargs)
            self.counted += 1
            n = self.counted
            if n < fault.at:
                return real(*args, **kwargs)
            if n > fault.at and not fault.always:
                return real(*args, **kwargs)
            self.fired += 1
            kind = fault.kind
            if kind.startswith("short") and site in WRITES:
                if kind == "short_enospc" and n > fault.at:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                fd, data, *rest = args
                view = memoryview(data)
                return real(fd, view[: max(1, len(view) // 2)], *rest)
            if kind.startswith("short"):
                return real(*args, **kwargs)  # a short write only exists for writes
            code = ERRORS[kind]
            if site == "close":
                real(*args, **kwargs)  # Linux frees the descriptor even when close fails
            raise OSError(code, os.strerror(code))

        return call


class FaultyOS:
    """``os`` as sessionfence's modules see it, with some functions wrapped."""

    def __init__(self, injector: Injector, sites: tuple[str, ...]) -> None:
        self._wrapped = {site: injector.wrap(site, getattr(os, site)) for site in sites}

    def __getattr__(self, name: str) -> Any:
        wrapped = self._wrapped.get(name)
        return wrapped if wrapped is not None else getattr(os, name)


APPEND_SITES = ("open", "fstat", "pread", "write", "close")
REPAIR_SITES = ("open", "fstat", "pread", "write", "fsync", "ftruncate", "close")
LOCK_SITES = ("open", "fstat", "pread", "pwrite", "lstat", "close", "ftruncate")


@contextmanager
def injected(
    modules: tuple[ModuleType, ...], sites: tuple[str, ...], fault: Fault | None
) -> Iterator[Injector]:
    injector = Injector(fault)
    proxy = FaultyOS(injector, sites)
    real_flock = fcntl.flock
    saved = [(m, m.os) for m in modules]
    for module in modules:
        setattr(module, "os", proxy)  # noqa: B010 (a module attribute mypy cannot see)
    fcntl.flock = injector.wrap("flock", real_flock)
    try:
        yield injector
    finally:
        fcntl.flock = real_flock
        for module, real in saved:
            setattr(module, "os", real)  # noqa: B010


def cases(
    modules: tuple[ModuleType, ...],
    sites: tuple[str, ...],
    prepare: Callable[[], Callable[[], Any]],
    late: tuple[tuple[str, str], ...] = (),
) -> list[Fault]:
    """Every fault for every call an unfaulted run of the operation ``prepare()`` returns
    makes (the preparation itself is not counted); ``late`` adds (site, after) faults at
    the first calls of a site after another one."""
    operation = prepare()
    with injected(modules, sites, None) as counter:
        operation()
    faults = []
    for site, calls in sorted(counter.calls.items()):
        # Every call index of a site called a few times. The torn-tail settle loop polls
        # fstat/pread a timing-dependent number of times with nothing new between polls:
        # there only its first calls are fixed points; ``late`` reaches the calls after it.
        indices = range(1, min(calls, 6) + 1)
        for kind in KINDS:
            if kind.startswith("short") and site not in WRITES:
                continue
            for always in (False, True):
                faults += [Fault(site, kind, always, n) for n in indices]
                faults += [Fault(s, kind, always, 1, a) for s, a in late if s == site]
    return faults


# -- append ----------------------------------------------------------------------------------

APPEND_MODULES = (transcript, _transcript_io, _util)
BASE = HEADER + b"".join(
    json.dumps({"type": "custom", "customType": "x", "id": f"e{i}", "parentId": None}).encode()
    + b"\n"
    for i in range(3)
)
MESSAGE = {"role": "user", "content": "fault-injected " * 40}


def check_append_case(path: Path, fault: Fault, states: Counter[str]) -> None:
    path.write_bytes(BASE)
    manager = SessionManager.open(path)
    entries = len(manager.entries)
    fds = open_fds()
    error: BaseException | None = None
    with injected(APPEND_MODULES, APPEND_SITES, fault) as injector:
        try:
            manager.append_message(MESSAGE)
        except OSError as exc:
            error = exc
    assert injector.fired, f"{fault} never fired"
    assert open_fds() == fds, f"{fault}: descriptor leak"
    after = path.read_bytes()
    assert after.startswith(BASE), f"{fault}: earlier bytes changed"
    added = after[len(BASE) :]
    if error is None:
        # success: exactly one whole line, our entry, and the model has it
        assert added.endswith(b"\n") and added.count(b"\n") == 1, fault
        assert json.loads(added)["message"] == MESSAGE
        assert len(manager.entries) == entries + 1
        states["appended"] += 1
    elif not added:
        assert len(manager.entries) == entries, f"{fault}: model has a line the file lacks"
        states["unchanged+error"] += 1
    elif added.endswith(b"\n"):
        # the line landed, then a later call (fstat, close) failed: reported, whole
        assert json.loads(added)["message"] == MESSAGE, fault
        states["whole_line+error"] += 1
    else:
        # a partial line: reported by the error, and from now on a torn tail
        assert b"\n" not in added, fault
        assert len(manager.entries) == entries
        fresh = SessionManager.open(path)
        assert fresh.torn_tail == (len(BASE), len(added)), fault
        with pytest.raises(TornTranscriptError):
            manager.append_message(MESSAGE)
        assert path.read_bytes() == after, f"{fault}: appended after a torn line"
        quarantine = fresh.repair_torn_tail()
        assert quarantine is not None and Path(quarantine).read_bytes() == added
        os.unlink(quarantine)
        assert path.read_bytes() == BASE
        states["torn+error"] += 1
    # unfaulted, the same manager (or a fresh one after a repair) appends again
    again = SessionManager.open(path)
    again.append_message({"role": "user", "content": "after the fault"})
    final = path.read_bytes()
    assert final.endswith(b"\n") and SessionManager.open(path).torn_tail is None
    assert open_fds() == fds


def test_append_faults_end_in_a_documented_state(tmp_path: Path) -> None:
    path = tmp_path / "session.jsonl"

    def prepare() -> Callable[[], Any]:
        path.write_bytes(BASE)
        manager = SessionManager.open(path)
        return lambda: manager.append_message(MESSAGE)

    faults = cases(APPEND_MODULES, APPEND_SITES, prepare)
    states: Counter[str] = Counter()
    for fault in faults:
        check_append_case(path, fault, states)
    sites = Counter(f.site for f in faults)
    print(f"\nappend faults: {len(faults)} cases {dict(sites)} -> {dict(states)}")
    assert {"write", "open", "fstat", "close"} <= set(sites)
    # the states that matter were reached: clean refusal, short write completed, torn + reported
    assert states["unchanged+error"] and states["appended"] and states["torn+error"]


# -- torn-tail repair ------------------------------------------------------------------------

TORN = b'{"type":"custom","customType":"x","id":"torn","da'


def check_repair_case(path: Path, fault: Fault, states: Counter[str]) -> None:
    for leftover in path.parent.glob("*.torn-*"):
        leftover.unlink()
    path.write_bytes(BASE + TORN)
    manager = SessionManager.open(path)
    assert manager.torn_tail == (len(BASE), len(TORN))
    fds = open_fds()
    error: BaseException | None = None
    result: str | None = None
    with injected(APPEND_MODULES, REPAIR_SITES, fault) as injector:
        try:
            result = manager.repair_torn_tail()
        except OSError as exc:
            error = exc
    assert injector.fired, f"{fault} never fired"
    assert open_fds() == fds, f"{fault}: descriptor leak"
    after = path.read_bytes()
    copies = [p.read_bytes() for p in path.parent.glob("*.torn-*")]
    if after == BASE + TORN:
        assert error is not None, f"{fault}: no error, yet nothing repaired"
        states["untouched+error"] += 1
    else:
        assert after == BASE, f"{fault}: transcript left as {after[-80:]!r}"
        # truncated: only ever with a complete quarantine copy on disk
        assert TORN in copies, f"{fault}: torn bytes lost"
        states["repaired" if error is None else "repaired+error"] += 1
        if error is None:
            assert result is not None and Path(result).read_bytes() == TORN
    # unfaulted, a repair (if still needed) and an append succeed
    again = SessionManager.open(path)
    again.repair_torn_tail()
    again.append_message({"role": "user", "content": "after the fault"})
    assert SessionManager.open(path).torn_tail is None


def test_repair_faults_never_truncate_without_a_quarantine_copy(tmp_path: Path) -> None:
    path = tmp_path / "session.jsonl"

    def prepare() -> Callable[[], Any]:
        path.write_bytes(BASE + TORN)
        return SessionManager.open(path).repair_torn_tail

    # fstat after the quarantine write: the "did it grow meanwhile" check before truncating
    faults = cases(APPEND_MODULES, REPAIR_SITES, prepare, late=(("fstat", "write"),))
    # EINTR takes the same path as EIO here; leaving it out halves the settle waits
    faults = [f for f in faults if f.kind != "EINTR"]
    states: Counter[str] = Counter()
    for fault in faults:
        check_repair_case(path, fault, states)
    print(f"\nrepair faults: {len(faults)} cases -> {dict(states)}")
    assert states["untouched+error"] and states["repaired"]


# -- lock ------------------------------------------------------------------------------------

LOCK_MODULES = (_lock_os, lock, _util)  # _util: the shared positional I/O


def assert_lock_free(path: Path, lock_path: str, label: str) -> None:
    assert not probe_held(lock_path), f"{label}: lock still held"
    assert not _lock_registry.held and not _lock_registry.claimed, f"{label}: registry leak"
    again = acquire_session_write_lock(path, timeout=0)
    again.release()


def test_acquire_faults_leave_the_lock_free_or_held_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "session.jsonl"
    path.write_bytes(BASE)
    lock_path = _lock_os.lock_path_for(path)[1]

    # the count run includes the release; extra call indices simply never fire
    faults = cases(
        LOCK_MODULES,
        LOCK_SITES,
        lambda: lambda: acquire_session_write_lock(path, timeout=0).release(),
    )
    faults = [f for f in faults if not f.kind.startswith("short") or f.site == "pwrite"]
    states: Counter[str] = Counter()
    for fault in faults:
        fds = open_fds()
        held = None
        error: BaseException | None = None
        with injected(LOCK_MODULES, LOCK_SITES, fault) as injector:
            try:
                held = acquire_session_write_lock(path, timeout=0)
            except OSError as exc:
                error = exc
        if not injector.fired:
            if held is not None:
                held.release()
            continue
        if held is not None:
            assert error is None
            assert held.held and probe_held(lock_path), f"{fault}: reported held, is not"
            held.release()
            states["held"] += 1
        else:
            states[f"refused:{type(error).__name__}"] += 1
        assert open_fds() == fds, f"{fault}: descriptor leak"
        assert_lock_free(path, lock_path, str(fault))
    print(f"\nacquire faults: {sum(states.values())} cases -> {dict(states)}")
    assert states["held"] and sum(v for k, v in states.items() if k.startswith("refused"))


def test_release_faults_still_free_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "session.jsonl"
    path.write_bytes(BASE)
    lock_path = _lock_os.lock_path_for(path)[1]
    states: Counter[str] = Counter()
    for site in ("pwrite", "flock", "close"):
        for kind in ("EIO", "ENOSPC", "EINTR", "short"):
            if kind == "short" and site != "pwrite":
                continue
            for always in (False, True):
                fault = Fault(site, kind, always)
                fds = open_fds()
                held = acquire_session_write_lock(path, timeout=0)
                with injected(LOCK_MODULES, LOCK_SITES, fault) as injector:
                    held.release()  # never raises: the lock goes with the descriptor
                assert injector.fired, fault
                assert not held.held
                assert open_fds() == fds, f"{fault}: descriptor leak"
                assert_lock_free(path, lock_path, str(fault))
                states[site] += 1
    print(f"\nrelease faults: {sum(states.values())} cases {dict(states)}")


def test_repair_failing_after_truncate_keeps_the_manager_digest_true(tmp_path: Path) -> None:
    path = tmp_path / "session.jsonl"
    path.write_bytes(BASE + TORN)
    manager = SessionManager.open(path)
    # calls of fsync: quarantine file, its directory, then the truncated transcript
    fault = Fault("fsync", "EIO", False, 3)
    with injected(APPEND_MODULES, REPAIR_SITES, fault) as injector, pytest.raises(OSError):
        manager.repair_torn_tail()
    assert injector.fired and path.read_bytes() == BASE
    manager.append_message({"role": "user", "content": "after the failed repair"})
    size = manager.digest_size
    assert size <= path.stat().st_size
    from_disk = _transcript_io_digest(path, size)
    assert manager.digest.intdigest() == from_disk


def _transcript_io_digest(path: Path, size: int) -> int:
    import sessionfence

    return int(sessionfence.RollingDigest.from_file(str(path), size).intdigest())
