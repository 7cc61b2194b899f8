"""A private local copy of a stored session, kept in step with the store by keyset reads.

A ``SessionManager`` of a PostgreSQL session (``SessionManager.open(id, store=...)``) parses
this copy with the file model's own parser and index, so the tree, the context, torn and
malformed lines and every other reading rule are exactly the file store's: the copy holds
the bytes ``export_jsonl`` would write. It is private to one manager at a time (a temporary
directory removed with it, or a copy kept in the store's ``cache_dir`` under an OS lock) and
never shared with another host; the store stays the only commit point.

Keeping in step costs one statement per call and the new lines only: the session row's
rewrite generation and the lines after the last one copied (keyset on ``(session_id, seq)``),
in batches. When the generation moved (a line was UPDATEd or DELETEd in the store) the copy
is rebuilt from scratch into a new file (temp file + rename), which a reader sees as a
replaced transcript.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from typing import Any

from ..lock import _os
from ._postgres import PostgresStore

__all__ = ["StoreMirror"]

_BATCH = 10_000
_Row = tuple[int, bytes, bool]  # seq, line without newline, whether it ends in one


class StoreMirror:
    """The local JSONL copy of one session of a ``PostgresStore``.

    Without ``cache_dir`` the copy lives in a private temporary directory, removed with the
    mirror. With ``cache_dir`` it is kept there between managers and processes of one host
    (``<cache_dir>/<hash>.jsonl``, its index and a ``.state`` file), so the next manager
    copies only the lines added since, and its index makes the parse O(new lines) too. One
    manager at a time uses a cached copy (an OS lock on ``.lock``, held while it lives);
    another one meanwhile gets a private temporary copy. A cached copy is resumed only when
    its state names this store, schema and session, matches the file (size, identity), the
    session's rewrite generation has not moved and the line it ends with is the stored one;
    any doubt copies the session again (time, never a wrong answer)."""

    def __init__(self, store: PostgresStore, session_id: str, cache_dir: str | None = None) -> None:
        self.store = store
        self.session_id = session_id
        self.seq = -1  # the last line copied (-1: none; the header is seq 0)
        self.generation: int | None = None
        # When the session row was made: a session deleted and made again under the same
        # id starts its generation again, this tells the two apart.
        self.born: str | None = None
        self._open_line = False  # the last line copied lacks its newline
        # (dev, ino, size, mtime_ns) of the copy as this mirror last left it: anything else
        # touched it (e.g. a migration run on the copy) and it is copied again.
        self._stat: tuple[int, int, int, int] | None = None
        self._doubt = False
        self.lines_copied = 0  # lines read from the store into the copy (tests, benchmarks)
        q = store.sql.q
        # One statement, one snapshot: the session row and the lines after the copy's end.
        self._read = (
            "SELECT s.generation, s.last_seq, s.created_at, e.seq, e.line, e.terminated "
            f"FROM {q}.sf_sessions s LEFT JOIN LATERAL ("
            f"SELECT seq, line, terminated FROM {q}.sf_entries e "
            "WHERE e.session_id = s.session_id AND e.seq > %s AND e.seq <= %s "
            "ORDER BY e.seq LIMIT %s) e ON true "
            "WHERE s.session_id = %s ORDER BY e.seq"
        )
        self._line_at = f"SELECT line FROM {q}.sf_entries WHERE session_id = %s AND seq = %s"
        self._resume = (
            f"SELECT s.generation, s.last_seq, s.created_at, e.line FROM {q}.sf_sessions s "
            f"LEFT JOIN {q}.sf_entries e ON e.session_id = s.session_id AND e.seq = %s "
            "WHERE s.session_id = %s"
        )
        self._state_path: str | None = None
        self._finalizer: weakref.finalize[Any, Any]
        if cache_dir is not None and self._take_cached(os.fspath(cache_dir)):
            return
        self.directory = tempfile.mkdtemp(prefix="sessionfence-mirror-")
        self._finalizer = weakref.finalize(self, _remove_tree, os.getpid(), self.directory)
        self.path = os.path.join(self.directory, "session.jsonl")

    # the cached copy --------------------------------------------------------------------

    def _take_cached(self, cache_dir: str) -> bool:
        """Use the cached copy if no other manager does (its lock), resuming it if it
        proves it is a prefix of the session; False: it is busy."""
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        name = f"{self.store.label}\0{self.store.schema}\0{self.session_id}"
        stem = os.path.join(cache_dir, hashlib.sha256(name.encode()).hexdigest()[:32])
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(stem + ".lock", flags, 0o600)
        try:
            if not _os.try_lock(fd):
                os.close(fd)
                return False
        except BaseException:
            os.close(fd)
            raise
        self.directory = cache_dir
        self.path = stem + ".jsonl"
        self._state_path = stem + ".state"
        # Closing the descriptor releases the lock; the copy and its state stay.
        self._finalizer = weakref.finalize(self, os.close, fd)
        if not self._resume_state(name):
            _unlink(self.path)
            self.seq, self.generation, self._open_line = -1, None, False
        return True

    def _resume_state(self, name: str) -> bool:
        try:
            with open(self._state_path or "", encoding="utf-8") as f:
                state = json.load(f)
            st = os.stat(self.path)
        except (OSError, ValueError):
            return False
        if not isinstance(state, dict) or state.get("name") != name:
            return False
        if [state.get(k) for k in ("size", "dev", "ino", "mtime_ns")] != [
            st.st_size,
            st.st_dev,
            st.st_ino,
            st.st_mtime_ns,
        ]:
            return False
        seq, generation = state.get("seq"), state.get("generation")
        open_line = state.get("open_line")
        if not isinstance(seq, int) or not isinstance(generation, int) or seq < 0:
            return False
        params = (seq, self.session_id)
        row = self.store._run(lambda c: c.execute(self._resume, params).fetchone())
        if (
            row is None
            or int(row[0]) != generation
            or int(row[1]) < seq
            or str(row[2]) != state.get("born")
            or row[3] is None
        ):
            return False
        last = bytes(row[3]) + (b"" if open_line else b"\n")
        with open(self.path, "rb") as f:
            f.seek(max(0, st.st_size - len(last)))
            if f.read() != last:
                return False
        self.seq, self.generation, self._open_line = seq, generation, bool(open_line)
        self.born = str(row[2])
        self._stat = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return True

    def _save_state(self) -> None:
        if self._state_path is None:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            _unlink(self._state_path)
            return
        name = f"{self.store.label}\0{self.store.schema}\0{self.session_id}"
        state = {
            "name": name,
            "seq": self.seq,
            "generation": self.generation,
            "born": self.born,
            "open_line": self._open_line,
            "mtime_ns": st.st_mtime_ns,
            "size": st.st_size,
            "dev": st.st_dev,
            "ino": st.st_ino,
        }
        tmp = self._state_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(tmp, self._state_path)

    @property
    def cached(self) -> bool:
        """Whether this copy is the kept one of ``cache_dir`` (else a private one)."""
        return self._state_path is not None

    @property
    def exists(self) -> bool:
        return self.generation is not None

    def close(self) -> None:
        """Release the copy: a private one is removed, a cached one stays for the next
        manager (its state written, then its lock released). Garbage collection releases
        it too, without writing the state: the next manager then copies the session again
        (the state is written only here, not at every append: a copy whose state is stale
        is never resumed)."""
        if self._finalizer.alive and self._state_path is not None:
            with contextlib.suppress(OSError):
                self._save_state()
        self._finalizer()

    def _fetch(self, after: int, upto: int) -> tuple[int, int, str, list[_Row]] | None:
        params = (after, upto, _BATCH, self.session_id)
        rows: list[Any] = self.store._run(lambda c: c.execute(self._read, params).fetchall())
        if not rows:
            return None
        lines = [(int(r[3]), bytes(r[4]), bool(r[5])) for r in rows if r[3] is not None]
        return int(rows[0][0]), int(rows[0][1]), str(rows[0][2]), lines

    def _copy_stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def invalidate(self) -> None:
        """The copy may not be what the store holds (a write to it failed): the next sync
        copies the session again."""
        self._doubt = True

    def sync(self, upto: int | None = None) -> list[tuple[int, bytes]]:
        """Copy the lines the store has past the copy's end (up to ``upto`` inclusive when
        given); returns them ``(seq, line without newline)``. A session gone from the store
        removes the copy; a rewritten one (generation moved, or fewer lines than copied)
        is copied again from the start into a new file that then replaces the old one (a
        new inode: a reader sees a replaced transcript, never a mix of both)."""
        limit = upto if upto is not None else 2**62
        copied: list[tuple[int, bytes]] = []
        target = self.path
        if self.generation is not None and (self._doubt or self._copy_stat() != self._stat):
            target = self._start_over()
        while True:
            got = self._fetch(self.seq, limit)
            if got is None:
                if target != self.path:
                    _unlink(target)
                self._forget()
                return copied
            generation, last_seq, born, lines = got
            if self.generation is not None and (
                generation != self.generation or last_seq < self.seq or born != self.born
            ):
                target = self._start_over()
                copied = []
                continue
            self.generation, self.born = generation, born
            if lines:
                self._write(target, lines)
                copied.extend((seq, line) for seq, line, _ in lines)
            if len(lines) < _BATCH:
                break
        if target != self.path:
            if not os.path.exists(target):  # the session holds no line at all now
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o600))
            os.replace(target, self.path)
        self._stat = self._copy_stat()
        return copied

    def _start_over(self) -> str:
        """Copy the session again, into a new file (returned) that replaces the copy."""
        target = self.path + ".rebuild"
        _unlink(target)
        self.seq, self.generation, self.born, self._open_line = -1, None, None, False
        self._doubt = False
        return target

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
        self.lines_copied += len(lines)

    @property
    def open_line(self) -> bool:
        """Whether the copy's last line lacks its newline."""
        return self._open_line

    def append_own(self, seq: int, line: bytes) -> None:
        """Copy the line ``seq`` its writer just committed (``line`` with its newline),
        when it directly follows the copy's end."""
        if seq != self.seq + 1 or self._open_line:
            raise ValueError(f"line {seq} does not follow the copy's end ({self.seq})")
        if self._doubt or self._copy_stat() != self._stat:
            raise ValueError("the copy changed behind this mirror")
        self._write(self.path, [(seq, line[:-1], True)])
        self._stat = self._copy_stat()

    def line_at(self, seq: int) -> bytes | None:
        """The stored line ``seq`` (without newline), read from the store."""
        params = (self.session_id, seq)
        row = self.store._run(lambda c: c.execute(self._line_at, params).fetchone())
        return None if row is None else bytes(row[0])

    def _forget(self) -> None:
        self.generation = None
        self.born = None
        self.seq = -1
        self._open_line = False
        self._stat = None
        _unlink(self.path)
        self._save_state()  # no copy: no state


def _remove_tree(pid: int, directory: str) -> None:
    """Remove a private copy's directory, in the process that made it only (a forked child
    exiting must not take its parent's copy away)."""
    if os.getpid() == pid:
        shutil.rmtree(directory, True)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
