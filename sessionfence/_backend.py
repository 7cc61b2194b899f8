"""Chooses the hot-path implementation from ``SESSIONFENCE_BACKEND`` (SPEC §1)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

VALID = ("auto", "cffi", "python")
ENV = "SESSIONFENCE_BACKEND"


def requested() -> str:
    # strip(): Windows `set VAR=value && ...` leaves a trailing space (python-zstandard).
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in VALID:
        raise ImportError(
            f"unknown {ENV}={os.environ.get(ENV)!r}; use one of: {', '.join(VALID)} "
            "(auto = C extension when importable, else pure Python)"
        )
    return value


def load() -> ModuleType:
    choice = requested()
    if choice == "python":
        return importlib.import_module("sessionfence._impl_py")
    try:
        return importlib.import_module("sessionfence._impl_cffi")
    except ImportError as exc:
        if choice == "cffi":
            raise ImportError(
                f"{ENV}=cffi but the C extension sessionfence._ffi cannot be imported ({exc}); "
                "reinstall sessionfence with a C compiler available, or set "
                f"{ENV}=python to use the pure-Python backend"
            ) from exc
        return importlib.import_module("sessionfence._impl_py")
