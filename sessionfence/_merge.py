"""The merge-callback result shared by the transcript model and the controller (SPEC §5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._types import Fingerprint

__all__ = ["MergeResult", "PublishedEntry"]

# {"kind": "id", "id": ...} | {"kind": "serialized", "serialized": line}
# | {"kind": "header", "serialized": line}
PublishedEntry = dict[str, Any]


@dataclass(frozen=True)
class MergeResult:
    """What a merge callback did. A callback that wrote to the transcript must return the
    exact fingerprint it left (``session_file_snapshot``) and the entries it wrote."""

    session_file_snapshot: Fingerprint | None = None
    published_entries: list[PublishedEntry] | None = field(default=None)
    requires_reload: bool = False
