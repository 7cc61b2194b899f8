"""fingerprint, fingerprint_many, FileProbe and same_stat on both backends (SPEC §2.1)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import threading
from pathlib import Path
from types import ModuleType

import pytest
import xxhash

from sessionfence import MISSING, Fingerprint, UnstableFileError, same_stat

EMPTY_HASH = 0x2D06800538D394C2


def expected(path: Path, window: int) -> Fingerprint:
    """Ground truth from os.stat and the bytes, independent of both backends."""
    st = os.stat(path)
    data = path.read_bytes()
    tail = data[len(data) - min(len(data), window) :]
    return Fingerprint(
        True,
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        len(tail),
        xxhash.xxh3_64_intdigest(tail),
    )


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 100_000])
@pytest.mark.parametrize("window", [0, 1, 4096, 1 << 20])
def test_fingerprint_matches_stat_and_tail_hash(
    impl: ModuleType, tmp_path: Path, size: int, window: int
) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(os.urandom(size))
    assert impl.fingerprint(path, window=window) == expected(path, window)


def test_default_window_is_4096(impl: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"a" * 10_000)
    assert impl.fingerprint(path).tail_len == 4096


def test_empty_tail_hashes_empty_input_not_zero(impl: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    fp = impl.fingerprint(path)
    assert fp.exists and fp.size == 0 and fp.tail_len == 0
    assert fp.tail_hash == EMPTY_HASH
    assert MISSING.tail_hash == 0


def test_missing_paths_give_missing(impl: ModuleType, tmp_path: Path) -> None:
    assert impl.fingerprint(tmp_path / "nope") is MISSING
    (tmp_path / "file").write_bytes(b"x")
    # ENOTDIR: a path component is a regular file.
    assert impl.fingerprint(tmp_path / "file" / "child") is MISSING


def test_accepts_str_bytes_and_pathlike(impl: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"hello\n")
    want = impl.fingerprint(path)
    assert impl.fingerprint(str(path)) == want
    assert impl.fingerprint(os.fsencode(path)) == want
    assert impl.fingerprint(pathlib.PurePath(path)) == want


def test_non_ascii_path(impl: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "séance-日本.jsonl"
    path.write_bytes(b"x\n")
    assert impl.fingerprint(path) == expected(path, 4096)


def test_follows_symlinks(impl: ModuleType, tmp_path: Path) -> None:
    target = tmp_path / "real.jsonl"
    target.write_bytes(b"data\n")
    link = tmp_path / "alias.jsonl"
    link.symlink_to(target)
    assert impl.fingerprint(link) == impl.fingerprint(target)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    assert impl.fingerprint(dangling) is MISSING


def test_same_stat_ignores_tail_but_eq_does_not() -> None:
    a = Fingerprint(True, 1, 2, 3, 4, 5, 3, 99)
    b = dataclasses.replace(a, tail_hash=100, tail_len=1)
    assert same_stat(a, b) and a != b
    assert not same_stat(a, dataclasses.replace(a, ctime_ns=6))
    assert not same_stat(a, dataclasses.replace(a, ino=7))
    assert same_stat(MISSING, Fingerprint(exists=False))
    assert not same_stat(MISSING, a)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.size = 10  # type: ignore[misc]
    assert hash(a) == hash(Fingerprint(True, 1, 2, 3, 4, 5, 3, 99))


def test_fingerprint_many_matches_one_by_one(impl: ModuleType, tmp_path: Path) -> None:
    paths: list[Path] = []
    for i in range(50):
        p = tmp_path / f"s{i}.jsonl"
        p.write_bytes(os.urandom(i * 97))
        paths.append(p)
    paths.insert(7, tmp_path / "missing.jsonl")
    got = impl.fingerprint_many(paths, window=128)
    assert got == [impl.fingerprint(p, window=128) for p in paths]
    assert got[7] is MISSING
    assert impl.fingerprint_many(iter(paths[:3])) == [impl.fingerprint(p) for p in paths[:3]]
    assert impl.fingerprint_many([]) == []


def test_fingerprint_many_reports_the_failing_path(impl: ModuleType, tmp_path: Path) -> None:
    good = tmp_path / "a.jsonl"
    good.write_bytes(b"a")
    bad = tmp_path / "subdir"
    bad.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        impl.fingerprint_many([good, bad, good])
    assert info.value.filename in (bad, str(bad))


def test_stable_read_under_concurrent_appends(impl: ModuleType, tmp_path: Path) -> None:
    """Every fingerprint describes one state: its tail hash matches the bytes at its size.

    The writer appends as fast as it can; a reader that never sees the file hold still
    must say so (UnstableFileError) rather than return a torn state.
    """
    path = tmp_path / "busy.jsonl"
    path.write_bytes(b"")
    stop = threading.Event()

    def writer() -> None:
        with open(path, "ab", buffering=0) as f:
            n = 0
            while not stop.is_set() and n < 200_000:
                f.write(b"%08d\n" % n)
                n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    unstable = 0
    try:
        for _ in range(2000):
            try:
                seen.append(impl.fingerprint(path, window=64))
            except UnstableFileError:
                unstable += 1
    finally:
        stop.set()
        thread.join()
    seen.append(impl.fingerprint(path, window=64))  # quiet now: must succeed
    data = path.read_bytes()  # the file only grows: earlier states are its prefixes
    for fp in seen:
        tail = data[fp.size - fp.tail_len : fp.size]
        assert fp.tail_len == min(fp.size, 64)
        assert xxhash.xxh3_64_intdigest(tail) == fp.tail_hash
    assert seen[-1].size == len(data)
    assert len(seen) + unstable == 2001


def test_file_that_never_holds_still_raises_unstable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Python backend only: the C backend's fstat cannot be intercepted from a test; the
    concurrent-writer test above exercises its retry loop for real."""
    from sessionfence import _impl_py

    path = tmp_path / "moving.jsonl"
    path.write_bytes(b"abc\n")
    real_fstat = os.fstat
    calls = 0

    def moving_fstat(fd: int) -> os.stat_result:
        nonlocal calls
        calls += 1
        st = list(real_fstat(fd))
        st[8] = calls  # st_mtime (int): each call sees a new modification
        return os.stat_result(st, {"st_mtime_ns": calls, "st_ctime_ns": calls})

    monkeypatch.setattr(_impl_py.os, "fstat", moving_fstat)
    monkeypatch.setattr(_impl_py, "backoff_seconds", lambda tries: 0.0)
    with pytest.raises(UnstableFileError) as info:
        _impl_py.fingerprint(path)
    assert isinstance(info.value, OSError)
    assert str(path) in str(info.value)
    before = Fingerprint(True, 1, 2, 3, 4, 5, 0, 0)
    with pytest.raises(UnstableFileError):
        _impl_py.check_append(path, before)


class TestFileProbe:
    def test_matches_one_shot_fingerprint(self, impl: ModuleType, tmp_path: Path) -> None:
        path = tmp_path / "t.jsonl"
        path.write_bytes(os.urandom(9000))
        with impl.FileProbe(path, window=1000) as probe:
            assert probe.fingerprint() == impl.fingerprint(path, window=1000)
            with open(path, "ab") as f:
                f.write(b"more\n")
            assert probe.fingerprint() == impl.fingerprint(path, window=1000)

    def test_unchanged_file_returns_the_same_object(self, impl: ModuleType, tmp_path: Path) -> None:
        path = tmp_path / "t.jsonl"
        path.write_bytes(b"x\n")
        with impl.FileProbe(path) as probe:
            first = probe.fingerprint()
            assert probe.fingerprint() is first
            with open(path, "ab") as f:
                f.write(b"y\n")
            assert probe.fingerprint() != first

    def test_follows_replacement_by_rename(self, impl: ModuleType, tmp_path: Path) -> None:
        path = tmp_path / "t.jsonl"
        path.write_bytes(b"old\n")
        with impl.FileProbe(path) as probe:
            old = probe.fingerprint()
            tmp = tmp_path / "t.tmp"
            tmp.write_bytes(b"new content\n")
            os.replace(tmp, path)
            new = probe.fingerprint()
            assert new == expected(path, 4096)
            assert (new.dev, new.ino) != (old.dev, old.ino)
            assert probe.read_range(0, 3) == b"new"

    def test_missing_after_unlink_then_picks_up_creation(
        self, impl: ModuleType, tmp_path: Path
    ) -> None:
        path = tmp_path / "t.jsonl"
        with impl.FileProbe(path) as probe:
            assert probe.fingerprint() is MISSING
            path.write_bytes(b"created\n")
            assert probe.fingerprint() == expected(path, 4096)
            path.unlink()
            assert probe.fingerprint() is MISSING
            with pytest.raises(FileNotFoundError):
                probe.read_range(0, 1)
            path.write_bytes(b"again\n")
            assert probe.fingerprint() == expected(path, 4096)

    def test_check_append_and_read_range(self, impl: ModuleType, tmp_path: Path) -> None:
        path = tmp_path / "t.jsonl"
        path.write_bytes(b"line one\n")
        with impl.FileProbe(path, window=4) as probe:
            before = probe.fingerprint()
            with open(path, "ab") as f:
                f.write(b"line two\n")
            change = probe.check_append(before)
            assert change.kind.name == "APPENDED"
            assert change.appended == b"line two\n"
            assert change.after.tail_len == 4
            assert probe.check_append(before, window=16).after.tail_len == 16
            assert probe.read_range(5, 4) == b"one\n"

    def test_closed_probe_refuses_use(self, impl: ModuleType, tmp_path: Path) -> None:
        path = tmp_path / "t.jsonl"
        path.write_bytes(b"x")
        probe = impl.FileProbe(path)
        probe.fingerprint()
        probe.close()
        probe.close()  # idempotent
        assert probe.closed
        for call in (probe.fingerprint, lambda: probe.read_range(0, 1)):
            with pytest.raises(ValueError, match="closed"):
                call()
        with pytest.raises(ValueError, match="closed"):
            probe.check_append(MISSING)

    def test_directory_at_path_is_an_error(self, impl: ModuleType, tmp_path: Path) -> None:
        with impl.FileProbe(tmp_path) as probe, pytest.raises(IsADirectoryError):
            probe.fingerprint()

    def test_bad_window(self, impl: ModuleType, tmp_path: Path) -> None:
        for window in (-1, (1 << 20) + 1):
            with pytest.raises(ValueError, match="window"):
                impl.FileProbe(tmp_path / "x", window=window)


def _bytes_read() -> int:
    with open("/proc/self/io", "rb") as f:
        for line in f.read().splitlines():
            if line.startswith(b"rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
class TestProbeRacyClean:
    """An unchanged poll skips the tail re-read only when git's racy-clean rule proves the
    bytes cannot have changed under an equal stat; otherwise it reads."""

    def poll_cost(self, probe: object) -> tuple[Fingerprint, int]:
        before = _bytes_read()
        fp = probe.fingerprint()  # type: ignore[attr-defined]
        return fp, _bytes_read() - before

    def test_recently_changed_file_is_reread(self, impl: ModuleType, tmp_path: Path) -> None:
        path = tmp_path / "t.jsonl"
        path.write_bytes(os.urandom(20_000))
        with impl.FileProbe(path, window=8192) as probe:
            first = probe.fingerprint()
            _, overhead = self.poll_cost(_NoRead())
            fp, cost = self.poll_cost(probe)
            assert fp is first
            # Written just now: within the 2 s margin, so the window is read again.
            assert cost - overhead >= 8192

    def test_quiet_file_poll_is_one_stat_and_still_sees_changes(
        self, impl: ModuleType, tmp_path: Path
    ) -> None:
        path = tmp_path / "t.jsonl"
        path.write_bytes(os.urandom(20_000))
        with impl.FileProbe(path, window=8192) as probe:
            probe._racy_ns = 0  # the file's timestamps already predate the first read
            first = probe.fingerprint()
            _, overhead = self.poll_cost(_NoRead())
            fp, cost = self.poll_cost(probe)
            assert fp is first
            assert cost - overhead < 8192
            rewrite_keep_size(path)
            changed, cost = self.poll_cost(probe)
            assert cost - overhead >= 8192
            assert changed == expected(path, 8192) and changed.tail_hash != first.tail_hash


class _NoRead:
    def fingerprint(self) -> None:
        return None


def rewrite_keep_size(path: Path) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size - 10)
        f.write(b"0123456789")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored; ctime moves


def test_probe_shared_between_threads_while_the_file_is_replaced(
    impl: ModuleType, tmp_path: Path
) -> None:
    """The probe's lock keeps one thread from re-opening the held file while another reads
    through it (the C calls run without the GIL)."""
    path = tmp_path / "t.jsonl"
    versions = [os.urandom(5000 + 100 * i) for i in range(8)]
    hashes = {xxhash.xxh3_64_intdigest(v[-4096:]) for v in versions}
    path.write_bytes(versions[0])
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[Fingerprint] = []

    def replacer() -> None:
        n = 0
        while not stop.is_set() and n < 2000:
            tmp = tmp_path / f"v{n % 2}.tmp"
            tmp.write_bytes(versions[n % len(versions)])
            os.replace(tmp, path)
            n += 1

    with impl.FileProbe(path) as probe:

        def reader() -> None:
            try:
                for _ in range(300):
                    seen.append(probe.fingerprint())
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=replacer)] + [
            threading.Thread(target=reader) for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join()
        stop.set()
        threads[0].join()
    assert errors == []
    assert len(seen) == 900
    assert all(fp.exists and fp.tail_hash in hashes for fp in seen)
