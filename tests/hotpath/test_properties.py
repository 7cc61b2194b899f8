"""Hypothesis: random files and random mutations, both backends against ground truth.

The oracle below re-derives SPEC §2.2 from the bytes and os.stat alone, so a bug shared
by both backends (they share argument checks, nothing else) still shows up.
"""

from __future__ import annotations

import itertools
import os
import random
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionfence import MISSING, ChangeKind, Fingerprint, _impl_cffi, _impl_py
from tests.hotpath.digest_reference import BLOCK, block_hashes, reference_digest

BACKENDS = (_impl_cffi, _impl_py)


@dataclass
class State:
    exists: bool
    data: bytes = b""
    st: os.stat_result | None = None


def observe(path: Path) -> State:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return State(False)
    return State(True, path.read_bytes(), st)


def truth_fp(state: State, window: int) -> Fingerprint:
    if not state.exists:
        return MISSING
    assert state.st is not None
    tail = state.data[len(state.data) - min(len(state.data), window) :]
    s = state.st
    return Fingerprint(
        True,
        s.st_dev,
        s.st_ino,
        s.st_size,
        s.st_mtime_ns,
        s.st_ctime_ns,
        len(tail),
        xxhash.xxh3_64_intdigest(tail),
    )


def truth_kind(
    old: State, before: Fingerprint, new: State, max_suffix: int
) -> tuple[ChangeKind, bytes | None]:
    if not old.exists:
        if not new.exists:
            return ChangeKind.UNCHANGED, None
        return ChangeKind.CREATED, new.data if len(new.data) <= max_suffix else None
    if not new.exists:
        return ChangeKind.DELETED, None
    assert new.st is not None
    if (new.st.st_dev, new.st.st_ino) != (before.dev, before.ino):
        return ChangeKind.REPLACED, None
    size, old_size, tl = len(new.data), before.size, before.tail_len
    if size < old_size:
        return ChangeKind.TRUNCATED, None
    window_then = old.data[old_size - tl : old_size]
    if size == old_size:
        if (new.st.st_mtime_ns, new.st.st_ctime_ns) == (before.mtime_ns, before.ctime_ns):
            return ChangeKind.UNCHANGED, None
        same = new.data[size - tl :] == window_then
        return (ChangeKind.TOUCHED if same else ChangeKind.REWRITTEN), None
    if new.data[old_size - tl : old_size] != window_then:
        return ChangeKind.REWRITTEN, None
    suffix = new.data[old_size:]
    return ChangeKind.APPENDED, suffix if len(suffix) <= max_suffix else None


WINDOWS = st.sampled_from([0, 1, 7, 64, 4096, 1 << 20])
content = st.binary(max_size=3000)

mutation = st.one_of(
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=2000)),
    st.tuples(st.just("truncate"), st.integers(0, 4000)),
    st.tuples(
        st.just("truncate_regrow"), st.integers(0, 4000), st.binary(min_size=1, max_size=3000)
    ),
    st.tuples(
        st.just("rewrite"), st.integers(0, 4000), st.binary(min_size=1, max_size=50), st.booleans()
    ),
    st.tuples(
        st.just("rewrite_tail"),
        st.integers(1, 100),
        st.binary(min_size=1, max_size=50),
        st.booleans(),
    ),
    st.tuples(st.just("replace"), st.binary(max_size=3000), st.booleans()),
    st.tuples(st.just("delete")),
    st.tuples(st.just("touch")),
    st.tuples(st.just("chmod")),
    st.tuples(st.just("noop")),
)


def apply(path: Path, op: tuple) -> None:  # type: ignore[type-arg]
    name = op[0]
    exists = path.exists()
    if name == "append":
        with open(path, "ab") as f:
            f.write(op[1])
    elif name == "truncate" and exists:
        with open(path, "r+b") as f:
            f.truncate(min(op[1], os.path.getsize(path)))
    elif name == "truncate_regrow" and exists:
        with open(path, "r+b") as f:
            f.truncate(min(op[1], os.path.getsize(path)))
        with open(path, "ab") as f:
            f.write(op[2])
    elif name in ("rewrite", "rewrite_tail") and exists:
        size = os.path.getsize(path)
        if size == 0:
            return
        offset = min(op[1], size - 1) if name == "rewrite" else max(0, size - op[1])
        data = op[2][: size - offset]  # same size: stays inside the file
        st0 = os.stat(path)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)
        if op[3]:  # restore mtime, the classic disguise
            os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    elif name == "replace":
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(path.read_bytes() if (op[2] and exists) else op[1])
        os.replace(tmp, path)
    elif name == "delete" and exists:
        path.unlink()
    elif name == "touch" and exists:
        st0 = os.stat(path)
        os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns + 1_000_000))
    elif name == "chmod" and exists:
        os.chmod(path, 0o600 if (os.stat(path).st_mode & 0o777) != 0o600 else 0o644)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    initial=st.one_of(st.none(), content),
    ops=st.lists(mutation, min_size=1, max_size=3),
    window=WINDOWS,
    new_window=WINDOWS,
    max_suffix=st.sampled_from([0, 10, 1 << 20]),
)
def test_check_append_matches_ground_truth(
    initial: bytes | None,
    ops: list,
    window: int,
    new_window: int,
    max_suffix: int,  # type: ignore[type-arg]
) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.jsonl"
        if initial is not None:
            path.write_bytes(initial)
        old = observe(path)
        before = truth_fp(old, window)
        for impl in BACKENDS:
            assert impl.fingerprint(path, window=window) == before, impl.NAME
        for op in ops:
            apply(path, op)
        new = observe(path)
        kind, appended = truth_kind(old, before, new, max_suffix)
        after = truth_fp(new, new_window)
        for impl in BACKENDS:
            change = impl.check_append(path, before, window=new_window, max_suffix=max_suffix)
            assert (change.kind, change.appended, change.after) == (kind, appended, after), (
                impl.NAME
            )
            with impl.FileProbe(path, window=new_window) as probe:
                assert probe.check_append(before, max_suffix=max_suffix) == change
                assert probe.fingerprint() == after


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=5000), cut=st.integers(0, 5000), more=st.binary(max_size=5000))
def test_digests_roll_forward_like_the_whole_content(data: bytes, cut: int, more: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.jsonl"
        path.write_bytes(data + more)
        cut = min(cut, len(data))
        want = xxhash.xxh3_128_intdigest(data + more)
        for impl in BACKENDS:
            rolled = impl.RollingDigest.from_file(path, cut)
            rolled.update((data + more)[cut:])
            assert rolled.intdigest() == want == impl.content_digest(path)
            assert impl.content_digest(path, cut) == xxhash.xxh3_128_intdigest((data + more)[:cut])
            block = impl.BlockDigest.from_file(path, cut)
            block.update((data + more)[cut:])
            assert block.intdigest() == reference_digest(data + more)


# Sizes that straddle the digest's 1 MiB blocks: near 0, 1, 2 and 3 blocks.
_SIZES = st.one_of(
    st.integers(0, 4096),
    *(st.integers(max(0, k * BLOCK - 4096), k * BLOCK + 4096) for k in (1, 2, 3)),
)


def _bytes_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@settings(max_examples=60, deadline=None)
@given(size=_SIZES, seed=st.integers(0, 2**32), cuts=st.lists(st.floats(0, 1), max_size=8))
def test_any_update_split_equals_one_shot(size: int, seed: int, cuts: list[float]) -> None:
    """However the bytes are cut into updates (bytes, bytearray, memoryview; pieces inside
    a block, across one, exactly at its end), both backends give the one-shot digest, and
    it is the definition's."""
    data = _bytes_of(size, seed)
    points = sorted({0, size, *(int(c * size) for c in cuts)})
    want = reference_digest(data)
    for impl in BACKENDS:
        one = impl.BlockDigest()
        one.update(data)
        assert one.intdigest() == want, impl.NAME
        split = impl.BlockDigest()
        for i, (lo, hi) in enumerate(itertools.pairwise(points)):
            piece = data[lo:hi]
            split.update((bytes, bytearray, memoryview)[i % 3](piece))
            snapshot = split.copy()  # an independent copy at every point
            assert snapshot.intdigest() == reference_digest(data[:hi]), impl.NAME
        assert split.intdigest() == want, impl.NAME


@settings(max_examples=60, deadline=None)
@given(
    size=_SIZES, seed=st.integers(0, 2**32), drop=st.integers(0, 3), more=st.binary(max_size=3000)
)
def test_from_blocks_equals_streaming(size: int, seed: int, drop: int, more: bytes) -> None:
    """A digest rebuilt from the hashes of the first ``j`` whole blocks and the bytes after
    them equals one that read every byte, on both backends, and rolls forward alike."""
    data = _bytes_of(size, seed)
    hashes = block_hashes(data)
    j = max(0, len(hashes) - drop)
    want = reference_digest(data)
    for impl in BACKENDS:
        rebuilt = impl.BlockDigest.from_blocks(hashes[:j], data[j * BLOCK :])
        assert rebuilt.intdigest() == want, impl.NAME
        rebuilt.update(more)
        assert rebuilt.intdigest() == reference_digest(data + more), impl.NAME
        assert (
            impl.BlockDigest.from_blocks(
                iter(hashes[:j]), memoryview(data)[j * BLOCK :]
            ).intdigest()
            == want
        )


def test_from_blocks_refuses_what_is_not_a_block_hash() -> None:
    for impl in BACKENDS:
        assert impl.BlockDigest.BLOCK == BLOCK
        assert impl.BlockDigest.from_blocks([]).intdigest() == reference_digest(b"")
        for bad in (b"", b"\0" * 15, b"\0" * 17):
            with pytest.raises(ValueError, match="16 bytes"):
                impl.BlockDigest.from_blocks([bad])


def test_update_takes_any_buffer() -> None:
    words = array("I", range(1000))
    grid = memoryview(bytes(range(256)) * 4).cast("B", (32, 32))
    raw = words.tobytes() + grid.tobytes()
    for impl in BACKENDS:
        digest = impl.BlockDigest()
        digest.update(memoryview(words))
        digest.update(grid)
        assert digest.intdigest() == reference_digest(raw), impl.NAME
        plain = impl.RollingDigest()
        plain.update(memoryview(words))
        plain.update(grid)
        assert plain.intdigest() == xxhash.xxh3_128_intdigest(raw), impl.NAME
