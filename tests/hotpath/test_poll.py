"""FileProbe.mark()/poll()/baseline and ManyProbe: held baselines that report each change
once. Every test runs on both backends (``impl``); the property tests compare both with a
ground truth derived from the bytes and os.stat alone (test_properties)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionfence import MISSING, ChangeKind, Fingerprint

from .test_properties import BACKENDS, WINDOWS, apply, mutation, observe, truth_fp, truth_kind


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


# --- FileProbe.poll ---------------------------------------------------------------------


def test_poll_needs_a_baseline(impl: ModuleType, transcript: Path) -> None:
    with impl.FileProbe(transcript) as probe:
        assert probe.baseline is None
        with pytest.raises(ValueError, match="baseline"):
            probe.poll()


def test_poll_reports_an_append_once(impl: ModuleType, transcript: Path) -> None:
    with impl.FileProbe(transcript) as probe:
        probe.mark()
        assert probe.baseline == impl.fingerprint(transcript)
        _append(transcript, b'{"type":"x"}\n')
        assert probe.poll() == (ChangeKind.APPENDED, b'{"type":"x"}\n')
        assert probe.baseline == impl.fingerprint(transcript)
        assert probe.poll() == (ChangeKind.UNCHANGED, None)
        assert probe.fingerprint() == probe.baseline


def test_poll_is_check_append_against_the_baseline(impl: ModuleType, transcript: Path) -> None:
    with impl.FileProbe(transcript, window=8) as probe:
        before = probe.fingerprint()  # fingerprint() is a look too: it sets the baseline
        _append(transcript, b"x" * 100)
        change = impl.check_append(transcript, before, window=8, max_suffix=10)
        assert (
            probe.poll(max_suffix=10)
            == (change.kind, change.appended)
            == (
                ChangeKind.APPENDED,
                None,
            )
        )
        assert probe.baseline == change.after


def test_check_append_and_read_range_leave_the_baseline(impl: ModuleType, transcript: Path) -> None:
    with impl.FileProbe(transcript) as probe:
        probe.mark()
        base = probe.baseline
        _append(transcript, b"more\n")
        assert probe.check_append(base).kind is ChangeKind.APPENDED
        probe.read_range(0, 4)
        assert probe.baseline == base
        assert probe.poll() == (ChangeKind.APPENDED, b"more\n")


def test_poll_follows_delete_create_replace_truncate(impl: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with impl.FileProbe(path) as probe:
        probe.mark()
        assert probe.baseline == MISSING
        assert probe.poll() == (ChangeKind.UNCHANGED, None)
        path.write_bytes(b"one\n")
        assert probe.poll() == (ChangeKind.CREATED, b"one\n")
        path.write_bytes(b"on")  # same inode, shorter
        assert probe.poll() == (ChangeKind.TRUNCATED, None)
        other = tmp_path / "other"
        other.write_bytes(b"on")
        os.replace(other, path)
        assert probe.poll() == (ChangeKind.REPLACED, None)
        path.unlink()
        assert probe.poll() == (ChangeKind.DELETED, None)
        assert probe.baseline == MISSING


def test_poll_sees_a_rewrite(impl: ModuleType, transcript: Path) -> None:
    with impl.FileProbe(transcript) as probe:
        probe.mark()
        data = transcript.read_bytes()
        transcript.write_bytes(data.replace(b"session", b"SESSION"))
        assert probe.poll() == (ChangeKind.REWRITTEN, None)
        assert probe.poll() == (ChangeKind.UNCHANGED, None)


def test_mark_adopts_a_fingerprint(impl: ModuleType, transcript: Path) -> None:
    old = impl.fingerprint(transcript)
    _append(transcript, b"a\n")
    with impl.FileProbe(transcript) as probe:
        probe.mark(old)
        assert probe.baseline == old
        assert probe.poll() == (ChangeKind.APPENDED, b"a\n")
        probe.mark(MISSING)
        kind, appended = probe.poll()
        assert kind is ChangeKind.CREATED and appended == transcript.read_bytes()


def test_mark_checks_what_it_adopts(impl: ModuleType, transcript: Path) -> None:
    with impl.FileProbe(transcript) as probe:
        with pytest.raises(TypeError):
            probe.mark("not a fingerprint")
        with pytest.raises(ValueError):
            probe.mark(Fingerprint(True, 1, 2, size=5, tail_len=6))
        assert probe.baseline is None


def test_adopted_fingerprint_is_never_racy_clean(impl: ModuleType, transcript: Path) -> None:
    """A fingerprint adopted with mark(fp) has no read time: the next poll reads the bytes
    even when the stat matches (here: same stat, other content, as a coarse clock allows)."""
    real = impl.fingerprint(transcript)
    forged = Fingerprint(
        True, real.dev, real.ino, real.size, real.mtime_ns, real.ctime_ns, real.tail_len, 12345
    )
    with impl.FileProbe(transcript) as probe:
        probe.fingerprint()  # a kept handle, so the racy shortcut could apply
        probe._racy_ns = 0
        probe.mark(forged)
        assert probe.poll() == (ChangeKind.REWRITTEN, None)
        assert probe.baseline == real


def test_quiet_file_polls_unchanged_without_a_read(impl: ModuleType, transcript: Path) -> None:
    with impl.FileProbe(transcript) as probe:
        probe._racy_ns = 0  # timestamps predate the read
        probe.mark()
        base = probe.baseline
        assert probe.poll() == (ChangeKind.UNCHANGED, None)
        assert probe.baseline == base


def test_poll_argument_checks_and_close(impl: ModuleType, transcript: Path) -> None:
    probe = impl.FileProbe(transcript)
    probe.mark()
    with pytest.raises(ValueError):
        probe.poll(max_suffix=-1)
    with pytest.raises(TypeError):
        probe.poll(max_suffix=1.5)
    probe.close()
    assert probe.baseline is None
    with pytest.raises(ValueError, match="closed"):
        probe.poll()
    with pytest.raises(ValueError, match="closed"):
        probe.mark()


def test_poll_on_a_directory_raises(impl: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_bytes(b"x")
    with impl.FileProbe(path) as probe:
        probe.mark()
        path.unlink()
        path.mkdir()
        with pytest.raises(IsADirectoryError):
            probe.poll()


# --- ManyProbe ----------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(6):
        p = tmp_path / f"s{i}.jsonl"
        p.write_bytes(b'{"type":"session"}\n' * (i + 1))
        out.append(p)
    return out


def test_many_reports_each_change_once(impl: ModuleType, files: list[Path]) -> None:
    many = impl.ManyProbe([str(p) for p in files])
    assert len(many) == 6 and many.window == 4096
    assert many.paths == tuple(str(p) for p in files)
    assert many.poll() == []
    assert many.fingerprints() == impl.fingerprint_many(files)
    _append(files[4], b"a\n")
    _append(files[1], b"b\n")
    assert many.poll() == [1, 4]
    assert many[1] == impl.fingerprint(files[1])
    assert many[-2] == impl.fingerprint(files[4])
    assert many.poll() == []
    files[0].unlink()
    assert many.poll() == [0]
    assert many[0] == MISSING
    assert many.poll() == []
    files[0].write_bytes(b"again\n")
    assert many.poll() == [0]
    with pytest.raises(IndexError):
        many[6]


def test_many_missing_at_start(impl: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "later.jsonl"
    many = impl.ManyProbe([path], window=3)
    assert many.fingerprints() == [MISSING]
    path.write_bytes(b"hello")
    assert many.poll() == [0]
    assert many[0] == impl.fingerprint(path, window=3)


def test_many_error_names_the_path_and_moves_nothing(
    impl: ModuleType, files: list[Path], tmp_path: Path
) -> None:
    many = impl.ManyProbe(files)
    _append(files[0], b"x\n")
    files[3].unlink()
    files[3].mkdir()
    with pytest.raises(IsADirectoryError) as info:
        many.poll()
    assert info.value.filename == files[3]
    files[3].rmdir()
    assert many.poll() == [0, 3]  # the change before the bad file was not lost


def test_many_empty_and_bad_arguments(impl: ModuleType, tmp_path: Path) -> None:
    many = impl.ManyProbe([])
    assert many.poll() == [] and many.fingerprints() == [] and len(many) == 0
    with pytest.raises(ValueError):
        impl.ManyProbe([tmp_path / "a"], window=-1)
    with pytest.raises(ValueError):
        impl.ManyProbe(["a\0b"])
    with pytest.raises(TypeError):
        impl.ManyProbe([1.5])


def test_many_quiet_files_cost_a_stat(impl: ModuleType, files: list[Path]) -> None:
    many = impl.ManyProbe(files)
    many._racy_ns = 0  # every file predates the first read
    assert many.poll() == []
    _append(files[2], b"z\n")
    assert many.poll() == [2]


# --- properties: both backends against the ground truth ---------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    initial=st.one_of(st.none(), st.binary(max_size=3000)),
    steps=st.lists(st.lists(mutation, max_size=2), min_size=1, max_size=4),
    window=WINDOWS,
    max_suffix=st.sampled_from([0, 10, 1 << 20]),
    adopt=st.booleans(),
)
def test_poll_matches_ground_truth(
    initial: bytes | None,
    steps: list,  # type: ignore[type-arg]
    window: int,
    max_suffix: int,
    adopt: bool,
) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.jsonl"
        if initial is not None:
            path.write_bytes(initial)
        old = observe(path)
        probes = [impl.FileProbe(path, window=window) for impl in BACKENDS]
        try:
            for probe in probes:
                if adopt:
                    probe.mark(truth_fp(old, window))
                else:
                    probe.mark()
                assert probe.baseline == truth_fp(old, window)
            for ops in steps:
                for op in ops:
                    apply(path, op)
                new = observe(path)
                want = truth_kind(old, truth_fp(old, window), new, max_suffix)
                for probe in probes:
                    assert probe.poll(max_suffix=max_suffix) == want, probe
                    assert probe.baseline == truth_fp(new, window), probe
                old = new
        finally:
            for probe in probes:
                probe.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    initial=st.lists(st.one_of(st.none(), st.binary(max_size=500)), min_size=1, max_size=5),
    steps=st.lists(
        st.lists(st.tuples(st.integers(0, 4), mutation), max_size=3), min_size=1, max_size=4
    ),
    window=WINDOWS,
)
def test_many_poll_matches_ground_truth(
    initial: list[bytes | None],
    steps: list,  # type: ignore[type-arg]
    window: int,
) -> None:
    with tempfile.TemporaryDirectory() as d:
        paths = [Path(d) / f"s{i}.jsonl" for i in range(len(initial))]
        for path, data in zip(paths, initial, strict=True):
            if data is not None:
                path.write_bytes(data)
        seen = [truth_fp(observe(p), window) for p in paths]
        watchers = [impl.ManyProbe(paths, window=window) for impl in BACKENDS]
        for w in watchers:
            assert w.fingerprints() == seen
        for ops in steps:
            for index, op in ops:
                apply(paths[index % len(paths)], op)
            now = [truth_fp(observe(p), window) for p in paths]
            want = [i for i, (a, b) in enumerate(zip(seen, now, strict=True)) if a != b]
            for w in watchers:
                assert w.poll() == want
                assert w.fingerprints() == now
            seen = now
