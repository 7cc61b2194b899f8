"""The fence's view of the journal: what the records written since it last looked say about
the bytes appended since, and whether its run was superseded (docs/journal.md, "The fence
check with the journal").

``FenceJournal.delta(fenced_size, size)`` costs one ``fstat``-sized look when nobody wrote
a record (the journal's identity and size are unchanged), else one read of the new records.
It never reads the transcript: the controller checks each record's digest against the
appended bytes it reads anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ._file import JournalInvalid, Position, Reader, journal_path_for
from ._format import APPEND, CLAIM, VOID, Record
from ._writer import (
    SessionWriter,
    add_live_run,
    claim_journal,
    clear_fence_slot,
    drop_live_run,
    is_live_peer,
    set_fence_slot,
)

__all__ = ["Delta", "FenceJournal", "Segment"]

SLOT_REFRESH = 256  # records; compaction always keeps KEEP_RECORDS (1024) anyway


@dataclass(frozen=True)
class Segment:
    """Bytes ``[start, end)`` of the transcript and the record that announced them (None:
    no record did: a writer that does not journal, or an intent whose bytes differ)."""

    start: int
    end: int
    record: Record | None = None


@dataclass
class Delta:
    position: Position | None = None
    problem: str | None = None
    superseded_by: tuple[str | None, int] | None = None
    # Over [fenced size, size) when any record announced bytes there; else empty.
    segments: list[Segment] = field(default_factory=list)
    claims: list[Record] = field(default_factory=list)

    @property
    def attributed(self) -> bool:
        return any(s.record is not None for s in self.segments)


class FenceJournal:
    """One controller's reader of its session's journal, and its claim."""

    __slots__ = (
        "_live",
        "_path",
        "_position",
        "_reader",
        "_slot_seq",
        "_token",
        "_transcript",
        "writer",
    )

    def __init__(self, transcript: str, run_id: str) -> None:
        self._transcript = transcript
        self._path = journal_path_for(transcript)
        self.writer = SessionWriter(run_id, role="claimant", revision=0)
        self._position: Position | None = None
        self._token = int.from_bytes(os.urandom(8), "little") or 1
        self._slot_seq: int | None = None
        self._live = False
        self._reader = Reader(self._path)

    @property
    def path(self) -> str:
        return self._path

    @property
    def position(self) -> Position | None:
        return self._position

    def claim(self) -> SessionWriter:
        """Claim the session (the caller holds the write lock); the fence reads the journal
        from right after its own claim."""
        writer, position = claim_journal(self._transcript, self.writer.run_id)
        self.writer = writer
        self._position = position
        add_live_run(self._path, writer.run_id)
        self._live = True
        return writer

    def own_run(self, run_id: str) -> bool:
        """This run, or the run of a live controller of this process (an in-process peer)."""
        return run_id == self.writer.run_id or (self._live and is_live_peer(self._path, run_id))

    def delta(self, fenced_size: int, size: int) -> Delta:
        """What the journal says happened since the fence last looked, for a transcript
        that grew (or not) from ``fenced_size`` to ``size`` bytes."""
        if not self._live:
            return Delta()  # no claim made (journal=False): today's content rules alone
        try:
            found = self._reader.scan(self._position)
        except JournalInvalid as exc:
            return Delta(problem=exc.detail)
        if found is None:  # never claimed through a journal (an injected setup)
            return Delta()
        mine = self.writer
        position = found.position
        delta = Delta(position=position)
        if (position.claim_run, position.claim_revision) != (
            mine.run_id,
            mine.revision,
        ) and not (self._live and is_live_peer(self._path, position.claim_run)):
            delta.superseded_by = (position.claim_run, position.claim_revision)
        spans: list[Record] = []
        for record in found.records:
            if record.type == CLAIM:
                delta.claims.append(record)
            elif record.type == VOID:
                spans = [r for r in spans if r.end <= record.start]
            elif record.type == APPEND and record.end > fenced_size:
                spans.append(record)
        # Checked after the voids: a voided record never counts.
        for record in spans:
            if record.start < fenced_size:
                delta.problem = (
                    f"journal record {record.seq} straddles the fenced end {fenced_size}"
                )
                return delta
        # An intent whose bytes are not (all) there yet: its writer died, or is a writer
        # that ignores the lock. Its bytes, if any, are nobody's.
        spans = [r for r in spans if r.end <= size]
        if not spans:
            return delta
        spans.sort(key=lambda r: r.start)
        at = fenced_size
        for record in spans:
            if record.start < at:
                delta.problem = f"journal records overlap at transcript offset {record.start}"
                return delta
            if record.start > at:
                delta.segments.append(Segment(at, record.start))
            delta.segments.append(Segment(record.start, record.end, record))
            at = record.end
        if at < size:
            delta.segments.append(Segment(at, size))
        return delta

    def advance(self, delta: Delta) -> None:
        if delta.position is not None:
            self._position = delta.position

    def publish_slot(self) -> None:
        """At release: compaction keeps the records this fence will read."""
        if self._position is None:
            return
        seq = self._position.seq
        # A slot that lags is safe (compaction keeps more): refresh it only now and then.
        if self._slot_seq is None or seq - self._slot_seq >= SLOT_REFRESH:
            set_fence_slot(self._transcript, self._token, seq, self.writer.run_id)
            self._slot_seq = seq

    def retire(self) -> None:
        self._reader.close()
        if self._live:
            self._live = False
            drop_live_run(self._path, self.writer.run_id)
        if self._slot_seq is not None:
            clear_fence_slot(self._transcript, self._token)
            self._slot_seq = None
