"""check_append, read_range and digests on both backends: one test per rule (SPEC §2.2-2.3)."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest
import xxhash

from sessionfence import MISSING, Change, ChangeKind, Fingerprint
from tests.hotpath.digest_reference import reference_digest


def write(path: Path, data: bytes) -> None:
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.write(data)
        f.truncate()


def rewrite_in_place(path: Path, offset: int, data: bytes, *, keep_mtime: bool) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def body(tmp_path: Path) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"".join(b'{"n":%06d}\n' % i for i in range(2000)))  # 24 KB
    return path


def test_unchanged(impl: ModuleType, body: Path) -> None:
    before = impl.fingerprint(body)
    change = impl.check_append(body, before)
    assert change.kind is ChangeKind.UNCHANGED
    assert change.after == before and change.appended is None


def test_appended_carries_exactly_the_suffix(impl: ModuleType, body: Path) -> None:
    before = impl.fingerprint(body)
    with open(body, "ab") as f:
        f.write(b'{"n":"new"}\n')
    change = impl.check_append(body, before)
    assert change.kind is ChangeKind.APPENDED
    assert change.appended == b'{"n":"new"}\n'
    assert change.after == impl.fingerprint(body)
    assert change.before is before


def test_max_suffix_boundary(impl: ModuleType, body: Path) -> None:
    before = impl.fingerprint(body)
    with open(body, "ab") as f:
        f.write(b"x" * 100)
    assert impl.check_append(body, before, max_suffix=100).appended == b"x" * 100
    over = impl.check_append(body, before, max_suffix=99)
    assert over.kind is ChangeKind.APPENDED and over.appended is None
    assert impl.check_append(body, before, max_suffix=0).appended is None


def test_append_after_edit_outside_window_is_appended(impl: ModuleType, body: Path) -> None:
    """Outside the old tail window is the controller's business (verify="full")."""
    before = impl.fingerprint(body, window=64)
    rewrite_in_place(body, 10, b"EDIT", keep_mtime=False)
    with open(body, "ab") as f:
        f.write(b"tail\n")
    assert impl.check_append(body, before, window=64).kind is ChangeKind.APPENDED


def test_append_after_edit_inside_window_is_rewritten(impl: ModuleType, body: Path) -> None:
    before = impl.fingerprint(body, window=64)
    size = before.size
    rewrite_in_place(body, size - 20, b"EDIT", keep_mtime=False)
    with open(body, "ab") as f:
        f.write(b"tail\n")
    change = impl.check_append(body, before, window=64)
    assert change.kind is ChangeKind.REWRITTEN and change.appended is None
    # ...also when the suffix is too large to return.
    assert impl.check_append(body, before, window=64, max_suffix=1).kind is ChangeKind.REWRITTEN


def test_same_size_rewrite_in_window_with_mtime_restored(impl: ModuleType, body: Path) -> None:
    before = impl.fingerprint(body)
    rewrite_in_place(body, before.size - 5, b"ZZZZ", keep_mtime=True)
    change = impl.check_append(body, before)
    # ctime moved (userspace cannot restore it), so the window is re-hashed.
    assert change.kind is ChangeKind.REWRITTEN
    assert change.after == impl.fingerprint(body)


def test_same_size_edit_outside_window_is_touched(impl: ModuleType, body: Path) -> None:
    before = impl.fingerprint(body, window=100)
    rewrite_in_place(body, 0, b"{", keep_mtime=False)  # same byte value: content unchanged
    rewrite_in_place(body, 3, b"X", keep_mtime=True)
    assert impl.check_append(body, before, window=100).kind is ChangeKind.TOUCHED


def test_touch_is_touched(impl: ModuleType, body: Path) -> None:
    before = impl.fingerprint(body)
    os.utime(body, ns=(before.mtime_ns + 10**9, before.mtime_ns + 10**9))
    assert impl.check_append(body, before).kind is ChangeKind.TOUCHED


def test_truncated_and_truncate_regrow(impl: ModuleType, body: Path) -> None:
    before = impl.fingerprint(body)
    with open(body, "r+b") as f:
        f.truncate(before.size - 10)
    assert impl.check_append(body, before).kind is ChangeKind.TRUNCATED
    with open(body, "ab") as f:
        f.write(b"regrown past the old size..\n")
    change = impl.check_append(body, before)
    assert change.kind is ChangeKind.REWRITTEN and change.appended is None
    with open(body, "r+b") as f:
        f.truncate(0)
    assert impl.check_append(body, before).kind is ChangeKind.TRUNCATED


def test_replaced_by_rename_even_with_same_bytes(impl: ModuleType, body: Path) -> None:
    before = impl.fingerprint(body)
    copy = body.with_suffix(".tmp")
    copy.write_bytes(body.read_bytes())
    os.replace(copy, body)
    change = impl.check_append(body, before)
    assert change.kind is ChangeKind.REPLACED
    assert change.after == impl.fingerprint(body)


def test_created_and_deleted(impl: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "new.jsonl"
    missing = impl.check_append(path, MISSING)
    assert missing.kind is ChangeKind.UNCHANGED and missing.after is MISSING
    path.write_bytes(b"")
    empty = impl.check_append(path, MISSING)
    assert empty.kind is ChangeKind.CREATED and empty.appended == b""
    path.write_bytes(b"hello\n")
    created = impl.check_append(path, MISSING)
    assert created.kind is ChangeKind.CREATED and created.appended == b"hello\n"
    assert impl.check_append(path, MISSING, max_suffix=5).appended is None
    before = impl.fingerprint(path)
    path.unlink()
    deleted = impl.check_append(path, before)
    assert deleted.kind is ChangeKind.DELETED and deleted.after is MISSING


def test_after_uses_the_new_window_old_check_uses_old_tail_len(
    impl: ModuleType, body: Path
) -> None:
    before = impl.fingerprint(body, window=0)
    assert before.tail_len == 0
    rewrite_in_place(body, before.size - 3, b"QQ", keep_mtime=False)
    with open(body, "ab") as f:
        f.write(b"z\n")
    # A zero-length old window proves nothing: growth counts as an append.
    change = impl.check_append(body, before, window=1 << 20)
    assert change.kind is ChangeKind.APPENDED
    assert change.after.tail_len == change.after.size


def test_before_validation(impl: ModuleType, body: Path) -> None:
    good = impl.fingerprint(body)
    with pytest.raises(TypeError):
        impl.check_append(body, "not a fingerprint")
    bad = [
        Fingerprint(True, good.dev, good.ino, -1, 0, 0, 0, 0),
        Fingerprint(True, good.dev, good.ino, 10, 0, 0, 11, 0),
        Fingerprint(True, good.dev, good.ino, 10 << 20, 0, 0, (1 << 20) + 1, 0),
    ]
    for before in bad:
        with pytest.raises(ValueError):
            impl.check_append(body, before)
    for kwargs in ({"window": -1}, {"window": (1 << 20) + 1}, {"max_suffix": -1}):
        with pytest.raises(ValueError):
            impl.check_append(body, good, **kwargs)
    with pytest.raises(TypeError):
        impl.check_append(body, good, window=True)


class TestReadRange:
    def test_exact_bytes(self, impl: ModuleType, body: Path) -> None:
        data = body.read_bytes()
        assert impl.read_range(body, 0, 10) == data[:10]
        assert impl.read_range(body, 100, 5000) == data[100:5100]
        assert impl.read_range(body, len(data), 0) == b""
        assert impl.read_range(body, len(data) - 1, 1) == data[-1:]

    @pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, -1)])
    def test_negative_arguments(
        self, impl: ModuleType, body: Path, offset: int, length: int
    ) -> None:
        with pytest.raises(ValueError, match=">= 0"):
            impl.read_range(body, offset, length)

    def test_past_the_end(self, impl: ModuleType, body: Path) -> None:
        size = body.stat().st_size
        for offset, length in ((size, 1), (size - 1, 2), (size + 1, 0), (0, size + 1)):
            with pytest.raises(ValueError, match="passes the end"):
                impl.read_range(body, offset, length)

    def test_missing_file(self, impl: ModuleType, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            impl.read_range(tmp_path / "nope", 0, 0)


class TestDigests:
    def test_content_digest_whole_and_prefix(self, impl: ModuleType, body: Path) -> None:
        data = body.read_bytes()
        assert impl.content_digest(body) == xxhash.xxh3_128_intdigest(data)
        assert impl.content_digest(body, 1000) == xxhash.xxh3_128_intdigest(data[:1000])
        assert impl.content_digest(body, 0) == xxhash.xxh3_128_intdigest(b"")
        with pytest.raises(ValueError, match="fewer than"):
            impl.content_digest(body, len(data) + 1)
        with pytest.raises(ValueError):
            impl.content_digest(body, -1)
        with pytest.raises(FileNotFoundError):
            impl.content_digest(body.with_name("nope"))
        with pytest.raises(IsADirectoryError):
            impl.content_digest(body.parent)

    def test_large_file_crosses_chunk_boundaries(self, impl: ModuleType, tmp_path: Path) -> None:
        path = tmp_path / "big.bin"
        data = os.urandom(9 * 256 * 1024 + 12345)  # 256 KiB read chunks, 1 MiB blocks
        path.write_bytes(data)
        assert impl.content_digest(path) == xxhash.xxh3_128_intdigest(data)
        assert impl.BlockDigest.from_file(path).intdigest() == reference_digest(data)

    def test_rolling_digest_rolls_forward_to_content_digest(
        self, impl: ModuleType, body: Path
    ) -> None:
        digest = impl.RollingDigest.from_file(body)
        assert digest.intdigest() == impl.content_digest(body)
        fork = digest.copy()
        before = impl.fingerprint(body)
        with open(body, "ab") as f:
            f.write(b'{"n":"appended"}\n')
        change = impl.check_append(body, before)
        digest.update(change.appended)
        assert digest.intdigest() == impl.content_digest(body)
        assert fork.intdigest() == impl.content_digest(body, before.size)  # copy independent
        assert impl.RollingDigest.from_file(body, 10).intdigest() == impl.content_digest(body, 10)
        assert impl.RollingDigest().intdigest() == xxhash.xxh3_128_intdigest(b"")
        assert impl.BlockDigest().intdigest() == reference_digest(b"")
        with pytest.raises(ValueError):
            impl.RollingDigest.from_file(body, 10**9)


@pytest.mark.cffi
def test_backends_agree_on_every_field(tmp_path: Path) -> None:
    from sessionfence import _impl_cffi, _impl_py

    path = tmp_path / "t.jsonl"
    path.write_bytes(os.urandom(5000))
    before = _impl_py.fingerprint(path, window=300)
    assert _impl_cffi.fingerprint(path, window=300) == before
    with open(path, "ab") as f:
        f.write(os.urandom(700))
    assert _impl_cffi.check_append(path, before, window=77) == _impl_py.check_append(
        path, before, window=77
    )


@pytest.mark.cffi
def test_reentrant_call_between_c_and_results_does_not_clobber(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finalizer or signal handler may run another check in this thread after the C call
    returned and before its results are read; the outer results must survive (and its
    suffix buffer must be freed exactly once)."""
    from sessionfence import _impl_cffi

    outer, inner = tmp_path / "outer.jsonl", tmp_path / "inner.jsonl"
    outer.write_bytes(b"o\n")
    inner.write_bytes(b"i\n")
    outer_before = _impl_cffi.fingerprint(outer)
    inner_before = _impl_cffi.fingerprint(inner)
    with open(outer, "ab") as f:
        f.write(b"outer line\n")
    with open(inner, "ab") as f:
        f.write(b"inner line, longer\n")
    real = _impl_cffi._change_result
    nested: list[Change] = []
    entered = False

    def reenter(scratch: object, before: Fingerprint) -> Change:
        nonlocal entered
        if not entered:
            entered = True
            nested.append(_impl_cffi.check_append(inner, inner_before))
        return real(scratch, before)  # type: ignore[arg-type]

    monkeypatch.setattr(_impl_cffi, "_change_result", reenter)
    change = _impl_cffi.check_append(outer, outer_before)
    assert change.appended == b"outer line\n"
    assert change.after == _impl_cffi.fingerprint(outer)
    assert nested[0].appended == b"inner line, longer\n"
