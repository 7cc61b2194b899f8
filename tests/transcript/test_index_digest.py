"""The whole-content digest after an open through the index (issue 15): rebuilt from the
index's block hashes, the partial last block and the bytes parsed past the index, never by
rereading the prefix; what the fence is seeded with; and the trust it rests on (a prefix
edited in place after the index was written is caught by the next whole-content proof)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from sessionfence import SessionManager, SessionTakeoverError
from sessionfence.controller import SessionFenceController
from sessionfence.transcript import _index
from tests.hotpath.digest_reference import reference_digest

BLOCK = _index.BLOCK


def realistic(path: Path, size: int, seed: int = 3) -> None:
    from sessionfence.bench.transcript import write_session

    write_session(path, size, seed=seed, compact_every=200_000)


def line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def mirror(n: int) -> bytes:
    message = {
        "role": "assistant",
        "content": [{"type": "text", "text": f"mirrored {n}"}],
        "provider": "openclaw",
        "model": "delivery-mirror",
    }
    return line(
        {
            "type": "message",
            "id": f"ee{n:06x}",
            "parentId": None,
            "timestamp": "2026-12-05T00:00:00.000Z",
            "message": message,
        }
    )


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


class Counting:
    """Counts the backend's whole-content digests (``from_file`` of both digests,
    ``content_digest``) while they still run: the real functions, wrapped."""

    def __init__(self, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, int | None]] = []
        content = backend.content_digest
        for kind in (backend.RollingDigest, backend.BlockDigest):
            from_file = kind.from_file.__func__

            def counted_from_file(
                cls: type, path: Any, size: int | None = None, _real: Any = from_file
            ) -> Any:
                self.calls.append(("from_file", size))
                return _real(cls, path, size)

            monkeypatch.setattr(kind, "from_file", classmethod(counted_from_file))

        def counted_content(path: Any, size: int | None = None) -> int:
            self.calls.append(("content_digest", size))
            return int(content(path, size))

        monkeypatch.setattr(backend, "content_digest", counted_content)


@pytest.mark.parametrize("size", [BLOCK - 300, 3 * BLOCK + 5000, 4 * BLOCK])
def test_warm_open_rebuilds_the_digest_from_the_block_hashes(
    tmp_path: Path, backend: Any, size: int
) -> None:
    path = tmp_path / "s.jsonl"
    realistic(path, size)
    cold = SessionManager.open(path, index=True)
    assert cold.digest.intdigest() == backend.content_digest(path)
    index = _index.read_index(str(path))
    assert index is not None
    # The index's whole-block hashes are the digest's: the digest of the file is its
    # blocks' hashes plus the partial block, whatever else the file holds.
    full = index.size // BLOCK
    raw = path.read_bytes()
    rebuilt = backend.BlockDigest.from_blocks(index.blocks()[:full], raw[full * BLOCK :])
    assert rebuilt.intdigest() == reference_digest(raw) == cold.fence_digest().intdigest()

    warm = SessionManager.open(path)
    assert warm._index_size == index.size  # through the index
    assert warm.fence_digest().intdigest() == reference_digest(raw)
    assert warm.digest.intdigest() == backend.content_digest(path)
    assert warm.parsed_digest.intdigest() == backend.content_digest(path)
    assert warm.digest_size == warm.parsed_fingerprint.size == len(raw)

    # Lines parsed past the index, then own appends and a refresh: it rolls on.
    append(path, mirror(1) + mirror(2))
    later = SessionManager.open(path)
    assert later._index_size == index.size
    assert later.fence_digest().intdigest() == reference_digest(path.read_bytes())
    assert later.digest.intdigest() == backend.content_digest(path)
    later.append_message({"role": "user", "content": "own"})
    append(path, mirror(3))
    later.refresh()
    assert later.digest_size == os.path.getsize(path)
    assert later.digest.intdigest() == backend.content_digest(path)
    assert later.parsed_digest.intdigest() == backend.content_digest(path)
    assert later.fence_digest().intdigest() == reference_digest(path.read_bytes())


class TranscriptReads:
    """Bytes Python reads from the transcript's inode (``os.read``, ``os.pread``: what the
    parse, the index checks and the digest use; the real calls, wrapped)."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ino = os.stat(path).st_ino
        self.total = 0
        real_read, real_pread = os.read, os.pread

        def read(fd: int, n: int) -> bytes:
            data = real_read(fd, n)
            self._count(fd, data)
            return data

        def pread(fd: int, n: int, offset: int) -> bytes:
            data = real_pread(fd, n, offset)
            self._count(fd, data)
            return data

        monkeypatch.setattr(os, "read", read)
        monkeypatch.setattr(os, "pread", pread)

    def _count(self, fd: int, data: bytes) -> None:
        if os.fstat(fd).st_ino == self.ino:
            self.total += len(data)


@pytest.mark.skipif(not hasattr(os, "pread"), reason="counts os.pread")
async def test_a_fence_seeded_after_a_warm_open_reads_no_whole_file(
    tmp_path: Path, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.jsonl"
    realistic(path, 6 * BLOCK + 777)
    SessionManager.open(path, index=True)
    append(path, mirror(1))
    counting = Counting(backend, monkeypatch)
    reads = TranscriptReads(path, monkeypatch)
    manager = SessionManager.open(path)
    seed = manager.fence_digest()
    assert seed.intdigest() == reference_digest(path.read_bytes())
    # the tail window, the header, the partial block, the context rows, the new line
    assert reads.total < 2 * BLOCK < os.path.getsize(path) // 3
    ctl = await SessionFenceController.create(
        path, verify="tail", merge_foreign_entries=manager.merge_foreign_entries
    )
    try:
        ctl.seed_content_digest(manager.parsed_fingerprint, seed, manager.digest_size)
        await ctl.release_for_prompt()  # the fence's first activation
        append(path, mirror(2))  # a benign foreign append in the window
        await ctl.reacquire_after_prompt()
        assert not ctl.has_takeover
        async with ctl.write_lock():
            manager.append_message({"role": "user", "content": "own"})
        await ctl.release_for_prompt()
        await ctl.reacquire_after_prompt()
        assert not ctl.has_takeover
    finally:
        await ctl.dispose()
    assert counting.calls == []  # neither the manager nor the fence hashed the file whole


async def test_a_prefix_edited_after_the_index_is_caught_by_the_full_proof(
    tmp_path: Path, backend: Any
) -> None:
    """The trust note of docs/transcripts.md ("The digest"): the index is trusted for the
    prefix on the tail-mode basis, so an in-place edit of a block before the last, followed
    by an append, passes its checks; the digest rebuilt from it is then the digest of the
    content the index describes, not of the file, and a ``verify="full"`` fence seeded
    with it fails closed at its next whole-content proof."""
    path = tmp_path / "s.jsonl"
    realistic(path, 3 * BLOCK + 4321)
    SessionManager.open(path, index=True)
    original = path.read_bytes()
    at = original.index(b'"content":"', BLOCK // 2) + 12  # inside block 0, not the header
    edited = bytearray(original)
    edited[at] = ord("Z") if edited[at] != ord("Z") else ord("Y")
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.seek(at)
        f.write(edited[at : at + 1])
    append(path, mirror(1))

    manager = SessionManager.open(path)
    assert manager._index_size == len(original)  # the index passed its checks
    seed = manager.fence_digest()
    assert seed.intdigest() == reference_digest(original + mirror(1))
    assert seed.intdigest() != reference_digest(path.read_bytes())

    ctl = await SessionFenceController.create(
        path, verify="full", merge_foreign_entries=manager.merge_foreign_entries
    )
    try:
        ctl.seed_content_digest(manager.parsed_fingerprint, seed, manager.digest_size)
        await ctl.release_for_prompt()
        append(path, mirror(2))  # accepted only once the old content is proven unchanged
        with pytest.raises(SessionTakeoverError) as caught:
            await ctl.reacquire_after_prompt()
        assert caught.value.reason == "rewritten"
    finally:
        await ctl.dispose()

    # A cold open (no index) sees the file as it is, and so does a fresh fence.
    os.unlink(_index.index_path_for(path))
    fresh = SessionManager.open(path)
    assert fresh.digest.intdigest() == backend.content_digest(path)
    assert fresh.fence_digest().intdigest() == reference_digest(path.read_bytes())


async def test_seeding_a_fence_with_the_plain_digest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    realistic(path, 5000)
    manager = SessionManager.open(path)
    ctl = await SessionFenceController.create(path)
    try:
        with pytest.raises(TypeError, match="BlockDigest"):
            ctl.seed_content_digest(manager.parsed_fingerprint, manager.digest)
    finally:
        await ctl.dispose()
