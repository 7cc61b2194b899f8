"""Foreign writers: the chaos process (takeovers and metadata noise) and the delivery mirror.

Both act only inside a worker's released window (windows.py). Chaos holds the session's
real write lock and re-reads the session's row on the board under it: the phase must still
be RELEASED or REACQUIRING for the same attempt and window it saw before locking. That makes
every chaos event exact ground truth: it happened after the attempt's fence snapshot for
that window and before its fence check. Each event also records the lock generation it was
made under, so the oracle can order it against the worker's own acquisition. The mirror is a
co-tenant: it appends through ``append_as_cotenant`` (writer ``mirror``), which takes the
lock itself, and places its events in windows by the board before and after (windows.py).

Chaos makes at most one event per released window, and in a window that already grew (a
mirror or co-tenant append, an owned publication: the transcript is no longer the size it
had when the window opened) only appends, replacement or metadata events: cutting or
rewriting what was just appended could leave a net change that is benign, owned or nil,
which is no takeover. It does not act in a window where a supersession was made (so each
detection has one cause). In ``verify="tail"`` mode it never combines an edit outside the
tail window with an append in the same window (the mirror and the co-tenants skip such a
window too, holding the session's gate, which chaos takes before an edit): tail mode by
design cannot see that combination (docs/design.md, "check_append rules" and "Verify
modes"). For the same reason an edit outside the tail window that leaves the stat exactly as
it was (same timestamp tick on a coarse-timestamp filesystem) is logged as ``unseen`` in
tail mode, not as a takeover to detect: only ``verify="full"`` proves content outside the
tail window.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .board import APPENDED, CHAOS_ACTED, CLAIMED, EDITED_OUT_OF_WINDOW, Board
from .logs import LogWriter
from .transcripts import (
    SIM_MODEL,
    SIM_PROVIDER,
    checked_text,
    foreign_id,
    last_lines,
    line_ids,
    message_line,
    now_iso,
)
from .windows import EntryMaker, append_in_window, chosen_windows, new_stats, visit_windows

__all__ = [
    "KINDS",
    "Kind",
    "apply_event",
    "chaos_kinds",
    "chaos_main",
    "mirror_line",
    "mirror_main",
]


@dataclass(frozen=True)
class Kind:
    takeover: bool  # the fence must stop the attempt
    content_changing: bool  # the bytes of the transcript differ afterwards
    out_of_window: bool = False  # may change bytes outside the tail window
    full_only: bool = False  # only detectable with verify="full"
    weight: int = 2


KINDS: dict[str, Kind] = {
    "foreign-append": Kind(True, True),
    "disguised-append": Kind(True, True),
    "truncate": Kind(True, True),
    "truncate-regrow": Kind(True, True),
    "replace-same-bytes": Kind(True, False),
    "rewrite-head": Kind(True, True, out_of_window=True),
    "rewrite-middle": Kind(True, True, out_of_window=True),
    "rewrite-tail": Kind(True, True),
    "rewrite-head+append": Kind(True, True, out_of_window=True, full_only=True),
    "touch": Kind(False, False),
    "chmod": Kind(False, False),
}

# Kinds whose net effect stays what it says even after a benign append in the same window.
_AFTER_APPEND = ("foreign-append", "disguised-append", "replace-same-bytes", "touch", "chmod")

# Share of mirror events that also append a metadata record (custom, label, session_info).
_METADATA_SHARE = 0.2


def _stat_key(path: str) -> tuple[int, int, int, int, int] | None:
    """What a stat-based fence compares: dev, ino, size, mtime and ctime."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _last_id(path: str) -> str | None:
    lines = last_lines(path, 1)
    ids = line_ids(lines[0][1]) if lines else []
    return ids[0] if ids else None


def _append(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def mirror_line(rng: random.Random, parent: str | None) -> tuple[str, bytes]:
    """A transcript-only OpenClaw assistant message: benign by the default policy."""
    entry_id = foreign_id(rng)
    text, _ = checked_text(rng, "delivered")
    message = {
        "role": "assistant",
        "content": [{"type": "text", "text": text}],
        "provider": "openclaw",
        "model": "delivery-mirror",
        "api": "openai-responses",
        "stopReason": "stop",
        "timestamp": int(time.time() * 1000),
    }
    return entry_id, message_line(entry_id, parent, message)


def _metadata_line(rng: random.Random, parent: str) -> tuple[str, bytes]:
    """A ``custom``, ``label`` (of ``parent``, which the session knows) or ``session_info``
    record with a valid entry base: benign when the controller has a merge callback."""
    entry_id = foreign_id(rng)
    entry: dict[str, Any] = {
        "type": "custom",
        "id": entry_id,
        "parentId": parent,
        "timestamp": now_iso(),
    }
    which = rng.randrange(3)
    if which == 0:
        entry.update(customType="delivery-receipt", data={"channel": "mirror", "ok": True})
    elif which == 1:
        entry.update(type="label", targetId=parent, label=rng.choice(("delivered", "seen")))
    else:
        entry.update(type="session_info", name=f"fleet session {rng.randrange(1000)}")
    return entry_id, (json.dumps(entry, separators=(",", ":")) + "\n").encode()


def _foreign_user_line(rng: random.Random, parent: str | None) -> tuple[str, bytes]:
    entry_id = foreign_id(rng)
    text, _ = checked_text(rng, "injected")
    message = {"role": "user", "content": [{"type": "text", "text": text}]}
    return entry_id, message_line(entry_id, parent, message)


def _disguised_line(rng: random.Random, parent: str | None) -> tuple[str, bytes]:
    """A line shaped exactly like a worker's own entry (same provider, model, check)."""
    entry_id = foreign_id(rng)
    if rng.random() < 0.3:
        text, check = checked_text(rng, "summary")
        entry = {
            "type": "compaction",
            "id": entry_id,
            "parentId": parent,
            "timestamp": now_iso(),
            "summary": text,
            "firstKeptEntryId": parent or entry_id,
            "tokensBefore": rng.randint(1000, 90000),
            "details": {"fleetCheck": check},
        }
        return entry_id, (json.dumps(entry, separators=(",", ":")) + "\n").encode()
    text, check = checked_text(rng, "reply")
    message = {
        "role": "assistant",
        "content": [{"type": "text", "text": text}],
        "provider": SIM_PROVIDER,
        "model": SIM_MODEL,
        "fleetCheck": check,
    }
    return entry_id, message_line(entry_id, parent, message)


_TEXT_KEYS = (b'"text":"', b'"summary":"', b'"cwd":"', b'"type":"')


def mutation_offset(
    line: bytes, rng: random.Random, keys: Sequence[bytes] = _TEXT_KEYS
) -> int | None:
    """Offset of a lowercase letter inside the string value of the first of ``keys`` in
    ``line`` that holds one, never the letter of an escape (the edit keeps the JSON
    valid); None when there is none."""
    for key in keys:
        start = line.find(key)
        if start < 0:
            continue
        start += len(key)
        end = line.find(b'"', start)
        # Never the letter of an escape (the n of \n): that would make the line invalid
        # JSON, and the edit must change content, not tear the line.
        letters = [i for i in range(start, end) if 0x61 <= line[i] <= 0x7A and line[i - 1] != 0x5C]
        if letters:
            return rng.choice(letters)
    return None


def _line_at(path: str, where: str) -> tuple[int, bytes] | None:
    """The head (first entry, else the header), middle or tail line of the file."""
    if where == "tail":
        found = last_lines(path, 1)
        if found:
            return found[0]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if where == "middle":
            start = max(0, size // 2 - (1 << 15))
            f.seek(start)
            data = f.read(1 << 16)
            center = size // 2 - start
            line_start = data.rfind(b"\n", 0, center) + 1
            line_end = data.find(b"\n", center)
            if (line_start > 0 or start == 0) and line_end >= 0:
                return start + line_start, data[line_start : line_end + 1]
        f.seek(0)
        data = f.read(1 << 16)
    header_end = data.find(b"\n") + 1
    second_end = data.find(b"\n", header_end)
    if header_end > 0 and second_end >= 0:
        return header_end, data[header_end : second_end + 1]
    return (0, data[:header_end]) if header_end > 0 else None


def _rewrite(path: str, where: str, rng: random.Random) -> dict[str, Any]:
    target = _line_at(path, where)
    if target is None:
        return {"skipped": "empty file"}
    offset, line = target
    pos = mutation_offset(line, rng)
    if pos is None:
        return {"skipped": "no letter to change"}
    old = line[pos]
    new = rng.choice([c for c in b"abcdefghijklmnopqrstuvwxyz" if c != old])
    before = os.stat(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([new]), offset + pos)
    finally:
        os.close(fd)
    # Same size, old mtime: only ctime (and the bytes) betray the edit.
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    return {"altered": line_ids(line), "offset": offset + pos}


def _truncate(path: str, rng: random.Random, regrow: bool) -> dict[str, Any] | None:
    victims = last_lines(path, rng.randint(1, 3))
    if not victims:
        return None
    old_size = os.path.getsize(path)
    cut = victims[0][0]
    with open(path, "rb") as f:
        f.seek(cut)
        removed = f.read(old_size - cut)
    os.truncate(path, cut)
    result: dict[str, Any] = {"removed": line_ids(removed), "cut": cut}
    if regrow:
        parent = _last_id(path)
        added = []
        data = b""
        while cut + len(data) <= old_size:
            entry_id, line = _foreign_user_line(rng, parent)
            added.append(entry_id)
            data += line
            parent = entry_id
        _append(path, data)
        result["added"] = added
    return result


def apply_event(kind: str, path: str, rng: random.Random) -> dict[str, Any]:
    """Make one foreign event of ``kind``; returns what it did: the ids of lines it
    ``removed`` (truncations), ``altered`` (same-size rewrites keep the id) or ``added``.

    A kind that cannot apply to the file as it is (truncating a file with no entry lines)
    falls back to a foreign append and says so in ``applied``.
    """
    applied = kind
    result: dict[str, Any] | None
    if kind in ("truncate", "truncate-regrow"):
        result = _truncate(path, rng, regrow=kind == "truncate-regrow")
        if result is None:
            applied = "foreign-append"
    if applied in ("foreign-append", "disguised-append"):
        make = _foreign_user_line if applied == "foreign-append" else _disguised_line
        entry_id, line = make(rng, _last_id(path))
        _append(path, line)
        result = {"added": [entry_id]}
    elif kind == "replace-same-bytes":
        tmp = f"{path}.chaos-replace"
        shutil.copyfile(path, tmp)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
        result = {}
    elif kind.startswith("rewrite-"):
        where = kind.removeprefix("rewrite-").removesuffix("+append")
        result = _rewrite(path, where, rng)
        if kind.endswith("+append"):
            entry_id, line = mirror_line(rng, _last_id(path))
            _append(path, line)
            result["added"] = [entry_id]
    elif kind == "touch":
        os.utime(path)
        result = {}
    elif kind == "chmod":
        mode = stat.S_IMODE(os.stat(path).st_mode)
        os.chmod(path, mode ^ stat.S_IRGRP)
        result = {}
    assert result is not None
    result["applied"] = applied
    return result


def chaos_kinds(verify: str) -> list[str]:
    """The kinds chaos draws from by default: all, less those tail mode cannot see."""
    return [k for k, spec in KINDS.items() if verify == "full" or not spec.full_only]


def chaos_main(
    paths: list[str],
    board: Board,
    rate: float,
    verify: str,
    seed: str,
    log_path: str,
    kinds: list[str] | None = None,
) -> None:
    """Process entry. ``kinds`` overrides the default draw (experiments and tests: e.g. to
    show that tail mode indeed misses an outside edit followed by an append)."""
    rng = random.Random(seed)
    if kinds is None:
        kinds = chaos_kinds(verify)
    weights = [KINDS[k].weight for k in kinds]
    after_append = [k for k in _AFTER_APPEND if k in kinds]
    log = LogWriter(log_path)

    def act(s: int, attempt: int, window: int, lock: Any) -> dict[str, Any] | None:
        if board.marked(s, CLAIMED):
            return None  # superseded in this window: the detection must have one cause
        if board.marked(s, APPENDED) or os.path.getsize(paths[s]) != board.open_size(s):
            # This window already grew (a mirror or co-tenant append, an owned
            # publication): truncating or rewriting what was just written could leave the
            # net change benign, owned or nil, which is no takeover.
            if not after_append:
                return None
            kind = rng.choice(after_append)
        else:
            kind = rng.choices(kinds, weights)[0]
        board.mark(s, CHAOS_ACTED)
        if KINDS[kind].out_of_window:
            # Before the edit: an appender that looks at the board after this (holding the
            # gate, which chaos holds now) declines this window in tail mode.
            board.mark(s, EDITED_OUT_OF_WINDOW)
        before = _stat_key(paths[s])
        result = apply_event(kind, paths[s], rng)
        if "skipped" in result:
            return None
        spec = KINDS[result["applied"]]
        board.mark(s, EDITED_OUT_OF_WINDOW if spec.out_of_window else 0)
        if result.get("added"):
            board.mark(s, APPENDED)
        takeover = spec.takeover
        if verify == "tail" and spec.out_of_window and _stat_key(paths[s]) == before:
            # Same tick on a coarse-timestamp filesystem: the stat did not move, and tail
            # mode proves only the tail window, so this edit is invisible by design (the
            # fence sees an unchanged file). Logged as such, not as a takeover to detect.
            takeover = False
            result["unseen"] = "same-size edit outside the tail window within one timestamp tick"
        result.update(kind=result.pop("applied"), takeover=takeover)
        result["content_changing"] = spec.content_changing
        return result

    stats = visit_windows(paths, board, rng, rate, act, log, "chaos", gated=True)
    log.write({"source": "chaos", "stats": stats})
    log.close()


def _as_entry(line: bytes) -> dict[str, Any]:
    """A line built for a raw append, as an entry for ``append_as_cotenant``: its parent is
    left to the append (the last entry in the file when it lands)."""
    entry: dict[str, Any] = json.loads(line)
    entry.pop("parentId", None)
    return entry


def mirror_main(
    paths: list[str], board: Board, rate: float, verify: str, seed: str, log_path: str
) -> None:
    """The delivery mirror: benign assistant messages (sometimes with a metadata record)
    appended in released windows through ``append_as_cotenant`` as the co-tenant
    ``mirror``, each with an idempotency key."""
    rng = random.Random(seed)
    log = LogWriter(log_path)
    stats = new_stats()
    serial = 0

    def message(_added: Sequence[str]) -> tuple[dict[str, Any], str]:
        nonlocal serial
        serial += 1
        _, line = mirror_line(rng, None)
        return _as_entry(line), f"mirror-{serial}"

    def metadata(added: Sequence[str]) -> tuple[dict[str, Any], str]:
        nonlocal serial
        serial += 1
        _, line = _metadata_line(rng, added[-1])
        return _as_entry(line), f"mirror-{serial}"

    for s, attempt, window in chosen_windows(len(paths), board, rng, rate, stats):
        makers: list[EntryMaker] = [message] * rng.randint(1, 2)
        kind = "mirror"
        if rng.random() < _METADATA_SHARE:
            # The other benign kinds a merge callback takes (docs/design.md, "Benign
            # policy"): global metadata.
            kind = "mirror+metadata"
            makers.append(metadata)
        event = append_in_window(
            paths[s], board, s, attempt, window, makers, "mirror", verify, stats
        )
        if event is None:
            continue
        if len(event["added"]) < len(makers):
            kind = "mirror"  # the window closed before the metadata record
        event.update(kind=kind, source="mirror")
        log.write(event)
        stats["events"] += 1
    log.write({"source": "mirror", "stats": stats})
    log.close()
