"""The JSONL transcript model: ``SessionManager``, the compaction guard, the merge of
foreign entries and the migration of pre-tree sessions.

Layout: ``_manager`` (``SessionManager`` and ``migrate_transcript``), ``_io`` (streaming
parse, append flags, quarantine), ``_guard`` (``guard_session_manager``,
``is_expected_compaction_append``).
"""

from __future__ import annotations

from .. import _LAZY as _ROOT_EXPORTS
from .._exports import present_as
from ._manager import (
    CURRENT_VERSION,
    KNOWN_ENTRY_TYPES,
    ContextModel,
    ContextSettings,
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
    "ContextModel",
    "ContextSettings",
    "MigrationResult",
    "SessionManager",
    "TranscriptChangedError",
    "guard_session_manager",
    "is_expected_compaction_append",
    "migrate_transcript",
]

# Names the package root re-exports print as ``sessionfence.X``, the others as
# ``{__name__}.X`` (see sessionfence/_exports.py).
present_as("sessionfence", [globals()[name] for name in __all__ if name in _ROOT_EXPORTS])
present_as(__name__, [globals()[name] for name in __all__])
