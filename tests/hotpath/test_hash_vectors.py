"""Both backends hash exactly like upstream XXH3 (tail hashes, ``content_digest`` and
``RollingDigest``: SPEC 2.3, the C entry points) and compute the fence's block-structured
digest (``BlockDigest``) of its definition (digest_reference.py), whose values are pinned
below: a change of definition must be deliberate (every process comparing them must
agree)."""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import pytest

from tests.hotpath.digest_reference import BLOCK, reference_digest
from tests.vectors.xxh3 import XXH3_64, XXH3_128, sanity_buffer

BUFFER = sanity_buffer(4096)

# The content digest of sanity_buffer(n): (high64, low64), from reference_digest.
DIGEST_VECTORS = {
    0: (0x0532AD8675074226, 0x704FF6CFBD05C2E8),
    1: (0x78DC71F1613A3D95, 0x4C6772CE20003542),
    2240: (0x545F418229018F33, 0x7EE91DFA5F3157B0),
    BLOCK - 1: (0x6E59A0DB95D0D667, 0x7733FE83D02684C1),
    BLOCK: (0xF2FF66189C04B487, 0x96DA90A955AE2C45),
    2 * BLOCK + 3: (0x831FD0E831603587, 0x11BE8BD981621CC5),
}


@functools.cache
def _big_buffer() -> bytes:
    return sanity_buffer(2 * BLOCK + 3)


@pytest.mark.parametrize("length", sorted(XXH3_64))
def test_tail_hash_matches_xxh3_64_vector(impl: ModuleType, tmp_path: Path, length: int) -> None:
    path = tmp_path / "v.bin"
    # Junk before the window proves only the tail is hashed.
    path.write_bytes(b"\xff" * 7 + BUFFER[:length])
    fp = impl.fingerprint(path, window=length)
    assert fp.tail_len == length
    assert fp.tail_hash == XXH3_64[length]


@pytest.mark.parametrize("length", sorted(XXH3_128))
def test_content_digest_matches_xxh3_128_vector(
    impl: ModuleType, tmp_path: Path, length: int
) -> None:
    low, high = XXH3_128[length]
    path = tmp_path / "v.bin"
    path.write_bytes(BUFFER[:length] + b"trailing bytes beyond size")
    assert impl.content_digest(path, length) == (high << 64) | low
    assert impl.RollingDigest.from_file(path, length).intdigest() == (high << 64) | low


@pytest.mark.parametrize("length", sorted(XXH3_128))
def test_rolling_digest_matches_xxh3_128_vector_in_any_split(impl: ModuleType, length: int) -> None:
    low, high = XXH3_128[length]
    data = BUFFER[:length]
    for cut in {0, length // 3, length // 2, length}:
        digest = impl.RollingDigest()
        digest.update(data[:cut])
        digest.update(memoryview(data)[cut:])
        assert digest.intdigest() == (high << 64) | low


@pytest.mark.parametrize("length", sorted(DIGEST_VECTORS))
def test_block_digest_matches_its_vectors(impl: ModuleType, tmp_path: Path, length: int) -> None:
    high, low = DIGEST_VECTORS[length]
    data = _big_buffer()[:length]
    assert reference_digest(data) == (high << 64) | low
    path = tmp_path / "v.bin"
    path.write_bytes(data + b"trailing bytes beyond size")
    assert impl.BlockDigest.from_file(path, length).intdigest() == (high << 64) | low


@pytest.mark.parametrize("length", sorted(DIGEST_VECTORS))
def test_block_digest_matches_its_vectors_in_any_split(impl: ModuleType, length: int) -> None:
    high, low = DIGEST_VECTORS[length]
    data = _big_buffer()[:length]
    for cut in {0, length // 3, length // 2, BLOCK, length}:
        cut = min(cut, length)
        digest = impl.BlockDigest()
        digest.update(data[:cut])
        digest.update(memoryview(data)[cut:])
        assert digest.intdigest() == (high << 64) | low


def test_block_digests_are_not_plain_xxh3_128(impl: ModuleType) -> None:
    """Two functions of the bytes: the public digest is plain XXH3-128 (SPEC 2.3), the
    fence's is block-structured (it can be rebuilt from block hashes); never mixed."""
    low, high = XXH3_128[2240]
    digest = impl.BlockDigest()
    digest.update(BUFFER[:2240])
    assert digest.intdigest() != (high << 64) | low


@pytest.mark.cffi
def test_c_xxh3_entry_points_match_vectors() -> None:
    from sessionfence._ffi import ffi, lib

    for length, value in XXH3_64.items():
        assert lib.sf_xxh3_64(BUFFER[:length], length) == value
    hi = ffi.new("uint64_t *")
    lo = ffi.new("uint64_t *")
    for length, (low, high) in XXH3_128.items():
        lib.sf_xxh3_128(BUFFER[:length], length, hi, lo)
        assert (hi[0], lo[0]) == (high, low)
