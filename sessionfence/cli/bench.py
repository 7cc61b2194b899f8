"""``sessionfence bench``: the naive / python / cffi comparison as a table (the measures and
their targets: docs/design.md, "Performance targets")."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import CliError

if TYPE_CHECKING:
    from ..bench._suite import Report

CHART_SUFFIXES = (".png", ".svg", ".pdf")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="compare the naive, pure-Python and C paths (P, V, T, L, J, F and S measures)",
        description="Runs the performance measures (P1-P7, V1-V2 for the held probes, T1-T2 "
        "for one turn with the real lock, L1-L2 for the lock, J1-J2 for the owned-write "
        "journal, F1 for verify=full owned appends, S1-S2 for the PostgreSQL store when a "
        "server can be started) on generated transcripts and prints each "
        "ratio next "
        "to its target. Files go to a temporary directory that is removed "
        "afterwards; the page cache is warmed on purpose before anything is timed.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run, under a minute: P2 on 32 MiB instead of 100 MiB, P6 on 64 MiB "
        "instead of 256 MiB, chart up to 64 MiB instead of 1 GiB, fewer rounds (P2 and P6 "
        "ratios are then indicative only)",
    )
    p.add_argument(
        "--chart",
        metavar="FILE",
        help="also write a PNG (or .svg/.pdf) of "
        "append-validation cost versus transcript size, log-log (needs matplotlib)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON instead")
    p.add_argument(
        "--dir",
        metavar="DIR",
        help="where the temporary files go (default: the "
        "system temporary directory; large files there are sparse)",
    )
    p.add_argument("--only", metavar="IDS", help="comma-separated measures to run, e.g. P1,P3")
    p.add_argument("--rounds", metavar="N", help="rounds per measure (default by profile)")
    # For the test suite: every code path on tiny files in a second or two.
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _positive_int(name: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise CliError(f"{name} must be a whole number, got {text!r}") from None
    if not 1 <= value <= 100_000:
        raise CliError(f"{name} must be between 1 and 100000, got {value}")
    return value


def _check_dir(text: str | None) -> str | None:
    if text is None:
        return None
    path = Path(text)
    if not path.exists():
        raise CliError(f"--dir {text}: no such directory")
    if not path.is_dir():
        raise CliError(f"--dir {text}: not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise CliError(f"--dir {text}: not writable")
    return text


def _check_chart(text: str | None) -> Path | None:
    if text is None:
        return None
    path = Path(text)
    suffix = path.suffix.lower() or ".png"
    if suffix not in CHART_SUFFIXES:
        raise CliError(f"--chart {text}: use a .png, .svg or .pdf file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(f"--chart {text}: directory {parent} does not exist")
    if path.is_dir():
        raise CliError(f"--chart {text}: is a directory")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError('--chart needs matplotlib: pip install "sessionfence[cli]"') from None
    return path


def _check_only(text: str | None, known: Sequence[str]) -> list[str] | None:
    if text is None:
        return None
    by_upper = {m.upper(): m for m in known}
    wanted = [part.strip().upper() for part in text.split(",") if part.strip()]
    unknown = [m for m in wanted if m not in by_upper]
    if unknown or not wanted:
        raise CliError(f"--only {text}: unknown measure; choose from {', '.join(known)}")
    return list(dict.fromkeys(by_upper[m] for m in wanted))


def run(args: argparse.Namespace) -> int:
    from ..bench import _suite as benchsuite

    known = list(benchsuite.load_measures())
    only = _check_only(args.only, known)
    rounds = _positive_int("--rounds", args.rounds)
    parent = _check_dir(args.dir)
    chart = _check_chart(args.chart)
    name = "tiny" if args.tiny else "quick" if args.quick else "full"
    profile = benchsuite.PROFILES[name]

    quiet = args.json or not sys.stderr.isatty()
    started = time.perf_counter()

    def progress(text: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    if not args.json:
        print(f"sessionfence bench ({name}): {profile.describe()}", flush=True)
    try:
        report = benchsuite.run(
            profile,
            parent=parent,
            only=only,
            rounds=rounds,
            chart=chart is not None,
            progress=progress,
        )
    except benchsuite.BenchError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        # Out of space, a read-only --dir...: the user's environment, not a bug.
        raise CliError(f"cannot run the benchmark in {parent or 'the temp dir'}: {exc}") from exc
    if chart is not None:
        write_chart(report, chart)
    if args.json:
        data = report.as_json()
        if chart is not None:
            data["chart"] = str(chart)
        print(json.dumps(data, indent=2))
    else:
        print_table(report)
        if chart is not None:
            print(f"chart: {chart}")
    return 0


# ------------------------------------------------------------------------------------------
# Output.
# ------------------------------------------------------------------------------------------

HEADERS = (
    "id",
    "measure",
    "baseline",
    "naive",
    "python",
    "cffi",
    "ratio",
    "of minima",
    "target",
    "",
)


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def _rows(report: Report) -> list[tuple[str, ...]]:
    rows = []
    for r in report.results:
        cells = [
            r.figures[c].text if c in r.figures else "—"
            for c in ("baseline", "naive", "python", "cffi")
        ]
        rows.append(
            (
                r.id,
                r.title,
                *cells,
                _fmt_ratio(r.ratio),
                _fmt_ratio(r.ratio_min),
                str(r.target),
                r.status,
            )
        )
    return rows


def _footer(report: Report) -> list[str]:
    lines = [
        f"ratio = {', '.join(sorted({f'{r.id} {r.ratio_of}' for r in report.results}))}",
        "medians per operation over interleaved rounds (pass/miss uses them; 'of minima' is "
        "the same ratio from the fastest rounds); page cache warmed on purpose (every file "
        "read or checked once before timing); garbage collector off while timing",
        f"{report.profile.name} profile: {report.profile.describe()}; took {report.seconds:.1f} s",
    ]
    cpus = os.cpu_count() or 1
    if report.load_before is not None and report.load_before > 0.5:
        lines.append(
            f"load average {report.load_before:.2f} on {cpus} CPUs when the run started: "
            "other processes share the machine, so P5 (threads) and absolute times suffer"
        )
    scaled = sorted({r.id for r in report.results} & {"P2", "P6"})
    if report.profile.name != "full" and scaled:
        lines.append(
            f"not the full profile: {' and '.join(scaled)} ran on smaller files, so "
            "the ratio is indicative only"
        )
    return lines


def print_table(report: Report) -> None:
    rows = _rows(report)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        _print_plain(rows, _footer(report))
        return
    table = Table(title="sessionfence bench: performance targets", title_justify="left")
    for h in HEADERS:
        justify: Any = "right" if h in ("ratio", "of minima", "target") else "left"
        table.add_column(h, justify=justify, overflow="fold")
    for row in rows:
        color = {"MISS": "red", "pass": "green"}.get(row[-1], "dim")
        table.add_row(*row[:-1], f"[{color}]{row[-1]}[/]")
    probe = Console()
    # Piped output would wrap at 80 columns: give it room for the nine columns instead.
    console = probe if probe.is_terminal else Console(width=200)
    console.print(table)
    for line in _footer(report):
        console.print(line, style="dim", highlight=False)


def _print_plain(rows: list[tuple[str, ...]], footer: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
    for row in (HEADERS, tuple("-" * w for w in widths), *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for line in footer:
        print(line)


def write_chart(report: Report, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed, and never pick an interactive backend
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError('--chart needs matplotlib: pip install "sessionfence[cli]"') from None
    from ..bench._suite import format_bytes

    points = report.sweep
    sizes = [p.size for p in points]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = {"naive": ("tab:red", "o"), "python": ("tab:blue", "s"), "cffi": ("tab:green", "^")}
    for name, (color, marker) in styles.items():
        ax.plot(
            sizes,
            [p.stats[name].median / 1e3 for p in points],
            marker=marker,
            color=color,
            label={
                "naive": "naive (read whole file before and after)",
                "python": "python backend (fingerprint + check_append)",
                "cffi": "cffi backend (fingerprint + check_append)",
            }[name],
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [format_bytes(s) for s in sizes])
    ax.set_xlabel("transcript size")
    ax.set_ylabel("µs per validated 1 KiB append (median)")
    ax.set_title("Owned append validation: cost versus transcript size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, format=(path.suffix.lower().lstrip(".") or "png"))
    except OSError as exc:
        raise CliError(f"--chart {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
