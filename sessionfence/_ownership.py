"""What this process wrote, so the controller adopts its own bytes and nothing else.

``OWN_WRITES`` records every line a ``SessionManager`` of this process appended: the file
(dev, ino), the offset where the bytes landed (read back from the ``O_APPEND`` descriptor,
so it is exact even when another process appended just before) and an XXH3-128 of the
bytes. ``refresh_after_owned_write()`` accepts an appended suffix only when it is exactly a
run of such records (docs/design.md, "Nothing is adopted"); a foreign line before, between
or after ours makes it fall through to the fence check.

``LIVE_MANAGERS`` lets the fence ask whether an entry id already exists in the transcript
(a benign-looking line that reuses an id would shadow an entry for later readers) when a
``SessionManager`` of this process has the file open.

Both are per process and bounded; what they forget can only make the controller stricter
(an own write no longer recognised is judged as a foreign one), never laxer.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Protocol

import xxhash

__all__ = ["LIVE_MANAGERS", "OWN_WRITES", "LiveManagers", "OwnWrites"]

_MAX_FILES = 1024
_MAX_RECORDS_PER_FILE = 4096

FileId = tuple[int, int]


def _digest(data: bytes | memoryview) -> int:
    return int(xxhash.xxh3_128_intdigest(data))


class OwnWrites:
    """Process-wide record of the byte ranges this process appended, per file identity."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: OrderedDict[FileId, OrderedDict[int, tuple[int, int]]] = OrderedDict()

    def record(self, dev: int, ino: int, offset: int, data: bytes) -> None:
        """``data`` was written by this process at ``offset`` of file (dev, ino)."""
        if not data or offset < 0:
            return
        entry = (len(data), _digest(data))
        with self._lock:
            table = self._files.get((dev, ino))
            if table is None:
                table = self._files[(dev, ino)] = OrderedDict()
                while len(self._files) > _MAX_FILES:
                    self._files.popitem(last=False)
            else:
                self._files.move_to_end((dev, ino))
            table[offset] = entry
            table.move_to_end(offset)
            while len(table) > _MAX_RECORDS_PER_FILE:
                table.popitem(last=False)

    def covers(self, dev: int, ino: int, offset: int, data: bytes) -> bool:
        """Whether ``data`` at ``offset`` is exactly a run of recorded own writes."""
        if not data:
            return False
        view = memoryview(data)
        with self._lock:
            table = self._files.get((dev, ino))
            if table is None:
                return False
            pos = 0
            while pos < len(data):
                rec = table.get(offset + pos)
                if rec is None:
                    return False
                length, digest = rec
                if pos + length > len(data) or _digest(view[pos : pos + length]) != digest:
                    return False
                pos += length
            return True

    def reset(self) -> None:
        with self._lock:
            self._files.clear()


class _KnowsIds(Protocol):
    @property
    def digest_size(self) -> int: ...

    def has_entry(self, entry_id: str) -> bool: ...


class LiveManagers:
    """Weak registry of the open ``SessionManager`` objects of this process, by file key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[str, weakref.WeakSet[Any]] = {}

    def register(self, key: str, manager: _KnowsIds) -> None:
        with self._lock:
            managers = self._by_key.get(key)
            if managers is None:
                managers = self._by_key[key] = weakref.WeakSet()
            managers.add(manager)

    def knows_id(self, key: str, entry_id: str, within: int) -> bool:
        """Whether an open manager of ``key`` that knows no more than the file's first
        ``within`` bytes has an entry ``entry_id``. Managers that read or wrote past that
        point are not asked: the id might come from the very lines being judged."""
        with self._lock:
            managers = list(self._by_key.get(key, ()))
        for manager in managers:
            if manager.digest_size > within:
                continue
            try:
                if manager.has_entry(entry_id):
                    return True
            except (OSError, ValueError, RuntimeError):
                # A manager whose file changed under it cannot tell (the fence judges that
                # change on its own); it must not turn a fence check into an error.
                continue
        return False

    def reset(self) -> None:
        with self._lock:
            self._by_key.clear()


OWN_WRITES = OwnWrites()
LIVE_MANAGERS = LiveManagers()
