"""The JSONL transcript model (SPEC §6): ``SessionManager``, the compaction guard and the
foreign-entry merge.

A transcript is a header line (``{"type":"session",...}``) and then one compact JSON object
per line, every line ending in ``\\n``. Entries form a tree through ``parentId``; the
*visible leaf* (``leaf_id``) is where the next own append hangs, and a *side cursor* is where
entries merged from other writers hang, so that they never enter the active branch
(reference §5.5).

Notes for the fence controller (everything is O(appended bytes) after ``open``):

- ``manager.parsed_fingerprint`` is the fingerprint (with ``window``) of exactly the bytes
  ``open`` parsed, and ``manager.parsed_digest`` their ``RollingDigest`` (a frozen copy:
  cache or share it as is, ``copy()`` before rolling). Together they seed a fence snapshot
  with no second read of the file.
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
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping
from typing import Any, Final

from . import _jsonl
from . import _transcript_io as _io
from ._controller_registry import session_file_key
from ._merge import MergeResult, PublishedEntry
from ._ownership import LIVE_MANAGERS, OWN_WRITES
from ._transcript_guard import guard_session_manager, is_expected_compaction_append
from ._types import DEFAULT_WINDOW, MISSING, Fingerprint, PathArg
from .errors import TornTranscriptError, UnstableFileError

__all__ = [
    "SessionManager",
    "TranscriptChangedError",
    "guard_session_manager",
    "is_expected_compaction_append",
]

Entry = dict[str, Any]

OPEN_ATTEMPTS: Final = 5


class TranscriptChangedError(RuntimeError):
    """The file changed in a way this manager cannot append to or repair safely (it was
    emptied behind the manager, or it grew while a torn tail was being repaired)."""


class _Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


# The side cursor when no side branch is open: side entries would hang off the leaf.
_UNSET: Final = _Unset()
Cursor = str | None | _Unset


def _backend() -> Any:
    # Resolved at call time so a test that swaps the backend module is honoured.
    import sessionfence

    return sessionfence


def _nonblank(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


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
    - a last line without its newline is a torn tail: ``torn_tail`` gives ``(offset,
      length)``, it is never parsed into the tree (it was not committed), appends raise
      ``TornTranscriptError``, and ``repair_torn_tail()`` moves it aside.

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
    ) -> None:
        raw = os.fspath(path)
        self._path: str = os.fsdecode(raw) if isinstance(raw, bytes) else raw
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        self._window = window
        self._chunk = chunk_size
        self._cwd = cwd
        self._load()
        # The fence asks open managers whether an id exists (a foreign line reusing one
        # is refused), and recognises the lines they wrote as this process's own.
        LIVE_MANAGERS.register(session_file_key(self._path), self)

    @classmethod
    def open(
        cls,
        path: PathArg,
        *,
        window: int = DEFAULT_WINDOW,
        chunk_size: int = _io.DEFAULT_CHUNK,
        cwd: str | None = None,
    ) -> SessionManager:
        """Parses ``path`` (see the class docstring).

        ``window`` is the tail window of ``parsed_fingerprint`` and of the fingerprints
        merges return (use the controller's). ``cwd`` goes into the header written when the
        file is created (default: the process's working directory then).
        """
        return cls(path, window=window, chunk_size=chunk_size, cwd=cwd)

    # ------------------------------------------------------------------------------------
    # Loading.
    # ------------------------------------------------------------------------------------

    def reload(self) -> None:
        """Parses the file again from scratch (the controller's ``reload_session_file``).

        The manager object stays the same, so a guard installed on it stays in force.
        """
        self._load()

    def _reset(self) -> None:
        self._header: Entry | None = None
        self._entries: list[Entry] = []
        self._by_id: dict[str, Entry] = {}
        self._leaf: str | None = None
        self._side: Cursor = _UNSET
        # What a fresh reader of the file would take as leaf and side cursor. Equal to the
        # two above except after merges, which never move this manager's visible leaf.
        self._file_leaf: str | None = None
        self._file_side: Cursor = _UNSET
        self._labels: dict[str, str] = {}
        self._session_name: str | None = None
        self._malformed = 0
        self._invalid_utf8 = 0
        self._torn: tuple[int, int] | None = None
        sf = _backend()
        self._digest = sf.RollingDigest()
        self._digest_size = 0
        # open() keeps the digest of [0, torn offset) so a repair need not re-read the file
        self._clean_digest: Any = None
        self._clean_offset: int | None = None
        self._parsed_fp: Fingerprint = MISSING
        self._parsed_digest: Any = None
        self._file_known = False  # whether the file exists as far as this manager knows

    def _load(self) -> None:
        sf = _backend()
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
                    loaded = _io.parse_fd(fd, self._digest, self._chunk)
            finally:
                os.close(fd)
            after: Fingerprint = sf.fingerprint(self._path, window=self._window)
            # Equal fingerprints (identity, size, both times, tail hash) before and after
            # the read, and as many bytes read as the file holds: the parse describes one
            # state of the file, and parsed_fingerprint names it.
            if after != before or after.size != loaded.size:
                continue
            with _io.gc_paused():  # building the index allocates a lot too
                self._adopt(loaded, after)
            return
        raise UnstableFileError(self._path, OPEN_ATTEMPTS)

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
        entries = self._entries
        apply = self._apply
        for value in loaded.values:
            if value.get("type") == "session":
                if self._header is None:
                    self._header = value
                else:
                    entries.append(value)  # a second header is kept, but is no tree node
                continue
            entries.append(value)
            apply(value)

    def _apply(self, entry: Entry) -> None:
        """Advances the tree state over one entry as a reader of the file sees it."""
        ident = entry.get("id")
        if not isinstance(ident, str) or not ident:
            return
        by_id = self._by_id
        kind = entry.get("type")
        if kind == "leaf":
            self._apply_leaf_control(ident, entry)
            return
        by_id[ident] = entry
        if entry.get("appendMode") == "side":
            self._side = self._file_side = ident
        else:
            self._leaf = self._file_leaf = ident
            self._side = self._file_side = _UNSET
        if kind == "label":
            self._apply_label(entry)
        elif kind == "session_info":
            self._apply_session_info(entry)

    def _apply_leaf_control(self, ident: str, entry: Entry) -> None:
        # A leaf control moves the visible leaf (and the side cursor) without content. One
        # that names an unknown entry, or is not shaped like a control, is ignored, as the
        # original ignores it.
        self._by_id[ident] = entry
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
        """A reference to a leaf control stands for that control's target."""
        seen: set[str] = set()
        while ident is not None and ident not in seen:
            seen.add(ident)
            entry = self._by_id.get(ident)
            if entry is None or entry.get("type") != "leaf":
                return ident
            target = entry.get("targetId")
            ident = target if isinstance(target, str) else None
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
            f"<SessionManager {self._path!r} entries={len(self._entries)} "
            f"leaf={self._leaf!r} digest_size={self._digest_size}>"
        )

    @property
    def header(self) -> Entry | None:
        return self._header

    @property
    def entries(self) -> list[Entry]:
        """Every entry in file order (own appends and merged entries included), without the
        header. A new list each time; the dicts themselves are the model's."""
        return list(self._entries)

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
        """``(offset, length)`` of a last line without its newline, as of ``open`` or the
        last append attempt that found one; ``None`` after a repair."""
        return self._torn

    @property
    def digest(self) -> Any:
        """``RollingDigest`` of the file's bytes ``[0, digest_size)``. The live object: take
        ``.copy()`` before rolling it yourself."""
        return self._digest

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
        rolls it forward must ``copy()`` it first."""
        return self._parsed_digest

    def get_entry(self, entry_id: str) -> Entry | None:
        return self._by_id.get(entry_id)

    def branch(self, leaf_id: str | None = None) -> list[Entry]:
        """Root-to-leaf path ending at ``leaf_id`` (default: the visible leaf).

        Leaf controls on the way stand for their targets and are not listed. An unknown id
        gives ``[]``, as the original's ``getBranch`` does; a parent cycle stops the walk.
        """
        current = self._leaf if leaf_id is None else leaf_id
        path: list[Entry] = []
        seen: set[str] = set()
        while current is not None and current not in seen:
            seen.add(current)
            entry = self._by_id.get(current)
            if entry is None:
                break
            if entry.get("type") == "leaf":
                target = entry.get("targetId")
                current = target if isinstance(target, str) else None
                continue
            path.append(entry)
            parent = entry.get("parentId")
            current = parent if isinstance(parent, str) else None
        path.reverse()
        return path

    def children(self, entry_id: str | None) -> list[Entry]:
        """Entries whose ``parentId`` is ``entry_id`` (``None``: the roots), in file order."""
        return [
            e
            for e in self._entries
            if e.get("type") not in ("leaf", "session") and e.get("parentId") == entry_id
        ]

    # ------------------------------------------------------------------------------------
    # Appending.
    # ------------------------------------------------------------------------------------

    def append_message(self, message: Mapping[str, Any]) -> str:
        """Appends ``{"type":"message", id, parentId, timestamp, message}``; returns the id."""
        return self._append({"type": "message", "message": message})

    def append_compaction(
        self,
        summary: str,
        first_kept_entry_id: str,
        tokens_before: int,
        details: Any = None,
        from_hook: bool = False,
    ) -> str:
        """Appends a ``compaction`` entry. ``details`` is omitted when None and ``fromHook``
        when false (JSON.stringify drops undefined), so default lines match the original."""
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

    def append_custom(self, custom_type: str, data: Any = None) -> str:
        """Appends ``{"type":"custom", customType, data?}`` (persisted, never sent to a model)."""
        fields: Entry = {"type": "custom", "customType": custom_type}
        if data is not None:
            fields["data"] = data
        return self._append(fields)

    def append_label(self, target_id: str, label: str | None) -> str:
        """Labels an existing entry; ``None`` or ``""`` clears its label. ``ValueError`` when
        ``target_id`` is not in the transcript (the original throws too)."""
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

    def append_entry(self, entry: Mapping[str, Any]) -> str:
        """Appends any entry type (``thinking_level_change``, ``model_change``, ...).

        ``type`` is required; ``id``, ``parentId`` and ``timestamp`` are filled in when
        absent (a given ``id`` must be new). ``appendMode: "side"`` moves the side cursor
        instead of the leaf, as it does for a reader of the file.
        """
        kind = entry.get("type")
        if not isinstance(kind, str) or not kind or kind == "session":
            raise ValueError("an entry needs a non-empty string 'type' other than 'session'")
        given = entry.get("id")
        if given is not None and (not isinstance(given, str) or not given):
            raise ValueError("an entry's 'id' must be a non-empty string")
        if isinstance(given, str) and given in self._by_id:
            raise ValueError(f"entry {given} already exists")
        return self._append(dict(entry))

    def _append(self, fields: Entry) -> str:
        ident = fields.get("id")
        if not isinstance(ident, str):
            ident = _io.new_entry_id(self._by_id.__contains__)
        parent = fields.get("parentId", self._leaf)
        timestamp = fields["timestamp"] if "timestamp" in fields else _io.iso_now()
        # Base fields first, in the original's order; the type's own fields follow.
        entry: Entry = {"type": fields["type"], "id": ident, "parentId": parent}
        entry["timestamp"] = timestamp
        for key, value in fields.items():
            if key not in entry:
                entry[key] = value
        self._write(entry)
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

    def _write(self, entry: Entry) -> None:
        """Writes one entry line (plus the header line when the file is new) with one
        ``os.write`` on an ``O_APPEND`` descriptor, after the one-byte torn-tail check.

        Serialising comes first, so a value JSON cannot hold fails before the file is
        touched; the in-memory model changes only after the write succeeded.
        """
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
            # The one-byte check: a file that does not end in a newline has a torn last
            # line, and appending would glue this record onto it.
            size, clean = _io.settled_end(fd)
            if not clean:
                offset = _io.clean_end(fd, size)
                self._torn = (offset, size - offset)
                raise TornTranscriptError(self._path, offset, size - offset)
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
                data = line
            _io.write_all(fd, data)
            # Where the bytes landed, read back from the O_APPEND descriptor (exact even
            # when another process appended first): the fence adopts these bytes only.
            end = os.lseek(fd, 0, os.SEEK_CUR)
            st = os.fstat(fd)
            after = st.st_size
            OWN_WRITES.record(st.st_dev, st.st_ino, end - len(data), data)
        finally:
            os.close(fd)
        if header is not None:
            self._header = header
        # Exactly our bytes between the two stats: the line sits at the old end, so the
        # digest can roll over it without reading anything.
        if size == self._digest_size and after == size + len(data):
            self._digest.update(data)
            self._digest_size = after

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
        self._digest.update(view)
        self._digest_size += view.nbytes

    def sync_digest(self) -> int:
        """Reads whatever the file holds past ``digest_size`` (positionally, nothing else)
        and rolls the digest over it; returns the byte count. ``ValueError`` if the file is
        now shorter than ``digest_size`` (it was truncated: the digest cannot be right)."""
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
                self._digest.update(block)
                offset += len(block)
        finally:
            os.close(fd)
        gained = offset - self._digest_size
        self._digest_size = offset
        return gained

    # ------------------------------------------------------------------------------------
    # Torn tail repair.
    # ------------------------------------------------------------------------------------

    def repair_torn_tail(self) -> str | None:
        """Moves a torn last line to ``<file>.torn-<UTC time>`` and truncates the file to
        its last newline; returns the quarantine path, or ``None`` when the file ends
        cleanly (or does not exist).

        The quarantine file is new (never overwrites), written and fsynced (with its
        directory) before the transcript is truncated, so no byte is ever only in memory.
        If the transcript grew while the copy was made (a live writer), nothing is
        truncated and ``TranscriptChangedError`` names the copy. Run it under the session
        write lock: the controller sees the truncation as a change like any other.
        """
        try:
            fd = os.open(self._path, os.O_RDWR | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            self._torn = None
            return None
        truncated = False
        try:
            size, clean = _io.settled_end(fd)
            if clean:
                self._torn = None
                return None
            offset = _io.clean_end(fd, size)
            torn = _read_exact(fd, size - offset, offset)
            # the copy is as readable as the transcript it comes from, no more
            mode = os.fstat(fd).st_mode & 0o777
            target = _io.quarantine_bytes(self._path, torn, mode)
            if os.fstat(fd).st_size != size:
                raise TranscriptChangedError(
                    f"transcript changed during torn-tail repair; nothing was truncated and "
                    f"the copy is kept at {target}: {self._path}"
                )
            os.ftruncate(fd, offset)
            truncated = True
            os.fsync(fd)
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
        if self._clean_digest is not None and self._clean_offset == offset:
            self._digest = self._clean_digest.copy()
        else:
            self._digest = _backend().RollingDigest.from_file(self._path, offset)
        self._digest_size = offset
        self._clean_digest = None
        self._clean_offset = None

    # ------------------------------------------------------------------------------------
    # Merging foreign entries (reference §5.5, session-manager side).
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
            if source.get("appendMode") == "side":
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
            current: Fingerprint = _backend().fingerprint(self._path, window=self._window)
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
        snapshot: Fingerprint = _backend().fingerprint(self._path, window=self._window)
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


def _read_exact(fd: int, length: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while length > 0:
        block = _io.pread(fd, length, offset)
        if not block:
            raise OSError(errno.EIO, "file shrank while reading its torn tail")
        parts.append(block)
        offset += len(block)
        length -= len(block)
    return b"".join(parts)
