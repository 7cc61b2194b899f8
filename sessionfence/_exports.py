"""Public names present themselves under the module a user imports them from.

A class defined in ``sessionfence.lock._acquire`` and exported as
``sessionfence.SessionWriteLock`` should say so in reprs, tracebacks and pickles, as
anyio's ``fix_package_names`` and trio's ``fixup_module_metadata`` arrange. Pickle finds a
class or function by ``__module__`` + ``__qualname__``; the public name resolves (lazily
exported names through the package's ``__getattr__``), so pickles keep working.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Iterable
from typing import Any

__all__ = ["present_as"]


def present_as(module_name: str, objects: Iterable[object]) -> None:
    """Set ``__module__`` of the package-private classes and functions among ``objects``
    to ``module_name`` (a public module that exports them under their own name).

    Objects from outside the package, or already presented by a public module, are left
    alone. A class's own annotations are first resolved in the module that defines it:
    ``typing.get_type_hints`` looks names up in ``sys.modules[cls.__module__]``, and the
    public module does not import what a private module's annotations name.
    """
    for obj in objects:
        if not isinstance(obj, (type, types.FunctionType)):
            continue
        home = obj.__module__
        if home == module_name or not home.startswith("sessionfence.") or _is_public(home):
            continue
        if isinstance(obj, type):
            _resolve_annotations(obj, home)
        obj.__module__ = module_name


def _is_public(module_name: str) -> bool:
    return not any(part.startswith("_") for part in module_name.split("."))


def _resolve_annotations(cls: type, home: str) -> None:
    own = inspect.get_annotations(cls)
    if not own or not any(isinstance(value, str) for value in own.values()):
        return
    namespace: dict[str, Any] = dict(vars(sys.modules[home]))
    resolved: dict[str, Any] = {}
    for name, value in own.items():
        try:
            # The same evaluation typing.get_type_hints does, in the defining module.
            resolved[name] = (
                eval(value, namespace, dict(vars(cls))) if isinstance(value, str) else value
            )
        except Exception:
            return  # a name only imported for type checkers: leave the strings as they are
    cls.__annotations__ = resolved
