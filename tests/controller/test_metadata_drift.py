"""A metadata-only change (touch, chmod, ctime drift) before a synchronous owned write.

The original refused to publish such a write (its before-state no longer matched the fence
by stat), so the next check rejected the owned compaction as a foreign append. Here the
before-state is judged by content, like every same-size change (SPEC §5.2 item 2); a real
content change disguised with the old mtime is still a takeover.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sessionfence import SessionTakeoverError

from .helpers import (
    compaction_append,
    is_expected_compaction,
    make,
)

pytestmark = [
    pytest.mark.usefixtures("backend"),
    pytest.mark.parametrize("verify", ["tail", "full"]),
]


def touch(path: Path) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000))


def chmod(path: Path) -> None:
    os.chmod(path, 0o600 if (os.stat(path).st_mode & 0o777) != 0o600 else 0o644)


@pytest.mark.parametrize("drift", [touch, chmod], ids=["touch", "chmod"])
async def test_owned_compaction_after_metadata_drift_is_published(
    session_file: Path, verify: str, drift: object
) -> None:
    ctl = await make(session_file, verify=verify)
    await ctl.release_for_prompt()
    drift(session_file)  # type: ignore[operator]
    ctl.owned_file_write(compaction_append(session_file), is_expected_compaction)
    await ctl.reacquire_after_prompt()
    assert not ctl.has_takeover
    await ctl.dispose()


async def test_disguised_rewrite_before_owned_compaction_is_still_a_takeover(
    session_file: Path, verify: str
) -> None:
    ctl = await make(session_file, verify=verify)
    await ctl.release_for_prompt()
    st = os.stat(session_file)
    with open(session_file, "r+b") as f:
        f.write(b"{")  # same byte: content unchanged so far
        f.seek(2)
        f.write(b"T")  # '"type"' -> '"Type"': same size, different content
    os.utime(session_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    ctl.owned_file_write(compaction_append(session_file), is_expected_compaction)
    with pytest.raises(SessionTakeoverError):
        await ctl.reacquire_after_prompt()
    await ctl.dispose()
