"""The fence check and the owned-write publication (reference §5.3-§5.5, §5.7).

``FenceChecks`` decides, from a fence snapshot and what ``check_append`` saw, whether a
change is owned (recorded by this or a peer controller), an identical rewrite, a benign
append (through the policy and the merge callback) or a takeover; and publishes this
controller's own writes into the process-wide registry.
"""

from __future__ import annotations

import asyncio

from .._merge import MergeResult, PublishedEntry
from .._ownership import LIVE_MANAGERS
from .._types import (
    Change,
    ChangeKind,
    Fingerprint,
    same_stat,
)
from ._classify import (
    Classified,
    Rejected,
    classify_initialization,
    classify_lines,
    same_published_entries,
    split_lines,
)
from ._scope import (
    call_maybe_async,
    release_lock,
)
from ._snapshot import FenceSnapshot
from ._state import REASON_BY_KIND, ControllerState
from ._trust import REGISTRY

__all__ = ["FenceChecks"]


class _Merged:
    __slots__ = ("post_merge_published", "published_entries", "requires_reload", "snapshot")

    def __init__(
        self,
        snapshot: FenceSnapshot,
        published_entries: list[PublishedEntry] | None,
        post_merge_published: list[PublishedEntry] | None,
        requires_reload: bool,
    ) -> None:
        self.snapshot = snapshot
        self.published_entries = published_entries
        self.post_merge_published = post_merge_published
        self.requires_reload = requires_reload


class FenceChecks(ControllerState):
    """Fence snapshots, classification, merges, the fence check and publications."""

    # snapshots -------------------------------------------------------------------------------

    def _prove_prefix(self, prev: FenceSnapshot, change: Change) -> bool:
        """verify="full": an append is accepted only if the old content is unchanged."""
        if not self._full or change.kind is not ChangeKind.APPENDED:
            return True
        return self._io.prefix_unchanged(prev)

    def _roll(
        self, prev: FenceSnapshot, change: Change, *, need_digest: bool, proven: bool = False
    ) -> FenceSnapshot:
        """Snapshot of change.after from prev; under our own lock a failed full-mode proof
        only means the digest has to be recomputed, not a takeover."""
        if not proven and not self._prove_prefix(prev, change):
            return self._io.fresh_digest(change.after)
        return self._io.advance(prev, change, need_digest=need_digest)

    def _capture_write_start(self) -> FenceSnapshot:
        fp = self._io.fingerprint()
        if self._fence.fingerprint == fp:
            return self._fence
        snap = FenceSnapshot(fp, REGISTRY.lookup_digest(self._key, fp))
        if self._full and not snap.has_digest:
            snap = self._io.fresh_digest(fp)
        return snap

    # classification and merge ----------------------------------------------------------------

    def _classify(
        self, prev: FenceSnapshot, change: Change, expected: list[PublishedEntry] | None
    ) -> Classified | Rejected:
        """Owned mode (lines must match ``expected``) when ``expected`` is given, else
        unowned mode through the benign policy."""
        policy = None if expected is not None else self._policy
        prev_fp = prev.fingerprint
        initializing = (
            expected is not None
            and change.after.exists
            and (not prev_fp.exists or prev_fp.size == 0)
            and change.kind in (ChangeKind.CREATED, ChangeKind.APPENDED)
        )
        if not initializing and change.kind is not ChangeKind.APPENDED:
            return Rejected(f"the transcript was {REASON_BY_KIND.get(change.kind, 'changed')}")
        base = prev_fp.size if change.kind is ChangeKind.APPENDED else 0
        grown = change.after.size - base
        if policy is not None and grown > policy.max_unowned_append_bytes:
            return Rejected(
                f"unowned append of {grown} bytes exceeds {policy.max_unowned_append_bytes} bytes",
                base,
            )
        data = self._io.suffix(change)
        if data is None:
            return Rejected("the transcript moved on while its appended bytes were read", base)
        lines = split_lines(data, base)
        if isinstance(lines, Rejected):
            return lines
        if initializing:
            assert expected is not None
            return classify_initialization(lines, expected)

        def known_id(entry_id: str) -> bool:
            # Ids in the fenced prefix, as far as an open SessionManager can tell.
            return LIVE_MANAGERS.knows_id(self._key, entry_id, prev_fp.size)

        return classify_lines(lines, policy=policy, expected=expected, known_id=known_id)

    async def _merge_change(
        self,
        prev: FenceSnapshot,
        change: Change,
        expected: list[PublishedEntry] | None,
        phase: str,
        classified: Classified | None = None,
    ) -> _Merged | Rejected:
        """Hand the appended entries to the merge callback (reference §5.5)."""
        assert self._merge_cb is not None
        if classified is None:
            result = self._classify(prev, change, expected)
            if isinstance(result, Rejected):
                return result
            classified = result
        if expected is not None and not same_published_entries(classified.published, expected):
            return Rejected("the written entries differ from the declared ones")
        try:
            outcome = await call_maybe_async(self._merge_cb, list(classified.entries))
        except asyncio.CancelledError:
            raise  # the caller was cancelled: nothing was decided, nothing is marked
        except BaseException as exc:
            self._change_takeover(
                change, phase, f"merge callback failed: {exc!r}", "merge-rejected"
            )
            raise
        if outcome is not None and not isinstance(outcome, MergeResult):
            raise self._change_takeover(
                change, phase, f"merge callback returned {type(outcome).__name__}", "merge-rejected"
            )
        base = self._io.advance(prev, change, need_digest=self._fence_active)
        reported = outcome.session_file_snapshot if outcome is not None else None
        if reported is None:
            now = self._io.fingerprint()
            if now != change.after:
                raise self._change_takeover(
                    change, phase, "the transcript changed during the merge", "merge-rejected"
                )
            snapshot = base
        else:
            moved = self._io.observe(change.after)
            # The callback may have rewritten the file (declared by requires_reload); it
            # must report the state it left: same stat, and same tail where comparable.
            if not (reported.exists and _same_state(moved.after, reported)):
                raise self._record_takeover(
                    "merge-rejected",
                    phase,
                    before=change.after,
                    after=moved.after,
                    detail="the merge callback did not report the state it left",
                )
            snapshot = self._io.advance(base, moved, need_digest=self._fence_active)
        requires_reload = bool(outcome is not None and outcome.requires_reload)
        post = (
            None
            if outcome is None or outcome.published_entries is None
            else list(outcome.published_entries)
        )
        published = None if requires_reload else list(classified.published) + (post or [])
        return _Merged(snapshot, published, post, requires_reload)

    # the fence check -------------------------------------------------------------------------

    async def _assert_fence(self, phase: str, *, prove_racy: bool = True) -> None:
        """Reference §5.3: did the transcript change, since this fence last saw it, in a
        way this controller does not own? Raises SessionTakeoverError when it did."""
        if not self._fence_active:
            return
        change = self._io.observe_quiet(self._fence.fingerprint)
        await self._judge(change, phase, prove_racy=prove_racy)

    async def _judge(self, change: Change, phase: str, *, prove_racy: bool = True) -> None:
        """Accept ``change`` of the fenced file (owned, benign, metadata-only with the
        content proven) and move the fence to it, or record and raise a takeover.

        ``prove_racy=False`` (at release) leaves the whole-content proof of a racy fence to
        the next fence check, which makes it anyway: one digest per prompt window."""
        fence = self._fence
        if change.kind is ChangeKind.UNCHANGED:
            if prove_racy and self._full and not fence.quiet:
                # Racy fence: the stat cannot prove the content, the digest must.
                self._prove_racy_fence(change, phase)
            return
        current = change.after
        last = REGISTRY.latest_owned_write(self._key)
        if (
            last is not None
            and last.generation > self._fence_generation
            and last.fingerprint == current
        ):
            await self._accept_owned_writes(change, last.generation, phase)
            return
        if change.kind is ChangeKind.TOUCHED:
            self._accept_identical_content(change, phase)
            return
        if change.kind is not ChangeKind.APPENDED:
            raise self._change_takeover(change, phase)
        if not self._prove_prefix(fence, change):
            raise self._change_takeover(
                change, phase, "content before the append changed (verify=full)", "rewritten"
            )
        classified = self._classify(fence, change, None)
        if isinstance(classified, Rejected):
            raise self._change_takeover(change, phase, _detail(classified))
        if self._merge_cb is None:
            if not self._policy.accepts(classified.kind, has_merge_callback=False):
                raise self._change_takeover(
                    change, phase, f"{classified.kind} entries need a merge callback"
                )
            self._fence = self._roll(fence, change, need_digest=True, proven=True)
            generation = REGISTRY.trust_state(self._key, current)
            self._set_fence_generation(
                generation if generation is not None else self._fence_generation
            )
            return
        if not self._policy.accepts(classified.kind, has_merge_callback=True):
            raise self._change_takeover(change, phase, f"{classified.kind} entries are not benign")
        merged = await self._merge_change(fence, change, None, phase, classified)
        if isinstance(merged, Rejected):
            raise self._change_takeover(change, phase, _detail(merged), "merge-rejected")
        self._fence = merged.snapshot
        self._set_fence_generation(
            REGISTRY.record_owned_write(
                self._key,
                merged.snapshot.fingerprint,
                merged.published_entries,
                merged.requires_reload,
            )
        )

    def _prove_racy_fence(self, change: Change, phase: str) -> None:
        """verify="full", equal fingerprint, racy fence: prove the whole content by digest
        (one read at C speed, at most once per quiet period of the file)."""
        fence = self._fence
        if not fence.fingerprint.exists:
            return
        proven = self._io.prove_unchanged(fence)
        if proven is None:
            raise self._change_takeover(
                change,
                phase,
                "same-size rewrite with equal stat (within one timestamp granule): "
                "the content digest differs",
                "rewritten",
            )
        self._fence = proven

    def _accept_identical_content(self, change: Change, phase: str) -> None:
        """Same file, same size, times moved: accepted only when the content digest is
        unchanged, for any size (no 32 MiB cliff: SPEC §5.2 item 2)."""
        fence = self._fence
        if fence.digest is None:
            raise self._change_takeover(
                change, phase, "same-size change and no content digest to compare", "rewritten"
            )
        now = self._io.fresh_digest(change.after)
        if now.digest is None or now.fingerprint != change.after:
            raise self._change_takeover(
                change, phase, "the transcript kept changing while its content was hashed"
            )
        if now.digest.intdigest() != fence.digest.intdigest():
            raise self._change_takeover(change, phase, "same-size rewrite with different content")
        self._fence = now
        self._set_fence_generation(REGISTRY.record_trusted(self._key, change.after))

    async def _accept_owned_writes(self, change: Change, last_generation: int, phase: str) -> None:
        """Owned writes by this or another in-process controller led to the current state."""
        fence = self._fence
        current = change.after
        unseen = REGISTRY.owned_writes_after(self._key, self._fence_generation)
        if any(w.requires_reload for w in unseen):
            if self._reload_cb is None:
                raise self._change_takeover(
                    change, phase, "an owned rewrite needs a reload callback", "reload-failed"
                )
            try:
                await call_maybe_async(self._reload_cb)
            except BaseException as exc:
                self._change_takeover(change, phase, f"reload failed: {exc!r}", "reload-failed")
                raise
            now = self._io.fingerprint()
            if now != current:
                raise self._record_takeover(
                    "reload-failed",
                    phase,
                    before=current,
                    after=now,
                    detail="the transcript changed during the reload",
                )
            self._fence = self._io.fresh_digest(current)
            self._set_fence_generation(last_generation)
            return
        if not self._prove_prefix(fence, change):
            raise self._change_takeover(
                change, phase, "content before the owned append changed (verify=full)", "rewritten"
            )
        if self._full and not self._peer_bytes_proven(fence, change):
            raise self._change_takeover(
                change,
                phase,
                "the owned append's bytes differ from what its writer recorded (verify=full)",
                "rewritten",
            )
        if self._merge_cb is None:
            # Without a session to resync, a peer's owned write is accepted by fingerprint.
            self._fence = self._roll(fence, change, need_digest=True, proven=True)
            self._set_fence_generation(last_generation)
            return
        expected: list[PublishedEntry] | None = None
        if all(w.published_entries is not None for w in unseen):
            expected = [dict(e) for w in unseen for e in (w.published_entries or ())]
        merged = await self._merge_change(fence, change, expected, phase)
        if isinstance(merged, Rejected):
            reason = "merge-rejected" if expected is not None else None
            raise self._change_takeover(change, phase, _detail(merged), reason)
        fp = merged.snapshot.fingerprint
        generation = last_generation
        if fp != current:  # the callback itself wrote (e.g. a leaf control)
            generation = REGISTRY.record_owned_write(
                self._key, fp, merged.post_merge_published, merged.requires_reload
            )
        self._fence = merged.snapshot
        self._set_fence_generation(generation)

    def _peer_bytes_proven(self, fence: FenceSnapshot, change: Change) -> bool:
        """verify="full": the bytes another controller of this process appended are still
        what it recorded. Its owned write left the digest of the whole file in the registry;
        our proven prefix digest rolled over the suffix as it reads now must equal it. (An
        equal stat proves nothing when the write was racy: a same-tick rewrite keeps it.)"""
        if change.kind is not ChangeKind.APPENDED or fence.digest is None:
            return True
        claimed = REGISTRY.lookup_digest(self._key, change.after)
        if claimed is None:
            return True  # the writer kept no digest: the stat and tail window decide
        data = self._io.suffix(change)
        if data is None:
            return False
        rolled = fence.digest.copy()
        rolled.update(data)
        return bool(rolled.intdigest() == claimed.intdigest())

    async def _publish_owned_fence(
        self, before: FenceSnapshot, expected: list[PublishedEntry] | None
    ) -> None:
        """Record what a publishing write scope wrote as owned (reference §5.7), if it is a
        proven append (or the declared creation of the transcript) of exactly the declared
        entries. Own entries are not fed to the merge callback: the writer already has them
        (a peer controller merges them at its own fence check)."""
        if self._takeover is not None:
            return
        change = self._io.observe(before.fingerprint)
        if change.kind is ChangeKind.UNCHANGED:
            return
        current = change.after
        trusted_before = (
            self._fence_active and self._fence.fingerprint == before.fingerprint
        ) or REGISTRY.is_trusted(self._key, before.fingerprint)
        if not trusted_before:
            return  # the next fence check judges the change as unowned
        prev_fp = before.fingerprint
        initializing = (
            expected is not None
            and current.exists
            and (not prev_fp.exists or prev_fp.size == 0)
            and change.kind in (ChangeKind.CREATED, ChangeKind.APPENDED)
        )
        if change.kind is not ChangeKind.APPENDED and not initializing:
            if self._fence_active and self._fence.fingerprint == prev_fp:
                # Nothing appended: judged like any fence check (a touch or chmod by
                # someone else passes when the content is proven unchanged).
                await self._judge(change, "fence_check")
                return
            raise self._change_takeover(change, "fence_check")
        if not self._prove_prefix(before, change):
            raise self._change_takeover(
                change, "fence_check", "content before the owned append changed", "rewritten"
            )
        published = expected
        if expected is not None:
            classified = self._classify(before, change, expected)
            if isinstance(classified, Rejected):
                raise self._change_takeover(
                    change, "fence_check", _detail(classified), "merge-rejected"
                )
            if not same_published_entries(classified.published, expected):
                raise self._change_takeover(
                    change,
                    "fence_check",
                    "the written entries differ from the declared ones",
                    "merge-rejected",
                )
            published = list(classified.published)
        generation = REGISTRY.record_owned_write(self._key, current, published)
        snapshot = self._roll(before, change, need_digest=self._fence_active, proven=True)
        if self._fence_active:
            self._fence = snapshot
            self._set_fence_generation(generation)

    def _snapshot_for(self, fp: Fingerprint) -> FenceSnapshot:
        if self._fence.fingerprint == fp:
            return self._fence
        return FenceSnapshot(fp, REGISTRY.lookup_digest(self._key, fp))

    async def _release_held_lock_with_fence(self) -> None:
        """Release the held lock and leave the fence on the file as it is now.

        An active fence judges what happened while the lock was held exactly as it judges
        a prompt window (SPEC §5.2 item 6): nothing is adopted, and a lock lost while held
        is a takeover (``lock-lost``). The takeover is recorded, the lock released, and the
        error raised. Before the first release the fence is inactive: the state at release
        becomes its baseline (reference §5.1)."""
        if self._held is None:
            await self._wait_drain()
            return
        await self._claim_drain()
        try:
            if not await self._wait_retained_idle():
                self._release_deferred = True  # the scope finishes the release
                return
            lock, self._held = self._held, None
            if lock is None:
                return
            try:
                if self._fence_active:
                    self._raise_if_lock_lost(lock, "fence_check")
                    await self._judge(
                        self._io.observe_quiet(self._fence.fingerprint),
                        "fence_check",
                        prove_racy=False,
                    )
                    if not self._fence.has_digest:
                        self._fence = self._io.fresh_digest(self._fence.fingerprint)
                    return
                change = self._io.observe_quiet(self._fence.fingerprint)
                fp = change.after
                last = REGISTRY.latest_owned_write(self._key)
                trusted_generation = REGISTRY.trust_state(self._key, fp)
                self._fence = self._roll(self._fence, change, need_digest=True)
                if last is not None and last.fingerprint == fp:
                    generation = last.generation
                elif trusted_generation is not None:
                    generation = trusted_generation
                else:
                    generation = self._fence_generation
                self._activate_fence(generation)
            finally:
                await release_lock(lock)
        finally:
            self._finish_drain()


def _same_state(a: Fingerprint, b: Fingerprint) -> bool:
    """Equal stat, and equal tail hash when both cover the same window."""
    return same_stat(a, b) and (a.tail_len != b.tail_len or a.tail_hash == b.tail_hash)


def _detail(rejected: Rejected) -> str:
    if rejected.offset is None:
        return rejected.detail
    return f"{rejected.detail} at offset {rejected.offset}"
