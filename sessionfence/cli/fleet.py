"""``sessionfence fleet``: the fleet simulation with chaos and its verified report."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Any

from . import CliError

_VERIFY_HELP = (
    "how the fence proves old content on every accepted append: 'full' (rolling digest of "
    "the whole content; catches edits anywhere) or 'tail' (tail window + suffix only). "
    "Default: full up to 64 MB transcripts, tail above. With tail, chaos never combines an "
    "edit outside the tail window with an append in the same window, because tail mode by "
    "design cannot see that combination"
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "fleet",
        help="simulate an agent fleet on shared transcripts, with chaos; verify every line",
        description="Worker processes run agent attempts on shared JSONL transcripts: each "
        "turn reacquires the session write lock (fence check), appends owned entries "
        "(sometimes a compaction), and releases the lock for a simulated model call, "
        "sometimes publishing an owned line meanwhile. A delivery mirror appends benign "
        "lines in the released windows, as a co-tenant (append_as_cotenant); with "
        "--cotenants, co-tenant processes append user messages there too, and with "
        "--supersede new attempts claim sessions in them. With --chaos, a chaos process makes "
        "foreign edits of every kind (appends, disguised appends, truncations, replacement, "
        "same-size rewrites with mtime restored, touch, chmod) in released windows and "
        "workers are SIGKILLed, some half-way through a line. Every event is logged as "
        "ground truth; the report checks the fence's verdicts and every acknowledged line "
        "against it. Exit status 0 only when no line was lost or duplicated, no injected "
        "takeover or supersession was missed, no false takeover was raised, every co-tenant "
        "append was accepted and no late write landed; 1 otherwise; 2 on bad input; "
        "130 when stopped by Ctrl-C (the first ^C ends the running attempts at a turn "
        "boundary and prints the report of what ran, marked INTERRUPTED; a second ^C "
        "abandons the run).",
        epilog="Every line of the report and every key of --json is explained in "
        "docs/fleet.md (https://github.com/sessionfence/sessionfence/blob/main/docs/fleet.md).",
    )
    p.add_argument("--workers", metavar="N", default="4", help="worker processes (default 4)")
    p.add_argument("--sessions", metavar="S", default="8", help="transcripts (default 8)")
    p.add_argument("--turns", metavar="T", default="10", help="turns per attempt (default 10)")
    p.add_argument(
        "--attempts", metavar="A", default="3", help="completed attempts per session (default 3)"
    )
    p.add_argument(
        "--transcript-mb",
        metavar="M",
        default="1",
        help="padding of each transcript at the start, in MB (default 1)",
    )
    p.add_argument(
        "--chaos",
        metavar="RATE",
        default="0",
        help="probability per released window of a foreign event; also the kills: an attempt "
        "is SIGKILLed at a random point with probability RATE/2 and dies half-way through a "
        "line with RATE/4 (at most 3 kills per session). Default 0: owned writes and benign "
        "mirror appends only. With --store postgresql the chaos is the multi-host kind: "
        "paused and killed hosts, server restarts, terminated connections, foreign lines "
        "and SQL edits (docs/multihost.md)",
    )
    p.add_argument(
        "--mirror",
        metavar="RATE",
        default="0.25",
        help="probability per released window of a benign delivery-mirror append (default 0.25)",
    )
    p.add_argument(
        "--cotenants",
        metavar="N",
        default="0",
        help="co-tenant processes (default 0): each appends user messages in released "
        "windows through append_as_cotenant, with an idempotency key (some retried with "
        "the same key); the claimant's fence must accept every one by its journal record",
    )
    p.add_argument(
        "--cotenant-rate",
        metavar="RATE",
        default="0.25",
        help="probability per released window that a co-tenant appends (default 0.25)",
    )
    p.add_argument(
        "--supersede",
        metavar="RATE",
        default="0",
        help="probability per released window that a new attempt claims the session (a "
        "supersession, default 0): the current attempt must stop with reason 'superseded' "
        "and its late append must be refused",
    )
    p.add_argument(
        "--chaos-kinds",
        metavar="K1,K2",
        help="restrict chaos to these event kinds (experiments; default: every kind the "
        "verify mode can see). Kinds: " + ", ".join(_kind_names()) + "; with --store "
        "postgresql, the multi-host kinds (docs/multihost.md)",
    )
    p.add_argument("--seed", metavar="X", default="0", help="random seed (default 0)")
    p.add_argument(
        "--store",
        metavar="STORE",
        default=None,
        help="where sessions live: the default is JSONL files on this host; 'postgresql' "
        "starts a throwaway PostgreSQL server for the run, 'postgresql://...' uses an "
        "existing one; worker processes then act as separate hosts (docs/multihost.md)",
    )
    p.add_argument("--verify", metavar="MODE", default=None, help=_VERIFY_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--dir",
        metavar="DIR",
        help="run in DIR (created; must be empty) and keep transcripts and logs there",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary run directory (a failed run always keeps it)",
    )
    p.add_argument("--quiet", action="store_true", help="no live progress on stderr")
    p.set_defaults(func=run)


def _kind_names() -> list[str]:
    from ..fleet.chaos import KINDS

    return list(KINDS)


def _kinds(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(k.strip() for k in text.split(",") if k.strip())


def _int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CliError(f"{name} must be a whole number, got {text!r}") from None


def _float(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CliError(f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise CliError(f"{name} must be a finite number, got {text!r}")
    return value


def _config(args: argparse.Namespace) -> Any:
    from ..fleet import FleetConfig, FleetConfigError

    try:
        return FleetConfig(
            workers=_int("--workers", args.workers),
            sessions=_int("--sessions", args.sessions),
            turns=_int("--turns", args.turns),
            attempts=_int("--attempts", args.attempts),
            transcript_mb=_float("--transcript-mb", args.transcript_mb),
            chaos=_float("--chaos", args.chaos),
            mirror=_float("--mirror", args.mirror),
            cotenants=_int("--cotenants", args.cotenants),
            cotenant_rate=_float("--cotenant-rate", args.cotenant_rate),
            supersede=_float("--supersede", args.supersede),
            seed=_int("--seed", args.seed),
            verify=args.verify,
            chaos_kinds=_kinds(args.chaos_kinds),
        )
    except FleetConfigError as exc:
        raise CliError(str(exc)) from None


def _run_dir(args: argparse.Namespace) -> tuple[str, bool]:
    """(directory, whether it is a temporary one made here)."""
    if args.dir is None:
        return tempfile.mkdtemp(prefix="sessionfence-fleet-"), True
    path = os.path.abspath(args.dir)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise CliError(f"--dir {args.dir}: not a directory")
        if os.listdir(path):
            raise CliError(f"--dir {args.dir}: not empty")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--dir {args.dir}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CliError(f"--dir {args.dir}: not writable")
    return path, False


def _check_space(cfg: Any, run_dir: str, temporary: bool) -> None:
    """Refuse a run whose transcripts cannot fit, before writing gigabytes of them."""
    need = cfg.sessions * cfg.padding_bytes
    free = shutil.disk_usage(run_dir).free
    # Room for growth, logs and one replaced copy (chaos replaces a transcript by rename).
    if need + cfg.padding_bytes + (64 << 20) > free:
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise CliError(
            f"{cfg.sessions} transcripts of {cfg.transcript_mb:g} MB need "
            f"{need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free in {run_dir}"
        )


def run(args: argparse.Namespace) -> int:
    if args.store is not None and args.store != "file":
        from ..fleet.multihost import cli_run

        return cli_run(args)
    cfg = _config(args)
    from ..fleet import FleetAbortedError, ProgressDisplay, build_report, render_text, run_fleet

    run_dir, temporary = _run_dir(args)
    _check_space(cfg, run_dir, temporary)
    # A temporary run directory goes away after a passing run; a failed or aborted run
    # keeps it, because its logs are the only account of what went wrong.
    keep = not temporary or args.keep
    display = ProgressDisplay(enabled=not args.quiet)
    try:
        try:
            result = run_fleet(cfg, run_dir, display)
        finally:
            display.close()
        report = build_report(cfg, result)
    except (FleetAbortedError, OSError) as exc:
        print(f"sessionfence fleet: aborted: {exc}", file=sys.stderr)
        return 1
    except BaseException:  # ^C: nothing worth keeping in a temporary directory
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    # A failed run keeps its directory; an interrupted one whose checks held so far is no
    # more worth keeping than a passed one.
    keep = keep or bool(report["failures"])
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
        report["run_dir"] = None
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        render_text(report, sys.stdout)
        if keep:
            print(f"run directory kept: {run_dir}")
    if report["interrupted"]:
        return 130
    return 0 if report["ok"] else 1
