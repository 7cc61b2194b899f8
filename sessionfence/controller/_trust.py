"""Process-wide fence state shared by every controller (docs/design.md, "Trust registry").

One registry per process, keyed by the session file key (``_util.session_key``, the lock's
key too): the trusted state of each transcript, the history of owned writes that fences have
not seen yet, one global generation counter, and the content digest cache that lets a digest
be computed at most once per file per process (docs/design.md, "Fence snapshots").
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .._callbacks import PublishedEntry
from .._types import Fingerprint

__all__ = ["REGISTRY", "OwnedWrite", "Registry", "same_state"]

# A fleet supervisor may touch thousands of transcripts; one digest each is plenty and the
# bound keeps a long-lived process from growing without limit.
_DIGEST_CACHE_KEYS = 4096


def same_state(a: Fingerprint, b: Fingerprint) -> bool:
    """Whether ``a`` and ``b`` describe one state of the file: equal stat, and equal
    tail-window hash wherever both cover the same window. Stat alone is not enough: with
    coarse timestamps a same-size rewrite can keep it. Fingerprints taken with different
    windows (a caller's default 4 KiB vs a controller's) compare by stat alone."""
    return (
        a.exists == b.exists
        and a.dev == b.dev
        and a.ino == b.ino
        and a.size == b.size
        and a.mtime_ns == b.mtime_ns
        and a.ctime_ns == b.ctime_ns
        and (a.tail_len != b.tail_len or a.tail_hash == b.tail_hash)
    )


class OwnedWrite(NamedTuple):  # NamedTuple: built on every owned write, cheaply
    generation: int
    fingerprint: Fingerprint
    published_entries: tuple[PublishedEntry, ...] | None = None
    requires_reload: bool = False


@dataclass
class _History:
    active_fence_generations: dict[str, int] = field(default_factory=dict)
    writes: list[OwnedWrite] = field(default_factory=list)


class _Trusted(NamedTuple):
    generation: int
    fingerprint: Fingerprint


class Registry:
    """Trust registry, owned-write history, generation counter and digest cache.

    States are compared as whole fingerprints (stat *and* tail-window hash), never by stat
    alone: with coarse timestamps a same-size rewrite can keep the stat (docs/design.md,
    "Racy fences")."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._owned: dict[str, _History] = {}
        self._trusted: dict[str, _Trusted] = {}
        self._counter = 0
        # key -> (fingerprint, digest of [0, fingerprint.size)). Digest objects are shared
        # between the cache and fences and never mutated: rolling forward copies first.
        self._digests: OrderedDict[str, tuple[Fingerprint, Any]] = OrderedDict()

    # generations -------------------------------------------------------------------------

    def _next_generation(self) -> int:
        self._counter += 1
        return self._counter

    def record_owned_write(
        self,
        key: str,
        fp: Fingerprint,
        published_entries: list[PublishedEntry] | None = None,
        requires_reload: bool = False,
    ) -> int:
        generation = self._next_generation()
        history = self._history(key)
        entries = None if published_entries is None else tuple(dict(e) for e in published_entries)
        history.writes.append(OwnedWrite(generation, fp, entries, requires_reload))
        self._prune(key)
        self._trusted[key] = _Trusted(generation, fp)
        return generation

    def record_trusted(self, key: str, fp: Fingerprint) -> int:
        generation = self._next_generation()
        self._trusted[key] = _Trusted(generation, fp)
        return generation

    def trust_state(self, key: str, fp: Fingerprint) -> int | None:
        """Generation of ``fp`` when it is the trusted state; trusts it when nothing is."""
        trusted = self._trusted.get(key)
        if trusted is None:
            return self.record_trusted(key, fp)
        return trusted.generation if same_state(trusted.fingerprint, fp) else None

    def is_trusted(self, key: str, fp: Fingerprint) -> bool:
        trusted = self._trusted.get(key)
        return trusted is not None and same_state(trusted.fingerprint, fp)

    # owned-write history -----------------------------------------------------------------

    def latest_owned_write(self, key: str) -> OwnedWrite | None:
        history = self._owned.get(key)
        if history is None or not history.writes:
            return None
        return history.writes[-1]

    def owned_writes_after(self, key: str, generation: int) -> list[OwnedWrite]:
        history = self._owned.get(key)
        if history is None:
            return []
        return [w for w in history.writes if w.generation > generation]

    def _history(self, key: str) -> _History:
        history = self._owned.get(key)
        if history is None:  # not setdefault: that would build a _History every call
            history = self._owned[key] = _History()
        return history

    def set_active_fence(self, key: str, controller_id: str, generation: int) -> None:
        history = self._history(key)
        history.active_fence_generations[controller_id] = generation
        self._prune(key)

    def drop_active_fence(self, key: str, controller_id: str) -> None:
        history = self._owned.get(key)
        if history is None:
            return
        history.active_fence_generations.pop(controller_id, None)
        self._prune(key)

    def _prune(self, key: str) -> None:
        history = self._owned.get(key)
        if history is None:
            return
        if not history.active_fence_generations:
            # Nobody can still need these writes; a later controller only sees trust.
            del self._owned[key]
            return
        floor = min(history.active_fence_generations.values())
        writes = history.writes
        if writes and writes[0].generation <= floor:  # generations grow along the list
            history.writes = [w for w in writes if w.generation > floor]

    # content digests ---------------------------------------------------------------------

    def lookup_digest(self, key: str, fp: Fingerprint) -> Any | None:
        """The cached digest of ``fp``'s content, if known (shared: do not mutate it)."""
        cached = self._digests.get(key)
        if cached is None or not fp.exists or not same_state(cached[0], fp):
            return None
        self._digests.move_to_end(key)
        return cached[1]

    def remember_digest(self, key: str, fp: Fingerprint, digest: Any) -> None:
        """Cache ``digest`` (of [0, fp.size)); the caller must not mutate it afterwards."""
        if not fp.exists:
            return
        self._digests[key] = (fp, digest)
        self._digests.move_to_end(key)
        while len(self._digests) > _DIGEST_CACHE_KEYS:
            self._digests.popitem(last=False)


REGISTRY = Registry()
