"""Registers the controller measures (P7, and P2 through the controller) with
``sessionfence bench``, which imports every ``sessionfence._bench_*`` module."""

from ._controller_bench import P2C, P7  # noqa: F401
