"""Every public error crosses a process boundary intact (issue 12).

The fleet and any multiprocessing user pass errors between processes: an error must
unpickle into the same class with every field and the same message, both through
``pickle`` and through a real spawned child (whose result travels back by pickle). The
classes live in ``sessionfence.errors``, are importable from ``sessionfence`` and print as
``sessionfence.X``; the two timeouts are also ``TimeoutError``.
"""

from __future__ import annotations

import math
import multiprocessing
import pickle
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

import sessionfence
import sessionfence.errors
from sessionfence import Fingerprint

BEFORE = Fingerprint(True, 1, 2, 300, 4_000, 5_000, 300, 0xDEAD)
AFTER = Fingerprint(True, 1, 9, 10, 6_000, 7_000, 10, 0xBEEF)


def _samples() -> dict[str, tuple[Callable[[], BaseException], dict[str, Any], str]]:
    """name -> (factory, fields, message); messages are the ones SPEC §4 fixes."""
    e = sessionfence.errors
    return {
        "UnstableFileError": (
            lambda: e.UnstableFileError("/s/a.jsonl", 64),
            {"attempts": 64, "filename": "/s/a.jsonl", "errno": 11},
            "[Errno 11] file kept changing during 64 stable-read attempts: '/s/a.jsonl'",
        ),
        "SessionWriteLockAcquireError": (
            lambda: e.SessionWriteLockAcquireError("cannot take the lock"),
            {},
            "cannot take the lock",
        ),
        "SessionWriteLockTimeoutError": (
            lambda: e.SessionWriteLockTimeoutError(1500, "pid=12 host=h alive=true", "/s/a.lock"),
            {"timeout_ms": 1500, "owner": "pid=12 host=h alive=true", "lock_path": "/s/a.lock"},
            "session file locked (timeout 1500ms): pid=12 host=h alive=true /s/a.lock",
        ),
        "SessionWriteLockStaleError": (
            lambda: e.SessionWriteLockStaleError(
                "pid=12 host=h alive=true ageMs=5000", "/s/a.lock", ["too-old", "hold-exceeded"]
            ),
            {
                "owner": "pid=12 host=h alive=true ageMs=5000",
                "lock_path": "/s/a.lock",
                "stale_reasons": ["too-old", "hold-exceeded"],
            },
            "session file lock stale (too-old, hold-exceeded): "
            "pid=12 host=h alive=true ageMs=5000 /s/a.lock",
        ),
        "SessionTakeoverError": (
            lambda: e.SessionTakeoverError(
                "/s/a.jsonl", "fence_check", "foreign-append", BEFORE, AFTER, "custom at 300"
            ),
            {
                "session_file": "/s/a.jsonl",
                "phase": "fence_check",
                "reason": "foreign-append",
                "before": BEFORE,
                "after": AFTER,
                "detail": "custom at 300",
            },
            "session file changed while prompt lock was released: /s/a.jsonl (phase: fence_check)",
        ),
        "SessionSupersededError": (
            lambda: e.SessionSupersededError(
                "/s/a.jsonl", "prompt_reacquire", "run-a", 3, "run-b", 4, BEFORE, AFTER
            ),
            {
                "session_file": "/s/a.jsonl",
                "phase": "prompt_reacquire",
                "reason": "superseded",
                "run_id": "run-a",
                "revision": 3,
                "superseded_by": "run-b",
                "new_revision": 4,
                "before": BEFORE,
                "after": AFTER,
                "detail": "run run-a (revision 3) was superseded by run run-b (revision 4)",
            },
            "session file changed while prompt lock was released: /s/a.jsonl "
            "(phase: prompt_reacquire)",
        ),
        "JournalError": (
            lambda: e.JournalError("/s/a.jsonl.fence", "record 7: CRC mismatch"),
            {"journal_path": "/s/a.jsonl.fence", "detail": "record 7: CRC mismatch"},
            "session journal cannot be trusted (record 7: CRC mismatch): /s/a.jsonl.fence",
        ),
        "TornTranscriptError": (
            lambda: e.TornTranscriptError("/s/a.jsonl", 120, 17),
            {"session_file": "/s/a.jsonl", "offset": 120, "length": 17},
            "transcript ends with a torn line (17 bytes at offset 120); "
            "run repair_torn_tail() before appending: /s/a.jsonl",
        ),
        "SessionFileOwnerTimeoutError": (
            lambda: e.SessionFileOwnerTimeoutError(250.0, "/s/a.jsonl"),
            {"timeout_ms": 250.0, "session_file": "/s/a.jsonl"},
            "timed out waiting for session file owner after 250ms: /s/a.jsonl",
        ),
        "TranscriptFormatError": (
            lambda: e.TranscriptFormatError("not a format we append to"),
            {},
            "not a format we append to",
        ),
        "NotASessionError": (
            lambda: e.NotASessionError("/s/a.jsonl", "a Claude Code log"),
            {"session_file": "/s/a.jsonl", "looks_like": "a Claude Code log"},
            "not a session transcript: a Claude Code log; nothing was written: /s/a.jsonl",
        ),
        "TranscriptNeedsMigrationError": (
            lambda: e.TranscriptNeedsMigrationError("/s/a.jsonl", 1),
            {"session_file": "/s/a.jsonl", "version": 1},
            "transcript is a pre-tree (v1) session, which pi-mono and openclaw rewrite with new "
            "entry ids on their next open; nothing was written. Migrate it first with "
            "`sessionfence migrate /s/a.jsonl` (or sessionfence.migrate_transcript(path)) and "
            "reopen it: /s/a.jsonl",
        ),
        "LockInheritedError": (
            lambda: e.LockInheritedError("/s/a.jsonl.lock"),
            {"lock_path": "/s/a.jsonl.lock"},
            "session write lock was inherited across fork; the child does not hold it: "
            "/s/a.jsonl.lock",
        ),
        "TranscriptChangedError": (
            lambda: e.TranscriptChangedError("transcript was emptied behind this manager: /s/a"),
            {},
            "transcript was emptied behind this manager: /s/a",
        ),
    }


NAMES = sorted(_samples())


def _fields(error: BaseException, names: dict[str, Any]) -> dict[str, Any]:
    return {name: getattr(error, name) for name in names}


def _assert_same(got: BaseException, name: str) -> None:
    _factory, fields, message = _samples()[name]
    assert type(got) is getattr(sessionfence, name)
    assert _fields(got, fields) == fields
    assert str(got) == message


def test_samples_cover_every_public_error() -> None:
    assert set(NAMES) == set(sessionfence.errors.__all__)
    for name in NAMES:
        assert name in sessionfence.__all__


@pytest.mark.parametrize("name", NAMES)
def test_message_and_fields(name: str) -> None:
    _assert_same(_samples()[name][0](), name)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_round_trip(name: str, protocol: int) -> None:
    original = _samples()[name][0]()
    original.add_note("seen by worker 3")
    copy = pickle.loads(pickle.dumps(original, protocol=protocol))
    _assert_same(copy, name)
    assert copy.args == original.args
    assert getattr(copy, "__notes__", None) == ["seen by worker 3"]


# -- through a real child process (spawn: a fresh interpreter, nothing inherited) -----------


def _raise_in_child(name: str) -> None:
    raise _samples()[name][0]()


def _describe_in_child(error: BaseException) -> tuple[str, str, dict[str, Any]]:
    name = type(error).__name__
    return type(error).__module__ + "." + name, str(error), _fields(error, _samples()[name][1])


@pytest.fixture(scope="module")
def child() -> Iterator[ProcessPoolExecutor]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.mark.parametrize("name", NAMES)
def test_raised_in_a_spawned_child(child: ProcessPoolExecutor, name: str) -> None:
    with pytest.raises(getattr(sessionfence, name)) as caught:
        child.submit(_raise_in_child, name).result(timeout=120)
    _assert_same(caught.value, name)


@pytest.mark.parametrize("name", NAMES)
def test_sent_to_a_spawned_child(child: ProcessPoolExecutor, name: str) -> None:
    _factory, fields, message = _samples()[name]
    qualified, text, got = child.submit(_describe_in_child, _factory()).result(timeout=120)
    assert (qualified, text, got) == (f"sessionfence.{name}", message, fields)


# -- what callers catch and what tracebacks say ----------------------------------------------


def test_timeouts_are_timeout_errors() -> None:
    lock_timeout = sessionfence.SessionWriteLockTimeoutError(math.inf, "pid=1", "/s/a.lock")
    owner_timeout = sessionfence.SessionFileOwnerTimeoutError(10, "/s/a.jsonl")
    for error in (lock_timeout, owner_timeout):
        assert isinstance(error, TimeoutError)
    assert isinstance(lock_timeout, sessionfence.SessionWriteLockAcquireError)
    assert str(lock_timeout) == "session file locked (timeout infms): pid=1 /s/a.lock"
    assert pickle.loads(pickle.dumps(lock_timeout)).timeout_ms == math.inf
    # TimeoutError is an OSError, but these carry no errno: their message is the SPEC's.
    assert lock_timeout.errno is None and owner_timeout.errno is None


@pytest.mark.parametrize("name", NAMES)
def test_printed_as_sessionfence_x(name: str) -> None:
    cls = getattr(sessionfence, name)
    assert cls is getattr(sessionfence.errors, name)
    assert cls.__module__ == "sessionfence"
    assert repr(cls) == f"<class 'sessionfence.{name}'>"
    line = traceback.format_exception_only(_samples()[name][0]())[-1]
    assert line.startswith(f"sessionfence.{name}: ")


def test_moved_errors_stay_importable_from_their_old_modules() -> None:
    from sessionfence.lock import LockInheritedError
    from sessionfence.lock._acquire import LockInheritedError as from_acquire
    from sessionfence.transcript import TranscriptChangedError
    from sessionfence.transcript._manager import TranscriptChangedError as from_manager

    assert LockInheritedError is from_acquire is sessionfence.errors.LockInheritedError
    assert TranscriptChangedError is from_manager is sessionfence.errors.TranscriptChangedError
    assert issubclass(LockInheritedError, RuntimeError)
    assert issubclass(TranscriptChangedError, RuntimeError)


def test_takeover_reasons_include_every_reason_the_controller_raises() -> None:
    # SPEC §4's list, with "superseded" (writer claims) and "journal-invalid" (the journal
    # fails closed; issue 13).
    documented = {
        "replaced",
        "truncated",
        "rewritten",
        "deleted",
        "created",
        "foreign-append",
        "merge-rejected",
        "reload-failed",
        "lock-timeout",
        "lock-stale",
        "lock-lost",
        "superseded",
        "journal-invalid",
    }
    assert documented == sessionfence.errors.TAKEOVER_REASONS
