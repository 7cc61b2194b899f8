"""Explicit ownership on one host: writer claims and the owned-write journal.

Beside each transcript, ``<transcript>.fence`` records who wrote what (docs/journal.md):
every claim of the session by a run (``run_id``, a revision bumped by each new claim, the
run it superseded) and every append by a sessionfence writer (run, role, revision, byte
range, digest, idempotency key), each record chained to the one before. The fence reads
only the records written since it last looked, so a co-tenant's append is accepted without
judging its content, a newer claim is a visible supersession (``SessionSupersededError``),
and bytes nobody journaled go to the content rules as before.

Public: ``SessionWriter`` (who writes), ``claim_session``, ``append_as_cotenant``,
``inspect_journal`` / ``JournalInfo``, ``repair_journal``, ``journal_path_for``.
"""

from __future__ import annotations

from ._api import JournalInfo, append_as_cotenant, claim_session, inspect_journal, repair_journal
from ._file import journal_path_for
from ._writer import SessionWriter, new_run_id

__all__ = [
    "JournalInfo",
    "SessionWriter",
    "append_as_cotenant",
    "claim_session",
    "inspect_journal",
    "journal_path_for",
    "new_run_id",
    "repair_journal",
]
