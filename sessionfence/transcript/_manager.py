"""The JSONL transcript model: ``SessionManager``, the compaction guard and the
foreign-entry merge (docs/design.md, "The transcript model").

A transcript is a header line (``{"type":"session",...}``) and then one compact JSON object
per line, every line ending in ``\\n``. Entries form a tree through ``parentId``; the
*visible leaf* (``leaf_id``) is where the next own append hangs, and a *side cursor* is where
entries merged from other writers hang, so that they never enter the active branch
(docs/design.md, "Merge").

Notes for the fence controller (everything is O(appended bytes) after ``open``):

- ``manager.parsed_fingerprint`` is the fingerprint (with ``window``) of exactly the bytes
  ``open`` parsed, and ``manager.parsed_digest`` their ``RollingDigest`` (a frozen copy:
  cache or share it as is, ``copy()`` before rolling). The fence keeps its own digest (a
  block-structured ``BlockDigest``): ``manager.fence_digest()`` builds it from the block
  hashes the parse or the index holds, and seeds a fence snapshot
  (``seed_content_digest``) with no second read of the file.
- ``manager.digest`` is the manager's live ``RollingDigest`` of the file's bytes
  ``[0, manager.digest_size)``: right after ``open`` it equals ``parsed_digest`` and
  ``digest_size == parsed_fingerprint.size``. Take ``digest.copy()`` to keep your own.
- Own appends roll the digest forward when the manager can prove where its line landed
  (the file had exactly ``digest_size`` bytes before the write and ``digest_size + len``
  after). Otherwise the digest is left *behind*: still right for ``[0, digest_size)``,
  and ``digest_size`` is smaller than the file. ``sync_digest()`` catches up by reading only
  the missing bytes.
- Bytes that other writers appended (the ones a merge is about) are not read by the
  manager. Tell it with ``note_external_bytes(change.appended, offset=change.before.size)``
  (or pass ``appended=change.appended`` to ``merge_foreign_entries``) *before* any further
  append, so the digest stays exact without a read.
- ``merge_foreign_entries(entries, persist_leaf=True)`` is the merge callback; it returns
  ``None`` or a ``MergeResult`` whose ``session_file_snapshot`` is the fingerprint right
  after its own write. ``reload()`` re-parses in place (the reload callback).
- The manager is not thread-safe; use it from one thread (or under your own lock).

How the file is read, and where the two reference readers differ (the full account, with
the reasons, is in ``docs/transcripts.md``). The references are pi-mono's ``SessionManager``
(``packages/coding-agent/src/core/session-manager.ts``) and openclaw's current reader
(``SessionManagerCore.buildIndex`` in ``src/agents/sessions/session-manager-core.ts``, with
``partitionSessionFileEntries`` in ``src/config/sessions/session-entry-codec.ts`` and
``scanSessionTranscriptTree`` in ``src/config/sessions/transcript-tree.ts``):

- *Is it a session?* The first line that parses as JSON must be a session header (both
  references: pi-mono ``loadEntriesFromFile``, openclaw ``hasReadableSessionHeader``);
  otherwise ``not_a_session`` says what the file looks like and appends raise
  ``NotASessionError`` (the references would replace or rewrite the file). A header
  without an ``id`` (a bare ``{"type":"session"}``) is accepted (docs/design.md,
  "Format").
- *Last line.* A last line without its newline that parses as a JSON object is a complete
  entry (both references parse it); only one that does not parse is a torn tail. The next
  append writes the separating ``\n`` in the same ``os.write`` as its record (openclaw
  ``appendJsonlEntrySync(..., {prefixNewline})``).
- *Tree rules* (openclaw's, where pi-mono differs; openclaw's are the ones its current
  writers rely on): an entry of a known type without a ``parentId`` key takes the visible
  leaf as its parent (openclaw ``buildIndex``: ``logicalParentsById``; pi-mono makes it a
  root); an entry of a type not in ``KNOWN_ENTRY_TYPES`` does not move the visible leaf and
  is not part of ``branch()`` (openclaw keeps it as an opaque entry; pi-mono moves the leaf
  to it); ``appendMode: "side"`` entries and ``leaf`` controls move the side cursor and the
  visible leaf as openclaw's do (pi-mono has neither).
- *Pre-tree (v1) sessions* (header without ``version``, entries without ``id``): read as the
  linear chain they are, the way both references present them after their migration
  (pi-mono ``migrateV1ToV2``); each entry gets an in-memory id ``v1:<n>`` (its own ``id``
  when it has one), ``n`` being its position among the file's JSON objects, header = 0,
  which is what a v1 compaction's ``firstKeptEntryIndex`` counts. Appending is refused
  with ``TranscriptNeedsMigrationError`` until ``migrate_transcript`` has rewritten the
  file the way the references would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from .. import _backend, _jsonl
from .._callbacks import MergeResult, PublishedEntry
from .._ownership import LIVE_MANAGERS, OWN_WRITES
from .._types import DEFAULT_WINDOW, MISSING, Fingerprint, PathArg
from .._util import session_key
from ..errors import (
    NotASessionError,
    TornTranscriptError,
    TranscriptChangedError,
    TranscriptNeedsMigrationError,
    UnstableFileError,
)
from ..journal._writer import SessionWriter, journaled
from . import _index, _io
from ._guard import guard_session_manager, is_expected_compaction_append

if TYPE_CHECKING:
    from ..store._base import SessionStore

__all__ = [
    "CURRENT_VERSION",
    "KNOWN_ENTRY_TYPES",
    "ContextModel",
    "ContextSettings",
    "MigrationResult",
    "SessionManager",
    "TranscriptChangedError",
    "guard_session_manager",
    "is_expected_compaction_append",
    "migrate_transcript",
]

Entry = dict[str, Any]

OPEN_ATTEMPTS: Final = 5

#: The session format version this package writes (pi-mono and openclaw
#: ``CURRENT_SESSION_VERSION``).
CURRENT_VERSION: Final = _io.CURRENT_VERSION

#: Entry types that move the visible leaf. These are the types both references define:
#: pi-mono's ``SessionEntry`` union, and openclaw's ``isCanonicalSessionEntryType``
#: (``src/config/sessions/transcript-tree.ts``) in its versions without ``reset`` (the
#: openclaw reader issue 11 was measured against left ``reset`` rows off the leaf). Newer
#: openclaw versions list ``reset`` too, together with rules that re-parent entries across
#: a reset, which this package does not implement; a ``reset`` row is therefore read as an
#: entry of an unknown type (kept, never moving the leaf).
KNOWN_ENTRY_TYPES: Final = frozenset(
    {
        "message",
        "thinking_level_change",
        "model_change",
        "compaction",
        "branch_summary",
        "custom",
        "custom_message",
        "label",
        "session_info",
    }
)

_NO_PARENT: Final = object()  # no in-memory parent override for an entry
_PENDING: Final = object()  # a digest computed from the file when first asked for
# Known types whose line only moves the leaf (no label, name or leaf-control rules), with
# their row kind when the parentId is a string (the fast path of the row parse).
_PLAIN_CODES: Final = {
    kind: code | (_index.P_STR << 4)
    for kind, code in _index.KNOWN_CODES.items()
    if kind not in ("label", "session_info")
}


@dataclass(frozen=True, slots=True)
class ContextModel:
    """The model a session's context was last set to (pi-mono ``buildSessionContext``'s
    ``model``: ``{provider, modelId}``): from a ``model_change`` entry (its ``provider``
    and ``modelId``) or an assistant ``message`` (its message's ``provider`` and
    ``model``). A field that is missing or not a string is ``None``."""

    provider: str | None
    model_id: str | None


@dataclass(frozen=True, slots=True)
class ContextSettings:
    """The thinking level and model of the context at a leaf, derived as pi-mono's
    ``buildSessionContext`` derives them (``SessionManager.context_settings``).

    ``thinking_level``: the ``thinkingLevel`` of the last ``thinking_level_change`` on
    the root-to-leaf path, ``"off"`` when there is none (``None`` when that entry's field
    is missing or not a string). ``model``: the last ``model_change`` or assistant message
    on the path (``ContextModel``), ``None`` when there is none."""

    thinking_level: str | None = "off"
    model: ContextModel | None = None


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _assistant_model(entry: Entry) -> ContextModel | None:
    """The model an assistant message names (pi-mono: ``entry.message.role ===
    "assistant"``); ``None`` for any other message. A ``message`` that is not an object
    names none (pi-mono would stop with a TypeError on a null one)."""
    message = entry.get("message")
    if type(message) is not dict or message.get("role") != "assistant":
        return None
    return ContextModel(_text_or_none(message.get("provider")), _text_or_none(message.get("model")))


def _settings_to_json(settings: ContextSettings) -> dict[str, Any]:
    model = settings.model
    return {
        "thinking": settings.thinking_level,
        "model": None if model is None else [model.provider, model.model_id],
    }


def _settings_from_json(raw: Any) -> ContextSettings:
    thinking = raw["thinking"]
    model = raw["model"]
    if thinking is not None and not isinstance(thinking, str):
        raise ValueError("thinking level")
    if model is None:
        return ContextSettings(thinking, None)
    provider, model_id = model
    if not all(v is None or isinstance(v, str) for v in (provider, model_id)):
        raise ValueError("model")
    return ContextSettings(thinking, ContextModel(provider, model_id))


_UNRESOLVED: Final = object()  # a setting the backward walk has not met yet
_SETTING_CODES: Final = frozenset(
    {_index.T_LEAF, _index.KNOWN_CODES["thinking_level_change"], _index.KNOWN_CODES["model_change"]}
)
_MESSAGE_CODE: Final = _index.KNOWN_CODES["message"]
_THINK_ROW: Final = _index.KNOWN_CODES["thinking_level_change"] | (_index.P_STR << 4)


class _IdMap:
    """The manager's id -> entry map: entries it holds (``live``: parsed after the row table,
    appended, merged) over the row table of the parsed prefix (``base``), whose entries are
    read back by offset when asked for."""

    __slots__ = ("base", "live")

    def __init__(self, base: _index.Base | None = None) -> None:
        self.base = base
        self.live: dict[str, Entry] = {}

    def get(self, ident: str, default: Entry | None = None) -> Entry | None:
        found = self.live.get(ident)
        if found is None and self.base is not None:
            found = self.base.entry_for_id(ident)
        return default if found is None else found

    def __contains__(self, ident: object) -> bool:
        """Exact membership, answered from the index's ids section when the row table is not
        loaded (``Base.maybe_has_id``): a merge, a label or a leaf control checking its
        references loads no row table."""
        if not isinstance(ident, str):
            return False
        return ident in self.live or (self.base is not None and self.base.maybe_has_id(ident))

    def __setitem__(self, ident: str, entry: Entry) -> None:
        self.live[ident] = entry

    def maybe_contains(self, ident: str) -> bool:
        """``in``, for picking a new random id: answered from the index's ids alone,
        without loading the row table."""
        return ident in self.live or (self.base is not None and self.base.maybe_has_id(ident))

    def items(self) -> Iterator[tuple[str, Entry]]:
        """In the order the ids first appeared, each with its last entry (as a dict)."""
        if self.base is None:
            yield from list(self.live.items())
            return
        self.base.load()
        order: dict[str, None] = dict.fromkeys(i for i in self.base.ids if i is not None)
        for ident in self.live:
            order.setdefault(ident, None)
        for ident in order:
            entry = self.get(ident)
            if entry is not None:
                yield ident, entry


class _Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


# The side cursor when no side branch is open: side entries would hang off the leaf.
_UNSET: Final = _Unset()
Cursor = str | None | _Unset


def _nonempty(value: object) -> bool:
    return isinstance(value, str) and bool(value)


class SessionManager:
    """One transcript file, parsed once, then appended to line by line.

    Use ``SessionManager.open(path)``. Parsing (``open``):

    - a missing file starts empty and is created by the first append, which writes the
      header line and the entry in one ``os.write``; an existing empty file is treated the
      same way;
    - the header is the first object with ``type == "session"`` (a bare
      ``{"type":"session"}`` is fine); it is not part of ``entries``;
    - blank lines are skipped; lines that are not JSON, or are JSON but not an object, are
      skipped and counted in ``malformed_lines``;
    - invalid UTF-8 is decoded with U+FFFD replacement, as Node reads the file; such lines
      still count as entries when they parse, and are counted in ``invalid_utf8_lines``;
    - a last line without its newline is an entry like any other when it parses as a JSON
      object (the next append starts with the missing ``\n``); otherwise it is a torn tail:
      ``torn_tail`` gives ``(offset, length)``, it is never parsed into the tree (it was not
      committed), appends raise ``TornTranscriptError``, and ``repair_torn_tail()`` moves
      it aside;
    - a file whose first JSON line is not a session header is not a session:
      ``not_a_session`` describes it, and appends raise ``NotASessionError``;
    - a pre-tree (v1) session reads as a linear chain; appends raise
      ``TranscriptNeedsMigrationError`` until ``migrate_transcript`` rewrote it.

    The tree rules (which entries move the leaf, parents of entries without ``parentId``)
    are in the module docstring.

    The model context at the visible leaf, as pi-mono's ``buildSessionContext`` builds
    it: ``context_entries()`` (the latest compaction on the leaf's path, then the entries
    it keeps and those after it) and ``context_settings()`` (the thinking level and the
    model the path last set: a ``ContextSettings``). After an open through the index both
    cost the model context, not the history (docs/transcripts.md, "Large transcripts").

    Entries are the parsed dicts; treat them as read-only. Appended entries keep the objects
    passed in (``message``, ``data``, ``details``): do not mutate them afterwards, or the
    model and the file disagree. The manager keeps no file
    descriptor open between calls: every append opens the path again, so a transcript that
    was replaced is never written through a stale descriptor.
    """

    def __init__(
        self,
        path: PathArg,
        *,
        window: int = DEFAULT_WINDOW,
        chunk_size: int = _io.DEFAULT_CHUNK,
        cwd: str | None = None,
        writer: SessionWriter | None = None,
        index: bool | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        raw = os.fspath(path)
        self._path: str = os.fsdecode(raw) if isinstance(raw, bytes) else raw
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        self._window = window
        self._chunk = chunk_size
        self._cwd = cwd
        self.writer = writer
        self._use_index = index
        self._progress = progress
        self._load()
        # The fence asks open managers whether an id exists (a foreign line reusing one
        # is refused), and recognises the lines they wrote as this process's own.
        LIVE_MANAGERS.register(session_key(self._path), self)

    @classmethod
    def open(
        cls,
        path: PathArg,
        *,
        window: int = DEFAULT_WINDOW,
        chunk_size: int = _io.DEFAULT_CHUNK,
        cwd: str | None = None,
        writer: SessionWriter | None = None,
        index: bool | None = None,
        progress: Callable[[int, int], None] | None = None,
        store: SessionStore | None = None,
    ) -> SessionManager:
        """Parses ``path`` (see the class docstring).

        ``store`` (a ``sessionfence.store`` store; docs/multihost.md): ``path`` is then a
        session id of that store. A ``FileStore`` opens its file; a ``PostgresStore`` gives
        a manager with the same model over the stored session, whose appends commit in the
        store (the writer's claim checked in the append's transaction).

        ``window`` is the tail window of ``parsed_fingerprint`` and of the fingerprints
        merges return (use the controller's). ``cwd`` goes into the header written when the
        file is created (default: the process's working directory then). ``writer`` (also
        settable later as ``manager.writer``) journals every append in the session's
        owned-write journal as that writer (docs/journal.md): a claimant's append fails
        with ``SessionSupersededError`` once another run claimed the session, and appends
        may carry an ``idempotency_key``. Journaled appends must be made under the
        session's write lock, as every append should.

        ``index`` (docs/transcripts.md, "The index"): by default (``None``) the derived
        index ``<path>.idx`` is used when it proves it still describes the file's prefix,
        so the open parses only the bytes appended since it was written and the lines of
        the model context, and it is written (temp file + rename) after a parse of a file
        of 256 KiB or more, or that parsed 1 MiB past it. ``True`` writes it whatever the
        size; ``False`` neither reads nor writes it and parses every line into memory (the
        reference behaviour). Either way the result is that of a full parse; ``entries``
        are read back by offset when asked for.

        ``progress(done, total)`` is called after every chunk a parse reads (bytes of the
        file parsed so far, its size), e.g. to show how far the first open of a very large
        transcript is; it must not touch the manager.
        """
        if store is not None:
            from ..store._file import FileStore

            if not isinstance(store, FileStore):
                from ..store._manager import StoreSessionManager

                return StoreSessionManager(
                    os.fsdecode(path),
                    store,  # type: ignore[arg-type]  # checked there: a PostgresStore
                    window=window,
                    chunk_size=chunk_size,
                    cwd=cwd,
                    writer=writer,
                    index=index,
                    progress=progress,
                )
            path = store.path(os.fsdecode(path))
        return cls(
            path,
            window=window,
            chunk_size=chunk_size,
            cwd=cwd,
            writer=writer,
            index=index,
            progress=progress,
        )

    # ------------------------------------------------------------------------------------
    # Loading.
    # ------------------------------------------------------------------------------------

    def reload(self) -> None:
        """Reads the file again as a fresh ``open`` would (the controller's
        ``reload_session_file``): merged entries lose their in-memory side parents. With
        the index this costs the bytes past it and the model context, not the whole file.

        The manager object stays the same, so a guard installed on it stays in force.
        """
        self._load()

    def _reset(self) -> None:
        self._header: Entry | None = None
        self._entries: list[Entry] = []
        self._leaf: str | None = None
        self._side: Cursor = _UNSET
        # What a fresh reader of the file would take as leaf and side cursor. Equal to the
        # two above except after merges, which never move this manager's visible leaf.
        self._file_leaf: str | None = None
        self._file_side: Cursor = _UNSET
        self._labels: dict[str, str] = {}
        self._session_name: str | None = None
        # Parents that differ from an entry's own parentId key: entries without the key,
        # and the chain of a pre-tree (v1) file.
        self._parents: dict[str, str | None] = {}
        self._pre_tree = False
        self._version: float | None = None
        self._not_session: str | None = None
        self._unterminated = False
        self._malformed = 0
        self._invalid_utf8 = 0
        self._torn: tuple[int, int] | None = None
        sf = _backend.active()
        self._digest: Any = sf.RollingDigest()
        self._digest_size = 0
        # open() keeps the digest of [0, torn offset) so a repair need not re-read the file
        self._clean_digest: Any = None
        self._clean_offset: int | None = None
        self._parsed_fp: Fingerprint = MISSING
        self._parsed_digest: Any = None
        self._file_known = False  # whether the file exists as far as this manager knows
        # The row table of the parsed prefix (None: every entry is in ``_entries``, as a
        # full parse with index=False or of a pre-tree file leaves it); ``_entries`` then
        # holds the entries after it: parsed past the table, appended, merged.
        self._base: _index.Base | None = None
        self._by_id = _IdMap()
        self._row: int | None = None  # the row being applied while the table is built
        self._eager = False
        self._missing_id = False
        # Rows of the file past the table, in file order, while the model is a reader's
        # view of the file (``_pure``): (offset, length, value, id as stored)
        self._delta_rows: list[tuple[int, int, Entry, str | None]] = []
        self._pure = True
        self._upto = 0  # the model describes exactly the file's bytes [0, _upto)
        self._tail = b""  # the (up to) 4 KiB before _upto
        self._clean = 0  # end of the last complete line parsed
        self._index_size = 0  # what the index on disk covers (0: none known)
        self._index_opened = False  # the last load went through the index
        self._index_blocks: list[bytes] = []
        self._blocks_size = 0  # _index_blocks hash the bytes [0, _blocks_size)
        self._first: Any = None  # the first line that parsed as JSON (not_a_session)
        self._fence_seed: tuple[int, Any] | None = None  # (size, BlockDigest) at open
        self._seen_first = False
        # The context settings at an entry (the index's leaf, or the leaf when this manager
        # last wrote the index), valid for the id mapping it was computed with: ids parsed
        # from the file since (``_delta_ids``) must not redefine an id known then (checked
        # lazily up to ``_memo_checked``); ``context_settings`` walks back to it.
        self._settings_memo: tuple[str, ContextSettings] | None = None
        self._memo_checked = 0
        self._delta_ids: list[str] = []
        self._settings_cache: tuple[Any, ContextSettings] | None = None
        # After a cold parse, per row of the table: the row of the last
        # thinking_level_change on its path (-1: none), built as the rows are parsed (empty
        # when a reference did not resolve at parse time as it does at the end); valid for
        # the table's id mapping, like the memo.
        self._thinks = array("i")
        self._think_refs: list[str] = []

    def _load(self) -> None:
        sf = _backend.active()
        for _ in range(OPEN_ATTEMPTS):
            self._reset()
            before: Fingerprint = sf.fingerprint(self._path, window=self._window)
            if not before.exists:
                return
            try:
                fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except FileNotFoundError:
                continue
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (before.dev, before.ino):
                    continue
                with _io.gc_paused():
                    loaded = self._parse(fd, st)
            finally:
                os.close(fd)
            after: Fingerprint = sf.fingerprint(self._path, window=self._window)
            # Equal fingerprints (identity, size, both times, tail hash) before and after
            # the read, and as many bytes read as the file holds: the parse describes one
            # state of the file, and parsed_fingerprint names it.
            if after != before or after.size != loaded.size:
                continue
            with _io.gc_paused():  # building the index allocates a lot too
                if self._eager:
                    self._adopt(loaded, after)
                else:
                    self._adopt_rows(loaded, after)
            if self._base is not None:
                # The fence's digest of what was parsed, taken now (the partial block and
                # the lines past the index, from the page cache): a seed must describe the
                # parse, not a file changed since under an equal stat.
                self._fence_seed = self._compute_fence_digest()
            return
        raise UnstableFileError(self._path, OPEN_ATTEMPTS)

    def _parse(self, fd: int, st: os.stat_result) -> _io.Loaded:
        """One pass over the open file: through a valid index (the bytes past it), else a
        full parse into the row table (or into memory: ``index=False``, pre-tree)."""
        if self._use_index is False:
            self._eager = True
            return _io.parse_fd(fd, self._digest, self._chunk)
        found = _index.read_index(self._path)
        if (
            found is not None
            and _index.validate(found, fd, st)
            and _index.journal_vouches(self._path, found)
        ):
            loaded = self._parse_warm(fd, found)
            if loaded is not None:
                self._index_opened = True
                return loaded
            self._reset()  # the index lied somewhere: rebuild from the file
        os.lseek(fd, 0, os.SEEK_SET)
        loaded = self._parse_cold(fd, st)
        if self._pre_tree_rows():
            # A pre-tree session reads as a chain of all its values: parse it into memory.
            self._reset()
            self._eager = True
            os.lseek(fd, 0, os.SEEK_SET)
            loaded = _io.parse_fd(fd, self._digest, self._chunk)
        return loaded

    def _pre_tree_rows(self) -> bool:
        if self._header is None or not self._missing_id:
            return False
        return _io.reference_version(self._header) < 2

    def _parse_cold(self, fd: int, st: os.stat_result) -> _io.Loaded:
        base = _index.Base(self._path, st.st_dev, st.st_ino)
        self._base = base
        self._by_id = _IdMap(base)
        blocks = _index.BlockHasher()
        sink = _io.RowSink(0, self._take_row, self._digest, blocks, skeleton=True)
        sink.progress = self._report(st.st_size)
        self._thinks = array("i")
        try:
            loaded = _io.parse_fd(fd, sink, self._chunk)
        finally:
            self._row = None
        # The parse-time rows of _thinks are the walk's when every reference resolved to
        # the row it names at the end: no id is defined twice, and no reference that was
        # missing when its row was parsed names an entry now (a forward reference).
        ids = base._ids_map
        assert ids is not None
        if len(ids) != len(base.ids) - base.ids.count(None) or any(
            ref in ids for ref in self._think_refs
        ):
            self._thinks = array("i")
        self._think_refs = []
        base.size = sink.clean_end
        self._clean = sink.clean_end
        self._index_blocks = blocks.hashes()
        self._blocks_size = sink.clean_end
        return loaded

    def _report(self, total: int) -> Callable[[int], None] | None:
        progress = self._progress
        if progress is None:
            return None
        return lambda done: progress(done, max(total, done))

    def _take_row(self, value: Entry, offset: int, length: int) -> None:
        base = self._base
        assert base is not None
        kind = value.get("type")
        ident = value.get("id")
        parent = value.get("parentId")
        code = _PLAIN_CODES.get(kind) if type(kind) is str else None
        if (
            code is not None
            and type(ident) is str
            and ident
            and type(parent) is str
            and "appendMode" not in value
        ):
            # The common line (a message with its id and parentId): what ``_apply`` does
            # for it, without the calls. It becomes the leaf, and closes a side branch.
            row = base.count
            base.offsets.append(offset)
            base.lengths.append(length)
            base.kinds.append(code)
            base.ids.append(ident)
            base.pars.append(parent)
            base.count = row + 1
            ids = base._ids_map  # built by the parse (Base.put_row, inlined)
            assert ids is not None
            # the row of the last thinking_level_change on its path (see _thinks)
            thinks = self._thinks
            up = ids.get(parent)
            if up is not None:
                thinks.append(row if code == _THINK_ROW else thinks[up])
            else:
                self._think_refs.append(parent)
                thinks.append(row if code == _THINK_ROW else -1)
            ids[ident] = row
            self._leaf = self._file_leaf = ident
            self._side = self._file_side = _UNSET
            return
        valid = isinstance(ident, str) and bool(ident)
        stored = ident if valid and kind != "session" else None
        row = base.add(offset, length, value, stored)
        if kind == "session":
            if self._header is None:
                self._header = value
                base.header_row = row
            self._thinks.append(-1)  # no tree node
            return  # a second header is kept, but is no tree node
        if not valid:
            self._missing_id = True
        self._row = row
        self._apply(value)
        self._row = None
        self._thinks.append(self._think_of(row, value) if valid else -1)

    def _think_of(self, row: int, value: Entry) -> int:
        """The ``_thinks`` value of a row the fast path did not take: what the walk of
        ``_walk_from`` meets from it (a leaf control stands for its target, an entry of an
        unknown type for its parent, a known one for itself then its parent)."""
        base = self._base
        assert base is not None and base._ids_map is not None
        kind = value.get("type")
        if kind == "leaf":
            ref = value.get("targetId")
        elif kind == "thinking_level_change":
            return row
        else:
            ref = self._parent_of(value["id"], value)
        if not isinstance(ref, str):
            return -1
        up = base._ids_map.get(ref)
        if up is None:
            self._think_refs.append(ref)
            return -1
        if up == row:
            return -1  # its own parent (or target): the walk stops there
        return self._thinks[up]

    def _parse_warm(self, fd: int, found: _index.IndexData) -> _io.Loaded | None:
        """The state the index holds, then the lines past it; ``None`` when something read
        through the index is not what it says (the caller rebuilds)."""
        meta = found.meta
        try:
            state = meta["state"]
            header_raw = _io.read_exact(fd, int(meta["header_len"]), int(meta["header_off"]))
            header, _ = _jsonl.loads_line(header_raw)
            if type(header) is not dict or header.get("type") != "session":
                return None
            base = found.make_base(self._path)
            self._base = base
            self._by_id = _IdMap(base)
            self._header = header
            self._leaf = self._file_leaf = state["leaf"]
            side = state["side"]
            self._side = self._file_side = _UNSET if side == {"unset": True} else side
            self._labels = dict(state["labels"])
            self._session_name = state["name"]
            self._parents = dict(state["parents"])
            malformed = int(state["malformed"])
            invalid = int(state["invalid_utf8"])
            settings = state["settings"]
            if isinstance(settings["leaf"], str):
                self._settings_memo = (settings["leaf"], _settings_from_json(settings))
        except (KeyError, TypeError, ValueError, OSError):
            return None
        size = found.size
        self._index_size = size
        blocks = found.blocks()
        self._index_blocks = blocks
        self._blocks_size = size
        partial = found.partial
        if partial is None or len(partial) != size % _index.BLOCK:
            return None
        # The plain digest of [0, size) is read from the file only when asked for
        # (``digest``); the fence's is rebuilt from the index's block hashes
        # (``fence_digest``): no byte of the prefix is read again for either here.
        self._digest = None
        self._digest_size = size
        os.lseek(fd, size, os.SEEK_SET)
        loaded = self._parse_delta(fd, size)
        loaded.malformed += malformed
        loaded.invalid_utf8 += invalid
        loaded.first, loaded.seen_first = header, True
        try:
            # The lines of the model context the index names (at most MAX_HINTS, from the
            # leaf back), read now: checked against the index, and in memory for
            # context_entries(). A context longer than that (a session without
            # compactions) is read when it is asked for.
            base = self._base
            assert base is not None
            with base.keep_open():
                for row, _, _ in sorted(base.hints.values(), key=lambda h: h[1]):
                    base.entry(row)
        except (_index.Mismatch, OSError):
            return None
        return loaded

    def _parse_delta(self, fd: int, start: int) -> _io.Loaded:
        """The lines in ``[start, end of file)`` into the model (``_apply``), as entries the
        manager holds; the digest rolls over them when it covers exactly ``[0, start)``."""
        digest = self._digest if self._digest_size == start else None
        sink = _io.RowSink(start, self._take_delta, digest)
        sink.progress = self._report(os.fstat(fd).st_size)
        os.lseek(fd, start, os.SEEK_SET)
        loaded = _io.parse_fd(fd, sink, self._chunk)
        self._clean = sink.clean_end
        if digest is not None:
            self._digest_size = loaded.size
        elif self._digest is None:
            self._digest_size = loaded.size  # the lazy digest covers what was parsed
        self._malformed += loaded.malformed
        self._invalid_utf8 += loaded.invalid_utf8
        self._torn = loaded.torn
        self._unterminated = loaded.unterminated
        if loaded.torn is not None:
            self._clean_digest = loaded.clean_digest
            self._clean_offset = loaded.torn[0]
        self._note_end(fd, loaded.size)
        return loaded

    def _take_delta(self, value: Entry, offset: int, length: int) -> None:
        kind = value.get("type")
        ident = value.get("id")
        valid = isinstance(ident, str) and bool(ident)
        stored = ident if valid and kind != "session" else None
        self._delta_rows.append((offset, length, value, stored))
        if kind == "session":
            if self._header is None:
                self._header = value  # the header: not an entry
                self._pure = False  # no row table to name it in: no index from here
            else:
                self._entries.append(value)  # a second header is kept, but is no tree node
            return
        self._entries.append(value)
        if not valid:
            self._missing_id = True
        elif stored is not None:
            if stored in self._by_id.live:
                self._settings_memo = None  # redefines an entry the memo may rest on
            self._delta_ids.append(stored)
        self._apply(value)

    def _note_end(self, fd: int, size: int) -> None:
        self._upto = size
        keep = min(size, 4096)
        self._tail = _io.read_exact(fd, keep, size - keep) if keep else b""

    def _adopt_rows(self, loaded: _io.Loaded, fp: Fingerprint) -> None:
        """After a parse into the row table (cold or through the index)."""
        self._parsed_fp = fp
        self._file_known = True
        if self._digest is not None:
            self._digest_size = loaded.size
            self._parsed_digest = self._digest.copy()
        else:
            self._digest_size = loaded.size
            self._parsed_digest = _PENDING
        if self._index_size == 0:  # cold: the parse saw every line
            self._malformed = loaded.malformed
            self._invalid_utf8 = loaded.invalid_utf8
            self._torn = loaded.torn
            self._unterminated = loaded.unterminated
            self._clean_digest = loaded.clean_digest
            self._clean_offset = loaded.torn[0] if loaded.torn is not None else None
            self._upto = loaded.size
            if loaded.size:
                fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                try:
                    self._note_end(fd, loaded.size)
                finally:
                    os.close(fd)
        else:
            self._malformed = loaded.malformed
            self._invalid_utf8 = loaded.invalid_utf8
        self._first, self._seen_first = loaded.first, loaded.seen_first
        self._not_session = _io.describe_not_a_session(
            loaded.first, loaded.seen_first, loaded.malformed
        )
        if self._header is not None:
            self._version = _io.reference_version(self._header)
        self._maybe_write_index()

    def refresh(self) -> int:
        """Brings the model up to date with the file, parsing only the lines appended since
        this manager last read or wrote it; returns how many bytes were parsed.

        Incremental when the model is exactly a reader's view of the file's first bytes
        (no merge since the last load, no torn or unterminated last line) and the file
        still holds those bytes (same identity, the last 4 KiB before that point
        unchanged); otherwise it is ``reload()`` (which still uses the index). Either way
        the result is what a fresh ``open`` gives.
        """
        base = self._base
        if (
            base is None
            or not self._pure
            or self._torn is not None
            or self._unterminated
            or not self._file_known
        ):
            self._load()
            return self._parsed_size()
        sf = _backend.active()
        before: Fingerprint = sf.fingerprint(self._path, window=self._window)
        upto = self._upto
        if not before.exists or (before.dev, before.ino) != (base.dev, base.ino):
            self._load()
            return self._parsed_size()
        try:
            fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            self._load()
            return 0
        try:
            st = os.fstat(fd)
            tail = self._tail
            if (
                (st.st_dev, st.st_ino) != (base.dev, base.ino)
                or st.st_size < upto
                or _io.read_exact(fd, len(tail), upto - len(tail)) != tail
            ):
                loaded = None
            else:
                with _io.gc_paused():
                    loaded = self._parse_delta(fd, upto)
        finally:
            os.close(fd)
        after: Fingerprint = sf.fingerprint(self._path, window=self._window)
        if loaded is None or after != before or after.size != loaded.size or self._pre_tree_rows():
            self._load()  # the file changed meanwhile: what it is now, from the index
            return self._parsed_size()
        if not self._seen_first and loaded.seen_first:
            self._first, self._seen_first = loaded.first, True
        self._not_session = _io.describe_not_a_session(
            self._first, self._seen_first, self._malformed
        )
        if self._header is not None:
            self._version = _io.reference_version(self._header)
        self._parsed_fp = after
        self._parsed_digest = (
            self._digest.copy()
            if self._digest is not None and self._digest_size == loaded.size
            else _PENDING
        )
        self._maybe_write_index()
        return loaded.size - upto

    # ------------------------------------------------------------------------------------
    # The index file.
    # ------------------------------------------------------------------------------------

    def _parsed_size(self) -> int:
        fp = self._parsed_fp
        return int(fp.size) if fp.exists else 0

    def _indexable(self) -> bool:
        version = self._version
        return (
            self._use_index is not False
            and self._base is not None
            and self._pure
            and not self._unterminated
            and self._header is not None
            and self._not_session is None
            and version is not None
            and not version < 2
            and self._base.header_row >= 0
        )

    def _maybe_write_index(self) -> None:
        """Writes ``<path>.idx`` for the prefix ``[0, _clean)`` when this manager's model is a
        reader's view of it and the index on disk is missing or far behind. Never raises
        for a failed write (an index is a cache)."""
        if not self._indexable():
            return
        clean = self._clean
        if self._index_size:
            if clean - self._index_size < _index.REWRITE_AFTER:
                return
        elif clean < _index.INDEX_MIN_BYTES and self._use_index is not True:
            return
        if clean <= 0:
            return
        base = self._base
        assert base is not None
        try:
            looked = self._hint_ids()
            delta_rows = {r[3]: i for i, r in enumerate(self._delta_rows) if r[3] is not None}
            hints: dict[str, tuple[int, int, int]] = {}
            for ident in looked:
                at = delta_rows.get(ident)
                if at is not None:
                    off, ln, _, _ = self._delta_rows[at]
                    hints[ident] = (base.count + at, off, ln)
                elif ident not in self._by_id.live:
                    row = base.row_of(ident)
                    if row is not None:
                        off, ln = base.span(row)
                        hints[ident] = (row, off, ln)
            if self._blocks_size == clean:
                blocks: list[bytes] | None = self._index_blocks
            else:
                blocks = _index.rehash_blocks(
                    self._path, self._index_blocks, self._blocks_size, clean
                )
            if blocks is None:
                return
            settings = self._settings_at(self._leaf)  # the skeleton's context settings
            rows = [r for r in self._delta_rows if r[0] < clean]
            side = self._side
            state = {
                "leaf": self._leaf,
                "side": {"unset": True} if isinstance(side, _Unset) else side,
                "labels": self._labels,
                "name": self._session_name,
                "parents": self._parents,
                "malformed": self._malformed,
                "invalid_utf8": self._invalid_utf8,
                "settings": {"leaf": self._leaf, **_settings_to_json(settings)},
            }
            tail = self._tail if clean == self._upto else None  # what was parsed there
            written = _index.write_index(self._path, base, rows, clean, blocks, state, hints, tail)
        except (_index.Mismatch, OSError, ValueError):
            return
        if written is not None:
            self._index_size = clean
            self._index_blocks = blocks
            self._blocks_size = clean
            if self._leaf is not None:
                self._settings_memo = (self._leaf, settings)
                self._memo_checked = len(self._delta_ids)

    def _adopt(self, loaded: _io.Loaded, fp: Fingerprint) -> None:
        self._parsed_fp = fp
        self._parsed_digest = self._digest.copy()
        self._file_known = True
        self._digest_size = loaded.size
        self._malformed = loaded.malformed
        self._invalid_utf8 = loaded.invalid_utf8
        self._torn = loaded.torn
        self._clean_digest = loaded.clean_digest
        self._clean_offset = loaded.torn[0] if loaded.torn is not None else None
        self._unterminated = loaded.unterminated
        self._not_session = _io.describe_not_a_session(
            loaded.first, loaded.seen_first, loaded.malformed
        )
        entries = self._entries
        for value in loaded.values:
            if value.get("type") == "session":
                if self._header is None:
                    self._header = value
                else:
                    entries.append(value)  # a second header is kept, but is no tree node
                continue
            entries.append(value)
        if self._header is not None:
            self._version = _io.reference_version(self._header)
            self._pre_tree = self._version < 2 and any(
                not _nonempty(e.get("id")) for e in entries if e.get("type") != "session"
            )
        if self._pre_tree:
            self._adopt_chain(loaded.values)
            return
        apply = self._apply
        for value in entries:
            if value.get("type") != "session":
                apply(value)

    def _adopt_chain(self, values: list[Entry]) -> None:
        """A pre-tree (v1) file: every entry object, in file order, is the child of the one
        before it (pi-mono ``migrateV1ToV2``), whatever its type."""
        previous: str | None = None
        by_id = self._by_id
        for position, value in enumerate(values):
            if value.get("type") == "session":
                continue
            own = value.get("id")
            ident = own if isinstance(own, str) and own and own not in by_id else f"v1:{position}"
            by_id[ident] = value
            self._parents[ident] = previous
            previous = ident
            if value.get("type") == "label":
                self._apply_label(value)
            elif value.get("type") == "session_info":
                self._apply_session_info(value)
        self._leaf = self._file_leaf = previous

    def _apply(self, entry: Entry) -> None:
        """Advances the tree state over one entry as a reader of the file sees it (openclaw
        ``SessionManagerCore.buildIndex``; see the module docstring)."""
        ident = entry.get("id")
        if not isinstance(ident, str) or not ident:
            return
        kind = entry.get("type")
        if kind == "leaf":
            self._apply_leaf_control(ident, entry)
            return
        self._store(ident, entry)
        if kind not in KNOWN_ENTRY_TYPES:
            # Opaque: kept (it can be looked up, labelled, named as a parent) but it never
            # moves the visible leaf; it extends an open side branch, as openclaw's opaque
            # rows with a parentId extend the append cursor.
            if "parentId" in entry and not isinstance(self._side, _Unset):
                self._side = self._file_side = ident
            return
        if "parentId" not in entry:
            # a parentless row continues the visible leaf (openclaw logicalParentsById)
            self._parents[ident] = self._leaf
        if entry.get("appendMode") == "side":
            self._side = self._file_side = ident
        else:
            self._leaf = self._file_leaf = ident
            self._side = self._file_side = _UNSET
        if kind == "label":
            self._apply_label(entry)
        elif kind == "session_info":
            self._apply_session_info(entry)

    def _store(self, ident: str, entry: Entry) -> None:
        row = self._row
        if row is not None:
            assert self._base is not None
            self._base.put_row(ident, row)  # the table's row, read back when asked for
        else:
            self._by_id[ident] = entry

    def _parent_of(self, ident: str, entry: Entry) -> object:
        """The parent id a reader gives the entry (``_NO_PARENT`` stands for "use its own
        ``parentId``")."""
        parent = self._parents.get(ident, _NO_PARENT)
        return entry.get("parentId") if parent is _NO_PARENT else parent

    def _apply_leaf_control(self, ident: str, entry: Entry) -> None:
        # A leaf control moves the visible leaf (and the side cursor) without content. One
        # that names an unknown entry, or is not shaped like a control, is ignored, as
        # openclaw's reader ignores it.
        self._store(ident, entry)
        if "parentId" not in entry or "targetId" not in entry:
            return
        mode = entry.get("appendMode")
        if mode is not None and mode != "side":
            return
        target = entry["targetId"]
        append_parent = entry.get("appendParentId", target)
        for ref in (target, append_parent):
            if ref is not None and (not isinstance(ref, str) or ref not in self._by_id):
                return
        self._leaf = self._file_leaf = self._resolve(target)
        side = self._resolve(append_parent) if mode == "side" else _UNSET
        self._side = self._file_side = side

    def _resolve(self, ident: str | None) -> str | None:
        """A reference to a leaf control stands for that control's target, and one to an
        entry of an unknown type for its nearest known ancestor (openclaw
        ``resolveOpaqueLeafTargetId``)."""
        seen: set[str] = set()
        while ident is not None and ident not in seen:
            seen.add(ident)
            entry = self._by_id.get(ident)
            if entry is None:
                return ident
            kind = entry.get("type")
            if kind == "leaf":
                target = entry.get("targetId")
                ident = target if isinstance(target, str) else None
            elif kind in KNOWN_ENTRY_TYPES or self._pre_tree:
                return ident
            else:
                parent = self._parent_of(ident, entry)
                ident = parent if isinstance(parent, str) else None
        return ident

    def _apply_label(self, entry: Entry) -> None:
        target = entry.get("targetId")
        if not isinstance(target, str):
            return
        label = entry.get("label")
        if isinstance(label, str) and label:
            self._labels[target] = label
        else:
            self._labels.pop(target, None)

    def _apply_session_info(self, entry: Entry) -> None:
        name = entry.get("name")
        self._session_name = (_jsonl.js_trim(name) or None) if isinstance(name, str) else None

    # ------------------------------------------------------------------------------------
    # Reading the model.
    # ------------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def window(self) -> int:
        """Tail window of ``parsed_fingerprint`` and of the fingerprints merges return."""
        return self._window

    def __repr__(self) -> str:
        return (
            f"<SessionManager {self._path!r} entries={len(self.entries)} "
            f"leaf={self._leaf!r} digest_size={self._digest_size}>"
        )

    def close(self) -> None:
        """Release what the manager holds between calls. A manager of a file holds nothing
        (it keeps no descriptor open), so this does nothing; a manager of a stored session
        releases its local copy (docs/multihost.md). Also ``with SessionManager.open(...)
        as m:``. Idempotent."""

    def __enter__(self) -> SessionManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def header(self) -> Entry | None:
        return self._header

    @property
    def entries(self) -> Sequence[Entry]:
        """Every entry in file order (own appends and merged entries included), without the
        header: a list-like snapshot (``len``, indexing, slicing, iteration, ``==`` with a
        list). A new one each time. The entries of the parsed prefix are read back from the
        file by offset when they are asked for, not held in memory (an open parses only the
        model context); the dicts the model holds are the model's own. ``list(m.entries)``
        materialises them all. ``TranscriptChangedError`` when the file's prefix changed
        since it was parsed (reload)."""
        return _index.LazyEntries(self._base, self._entries)

    @property
    def leaf_id(self) -> str | None:
        """The visible leaf: the parent of the next own append."""
        return self._leaf

    @property
    def side_cursor(self) -> str | None:
        """Where the next merged foreign entry hangs (the leaf when no side branch is open)."""
        return self._leaf if isinstance(self._side, _Unset) else self._side

    @property
    def labels(self) -> dict[str, str]:
        return dict(self._labels)

    @property
    def session_name(self) -> str | None:
        return self._session_name

    @property
    def malformed_lines(self) -> int:
        return self._malformed

    @property
    def invalid_utf8_lines(self) -> int:
        return self._invalid_utf8

    @property
    def torn_tail(self) -> tuple[int, int] | None:
        """``(offset, length)`` of a last line that has no newline and does not parse as a
        JSON object, as of ``open`` or the last append attempt that found one; ``None``
        after a repair."""
        return self._torn

    @property
    def unterminated_last_line(self) -> bool:
        """Whether ``open`` found a complete last entry without its newline (the next append
        writes the newline first)."""
        return self._unterminated

    @property
    def not_a_session(self) -> str | None:
        """``None`` for a session transcript (or an empty or missing file); otherwise what
        the file looks like, e.g. ``a Claude Code log, not a session transcript (...)``:
        its first JSON line is not a session header. Appends then raise
        ``NotASessionError`` and write nothing."""
        return self._not_session

    @property
    def format_version(self) -> float | None:
        """The header's format version as the references read it (``version``, 1 when the
        header has none); ``None`` without a header."""
        return self._version

    @property
    def pre_tree(self) -> bool:
        """A pre-tree (v1) session: its header has no ``version`` (or one below 2) and some
        entry has no ``id``. Read as a linear chain; appends are refused until
        ``migrate_transcript`` rewrote it."""
        return self._pre_tree

    @property
    def needs_migration(self) -> bool:
        """Whether pi-mono and openclaw would rewrite this file with new entry ids when they
        open it (a pre-tree file, or a header with an ``id`` and a version below 2), so that
        appending to it first would be undone. ``migrate_transcript`` fixes it."""
        header = self._header
        if header is None or self._version is None or not self._version < 2:
            return False
        return self._pre_tree or isinstance(header.get("id"), str)

    @property
    def digest(self) -> Any:
        """``RollingDigest`` (XXH3-128, equal to ``content_digest``) of the file's bytes
        ``[0, digest_size)``. The live object: take ``.copy()`` before rolling it yourself.

        A cold open computes it while it parses. After an open through the index it is
        computed on first use, by reading ``[0, digest_size)`` once, checked against the
        index's block hashes and the last bytes this manager parsed; when they differ (the
        file was rewritten since), it is a digest no content has. The fence's own digest,
        which needs no such read, is ``fence_digest()``."""
        if self._digest is None:
            self._digest = self._digest_from_file(self._digest_size)
        return self._digest

    def _digest_from_file(self, size: int) -> Any:
        """The plain digest of ``[0, size)`` read now. When those bytes are provably not the
        ones parsed (another file, a block or the bytes before ``_upto`` differ), the
        digest of the parsed bytes is out of reach: the result is then one that no content
        has (the bytes read and a random marker), so whoever compares it with the file sees
        the change, as it would have with the parse's own digest."""
        digest = _backend.active().RollingDigest()
        hasher = _index.BlockHasher()
        same = self._read_checked(0, size, (digest, hasher))
        full = min(self._blocks_size, size) // _index.BLOCK
        if not same or hasher.full[:full] != self._index_blocks[:full]:
            digest.update(b"\0sessionfence: not the bytes parsed\0" + os.urandom(16))
        return digest

    def fence_digest(self) -> Any:
        """The fence's content digest (``BlockDigest``: block-structured XXH3-128) of the
        file's bytes ``[0, digest_size)``, a new object, for
        ``SessionFenceController.seed_content_digest(m.parsed_fingerprint, m.fence_digest(),
        m.digest_size)``: the first activation of a fence then reads nothing of its own.

        Built from the hashes of the whole blocks this manager holds (its parse's, or the
        index's) and a read of the bytes after them (the partial block and what was
        appended since): never a reread of the prefix. The index is trusted for the prefix
        on the same basis as the rest of it (docs/transcripts.md, "The digest"): a prefix
        edited in place after the index was written gives a digest of the content the
        index describes, which a fence's next whole-content proof (``verify="full"``)
        finds different from the file (a ``rewritten`` takeover: it fails closed). When the
        bytes read provably are not the ones parsed, it is a digest no content has."""
        seed = self._fence_seed
        if seed is not None and seed[0] == self._digest_size:
            return seed[1].copy()
        return self._compute_fence_digest()[1]

    def _compute_fence_digest(self) -> tuple[int, Any]:
        """``(digest_size, the fence's digest of [0, digest_size))`` computed now."""
        size = self._digest_size
        if size == 0:
            return 0, _backend.active().BlockDigest()
        blocks = self._index_blocks
        full = min(self._blocks_size, size) // _index.BLOCK
        digest = _backend.active().BlockDigest.from_blocks(blocks[:full])
        checker = _index.BlockHasher(blocks[:full])
        checked = min(self._blocks_size, size)  # the hashes describe [0, checked)
        same = self._read_checked(full * _index.BLOCK, size, (digest,), checker, checked)
        # Read up to where the hashes end, the bytes must give the same hashes (the whole
        # blocks were not read: they are the hashes themselves).
        if checked == self._blocks_size and checker.hashes() != blocks:
            same = False
        if not same:
            digest.update(b"\0sessionfence: not the bytes parsed\0" + os.urandom(16))
        return size, digest

    def _read_checked(
        self,
        offset: int,
        size: int,
        sinks: tuple[Any, ...],
        checker: Any = None,
        checked: int = 0,
    ) -> bool:
        """Feed the file's bytes ``[offset, size)`` to ``sinks`` (and those before
        ``checked`` to ``checker``); False when they provably are not the bytes parsed
        (another file, too short, the bytes before ``_upto`` differ)."""
        base = self._base
        same = True
        fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            st = os.fstat(fd)
            if base is not None and (st.st_dev, st.st_ino) != (base.dev, base.ino):
                same = False
            while offset < size:
                want = min(_io.DEFAULT_CHUNK, size - offset)
                if checker is not None and offset < checked:
                    want = min(want, checked - offset)  # stop where the hashes stop
                block = _io.pread(fd, want, offset)
                if not block:
                    same = False
                    break
                for sink in sinks:
                    sink.update(block)
                if checker is not None and offset < checked:
                    checker.update(block)
                offset += len(block)
            tail = self._tail
            at = size - len(tail)
            if same and size == self._upto and tail and _io.read_exact(fd, len(tail), at) != tail:
                same = False
        finally:
            os.close(fd)
        return same

    @property
    def digest_size(self) -> int:
        return self._digest_size

    @property
    def parsed_fingerprint(self) -> Fingerprint:
        """The fingerprint of the file as parsed by ``open`` (``MISSING`` if it was absent)."""
        return self._parsed_fp

    @property
    def parsed_digest(self) -> Any:
        """``RollingDigest`` of exactly the bytes ``open`` parsed, paired with
        ``parsed_fingerprint`` (``None`` when the file was missing). A private copy that this
        manager never rolls, so it can be cached and shared as is, e.g.
        ``REGISTRY.remember_digest(key, m.parsed_fingerprint, m.parsed_digest)``; whoever
        rolls it forward must ``copy()`` it first. After an open through the index it is
        computed on first use (see ``digest``)."""
        if self._parsed_digest is _PENDING:
            size = self._parsed_fp.size
            if self._digest_size == size:
                self._parsed_digest = self.digest.copy()
            else:
                self._parsed_digest = self._digest_from_file(size)
        return self._parsed_digest

    def get_entry(self, entry_id: str) -> Entry | None:
        return self._by_id.get(entry_id)

    def has_entry(self, entry_id: str) -> bool:
        """Whether the session has an entry ``entry_id``, from the parse and the index's
        ids alone: nothing is read back from the file (``get_entry`` may read it), and
        after an open through the index only its ids section is loaded, not the row
        table (the fence asks this of every foreign line)."""
        return isinstance(entry_id, str) and self._by_id.maybe_contains(entry_id)

    def branch(self, leaf_id: str | None = None) -> list[Entry]:
        """Root-to-leaf path ending at ``leaf_id`` (default: the visible leaf).

        Leaf controls on the way stand for their targets and are not listed. An unknown id
        gives ``[]``, as pi-mono's ``getBranch`` does; a parent cycle stops the walk.
        """
        path, _ = self._walk(self._leaf if leaf_id is None else leaf_id)
        return path

    def context_entries(self) -> list[Entry]:
        """The entries of the model context at the visible leaf, cut as pi-mono's
        ``buildSessionContext`` cuts them: the latest ``compaction`` on the leaf's path
        (``branch()``), then the path's entries from that compaction's
        ``firstKeptEntryId`` up to the compaction, then the path's entries after it to the
        leaf. Without a compaction on the path: the whole path (``branch()``); no leaf:
        ``[]``. Entries of every type on the path are listed (the caller turns the ones it
        sends into messages: ``message``, ``custom_message``, ``branch_summary``, ...). When
        the first kept entry is not on the path before the compaction, only the
        compaction and what follows it are listed, as in the original.

        Reads the path from the leaf back to the first kept entry only, never the history
        before it: after ``open`` these entries are in memory already (the open parses
        them), so this costs a walk over the context.
        """
        path, _ = self._walk(self._leaf, context=True)
        return _cut_context(path)

    def context_settings(self) -> ContextSettings:
        """The thinking level and model of the context at the visible leaf, derived as
        pi-mono's ``buildSessionContext`` derives them, along the path ``branch()`` gives:
        the last ``thinking_level_change``'s ``thinkingLevel`` (``"off"`` without one),
        and the last ``model_change`` (``provider``, ``modelId``) or assistant message
        (its message's ``provider`` and ``model``) as a ``ContextModel`` (``None``
        without one). See ``ContextSettings``; no leaf: the defaults.

        Identical to what a full parse gives, at the cost of a walk from the leaf back to
        the entries that decide, or to the leaf the index recorded them for (the index
        stores the settings at its leaf): after an open through the index, the lines
        parsed past it and the model context, nothing of the history. A leaf whose path
        leaves the context elsewhere walks the row table (reading only the rows that set
        a thinking level or a model); an open that parsed lines past the index checks
        their ids against the index's ids once (a line redefining an indexed id would
        change the path)."""
        key = (self._leaf, len(self._entries), self._base)
        cached = self._settings_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        settings = self._settings_at(self._leaf)
        self._settings_cache = (key, settings)
        return settings

    def _valid_memo(self) -> tuple[str, ContextSettings] | None:
        """The memo, when the id mapping it (and ``_thinks``) rests on still holds: no id
        parsed from the file since redefines one of the table's."""
        pending = self._delta_ids[self._memo_checked :]
        if pending and (self._settings_memo is not None or self._thinks):
            base = self._base
            if base is not None and any(base.maybe_has_id(i) for i in pending):
                self._settings_memo = None  # a line past the index redefined an indexed id
                self._thinks = array("i")
            self._memo_checked = len(self._delta_ids)
        return self._settings_memo

    def _settings_at(self, leaf: str | None) -> ContextSettings:
        """``context_settings`` at ``leaf``: the walk of ``_walk_from`` from the leaf
        back, stopping once both settings are met (the last of each on the path) or at
        the memo's entry (whose settings fill in what is still missing). Rows of the
        table are read only when they may set something (leaf controls, thinking and
        model changes, messages while no model is met); the others are stepped through
        by their kind and parent in the table."""
        memo = self._valid_memo()
        thinks = self._thinks  # emptied by _valid_memo when the table's mapping changed
        thinking: Any = _UNRESOLVED
        model: Any = _UNRESOLVED
        base = self._base
        live = self._by_id.live
        every_type = self._pre_tree
        seen: set[str] = set()
        current = leaf
        with base.keep_open() if base is not None else contextlib.nullcontext():
            while current is not None and current not in seen:
                if memo is not None and current == memo[0]:
                    if thinking is _UNRESOLVED:
                        thinking = memo[1].thinking_level
                    if model is _UNRESOLVED:
                        model = memo[1].model
                    break
                seen.add(current)
                entry = live.get(current)
                if entry is None:
                    if base is None:
                        break
                    row = base.row_of(current)
                    if row is None:
                        break
                    if thinking is _UNRESOLVED and row < len(thinks):
                        # the table's rows: the last thinking change on the rest of the path
                        at = thinks[row]
                        thinking = (
                            "off"
                            if at < 0
                            else _text_or_none(base.entry(at, keep=False).get("thinkingLevel"))
                        )
                        if model is not _UNRESOLVED:
                            break
                    if base.loaded:
                        code = base.kinds[row] & 0x0F
                        if code not in _SETTING_CODES and (
                            code != _MESSAGE_CODE or model is not _UNRESOLVED
                        ):
                            # nothing to read: step to its parent through the table
                            override = self._parents.get(current, _NO_PARENT)
                            parent = override if override is not _NO_PARENT else base.pars[row]
                            current = parent if isinstance(parent, str) else None
                            continue
                    entry = base.entry(row, keep=row in base.hint_rows)
                kind = entry.get("type")
                if kind == "leaf" and not every_type:
                    target = entry.get("targetId")
                    current = target if isinstance(target, str) else None
                    continue
                if every_type or kind in KNOWN_ENTRY_TYPES:
                    if kind == "thinking_level_change":
                        if thinking is _UNRESOLVED:
                            thinking = _text_or_none(entry.get("thinkingLevel"))
                    elif kind == "model_change":
                        if model is _UNRESOLVED:
                            model = ContextModel(
                                _text_or_none(entry.get("provider")),
                                _text_or_none(entry.get("modelId")),
                            )
                    elif kind == "message" and model is _UNRESOLVED:
                        model = _assistant_model(entry) or _UNRESOLVED
                    if thinking is not _UNRESOLVED and model is not _UNRESOLVED:
                        break
                parent = self._parent_of(current, entry)
                current = parent if isinstance(parent, str) else None
        return ContextSettings(
            "off" if thinking is _UNRESOLVED else thinking,
            None if model is _UNRESOLVED else model,
        )

    def _hint_ids(self) -> list[str]:
        """The ids ``_walk(leaf, context=True)`` looks up, found through the row table
        (kinds and string parents) without parsing the lines: only leaf controls and
        compactions on the way are read. At most ``MAX_HINTS``."""
        base = self._base
        assert base is not None
        base.load()
        live = self._by_id.live
        current = self._leaf
        seen: set[str] = set()
        looked: list[str] = []
        first_kept: object = _NO_PARENT  # none met yet
        with base.keep_open():
            while current is not None and current not in seen:
                if len(looked) >= _index.MAX_HINTS:
                    break
                seen.add(current)
                entry = live.get(current)
                if entry is not None:
                    kind = entry.get("type")
                    parent = self._parent_of(current, entry)
                else:
                    row = base.row_of(current)
                    if row is None:
                        break
                    code = base.kinds[row] & 0x0F
                    if code in (_index.T_LEAF, _index.KNOWN_CODES["compaction"]):
                        entry = base.entry(row)
                        kind = entry.get("type")
                        parent = self._parent_of(current, entry)
                    else:
                        kind = "session" if code == _index.T_SESSION else None
                        if code >= _index.T_KNOWN_MIN:
                            kind = "message"  # any known type that is not a compaction
                        override = self._parents.get(current, _NO_PARENT)
                        parent = override if override is not _NO_PARENT else base.pars[row]
                looked.append(current)
                if kind == "leaf":
                    assert entry is not None
                    target = entry.get("targetId")
                    current = target if isinstance(target, str) else None
                    continue
                if kind in KNOWN_ENTRY_TYPES:
                    if first_kept is _NO_PARENT:
                        if kind == "compaction":
                            assert entry is not None
                            first_kept = entry.get("firstKeptEntryId")
                    elif current == first_kept:
                        break
                current = parent if isinstance(parent, str) else None
        return looked

    def _walk(
        self, leaf: str | None, *, context: bool = False, limit: int | None = None
    ) -> tuple[list[Entry], list[str]]:
        """``branch(leaf)``, and the ids looked up on the way. With ``context``, the walk
        stops at the first kept entry of the latest compaction on the path (what
        ``_cut_context`` needs); with ``limit``, after that many lookups (the path is then
        incomplete: for the index's hints only)."""
        base = self._base
        if base is None:
            return self._walk_from(leaf, context, limit)
        with base.keep_open():
            return self._walk_from(leaf, context, limit)

    def _walk_from(
        self, leaf: str | None, context: bool, limit: int | None
    ) -> tuple[list[Entry], list[str]]:
        current = leaf
        path: list[Entry] = []
        looked: list[str] = []
        seen: set[str] = set()
        by_id = self._by_id
        every_type = self._pre_tree
        compaction: Entry | None = None
        context = context and not every_type
        while current is not None and current not in seen:
            if limit is not None and len(looked) >= limit:
                break
            seen.add(current)
            entry = by_id.get(current)
            if entry is None:
                break
            looked.append(current)
            kind = entry.get("type")
            if kind == "leaf" and not every_type:
                target = entry.get("targetId")
                current = target if isinstance(target, str) else None
                continue
            if every_type or kind in KNOWN_ENTRY_TYPES:
                path.append(entry)  # an entry of an unknown type is walked through, unlisted
                if context:
                    if compaction is None:
                        if kind == "compaction":
                            compaction = entry
                    elif entry.get("id") == compaction.get("firstKeptEntryId"):
                        break  # the first kept entry: nothing above it is in the context
            parent = self._parent_of(current, entry)
            current = parent if isinstance(parent, str) else None
        path.reverse()
        return path, looked

    def children(self, entry_id: str | None) -> list[Entry]:
        """Entries whose parent (as ``branch`` follows it) is ``entry_id`` (``None``: the
        roots), in file order."""
        return [
            e
            for ident, e in self._by_id.items()
            if e.get("type") not in ("leaf", "session") and self._parent_of(ident, e) == entry_id
        ]

    # ------------------------------------------------------------------------------------
    # Appending.
    # ------------------------------------------------------------------------------------

    def append_message(
        self, message: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> str:
        """Appends ``{"type":"message", id, parentId, timestamp, message}``; returns the id.

        ``idempotency_key`` (journaled managers only, see ``open``): when an append with
        this key already landed (a retry after a lost acknowledgement), nothing is
        written and the id of that entry is returned (the entry joins this manager's
        model if it was missing). The key is looked up in the journal, not the file."""
        return self._append({"type": "message", "message": message}, idempotency_key)

    def append_compaction(
        self,
        summary: str,
        first_kept_entry_id: str,
        tokens_before: int,
        details: Any = None,
        from_hook: bool = False,
    ) -> str:
        """Appends a ``compaction`` entry. ``details`` is omitted when None and ``fromHook``
        when false (JSON.stringify drops undefined), so default lines match what the
        JavaScript writers write."""
        fields: Entry = {
            "type": "compaction",
            "summary": summary,
            "firstKeptEntryId": first_kept_entry_id,
            "tokensBefore": tokens_before,
        }
        if details is not None:
            fields["details"] = details
        if from_hook:
            fields["fromHook"] = True
        return self._append(fields)

    def append_custom(
        self, custom_type: str, data: Any = None, *, idempotency_key: str | None = None
    ) -> str:
        """Appends ``{"type":"custom", customType, data?}`` (persisted, never sent to a
        model). ``idempotency_key``: as for ``append_message``."""
        fields: Entry = {"type": "custom", "customType": custom_type}
        if data is not None:
            fields["data"] = data
        return self._append(fields, idempotency_key)

    def append_label(self, target_id: str, label: str | None) -> str:
        """Labels an existing entry; ``None`` or ``""`` clears its label. ``ValueError`` when
        ``target_id`` is not in the transcript (the JavaScript session managers throw too)."""
        if target_id not in self._by_id:
            raise ValueError(f"cannot label entry {target_id!r}: no such entry")
        fields: Entry = {"type": "label", "targetId": target_id}
        if label is not None:
            fields["label"] = label
        return self._append(fields)

    def append_session_info(self, name: str | None) -> str:
        """Sets the session's name (trimmed; empty clears it)."""
        fields: Entry = {"type": "session_info"}
        if name is not None:
            fields["name"] = _jsonl.js_trim(name)
        return self._append(fields)

    def append_entry(self, entry: Mapping[str, Any], *, idempotency_key: str | None = None) -> str:
        """Appends any entry type (``thinking_level_change``, ``model_change``, ...).

        ``type`` is required; ``id``, ``parentId`` and ``timestamp`` are filled in when
        absent (a given ``id`` must be new). ``appendMode: "side"`` moves the side cursor
        instead of the leaf, as it does for a reader of the file. ``idempotency_key``: as
        for ``append_message``.
        """
        kind = entry.get("type")
        if not isinstance(kind, str) or not kind or kind == "session":
            raise ValueError("an entry needs a non-empty string 'type' other than 'session'")
        given = entry.get("id")
        if given is not None and (not isinstance(given, str) or not given):
            raise ValueError("an entry's 'id' must be a non-empty string")
        if isinstance(given, str) and given in self._by_id:
            raise ValueError(f"entry {given} already exists")
        return self._append(dict(entry), idempotency_key)

    def _append(self, fields: Entry, idempotency_key: str | None = None) -> str:
        if idempotency_key is not None and self.writer is None:
            raise ValueError("an idempotency key needs a journaled manager (writer=...)")
        ident = fields.get("id")
        if not isinstance(ident, str):
            ident = _io.new_entry_id(self._by_id.maybe_contains)
        parent = fields.get("parentId", self._leaf)
        timestamp = fields["timestamp"] if "timestamp" in fields else _io.iso_now()
        # Base fields first, in the JavaScript writers' order; the type's own fields follow.
        entry: Entry = {"type": fields["type"], "id": ident, "parentId": parent}
        entry["timestamp"] = timestamp
        for key, value in fields.items():
            if key not in entry:
                entry[key] = value
        existing = self._write(entry, idempotency_key)
        if existing is not None:
            # A retry: the entry that key wrote. Known already, or its acknowledgement was
            # lost before this manager learnt it.
            known = existing.get("id")
            if isinstance(known, str) and known not in self._by_id:
                self._pure = False  # an entry from somewhere in the file
                self._entries.append(existing)
                self._apply(existing)
            return str(known)
        self._entries.append(entry)
        self._apply(entry)
        return ident

    def _new_header(self, timestamp: str) -> Entry:
        return {
            "type": "session",
            "version": 3,
            "id": _io.uuid7(),
            "timestamp": timestamp,
            "cwd": self._cwd if self._cwd is not None else os.getcwd(),
        }

    def _check_appendable(self) -> None:
        if self._not_session is not None:
            raise NotASessionError(self._path, self._not_session)
        if self.needs_migration:
            raise TranscriptNeedsMigrationError(self._path, self._version or 1.0)

    def _write(self, entry: Entry, idempotency_key: str | None = None) -> Entry | None:
        """Writes one entry line (plus the header line when the file is new) with one
        ``os.write`` on an ``O_APPEND`` descriptor, after the one-byte end-of-file check.

        Serialising comes first, so a value JSON cannot hold fails before the file is
        touched; the in-memory model changes only after the write succeeded.

        The end-of-file check: a file that ends in ``\n`` (or is empty) takes the line as
        is (one ``fstat``, one one-byte ``pread``). Otherwise the last line is watched until
        it gains its newline (another writer's append in flight) or holds still
        (``transcript._io.settled_end``); then, if it parses as a JSON object, it is a
        complete entry whose newline is missing and the record is written as ``"\n" +
        line``, in the same single ``os.write``; if it does not, it is torn and the append
        raises ``TornTranscriptError``. A writer that stalls longer than the settle time
        just before its final newline cannot be told from a finished line that lacks one;
        since the rest of such a line can only be whitespace, our separating newline leaves
        at worst a blank line, which every reader skips. The digest rolls over exactly the
        bytes written, separator included.
        """
        self._check_appendable()
        line = _jsonl.dumps_line(entry)
        create = not self._file_known
        if create:
            parent = os.path.dirname(os.path.abspath(self._path))
            os.makedirs(parent, exist_ok=True)
        try:
            # 0o666 and the umask decide, as for any file the process creates with open()
            fd = os.open(self._path, _io.append_flags(create), 0o666)
        except FileExistsError as exc:
            raise FileExistsError(
                errno.EEXIST,
                "transcript was created by another writer after it was opened; reopen it",
                self._path,
            ) from exc
        try:
            self._file_known = True
            if self.writer is None:
                self._put(fd, entry, line, None)
                return None
            with journaled(
                self._path, self.writer, fd, want_keys=idempotency_key is not None
            ) as commit:
                if idempotency_key is not None:
                    hit = commit.find_key(idempotency_key, fd, os.fstat(fd).st_size)
                    if hit is not None:
                        landed = _io.entry_at(fd, hit.start, hit.end)
                        if landed is None:
                            raise TranscriptChangedError(
                                f"the entry at [{hit.start}, {hit.end}) does not parse"
                            )
                        return landed
                self._put(fd, entry, line, commit, idempotency_key)
            return None
        finally:
            os.close(fd)

    def _put(
        self,
        fd: int,
        entry: Entry,
        line: bytes,
        commit: Any,
        idempotency_key: str | None = None,
    ) -> None:
        """The write itself (see ``_write``); with ``commit``, its journal record goes
        first, announcing exactly the bytes written (write-ahead)."""
        # The one-byte check: a file that does not end in a newline ends in a complete
        # entry that lacks it (we write the separator) or in a torn line (refused:
        # appending would glue this record onto it).
        size, clean = _io.settled_end(fd)
        separator = b""
        if not clean:
            offset, _, complete = _io.last_line(fd, size)
            if not complete:
                self._torn = (offset, size - offset)
                raise TornTranscriptError(self._path, offset, size - offset)
            separator = b"\n"
        self._torn = None  # whatever open() saw, the file ends cleanly now
        header: Entry | None = None
        if size == 0:
            if self._header is not None or self._digest_size:
                raise TranscriptChangedError(
                    f"transcript was emptied behind this manager: {self._path}"
                )
            stamp = entry.get("timestamp")
            header = self._new_header(stamp if isinstance(stamp, str) else _io.iso_now())
            data = _jsonl.dumps_line(header) + line
        else:
            data = separator + line
        if commit is not None:
            commit.intent(size, data, idempotency_key)
        _io.write_all(fd, data)
        # Where the bytes landed, read back from the O_APPEND descriptor (exact even
        # when another process appended first): the fence adopts these bytes only.
        end = os.lseek(fd, 0, os.SEEK_CUR)
        if commit is not None:
            commit.landed(end - len(data))
        st = os.fstat(fd)
        after = st.st_size
        OWN_WRITES.record(st.st_dev, st.st_ino, end - len(data), data)
        if header is not None:
            self._header = header
            self._version = float(CURRENT_VERSION)
        # Exactly our bytes between the two stats: the line sits at the old end, so the
        # digest can roll over it without reading anything.
        self._own_bytes_landed(
            entry,
            line,
            data,
            end,
            digest_follows=size == self._digest_size and after == size + len(data),
            model_follows=header is None and end - len(data) == size,
        )

    def _own_bytes_landed(
        self,
        entry: Entry,
        line: bytes,
        data: bytes,
        end: int,
        *,
        digest_follows: bool,
        model_follows: bool,
    ) -> None:
        """Account for an own append whose bytes ``data`` (``line`` and any separator
        before it) now end the file at ``end``: the digest rolls over them when they sit
        where it ended (``digest_follows``); the model stays a reader's view of the file
        when they sit where the model ends (``model_follows`` and no foreign line
        between), else it is no longer pure."""
        if digest_follows:
            if self._digest is not None:
                self._digest.update(data)
            self._digest_size = end
        if self._pure and model_follows and end - len(data) == self._upto:
            ident = entry.get("id")
            self._delta_rows.append((end - len(line), len(line) - 1, entry, ident))
            self._upto = end
            self._tail = (self._tail + data)[-4096:]
            self._clean = end
        else:
            self._pure = False

    # ------------------------------------------------------------------------------------
    # Digest bookkeeping.
    # ------------------------------------------------------------------------------------

    def note_external_bytes(
        self, data: bytes | bytearray | memoryview, offset: int | None = None
    ) -> None:
        """Rolls the digest over ``data``, which the caller knows are the file's bytes
        ``[digest_size, digest_size + len(data))`` (e.g. ``Change.appended`` of a foreign
        append). Nothing is read and nothing is parsed: entries come through
        ``merge_foreign_entries``.

        Pass ``offset`` (where ``data`` starts in the file, e.g. ``change.before.size``) to
        have it checked: ``ValueError`` when it is not ``digest_size``, i.e. when the digest
        is behind (see ``sync_digest``) or the caller's view of the file differs.
        """
        if offset is not None and offset != self._digest_size:
            raise ValueError(
                f"bytes start at offset {offset}, but the digest covers [0, "
                f"{self._digest_size}): {self._path}"
            )
        view = memoryview(data)
        if self._digest is not None:
            self._digest.update(view)
        self._digest_size += view.nbytes

    def sync_digest(self) -> int:
        """Reads whatever the file holds past ``digest_size`` (positionally, nothing else)
        and rolls the digest over it; returns the byte count. ``ValueError`` if the file is
        now shorter than ``digest_size`` (it was truncated: the digest cannot be right)."""
        digest = self.digest
        fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            size = os.fstat(fd).st_size
            if size < self._digest_size:
                raise ValueError(
                    f"transcript is shorter ({size} bytes) than the digested "
                    f"{self._digest_size} bytes: {self._path}"
                )
            offset = self._digest_size
            while offset < size:
                block = _io.pread(fd, min(_io.DEFAULT_CHUNK, size - offset), offset)
                if not block:
                    break
                digest.update(block)
                offset += len(block)
        finally:
            os.close(fd)
        gained = offset - self._digest_size
        self._digest_size = offset
        return gained

    # ------------------------------------------------------------------------------------
    # Torn tail repair.
    # ------------------------------------------------------------------------------------

    def repair_torn_tail(self, *, lock_timeout: float | None = None) -> str | None:
        """Moves a torn last line to ``<file>.torn-<UTC time>`` and truncates the file to
        its last newline; returns the quarantine path, or ``None`` when there is nothing to
        repair: the file ends cleanly, its last line is a complete entry that only lacks its
        newline (that is not torn; the next append adds the newline), or it does not exist.

        It runs under the session write lock: when this process holds it already (e.g. the
        caller's controller), it runs as is; otherwise it takes the lock for its duration
        (``acquire_session_write_lock(path, timeout=lock_timeout)``; ``None``: the lock's
        default timeout), so that no writer following the protocol can append meanwhile.

        The steps, and why nothing appended is ever lost:

        1. the torn bytes ``[offset, size)`` are copied to a new quarantine file (never an
           existing one), written and fsynced with its directory; if that fails (a full
           disk, an I/O error) the partial copy is removed and the transcript is untouched;
        2. ``fstat`` and a re-read check that the file still has exactly ``size`` bytes and
           the same torn bytes. If it grew (an append after the torn line, or the line
           being finished), nothing is truncated, the copy is removed and
           ``TranscriptChangedError`` is raised;
        3. only then ``ftruncate(offset)`` on the same descriptor, then ``fsync``.

        Between the check of step 2 and the truncate of step 3 an append by a writer that
        ignores the lock would be cut; no file operation can close that window, only the
        write lock does, which is why repair holds it. The controller sees the truncation
        as a change like any other.
        """
        if not os.path.lexists(self._path):
            self._torn = None
            return None
        with _write_lock(self._path, lock_timeout):
            return self._repair()

    def _repair(self) -> str | None:
        try:
            fd = os.open(self._path, os.O_RDWR | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            self._torn = None
            return None
        truncated = False
        cutting = False
        target: str | None = None
        offset = size = 0
        try:
            size, clean = _io.settled_end(fd)
            if clean:
                self._torn = None
                return None
            offset, torn, complete = _io.last_line(fd, size)
            if complete:
                self._torn = None  # a whole entry without its newline is not torn
                return None
            # the copy is as readable as the transcript it comes from, no more
            mode = os.fstat(fd).st_mode & 0o777
            target = _io.quarantine_bytes(self._path, torn, mode)
            if os.fstat(fd).st_size != size or _io.read_exact(fd, size - offset, offset) != torn:
                raise TranscriptChangedError(
                    f"transcript changed during torn-tail repair (it grew, or its last line "
                    f"changed); nothing was truncated: {self._path}"
                )
            cutting = True
            os.ftruncate(fd, offset)
            truncated = True
            os.fsync(fd)
        except BaseException:
            if target is not None and not truncated and not (cutting and _cut(fd, size)):
                _io.discard(target)  # the transcript still holds the torn bytes
            raise
        finally:
            os.close(fd)
            if truncated:
                # The file is cut even when fsync then fails: describe it as it is.
                self._torn = None
                self._rewind_digest(offset)
        return target

    def _rewind_digest(self, offset: int) -> None:
        if self._digest_size <= offset:
            return  # the digest never covered the cut bytes
        if self._digest is None:  # computed when asked for: it will cover [0, offset)
            self._digest_size = offset
            return
        if self._clean_digest is not None and self._clean_offset == offset:
            self._digest = self._clean_digest.copy()
        else:
            self._digest = _backend.active().RollingDigest.from_file(self._path, offset)
        self._digest_size = offset
        self._clean_digest = None
        self._clean_offset = None

    # ------------------------------------------------------------------------------------
    # Merging foreign entries (the session-manager side of docs/design.md, "Merge").
    # ------------------------------------------------------------------------------------

    def merge_foreign_entries(
        self,
        entries: Iterable[Mapping[str, Any]],
        persist_leaf: bool = False,
        *,
        appended: bytes | bytearray | memoryview | None = None,
    ) -> MergeResult | None:
        """Adopts entries another writer appended while the lock was released.

        ``entries`` are the parsed objects in file order. Each one is added to the tree on
        the side branch (its in-memory ``parentId`` becomes the current side cursor, which
        then moves to it); the visible leaf never moves. Labels and the session name apply.
        Refused with ``ValueError``, before anything changes: an entry without an id, an id
        already present, a label whose target is unknown, and a ``leaf`` control other
        than a side control that keeps the active branch (``appendMode: "side"``,
        ``targetId`` = the visible leaf, ``parentId`` and ``appendParentId`` = the side
        cursor).

        A reader of the file would take the last non-side merged entry as the leaf (the
        manager tracks that reader's view across merges). With ``persist_leaf=True`` and
        when that view differs from this manager's state, one side
        ``leaf`` control is appended that pins the visible leaf and the side cursor, and the
        result is ``MergeResult(session_file_snapshot=<fingerprint right after that write>,
        published_entries=[{"kind": "id", "id": <control id>}])``. Otherwise ``None``.

        ``appended``: the raw bytes of those lines, if the caller has them; they are passed
        to ``note_external_bytes`` first so the digest stays exact (see the module notes).
        """
        if appended is not None:
            self.note_external_bytes(appended)
        batch = [e if isinstance(e, dict) else dict(e) for e in entries]
        plan = self._plan_merge(batch)
        side = self.side_cursor
        reader_leaf = self._file_leaf
        reader_side = self._file_side
        if plan:
            self._pure = False  # merged entries hang where no reader of the file puts them
        for source, adopted in plan:
            ident: str = source["id"]
            if adopted is None:  # a side leaf control: the cursor stays where it is
                self._entries.append(source)
                self._by_id[ident] = source
                reader_leaf, reader_side = self._leaf, side
                continue
            self._entries.append(adopted)
            self._by_id[ident] = adopted
            side = ident
            # how a reader of the file takes the raw line (the rules of ``_apply``)
            if source.get("type") not in KNOWN_ENTRY_TYPES:
                if "parentId" in source and not isinstance(reader_side, _Unset):
                    reader_side = ident
            elif source.get("appendMode") == "side":
                reader_side = ident
            else:
                reader_leaf, reader_side = ident, _UNSET
            if adopted.get("type") == "label":
                self._apply_label(adopted)
            elif adopted.get("type") == "session_info":
                self._apply_session_info(adopted)
        if not plan:
            return None
        self._side = side
        self._file_leaf, self._file_side = reader_leaf, reader_side
        in_sync = reader_leaf == self._leaf and reader_side == side
        if not persist_leaf or in_sync:
            return None
        if not self._file_known:
            # This manager never saw the file (it was missing at open): it holds no header
            # to write behind, so the caller must reload the file rather than append to it.
            current: Fingerprint = _backend.active().fingerprint(self._path, window=self._window)
            return MergeResult(session_file_snapshot=current, requires_reload=True)
        raw_tail: str = plan[-1][0]["id"]
        control_id = self._append(
            {
                "type": "leaf",
                "parentId": raw_tail,
                "targetId": self._leaf,
                "appendParentId": side,
                "appendMode": "side",
            }
        )
        snapshot: Fingerprint = _backend.active().fingerprint(self._path, window=self._window)
        published: list[PublishedEntry] = [{"kind": "id", "id": control_id}]
        return MergeResult(session_file_snapshot=snapshot, published_entries=published)

    def _plan_merge(self, batch: list[Entry]) -> list[tuple[Entry, Entry | None]]:
        """Checks the whole batch first, so a refusal leaves the model untouched."""
        plan: list[tuple[Entry, Entry | None]] = []
        new_ids: set[str] = set()
        side = self.side_cursor

        def known(ref: object) -> bool:
            return isinstance(ref, str) and (ref in self._by_id or ref in new_ids)

        for source in batch:
            ident = source.get("id")
            if not isinstance(ident, str) or not ident:
                raise ValueError(f"foreign entry has no id: {source!r:.200}")
            if known(ident):
                raise ValueError(f"foreign entry {ident} already exists in the transcript")
            kind = source.get("type")
            if kind == "session":
                raise ValueError(f"foreign entry {ident} is a session header")
            if kind == "leaf":
                target = source.get("targetId")
                append_parent = source.get("appendParentId", target)
                if (
                    source.get("appendMode") != "side"
                    or target != self._leaf
                    or source.get("parentId") != side
                    or append_parent != side
                ):
                    raise ValueError(
                        f"foreign leaf control {ident} would change the active branch "
                        f"(targetId {target!r}, appendParentId {append_parent!r}; visible "
                        f"leaf {self._leaf!r}, side cursor {side!r})"
                    )
                new_ids.add(ident)
                plan.append((source, None))
                continue
            if kind == "label" and not known(source.get("targetId")):
                raise ValueError(
                    f"foreign label {ident} targets unknown entry {source.get('targetId')!r}"
                )
            adopted = dict(source)
            adopted["parentId"] = side
            new_ids.add(ident)
            plan.append((source, adopted))
            side = ident
        return plan


def _cut_context(path: list[Entry]) -> list[Entry]:
    """pi-mono ``buildSessionContext``'s cut of a root-to-leaf path (or of its suffix that
    starts at the first kept entry): the latest compaction, the entries from its first kept
    entry up to it, then the entries after it."""
    at = -1
    for i in range(len(path) - 1, -1, -1):
        if path[i].get("type") == "compaction":
            at = i
            break
    if at < 0:
        return list(path)
    compaction = path[at]
    first_kept = compaction.get("firstKeptEntryId")
    out = [compaction]
    found = False
    for entry in path[:at]:
        if entry.get("id") == first_kept:
            found = True
        if found:
            out.append(entry)
    out.extend(path[at + 1 :])
    return out


def _cut(fd: int, size: int) -> bool:
    """After a failed ``ftruncate``: whether the file may have been cut after all (its size
    is no longer ``size``, or cannot be read), in which case the quarantine copy stays."""
    try:
        return os.fstat(fd).st_size != size
    except OSError:
        return True


@contextlib.contextmanager
def _write_lock(path: str, timeout: float | None) -> Iterator[None]:
    """Holds the session write lock of ``path`` for the block: as is when this process holds
    it already (its owner record names this process), else acquired and released here."""
    from ..lock import acquire_session_write_lock, inspect_lock

    info = inspect_lock(path)
    if info.held and (info.owner or {}).get("pid") == os.getpid():
        yield
        return
    lock = acquire_session_write_lock(path, timeout=timeout)
    try:
        yield
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------
# Migrating a pre-tree (v1) or v2 session to the current format.
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationResult:
    """What ``migrate_transcript`` did.

    ``changed`` is False when the file was current already (nothing written, no backup).
    ``backup`` is the copy of the original bytes beside the transcript. ``entries`` counts
    the entries that got a new ``id``/``parentId``; ``id_map`` maps the old ``id`` of an
    entry that had one (the references replace those too) to its new one; ``kept_lines``
    counts lines kept byte for byte because they are not JSON objects; ``blank_lines``
    the blank lines dropped.
    """

    path: str
    changed: bool
    from_version: float
    to_version: int
    backup: str | None = None
    entries: int = 0
    kept_lines: int = 0
    blank_lines: int = 0
    id_map: dict[str, str] = field(default_factory=dict)


def migrate_transcript(
    path: PathArg, *, lock_timeout: float | None = None, dry_run: bool = False
) -> MigrationResult:
    """Rewrites a pre-tree (v1) or v2 session in the current format (version 3), the way
    pi-mono and openclaw migrate it when they open it, so that appends to it stay valid
    for them afterwards. See ``transcript._io.plan_migration`` for the exact rules (pi-mono
    ``migrateV1ToV2``/``migrateV2ToV3`` in ``packages/coding-agent/src/core/session-manager.ts``).

    Under the session write lock (taken here with ``acquire_session_write_lock(path,
    timeout=lock_timeout)`` unless this process holds it already):

    1. the file is read whole and its migrated form computed; a file already at version 3
       is left alone (``changed=False``);
    2. the original bytes are copied to a new ``<file>.bak-v<N>-<UTC time>`` beside it
       (never an existing file: ``-1``, ``-2``, ... suffixes), fsynced with the directory;
    3. the new bytes go to a temporary file in the same directory (same permissions),
       which is fsynced, checked against the original once more (same inode, size and
       modification time: no writer got in), and renamed over the transcript; the
       directory is fsynced. Readers see the old file or the new one, never a mix.

    A file that is not a session raises ``NotASessionError``; a torn last line
    ``TornTranscriptError`` (``repair_torn_tail()`` first); nothing is written then. Open
    managers of the file must ``reload()`` afterwards (the file was replaced), and a fence
    controller that released the lock around the rewrite reports it as a takeover: migrate
    a session while no agent works on it. ``dry_run=True`` computes the result without
    writing anything (``backup`` stays ``None``).
    """
    raw_path = os.fspath(path)
    text = os.fsdecode(raw_path) if isinstance(raw_path, bytes) else raw_path
    # The lock key: the real path, so a symlink is migrated where it points and stays one.
    from ..lock import lock_path_for

    real, _ = lock_path_for(text)
    os.stat(real)  # a missing file is FileNotFoundError before any lock file is created
    with _write_lock(text, lock_timeout):
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            before = os.fstat(fd)
            raw = _io.read_exact(fd, before.st_size, 0)
        finally:
            os.close(fd)
        try:
            plan = _io.plan_migration(raw)
        except _io.NotASession as exc:
            raise NotASessionError(text, str(exc.args[0])) from None
        except _io.TornTail as exc:
            raise TornTranscriptError(text, exc.args[0], exc.args[1]) from None
        if plan.data is None:
            return MigrationResult(text, False, plan.from_version, CURRENT_VERSION)
        result = MigrationResult(
            text,
            True,
            plan.from_version,
            CURRENT_VERSION,
            entries=plan.entries,
            kept_lines=plan.kept_lines,
            blank_lines=plan.blank_lines,
            id_map=dict(plan.id_map),
        )
        if dry_run:
            return result
        mode = before.st_mode & 0o777
        version = plan.from_version
        shown = str(int(version)) if float(version).is_integer() else "x"
        backup = _io.durable_new_file(f"{real}.bak-v{shown}-{_io.utc_stamp()}", raw, mode)
        try:
            _io.replace_file(real, plan.data, before)
        except BaseException as exc:
            _io.discard(backup)  # the transcript was not replaced: it is its own backup
            if isinstance(exc, _io.ChangedWhileReplacing):
                raise TranscriptChangedError(
                    f"transcript changed while it was being migrated (a writer that ignores "
                    f"the write lock?); nothing was replaced: {text}"
                ) from exc
            raise
        return dataclasses.replace(result, backup=backup)
