"""The fence controller: ``SessionFenceController`` and its collaborators.

Layout: ``_controller`` (the controller), ``_scope`` (write scopes), ``_snapshot`` (fence
snapshots: fingerprint + rolling digest), ``_trust`` (the process-wide trust registry and
owned-write history), ``_classify`` (the benign policy and line classification),
``_owner`` (the in-process attempt owner), ``_protocol`` (``FenceController``: what an agent
loop uses, on either store).
"""

from __future__ import annotations

from .. import _LAZY as _ROOT_EXPORTS
from .._exports import present_as
from ._controller import (
    BenignPolicy,
    CleanupLock,
    MergeResult,
    NoopCleanupLock,
    SessionFenceController,
    SessionFileOwner,
    WriteScope,
    acquire_session_file_owner,
    reset_for_tests,
)
from ._protocol import FenceController

__all__ = [
    "BenignPolicy",
    "CleanupLock",
    "FenceController",
    "MergeResult",
    "NoopCleanupLock",
    "SessionFenceController",
    "SessionFileOwner",
    "WriteScope",
    "acquire_session_file_owner",
    "reset_for_tests",
]

# Names the package root re-exports print as ``sessionfence.X``, the others as
# ``{__name__}.X`` (see sessionfence/_exports.py).
present_as("sessionfence", [globals()[name] for name in __all__ if name in _ROOT_EXPORTS])
present_as(__name__, [globals()[name] for name in __all__])
