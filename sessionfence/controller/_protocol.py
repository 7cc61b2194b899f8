"""``FenceController``: what an agent loop uses of a fence controller, on any store.

``SessionFenceController.create(path)`` gives the file controller; with ``store=`` a
PostgreSQL store gives a ``StoreFenceController`` (sessionfence/store/_controller.py) with
the same methods and the same errors. Code written against this protocol runs unchanged on
either store (docs/multihost.md, "The controller and the model on either store"). The file
controller has more (owned file writes, publications, digests, cleanup locks): those are
about files and have no meaning on a database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar, runtime_checkable

from ..errors import SessionTakeoverError
from ..journal._writer import SessionWriter

__all__ = ["FenceController"]

T = TypeVar("T")


@runtime_checkable
class FenceController(Protocol):
    """One attempt's fence on one session: claim at create, write scopes, prompt release
    and reacquire with the fence check, disposal."""

    @property
    def session_file(self) -> str:
        """The transcript's path, or the store's name for the session
        (``postgresql:<id>``): what errors name as ``session_file``."""
        ...

    @property
    def has_takeover(self) -> bool: ...

    @property
    def takeover(self) -> SessionTakeoverError | None: ...

    @property
    def fence_active(self) -> bool: ...

    @property
    def holds_lock(self) -> bool:
        """Whether the attempt holds the session for writing (outside a prompt window)."""
        ...

    @property
    def run_id(self) -> str: ...

    @property
    def revision(self) -> int: ...

    @property
    def writer(self) -> SessionWriter:
        """Give it to the ``SessionManager`` that appends for this run."""
        ...

    def write_lock(self) -> AbstractAsyncContextManager[Any]: ...

    def with_write_lock(
        self, fn: Callable[[], Awaitable[T]] | Callable[[], T]
    ) -> asyncio.Task[T]: ...

    async def release_for_prompt(self) -> None: ...

    async def release_for_abort(self) -> None: ...

    async def reacquire_after_prompt(self) -> None: ...

    def prompt_released(self) -> AbstractAsyncContextManager[None]: ...

    async def dispose(self) -> None: ...
