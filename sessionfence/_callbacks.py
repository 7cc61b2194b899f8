"""What the controller's callers hand it and get back: the merge-callback result, published
entry descriptors, callback types, and calling a callable that may be sync or async."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._types import Fingerprint

__all__ = [
    "MergeCallback",
    "MergeResult",
    "PublishedEntry",
    "Releasable",
    "ReloadCallback",
    "Resolver",
    "call_maybe_async",
]

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


MergeCallback = Callable[[list[Any]], "Awaitable[MergeResult | None] | MergeResult | None"]
ReloadCallback = Callable[[], "Awaitable[None] | None"]
Resolver = Callable[..., "list[PublishedEntry] | None"]


class Releasable(Protocol):
    """What an injected ``acquire`` returns: an object whose ``release()`` is sync or async."""

    def release(self) -> Any: ...


async def call_maybe_async(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; await its result when it is awaitable (sync or async callbacks)."""
    value = fn(*args, **kwargs)
    if inspect.isawaitable(value):
        return await value
    return value
