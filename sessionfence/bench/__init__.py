"""``sessionfence bench``: the backend comparison (naive, python, cffi side by side).

Never imported by the library itself. ``_suite`` holds the framework and the hot-path
measures, ``controller`` the controller measures.
"""

from __future__ import annotations

from ._suite import *  # noqa: F403
from ._suite import __all__ as __all__
