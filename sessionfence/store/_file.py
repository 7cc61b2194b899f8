"""The file store: today's JSONL transcripts, write lock and owned-write journal, behind the
store interface. Nothing here changes how they behave; it only adapts the existing API
(``claim_session``, ``append_as_cotenant``, ``SessionManager``, ``SessionFenceController``)
to ``SessionStore`` / ``StoreFence``. One host: the embedded default.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

from .._callbacks import MergeResult, call_maybe_async
from .._jsonl import dumps_line
from ..controller import SessionFenceController
from ..controller._classify import BenignPolicy
from ..journal import SessionWriter, append_as_cotenant, claim_session
from ..transcript import SessionManager
from ._base import AppendResult, MergeFn

__all__ = ["FileFence", "FileStore"]

_SESSION_ID = re.compile(r"[A-Za-z0-9._-]{1,200}\Z")


class FileStore:
    """Sessions as ``<root>/<session_id>.jsonl`` files (with their ``.lock`` and ``.fence``
    sidecars). ``AppendResult.seq`` is -1: files do not number their lines."""

    kind = "file"

    def __init__(self, root: str | os.PathLike[str], *, lock_timeout: float = 60.0) -> None:
        self.root = os.fspath(root)
        self.lock_timeout = lock_timeout
        os.makedirs(self.root, exist_ok=True)

    def path(self, session_id: str) -> str:
        if not _SESSION_ID.match(session_id) or session_id in (".", ".."):
            raise ValueError(f"session id must match [A-Za-z0-9._-]+, not {session_id!r}")
        return os.path.join(self.root, session_id + ".jsonl")

    def create_session(self, session_id: str, header: Mapping[str, Any] | None = None) -> None:
        from ._postgres import default_header  # pure helpers; psycopg is not imported

        value = dict(header) if header is not None else default_header()
        if value.get("type") != "session":
            raise ValueError("a session header needs type 'session'")
        with open(self.path(session_id), "xb") as f:
            f.write(dumps_line(value))

    def claim(self, session_id: str, run_id: str | None = None) -> SessionWriter:
        return claim_session(self.path(session_id), run_id=run_id, timeout=self.lock_timeout)

    def append(
        self,
        session_id: str,
        entry: Mapping[str, Any],
        *,
        writer: SessionWriter,
        idempotency_key: str | None = None,
    ) -> AppendResult:
        """A co-tenant appends as ``append_as_cotenant`` does (reads only the file's end); a
        claimant through a ``SessionManager`` (which parses the file) under the write lock."""
        if writer.role == "co-tenant":
            ident = append_as_cotenant(
                self.path(session_id),
                entry,
                writer=writer,
                idempotency_key=idempotency_key,
                timeout=self.lock_timeout,
            )
            return AppendResult(ident, -1)
        from ..lock import acquire_session_write_lock

        path = self.path(session_id)
        with acquire_session_write_lock(path, timeout=self.lock_timeout):
            manager = SessionManager.open(path, writer=writer)
            ident = manager.append_entry(entry, idempotency_key=idempotency_key)
        return AppendResult(ident, -1)

    def append_as_cotenant(
        self,
        session_id: str,
        entry: Mapping[str, Any],
        *,
        writer: SessionWriter | str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        return append_as_cotenant(
            self.path(session_id),
            entry,
            writer=writer,
            idempotency_key=idempotency_key,
            timeout=self.lock_timeout,
        )

    def append_unfenced(self, session_id: str, line: bytes) -> None:
        """An ``O_APPEND`` write without the lock or the journal, as another tool makes."""
        data = line if line.endswith(b"\n") else line + b"\n"
        fd = os.open(self.path(session_id), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def read_lines(self, session_id: str) -> list[bytes]:
        with open(self.path(session_id), "rb") as f:
            return f.read().splitlines(keepends=True)

    def export_jsonl(self, session_id: str, dest: str) -> int:
        tmp = f"{dest}.tmp-{os.getpid()}"
        shutil.copyfile(self.path(session_id), tmp)
        os.replace(tmp, dest)
        return os.path.getsize(dest)

    def import_jsonl(self, session_id: str, src: str) -> int:
        path = self.path(session_id)
        with open(src, "rb") as f:
            data = f.read()
        with open(path, "xb") as out:
            out.write(data)
        return len(data.splitlines())

    async def open_fence(
        self,
        session_id: str,
        *,
        run_id: str | None = None,
        benign_policy: BenignPolicy | None = None,
        merge_foreign_entries: MergeFn | None = None,
    ) -> FileFence:
        return await FileFence.open(
            self.path(session_id),
            run_id=run_id,
            benign_policy=benign_policy,
            merge_foreign_entries=merge_foreign_entries,
            lock_timeout=self.lock_timeout,
        )

    def close(self) -> None:
        pass


class FileFence:
    """``SessionFenceController`` + the ``SessionManager`` that appends for its run, as a
    ``StoreFence``. ``controller`` and ``manager`` are there for everything else."""

    def __init__(self, controller: SessionFenceController, manager: SessionManager) -> None:
        self.controller = controller
        self.manager = manager

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        run_id: str | None = None,
        benign_policy: BenignPolicy | None = None,
        merge_foreign_entries: MergeFn | None = None,
        lock_timeout: float | None = None,
    ) -> FileFence:
        manager = SessionManager.open(path)
        user = merge_foreign_entries

        async def merge(entries: list[Any]) -> MergeResult | None:
            result = manager.merge_foreign_entries(entries)
            if user is not None:
                await call_maybe_async(user, list(entries))
            return result

        ctl = await SessionFenceController.create(
            path,
            run_id=run_id,
            benign_policy=benign_policy,
            merge_foreign_entries=merge,
            reload_session_file=manager.reload,
            timeout=lock_timeout,
        )
        manager.writer = ctl.writer
        return cls(ctl, manager)

    @property
    def run_id(self) -> str:
        return self.controller.run_id

    @property
    def revision(self) -> int:
        return self.controller.revision

    @property
    def writer(self) -> SessionWriter:
        return self.controller.writer

    async def append(self, entry: Mapping[str, Any], *, idempotency_key: str | None = None) -> str:
        async with self.controller.write_lock():
            ident = self.manager.append_entry(entry, idempotency_key=idempotency_key)
        return ident

    async def release_for_prompt(self) -> None:
        await self.controller.release_for_prompt()

    async def reacquire_after_prompt(self) -> None:
        await self.controller.reacquire_after_prompt()

    async def dispose(self) -> None:
        await self.controller.dispose()
