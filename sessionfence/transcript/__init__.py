"""The JSONL transcript model: ``SessionManager``, the compaction guard, the merge of
foreign entries and the migration of pre-tree sessions.

Layout: ``_manager`` (``SessionManager`` and ``migrate_transcript``), ``_io`` (streaming
parse, append flags, quarantine), ``_guard`` (``guard_session_manager``,
``is_expected_compaction_append``).
"""

from __future__ import annotations

from ._manager import (
    CURRENT_VERSION,
    KNOWN_ENTRY_TYPES,
    MigrationResult,
    SessionManager,
    TranscriptChangedError,
    guard_session_manager,
    is_expected_compaction_append,
    migrate_transcript,
)

__all__ = [
    "CURRENT_VERSION",
    "KNOWN_ENTRY_TYPES",
    "MigrationResult",
    "SessionManager",
    "TranscriptChangedError",
    "guard_session_manager",
    "is_expected_compaction_append",
    "migrate_transcript",
]
