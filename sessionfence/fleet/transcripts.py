"""Transcript lines the fleet writes, and the setup of padded session files.

Ids: padding lines use sequential ids below ``FOREIGN_ID_BASE`` and every line written by the
mirror or chaos takes a random id at or above it, so the only ids that can ever meet in one
file are the worker's own, which its session manager checks against the file. Worker lines
carry a CRC of their text so the final verification can tell a whole line from a damaged one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .._util import iso_utc

__all__ = [
    "COTENANT_MARK",
    "FOREIGN_ID_BASE",
    "SIM_MODEL",
    "SIM_PROVIDER",
    "checked_text",
    "cotenant_entry",
    "cotenant_ids",
    "entry_text",
    "foreign_id",
    "header_line",
    "last_lines",
    "line_ids",
    "make_transcripts",
    "message_line",
    "now_iso",
    "owned_message",
    "text_intact",
]

FOREIGN_ID_BASE = 0x80000000
SIM_PROVIDER = "fleet-sim"
SIM_MODEL = "sim-1"
_CHECK = "fleetCheck"
# Co-tenant messages name their writer here, so a worker can tell them from other lines.
COTENANT_MARK = "fleetCotenant"
_PHRASE = (
    "the transcript stays append only while the model thinks and the lock is released "
    "so every worker checks the fence before it writes again and stops on a takeover"
)
_WORDS = tuple(_PHRASE.split())


def now_iso() -> str:
    return iso_utc()


def foreign_id(rng: random.Random) -> str:
    return f"{rng.randrange(FOREIGN_ID_BASE, 1 << 32):08x}"


def _crc(text: str) -> str:
    return f"{zlib.crc32(text.encode()):08x}"


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def checked_text(rng: random.Random, tag: str) -> tuple[str, str]:
    """A text body and its CRC, so a verifier can tell a damaged line from a whole one."""
    text = f"{tag} {_sentence(rng, rng.randint(6, 40))}"
    return text, _crc(text)


def owned_message(rng: random.Random, tag: str) -> dict[str, Any]:
    """An ordinary assistant (or user) message as a worker's agent would persist it."""
    text, check = checked_text(rng, tag)
    return {
        "role": rng.choice(("assistant", "assistant", "user")),
        "content": [{"type": "text", "text": text}],
        "provider": SIM_PROVIDER,
        "model": SIM_MODEL,
        _CHECK: check,
    }


def cotenant_entry(rng: random.Random, writer: str, entry_id: str) -> dict[str, Any]:
    """A user message a co-tenant (a gateway delivering an inbound message) appends: not
    benign by content (a foreign user message is a takeover), owned by its journal record.
    Carries a check like a worker's lines, and its writer's name."""
    text, check = checked_text(rng, f"inbound from {writer}")
    return {
        "type": "message",
        "id": entry_id,
        "message": {
            "role": "user",
            "content": [{"type": "text", "text": text}],
            "timestamp": int(time.time() * 1000),
            _CHECK: check,
            COTENANT_MARK: writer,
        },
    }


def cotenant_ids(entries: Iterable[Any]) -> list[str]:
    """Ids of the co-tenant messages among parsed ``entries``."""
    ids = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        message = entry.get("message")
        ident = entry.get("id")
        if isinstance(message, Mapping) and COTENANT_MARK in message and isinstance(ident, str):
            ids.append(ident)
    return ids


def entry_text(entry: Any) -> tuple[str, str] | None:
    """(text, crc) of a line the fleet wrote with a check, or None for any other line."""
    if not isinstance(entry, dict):
        return None
    if entry.get("type") == "compaction":
        details = entry.get("details")
        if isinstance(details, dict) and isinstance(details.get(_CHECK), str):
            summary = entry.get("summary")
            return (summary if isinstance(summary, str) else "", details[_CHECK])
        return None
    message = entry.get("message")
    if not isinstance(message, dict) or not isinstance(message.get(_CHECK), str):
        return None
    try:
        text = message["content"][0]["text"]
    except (KeyError, IndexError, TypeError):
        return ("", message[_CHECK])
    return (text if isinstance(text, str) else "", message[_CHECK])


def text_intact(entry: Any) -> bool:
    """True unless the entry carries a fleet check that its text no longer matches."""
    pair = entry_text(entry)
    return pair is None or _crc(pair[0]) == pair[1]


def message_line(entry_id: str, parent: str | None, message: dict[str, Any]) -> bytes:
    entry = {
        "type": "message",
        "id": entry_id,
        "parentId": parent,
        "timestamp": now_iso(),
        "message": message,
    }
    return (json.dumps(entry, separators=(",", ":")) + "\n").encode()


def header_line() -> bytes:
    header = {
        "type": "session",
        "version": 3,
        "id": str(uuid.uuid4()),
        "timestamp": now_iso(),
        "cwd": "/fleet",
    }
    return (json.dumps(header, separators=(",", ":")) + "\n").encode()


# Padding: realistic message lines, built as %-templates so a block of thousands of lines
# costs one string join; ids are sequential per file (unique by construction). The mix is an
# agent's: short prompts, longer answers and large tool results (file contents, logs), about
# 1.5 KB a line on average, which is also what keeps a parse of a large transcript bearable.
_ROWS = [f"{i:5d}  " + " ".join(_WORDS[i % 7 :][:12]) for i in range(40)]
_LISTING = "\\n".join(_ROWS)
_PAD_TEMPLATES = tuple(
    '{"type":"message","id":"%08x","parentId":"%08x","timestamp":"2026-01-01T00:00:00.000Z",'
    '"message":{"role":"'
    + role
    + '","content":[{"type":"text","text":"'
    + text
    + '"}]'
    + extra
    + "}}\n"
    for role, text, extra in (
        ("user", " ".join(_WORDS[:12]), ""),
        (
            "assistant",
            " ".join(_WORDS * 3),
            ',"provider":"fleet-sim","model":"sim-0","usage":{"input":812,"output":164}',
        ),
        ("toolResult", _LISTING + "\\nexit code 0", ',"toolCallId":"call_1","toolName":"read"'),
        ("assistant", " ".join(_WORDS[::-1] * 2), ',"provider":"fleet-sim","model":"sim-0"'),
        ("toolResult", "\\n".join(_ROWS[:20]), ',"toolCallId":"call_2","toolName":"bash"'),
    )
)
_BLOCK_LINES = 8192


def _padding_blocks(total: int) -> Iterator[bytes]:
    """Blocks of whole padding lines, about ``total`` bytes in all (never more than one
    line past it). The first line's parent is the header's absence: ids start at 1."""
    written = 0
    next_id = 1
    templates = _PAD_TEMPLATES
    count = len(templates)
    while written < total:
        block = "".join(
            [templates[i % count] % (next_id + i, next_id + i - 1) for i in range(_BLOCK_LINES)]
        ).encode()
        if written + len(block) > total:
            # Trim to whole lines, keeping at least one so the file always reaches `total`.
            cut = block.rfind(b"\n", 0, max(1, total - written)) + 1
            if cut <= 0:
                cut = block.index(b"\n") + 1
            block = block[:cut]
        next_id += block.count(b"\n")
        written += len(block)
        yield block
        if next_id >= FOREIGN_ID_BASE:
            raise ValueError("transcript padding too large for the padding id space")


def make_transcripts(directory: str, sessions: int, padding: int) -> list[str]:
    """Create ``sessions`` transcripts: a header plus ``padding`` bytes of message lines.

    The padding is generated once and copied in-kernel into the other files, so the setup
    of many large transcripts costs about one generation plus disk bandwidth.
    """
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"session-{i:04d}.jsonl") for i in range(sessions)]
    first_pad = os.path.join(directory, ".padding")
    with open(first_pad, "wb") as out:
        for block in _padding_blocks(padding) if padding > 0 else ():
            out.write(block)
    try:
        for path in paths:
            with open(path, "wb") as out:
                out.write(header_line())
                with open(first_pad, "rb") as src:
                    _copy_into(src, out)
    finally:
        os.unlink(first_pad)
    return paths


def _copy_into(src: Any, out: Any) -> None:
    out.flush()
    size = os.fstat(src.fileno()).st_size
    offset = 0
    try:
        while offset < size:
            n = os.copy_file_range(src.fileno(), out.fileno(), size - offset, offset)
            if n <= 0:
                break
            offset += n
    except (AttributeError, OSError):
        pass
    if offset < size:
        src.seek(offset)
        shutil.copyfileobj(src, out, 1 << 20)


def last_lines(path: str, count: int) -> list[tuple[int, bytes]]:
    """The last ``count`` whole lines after the header as (offset, line with newline).

    Fewer when the file has fewer entry lines. Reads only the tail (growing as needed)."""
    size = os.path.getsize(path)
    chunk = 1 << 16
    with open(path, "rb") as f:
        while True:
            start = max(0, size - chunk)
            f.seek(start)
            data = f.read(size - start)
            pieces = data.split(b"\n")
            offsets = []
            pos = 0
            for piece in pieces:
                offsets.append(pos)
                pos += len(piece) + 1
            # Whole lines only: the last piece has no newline, and when the chunk starts
            # mid-file the first piece may be the end of a longer line.
            found = [
                (start + off, piece + b"\n")
                for i, (off, piece) in enumerate(zip(offsets, pieces, strict=True))
                if i < len(pieces) - 1 and (i > 0 or start == 0)
            ]
            if len(found) > count or start == 0:
                break
            chunk *= 4
    found = [(off, line) for off, line in found if off > 0]  # the header is never an entry
    return found[-count:] if count > 0 else []


def line_ids(data: bytes) -> list[str]:
    """The ids of the JSON lines in ``data`` (lines that do not parse are skipped)."""
    ids = []
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            ids.append(entry["id"])
    return ids
