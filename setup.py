# SPDX-License-Identifier: MIT
"""Only what pyproject.toml cannot say: the cffi module, the abi3 tag, clear build errors."""

from __future__ import annotations

import os
import sys
import sysconfig

from setuptools import setup

_PURE = os.environ.get("SESSIONFENCE_BACKEND", "").strip().lower() == "python"
_FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

_HELP = """
==================== sessionfence: building the C extension failed ====================
sessionfence needs a C compiler to build its hot path from source.
  * Debian/Ubuntu: apt-get install build-essential python3-dev
  * Fedora/RHEL:   dnf install gcc python3-devel
  * Alpine:        apk add build-base python3-dev libffi-dev
  * macOS:         xcode-select --install               * Windows: Visual Studio Build Tools (C++)
  * Upgrade pip first (python -m pip install -U pip): it may find a prebuilt wheel.
  * To install the slower pure-Python backend on purpose instead:
        SESSIONFENCE_BACKEND=python pip install sessionfence
=======================================================================================
"""

kwargs: dict[str, object] = {}
if not _PURE:
    kwargs["cffi_modules"] = ["csrc/build_ffi.py:ffibuilder"]
    if not _FREE_THREADED:
        kwargs["options"] = {"bdist_wheel": {"py_limited_api": "cp310"}}

try:
    setup(**kwargs)
except (Exception, SystemExit) as exc:
    # Never fall back to a silent pure install (msgpack #481): say how to fix it, re-raise.
    if not _PURE and not (isinstance(exc, SystemExit) and exc.code in (0, None)):
        sys.stderr.write(_HELP)
    raise
