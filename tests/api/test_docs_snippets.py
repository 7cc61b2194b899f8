"""Every Python snippet of the README and docs/*.md runs, and the examples do what they say.

Each fenced ```python block of README.md and docs/*.md is written to a file in a fresh
temporary directory and run there as a script (``python snippet.py``, in a subprocess with a
timeout); the test fails when it exits non-zero. A snippet must be complete (imports, its
own input files, ``asyncio.run(main())`` for async code) and exercise what it shows: it
asserts or prints what happened, and a bare ``...`` placeholder statement is refused (it
would make a fragment "pass" without doing anything).

A block that cannot run on purpose is marked by an HTML comment on the line right before
it, with the reason: ``<!-- snippet: no-run: why -->``. Such exceptions are listed in
``NO_RUN`` below and here; a marked block not listed there (or listed and not marked)
fails ``test_no_run_markers_are_the_listed_ones``. Currently: none.

The README's controller example is also run with another writer injected (through a
prelude that wraps public controller methods, the snippet itself unchanged): once during
the model call (the takeover raised when ``prompt_released()`` exits) and once right
before the write (the takeover raised by ``with_write_lock``). Both must be caught by the
snippet's ``except`` and ``dispose()`` must run.

``examples/own_chat_log.py`` (a chat log of one's own format, docs/custom-transcripts.md)
is run as a program, and its policy and write paths are checked in-process: a mirror line
in that format is accepted, a foreign line in that format is a takeover, and so is an own
write the fence was not told about.

These tests need the source checkout (README and docs, or examples); they are skipped where
only ``tests/`` was copied (the wheel test run of ``.ci/wheel.sh``).
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sessionfence import SessionFenceController, SessionTakeoverError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "own_chat_log.py"
CHECKOUT = (ROOT / "README.md").exists()
needs_checkout = pytest.mark.skipif(
    not CHECKOUT, reason="needs the source checkout (README.md, docs/)"
)
needs_example = pytest.mark.skipif(
    not EXAMPLE.exists(), reason="needs the source checkout (examples/)"
)

TIMEOUT = 120  # seconds per snippet; they take well under one
# (file, first line of the block's code) of blocks marked no-run, with the reason.
NO_RUN: dict[tuple[str, int], str] = {}

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
_MARKER = re.compile(r"<!--\s*snippet:\s*no-run\s*(?::\s*(?P<reason>.*?))?\s*-->\s*\Z", re.S)


@dataclass(frozen=True)
class Snippet:
    file: str  # relative to the repository root
    line: int  # line of the block's first code line
    code: str
    no_run: str | None  # the reason, when marked no-run

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def extract(path: Path) -> list[Snippet]:
    """The ```python blocks of a Markdown file, with their no-run markers."""
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(ROOT).as_posix()
    found = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start(1)) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        reason = None
        if marker is not None:
            reason = (marker.group("reason") or "").strip()
            assert reason, f"{rel}:{line}: a no-run marker must say why"
        found.append(Snippet(rel, line, match.group(1), reason))
    return found


def markdown_files() -> list[Path]:
    if not CHECKOUT:
        return []
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_snippets() -> list[Snippet]:
    return [s for path in markdown_files() for s in extract(path)]


def run_script(
    code: str, cwd: Path, *, prelude: str = "", args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as ``snippet.py`` in ``cwd``; ``prelude`` runs first in the same
    process (it may patch public names), leaving the snippet's own line numbers intact."""
    script = cwd / "snippet.py"
    script.write_text(code, encoding="utf-8")
    runner = f"{prelude}\nimport runpy, sys\nsys.argv = {['snippet.py', *args]!r}\n"
    runner += "runpy.run_path('snippet.py', run_name='__main__')\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONFENCE_LOCK_")}
    return subprocess.run(
        [sys.executable, "-c", runner],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _placeholders(code: str) -> list[int]:
    """Lines holding a bare ``...`` statement."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and node.value.value is Ellipsis
    ]


# -- every snippet ------------------------------------------------------------------------------


@needs_checkout
def test_snippets_are_found() -> None:
    """The extraction sees the README's snippets and the docs' (a broken fence regex would
    otherwise make every snippet test vanish)."""
    by_file: dict[str, int] = {}
    for snippet in all_snippets():
        by_file[snippet.file] = by_file.get(snippet.file, 0) + 1
    assert by_file.get("README.md", 0) >= 3, by_file
    assert by_file.get("docs/custom-transcripts.md", 0) >= 3, by_file


@needs_checkout
def test_no_run_markers_are_the_listed_ones() -> None:
    marked = {(s.file, s.line): s.no_run for s in all_snippets() if s.no_run is not None}
    assert marked == NO_RUN


@needs_checkout
@pytest.mark.parametrize("snippet", all_snippets(), ids=lambda s: s.id)
def test_snippet_runs(snippet: Snippet, tmp_path: Path) -> None:
    if snippet.no_run is not None:
        pytest.skip(f"marked no-run: {snippet.no_run}")
    assert not _placeholders(snippet.code), (
        f"{snippet.id}: a bare '...' placeholder (line(s) {_placeholders(snippet.code)} of "
        "the block); make the snippet complete, or mark it no-run with the reason"
    )
    done = run_script(snippet.code, tmp_path)
    assert done.returncode == 0, (
        f"{snippet.id} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    )


# -- the README's controller example catches the takeover ---------------------------------------

FOREIGN_LINE = json.dumps(
    {
        "type": "message",
        "id": "f0f0f0f0",
        "parentId": None,
        "timestamp": "2026-01-01T00:00:00.000Z",
        "message": {"role": "user", "content": "another worker"},
    },
    separators=(",", ":"),
)

# Wraps public methods: dispose() announces itself; the writer injection is per test.
_PRELUDE_BASE = f"""
import sessionfence as _sf
_Ctl = _sf.SessionFenceController
_dispose = _Ctl.dispose
async def _announced_dispose(self):
    await _dispose(self)
    print("DISPOSED")
_Ctl.dispose = _announced_dispose
def _foreign_append(path):
    with open(path, "a", encoding="utf-8") as f:
        f.write({FOREIGN_LINE!r} + "\\n")
"""
_DURING_MODEL_CALL = """
_release = _Ctl.release_for_prompt
async def _release_then_foreign(self):
    await _release(self)
    _foreign_append(self.session_file)  # another worker, while the model thinks
_Ctl.release_for_prompt = _release_then_foreign
"""
_BEFORE_WRITE = """
_wwl = _Ctl.with_write_lock
def _foreign_then_write(self, fn, **options):
    _foreign_append(self.session_file)  # a writer that ignores the lock
    return _wwl(self, fn, **options)
_Ctl.with_write_lock = _foreign_then_write
"""


def _readme_controller_snippet() -> Snippet:
    found = [
        s
        for s in extract(ROOT / "README.md")
        if "prompt_released()" in s.code and "call_model" in s.code
    ]
    assert len(found) == 1, [s.id for s in found]
    return found[0]


@needs_checkout
def test_readme_controller_example_without_takeover(tmp_path: Path) -> None:
    done = run_script(_readme_controller_snippet().code, tmp_path, prelude=_PRELUDE_BASE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("appended "), done.stdout
    assert done.stdout.rstrip().endswith("DISPOSED"), done.stdout
    lines = (tmp_path / "session.jsonl").read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["session", "message", "message"]


@needs_checkout
@pytest.mark.parametrize(
    ("injection", "phase"),
    [(_DURING_MODEL_CALL, "prompt_reacquire"), (_BEFORE_WRITE, "fence_check")],
    ids=["at-reacquire", "at-write"],
)
def test_readme_controller_example_catches_takeover(
    tmp_path: Path, injection: str, phase: str
) -> None:
    done = run_script(
        _readme_controller_snippet().code, tmp_path, prelude=_PRELUDE_BASE + injection
    )
    assert done.returncode == 0, f"the takeover escaped the example:\n{done.stderr}"
    out = done.stdout.splitlines()
    assert out[0].startswith(f"taken over: {phase} foreign-append "), done.stdout
    assert out[-1] == "DISPOSED", done.stdout  # dispose() ran after the takeover
    assert "appended" not in done.stdout
    last = (tmp_path / "session.jsonl").read_text().splitlines()[-1]
    assert last == FOREIGN_LINE  # the reply was not written after the takeover


# -- examples/own_chat_log.py ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_chat_log() -> ModuleType:
    spec = importlib.util.spec_from_file_location("own_chat_log", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_example
def test_own_chat_log_example_runs(tmp_path: Path) -> None:
    log = tmp_path / "chat.jsonl"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), str(log)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[:5] == [
        "wrote the question (with_write_lock)",
        "merged 1 mirror line(s)",
        "took the lock back: the mirror line was accepted",
        "wrote the reply (refresh_after_owned_write)",
        "wrote a note (owned_file_write)",
    ], done.stdout
    assert out[5].startswith("taken over at prompt_reacquire: foreign-append"), done.stdout
    assert out[6] == "disposed", done.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["role"], r.get("via")) for r in records] == [
        ("user", None),
        ("assistant", "mirror"),
        ("assistant", None),
        ("system", None),
        ("user", None),  # the other worker's line: the takeover
    ]


def _write(path: Path, mod: ModuleType, role: str, text: str, **extra: Any) -> bytes:
    data: bytes = mod.append_record(str(path), mod.record(role, text, **extra))
    return data


async def _attempt(path: Path, mod: ModuleType) -> SessionFenceController:
    """A controller on a log with one own line, the fence active, the lock released."""
    ctl = await SessionFenceController.create(path, benign_policy=mod.ChatLogPolicy())
    await ctl.with_write_lock(lambda: _write(path, mod, "user", "What is 6 x 7?"))
    await ctl.release_for_prompt()
    return ctl


@needs_example
async def test_own_format_mirror_line_is_accepted(tmp_path: Path, own_chat_log: ModuleType) -> None:
    log = tmp_path / "chat.jsonl"
    ctl = await _attempt(log, own_chat_log)
    try:
        own_chat_log.mirror_delivers(str(log), "copied from Slack")
        await ctl.reacquire_after_prompt()
        assert not ctl.has_takeover
        # a later write sees the fence moved over the mirror line
        await ctl.with_write_lock(lambda: _write(log, own_chat_log, "assistant", "42"))
        await ctl.release_for_prompt()
        assert not ctl.has_takeover
    finally:
        await ctl.dispose()


@needs_example
@pytest.mark.parametrize(
    "foreign",
    [
        {"role": "user", "text": "mine now"},
        {"role": "assistant", "text": "a reply that is not a mirror copy"},
        {"role": "assistant", "text": "a mirror line without an id", "via": "mirror", "id": 7},
    ],
    ids=["user", "assistant", "mirror-without-string-id"],
)
async def test_own_format_foreign_line_is_a_takeover(
    tmp_path: Path, own_chat_log: ModuleType, foreign: dict[str, Any]
) -> None:
    log = tmp_path / "chat.jsonl"
    ctl = await _attempt(log, own_chat_log)
    try:
        own_chat_log.mirror_delivers(str(log), "a mirror line before it is fine")
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(foreign) + "\n")
        with pytest.raises(SessionTakeoverError) as caught:
            await ctl.reacquire_after_prompt()
        assert caught.value.phase == "prompt_reacquire"
        assert caught.value.reason == "foreign-append"
        assert ctl.has_takeover
        with pytest.raises(SessionTakeoverError):  # sticky: no write after it
            await ctl.with_write_lock(lambda: None)
    finally:
        await ctl.dispose()


@needs_example
async def test_own_format_two_mirror_lines_with_one_id_are_a_takeover(
    tmp_path: Path, own_chat_log: ModuleType
) -> None:
    log = tmp_path / "chat.jsonl"
    ctl = await _attempt(log, own_chat_log)
    try:
        line = own_chat_log.record("assistant", "twice", via="mirror")
        own_chat_log.append_record(str(log), line)
        own_chat_log.append_record(str(log), line)
        with pytest.raises(SessionTakeoverError) as caught:
            await ctl.reacquire_after_prompt()
        assert "reuses the entry id" in (caught.value.detail or "")
    finally:
        await ctl.dispose()


@needs_example
async def test_own_format_untold_own_write_is_a_takeover(
    tmp_path: Path, own_chat_log: ModuleType
) -> None:
    """docs/custom-transcripts.md: an own append the fence was not told about is judged by
    the policy like anyone's; the told ones (refresh / owned_file_write) pass."""
    log = tmp_path / "chat.jsonl"
    ctl = await _attempt(log, own_chat_log)
    try:
        await ctl.reacquire_after_prompt()
        written = _write(log, own_chat_log, "assistant", "42")
        ctl.refresh_after_owned_write(written)
        ctl.owned_file_write(
            lambda: _write(log, own_chat_log, "system", "note"),
            lambda data, text: text == data.decode(),
        )
        await ctl.release_for_prompt()  # both told: accepted
        await ctl.reacquire_after_prompt()
        _write(log, own_chat_log, "assistant", "not told")
        with pytest.raises(SessionTakeoverError) as caught:
            await ctl.release_for_prompt()
        assert (caught.value.phase, caught.value.reason) == ("fence_check", "foreign-append")
    finally:
        await ctl.dispose()


@needs_example
async def test_own_format_refused_validator_is_a_takeover(
    tmp_path: Path, own_chat_log: ModuleType
) -> None:
    log = tmp_path / "chat.jsonl"
    ctl = await _attempt(log, own_chat_log)
    try:
        await ctl.reacquire_after_prompt()
        ctl.owned_file_write(
            lambda: _write(log, own_chat_log, "system", "note"),
            lambda data, text: False,  # not recognised as ours: not published
        )
        with pytest.raises(SessionTakeoverError):
            await ctl.release_for_prompt()
    finally:
        await ctl.dispose()


@needs_example
def test_policy_is_the_documented_one(own_chat_log: ModuleType) -> None:
    policy = own_chat_log.ChatLogPolicy()
    mirror = own_chat_log.record("assistant", "x", via="mirror")
    assert policy.classify_entry(mirror) == "transcript-only"
    assert policy.classify_entry(own_chat_log.record("assistant", "x")) is None
    assert policy.classify_entry(own_chat_log.record("user", "x", via="mirror")) is None
    assert policy.classify_entry("a string line") is None
    assert asyncio.iscoroutinefunction(own_chat_log.run_worker)
