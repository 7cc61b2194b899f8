"""The performance measures of docs/design.md, "Performance targets", run for
``sessionfence bench``.

Every measure runs the ``naive`` path (a whole-file fence in Python: read the whole file
before and after an append and compare the prefix, as the openclaw controller did), the pure
``python`` backend and the ``cffi`` backend in the same process and the same run. Contenders
are interleaved round by round, so that noise from other processes on the machine hits all
of them alike and the ratios stay meaningful even when the absolute figures wobble. The one
exception is the naive whole-file path, which runs on its own: it would flush the CPU caches
before every fenced sample, and at ratios of 10^3 and more drift does not matter.

Conventions that every measure follows:

- time comes from ``time.perf_counter_ns``; fast calls are timed in batches (so the timer's
  own cost is spread out) and every figure is a per-call median over rounds, with the
  minimum kept beside it; ratios and pass/miss use the medians;
- the garbage collector is off while a batch runs (as ``timeit`` does);
- the page cache is warm on purpose: every file is read or checked once before it is timed.
  Cold-cache costs depend on the disk, not on sessionfence, and the targets are about the
  latter;
- files live in a fresh temporary directory (under ``dir``) that is removed afterwards,
  whatever happens. Files of 256 MiB and more are sparse (``truncate``) with realistic JSONL
  at the tail, which is the only part the fenced paths read; smaller ones are streamed JSONL.

Adding a measure (P7, the controller, belongs to another module): decorate a function taking
a ``Bench`` and returning a list of ``Result`` with ``@measure(...)``, in a module listed in
``MEASURE_MODULES`` (``load_measures()`` imports them).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from .. import _impl_py
from .._types import ChangeKind, Fingerprint
from .._util import gc_paused

__all__ = [
    "COLUMNS",
    "MEASURES",
    "PROFILES",
    "AppendValidation",
    "Bench",
    "BenchError",
    "Column",
    "Contender",
    "Figure",
    "GiB",
    "KiB",
    "Measure",
    "Profile",
    "Report",
    "Result",
    "Stats",
    "SweepPoint",
    "Target",
    "batched",
    "calibrate",
    "column",
    "format_bytes",
    "format_ns",
    "format_rate",
    "load_measures",
    "measure",
    "race",
    "run",
    "size_id",
    "sweep",
    "threaded_ns",
    "time_figure",
    "warm",
    "write_transcript",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# At and above this size a generated transcript is sparse: only the tail is real JSONL.
SPARSE_FROM = 256 * MiB
SPARSE_TAIL = 256 * KiB
APPEND_BYTES = 1 * KiB

Column = Literal["baseline", "naive", "python", "cffi"]
COLUMNS: tuple[Column, ...] = ("baseline", "naive", "python", "cffi")


def _col(name: str) -> Column:
    if name not in COLUMNS:
        raise ValueError(f"not a table column: {name}")
    return name


# ------------------------------------------------------------------------------------------
# Profiles: the sizes and round counts of a run.
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    name: str
    p1_sizes: tuple[int, int]  # (large, small) transcripts for P1
    p2_size: int
    many_files: int  # files for fingerprint_many (P4, P5)
    digest_size: int  # P6 file
    sweep_sizes: tuple[int, ...]  # the chart's transcript sizes
    rounds: int  # rounds of the fast, batched contenders
    slow_rounds: int  # rounds of contenders that read whole files
    batch_ns: int  # a batch of fast calls lasts about this long
    quiet_wait: bool = True  # P3 waits until its file is quiet (up to QUIET_AFTER_S)

    def describe(self) -> str:
        return (
            f"P1 {format_bytes(self.p1_sizes[0])} vs {format_bytes(self.p1_sizes[1])}, "
            f"P2 {format_bytes(self.p2_size)}, P4/P5 {self.many_files} files, "
            f"P6 {format_bytes(self.digest_size)}, {self.rounds} rounds "
            f"({self.slow_rounds} for whole-file reads)"
        )


PROFILES: dict[str, Profile] = {
    "full": Profile(
        name="full",
        p1_sizes=(1 * GiB, 1 * MiB),
        p2_size=100 * MiB,
        many_files=1000,
        digest_size=256 * MiB,
        sweep_sizes=(1 * KiB, 16 * KiB, 256 * KiB, 4 * MiB, 64 * MiB, 1 * GiB),
        rounds=41,
        slow_rounds=7,
        batch_ns=4_000_000,
    ),
    # CI smoke: under a minute on 2 cores. P1 keeps 1 GiB because the file is sparse and
    # the fenced check never reads its body; P2 and P6 shrink, so their ratios are
    # indicative only (P2 scales with the size: a smaller file means a smaller ratio).
    "quick": Profile(
        name="quick",
        p1_sizes=(1 * GiB, 1 * MiB),
        p2_size=32 * MiB,
        many_files=1000,
        digest_size=64 * MiB,
        sweep_sizes=(1 * KiB, 16 * KiB, 256 * KiB, 4 * MiB, 64 * MiB),
        rounds=21,
        slow_rounds=5,
        batch_ns=2_000_000,
    ),
    # For the test suite only: every code path, tiny files, a second or two.
    "tiny": Profile(
        name="tiny",
        p1_sizes=(256 * KiB, 16 * KiB),
        p2_size=64 * KiB,
        many_files=20,
        digest_size=256 * KiB,
        sweep_sizes=(1 * KiB, 16 * KiB),
        rounds=3,
        slow_rounds=2,
        batch_ns=50_000,
        quiet_wait=False,
    ),
}


# ------------------------------------------------------------------------------------------
# Results.
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    op: Literal["<=", ">="]
    value: float

    def met(self, ratio: float) -> bool:
        return ratio <= self.value if self.op == "<=" else ratio >= self.value

    def __str__(self) -> str:
        sign = "≤" if self.op == "<=" else "≥"
        value = f"{self.value:,.0f}" if self.value >= 100 else f"{self.value:g}"
        return f"{sign} {value}"


@dataclass(frozen=True)
class Stats:
    """Per-operation nanoseconds over the rounds of one contender."""

    median: float
    min: float
    samples: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("no samples")
        return cls(float(statistics.median(values)), float(min(values)), len(values))


@dataclass(frozen=True)
class Figure:
    """One cell of the table: a label and the time (or throughput) behind it."""

    text: str
    stats: Stats | None = None
    unit: str = "ns/op"

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text, "unit": self.unit}
        if self.stats is not None:
            out.update(median=self.stats.median, min=self.stats.min, samples=self.stats.samples)
        return out


@dataclass(frozen=True)
class Result:
    id: str
    case: str  # which variant of the measure: "fingerprint", "fingerprint_many", ...
    title: str
    ratio: float
    ratio_of: str  # what is divided by what, e.g. "python ÷ cffi"
    target: Target
    figures: Mapping[Column, Figure] = field(default_factory=dict)
    ratio_min: float | None = None  # the same ratio from per-contender minima
    params: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""
    informational: bool = False  # shown beside a measure, not part of its pass/miss

    @property
    def status(self) -> str:
        if self.informational:
            return "info"
        return "pass" if self.passed else "MISS"

    @property
    def passed(self) -> bool:
        return self.target.met(self.ratio)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "case": self.case,
            "title": self.title,
            "ratio": self.ratio,
            "ratio_min": self.ratio_min,
            "ratio_of": self.ratio_of,
            "target": {"op": self.target.op, "value": self.target.value, "text": str(self.target)},
            "passed": self.passed,
            "informational": self.informational,
            "status": self.status,
            "figures": {col: fig.as_json() for col, fig in self.figures.items()},
            "params": dict(self.params),
            "note": self.note,
        }


@dataclass(frozen=True)
class SweepPoint:
    """Owned append validation at one transcript size: naive / python / cffi medians."""

    size: int
    stats: Mapping[str, Stats]

    def as_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            **{name: {"median": s.median, "min": s.min} for name, s in self.stats.items()},
        }


# ------------------------------------------------------------------------------------------
# The registry.
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    id: str
    title: str
    run: Callable[[Bench], list[Result]]


MEASURES: dict[str, Measure] = {}


def measure(id: str, title: str) -> Callable[[Callable[[Bench], list[Result]]], Measure]:
    """Registers a measure under ``id`` (``P1``...); re-registering an id replaces it."""

    def wrap(fn: Callable[[Bench], list[Result]]) -> Measure:
        m = Measure(id, title, fn)
        MEASURES[id] = m
        return m

    return wrap


# Modules whose import registers more measures (explicit: no filename discovery).
MEASURE_MODULES = (
    "sessionfence.bench.controller",
    "sessionfence.bench.lock",
    "sessionfence.bench.store",
    "sessionfence.bench.store_loop",
    "sessionfence.bench.transcript",
)


def load_measures() -> dict[str, Measure]:
    """The registered measures in id order, after importing ``MEASURE_MODULES``."""
    for name in MEASURE_MODULES:
        importlib.import_module(name)
    return dict(sorted(MEASURES.items(), key=lambda kv: _id_key(kv[0])))


def _id_key(mid: str) -> tuple[str, int, str]:
    """P2 < P2c < P3 < P10: letters, then the number, then any suffix."""
    match = re.fullmatch(r"([^\d]*)(\d*)(.*)", mid)
    assert match is not None  # the pattern matches every string
    head, digits, tail = match.groups()
    return (head, int(digits) if digits else 0, tail)


# ------------------------------------------------------------------------------------------
# Formatting.
# ------------------------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def size_id(n: int) -> str:
    """``1KiB``, ``100MiB``: a size as a test id or benchmark group suffix."""
    return format_bytes(n).replace(" ", "")


def format_ns(ns: float) -> str:
    if ns >= 1e9:
        return f"{ns / 1e9:.2f} s"
    if ns >= 1e6:
        return f"{ns / 1e6:.1f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def format_rate(per_s: float, unit: str) -> str:
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if per_s >= scale:
            return f"{per_s / scale:.3g} {prefix}{unit}/s"
    return f"{per_s:.0f} {unit}/s"


# ------------------------------------------------------------------------------------------
# Generated transcripts.
# ------------------------------------------------------------------------------------------

_LINE_HEAD = b'{"type":"message","id":"'
_FILLER_HEAD = b'{"type":"custom","customType":"bench-pad","data":"'
_FILLER_TAIL = b'"}\n'


def _message_line(i: int) -> bytes:
    role = ("user", "assistant", "toolResult")[i % 3]
    text = ("Summarise the build log and propose the next step. " * (1 + i % 5)).strip()
    return (
        _LINE_HEAD
        + f'{i:08x}","parentId":"{i - 1:08x}","timestamp":"2026-11-24T16:{i % 60:02d}:00.000Z",'
        f'"message":{{"role":"{role}","content":[{{"type":"text","text":"{text}"}}]}}}}\n'.encode()
    )


@functools.cache
def _block() -> bytes:
    """About 64 KiB of varied message lines, repeated to stream large transcripts."""
    lines: list[bytes] = []
    total = 0
    i = 0
    while total < 64 * KiB:
        line = _message_line(i)
        lines.append(line)
        total += len(line)
        i += 1
    return b"".join(lines)


def filler_line(n: int) -> bytes:
    """One JSONL line of exactly ``n`` bytes (a short whitespace line below 55 bytes)."""
    pad = n - len(_FILLER_HEAD) - len(_FILLER_TAIL)
    if pad >= 0:
        return _FILLER_HEAD + b"x" * pad + _FILLER_TAIL
    if n <= 0:
        return b""
    return b"{}"[: max(n - 1, 0)] + b" " * max(n - 3, 0) + b"\n"


def jsonl_bytes(n: int) -> bytes:
    """Exactly ``n`` bytes of whole JSONL lines."""
    block = _block()
    full, rest = divmod(n, len(block))
    if full and 0 < rest < len(_FILLER_HEAD) + len(_FILLER_TAIL):
        full, rest = full - 1, rest + len(block)  # too short for a filler line: widen it
    return block * full + filler_line(rest)


def write_transcript(path: Path, size: int, *, sparse: bool | None = None) -> Path:
    """A transcript of exactly ``size`` bytes; sparse with a real JSONL tail when large."""
    if sparse is None:
        sparse = size >= SPARSE_FROM
    with open(path, "wb") as f:
        if sparse and size > SPARSE_TAIL:
            f.truncate(size - SPARSE_TAIL)
            f.seek(size - SPARSE_TAIL)
            f.write(filler_line(SPARSE_TAIL // 2) + jsonl_bytes(SPARSE_TAIL - SPARSE_TAIL // 2))
        else:
            block = _block()
            chunk = block * max(1, MiB // len(block))
            left = size
            while left > len(chunk) + len(block):
                f.write(chunk)
                left -= len(chunk)
            f.write(jsonl_bytes(left))
    if path.stat().st_size != size:  # pragma: no cover - a generator bug, not a user error
        raise AssertionError(f"generated {path} has the wrong size")
    return path


def warm(path: Path) -> None:
    """Reads the whole file once so that the timed runs see a warm page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


# ------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------

# A contender yields one or more per-operation samples (ns) per call.
Contender = Callable[[], list[float]]


def batched(fn: Callable[[], object], inner: int) -> Contender:
    """Times ``inner`` back-to-back calls and yields the per-call mean of the batch."""
    rng = range(inner)
    clock = time.perf_counter_ns

    def sample() -> list[float]:
        with gc_paused():
            t0 = clock()
            for _ in rng:
                fn()
            t1 = clock()
        return [(t1 - t0) / inner]

    return sample


def calibrate(fn: Callable[[], object], batch_ns: int) -> int:
    """How many calls of ``fn`` fill about ``batch_ns``; also warms ``fn`` up."""
    clock = time.perf_counter_ns
    n = 1
    while True:
        t0 = clock()
        for _ in range(n):
            fn()
        took = clock() - t0
        if took >= batch_ns // 4 or n >= 1 << 20:
            return max(1, int(n * batch_ns / max(took, 1)))
        n *= 4


def race(contenders: Mapping[str, Contender], rounds: int) -> dict[str, Stats]:
    """Runs the contenders in turn, ``rounds`` times, rotating who goes first."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].extend(contenders[name]())
    return {name: Stats.of(values) for name, values in samples.items()}


def threaded_ns(fn: Callable[[], object], threads: int, iterations: int) -> int:
    """Wall time of ``threads`` threads each calling ``fn`` ``iterations`` times at once."""
    barrier = threading.Barrier(threads + 1)
    failures: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            for _ in range(iterations):
                fn()
        except BaseException as exc:  # surfaced in the caller's thread below
            failures.append(exc)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    t0 = time.perf_counter_ns()
    for w in workers:
        w.join()
    took = time.perf_counter_ns() - t0
    if failures:
        raise failures[0]
    return took


# ------------------------------------------------------------------------------------------
# The bench context.
# ------------------------------------------------------------------------------------------


class BenchError(RuntimeError):
    """The benchmark cannot run here (no C backend): a user-facing, one-line message."""


def _load_cffi() -> ModuleType | None:
    try:
        return importlib.import_module("sessionfence._impl_cffi")
    except ImportError:
        return None


class Bench:
    """A run's profile, its scratch directory and the backends under comparison."""

    def __init__(self, profile: Profile, workdir: Path, *, rounds: int | None = None) -> None:
        self.profile = profile
        self.dir = workdir
        self.rounds = rounds if rounds is not None else profile.rounds
        self.slow_rounds = min(self.rounds, profile.slow_rounds) if rounds else profile.slow_rounds
        self.python: ModuleType = _impl_py
        cffi = _load_cffi()
        if cffi is None:
            raise BenchError(
                "the C backend (sessionfence._impl_cffi) cannot be imported: the benchmark "
                "compares it with the pure-Python one, so reinstall sessionfence with a C "
                "compiler available"
            )
        self.cffi: ModuleType = cffi
        self._files: dict[tuple[str, int], Path] = {}
        self._counter = 0

    @property
    def impls(self) -> dict[str, ModuleType]:
        return {"python": self.python, "cffi": self.cffi}

    def path(self, stem: str) -> Path:
        self._counter += 1
        return self.dir / f"{stem}-{self._counter}.jsonl"

    def transcript(self, size: int, tag: str = "t") -> Path:
        """A generated transcript of ``size`` bytes, made once per (tag, size) and run."""
        key = (tag, size)
        if key not in self._files:
            self._files[key] = write_transcript(self.path(f"{tag}-{size}"), size)
        return self._files[key]

    def drop(self, path: Path) -> None:
        """Frees a large file early (sparse or not, it costs page cache)."""
        for key, value in list(self._files.items()):
            if value == path:
                del self._files[key]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def many(self, count: int) -> list[str]:
        """``count`` small transcripts (1-16 KiB) in a directory of their own."""
        key = ("many", count)
        if key not in self._files:
            d = self.dir / f"many-{count}"
            d.mkdir(exist_ok=True)
            for i in range(count):
                write_transcript(d / f"s{i:05d}.jsonl", KiB * (1 + i % 16))
            self._files[key] = d
        d = self._files[key]
        return sorted(str(p) for p in d.iterdir())

    def batch(self, fn: Callable[[], object]) -> Contender:
        return batched(fn, calibrate(fn, self.profile.batch_ns))


# ------------------------------------------------------------------------------------------
# Owned append validation: the operation of P1, P2 and the chart.
# ------------------------------------------------------------------------------------------


class AppendValidation:
    """Append 1 KiB to a transcript and prove it was only that append.

    naive: read the whole file as UTF-8 before the append and again after it, require
    ``after.startswith(before)`` and the new text to be the line written (the openclaw
    controller's owned-append validation). The fenced paths: ``fingerprint`` before,
    ``check_append(before)`` after, require APPENDED with exactly the bytes written. The
    append itself and the truncate that restores the file between rounds are not timed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.stat().st_size
        self.line = filler_line(APPEND_BYTES)

    def append(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, self.line)
        finally:
            os.close(fd)

    def reset(self) -> None:
        os.truncate(self.path, self.base)

    def naive(self) -> tuple[int, int]:
        """(ns before the append, ns after it)."""
        clock = time.perf_counter_ns
        self.reset()
        with gc_paused():
            t0 = clock()
            with open(self.path, "rb") as f:
                before = f.read().decode("utf-8")
            t1 = clock()
            self.append()
            t2 = clock()
            with open(self.path, "rb") as f:
                after = f.read().decode("utf-8")
            ok = after.startswith(before) and after[len(before) :] == self.line.decode()
            t3 = clock()
        del before, after
        if not ok:  # pragma: no cover - would mean the generator or the file is wrong
            raise AssertionError("naive validation refuted a plain append")
        return t1 - t0, t3 - t2

    def fenced(self, impl: ModuleType, probe: Any = None) -> tuple[int, int]:
        """(ns of ``fingerprint`` before the append, ns of ``check_append`` after it).

        With a ``FileProbe`` of the file, its methods are used instead of the one-shot
        functions: the descriptor stays open, as it would in a long-lived controller.
        """
        clock = time.perf_counter_ns
        if probe is None:
            path = self.path
            fingerprint: Callable[[], Fingerprint] = functools.partial(impl.fingerprint, path)
            check: Callable[[Fingerprint], Any] = functools.partial(impl.check_append, path)
        else:
            fingerprint, check = probe.fingerprint, probe.check_append
        self.reset()
        with gc_paused():
            t0 = clock()
            before = fingerprint()
            t1 = clock()
            self.append()
            t2 = clock()
            change = check(before)
            ok = change.kind is ChangeKind.APPENDED and change.appended == self.line
            t3 = clock()
        if not ok:  # pragma: no cover
            raise AssertionError(f"{impl.NAME}: check_append gave {change.kind}")
        return t1 - t0, t3 - t2

    def held(self, probe: Any) -> tuple[int, int]:
        """(ns of ``probe.mark()`` before the append, ns of ``probe.poll()`` after it): the
        whole validation as two calls on a held probe, the baseline kept inside it."""
        clock = time.perf_counter_ns
        mark, poll = probe.mark, probe.poll
        self.reset()
        with gc_paused():
            t0 = clock()
            mark()
            t1 = clock()
            self.append()
            t2 = clock()
            kind, appended = poll()
            ok = kind is ChangeKind.APPENDED and appended == self.line
            t3 = clock()
        if not ok:  # pragma: no cover
            raise AssertionError(f"{probe!r}: poll gave {kind}")
        return t1 - t0, t3 - t2


def _validation_contenders(
    v: AppendValidation, impls: Mapping[str, ModuleType], part: Literal["total", "check"]
) -> dict[str, Contender]:
    def pick(pair: tuple[int, int]) -> list[float]:
        return [float(pair[1] if part == "check" else pair[0] + pair[1])]

    contenders: dict[str, Contender] = {}
    for name, impl in impls.items():
        contenders[name] = functools.partial(lambda i: pick(v.fenced(i)), impl)
    return contenders


# ------------------------------------------------------------------------------------------
# P1-P6.
# ------------------------------------------------------------------------------------------


def _ratio(a: Stats, b: Stats) -> tuple[float, float]:
    return a.median / b.median, a.min / b.min


def _time_fig(s: Stats, prefix: str = "") -> Figure:
    return Figure(f"{prefix}{format_ns(s.median)}", s)


# Public names for measure modules (``MEASURE_MODULES``): a table column from a str, and a
# time cell.
column = _col
time_figure = _time_fig


@measure("P1", "check_append after a 1 KiB append: large ÷ 1 MiB transcript (cffi)")
def p1(bench: Bench) -> list[Result]:
    large, small = bench.profile.p1_sizes
    checks = {size: AppendValidation(bench.transcript(size)) for size in (large, small)}
    contenders: dict[str, Contender] = {}
    for size, v in checks.items():
        v.fenced(bench.cffi)  # warms the tail pages and the code path
        for name, c in _validation_contenders(v, bench.impls, "check").items():
            contenders[f"{name}@{size}"] = c
    stats = race(contenders, bench.rounds)
    figures: dict[Column, Figure] = {}
    for name in bench.impls:
        a, b = stats[f"{name}@{large}"], stats[f"{name}@{small}"]
        figures[_col(name)] = Figure(f"{format_ns(a.median)} / {format_ns(b.median)}", a)
    ratio, ratio_min = _ratio(stats[f"cffi@{large}"], stats[f"cffi@{small}"])
    return [
        Result(
            "P1",
            "check_append",
            f"check_append after 1 KiB append, {format_bytes(large)} ÷ {format_bytes(small)}",
            ratio,
            f"cffi {format_bytes(large)} ÷ cffi {format_bytes(small)}",
            Target("<=", 1.5),
            figures,
            ratio_min,
            {"large": large, "small": small, "append": APPEND_BYTES, "sparse_large": True},
            note="cells: large / small transcript",
        )
    ]


@measure("P2", "owned append validation: naive ÷ cffi")
def p2(bench: Bench) -> list[Result]:
    size = bench.profile.p2_size
    path = bench.transcript(size)
    warm(path)
    v = AppendValidation(path)
    contenders = _validation_contenders(v, bench.impls, "total")
    probes = {name: impl.FileProbe(str(path)) for name, impl in bench.impls.items()}
    try:
        for name, probe in probes.items():
            contenders[f"{name}-probe"] = functools.partial(
                lambda pr: [float(sum(v.held(pr)))], probe
            )
        for c in contenders.values():
            c()  # warm-up round, not recorded
        stats = _race_with_naive(v, contenders, bench.rounds, bench.slow_rounds)
    finally:
        for probe in probes.values():
            probe.close()
    results = []
    for suffix, title, info in (
        ("", "fingerprint + check_append", True),
        ("-probe", "held FileProbe, mark() + poll()", False),
    ):
        ratio, ratio_min = _ratio(stats["naive"], stats[f"cffi{suffix}"])
        results.append(
            Result(
                "P2",
                "validation" + suffix.replace("-", "_"),
                f"owned append validation, {format_bytes(size)}: {title}",
                ratio,
                "naive ÷ cffi",
                Target(">=", 10_000),
                {
                    "naive": _time_fig(stats["naive"]),
                    "python": _time_fig(stats[f"python{suffix}"]),
                    "cffi": _time_fig(stats[f"cffi{suffix}"]),
                },
                ratio_min,
                {"size": size, "append": APPEND_BYTES},
                note="before + after, the append itself untimed"
                + ("; one-shot calls open the file twice" if info else ""),
                informational=info,
            )
        )
    return results


def _race_with_naive(
    v: AppendValidation, fenced: Mapping[str, Contender], rounds: int, slow_rounds: int
) -> dict[str, Stats]:
    """The fenced paths raced together, the naive path on its own.

    Interleaving them would flush the CPU caches before every fenced sample (a whole-file
    read streams megabytes through them) and time a cold check; and with ratios of 10^3
    and more, the drift that interleaving guards against does not matter.
    """
    stats = race(fenced, rounds)
    naive = race({"naive": lambda: [float(sum(v.naive()))]}, slow_rounds)
    return {**stats, **naive}


# A probe may skip the tail re-read of a file whose last write is older than the
# filesystem's timestamp granule (git's racy-clean rule, 2 s): a quiet transcript.
QUIET_AFTER_S = 2.5


@measure("P3", "FileProbe.fingerprint() (cffi) ÷ os.stat(), unchanged file")
def p3(bench: Bench) -> list[Result]:
    quiet = bench.transcript(1 * MiB, "probe")
    fresh = bench.transcript(1 * MiB, "fresh")
    for path in (quiet, fresh):
        warm(path)
    # Wait until the quiet file's last write is old enough for the racy-clean rule.
    age = time.time() - quiet.stat().st_ctime
    if age < QUIET_AFTER_S and bench.profile.quiet_wait:
        time.sleep(QUIET_AFTER_S - age)
    probes = {
        (name, kind): impl.FileProbe(str(path))
        for name, impl in bench.impls.items()
        for kind, path in (("quiet", quiet), ("fresh", fresh))
    }
    try:
        contenders = {"os.stat": bench.batch(functools.partial(os.stat, str(quiet)))}
        for (name, kind), probe in probes.items():
            batch = bench.batch(probe.fingerprint)
            if kind == "fresh":
                batch = _freshly_written(fresh, probe.fingerprint, batch)
            contenders[f"{name}-{kind}"] = batch
        stats = race(contenders, bench.rounds)
    finally:
        for probe in probes.values():
            probe.close()
    results = []
    for kind, title, info in (
        (
            "quiet",
            f"FileProbe.fingerprint(), file quiet ≥ {QUIET_AFTER_S:g} s"
            if bench.profile.quiet_wait
            else "FileProbe.fingerprint(), file quiet (no wait in this profile)",
            False,
        ),
        ("fresh", "FileProbe.fingerprint(), file written < 2 s ago", True),
    ):
        ratio, ratio_min = _ratio(stats[f"cffi-{kind}"], stats["os.stat"])
        results.append(
            Result(
                "P3",
                kind,
                title,
                ratio,
                "cffi probe ÷ os.stat",
                Target("<=", 1.3),
                {
                    "baseline": _time_fig(stats["os.stat"], "os.stat "),
                    "python": _time_fig(stats[f"python-{kind}"]),
                    "cffi": _time_fig(stats[f"cffi-{kind}"]),
                },
                ratio_min,
                {"size": 1 * MiB, "window": 4096},
                note="the tail is re-read and hashed on every call" if info else "",
                informational=info,
            )
        )
    return results


def _freshly_written(path: Path, absorb: Callable[[], object], batch: Contender) -> Contender:
    """Touches the file before each (untimed) batch so that its last write stays recent."""

    def sample() -> list[float]:
        os.utime(path)
        absorb()  # the call that sees the new times and builds a new fingerprint
        return batch()

    return sample


@measure("P4", "python ÷ cffi: fingerprint and fingerprint_many")
def p4(bench: Bench) -> list[Result]:
    one = str(bench.transcript(64 * KiB, "one"))
    warm(Path(one))
    paths = bench.many(bench.profile.many_files)
    for p in paths:
        warm(Path(p))
    single = race(
        {
            name: bench.batch(functools.partial(impl.fingerprint, one))
            for name, impl in bench.impls.items()
        },
        bench.rounds,
    )
    many = race(
        {
            name: bench.batch(functools.partial(impl.fingerprint_many, paths))
            for name, impl in bench.impls.items()
        },
        bench.rounds,
    )
    n = len(paths)
    results = []
    for case, stats, target, per in (
        ("fingerprint", single, 1.5, 1),
        (f"fingerprint_many({n})", many, 2.5, n),
    ):
        ratio, ratio_min = _ratio(stats["python"], stats["cffi"])
        figures: dict[Column, Figure] = {
            _col(name): Figure(
                format_ns(stats[name].median)
                + (f" ({format_ns(stats[name].median / per)}/file)" if per > 1 else ""),
                stats[name],
            )
            for name in ("python", "cffi")
        }
        results.append(
            Result(
                "P4",
                case.split("(")[0],
                case,
                ratio,
                "python ÷ cffi",
                Target(">=", target),
                figures,
                ratio_min,
                {"files": per},
            )
        )
    return results


@measure("P5", "fingerprint_many throughput: 2 threads ÷ 1 thread (cffi)")
def p5(bench: Bench) -> list[Result]:
    paths = bench.many(bench.profile.many_files)
    n = len(paths)
    contenders: dict[str, Contender] = {}
    for name, impl in bench.impls.items():
        fn = functools.partial(impl.fingerprint_many, paths)
        # Enough calls per thread for the two threads to fall into step: the first call of
        # each starts together, so both then queue for the GIL to build their results.
        iters = max(10, calibrate(fn, bench.profile.batch_ns))
        for threads in (1, 2):
            # Each thread does the same number of calls: 2 threads do twice the work.
            contenders[f"{name}x{threads}"] = functools.partial(
                lambda f, t, i: [threaded_ns(f, t, i) / (t * i * n)], fn, threads, iters
            )
    # The control: pure hashing in C with the GIL released, no system calls. On a machine
    # whose second core is busy elsewhere, it shows the ceiling no file work can pass.
    chunk = bytes(256 * KiB)
    rolling = bench.cffi.RollingDigest

    def hash_chunk() -> None:
        rolling().update(chunk)

    iters = max(2, calibrate(hash_chunk, bench.profile.batch_ns))
    for threads in (1, 2):
        contenders[f"cpux{threads}"] = functools.partial(
            lambda t, i: [threaded_ns(hash_chunk, t, i) / (t * i)], threads, iters
        )
    stats = race(contenders, bench.rounds)
    figures: dict[Column, Figure] = {}
    ratios: dict[str, tuple[float, float]] = {}
    cpu = _ratio(stats["cpux1"], stats["cpux2"])
    figures["baseline"] = Figure(f"CPU-only C 2t÷1t {cpu[0]:.2f}", stats["cpux2"], unit="ns/chunk")
    for name in bench.impls:
        one, two = stats[f"{name}x1"], stats[f"{name}x2"]
        ratios[name] = _ratio(one, two)  # per-file time 1t ÷ 2t = throughput 2t ÷ 1t
        figures[_col(name)] = Figure(
            f"{format_rate(1e9 / one.median, 'files')} → {format_rate(1e9 / two.median, 'files')}",
            two,
            unit="ns/file",
        )
    return [
        Result(
            "P5",
            "threads",
            f"fingerprint_many({n}), 2 threads ÷ 1",
            ratios["cffi"][0],
            "cffi 2 threads ÷ 1 thread",
            Target(">=", 1.7),
            figures,
            ratios["cffi"][1],
            {"files": n, "cpus": os.cpu_count(), "cpu_only_scaling": cpu[0]},
            note="cells: 1 thread → 2 threads; baseline: 2 ÷ 1 threads of pure C hashing "
            "(GIL released, no I/O), the most this machine allows right now",
        )
    ]


def _read_all(path: str) -> int:
    with open(path, "rb") as f:
        return len(f.read())


@measure("P6", "content_digest throughput ÷ plain read of the file")
def p6(bench: Bench) -> list[Result]:
    size = bench.profile.digest_size
    path = bench.transcript(size, "digest")
    warm(path)
    spath = str(path)
    contenders: dict[str, Contender] = {"read": bench.batch(functools.partial(_read_all, spath))}
    for name, impl in bench.impls.items():
        contenders[name] = bench.batch(functools.partial(impl.content_digest, spath))
    stats = race(contenders, bench.rounds)
    ratio, ratio_min = _ratio(stats["read"], stats["cffi"])

    def rate(s: Stats, prefix: str = "") -> Figure:
        return Figure(prefix + format_rate(size * 1e9 / s.median, "B"), s)

    bench.drop(path)
    return [
        Result(
            "P6",
            "digest",
            f"content_digest, {format_bytes(size)}",
            ratio,
            "cffi digest ÷ read (throughput)",
            Target(">=", 0.8),
            {
                "baseline": rate(stats["read"], "read() "),
                "python": rate(stats["python"]),
                "cffi": rate(stats["cffi"]),
            },
            ratio_min,
            {"size": size},
        )
    ]


@measure("V1", "owned append validation: python ÷ cffi")
def v1(bench: Bench) -> list[Result]:
    """The validation of P2 on a 1 MiB transcript, pure backend ÷ C backend: the held
    probe's ``mark()`` + ``poll()`` (the counted row) and the one-shot ``fingerprint`` +
    ``check_append``. Both backends make the same system calls (held: stat, pread, fstat
    before and after; one-shot: open, fstat, pread, fstat, close twice), so the ratio is
    what the C path saves around them, and those calls bound it."""
    path = bench.transcript(1 * MiB, "v1")
    warm(path)
    v = AppendValidation(path)
    contenders = _validation_contenders(v, bench.impls, "total")
    probes = {name: impl.FileProbe(str(path)) for name, impl in bench.impls.items()}
    try:
        for name, probe in probes.items():
            contenders[f"{name}-held"] = functools.partial(
                lambda pr: [float(sum(v.held(pr)))], probe
            )
        for c in contenders.values():
            c()  # warm-up round, not recorded
        stats = race(contenders, bench.rounds)
    finally:
        for probe in probes.values():
            probe.close()
    results = []
    for suffix, title, info in (
        ("-held", "held FileProbe: mark() + poll()", False),
        ("", "one-shot fingerprint + check_append", True),
    ):
        ratio, ratio_min = _ratio(stats[f"python{suffix}"], stats[f"cffi{suffix}"])
        results.append(
            Result(
                "V1",
                "validation" + suffix.replace("-", "_"),
                f"owned append validation, 1 MiB: {title}",
                ratio,
                "python ÷ cffi",
                Target(">=", 3),
                {
                    "python": _time_fig(stats[f"python{suffix}"]),
                    "cffi": _time_fig(stats[f"cffi{suffix}"]),
                },
                ratio_min,
                {"size": 1 * MiB, "append": APPEND_BYTES},
                note="before + after, the append itself untimed; same system calls on both",
                informational=info,
            )
        )
    return results


HOT_FILES = 10  # of the watched files, this many change between two polls (V2)


def _watched(bench: Bench, tag: str, count: int) -> list[str]:
    d = bench.dir / f"watch-{tag}-{count}"
    d.mkdir(exist_ok=True)
    return [str(write_transcript(d / f"s{i:05d}.jsonl", KiB * (1 + i % 16))) for i in range(count)]


@measure("V2", "changed-files poll of many transcripts (ManyProbe): python ÷ cffi")
def v2(bench: Bench) -> list[Result]:
    """A gateway's poll: ``ManyProbe.poll()`` over the profile's file count after
    ``HOT_FILES`` of them got a 1 KiB append (untimed); it must report exactly those. The
    others were last written long enough ago for the racy-clean rule (one stat each). Each
    backend watches its own copy of the files, so both see the same changes. Beside it:
    ``fingerprint_many`` of the same files (what a poll without a baseline costs)."""
    n = bench.profile.many_files
    sets = {name: _watched(bench, name, n) for name in bench.impls}
    line = filler_line(APPEND_BYTES)
    hot = list(range(0, n, max(1, n // HOT_FILES)))[:HOT_FILES]
    age = time.time() - max(os.stat(p).st_ctime for ps in sets.values() for p in ps)
    if age < QUIET_AFTER_S and bench.profile.quiet_wait:
        time.sleep(QUIET_AFTER_S - age)
    watchers = {name: impl.ManyProbe(sets[name]) for name, impl in bench.impls.items()}

    def poll_after_appends(name: str) -> list[float]:
        paths = sets[name]
        for i in hot:
            fd = os.open(paths[i], os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        poll = watchers[name].poll
        with gc_paused():
            t0 = time.perf_counter_ns()
            changed = poll()
            t1 = time.perf_counter_ns()
        if changed != hot:  # pragma: no cover
            raise AssertionError(f"{name}: poll reported {changed[:20]}, expected {hot}")
        return [float(t1 - t0)]

    contenders: dict[str, Contender] = {
        name: functools.partial(poll_after_appends, name) for name in bench.impls
    }
    for name, impl in bench.impls.items():
        contenders[f"{name}-many"] = bench.batch(
            functools.partial(impl.fingerprint_many, sets[name])
        )
    for c in contenders.values():
        c()
    stats = race(contenders, bench.rounds)
    ratio, ratio_min = _ratio(stats["python"], stats["cffi"])
    many_ratio, many_min = _ratio(stats["python-many"], stats["cffi-many"])

    def cell(s: Stats) -> Figure:
        return Figure(f"{format_ns(s.median)} ({format_ns(s.median / n)}/file)", s)

    return [
        Result(
            "V2",
            "many_poll",
            f"ManyProbe.poll(), {n} files, {len(hot)} changed",
            ratio,
            "python ÷ cffi",
            Target(">=", 3),
            {
                "baseline": Figure(f"fingerprint_many {format_ns(stats['cffi-many'].median)}"),
                "python": cell(stats["python"]),
                "cffi": cell(stats["cffi"]),
            },
            ratio_min,
            {"files": n, "changed": len(hot), "append": APPEND_BYTES},
            note="baseline: cffi fingerprint_many of the same files (every file re-read)",
        ),
        Result(
            "V2",
            "fingerprint_many",
            f"fingerprint_many({n}) of the same files",
            many_ratio,
            "python ÷ cffi",
            Target(">=", 3),
            {"python": cell(stats["python-many"]), "cffi": cell(stats["cffi-many"])},
            many_min,
            {"files": n},
            informational=True,
        ),
    ]


# ------------------------------------------------------------------------------------------
# The chart's sweep.
# ------------------------------------------------------------------------------------------


def sweep(bench: Bench, progress: Callable[[str], None] | None = None) -> list[SweepPoint]:
    """Owned append validation cost at each of the profile's transcript sizes."""
    points = []
    for size in bench.profile.sweep_sizes:
        if progress is not None:
            progress(f"chart: {format_bytes(size)}")
        path = write_transcript(bench.path(f"sweep-{size}"), size)
        try:
            warm(path)
            v = AppendValidation(path)
            contenders = _validation_contenders(v, bench.impls, "total")
            for c in contenders.values():
                c()
            v.naive()
            # Whole-file reads of a large file take seconds: fewer rounds there.
            slow = bench.slow_rounds if size >= 16 * MiB else bench.rounds
            points.append(SweepPoint(size, _race_with_naive(v, contenders, bench.rounds, slow)))
        finally:
            path.unlink()
    return points


# ------------------------------------------------------------------------------------------
# A run.
# ------------------------------------------------------------------------------------------


@dataclass
class Report:
    profile: Profile
    results: list[Result]
    sweep: list[SweepPoint]
    seconds: float
    load_before: float | None = None  # 1-minute load average when the run started

    def as_json(self) -> dict[str, Any]:
        from .._version import __version__

        return {
            "sessionfence": __version__,
            "profile": self.profile.name,
            "sizes": self.profile.describe(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "page_cache": "warm (each file read or checked once before timing)",
            "statistic": "median per operation over interleaved rounds; ratio_min from minima",
            "seconds": round(self.seconds, 2),
            "load_before": self.load_before,
            "measures": [r.as_json() for r in self.results],
            "sweep": [p.as_json() for p in self.sweep],
        }


@contextlib.contextmanager
def scratch(parent: str | os.PathLike[str] | None) -> Iterator[Path]:
    """A temporary directory that is removed afterwards, even after Ctrl-C."""
    path = Path(tempfile.mkdtemp(prefix="sessionfence-bench-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(
    profile: Profile,
    *,
    parent: str | os.PathLike[str] | None = None,
    only: Sequence[str] | None = None,
    rounds: int | None = None,
    chart: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Runs the selected measures (all by default) and, for a chart, the size sweep."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    measures = load_measures()
    selected = [m for m in measures.values() if not only or m.id in only]
    start = time.perf_counter()
    results: list[Result] = []
    points: list[SweepPoint] = []
    with scratch(parent) as workdir:
        bench = Bench(profile, workdir, rounds=rounds)
        for m in selected:
            if progress is not None:
                progress(f"{m.id}: {m.title}")
            results.extend(m.run(bench))
        if chart:
            points = sweep(bench, progress)
    return Report(profile, results, points, time.perf_counter() - start, load)
