"""File work of the transcript model: the streaming parse, appends, torn-tail quarantine,
and the rewrite of a pre-tree (v1) session into the current format.

Kept apart from ``transcript.py`` so the tree logic there reads without the byte juggling.

The last line of a file is *complete* when it parses as a JSON object, whether or not its
newline was written; only a last line that does not (a crashed writer's half line) is
*torn*. This is openclaw's reading (its loader parses every line of ``content.trim()``, and
``sessionFileNeedsAppendSeparator`` in ``src/agents/sessions/session-manager-file.ts`` makes
the next append start with a separating ``\n``) and pi-mono's (``loadEntriesFromFile`` in
``packages/coding-agent/src/core/session-manager.ts`` parses it the same way). A JSON object
cannot continue after its closing brace, so a line that parses is either finished or only
lacks trailing whitespace: whatever its writer still adds can only be a newline, and an
append that starts with its own ``\n`` can at worst leave a blank line, which every reader
skips, never two records on one line.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import _jsonl

# Re-exported: the manager and the tests reach the shared I/O helpers through this module.
from .._util import fsync_dir as fsync_dir
from .._util import gc_paused as gc_paused
from .._util import iso_utc as iso_now
from .._util import pread as pread
from .._util import read_exact as read_exact
from .._util import utc_stamp as utc_stamp
from .._util import write_all as write_all

if TYPE_CHECKING:
    from .._backend import Digest as DigestT

__all__ = [
    "DEFAULT_CHUNK",
    "Loaded",
    "RowSink",
    "append_flags",
    "clean_end",
    "discard",
    "entry_at",
    "gc_paused",
    "iso_now",
    "last_line",
    "new_entry_id",
    "parse_fd",
    "pread",
    "quarantine_bytes",
    "read_exact",
    "settled_end",
    "uuid7",
    "write_all",
]

DEFAULT_CHUNK = 8 << 20
_SCAN_BACK = 64 << 10
_UTF8_BOM = b"\xef\xbb\xbf"
_O_BINARY: int = getattr(os, "O_BINARY", 0)


def append_flags(create: bool) -> int:
    # O_RDWR, not O_WRONLY: the one-byte torn-tail check reads through the same descriptor.
    flags = os.O_RDWR | os.O_APPEND | _O_BINARY
    if create:
        flags |= os.O_CREAT | os.O_EXCL
    return flags


def parse_last_line(line: bytes, at_start: bool) -> tuple[dict[str, Any] | None, bool]:
    """``(entry, had_invalid_utf8)`` for a last line without its newline: the parsed object
    when the line is complete (parses as a JSON object), else ``(None, False)`` (torn).
    ``at_start``: the line starts the file, so a UTF-8 BOM before it is dropped."""
    if at_start and line[: len(_UTF8_BOM)] == _UTF8_BOM:
        line = line[len(_UTF8_BOM) :]
    try:
        value, replaced = _jsonl.loads_line(line)
    except (ValueError, RecursionError):
        return None, False
    if type(value) is not dict:
        return None, False
    return value, replaced


def entry_at(fd: int, start: int, end: int) -> dict[str, Any] | None:
    """The entry written at ``[start, end)`` by one journaled append: its last non-blank
    line (the bytes may begin with a separating newline or the header line), parsed as
    a reader parses it; None when that line is not a JSON object."""
    data = read_exact(fd, end - start, start)
    for raw in reversed(data.split(b"\n")):
        if raw.strip():
            value, _ = parse_last_line(raw, False)
            return value
    return None


def last_line(fd: int, size: int) -> tuple[int, bytes, bool]:
    """``(offset, bytes, complete)`` of the file's last line, ``[offset, size)``, for a file
    that does not end in a newline: ``complete`` when it parses as a JSON object."""
    offset = clean_end(fd, size)
    data = read_exact(fd, size - offset, offset)
    entry, _ = parse_last_line(data, offset == 0)
    return offset, data, entry is not None


def clean_end(fd: int, size: int) -> int:
    """Offset just past the last ``\\n`` in ``[0, size)`` (0 when there is none)."""
    end = size
    while end > 0:
        start = max(0, end - _SCAN_BACK)
        block = pread(fd, end - start, start)
        if len(block) != end - start:
            raise OSError(errno.EIO, "short read while looking for the last newline")
        nl = block.rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        end = start
    return 0


# A last byte that is not a newline is either a torn tail (a writer died mid-line: the size
# holds still) or another process's append caught mid-copy: Linux grows a file page by page
# during one write(), and readers do not wait for the writer's inode lock. These bound how
# long a suspicious tail is watched before it is called torn.
TORN_SETTLE = 0.2  # seconds the size must hold still without a newline at the end
TORN_SETTLE_MAX = 5.0  # overall cap, even while the file keeps growing


def settled_end(
    fd: int,
    settle: float = TORN_SETTLE,
    limit: float = TORN_SETTLE_MAX,
) -> tuple[int, bool]:
    """``(size, ends_cleanly)``: whether the file is empty or ends in ``\n``.

    The common case costs one ``fstat`` and one one-byte ``pread``. Only a tail without a
    newline is watched (short sleeps, re-reading that one byte) until it either gains its
    newline (an append in flight) or holds still for ``settle`` seconds (torn).
    """
    size = os.fstat(fd).st_size
    if size == 0 or pread(fd, 1, size - 1) == b"\n":
        return size, True
    start = stable_since = time.monotonic()
    pause = 1e-5
    while True:
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)
        now_size = os.fstat(fd).st_size
        if now_size == 0 or pread(fd, 1, now_size - 1) == b"\n":
            return now_size, True
        now = time.monotonic()
        if now_size != size:
            size, stable_since = now_size, now
        elif now - stable_since >= settle or now - start >= limit:
            return size, False


def new_entry_id(taken: Callable[[str], bool]) -> str:
    """8 hex chars not yet used in the file; after 100 collisions a full UUID (hex)."""
    for _ in range(100):
        candidate = os.urandom(4).hex()
        if not taken(candidate):
            return candidate
    return uuid.uuid4().hex


def uuid7() -> str:
    """A time-ordered UUID (version 7) for new session headers, as openclaw writes them."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def quarantine_bytes(path: str, data: bytes, mode: int = 0o600) -> str:
    """Writes ``data`` to a new ``<path>.torn-<UTC time>`` file, durably; returns its path.

    Never replaces an existing file (``O_EXCL``, then ``-1``, ``-2``, ... suffixes). The
    file and its directory entry are fsynced before returning, because the caller truncates
    the transcript next and a crash in between must not lose the bytes. If anything fails
    (a full disk, a short write, an fsync error) the new file is removed again before the
    error propagates: no empty or partial copy is left behind.
    """
    return durable_new_file(f"{path}.torn-{utc_stamp()}", data, mode)


def durable_new_file(base: str, data: bytes, mode: int = 0o600) -> str:
    """Creates ``base`` (or ``base-1``, ``base-2``, ...: never an existing file) holding
    ``data``, fsyncs it and its directory, returns its path; removes it again on failure."""
    for attempt in range(10_000):
        target = base if attempt == 0 else f"{base}-{attempt}"
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, mode)
        except FileExistsError:
            continue
        written = False
        try:
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            written = True
        finally:
            if not written:
                # A copy that is not known to be whole and durable is worth nothing (the
                # caller keeps the original as it is): leave no partial or empty file.
                discard(target)
        fsync_dir(os.path.dirname(os.path.abspath(target)))
        return target
    raise FileExistsError(errno.EEXIST, "no free file name", base)  # pragma: no cover


def discard(path: str) -> None:
    """Removes a file this module created, if it is still there; never raises."""
    with contextlib.suppress(OSError):
        os.unlink(path)


@dataclass
class Loaded:
    """What one streaming pass over a transcript found."""

    values: list[dict[str, Any]] = field(default_factory=list)
    malformed: int = 0
    invalid_utf8: int = 0
    size: int = 0
    torn: tuple[int, int] | None = None
    clean_digest: DigestT | None = None  # digest of [0, torn offset) when there is a torn tail
    # The first line that parses as JSON, whatever its kind: what pi-mono's
    # loadEntriesFromFile checks for a session header (malformed lines before it are skipped)
    first: Any = None
    seen_first: bool = False
    # the last line is a complete entry whose newline was never written
    unterminated: bool = False


class RowSink:
    """What ``parse_fd`` feeds instead of a bare digest when the caller wants rows: every
    value with its place in the file (``take(value, offset, length)``) rather than a list
    of all of them, the bytes of every complete line to ``digest`` (may be ``None``) and
    ``blocks`` (may be ``None``), and the file offset the descriptor starts at (``start``;
    the descriptor must be positioned there).

    Passed as ``parse_fd``'s ``digest`` argument, so that the parse keeps one signature."""

    def __init__(
        self,
        start: int,
        take: Callable[[dict[str, Any], int, int], None],
        digest: DigestT | None = None,
        blocks: Any = None,
        *,
        skeleton: bool = False,
    ) -> None:
        self.start = start
        # values may be skeletons: only type, id, parentId and appendMode (see _parse_rows)
        self.skeleton = skeleton
        # called with the file offset reached after each read
        self.progress: Callable[[int], None] | None = None
        self.take = take
        self.digest = digest
        self.blocks = blocks
        # offset just past the last newline fed (the end of the last complete line)
        self.clean_end = start

    def update(self, data: bytes | memoryview) -> None:
        if self.digest is not None:
            self.digest.update(data)
        if self.blocks is not None:
            self.blocks.update(data)
        self.clean_end += len(data)

    def copy(self) -> DigestT | None:
        return self.digest.copy() if self.digest is not None else None

    def update_tail(self, data: bytes | memoryview) -> None:
        """The last line without its newline: the digest covers it, the blocks do not (they
        stop at ``clean_end``)."""
        if self.digest is not None:
            self.digest.update(data)


def parse_fd(fd: int, digest: DigestT | RowSink, chunk: int = DEFAULT_CHUNK) -> Loaded:
    """Reads ``fd`` to its end, parsing every complete line and hashing every byte read.

    Each byte is hashed exactly once, in file order, straight from the read buffer; a last
    line without its newline (a torn tail) is hashed after a copy of the digest is taken, so
    ``clean_digest`` covers exactly the bytes a repair keeps. Lines are handed to the parser
    as ``memoryview`` slices of the read buffer: only a line that spans two reads is copied.
    Blank lines are skipped without counting; lines that are not JSON objects count as
    malformed.

    With a ``RowSink`` as ``digest``, the values go to ``sink.take(value, offset, length)``
    (``offset`` and ``length`` of the line in the file, without its newline and without a
    leading BOM) instead of ``Loaded.values``, and offsets start at ``sink.start``.
    """
    out = Loaded()
    sink = digest if isinstance(digest, RowSink) else None
    base = sink.start if sink is not None else 0
    pending: list[bytes] = []  # bytes after the last newline seen, not yet hashed
    total = 0
    first = base == 0
    while True:
        data = os.read(fd, chunk)
        if not data:
            break
        at = base + total  # file offset of data[0]
        total += len(data)
        if sink is not None and sink.progress is not None:
            sink.progress(base + total)
        nl = data.rfind(b"\n")
        if nl < 0:
            pending.append(data)
            continue
        view = memoryview(data)
        for part in pending:
            digest.update(part)
        digest.update(view[: nl + 1])
        lines: list[bytes | memoryview] = []
        offsets: list[int] = []
        start = 0
        joined = False
        if pending:
            joined = True
            start = data.find(b"\n") + 1
            before = sum(len(part) for part in pending)
            pending.append(data[: start - 1])
            line_at = at - before
            lines.append(b"".join(pending))
            offsets.append(line_at)
            pending = []
        elif first and data.startswith(_UTF8_BOM):
            # JS trim() drops a BOM at the start of the file's text (docs/design.md,
            # "JavaScript JSON rules")
            start = len(_UTF8_BOM)
        if first:
            first = False
            if lines and lines[0][: len(_UTF8_BOM)] == _UTF8_BOM:
                lines[0] = lines[0][len(_UTF8_BOM) :]
                offsets[0] += len(_UTF8_BOM)
        find = data.find
        region = start  # lines from here to nl all sit in this read buffer
        while start <= nl:
            end = find(b"\n", start, nl + 1)
            if end > start:
                lines.append(view[start:end])
                offsets.append(at + start)
            start = end + 1
        if nl + 1 < len(data):
            pending.append(data[nl + 1 :])
        if sink is None:
            _parse_lines(lines, out)
        else:
            _parse_rows(lines, offsets, out, sink, view[region : nl + 1], joined)
        del lines, view  # the views pin ``data``; let it go before the next read
    out.size = base + total
    if pending:
        tail = b"".join(pending)
        offset = out.size - len(tail)
        at_start = offset == 0
        entry, replaced = parse_last_line(tail, at_start)
        if entry is not None:
            # complete, only its newline is missing: an entry like any other (the next
            # append writes the separating newline first)
            if sink is not None:
                sink.update_tail(tail)
                skip = len(_UTF8_BOM) if at_start and tail.startswith(_UTF8_BOM) else 0
                sink.take(entry, offset + skip, len(tail) - skip)
            else:
                digest.update(tail)
                out.values.append(entry)
            out.invalid_utf8 += replaced
            out.unterminated = True
            if not out.seen_first:
                out.first, out.seen_first = entry, True
        else:
            out.clean_digest = digest.copy()
            if sink is not None:
                sink.update_tail(tail)
            else:
                digest.update(tail)
            out.torn = (offset, len(tail))
    return out


# Entry types whose every field the tree needs (and the header): parsed whole even on the
# skeleton route.
_WHOLE_TYPES = frozenset({"session", "leaf", "label", "session_info"})


def _skeleton_decoder() -> Callable[[bytes | memoryview], Any] | None:
    """A msgspec decoder of just the fields the tree needs (the rest of the line is checked
    for JSON syntax and skipped, not built), when msgspec is the selected fast parser."""
    if _jsonl.fast_parser() != "msgspec":
        return None
    global _SKELETON
    if _SKELETON is None:
        import msgspec

        unset = msgspec.UNSET

        class Skeleton(msgspec.Struct):
            type: Any = unset
            id: Any = unset
            parentId: Any = unset
            appendMode: Any = unset

        _SKELETON = (msgspec.json.Decoder(Skeleton).decode, unset)
    return _SKELETON[0]


_SKELETON: tuple[Callable[[bytes | memoryview], Any], Any] | None = None


def _parse_rows(
    lines: list[bytes | memoryview],
    offsets: list[int],
    out: Loaded,
    sink: RowSink,
    region: memoryview | None = None,
    joined: bool = False,
) -> None:
    """``_parse_lines`` for a ``RowSink``: the same verdicts, values handed on with their
    place in the file instead of kept.

    With ``sink.skeleton`` (and msgspec), a line that is valid UTF-8 (checked at C speed)
    and of a type in neither ``_WHOLE_TYPES`` nor first in the file is decoded as a
    skeleton: msgspec checks its whole syntax but builds only ``type``, ``id``,
    ``parentId`` and ``appendMode`` (what the tree rules read), so big message bodies are
    never turned into strings. Whatever msgspec refuses, or is not an object, goes the
    exact route (``loads_line``), as does every line that is not valid UTF-8.

    ``region``: the read buffer's bytes that hold every line but a first ``joined`` one
    (pieced together from two reads): one UTF-8 check covers them all when it passes."""
    take = sink.take
    loads = _jsonl.loads_line
    skeleton = _skeleton_decoder() if sink.skeleton else None
    skeletons: list[Any] = []
    region_ok = False
    if skeleton is not None:
        from .. import _backend

        invalid_at = _backend.active().utf8_invalid_at
        assert _SKELETON is not None
        unset = _SKELETON[1]
        # The UTF-8 check of the region runs beside the skeleton decodes (the C check
        # releases the GIL); the lines are taken only once both are done.
        verdict: list[int] = []
        checker = None
        if region is not None:
            checker = threading.Thread(target=lambda: verdict.append(invalid_at(region)))
            checker.start()
        for line in lines:
            try:
                skeletons.append(skeleton(line))
            except (ValueError, RecursionError, TypeError):
                skeletons.append(None)
        if checker is not None:
            checker.join()
            region_ok = bool(verdict) and verdict[0] < 0
    first = joined
    for i, (line, offset) in enumerate(zip(lines, offsets, strict=True)):
        if skeleton is not None and out.seen_first:
            ok = region_ok and not first
            first = False
            sk = skeletons[i] if ok or invalid_at(line) < 0 else None
            if sk is not None:
                kind = sk.type
                if not (type(kind) is str and kind in _WHOLE_TYPES):
                    value: dict[str, Any] = {}
                    if kind is not unset:
                        value["type"] = kind
                    if sk.id is not unset:
                        value["id"] = sk.id
                    if sk.parentId is not unset:
                        value["parentId"] = sk.parentId
                    if sk.appendMode is not unset:
                        value["appendMode"] = sk.appendMode
                    take(value, offset, len(line))
                    continue
        else:
            first = False
        try:
            value, replaced = loads(line)
        except (ValueError, RecursionError):
            if not _blank_after_js_trim(line):
                out.malformed += 1
            continue
        if not out.seen_first:
            out.first, out.seen_first = value, True
        if replaced:
            out.invalid_utf8 += 1
        if type(value) is dict:
            take(value, offset, len(line))
        else:
            out.malformed += 1


def _parse_lines(lines: list[bytes | memoryview], out: Loaded) -> None:
    append = out.values.append
    loads = _jsonl.loads_line
    for line in lines:
        try:
            value, replaced = loads(line)
        except (ValueError, RecursionError):
            if not _blank_after_js_trim(line):
                out.malformed += 1
            continue
        if not out.seen_first:
            out.first, out.seen_first = value, True
        if replaced:
            out.invalid_utf8 += 1
        if type(value) is dict:
            append(value)
        else:
            out.malformed += 1


def _blank_after_js_trim(line: bytes | memoryview) -> bool:
    # Only reached for lines JSON refused (blank ones included), so the decode cost never
    # hits the fast path.
    return not _jsonl.js_trim(str(line, "utf-8", "replace"))


# ------------------------------------------------------------------------------------------
# Pre-tree (v1) sessions and their migration.
# ------------------------------------------------------------------------------------------

CURRENT_VERSION = 3  # pi-mono CURRENT_SESSION_VERSION, openclaw CURRENT_SESSION_VERSION


def reference_version(header: dict[str, Any]) -> float:
    """The format version a reference reader sees in a header: ``header.version ?? 1``
    (pi-mono ``migrateToCurrentVersion``), compared as JavaScript compares numbers. A value
    no number can be made of is NaN, which is neither old nor current there (no migration)."""
    value = header.get("version")
    if value is None:
        return 1.0
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        text = _jsonl.js_trim(value)
        if not text:
            return 0.0  # Number("") is 0
        try:
            number = float(text)
        except ValueError:
            return math.nan
        # float() also takes "nan", "inf" and "1_0", which Number() does not
        lowered = text.lower()
        if "_" in text or "n" in lowered.replace("infinity", ""):
            return math.nan
        return number
    return math.nan


def is_session_header(value: Any) -> bool:
    return type(value) is dict and value.get("type") == "session"


def describe_not_a_session(first: Any, seen: bool, malformed: int) -> str | None:
    """What a file looks like when its first JSON line is not a session header (None when
    it is one, or when the file holds no complete line yet). The references check exactly
    this line: pi-mono ``loadEntriesFromFile`` (``entries[0]`` must be ``type: "session"``,
    or the file is replaced by a fresh session on the next open) and openclaw
    ``hasReadableSessionHeader`` (a rewrite, keeping a ``.corrupt`` backup)."""
    if not seen:
        if malformed:
            return f"no line is JSON ({malformed} line(s) of other text)"
        return None
    if is_session_header(first):
        return None
    if type(first) is not dict:
        kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(first))
        if first is None:
            kind = "null"
        return f"its first JSON line is {kind or 'a number'}, not a session header object"
    keys = list(first)
    shown = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
    kind = first.get("type")
    if {"uuid", "parentUuid", "leafUuid"} & set(keys) or (
        "sessionId" in first and kind in ("user", "assistant", "system", "summary")
    ):
        return (
            f"a Claude Code log, not a session transcript (first record: type {kind!r} "
            f"with keys {shown})"
        )
    if "role" in first and "content" in first:
        return f"a plain chat log (first record: role {first['role']!r}, keys {shown})"
    if isinstance(kind, str):
        return f"its first record is a {kind!r} entry, not a session header (keys {shown})"
    return f"its first record is a JSON object without a session type (keys {shown})"


@dataclass
class MigrationPlan:
    """The new bytes of a session rewritten in the current format (``None``: it is current,
    nothing to do), and what changed."""

    data: bytes | None
    from_version: float
    entries: int = 0  # entries that were given an id and a parent (v1 -> v2)
    kept_lines: int = 0  # lines kept byte for byte (not JSON objects)
    blank_lines: int = 0  # blank lines dropped
    id_map: dict[str, str] = field(default_factory=dict)  # an entry's old id -> its new id


class TornTail(Exception):
    """The file ends in a torn line: ``args = (offset, length)``."""


class NotASession(Exception):
    """The file's first JSON line is not a session header: ``args = (description,)``."""


_BAD: Any = object()  # a line that is not JSON


def plan_migration(raw: bytes) -> MigrationPlan:
    """What pi-mono's ``migrateToCurrentVersion`` makes of the file ``raw`` (``data`` is
    ``None`` when it is current already). Raises ``NotASession`` and ``TornTail``.

    pi-mono ``migrateV1ToV2`` (``packages/coding-agent/src/core/session-manager.ts``), in file
    order: every header (``type: "session"``) gets ``version`` 2; every other entry object
    gets a new 8-hex-digit ``id`` (unique in the file) and ``parentId`` = the previous
    entry's id (``null`` for the first), so the file becomes the linear chain it always
    was; a compaction's ``firstKeptEntryIndex`` (an index into the file's parsed lines,
    the header being 0) becomes ``firstKeptEntryId`` and is deleted. ``migrateV2ToV3``:
    headers get ``version`` 3, a message with role ``hookMessage`` gets role ``custom``.
    New keys go last, as JavaScript assigns them; each migrated line is written as
    ``JSON.stringify`` writes it (``_jsonl.dumps_js``), the lines joined by ``\\n`` with a
    final ``\\n``, as pi-mono's ``_rewriteFile`` writes them.

    Where this differs from pi-mono, on purpose: lines that are not JSON objects (pi-mono
    drops unparseable lines, and crashes on a bare number) are kept byte for byte and are
    not part of the chain; blank lines are dropped as pi-mono drops them. A torn last line
    is refused (repair it first) rather than silently dropped.
    """
    parts = raw.split(b"\n")
    tail = parts.pop()
    if tail:
        offset = len(raw) - len(tail)
        entry, _ = parse_last_line(tail, offset == 0)
        if entry is None:
            raise TornTail(offset, len(tail))
        parts.append(tail)
    lines: list[tuple[bytes, Any]] = []
    values: list[Any] = []  # pi-mono's fileEntries: every line JSON.parse accepts
    blank = 0
    for number, line in enumerate(parts):
        if number == 0 and line[: len(_UTF8_BOM)] == _UTF8_BOM:
            line = line[len(_UTF8_BOM) :]
        if _blank_after_js_trim(line):
            blank += 1
            continue
        try:
            value, _ = _jsonl.loads_line(line)
        except (ValueError, RecursionError):
            lines.append((line, _BAD))
            continue
        lines.append((line, value))
        values.append(value)
    first = values[0] if values else None
    description = describe_not_a_session(first, bool(values), len(lines) - len(values))
    if description is not None:
        raise NotASession(description)
    header = next(v for v in values if is_session_header(v))
    version = reference_version(header)
    if not version < CURRENT_VERSION:  # NaN included: the references do not migrate it
        return MigrationPlan(None, version)
    plan = MigrationPlan(b"", version, blank_lines=blank)
    if version < 2:
        _v1_to_v2(values, plan)
    for value in values:
        if type(value) is not dict:
            continue
        if value.get("type") == "session":
            value["version"] = 3
        elif value.get("type") == "message":
            message = value.get("message")
            if type(message) is dict and message.get("role") == "hookMessage":
                message["role"] = "custom"
    out: list[bytes] = []
    for line, value in lines:
        if type(value) is dict:
            out.append(_jsonl.dumps_js(value).encode("utf-8"))
        else:
            plan.kept_lines += 1
            out.append(bytes(line))
    plan.data = b"\n".join(out) + b"\n" if out else b""
    return plan


def _v1_to_v2(values: list[Any], plan: MigrationPlan) -> None:
    taken: set[str] = set()
    previous: str | None = None
    for value in values:
        if type(value) is not dict:
            continue
        if value.get("type") == "session":
            value["version"] = 2
            continue
        old = value.get("id")
        ident = new_entry_id(taken.__contains__)
        taken.add(ident)
        if isinstance(old, str) and old and old not in plan.id_map:
            plan.id_map[old] = ident
        value["id"] = ident
        value["parentId"] = previous
        previous = ident
        plan.entries += 1
        if value.get("type") != "compaction":
            continue
        index = value.get("firstKeptEntryIndex")
        if isinstance(index, bool) or not isinstance(index, (int, float)):
            continue  # typeof !== "number": left as it is
        target = (
            values[int(index)] if float(index).is_integer() and 0 <= index < len(values) else None
        )
        if type(target) is dict:
            if target.get("type") != "session":
                if "id" in target:
                    value["firstKeptEntryId"] = target["id"]
                else:  # undefined: JSON.stringify leaves the key out
                    value.pop("firstKeptEntryId", None)
        elif target:  # a truthy non-object line: its .id is undefined
            value.pop("firstKeptEntryId", None)
        del value["firstKeptEntryIndex"]


def replace_file(path: str, data: bytes, original: os.stat_result) -> None:
    """Atomically replaces ``path`` (whose state was ``original`` when it was read) by a file
    holding ``data``: temp file in the same directory, fsync, rename, directory fsync.

    Refused with ``ChangedWhileReplacing`` (nothing replaced, temp file removed) when the
    path no longer names the file that was read, or it changed since (size, modification
    time). The window between that check and the rename is closed only by the session write
    lock, which the caller holds.
    """
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    mode = original.st_mode & 0o777
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.migrate-{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, mode)
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - 100 random names taken
        raise FileExistsError(errno.EEXIST, "no free temporary name", directory)
    done = False
    try:
        try:
            with contextlib.suppress(OSError):  # keep the owner when allowed to
                os.fchown(fd, original.st_uid, original.st_gid)
            with contextlib.suppress(OSError):  # the umask may have narrowed the mode
                os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        now = os.stat(path)
        if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (
            original.st_dev,
            original.st_ino,
            original.st_size,
            original.st_mtime_ns,
        ):
            raise ChangedWhileReplacing(path)
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            discard(tmp)
    fsync_dir(directory)


class ChangedWhileReplacing(OSError):
    """The file changed between its read and its replacement; nothing was replaced."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.EAGAIN, "file changed while it was being rewritten", path)
