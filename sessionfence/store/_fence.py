"""The fence of the PostgreSQL store: the file store's semantics on a table.

``PostgresFence`` claims the session (``sf_claim``), appends as the claimant (``sf_append``:
the claim is checked in the append's own transaction, so a superseded run's append never
commits) and, at every check, reads the claim row and the lines after the last one it saw
in one statement (keyset on ``(session_id, seq)``: O(new lines) whatever the session's
length). It judges them as ``SessionFenceController`` judges journaled appends
(docs/journal.md, "The fence check with the journal"):

- a newer claim: ``SessionSupersededError`` (reason ``superseded``), sticky;
- a line UPDATEd or DELETEd (the rewrite generation moved): takeover ``rewritten``, or
  ``truncated`` when the session's end moved back; the session row gone: ``deleted``;
- this run's own lines: owned, nothing to judge;
- a co-tenant's lines: accepted as its owned writes are (``classify_lines`` in owned mode:
  any valid line, no malformed message), handed to the merge callback;
- lines nobody claims (``append_unfenced``, imported lines): through the ``BenignPolicy``
  exactly as the file store's unjournaled bytes, size cap and id reuse included; anything
  it refuses is a takeover ``foreign-append``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from .._callbacks import call_maybe_async
from ..controller._classify import (
    BenignPolicy,
    Classified,
    Line,
    Rejected,
    classify_lines,
    split_lines,
)
from ..errors import SessionSupersededError, SessionTakeoverError
from ..journal._writer import SessionWriter, new_run_id
from ._base import MergeFn
from ._postgres import FENCE_BATCH, AsyncPostgresStore, StoredLine, session_label

__all__ = ["PostgresFence"]

OWNED, COTENANT, UNOWNED = "owned", "co-tenant", "unowned"


def _class_of(line: StoredLine, run_id: str) -> str:
    if line.role == "claimant" and line.writer_run_id == run_id:
        return OWNED
    if line.role == "co-tenant":
        return COTENANT
    return UNOWNED  # unfenced, imported, or a claimant line of another run


class PostgresFence:
    """One run's fence on one session of a ``PostgresStore`` (``store.open_fence``)."""

    def __init__(
        self,
        store: AsyncPostgresStore,
        session_id: str,
        writer: SessionWriter,
        policy: BenignPolicy,
        merge: MergeFn | None,
        owns_store: bool,
    ) -> None:
        self._store = store
        self._session_id = session_id
        self._label = session_label(session_id)
        self._writer = writer
        self._policy = policy
        self._merge = merge
        self._owns_store = owns_store
        self._seq = -1
        self._generation = 0
        self._leaf: str | None = None
        self._takeover: SessionTakeoverError | None = None
        self._disposed = False
        # One check at a time: two overlapping checks (a write scope's and the reacquire's
        # in one prompt window) would read from the same position and merge lines twice.
        self._checking = asyncio.Lock()
        self.lines_read = 0  # lines the checks read (O(new lines): tests and benchmarks)

    @classmethod
    async def open(
        cls,
        store: AsyncPostgresStore,
        session_id: str,
        *,
        run_id: str | None = None,
        benign_policy: BenignPolicy | None = None,
        merge_foreign_entries: MergeFn | None = None,
        owns_store: bool = False,
    ) -> PostgresFence:
        run = run_id if run_id else new_run_id()
        writer, row = await store._claim(session_id, run, None, True)
        fence = cls(
            store,
            session_id,
            writer,
            benign_policy if benign_policy is not None else BenignPolicy(),
            merge_foreign_entries,
            owns_store,
        )
        # The claim's own snapshot: the session's end and generation when it committed.
        fence._seq = int(row[4])
        fence._leaf = row[5]
        fence._generation = int(row[6])
        return fence

    # state ------------------------------------------------------------------------------------

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def run_id(self) -> str:
        return self._writer.run_id

    @property
    def revision(self) -> int:
        return self._writer.revision

    @property
    def writer(self) -> SessionWriter:
        return self._writer

    @property
    def last_seq(self) -> int:
        """The last line the fence has judged."""
        return self._seq

    @property
    def takeover(self) -> SessionTakeoverError | None:
        return self._takeover

    def _fail(self, reason: str, phase: str, detail: str) -> SessionTakeoverError:
        error = SessionTakeoverError(self._label, phase, reason, None, None, detail)
        if self._takeover is None:
            self._takeover = error
        return error

    # writes -----------------------------------------------------------------------------------

    async def append(self, entry: Mapping[str, Any], *, idempotency_key: str | None = None) -> str:
        """Append ``entry`` as this run; its parent is this run's leaf (the entry it last
        appended, or the session's last entry when it claimed). Refused with
        ``SessionSupersededError`` (nothing written) once another run claimed the session;
        the refusal is sticky, as a takeover is."""
        if self._takeover is not None:
            raise self._takeover
        fields = dict(entry)
        fields.setdefault("parentId", self._leaf)
        try:
            result = await self._store.append(
                self._session_id, fields, writer=self._writer, idempotency_key=idempotency_key
            )
        except SessionSupersededError as exc:
            if self._takeover is None:
                self._takeover = exc
            raise
        if fields.get("appendMode") != "side":
            self._leaf = result.entry_id
        return result.entry_id

    # the fence check --------------------------------------------------------------------------

    async def release_for_prompt(self) -> None:
        """Nothing to release: there is no lock. The next check reads from where the last
        one stopped."""
        if self._takeover is not None:
            raise self._takeover

    async def reacquire_after_prompt(self) -> None:
        await self.check("prompt_reacquire")

    async def check(self, phase: str = "fence_check") -> None:
        """Judge every line written since the last check (see the module docstring)."""
        async with self._checking:
            await self._check(phase)

    async def _check(self, phase: str) -> None:
        if self._takeover is not None:
            raise self._takeover
        if self._disposed:
            raise RuntimeError("the fence was disposed")
        while True:
            read = await self._store.fence_read(self._session_id, self._seq)
            if read is None:
                raise self._fail("deleted", phase, "the session is gone from the store")
            if read.writer_run_id != self.run_id or read.revision != self.revision:
                error = SessionSupersededError(
                    self._label,
                    phase,
                    self.run_id,
                    self.revision,
                    read.writer_run_id,
                    read.revision,
                )
                if self._takeover is None:
                    self._takeover = error
                raise error
            if read.generation != self._generation:
                reason = "truncated" if read.last_seq < self._seq else "rewritten"
                raise self._fail(
                    reason, phase, "lines of the session were updated or deleted in the store"
                )
            self.lines_read += len(read.lines)
            if read.lines:
                await self._judge(read.lines, phase)
                self._seq = read.lines[-1].seq
            if len(read.lines) < FENCE_BATCH:
                return

    async def _judge(self, lines: list[StoredLine], phase: str) -> None:
        run = self.run_id
        unowned = [ln for ln in lines if _class_of(ln, run) == UNOWNED]
        known: set[str] = set()
        if unowned:
            size = sum(len(ln.line) + 1 for ln in unowned)
            if size > self._policy.max_unowned_append_bytes:
                raise self._fail(
                    "foreign-append",
                    phase,
                    f"unowned append of {size} bytes exceeds "
                    f"{self._policy.max_unowned_append_bytes} bytes",
                )
            ids = [ln.entry_id for ln in unowned if ln.entry_id]
            if ids:
                known = await self._store.known_ids(self._session_id, ids, self._seq)
        seen_before: set[str] = set(known)
        entries: list[Any] = []
        kinds: set[str] = set()
        # Consecutive lines of one class are one segment, as one journal record's bytes are.
        segments: list[tuple[str, list[StoredLine]]] = []
        for ln in lines:
            cls = _class_of(ln, run)
            if segments and segments[-1][0] == cls:
                segments[-1][1].append(ln)
            else:
                segments.append((cls, [ln]))
        for cls, seg in segments:
            if cls == OWNED:
                seen_before.update(ln.entry_id for ln in seg if ln.entry_id)
                continue
            parsed: list[Line] = []
            for ln in seg:
                split = split_lines(ln.line + b"\n", ln.seq)
                assert not isinstance(split, Rejected)  # a stored line always ends here
                parsed.extend(split)
            if not parsed:
                continue  # blank lines only
            result: Classified | Rejected
            if cls == COTENANT:
                result = classify_lines(parsed, policy=None)
            else:
                result = classify_lines(
                    parsed, policy=self._policy, known_id=frozenset(seen_before).__contains__
                )
                if not isinstance(result, Rejected):
                    kinds.add(result.kind)
            if isinstance(result, Rejected):
                at = f" (line {result.offset})" if result.offset is not None else ""
                raise self._fail("foreign-append", phase, result.detail + at)
            entries.extend(result.entries)
            seen_before.update(ln.entry_id for ln in seg if ln.entry_id)
        has_merge = self._merge is not None
        for kind in kinds:
            if not self._policy.accepts(kind, has_merge_callback=has_merge):
                raise self._fail("foreign-append", phase, f"{kind} entries need a merge callback")
        if entries and self._merge is not None:
            try:
                await call_maybe_async(self._merge, list(entries))
            except asyncio.CancelledError:
                raise  # the caller's cancellation, not a verdict on the lines
            except BaseException as exc:
                self._fail("merge-rejected", phase, f"merge callback failed: {exc!r}")
                raise

    async def dispose(self) -> None:
        if self._disposed:
            return
        self._disposed = True
        if self._owns_store:
            await self._store.aclose()

    def __repr__(self) -> str:
        return (
            f"<PostgresFence {self._session_id!r} run={self.run_id!r} "
            f"revision={self.revision} seq={self._seq}>"
        )
