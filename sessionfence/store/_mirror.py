"""A private local copy of a stored session, kept in step with the store by keyset reads.

A ``SessionManager`` of a PostgreSQL session (``SessionManager.open(id, store=...)``) parses
this copy with the file model's own parser and index, so the tree, the context, torn and
malformed lines and every other reading rule are exactly the file store's: the copy holds
the bytes ``export_jsonl`` would write. It is private to one manager (a temporary directory
removed with it) and never shared with another process or host; the store stays the only
commit point.

Keeping in step costs one statement per call and the new lines only: the session row's
rewrite generation and the lines after the last one copied (keyset on ``(session_id, seq)``),
in batches. When the generation moved (a line was UPDATEd or DELETEd in the store) the copy
is rebuilt from scratch into a new file (temp file + rename), which a reader sees as a
replaced transcript.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from typing import Any

from ._postgres import PostgresStore

__all__ = ["StoreMirror"]

_BATCH = 10_000
_Row = tuple[int, bytes, bool]  # seq, line without newline, whether it ends in one


class StoreMirror:
    """The local JSONL copy of one session of a ``PostgresStore``."""

    def __init__(self, store: PostgresStore, session_id: str) -> None:
        self.store = store
        self.session_id = session_id
        self.directory = tempfile.mkdtemp(prefix="sessionfence-mirror-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.directory, True)
        self.path = os.path.join(self.directory, "session.jsonl")
        self.seq = -1  # the last line copied (-1: none; the header is seq 0)
        self.generation: int | None = None
        self._open_line = False  # the last line copied lacks its newline
        q = store.sql.q
        # One statement, one snapshot: the session row and the lines after the copy's end.
        self._read = (
            "SELECT s.generation, s.last_seq, e.seq, e.line, e.terminated "
            f"FROM {q}.sf_sessions s LEFT JOIN LATERAL ("
            f"SELECT seq, line, terminated FROM {q}.sf_entries e "
            "WHERE e.session_id = s.session_id AND e.seq > %s AND e.seq <= %s "
            "ORDER BY e.seq LIMIT %s) e ON true "
            "WHERE s.session_id = %s ORDER BY e.seq"
        )
        self._line_at = f"SELECT line FROM {q}.sf_entries WHERE session_id = %s AND seq = %s"

    @property
    def exists(self) -> bool:
        return self.generation is not None

    def close(self) -> None:
        """Remove the copy (also done when the mirror is garbage collected)."""
        self._finalizer()

    def _fetch(self, after: int, upto: int) -> tuple[int, int, list[_Row]] | None:
        params = (after, upto, _BATCH, self.session_id)
        rows: list[Any] = self.store._run(lambda c: c.execute(self._read, params).fetchall())
        if not rows:
            return None
        lines = [(int(r[2]), bytes(r[3]), bool(r[4])) for r in rows if r[2] is not None]
        return int(rows[0][0]), int(rows[0][1]), lines

    def sync(self, upto: int | None = None) -> list[tuple[int, bytes]]:
        """Copy the lines the store has past the copy's end (up to ``upto`` inclusive when
        given); returns them ``(seq, line without newline)``. A session gone from the store
        removes the copy; a rewritten one (generation moved, or fewer lines than copied)
        is copied again from the start into a new file that then replaces the old one (a
        new inode: a reader sees a replaced transcript, never a mix of both)."""
        limit = upto if upto is not None else 2**62
        copied: list[tuple[int, bytes]] = []
        target = self.path
        while True:
            got = self._fetch(self.seq, limit)
            if got is None:
                if target != self.path:
                    _unlink(target)
                self._forget()
                return copied
            generation, last_seq, lines = got
            if self.generation is not None and (
                generation != self.generation or last_seq < self.seq
            ):
                target = self.path + ".rebuild"
                _unlink(target)
                self.seq, self.generation, self._open_line = -1, None, False
                copied = []
                continue
            self.generation = generation
            if lines:
                self._write(target, lines)
                copied.extend((seq, line) for seq, line, _ in lines)
            if len(lines) < _BATCH:
                break
        if target != self.path:
            os.replace(target, self.path)
        return copied

    def _write(self, target: str, lines: list[_Row]) -> None:
        parts: list[bytes] = []
        for _, line, terminated in lines:
            if self._open_line:
                parts.append(b"\n")  # as the file store's append separates it
            parts.append(line + b"\n" if terminated else line)
            self._open_line = not terminated
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
        fd = os.open(target, flags, 0o600)
        try:
            data = memoryview(b"".join(parts))
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        self.seq = lines[-1][0]

    @property
    def open_line(self) -> bool:
        """Whether the copy's last line lacks its newline."""
        return self._open_line

    def append_own(self, seq: int, line: bytes) -> None:
        """Copy the line ``seq`` its writer just committed (``line`` with its newline),
        when it directly follows the copy's end."""
        if seq != self.seq + 1 or self._open_line:
            raise ValueError(f"line {seq} does not follow the copy's end ({self.seq})")
        self._write(self.path, [(seq, line[:-1], True)])

    def line_at(self, seq: int) -> bytes | None:
        """The stored line ``seq`` (without newline), read from the store."""
        params = (self.session_id, seq)
        row = self.store._run(lambda c: c.execute(self._line_at, params).fetchone())
        return None if row is None else bytes(row[0])

    def _forget(self) -> None:
        self.generation = None
        self.seq = -1
        self._open_line = False
        _unlink(self.path)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
