"""Append-only JSONL logs that survive a SIGKILL of their writer.

Every record is one ``os.write`` of one complete line on an ``O_APPEND`` descriptor, so a
process killed at any point leaves whole records behind (or, at worst, one torn last line,
which the reader skips: a record that was not completely written was never acknowledged).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["LogWriter", "read_log", "read_logs"]


class LogWriter:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_log(path: str) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return  # torn by a kill: never acknowledged
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def read_logs(directory: str, prefix: str) -> Iterator[dict[str, Any]]:
    for name in sorted(os.listdir(directory)):
        if name.startswith(prefix) and name.endswith(".jsonl"):
            yield from read_log(os.path.join(directory, name))
