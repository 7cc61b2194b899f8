"""Property tests for the transcript parser and writer (hypothesis)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionfence import SessionManager, _jsonl, content_digest
from tests.transcript.test_index import settings_as_pi

# Text with everything, lone surrogates included (JSON can carry them as escapes).
any_text = st.text(st.characters(exclude_categories=()), max_size=30)
finite = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | finite
    | any_text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(any_text, inner, max_size=5),
    max_leaves=25,
)

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def strict_equal(a: Any, b: Any) -> bool:
    """JSON equality that tells 1 from 1.0 from True, and -0.0 from 0.0 (parsers must agree
    that strictly on the same bytes)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(strict_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


def js_keys(obj: dict[str, Any]) -> list[str]:
    """JavaScript's own-property order: array-index keys ascending, then the others."""
    index = sorted((k for k in obj if _jsonl._is_array_index(k)), key=int)
    return index + [k for k in obj if not _jsonl._is_array_index(k)]


def js_equal(written: Any, read: Any) -> bool:
    """What a value written like ``JSON.stringify`` reads back as: numbers are JavaScript
    numbers (1.0 reads back as 1, -0.0 as 0: the same double), object keys in JavaScript's
    order, everything else strictly equal."""
    if isinstance(written, bool) or isinstance(read, bool):
        return type(written) is type(read) and written == read
    if isinstance(written, (int, float)) and isinstance(read, (int, float)):
        if isinstance(written, int) and isinstance(read, int):
            return written == read  # Python ints are written exactly
        # A float is written in JavaScript's digits, which can read back as an int (1.0 as
        # 1, 5.25e16 as 52500000000000000): the same double for a JavaScript reader.
        return float(written) == float(read)
    if type(written) is not type(read):
        return False
    if isinstance(written, dict):
        return js_keys(written) == list(read) and all(js_equal(written[k], read[k]) for k in read)
    if isinstance(written, list):
        return len(written) == len(read) and all(
            js_equal(x, y) for x, y in zip(written, read, strict=True)
        )
    return bool(written == read)


FAST = _jsonl.available_fast_parsers()


def parse_with(name: str | None, line: bytes) -> tuple[str, Any]:
    old = _jsonl.set_fast_parser(name)
    try:
        return ("ok", _jsonl.loads_line(line))
    except (ValueError, RecursionError):
        return ("error", None)
    finally:
        _jsonl.set_fast_parser(old)


@SETTINGS
@given(value=json_values)
def test_parsers_agree_on_written_lines(value: Any) -> None:
    line = _jsonl.dumps_line(value)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    ref = parse_with(None, line)
    assert ref[0] == "ok"
    assert js_equal(value, ref[1][0])
    assert _jsonl.dumps_line(ref[1][0]) == line  # what is read back is written identically
    for name in FAST:
        fast = parse_with(name, line)
        assert fast[0] == "ok", name
        assert strict_equal(ref[1], fast[1]), name


@SETTINGS
@given(
    data=st.binary(max_size=60)
    | json_values.map(lambda v: json.dumps(v, allow_nan=True).encode())
    | st.lists(
        st.sampled_from(
            [
                b"{",
                b"}",
                b'"a"',
                b":",
                b",",
                b"1e999",
                b"NaN",
                b"-0",
                b"\xff",
                b"\\ud800",
                b"12345678901234567890",
                b"[",
                b"]",
                b" ",
                b"\r",
                b"0.1",
                b'"\\u00e9"',
                b"true",
            ]
        ),
        max_size=12,
    ).map(b"".join)
)
def test_parsers_agree_on_arbitrary_bytes(data: bytes) -> None:
    line = data.replace(b"\n", b" ")
    ref = parse_with(None, line)
    for name in FAST:
        fast = parse_with(name, line)
        assert ref[0] == fast[0], name
        if ref[0] == "ok":
            assert strict_equal(ref[1], fast[1]), name


@SETTINGS
@given(
    values=st.lists(json_values, min_size=1, max_size=8),
    fast=st.sampled_from([None, *FAST]),
)
def test_random_entries_round_trip_through_the_file(values: list[Any], fast: str | None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.jsonl"
        writer = SessionManager.open(path)
        ids = []
        for i, value in enumerate(values):
            if i % 2:
                ids.append(writer.append_message({"role": "user", "content": value}))
            else:
                ids.append(writer.append_custom("v", {"value": value}))
        old = _jsonl.set_fast_parser(fast)
        try:
            reader = SessionManager.open(path, chunk_size=97)
        finally:
            _jsonl.set_fast_parser(old)
        assert reader.malformed_lines == 0 and reader.torn_tail is None
        assert [e["id"] for e in reader.entries] == ids
        for i, (ident, value) in enumerate(zip(ids, values, strict=True)):
            entry = reader.get_entry(ident)
            assert entry is not None
            got = entry["message"]["content"] if i % 2 else entry["data"]["value"]
            assert js_equal(value, got)
        assert js_equal(list(writer.entries), list(reader.entries))
        assert reader.digest.intdigest() == writer.digest.intdigest() == content_digest(path)


def reference_model(raw: bytes) -> tuple[list[Any], int, tuple[int, int] | None]:
    """A slow, obvious parser: the whole text, split on newlines, json per line; a last line
    without its newline is an entry when it is a JSON object, else torn."""
    body, _, tail = raw.rpartition(b"\n")
    text_lines = (body + b"\n").split(b"\n")[:-1] if raw.count(b"\n") else []
    if text_lines and text_lines[0].startswith(b"\xef\xbb\xbf"):
        text_lines[0] = text_lines[0][3:]
    values: list[Any] = []
    malformed = 0
    for line in text_lines:
        text = line.decode("utf-8", "replace")
        if not _jsonl.js_trim(text):
            continue
        try:
            value = _jsonl.loads_text(text)
        except (ValueError, RecursionError):
            malformed += 1
            continue
        if isinstance(value, dict):
            values.append(value)
        else:
            malformed += 1
    torn = None
    if tail:
        text = tail.decode("utf-8", "replace")
        if not text_lines and text.startswith("\ufeff"):
            text = text[1:]
        try:
            value = _jsonl.loads_text(text)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            values.append(value)
        else:
            torn = (len(raw) - len(tail), len(tail))
    return values, malformed, torn


piece = st.sampled_from(
    [
        b'{"type":"session"}',
        b'{"type":"message","id":"a1","parentId":null,"message":{}}',
        b'{"type":"custom","id":"b2","parentId":"a1","customType":"x"}',
        b'{"type":"label","id":"c3","parentId":"b2","targetId":"a1","label":"L"}',
        b'{"type":"leaf","id":"d4","parentId":"c3","targetId":"a1","appendMode":"side"}',
        b'{"type":"model_change","id":"e5","parentId":"d4","provider":"p","modelId":"m"}',
        b'{"type":"thinking_level_change","id":"f6","parentId":"a1","thinkingLevel":"high"}',
        b'{"type":"message","id":"a1","parentId":"f6","message":{"role":"assistant","model":"r"}}',
        b'{"v":NaN}',
        b"[]",
        b"",
        b"  ",
        b"\xc2\xa0",
        b"\xef\xbb\xbf",
        b"\xff",
        b"{",
        b"\r",
    ]
)


@SETTINGS
@given(
    parts=st.lists(st.lists(piece, max_size=3).map(b"".join), max_size=12),
    tail=st.binary(max_size=8) | piece | st.sampled_from([b"{}", b'{"a":1} ', b"[1]", b"7"]),
    chunk=st.integers(min_value=1, max_value=64),
)
def test_open_matches_a_reference_parser(parts: list[bytes], tail: bytes, chunk: int) -> None:
    raw = b"\n".join(parts) + (b"\n" if parts else b"") + tail.replace(b"\n", b"")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.jsonl"
        path.write_bytes(raw)
        m = SessionManager.open(path, chunk_size=chunk)
        values, malformed, torn = reference_model(raw)
        header = next((v for v in values if v.get("type") == "session"), None)
        assert m.header == header
        expected = list(values)
        if header is not None:
            expected.remove(header)
        assert m.entries == expected
        assert m.malformed_lines == malformed
        assert m.torn_tail == torn
        assert m.digest.intdigest() == content_digest(path)
        assert m.digest_size == len(raw)
        got = m.context_settings()  # pi-mono's fold over the path, as a full parse gives it
        assert got == settings_as_pi(m.branch())
        assert got == SessionManager.open(path, index=False).context_settings()
