"""The compaction guard (docs/design.md, "Compaction guard"): ``guard_session_manager`` and
the validator it hands to ``with_compaction_persistence``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import _jsonl

__all__ = [
    "GUARD_ATTRIBUTE",
    "GuardOptions",
    "guard_session_manager",
    "is_expected_compaction_append",
]

GUARD_ATTRIBUTE = "sessionfence_guard"

# with_compaction_persistence(append, validate_append) -> entry id; the controller's
# owned_file_write has exactly this shape.
CompactionPersistence = Callable[[Callable[[], Any], Callable[[Any, str], bool]], Any]

M = TypeVar("M")


def is_expected_compaction_append(entry_id: object, appended_text: str | bytes) -> bool:
    """Did an owned compaction write append exactly its own line?

    Exactly one non-empty line after trimming (JavaScript ``trim()`` rules, U+FEFF
    included) holding a JSON object with ``type == "compaction"`` and ``id == entry_id``.
    Anything else, including a second line, invalid JSON or ``NaN``, is ``False``.
    """
    if isinstance(appended_text, (bytes, bytearray, memoryview)):
        appended_text = bytes(appended_text).decode("utf-8", "replace")
    if not isinstance(appended_text, str) or not isinstance(entry_id, str):
        return False
    lines = [t for t in (_jsonl.js_trim(line) for line in appended_text.split("\n")) if t]
    if len(lines) != 1:
        return False
    try:
        value = _jsonl.loads_text(lines[0])
    except (ValueError, RecursionError):
        return False
    if type(value) is not dict:
        return False
    # Only a str equals these strs, so no separate type checks are needed.
    return value.get("type") == "compaction" and value.get("id") == entry_id


@dataclass(frozen=True)
class GuardOptions:
    """What a guarded manager was guarded with (stored on it as ``sessionfence_guard``)."""

    with_compaction_persistence: CompactionPersistence | None
    on_message_persisted: Callable[[], Any] | None


def guard_session_manager(
    manager: M,
    *,
    with_compaction_persistence: CompactionPersistence | None = None,
    on_message_persisted: Callable[[], Any] | None = None,
) -> M:
    """Installs the guard on ``manager`` (in place) and returns the same object.

    - ``append_compaction(...)`` becomes ``with_compaction_persistence(append,
      is_expected_compaction_append)``, where ``append()`` runs the unguarded call and
      returns its entry id (wire it to ``ctl.owned_file_write``). Without the option the
      append runs directly, bypassing the fence (as openclaw's guard does).
    - ``append_message(...)`` calls ``on_message_persisted()`` after the line is written
      (wire it to ``ctl.refresh_after_owned_write``); not when the append raised.

    Idempotent: a manager that is already guarded is returned unchanged, and the options
    of the first call stay in force (openclaw's guard detects itself the same way).
    """
    if getattr(manager, GUARD_ATTRIBUTE, None) is not None:
        return manager
    original_compaction: Callable[..., Any] = getattr(manager, "append_compaction")  # noqa: B009
    original_message: Callable[..., Any] = getattr(manager, "append_message")  # noqa: B009

    def append_compaction(*args: Any, **kwargs: Any) -> Any:
        def append() -> Any:
            return original_compaction(*args, **kwargs)

        if with_compaction_persistence is None:
            return append()
        return with_compaction_persistence(append, is_expected_compaction_append)

    def append_message(*args: Any, **kwargs: Any) -> Any:
        entry_id = original_message(*args, **kwargs)
        if on_message_persisted is not None:
            on_message_persisted()
        return entry_id

    append_compaction.__doc__ = original_compaction.__doc__
    append_message.__doc__ = original_message.__doc__
    # Instance attributes shadow the class's methods for this manager only.
    setattr(manager, "append_compaction", append_compaction)  # noqa: B010
    setattr(manager, "append_message", append_message)  # noqa: B010
    options = GuardOptions(with_compaction_persistence, on_message_persisted)
    setattr(manager, GUARD_ATTRIBUTE, options)
    return manager
