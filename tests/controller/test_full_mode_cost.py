"""verify="full": at most one whole-content digest per prompt window, none per owned append
made under a held, intact lock (issue 16), and still no adoption of an in-place edit made
during the held period (it is caught by the next fence check's digest)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from sessionfence import SessionFenceController, SessionManager, SessionTakeoverError

pytestmark = [
    pytest.mark.usefixtures("backend"),
    pytest.mark.skipif(
        not os.path.exists("/proc/self/io"), reason="counts bytes read through /proc/self/io"
    ),
]


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _big(tmp_path: Path) -> tuple[Path, int]:
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"type":"session"}\n' + b'{"type":"custom","id":"x"}\n' * 200_000)
    return path, path.stat().st_size


def test_owned_appends_under_the_held_lock_read_no_prefix(tmp_path: Path) -> None:
    path, size = _big(tmp_path)

    async def main() -> None:
        manager = SessionManager.open(path)
        ctl = await SessionFenceController.create(path, verify="full")
        manager.writer = ctl.writer
        await ctl.release_for_prompt()
        await ctl.reacquire_after_prompt()
        start = _bytes_read()
        for i in range(20):  # scopes under the retained lock, and a bare refresh
            async with ctl.write_lock():
                manager.append_message({"role": "assistant", "content": f"turn {i}"})
            manager.append_message({"role": "assistant", "content": f"more {i}"})
            ctl.refresh_after_owned_write()
        assert _bytes_read() - start < size // 10  # no whole-content digest per append
        await ctl.release_for_prompt()
        start = _bytes_read()
        await ctl.reacquire_after_prompt()  # the window's one proof
        assert size <= _bytes_read() - start < 3 * size
        assert not ctl.has_takeover
        await ctl.dispose()

    asyncio.run(main())


def test_an_in_place_edit_during_the_held_period_is_caught_at_the_next_check(
    tmp_path: Path,
) -> None:
    path, _size = _big(tmp_path)

    async def main() -> None:
        manager = SessionManager.open(path)
        ctl = await SessionFenceController.create(path, verify="full")
        manager.writer = ctl.writer
        await ctl.release_for_prompt()
        await ctl.reacquire_after_prompt()
        stat = path.stat()
        with open(path, "r+b") as f:  # a writer that ignores the lock, far from the tail
            f.seek(1000)
            f.write(b"EVIL")
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        # The own append after it proves nothing about the prefix: the edit is caught by the
        # scope's check (its ctime moved) or, where the stat stayed equal (a coarse clock),
        # by the next fence check's digest.
        with pytest.raises(SessionTakeoverError) as caught:
            async with ctl.write_lock():
                manager.append_message({"role": "assistant", "content": "after the edit"})
            await ctl.release_for_prompt()
            await ctl.reacquire_after_prompt()
        assert caught.value.reason == "rewritten"
        await ctl.dispose()

    asyncio.run(main())
