"""The fence controller from synchronous code: ``SyncSessionFenceController`` offers every
method of ``SessionFenceController`` as a blocking call (docs/sync.md; the design notes are
in ``sessionfence._sync``)."""

from __future__ import annotations

from ._exports import present_as
from ._sync import SyncCleanupLock, SyncSessionFenceController, SyncWriteScope

__all__ = ["SyncCleanupLock", "SyncSessionFenceController", "SyncWriteScope"]

# The root re-exports the controller: it prints as sessionfence.X, the others as ours.
present_as("sessionfence", [SyncSessionFenceController])
present_as(__name__, [SyncCleanupLock, SyncWriteScope])
