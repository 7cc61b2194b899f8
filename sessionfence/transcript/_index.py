"""The derived transcript index ``<transcript>.idx`` and the lazy row table behind
``SessionManager`` (docs/transcripts.md, "The index").

The index is a cache, never an authority: everything in it is derived from the
transcript's bytes ``[0, size)`` (``size``: the end of its last complete line when it was
written), and a reader trusts it only after it proved that it still describes that prefix:

- the same file identity (``dev``, ``ino``) and a file at least ``size`` bytes long;
- the hash of the last ``tail_len`` bytes before ``size`` (the fence's tail window), the
  hash of the header line, and the hash of the 1 MiB block holding ``size - 1``;
- when the file did not grow but its times moved (an in-place rewrite by a writer that
  ignores the protocol), every block hash: a whole-content check at memory speed;
- the owned-write journal (``<transcript>.fence``): the position it had when the index was
  written (salt, last record), and every record since announcing bytes at or past
  ``size`` (``journal_vouches``: no journaled writer cut the prefix since);
- every line the open then reads through it (the model context) must parse with the id the
  index gives it.

Any failure, a checksum that does not match (a truncated or edited index), or a format it
does not know, and the index is ignored and rebuilt from a full parse: it costs time, never
correctness. It is written by temp file + ``os.replace``, so a reader sees a whole old one or
a whole new one; any process may write it (two writers race to the same content).

Layout, in the writer's byte order (which the meta names; another one is not read):
``MAGIC``, ``u32`` length of the meta JSON, the meta JSON, its ``xxh3_64`` (8 bytes), then
the sections the meta names (offset, length, ``xxh3_64``) with one row per JSON-object
line: ``offsets`` (``q``), ``lengths`` (``q``), ``kinds`` (type code | parent class << 4),
``ids`` (the id the tree stores the row under, or null) and ``pars`` (a string
``parentId``, or null), both JSON arrays. The meta holds the file proof, the per-block
XXH3-128 hashes of ``[0, size)`` (1 MiB blocks, the last one partial: the content digest's
block hashes), the journal position, and the tree state at ``size``: leaf and side cursor,
labels, session name, parent overrides, malformed and invalid-UTF-8 line counts, the
context settings at the leaf (thinking level and model), and ``hints``: the rows of the
context path (the latest compaction on the leaf's path, its first kept entry, the entries
to the leaf), so an open reads nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, overload

import xxhash

from .._util import pread, read_at, read_exact
from ..errors import TranscriptChangedError
from ..journal._file import JournalInvalid, Position, journal_path_for, read_header, scan
from ..journal._format import CHAIN_AT, RECORD_SIZE, crc_ok

__all__ = [
    "BLOCK",
    "INDEX_MIN_BYTES",
    "MAGIC",
    "Base",
    "BlockHasher",
    "IndexData",
    "LazyEntries",
    "Mismatch",
    "index_path_for",
    "journal_position",
    "journal_vouches",
    "read_index",
    "write_index",
]

Entry = dict[str, Any]

MAGIC: Final = b"SFIDX\x00\x01\n"
#: 2: the meta records the journal position and the context settings (an index of
#: format 1 is not read: the next open rebuilds it).
FORMAT: Final = 2
BLOCK: Final = 1 << 20
#: Transcripts shorter than this get no index file (a full parse is as fast as reading one).
INDEX_MIN_BYTES = 256 << 10
#: A manager rewrites the index when it parsed at least this many bytes past it.
REWRITE_AFTER = 1 << 20
#: At most this many context rows are named in the index (a session without compactions
#: has its whole branch as context: the rest is found through the row table).
MAX_HINTS = 4096
_O_BINARY: int = getattr(os, "O_BINARY", 0)

# Row kinds: a type code in the low 4 bits, the parent class above it.
T_SESSION, T_LEAF, T_OTHER = 0, 1, 2
T_KNOWN_MIN = 3  # codes from here on are the known entry types
KNOWN_CODES: Final = {
    "message": 3,
    "thinking_level_change": 4,
    "model_change": 5,
    "compaction": 6,
    "branch_summary": 7,
    "custom": 8,
    "custom_message": 9,
    "label": 10,
    "session_info": 11,
}
P_NONE, P_STR, P_OTHER = 0, 1, 2  # parentId absent or null / a string / anything else


class Mismatch(TranscriptChangedError):
    """A line read back by offset is not what the parse (or the index) says it is: the
    transcript changed under the manager (or the index lies; an open then rebuilds it)."""


def index_path_for(transcript: str | os.PathLike[str]) -> str:
    """``<transcript>.idx`` beside the transcript's real path (a symlink's target)."""
    text = os.fspath(transcript)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    return os.path.realpath(text) + ".idx"


def row_kind(value: Entry) -> int:
    kind = value.get("type")
    if kind == "session":
        code = T_SESSION
    elif kind == "leaf":
        code = T_LEAF
    else:
        code = KNOWN_CODES.get(kind, T_OTHER) if isinstance(kind, str) else T_OTHER
    parent = value.get("parentId")
    pclass = P_NONE if parent is None else P_STR if isinstance(parent, str) else P_OTHER
    return code | (pclass << 4)


def _h64(data: bytes | memoryview) -> int:
    return int(xxhash.xxh3_64_intdigest(data))


class BlockHasher:
    """XXH3-128 of every ``BLOCK`` bytes fed, in order; ``hashes()`` adds the partial last
    block. ``full``: the hashes of the whole blocks that precede the bytes fed. The whole
    blocks' hashes are the content digest's (``BlockDigest``: same blocks, same hash,
    same canonical bytes), which ``BlockDigest.from_blocks`` rebuilds from them."""

    def __init__(self, full: Sequence[bytes] = ()) -> None:
        self.full: list[bytes] = list(full)
        self._state = xxhash.xxh3_128()
        self._fill = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view.nbytes:
            part = view[: BLOCK - self._fill]
            self._state.update(part)
            self._fill += part.nbytes
            view = view[part.nbytes :]
            if self._fill == BLOCK:
                self.full.append(self._state.digest())
                self._state.reset()
                self._fill = 0

    def hashes(self) -> list[bytes]:
        return self.full + ([self._state.digest()] if self._fill else [])


class Base:
    """The rows of the transcript's prefix ``[0, size)`` that a parse or an index gave: one
    per JSON-object line (offset, length, kind, id as stored in the tree, raw string
    ``parentId``). Loaded from the index file only when something needs more than the
    context (``load``), built in place by a parse. Entries are read back by offset."""

    def __init__(self, path: str, dev: int, ino: int) -> None:
        self.path = path
        self.dev = dev
        self.ino = ino
        self.size = 0
        self.count = 0
        self.header_row = -1
        self.offsets = array("q")
        self.lengths = array("q")
        self.kinds = bytearray()
        self.ids: list[str | None] = []
        self.pars: list[str | None] = []
        self.loaded = True
        self._loader: Callable[[Base], None] | None = None
        self._ids_map: dict[str, int] | None = {}
        self.hints: dict[str, tuple[int, int, int]] = {}  # id -> (row, offset, length)
        self.hint_rows: dict[int, tuple[str, int, int]] = {}  # row -> (id, offset, length)
        self.cache: dict[int, Entry] = {}
        self._fd: int | None = None  # kept open by ``keep_open`` for a run of reads
        # every stored id, from the index's ids section alone (``maybe_has_id``)
        self._id_set_loader: Callable[[], set[str] | None] | None = None
        self._id_set: set[str] | None = None

    # -- building ---------------------------------------------------------------------

    def add(self, offset: int, length: int, value: Entry, stored: str | None) -> int:
        row = self.count
        self.offsets.append(offset)
        self.lengths.append(length)
        self.kinds.append(row_kind(value))
        self.ids.append(stored)
        parent = value.get("parentId")
        self.pars.append(parent if isinstance(parent, str) else None)
        self.count = row + 1
        return row

    def put_row(self, ident: str, row: int) -> None:
        assert self._ids_map is not None
        self._ids_map[ident] = row

    # -- lazy loading -----------------------------------------------------------------

    def load(self) -> None:
        if not self.loaded:
            assert self._loader is not None
            self._loader(self)
            self.loaded = True

    def ids_map(self) -> dict[str, int]:
        if self._ids_map is None:
            self.load()
            found: dict[str, int] = {}
            for row, ident in enumerate(self.ids):
                if ident is not None:
                    found[ident] = row
            self._ids_map = found
        return self._ids_map

    def row_of(self, ident: str) -> int | None:
        if self._ids_map is None:
            hint = self.hints.get(ident)
            if hint is not None:
                return hint[0]
        return self.ids_map().get(ident)

    def has_id(self, ident: str) -> bool:
        return self.row_of(ident) is not None

    def maybe_has_id(self, ident: str) -> bool:
        """``has_id``, answered from the index's ids alone when the row table is not loaded
        (what a new random id needs: the ids, not the offsets, parents and the row map)."""
        if self._ids_map is None and self._id_set_loader is not None:
            if self._id_set is None:
                self._id_set = self._id_set_loader()
                if self._id_set is None:
                    self._id_set_loader = None  # damaged: the row table answers
            if self._id_set is not None:
                return ident in self._id_set
        return self.has_id(ident)

    def span(self, row: int) -> tuple[int, int]:
        if not self.loaded:
            hint = self.hint_rows.get(row)
            if hint is not None:
                return hint[1], hint[2]
            self.load()
        return self.offsets[row], self.lengths[row]

    def expected_id(self, row: int) -> str | None:
        if not self.loaded:
            hint = self.hint_rows.get(row)
            if hint is not None:
                return hint[0]
            self.load()
        return self.ids[row]

    # -- reading entries back ---------------------------------------------------------

    @contextlib.contextmanager
    def keep_open(self) -> Iterator[None]:
        """Reads inside the block share one descriptor (a walk reads many lines)."""
        if self._fd is not None:
            yield
            return
        self._fd = self._open()
        try:
            yield
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _open(self) -> int:
        fd = os.open(self.path, os.O_RDONLY | _O_BINARY)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (self.dev, self.ino) or st.st_size < self.size:
            os.close(fd)
            raise Mismatch(f"the transcript was replaced or cut since it was parsed: {self.path}")
        return fd

    def _decode(self, row: int, data: bytes | memoryview) -> Entry:
        from .._jsonl import loads_line

        try:
            value, _ = loads_line(data)
        except (ValueError, RecursionError):
            value = None
        if type(value) is not dict:
            raise Mismatch(f"row {row} of {self.path} is no longer a JSON object")
        ident = value.get("id")
        expected = self.expected_id(row)
        if expected is not None and ident != expected:
            raise Mismatch(f"row {row} of {self.path} changed its id ({expected!r} -> {ident!r})")
        return value

    def entry(self, row: int, *, keep: bool = True) -> Entry:
        found = self.cache.get(row)
        if found is not None:
            return found
        offset, length = self.span(row)
        if self._fd is not None:
            data = read_exact(self._fd, length, offset)
        else:
            fd = self._open()
            try:
                data = read_exact(fd, length, offset)
            finally:
                os.close(fd)
        value = self._decode(row, data)
        if keep:
            self.cache[row] = value
        return value

    def entry_for_id(self, ident: str) -> Entry | None:
        row = self.row_of(ident)
        return None if row is None else self.entry(row)

    def iter_rows(self, rows: Sequence[int]) -> Iterator[Entry]:
        """The entries of ``rows`` (ascending), read in large sequential chunks; cached ones
        as cached, the others parsed and not kept."""
        self.load()
        if not rows:
            return
        fd = self._open()
        try:
            i = 0
            while i < len(rows):
                row = rows[i]
                if row in self.cache:
                    yield self.cache[row]
                    i += 1
                    continue
                start = self.offsets[row]
                j = i
                end = start
                while j < len(rows) and rows[j] not in self.cache:
                    r = rows[j]
                    stop = self.offsets[r] + self.lengths[r]
                    if j > i and stop - start > (8 << 20):
                        break
                    end = stop
                    j += 1
                data = memoryview(read_exact(fd, end - start, start))
                for r in rows[i:j]:
                    at = self.offsets[r] - start
                    yield self._decode(r, data[at : at + self.lengths[r]])
                i = j
        finally:
            os.close(fd)


class LazyEntries(Sequence[Entry]):
    """``SessionManager.entries``: every entry in file order, read from the transcript by
    offset when it is asked for (the ones the model already holds are those objects).
    A snapshot: later appends are not in it. Compares equal to a list of the same dicts."""

    def __init__(self, base: Base | None, extra: list[Entry]) -> None:
        self._base = base
        self._skip = -1 if base is None else base.header_row
        self._nbase = 0 if base is None else base.count - (1 if self._skip >= 0 else 0)
        self._extra = list(extra)

    def _row(self, index: int) -> int:
        return index + 1 if 0 <= self._skip <= index else index

    def __len__(self) -> int:
        return self._nbase + len(self._extra)

    @overload
    def __getitem__(self, index: int) -> Entry: ...
    @overload
    def __getitem__(self, index: slice) -> list[Entry]: ...
    def __getitem__(self, index: int | slice) -> Entry | list[Entry]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("entry index out of range")
        if index < self._nbase:
            assert self._base is not None
            return self._base.entry(self._row(index), keep=False)
        return self._extra[index - self._nbase]

    def __iter__(self) -> Iterator[Entry]:
        if self._base is not None and self._nbase:
            yield from self._base.iter_rows([self._row(i) for i in range(self._nbase)])
        yield from self._extra

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, LazyEntries)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<entries: {len(self)} (read by offset)>"


# ------------------------------------------------------------------------------------------
# The file.
# ------------------------------------------------------------------------------------------


class IndexData:
    """A read index whose meta passed its checksum (not yet checked against the file)."""

    def __init__(self, meta: dict[str, Any], raw_path: str, sections_at: int) -> None:
        self.meta = meta
        self.raw_path = raw_path
        self.sections_at = sections_at
        # set by ``validate``: the bytes of the partial last block, [size // BLOCK * BLOCK,
        # size), read and proven against its hash (what a digest needs besides the
        # whole blocks' hashes)
        self.partial: bytes | None = None

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    def blocks(self) -> list[bytes]:
        """The XXH3-128 of every block of ``[0, size)``, the partial last one included:
        the whole blocks' hashes are those of the content digest (``BlockDigest.BLOCK``
        is ``BLOCK``), so ``BlockDigest.from_blocks(blocks[:size // BLOCK], partial)``
        is the digest of the prefix without reading it."""
        return [bytes.fromhex(h) for h in self.meta["blocks"]]

    def make_base(self, path: str) -> Base:
        meta = self.meta
        base = Base(path, int(meta["dev"]), int(meta["ino"]))
        base.size = self.size
        base.count = int(meta["rows"])
        base.header_row = int(meta["header_row"])
        base.loaded = False
        base._ids_map = None
        base.hints = {k: (int(v[0]), int(v[1]), int(v[2])) for k, v in meta["hints"].items()}
        base.hint_rows = {v[0]: (k, v[1], v[2]) for k, v in base.hints.items()}
        base._loader = self._load_sections
        base._id_set_loader = self._load_id_set
        return base

    def _load_id_set(self) -> set[str] | None:
        try:
            ids = _unpack_strs(self.read_section("ids"), int(self.meta["rows"]))
        except (Mismatch, ValueError):
            return None
        found = set(ids)
        found.discard(None)
        return found  # type: ignore[return-value]

    def _load_sections(self, base: Base) -> None:
        """The row table from the index file; when it is gone or damaged (or another
        process replaced it meanwhile), from the transcript itself: a scan of the prefix
        the index described (which the open proved unchanged)."""
        try:
            self._read_sections(base)
        except (Mismatch, OSError, KeyError, TypeError, ValueError):
            rebuild_rows(base)

    def read_section(self, name: str) -> bytes:
        """One section, checked (``Mismatch`` when it is missing or damaged)."""
        try:
            at, length, digest = self.meta["sections"][name]
            fd = os.open(self.raw_path, os.O_RDONLY | _O_BINARY)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise Mismatch(f"index section {name} unreadable: {exc}") from None
        try:
            data = read_exact(fd, int(length), self.sections_at + int(at))
        except OSError as exc:
            raise Mismatch(f"index unreadable: {exc}") from None
        finally:
            os.close(fd)
        if _h64(data) != int(digest):
            raise Mismatch(f"index section {name} is damaged")
        return data

    def _read_sections(self, base: Base) -> None:
        sections = self.meta["sections"]
        try:
            fd = os.open(self.raw_path, os.O_RDONLY | _O_BINARY)
        except OSError as exc:
            raise Mismatch(f"index vanished: {exc}") from None
        try:
            got: dict[str, bytes] = {}
            for name, (at, length, digest) in sections.items():
                data = read_exact(fd, int(length), self.sections_at + int(at))
                if _h64(data) != int(digest):
                    raise Mismatch(f"index section {name} is damaged")
                got[name] = data
        except OSError as exc:
            raise Mismatch(f"index unreadable: {exc}") from None
        finally:
            os.close(fd)
        n = base.count
        offsets = array("q")
        offsets.frombytes(got["offsets"])
        lengths = array("q")
        lengths.frombytes(got["lengths"])
        kinds = bytearray(got["kinds"])
        if len(offsets) != n or len(lengths) != n or len(kinds) != n:
            raise Mismatch("index sections disagree on the row count")
        base.offsets, base.lengths, base.kinds = offsets, lengths, kinds
        base.ids = _unpack_strs(got["ids"], n)
        base.pars = _unpack_strs(got["pars"], n)


def rebuild_rows(base: Base) -> None:
    """Fills ``base``'s row table by parsing its transcript again (the rows of
    ``[0, base.size)`` a cold parse records: the same offsets, kinds and stored ids)."""
    from . import _io

    fresh = Base(base.path, base.dev, base.ino)
    header = [-1]
    limit = base.size

    def take(value: Entry, offset: int, length: int) -> None:
        if offset + length >= limit:
            return  # past the prefix the table describes
        kind = value.get("type")
        ident = value.get("id")
        valid = isinstance(ident, str) and bool(ident)
        row = fresh.add(offset, length, value, ident if valid and kind != "session" else None)
        if kind == "session" and header[0] < 0:
            header[0] = row

    fd = base._open()
    try:
        _io.parse_fd(fd, _io.RowSink(0, take, skeleton=True))
    finally:
        os.close(fd)
    if fresh.count != base.count or header[0] != base.header_row:
        raise Mismatch(f"the transcript's prefix no longer has the rows parsed: {base.path}")
    base.offsets, base.lengths, base.kinds = fresh.offsets, fresh.lengths, fresh.kinds
    base.ids, base.pars = fresh.ids, fresh.pars


def _pack_strs(values: Sequence[str | None]) -> bytes:
    # JSON (C speed both ways); ensure_ascii keeps lone surrogates as escapes
    return json.dumps(values, separators=(",", ":")).encode("ascii")


def _strs_decoder() -> Callable[[bytes], list[str | None]] | None:
    """msgspec's typed decoder of a string table (checks every element in C), when msgspec
    is installed (the ``fast`` extra)."""
    global _STRS
    if _STRS is None:
        try:
            import msgspec
        except ImportError:
            _STRS = False
        else:
            _STRS = msgspec.json.Decoder(list[str | None]).decode
    return None if isinstance(_STRS, bool) else _STRS


_STRS: Callable[[bytes], list[str | None]] | bool | None = None


def _unpack_strs(raw: bytes, n: int) -> list[str | None]:
    decode = _strs_decoder()
    values: Any = None
    if decode is not None:
        try:
            values = decode(raw)
        except ValueError:  # msgspec refuses lone surrogates json accepts: json decides
            values = None
    if values is None:
        values = json.loads(raw)
        if type(values) is not list or not all(v is None or type(v) is str for v in values):
            raise Mismatch("index string table holds something else than ids")
    if len(values) != n:
        raise Mismatch("index string table has the wrong row count")
    return values  # type: ignore[no-any-return]


def read_index(path: str) -> IndexData | None:
    """The index of ``path`` if there is one whose own checksums hold (else ``None``)."""
    raw_path = index_path_for(path)
    try:
        fd = os.open(raw_path, os.O_RDONLY | _O_BINARY)
    except OSError:
        return None
    try:
        head = pread(fd, len(MAGIC) + 4, 0)
        if len(head) != len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            return None
        (meta_len,) = struct.unpack("<I", head[len(MAGIC) :])
        body = pread(fd, meta_len + 8, len(MAGIC) + 4)
        if len(body) != meta_len + 8:
            return None
        meta_raw, check = body[:meta_len], body[meta_len:]
        if struct.unpack("<Q", check)[0] != _h64(meta_raw):
            return None
        meta = json.loads(meta_raw)
        if (
            type(meta) is not dict
            or meta.get("format") != FORMAT
            or meta.get("block") != BLOCK
            or meta.get("order") != sys.byteorder
        ):
            return None
        return IndexData(meta, raw_path, len(MAGIC) + 4 + meta_len + 8)
    except (OSError, ValueError, struct.error):
        return None
    finally:
        os.close(fd)


def validate(index: IndexData, fd: int, st: os.stat_result) -> bool:
    """Whether ``index`` still describes the prefix ``[0, size)`` of the file open as
    ``fd`` (see the module docstring). Reads the tail window, the header line and one
    block; every block when the file kept its size but its times moved."""
    meta = index.meta
    try:
        size = int(meta["size"])
        if (st.st_dev, st.st_ino) != (int(meta["dev"]), int(meta["ino"])) or st.st_size < size:
            return False
        tail_len = int(meta["tail_len"])
        if tail_len > size or _h64(read_exact(fd, tail_len, size - tail_len)) != int(
            meta["tail_hash"]
        ):
            return False
        hoff, hlen = int(meta["header_off"]), int(meta["header_len"])
        if hoff + hlen > size or _h64(read_exact(fd, hlen, hoff)) != int(meta["header_hash"]):
            return False
        blocks = meta["blocks"]
        if len(blocks) != (size + BLOCK - 1) // BLOCK:
            return False
        unchanged = st.st_size == size and (st.st_mtime_ns, st.st_ctime_ns) == (
            meta.get("mtime_ns"),
            meta.get("ctime_ns"),
        )
        if st.st_size == size and not unchanged:
            check = range(len(blocks))  # same size, other times: prove every byte
        else:
            check = range(len(blocks) - 1, len(blocks))
        data = b""
        for k in check:
            start = k * BLOCK
            data = read_exact(fd, min(BLOCK, size - start), start)
            if xxhash.xxh3_128_digest(data).hex() != blocks[k]:
                return False
        index.partial = data if size % BLOCK else b""
        return True
    except (OSError, KeyError, TypeError, ValueError):
        return False


def journal_position(path: str) -> dict[str, Any] | None:
    """Where the owned-write journal of ``path`` (``<path>.fence``, docs/journal.md) stands
    now: its salt and the sequence number and chain value of its last record, as the
    index records them; ``None`` when there is no journal. ``Mismatch`` when it cannot be
    read (torn, not a journal): then no index is written (nothing it says could be
    checked later). Costs the header and one record, whatever the journal holds."""
    jpath = journal_path_for(path)
    try:
        fd = os.open(jpath, os.O_RDONLY | _O_BINARY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Mismatch(f"journal unreadable: {exc}") from None
    try:
        size = os.fstat(fd).st_size
        header, _slots = read_header(fd, jpath)
        body = size - header.data_start
        if body < 0 or body % RECORD_SIZE:
            raise Mismatch(f"journal is torn ({size} bytes): {jpath}")
        last = header.base_seq + body // RECORD_SIZE - 1
        chain = header.base_chain
        if last >= header.base_seq:
            raw = read_at(fd, RECORD_SIZE, header.record_at(last))
            if not crc_ok(raw):
                raise Mismatch(f"journal record {last} is torn or edited: {jpath}")
            chain = raw[CHAIN_AT : CHAIN_AT + 16]
    except JournalInvalid as exc:
        raise Mismatch(str(exc)) from None
    except OSError as exc:
        raise Mismatch(f"journal unreadable: {exc}") from None
    finally:
        os.close(fd)
    return {"salt": header.salt.hex(), "seq": last, "chain": chain.hex()}


def journal_vouches(path: str, index: IndexData) -> bool:
    """The journal proof of a warm open: no journaled writer rewrote the prefix ``[0,
    size)`` the index describes since it was written. The index recorded where the journal
    stood (``journal_position``); the journal must be that journal (same salt), still hold
    that record (same chain) and every record after it (writers' claims, appends, voids)
    must announce bytes at or past ``size``: a record below it means the transcript was
    cut below the indexed size, and maybe rewritten, by a journaled writer. No journal then
    and none now is fine; a journal created since must be whole (never compacted), start at
    or past ``size`` and obey the same rule. Anything else, a journal that cannot be read,
    one replaced by another, deleted, or compacted past the recorded record, and the index
    is not trusted (it is rebuilt: time, never correctness). Costs the journal's header and
    the records written since the index, nothing when there is no journal."""
    try:
        size = int(index.meta["size"])
        recorded = index.meta["journal"]
        jpath = journal_path_for(path)
        if recorded is None:
            found = scan(jpath, None)
            if found is None:
                return True  # none then, none now
            header = found.header
            if header is None or header.base_seq != 1 or header.base_offset < size:
                return False
        else:
            since = Position(
                bytes.fromhex(recorded["salt"]),
                int(recorded["seq"]),
                bytes.fromhex(recorded["chain"]),
                None,
                0,
            )
            found = scan(jpath, since)
            if found is None or found.compacted_past:
                return False  # deleted, or the records since were compacted away
        return all(record.start >= size for record in found.records)
    except (JournalInvalid, OSError, KeyError, TypeError, ValueError):
        return False


def write_index(
    path: str,
    base: Base,
    extra_rows: Sequence[tuple[int, int, Entry, str | None]],
    size: int,
    blocks: list[bytes],
    state: dict[str, Any],
    hints: dict[str, tuple[int, int, int]],
    tail: bytes | None = None,
) -> str | None:
    """Writes the index of ``path``'s prefix ``[0, size)``: ``base`` rows then
    ``extra_rows`` (offset, length, value, stored id), the block hashes and the tree state.
    Returns the index path, or ``None`` when the transcript no longer matches (it was
    replaced, or the 4 KiB before ``size`` are no longer ``tail``, the bytes the caller
    parsed there) or the write failed (an index is only a cache: nothing is raised).

    The journal's position is taken first (``journal_position``), before the transcript
    is read for the proof: a journaled writer that cuts the prefix after that leaves a
    record past the position that says so."""
    try:
        journal = journal_position(path)
    except Mismatch:
        return None
    base.load()
    offsets = array("q", base.offsets)
    lengths = array("q", base.lengths)
    kinds = bytearray(base.kinds)
    ids = list(base.ids)
    pars = list(base.pars)
    for offset, length, value, stored in extra_rows:
        offsets.append(offset)
        lengths.append(length)
        kinds.append(row_kind(value))
        ids.append(stored)
        parent = value.get("parentId")
        pars.append(parent if isinstance(parent, str) else None)
    target = index_path_for(path)
    try:
        fd = os.open(path, os.O_RDONLY | _O_BINARY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (base.dev, base.ino) or st.st_size < size:
            return None
        tail_len = min(size, 4096)
        tail_bytes = read_exact(fd, tail_len, size - tail_len)
        if tail is not None and tail[-tail_len:] != tail_bytes:
            return None  # not the bytes parsed: the rows would describe another file
        tail_hash = _h64(tail_bytes)
        hrow = base.header_row
        hoff, hlen = int(offsets[hrow]), int(lengths[hrow])
        header_hash = _h64(read_exact(fd, hlen, hoff))
        st2 = os.fstat(fd)
        stable = st2.st_size == size and (st.st_mtime_ns, st.st_size) == (
            st2.st_mtime_ns,
            st2.st_size,
        )
    except OSError:
        return None
    finally:
        os.close(fd)
    sections_raw = {
        "offsets": offsets.tobytes(),
        "lengths": lengths.tobytes(),
        "kinds": bytes(kinds),
        "ids": _pack_strs(ids),
        "pars": _pack_strs(pars),
    }
    sections: dict[str, list[int]] = {}
    at = 0
    for name, data in sections_raw.items():
        sections[name] = [at, len(data), _h64(data)]
        at += len(data)
    meta = {
        "format": FORMAT,
        "block": BLOCK,
        "order": sys.byteorder,
        "size": size,
        "dev": base.dev,
        "ino": base.ino,
        "mtime_ns": st2.st_mtime_ns if stable else None,
        "ctime_ns": st2.st_ctime_ns if stable else None,
        "tail_len": tail_len,
        "tail_hash": tail_hash,
        "header_row": hrow,
        "header_off": hoff,
        "header_len": hlen,
        "header_hash": header_hash,
        "rows": len(offsets),
        "blocks": [b.hex() for b in blocks],
        "sections": sections,
        "state": state,
        "hints": {k: list(v) for k, v in hints.items()},
        "journal": journal,
    }
    meta_raw = json.dumps(meta, separators=(",", ":")).encode("utf-8", "surrogatepass")
    parts = [MAGIC, struct.pack("<I", len(meta_raw)), meta_raw, struct.pack("<Q", _h64(meta_raw))]
    parts.extend(sections_raw.values())
    tmp = f"{target}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, st.st_mode & 0o666)
        try:
            for part in parts:
                view = memoryview(part)
                while view.nbytes:
                    n = os.write(out, view)
                    view = view[n:]
        finally:
            os.close(out)
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return None
    return target


def rehash_blocks(path: str, full: list[bytes], old_size: int, size: int) -> list[bytes] | None:
    """The block hashes of ``[0, size)`` from those of ``[0, old_size)`` (``full``: its
    complete blocks): only the last partial block and the new bytes are read."""
    start = (old_size // BLOCK) * BLOCK
    hasher = BlockHasher(full[: old_size // BLOCK])
    try:
        fd = os.open(path, os.O_RDONLY | _O_BINARY)
    except OSError:
        return None
    try:
        at = start
        while at < size:
            data = pread(fd, min(8 << 20, size - at), at)
            if not data:
                return None
            hasher.update(data)
            at += len(data)
    except OSError:
        return None
    finally:
        os.close(fd)
    return hasher.hashes()
