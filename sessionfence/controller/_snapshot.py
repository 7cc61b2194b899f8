"""Fence snapshots: a Fingerprint plus a rolling content digest, never the file's bytes.

A snapshot is the file's fingerprint and, when known, a ``BlockDigest`` (the block-structured
XXH3-128 content digest, which the transcript index can rebuild without the bytes) of bytes
``[0, size)``. Appends roll the digest forward with the appended bytes only (read
positionally), so keeping it costs O(appended bytes); the digest is computed from the file at
most once per file per process (the registry caches it) and that is the only whole-file read
on the hot path (docs/design.md, "Fence snapshots"). The openclaw controller kept the whole
transcript (<= 8 MiB) or its SHA-256 (<= 32 MiB) per fence and reread it after every write.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from .._backend import HotPath, Probe
from .._types import MISSING, RACY_NS, Change, ChangeKind, Fingerprint, same_stat
from ._trust import REGISTRY

__all__ = ["FenceSnapshot", "SnapshotIO", "quiet_since"]

_SUFFIX_CHUNK = 1 << 20
_STABLE_DIGEST_TRIES = 4


class FenceSnapshot(NamedTuple):
    """What the fence last saw: a fingerprint and, when known, the digest of its content.

    ``quiet``: the digest was proven against the file by a read that started more than one
    timestamp granule (``RACY_NS``) after the file's mtime and ctime. Only then does an equal
    stat prove the whole content unchanged (git's racy-clean rule): a write after that read
    stamps a later time. A snapshot of a file written within the granule is *racy*: a
    same-size rewrite in the same tick leaves the stat equal, so ``verify="full"`` proves the
    content by digest at the next check instead (docs/design.md, "Racy fences")."""

    fingerprint: Fingerprint
    digest: Any | None = None  # BlockDigest of [0, fingerprint.size); shared, never mutated
    quiet: bool = False

    @property
    def has_digest(self) -> bool:
        return self.digest is not None or not self.fingerprint.exists


def quiet_since(fp: Fingerprint, read_started_ns: int) -> bool:
    """Whether a read that started at ``read_started_ns`` (wall clock) saw ``fp``'s file
    already quiet for a granule: any later write would move its mtime or ctime."""
    horizon = read_started_ns - RACY_NS
    return fp.exists and fp.mtime_ns < horizon and fp.ctime_ns < horizon


class SnapshotIO:
    """The file operations of one controller, all O(1) or O(appended bytes) but one:
    ``fresh_digest`` (whole file), which runs once per file per process or on rewrites."""

    def __init__(self, path: str, key: str, window: int, hot: HotPath) -> None:
        self.path = path
        self.key = key
        self.window = window
        self.hot = hot  # the backend, fixed for the controller's life
        self._probe: Probe | None = None

    @property
    def probe(self) -> Probe:
        probe = self._probe
        if probe is None or probe.closed:  # re-created after close()
            probe = self._probe = self.hot.FileProbe(self.path, window=self.window)
        return probe

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    def fingerprint(self) -> Fingerprint:
        return self.probe.fingerprint()

    def observe(self, before: Fingerprint) -> Change:
        """check_append against ``before``: stat, old tail window, suffix up to 1 MiB."""
        return self.probe.check_append(before)

    def observe_quiet(self, before: Fingerprint) -> Change:
        """``observe`` for where no change is the common case: a fingerprint first (one
        stat on a file quiet for a granule, else stat + tail window), the full check only
        when it differs. Equal stat is not enough: the probe re-reads the tail window of a
        racy file, and a different tail hash is a change whatever the times say."""
        fp = self.fingerprint()
        if fp == before:
            return Change(ChangeKind.UNCHANGED, before, fp)
        return self.observe(before)

    def suffix(self, change: Change) -> bytes | None:
        """All bytes ``[before.size, after.size)`` of an APPENDED/CREATED change, or None
        when the file moved on in a way that makes a late read meaningless."""
        if change.appended is not None:
            return change.appended
        start = change.before.size if change.kind is ChangeKind.APPENDED else 0
        end = change.after.size
        parts: list[bytes] = []
        offset = start
        try:
            while offset < end:
                n = min(_SUFFIX_CHUNK, end - offset)
                parts.append(self.probe.read_range(offset, n))
                offset += n
        except (OSError, ValueError):
            return None
        # The chunks were read after check_append; they describe ``after`` only if the file
        # is still that file with that content up to after.size.
        again = self.observe(change.after)
        if again.kind not in (ChangeKind.UNCHANGED, ChangeKind.APPENDED):
            return None
        return b"".join(parts)

    def prefix_unchanged(self, snap: FenceSnapshot) -> bool:
        """verify="full": bytes [0, snap.size) of the file still hash to snap's digest."""
        fp = snap.fingerprint
        if not fp.exists:
            return True
        if snap.digest is None:
            return False
        try:
            actual = self.hot.block_digest(self.path, fp.size)
        except (OSError, ValueError):
            return False
        return bool(actual == snap.digest.intdigest())

    def prove_unchanged(self, snap: FenceSnapshot) -> FenceSnapshot | None:
        """``snap`` again, marked quiet when it now is, if the file still has exactly its
        content (whole-content digest, the stat unchanged around the read); None when the
        content differs or cannot be proven. The racy case of ``verify="full"``."""
        fp = snap.fingerprint
        if not fp.exists or snap.digest is None:
            return None
        started = time.time_ns()
        if not self.prefix_unchanged(snap):
            return None
        if self.fingerprint() != fp:
            return None
        return FenceSnapshot(fp, snap.digest, quiet_since(fp, started))

    def fresh_digest(self, fp: Fingerprint) -> FenceSnapshot:
        """Snapshot of ``fp`` with a digest from the cache or, failing that, from the file.

        The whole-file read: callers use it only when no digest can be rolled forward
        (first activation in this process, or after a rewrite)."""
        if not fp.exists:
            return FenceSnapshot(MISSING)
        cached = REGISTRY.lookup_digest(self.key, fp)
        if cached is not None:
            return FenceSnapshot(fp, cached)
        current = fp
        for _ in range(_STABLE_DIGEST_TRIES):
            started = time.time_ns()
            try:
                digest = self.hot.BlockDigest.from_file(self.path, current.size)
            except (OSError, ValueError):
                digest = None
            post = self.fingerprint()
            if digest is not None and post == current:
                REGISTRY.remember_digest(self.key, current, digest)
                return FenceSnapshot(current, digest, quiet_since(current, started))
            if not same_stat(post, fp):
                # The file is no longer the state we were asked about: no digest for it.
                return FenceSnapshot(fp)
            current = post
        return FenceSnapshot(fp)

    def advance(self, prev: FenceSnapshot, change: Change, *, need_digest: bool) -> FenceSnapshot:
        """Snapshot of ``change.after`` built from ``prev`` with O(appended bytes) work.

        ``need_digest``: compute a digest from the file when it cannot be rolled forward
        (an active fence must always be able to judge a later same-size change)."""
        after = change.after
        if prev.fingerprint == after and (prev.has_digest or not need_digest):
            return prev
        if not after.exists:
            return FenceSnapshot(MISSING)
        rollable = (change.kind is ChangeKind.APPENDED and prev.digest is not None) or (
            change.kind is ChangeKind.CREATED
        )
        if rollable:
            data = self.suffix(change)
            if data is not None:
                if change.kind is ChangeKind.APPENDED:
                    digest = prev.digest.copy()  # type: ignore[union-attr]
                else:
                    digest = self.hot.BlockDigest()
                digest.update(data)
                REGISTRY.remember_digest(self.key, after, digest)
                return FenceSnapshot(after, digest)
        cached = REGISTRY.lookup_digest(self.key, after)
        if cached is not None:
            return FenceSnapshot(after, cached)
        if need_digest:
            return self.fresh_digest(after)
        return FenceSnapshot(after)
