"""The transcript index (``<transcript>.idx``), lazy entries, ``context_entries`` and
``refresh``: whatever the index holds, or lacks, an open gives what a full parse gives."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionfence import SessionManager, _jsonl
from sessionfence.transcript import ContextModel, ContextSettings, _index
from sessionfence.transcript._index import index_path_for

IDS = [f"{i:08x}" for i in range(1, 13)]
MISSING = object()  # a field left out of a generated entry
HEADER = {"type": "session", "version": 3, "id": "hdr", "timestamp": "t", "cwd": "/"}


def dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def line_strategy() -> st.SearchStrategy[bytes]:
    ref = st.one_of(st.sampled_from(IDS), st.none(), st.just("missing0"))
    ident = st.sampled_from(IDS)

    def entry(kind: str, extra: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
        return st.builds(
            lambda i, p, has_parent, side, more: dump(
                {
                    "type": kind,
                    "id": i,
                    **({"parentId": p} if has_parent else {}),
                    **({"appendMode": "side"} if side else {}),
                    "timestamp": "2026-12-05T00:00:00.000Z",
                    **more,
                }
            ),
            ident,
            ref,
            st.sampled_from([True, True, True, True, False]),
            st.sampled_from([False, False, True]),
            extra,
        )

    message = entry(
        "message",
        st.builds(
            lambda role, text: {"message": {"role": role, "content": text}},
            st.sampled_from(["user", "assistant", "toolResult"]),
            st.text(max_size=20),
        ),
    )
    # What the context settings read (pi-mono buildSessionContext): assistant messages'
    # provider and model, model and thinking-level changes; fields missing or not strings.
    setting = st.one_of(st.sampled_from(["anthropic", "openai", "high", "off", ""]), st.none())
    maybe = st.one_of(setting, st.just(3), st.just(MISSING))
    assistant = entry(
        "message",
        st.builds(
            lambda role, provider, model: {
                "message": {
                    "role": role,
                    "content": "x",
                    **({"provider": provider} if provider is not MISSING else {}),
                    **({"model": model} if model is not MISSING else {}),
                }
            },
            st.sampled_from(["assistant", "assistant", "user"]),
            maybe,
            maybe,
        )
        | st.sampled_from([{"message": "not an object"}, {"message": [1]}, {}]),
    )
    model_change = entry(
        "model_change",
        st.builds(
            lambda provider, model: {
                **({"provider": provider} if provider is not MISSING else {}),
                **({"modelId": model} if model is not MISSING else {}),
            },
            maybe,
            maybe,
        ),
    )
    thinking = entry(
        "thinking_level_change",
        st.builds(
            lambda level: {"thinkingLevel": level} if level is not MISSING else {},
            st.one_of(st.sampled_from(["off", "low", "high", 2]), st.just(MISSING)),
        ),
    )
    compaction = entry(
        "compaction",
        st.builds(
            lambda fk: {"summary": "s", "firstKeptEntryId": fk, "tokensBefore": 5},
            ref,
        ),
    )
    label = entry(
        "label",
        st.builds(
            lambda t, lab: {"targetId": t, **({"label": lab} if lab is not None else {})},
            ref,
            st.one_of(st.none(), st.just(""), st.text(max_size=5)),
        ),
    )
    info = entry("session_info", st.builds(lambda n: {"name": n}, st.text(max_size=6)))
    other = entry("reset", st.just({}))
    leaf = st.builds(
        lambda i, p, t, ap, mode: dump(
            {
                "type": "leaf",
                "id": i,
                "parentId": p,
                "targetId": t,
                **({"appendParentId": ap} if ap != "-" else {}),
                **({"appendMode": mode} if mode else {}),
            }
        ),
        ident,
        ref,
        ref,
        st.one_of(ref, st.just("-")),
        st.sampled_from([None, "side", "other"]),
    )
    junk = st.sampled_from(
        [
            b"",
            b"not json",
            b"[1,2]",
            b'{"type":"message","id":"00000003","parentId":null,"x":"\xff\xfe"}',
            b'{"type":"message","id":"0000000a","parentId":"00000001","message":{"role":"user","content":"caf\xc3\xa9"}}',
            dump(HEADER),
            b"   ",
        ]
    )
    return st.one_of(
        message,
        message,
        message,
        assistant,
        model_change,
        thinking,
        compaction,
        label,
        info,
        other,
        leaf,
        junk,
    )


def write_lines(path: Path, lines: list[bytes], tail: bytes = b"") -> None:
    path.write_bytes(b"".join(x + b"\n" for x in lines) + tail)


def state(m: SessionManager) -> dict[str, Any]:
    ids = {i: m.get_entry(i) for i in [*IDS, "missing0"]}
    return {
        "header": m.header,
        "leaf": m.leaf_id,
        "side": m.side_cursor,
        "labels": m.labels,
        "name": m.session_name,
        "malformed": m.malformed_lines,
        "invalid": m.invalid_utf8_lines,
        "torn": m.torn_tail,
        "unterminated": m.unterminated_last_line,
        "not_session": m.not_a_session,
        "version": m.format_version,
        "pre_tree": m.pre_tree,
        "entries": list(m.entries),
        "len": len(m.entries),
        "branch": m.branch(),
        "context": m.context_entries(),
        "settings": m.context_settings(),
        "settings_as_pi": settings_as_pi(m.branch()),
        "ids": ids,
        "children": {i: m.children(i) for i in [None, *IDS[:4]]},
        "digest": m.digest.intdigest(),
        "digest_size": m.digest_size,
        "parsed": m.parsed_digest.intdigest() if m.parsed_digest is not None else None,
        "fp": m.parsed_fingerprint,
    }


def settings_as_pi(path: list[dict[str, Any]]) -> ContextSettings:
    """pi-mono ``buildSessionContext``'s thinking level and model, folded forward over a
    root-to-leaf path as it does (fields that are not strings as ``None``)."""

    def text(value: object) -> str | None:
        return value if isinstance(value, str) else None

    thinking: str | None = "off"
    model: ContextModel | None = None
    for entry in path:
        kind = entry.get("type")
        if kind == "thinking_level_change":
            thinking = text(entry.get("thinkingLevel"))
        elif kind == "model_change":
            model = ContextModel(text(entry.get("provider")), text(entry.get("modelId")))
        elif kind == "message":
            message = entry.get("message")
            if isinstance(message, dict) and message.get("role") == "assistant":
                model = ContextModel(text(message.get("provider")), text(message.get("model")))
    return ContextSettings(thinking, model)


def full(path: Path) -> dict[str, Any]:
    reference = state(SessionManager.open(path, index=False))
    # a full parse's context settings are pi-mono's fold over its branch()
    assert reference["settings"] == reference["settings_as_pi"]
    return reference


TAILS = [b"", b'{"type":"message","id":"0000000b","parentId":null}', b'{"type":"mess']

common = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@common
@given(
    lines=st.lists(line_strategy(), max_size=40),
    more=st.lists(line_strategy(), max_size=15),
    tail=st.sampled_from(TAILS),
    header_first=st.booleans(),
    fast=st.sampled_from([True, None]),
)
def test_indexed_open_equals_a_full_parse(
    tmp_path_factory: pytest.TempPathFactory,
    lines: list[bytes],
    more: list[bytes],
    tail: bytes,
    header_first: bool,
    fast: bool | None,
) -> None:
    old = _jsonl.set_fast_parser(fast)  # msgspec: the skeleton route; json: the exact one
    try:
        check_indexed_open(tmp_path_factory, lines, more, tail, header_first)
    finally:
        _jsonl.set_fast_parser(old)


def check_indexed_open(
    tmp_path_factory: pytest.TempPathFactory,
    lines: list[bytes],
    more: list[bytes],
    tail: bytes,
    header_first: bool,
) -> None:
    path = tmp_path_factory.mktemp("idx") / "s.jsonl"
    head = [dump(HEADER)] if header_first else []
    write_lines(path, head + lines)
    first = SessionManager.open(path, index=True)  # parses, writes the index
    assert state(first) == full(path)
    if first._indexable():  # the hints the index names are what the context walk reads
        assert first._hint_ids() == first._walk(first.leaf_id, context=True)[1]
    warm = SessionManager.open(path)  # through the index
    assert state(warm) == full(path)
    # lines appended behind the index: the open parses only those
    write_lines(path, head + lines + more, tail)
    reopened = SessionManager.open(path)
    assert state(reopened) == full(path)
    # and a manager that was open all along catches up
    first.refresh()
    assert state(first) == full(path)


@common
@given(
    lines=st.lists(line_strategy(), min_size=1, max_size=30),
    more=st.lists(line_strategy(), max_size=10),
)
def test_refresh_after_own_appends_equals_a_full_parse(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes], more: list[bytes]
) -> None:
    path = tmp_path_factory.mktemp("idx") / "s.jsonl"
    write_lines(path, [dump(HEADER), *lines])
    m = SessionManager.open(path, index=True)
    if m.torn_tail is None:
        m.append_message({"role": "user", "content": "own"})
    with open(path, "ab") as f:
        f.write(b"".join(x + b"\n" for x in more))
    m.refresh()
    assert state(m) == full(path)
    assert state(SessionManager.open(path)) == full(path)


def realistic(path: Path, turns: int = 120, seed: int = 1) -> None:
    from sessionfence.bench.transcript import write_session

    write_session(path, turns * 4000, seed=seed, compact_every=40_000)


def corruptions(raw: bytes, rng: random.Random) -> list[bytes]:
    out = [b"", raw[: len(raw) // 2], raw[:-1], raw[:20], raw + b"junk"]
    for _ in range(12):
        data = bytearray(raw)
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
        out.append(bytes(data))
    return out


def test_a_damaged_index_costs_time_never_correctness(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    realistic(path)
    SessionManager.open(path, index=True)
    idx = Path(index_path_for(path))
    raw = idx.read_bytes()
    want = full(path)
    rng = random.Random(15)
    for bad in corruptions(raw, rng):
        idx.write_bytes(bad)
        assert state(SessionManager.open(path)) == want
    idx.unlink()
    assert state(SessionManager.open(path)) == want


def test_an_index_from_another_file_or_a_stale_one_is_not_trusted(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    realistic(a, seed=1)
    realistic(b, seed=2)
    SessionManager.open(a, index=True)
    SessionManager.open(b, index=True)
    # b's index beside a
    os.replace(index_path_for(b), index_path_for(a))
    assert state(SessionManager.open(a)) == full(a)
    # same size, other bytes, same inode (an in-place rewrite by a foreign writer)
    SessionManager.open(a, index=True)
    data = bytearray(a.read_bytes())
    at = len(data) // 3
    at = data.index(b'"content":"', at) + 12
    data[at] = ord("Z") if data[at] != ord("Z") else ord("Y")
    with open(a, "r+b") as f:
        f.write(data)
    assert state(SessionManager.open(a)) == full(a)
    # replaced by another file (new inode), then cut and regrown
    SessionManager.open(a, index=True)
    os.replace(b, a)
    assert state(SessionManager.open(a)) == full(a)
    SessionManager.open(a, index=True)
    raw = a.read_bytes()
    cut = raw.rindex(b"\n", 0, len(raw) // 2) + 1
    a.write_bytes(raw[:cut])
    assert state(SessionManager.open(a)) == full(a)
    with open(a, "ab") as f:
        f.write(raw[cut:])
    assert state(SessionManager.open(a)) == full(a)


def test_warm_open_reads_the_context_not_the_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.jsonl"
    realistic(path, turns=300)
    SessionManager.open(path, index=True)
    loads: list[int] = []
    real = _index.IndexData._load_sections

    def counting(self: _index.IndexData, base: _index.Base) -> None:
        loads.append(1)
        real(self, base)

    monkeypatch.setattr(_index.IndexData, "_load_sections", counting)
    m = SessionManager.open(path)
    ctx = m.context_entries()
    assert loads == []  # the row table was never needed
    assert ctx[0]["type"] == "compaction"
    assert ctx == SessionManager.open(path, index=False).context_entries()
    m.append_message({"role": "user", "content": "a new id needs no row table either"})
    assert loads == []
    assert len(m.entries) > 5 * len(ctx)
    assert list(m.entries)[:-1] == list(SessionManager.open(path, index=False).entries)[:-1]


def test_context_entries_cuts_as_build_session_context(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    m = SessionManager.open(path)
    a = m.append_message({"role": "user", "content": "a"})
    b = m.append_message({"role": "assistant", "content": "b"})
    c = m.append_message({"role": "user", "content": "c"})
    m.append_compaction("summary", b, 10)
    d = m.append_message({"role": "user", "content": "d"})
    ids = [e.get("id") for e in m.context_entries()]
    assert ids[1:] == [b, c, d] and m.context_entries()[0]["type"] == "compaction"
    assert a not in ids
    # a first kept entry not on the path: the compaction and what follows it
    m.append_compaction("again", "nowhere", 10)
    e = m.append_message({"role": "user", "content": "e"})
    got = m.context_entries()
    assert got[0]["summary"] == "again" and [x["id"] for x in got[1:]] == [e]


def test_entries_are_list_like(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    realistic(path, turns=40)
    m = SessionManager.open(path)
    ref = SessionManager.open(path, index=False)
    got = m.entries
    assert len(got) == len(ref.entries)
    assert got == ref.entries and got == list(ref.entries)
    assert got[-1] == ref.entries[-1] and got[3:7] == list(ref.entries)[3:7]
    with pytest.raises(IndexError):
        got[len(got)]


def test_index_is_written_by_rename_and_only_for_sessions(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"role":"user","content":"x"}\n' * 20000)
    m = SessionManager.open(path)
    assert m.not_a_session is not None
    assert not os.path.exists(index_path_for(path))
    realistic(path, turns=200)
    SessionManager.open(path)
    assert os.path.exists(index_path_for(path))
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=40) | st.text(max_size=20).map(lambda t: t.encode()))
def test_utf8_invalid_at_matches_python_on_both_backends(data: bytes) -> None:
    from sessionfence import _impl_py

    try:
        data.decode("utf-8")
        want = -1
    except UnicodeDecodeError as exc:
        want = exc.start
    assert _impl_py.utf8_invalid_at(data) == want
    try:
        from sessionfence import _impl_cffi
    except ImportError:  # pragma: no cover - no C backend here
        return
    assert _impl_cffi.utf8_invalid_at(data) == want
    assert _impl_cffi.utf8_invalid_at(memoryview(b"x" + data)[1:]) == want


def test_open_gives_the_same_model_on_both_backends(tmp_path: Path, backend: Any) -> None:
    path = tmp_path / "s.jsonl"
    realistic(path, turns=60)
    with open(path, "ab") as f:
        f.write(b'{"type":"message","id":"bad00001","parentId":null,"x":"\xff"}\n')
    assert state(SessionManager.open(path)) == full(path)
    assert state(SessionManager.open(path)) == full(path)


def _row(kind: str, ident: str, parent: str | None, **fields: Any) -> bytes:
    return dump({"type": kind, "id": ident, "parentId": parent, "timestamp": "t", **fields})


SETTINGS_CASES = {
    # a reference to an entry further down the file (a forward reference): the parse meets
    # the thinking change above the message only after the message
    "forward": [
        _row("message", IDS[0], IDS[1], message={"role": "user", "content": "a"}),
        _row("thinking_level_change", IDS[1], None, thinkingLevel="low"),
        _row("message", IDS[2], IDS[0], message={"role": "user", "content": "c"}),
    ],
    # an id defined twice: the path goes through the later definition
    "redefined": [
        _row("thinking_level_change", IDS[0], None, thinkingLevel="high"),
        _row("message", IDS[1], IDS[0], message={"role": "assistant", "provider": "p"}),
        _row("message", IDS[0], None, message={"role": "user", "content": "again"}),
        _row("message", IDS[2], IDS[1], message={"role": "user", "content": "c"}),
    ],
    # a leaf control moving the leaf back, then a branch from there
    "branch": [
        _row("thinking_level_change", IDS[0], None, thinkingLevel="high"),
        _row("model_change", IDS[1], IDS[0], provider="openai", modelId="gpt"),
        _row("thinking_level_change", IDS[2], IDS[1], thinkingLevel="off"),
        _row("message", IDS[3], IDS[2], message={"role": "assistant", "model": "m"}),
        _row("leaf", IDS[4], IDS[3], targetId=IDS[1]),
        _row("message", IDS[5], IDS[1], message={"role": "user", "content": "branch"}),
        _row("compaction", IDS[6], IDS[5], summary="s", firstKeptEntryId=IDS[5], tokensBefore=1),
    ],
}


@pytest.mark.parametrize("case", sorted(SETTINGS_CASES))
def test_context_settings_follow_the_path_as_a_full_parse_does(tmp_path: Path, case: str) -> None:
    path = tmp_path / "s.jsonl"
    lines = [dump(HEADER), *SETTINGS_CASES[case]]
    write_lines(path, lines)
    want = full(path)
    cold = SessionManager.open(path, index=True)  # the table's rows of the parse
    assert state(cold) == want
    warm = SessionManager.open(path)  # the settings the index stored for its leaf
    assert warm._index_opened and state(warm) == want
    # more lines behind the index: walked back to the index's leaf
    write_lines(path, [*lines, _row("message", IDS[8], warm.leaf_id, message={"role": "user"})])
    assert state(SessionManager.open(path)) == full(path)
    expected = {
        "forward": ContextSettings("low", None),
        "redefined": ContextSettings("off", ContextModel("p", None)),
        "branch": ContextSettings("high", ContextModel("openai", "gpt")),
    }[case]
    assert want["settings"] == expected


def test_ids_the_fast_decoder_refuses_are_read_all_the_same(tmp_path: Path) -> None:
    """An id holding a lone surrogate (JSON allows the escape) is stored escaped in the
    index; msgspec refuses such a string table, the exact route reads it."""
    path = tmp_path / "s.jsonl"
    odd = "\ud800x"
    lines = [
        dump(HEADER),
        _row("message", IDS[0], None, message={"role": "user", "content": "a"}),
        json.dumps({"type": "message", "id": odd, "parentId": IDS[0]}).encode(),
        json.dumps(
            {"type": "message", "id": IDS[1], "parentId": odd, "message": {"role": "assistant"}}
        ).encode(),
    ]
    write_lines(path, lines)
    SessionManager.open(path, index=True)
    warm = SessionManager.open(path)
    assert warm._index_opened
    assert warm.has_entry(odd) and not warm.has_entry("\ud800y")  # the ids section alone
    assert state(warm) == full(path)  # the row table too (ids and parents)
    assert warm.context_settings() == ContextSettings("off", ContextModel(None, None))
