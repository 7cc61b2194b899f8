"""Both backends hash exactly like upstream XXH3: tail hashes and content digests."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.vectors.xxh3 import XXH3_64, XXH3_128, sanity_buffer

BUFFER = sanity_buffer(4096)


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


@pytest.mark.parametrize("length", sorted(XXH3_128))
def test_rolling_digest_matches_xxh3_128_vector_in_any_split(impl: ModuleType, length: int) -> None:
    low, high = XXH3_128[length]
    data = BUFFER[:length]
    for cut in {0, length // 3, length // 2, length}:
        digest = impl.RollingDigest()
        digest.update(data[:cut])
        digest.update(memoryview(data)[cut:])
        assert digest.intdigest() == (high << 64) | low


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
