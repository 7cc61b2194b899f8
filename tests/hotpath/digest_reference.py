"""The fence's block digest's definition (``BlockDigest``, issue 15, docs/design.md),
computed from plain XXH3-128 over bytes held in memory: the oracle both backends are
checked against. (``content_digest`` and ``RollingDigest`` stay the plain XXH3-128 of the
bytes, SPEC 2.3.)

With ``H`` the XXH3-128 (seed 0) of a piece in its canonical big-endian 16 bytes and
``BLOCK`` = 1 MiB, the digest of ``n`` bytes is::

    XXH3-128( H(block 1) || ... || H(block k) || H(rest) || le64(n) )

the blocks being the ``k = n // BLOCK`` whole ones and ``rest`` the bytes after them
(empty when ``n`` is a multiple of ``BLOCK``).
"""

from __future__ import annotations

import struct

import xxhash

BLOCK = 1 << 20


def block_hashes(data: bytes) -> list[bytes]:
    """``H`` of every whole block of ``data``."""
    return [
        xxhash.xxh3_128_digest(data[i : i + BLOCK]) for i in range(0, len(data) - BLOCK + 1, BLOCK)
    ]


def reference_digest(data: bytes) -> int:
    k = len(data) // BLOCK
    parts = block_hashes(data)
    assert len(parts) == k
    parts.append(xxhash.xxh3_128_digest(data[k * BLOCK :]))
    parts.append(struct.pack("<Q", len(data)))
    return int(xxhash.xxh3_128_intdigest(b"".join(parts)))
