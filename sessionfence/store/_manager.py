"""``SessionManager`` on a PostgreSQL session (``SessionManager.open(id, store=...)``).

The model is the file model, unchanged: it parses a private local copy of the session
(``_mirror.StoreMirror``, the bytes ``export_jsonl`` writes) with the same parser, tree
rules and index, so every reading rule is the file store's. Appends commit in the store
first (``PostgresStore.append``: the writer's claim is checked in the append's own
transaction, so a superseded run's append never commits), then the line that landed goes to
the copy exactly as the store holds it. Lines other writers committed before ours are copied
in front of it, in the store's order, without entering the model: as with a file, they reach
it through the fence's merge callback, ``refresh()`` or ``reload()``.
"""

from __future__ import annotations

import errno
import os
import weakref
from collections.abc import Callable
from typing import Any

from .. import _jsonl
from .._types import DEFAULT_WINDOW
from ..errors import NotASessionError, TranscriptNeedsMigrationError
from ..journal._writer import SessionWriter
from ..transcript import _io
from ..transcript._manager import SessionManager, TranscriptChangedError
from ._mirror import StoreMirror
from ._postgres import PostgresStore, session_label

__all__ = ["StoreSessionManager"]

_KEEP_COPY: weakref.WeakKeyDictionary[Any, StoreMirror] = weakref.WeakKeyDictionary()


class StoreSessionManager(SessionManager):
    """A ``SessionManager`` whose transcript lives in a ``PostgresStore``.

    Everything a file manager reads works the same (``entries``, ``context_entries()``,
    ``branch()``, ``labels``, malformed lines, ...). Appends need a ``writer``: the
    controller's (``writer=ctl.writer``, checked at commit) or a co-tenant
    (``SessionWriter.cotenant(...)``); ``idempotency_key`` works as on files. ``path`` is the
    local copy (private, or kept in the store's ``cache_dir`` between managers: see
    ``StoreMirror``); ``session_id`` and ``store`` name the session. ``close()`` releases
    the copy (so does garbage collection)."""

    def __init__(
        self,
        session_id: str,
        store: PostgresStore,
        *,
        window: int = DEFAULT_WINDOW,
        chunk_size: int = _io.DEFAULT_CHUNK,
        cwd: str | None = None,
        writer: SessionWriter | None = None,
        index: bool | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        if not isinstance(store, PostgresStore):
            raise TypeError(
                "SessionManager is synchronous: open it on a PostgresStore, not "
                f"{type(store).__name__}"
            )
        self._pg = store
        self._session_id = session_id
        self._label = session_label(session_id)
        self._closed = False
        self._mirror = StoreMirror(store, session_id, store.cache_dir)
        self._mirror.sync()
        super().__init__(
            self._mirror.path,
            window=window,
            chunk_size=chunk_size,
            cwd=cwd,
            writer=writer,
            index=index,
            progress=progress,
        )

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def store(self) -> PostgresStore:
        return self._pg

    @property
    def lines_copied(self) -> int:
        """Lines this manager copied from the store (its own appends included): the cost of
        keeping its copy in step (tests and benchmarks)."""
        return self._mirror.lines_copied

    def close(self) -> None:
        """Release the local copy: a private one is removed (entries already read stay
        readable only while the copy exists), the store's ``cache_dir`` copy stays for the
        next manager. Appends and refreshes are refused afterwards. Idempotent."""
        self._closed = True
        self._mirror.close()

    def __repr__(self) -> str:
        return (
            f"<StoreSessionManager {session_label(self._session_id)} "
            f"entries={len(self.entries)} leaf={self.leaf_id!r}>"
        )

    # reading: copy what the store has, then read it as a file ------------------------------

    def _load(self) -> None:
        super()._load()
        if self._base is not None:
            # ``entries`` read the copy back by offset, possibly after this manager is gone:
            # the copy lives as long as the rows that point into it.
            _KEEP_COPY[self._base] = self._mirror

    def reload(self) -> None:
        self._check_open()
        self._mirror.sync()
        super().reload()

    def refresh(self) -> int:
        self._check_open()
        self._mirror.sync()
        return super().refresh()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the manager of {self._label} was closed")

    # appending: the store commits, then the copy follows ---------------------------------

    def _check_appendable(self) -> None:
        # As on files, but the errors name the stored session, not the local copy (a
        # pre-tree session is migrated as a file: export, migrate_transcript, import).
        if self._closed:
            raise ValueError(f"the manager of {self._label} was closed")
        if self._not_session is not None:
            raise NotASessionError(self._label, self._not_session)
        if self.needs_migration:
            error = TranscriptNeedsMigrationError(self._label, self._version or 1.0)
            error.args = (
                "the stored session is a pre-tree (v1) session, which pi-mono and openclaw "
                "rewrite with new entry ids on their next open; nothing was written. Migrate "
                "it as a file (store.export_jsonl, sessionfence migrate FILE, "
                f"store.import_jsonl under a new id): {self._label}",
            )
            raise error

    def _write(self, entry: dict[str, Any], idempotency_key: str | None = None) -> Any:
        self._check_appendable()
        line = _jsonl.dumps_line(entry)  # a value JSON cannot hold fails before the store
        writer = self.writer
        if writer is None:
            raise ValueError(
                "a manager of a stored session appends as a writer: "
                "SessionManager.open(id, store=..., writer=ctl.writer) "
                "or writer=SessionWriter.cotenant(...)"
            )
        if not self._mirror.exists:
            self._create(entry)
        try:
            result = self._pg.append(
                self._session_id, entry, writer=writer, idempotency_key=idempotency_key
            )
        except KeyError:
            raise FileNotFoundError(
                errno.ENOENT, "the session is gone from the store", self._label
            ) from None
        if result.duplicate:
            # A retry: the entry that key wrote, as the store holds it.
            self._mirror.sync()
            stored = self._mirror.line_at(result.seq)
            value = None if stored is None else _io.parse_last_line(stored, False)[0]
            if value is None:
                raise TranscriptChangedError(
                    f"the entry {result.entry_id} of {self._label} does not parse"
                )
            return value
        # The line is committed: whatever happens to the local copy from here on, the append
        # succeeded (raising would invite a retry, a duplicate without a key). A copy that
        # could not follow is copied again at the next sync; the model takes the entry now.
        try:
            self._copy_own(result.seq, line)
            self._adopt_own(entry, line)
        except Exception:
            self._mirror.invalidate()
            self._pure = False
        return None

    def _copy_own(self, seq: int, line: bytes) -> None:
        if seq == self._mirror.seq + 1 and not self._mirror.open_line:
            # Nothing landed between the copy's end and our line: it is the line the store
            # holds (the store encodes the same dict with the same encoder), no read needed.
            self._mirror.append_own(seq, line)
            return
        before = self._mirror.sync(upto=seq)
        if not before or before[-1] != (seq, line[:-1]):
            raise TranscriptChangedError(f"line {seq} of {self._label} is not the one appended")

    def _adopt_own(self, entry: dict[str, Any], line: bytes) -> None:
        """Our line is in the copy; account for it as ``_put`` does for a file write."""
        end = os.path.getsize(self.path)
        start = end - len(line)
        self._own_bytes_landed(
            entry,
            line,
            line,
            end,
            digest_follows=start == self._digest_size,
            model_follows=True,
        )
        self._torn = None
        self._file_known = True

    def _create(self, entry: dict[str, Any]) -> None:
        """First append to a session that did not exist at open: create it with this
        manager's header (another writer creating it first with only its header is fine)."""
        stamp = entry.get("timestamp")
        header = self._new_header(stamp if isinstance(stamp, str) else _io.iso_now())
        try:
            self._pg.create_session(self._session_id, header)
        except FileExistsError:
            self._mirror.sync()
            if self._mirror.seq != 0:
                raise FileExistsError(
                    errno.EEXIST,
                    "session was created by another writer after it was opened; reopen it",
                    self._label,
                ) from None
            self.reload()
            self._check_appendable()
            return
        self._mirror.sync()
        self.reload()
