"""A chat log in a JSONL format of your own, guarded by sessionfence without SessionManager.

Run it::

    python examples/own_chat_log.py [LOG]        # default: chat.jsonl in a temporary directory

The log is one JSON object per line, ``{"id", "role", "text", "at"}``; a line that a
delivery mirror copies in from another channel also carries ``"via": "mirror"``. It is not
a pi/openclaw session, so ``SessionManager`` refuses to append to it (``not_a_session``,
``NotASessionError``); the write lock and the fence controller work on any append-only
JSONL file. What this program does, in one worker:

1. writes the user's question under the lock (``with_write_lock``);
2. releases the lock while the (stub) model thinks; meanwhile the mirror appends a line,
   which ``ChatLogPolicy`` accepts and the merge callback adds to the worker's history;
3. writes the reply while it holds the lock again, and tells the fence the exact bytes
   (``refresh_after_owned_write(written)``);
4. writes a note from synchronous code with ``owned_file_write`` and a validator;
5. releases the lock for a second model call, during which another worker appends a user
   line: taking the lock back raises ``SessionTakeoverError`` (reason ``foreign-append``),
   and the worker stops. ``dispose()`` runs whatever happened.

The walk-through is in docs/custom-transcripts.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from typing import Any

from sessionfence import (
    BenignPolicy,
    SessionFenceController,
    SessionTakeoverError,
    acquire_session_write_lock,
)

Record = dict[str, Any]


def record(role: str, text: str, **extra: Any) -> Record:
    """A line of the log: a fresh id, who said it, what, and when."""
    return {"id": uuid.uuid4().hex[:8], "role": role, "text": text, "at": time.time(), **extra}


def append_record(path: str, rec: Record) -> bytes:
    """Append ``rec`` as one complete line with a single ``write`` on an ``O_APPEND``
    descriptor (no reader ever sees half a record glued to the next); return the bytes."""
    data = (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to {path}")
    finally:
        os.close(fd)
    return data


class ChatLogPolicy(BenignPolicy):
    """Which lines nobody vouched for the fence may accept: only the mirror's.

    ``classify_entry`` gets each appended line as parsed JSON (any JSON value; a line that
    does not parse never reaches it) and names its kind: ``"transcript-only"`` is accepted
    with or without a merge callback; ``None`` makes the whole append a takeover. Anything
    else in this format (a user line, an assistant line that is not a mirror copy) is
    another writer's and must stop this worker.
    """

    def classify_entry(self, entry: Any) -> str | None:
        if (
            isinstance(entry, dict)
            and entry.get("via") == "mirror"
            and entry.get("role") == "assistant"
            and isinstance(entry.get("id"), str)
            and isinstance(entry.get("text"), str)
        ):
            return "transcript-only"
        return None


def mirror_delivers(path: str, text: str) -> None:
    """The delivery mirror (another process, in real life): a well-behaved writer takes
    the lock for its append, which it can only get while the worker has released it."""
    with acquire_session_write_lock(path, timeout=5):
        append_record(path, record("assistant", text, via="mirror"))


def another_worker_writes(path: str, text: str) -> None:
    """A second worker that took the conversation over while ours was thinking."""
    with acquire_session_write_lock(path, timeout=5):
        append_record(path, record("user", text))


async def call_model(history: list[Record]) -> str:
    """Stub model call: a real one takes seconds, with the lock released."""
    await asyncio.sleep(0.01)
    return "6 x 7 = 42"


async def run_worker(path: str) -> list[str]:
    """One worker's attempt on the log at ``path``; returns what happened, line by line."""
    events: list[str] = []
    history: list[Record] = []  # the model's context: own lines and merged mirror lines

    def merge(entries: list[Any]) -> None:
        # The merge callback gets the accepted lines, parsed, as they appear in the file.
        history.extend(entries)
        events.append(f"merged {len(entries)} mirror line(s)")

    ctl = await SessionFenceController.create(  # takes the write lock
        path, benign_policy=ChatLogPolicy(), merge_foreign_entries=merge
    )
    try:
        # 1. An own write under the lock: the fence moves over what the block appended.
        question = record("user", "What is 6 x 7?")
        await ctl.with_write_lock(lambda: append_record(path, question))
        history.append(question)
        events.append("wrote the question (with_write_lock)")

        # 2. The model call, lock released; the mirror appends meanwhile. Leaving the block
        #    takes the lock back and checks the fence: the mirror line is accepted.
        async with ctl.prompt_released():
            mirror_delivers(path, "(copied from Slack) someone asked about 6 x 7")
            answer = await call_model(history)
        events.append("took the lock back: the mirror line was accepted")

        # 3. The controller holds the lock again: write, then hand the fence the exact bytes.
        reply = record("assistant", answer)
        written = append_record(path, reply)
        ctl.refresh_after_owned_write(written)
        history.append(reply)
        events.append("wrote the reply (refresh_after_owned_write)")

        # 4. From synchronous code: the validator says which appended text is ours.
        note = record("system", "turn 1 done")
        ctl.owned_file_write(
            lambda: append_record(path, note),
            lambda data, appended_text: appended_text == data.decode(),
        )
        events.append("wrote a note (owned_file_write)")

        # 5. Another model call; this time another worker writes while we think.
        async with ctl.prompt_released():
            another_worker_writes(path, "Actually, I'll take it from here.")
            await call_model(history)
        events.append("not reached: the fence let a foreign line through")
    except SessionTakeoverError as exc:  # stop: the log is no longer this worker's
        events.append(f"taken over at {exc.phase}: {exc.reason} ({exc.detail})")
    finally:
        await ctl.dispose()  # releases the lock whatever happened
        events.append("disposed")
    return events


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        path = argv[1]
    else:
        path = os.path.join(tempfile.mkdtemp(prefix="own-chat-log-"), "chat.jsonl")
    for event in asyncio.run(run_worker(path)):
        print(event)
    print(f"the log ({path}):")
    with open(path, encoding="utf-8") as log:
        sys.stdout.write(log.read())


if __name__ == "__main__":
    main(sys.argv)
