# SPDX-License-Identifier: MIT
"""cffi builder for ``sessionfence._ffi`` (out-of-line API mode).

setuptools runs this through ``cffi_modules``; it is a build input and never ships in the
wheel. The cdef is cut from ``sessionfence.h`` so the declarations cannot drift apart.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _package_version() -> str:
    text = (ROOT / "sessionfence" / "_version.py").read_text(encoding="utf-8")
    match = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    if match is None:
        raise RuntimeError("sessionfence/_version.py has no __version__")
    return match.group(1)


def _cdef() -> str:
    header = (HERE / "sessionfence.h").read_text(encoding="utf-8")
    match = re.search(r"/\* CDEF-BEGIN \*/(.*)/\* CDEF-END \*/", header, re.S)
    if match is None:
        raise RuntimeError("csrc/sessionfence.h lacks its CDEF-BEGIN/CDEF-END markers")
    # cffi's parser takes plain declarations; drop comments, keep the #define constants.
    return re.sub(r"/\*.*?\*/", "", match.group(1), flags=re.S)


def _compile_args() -> list[str]:
    if sys.platform == "win32" and "GCC" not in sys.version:
        args = ["/O2"]
        if os.environ.get("SESSIONFENCE_WERROR") == "1":
            args.append("/WX")
        return args
    args = ["-O3", "-std=c99", "-fvisibility=hidden", "-Wall", "-Wextra"]
    if os.environ.get("SESSIONFENCE_WERROR") == "1":
        args.append("-Werror")
    return args


# Free-threaded interpreters cannot use the limited API (cffi 2.0 docs).
_FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "sessionfence._ffi",
    '#include "sessionfence.h"',
    sources=[str((HERE / "sessionfence.c").relative_to(ROOT))],
    include_dirs=[str(HERE.relative_to(ROOT))],
    define_macros=[("SF_PACKAGE_VERSION", '"' + _package_version() + '"')],
    extra_compile_args=_compile_args(),
    py_limited_api=not _FREE_THREADED,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
