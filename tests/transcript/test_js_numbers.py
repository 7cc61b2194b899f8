"""Lines are written exactly as JavaScript's ``JSON.stringify`` writes them (issue 11 item 5).

Three oracles: reference implementations written here from the ECMAScript specification
(``Number::toString`` on exact rationals, ``QuoteJSONString`` on UTF-16 code units,
``OrdinaryOwnPropertyKeys``), real ``JSON.stringify`` in a ``node`` subprocess when node is on
PATH, and the real-shaped fixture lines in ``tests/fixtures/transcripts`` (written by
``JSON.stringify``), which must come back byte for byte through every parser.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessionfence import _jsonl

FIXTURES = Path(__file__).parents[1] / "fixtures" / "transcripts"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(
    NODE is None, reason="node is not on PATH: the comparison with real JSON.stringify needs it"
)


@pytest.fixture(params=["json", "msgspec", "orjson"])
def parser(request: pytest.FixtureRequest) -> Iterator[str]:
    name: str = request.param
    if name != "json" and name not in _jsonl.available_fast_parsers():
        pytest.skip(f"{name} is not installed (optional extra)")
    old = _jsonl.set_fast_parser(None if name == "json" else name)
    try:
        yield name
    finally:
        _jsonl.set_fast_parser(old)


# --------------------------------------------------------------------------------------
# Reference implementations, from the specification text (not from repr).
# --------------------------------------------------------------------------------------


def _floor_log10(value: Fraction) -> int:
    e = math.floor(math.log10(value))  # a first guess, corrected exactly below
    while Fraction(10) ** e > value:
        e -= 1
    while Fraction(10) ** (e + 1) <= value:
        e += 1
    return e


def _rounds_to(value: Fraction, x: float) -> bool:
    try:
        return float(value) == x  # Fraction -> float rounds correctly (to nearest, even)
    except OverflowError:  # beyond the largest double
        return False


def spec_number_to_string(x: float) -> str:
    """ECMAScript ``Number::toString(x, 10)``: n, k, s with k as small as possible such that
    s x 10**(n-k) is x (rounds to it), 10**(k-1) <= s < 10**k; of several such s the one
    closest to x, of two equally close the even one; then the layout of steps 7-11."""
    if x != x:
        return "NaN"
    if x == 0:
        return "0"
    if x < 0:
        return "-" + spec_number_to_string(-x)
    if math.isinf(x):
        return "Infinity"
    exact = Fraction(x)
    e = _floor_log10(exact)
    for k in range(1, 18):
        found: list[tuple[Fraction, int, int, int]] = []
        for n in (e + 1, e + 2):
            scale = Fraction(10) ** (n - k)
            low = math.floor(exact / scale)
            for s in (low, low + 1):
                if 10 ** (k - 1) <= s < 10**k and _rounds_to(s * scale, x):
                    found.append((abs(s * scale - exact), s % 2, n, s))
        if found:
            _, _, n, s = min(found)
            break
    else:  # pragma: no cover - 17 digits always suffice for a double
        raise AssertionError(x)
    digits = str(s)
    k = len(digits)
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + digits
    sign = "+" if n - 1 >= 0 else "-"
    if k == 1:
        return f"{digits}e{sign}{abs(n - 1)}"
    return f"{digits[0]}.{digits[1:]}e{sign}{abs(n - 1)}"


_SHORT = {
    0x08: "\\b",
    0x09: "\\t",
    0x0A: "\\n",
    0x0C: "\\f",
    0x0D: "\\r",
    0x22: '\\"',
    0x5C: "\\\\",
}


def spec_quote(text: str) -> str:
    """ECMAScript ``QuoteJSONString`` over the UTF-16 code units JavaScript would hold."""
    raw = text.encode("utf-16-le", "surrogatepass")
    units = [int.from_bytes(raw[i : i + 2], "little") for i in range(0, len(raw), 2)]
    out = ['"']
    i = 0
    while i < len(units):
        c = units[i]
        high = 0xD800 <= c <= 0xDBFF
        paired = high and i + 1 < len(units) and 0xDC00 <= units[i + 1] <= 0xDFFF
        if c in _SHORT:
            out.append(_SHORT[c])
        elif paired:
            out.append(chr(0x10000 + ((c - 0xD800) << 10) + (units[i + 1] - 0xDC00)))
            i += 1
        elif c < 0x20 or 0xD800 <= c <= 0xDFFF:
            out.append(f"\\u{c:04x}")
        else:
            out.append(chr(c))
        i += 1
    out.append('"')
    return "".join(out)


# --------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------


# The values the issue names, and the thresholds of the layout rules.
EXAMPLES = [
    (8.375e-05, "0.00008375"),
    (5e-06, "0.000005"),
    (1.0, "1"),
    (-0.0, "0"),
    (0.0, "0"),
    (100.0, "100"),
    (1.5, "1.5"),
    (0.1, "0.1"),
    (1e-6, "0.000001"),
    (1e-7, "1e-7"),
    (1.5e-7, "1.5e-7"),
    (-1.5e-7, "-1.5e-7"),
    (1.2345e-7, "1.2345e-7"),
    (9.99999999999999e-8, "9.99999999999999e-8"),
    (1e16, "10000000000000000"),
    (1.5e20, "150000000000000000000"),
    (1e21, "1e+21"),
    (1.5e21, "1.5e+21"),
    (2.5e22, "2.5e+22"),
    (123456789012345680000.0, "123456789012345680000"),
    (5e-324, "5e-324"),
    (1.7976931348623157e308, "1.7976931348623157e+308"),
    (0.00008875, "0.00008875"),
]


@pytest.mark.parametrize(("value", "text"), EXAMPLES, ids=repr)
def test_known_numbers_are_written_as_javascript_writes_them(value: float, text: str) -> None:
    assert _jsonl.js_number(value) == text
    assert spec_number_to_string(value) == text  # the oracle agrees with the spec examples
    assert _jsonl.dumps_line({"v": value}) == b'{"v":' + text.encode() + b"}\n"


def test_integers_are_exact_and_bools_are_not_numbers() -> None:
    assert _jsonl.js_number(10**30) == "1" + "0" * 30
    assert _jsonl.dumps_js([True, False, None, 0, -7]) == "[true,false,null,0,-7]"


def test_nan_and_infinity_are_refused() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            _jsonl.dumps_line({"v": bad})


@settings(max_examples=3000, deadline=None)
@given(x=st.floats(allow_nan=False, allow_infinity=False))
def test_every_float_matches_the_spec_algorithm(x: float) -> None:
    assert _jsonl.js_number(x) == spec_number_to_string(x)


@settings(max_examples=1000, deadline=None)
@given(bits=st.integers(min_value=0, max_value=2**64 - 1))
def test_every_bit_pattern_matches_the_spec_algorithm(bits: int) -> None:
    (x,) = struct.unpack(">d", bits.to_bytes(8, "big"))
    if math.isfinite(x):
        assert _jsonl.js_number(x) == spec_number_to_string(x)


# --------------------------------------------------------------------------------------
# Strings and keys
# --------------------------------------------------------------------------------------


def test_string_escapes_are_json_stringify_escapes() -> None:
    text = 'a"\\/\b\f\n\r\t\x00\x01\x1f\x7f é 中 😀 \u2028\u2029 \ud800 \udc00x \ud83d\ude00'
    expected = (
        '"a\\"\\\\/\\b\\f\\n\\r\\t\\u0000\\u0001\\u001f\x7f é 中 😀 \u2028\u2029 \\ud800 '
        '\\udc00x 😀"'
    )
    assert _jsonl.dumps_js(text) == expected
    assert spec_quote(text) == expected
    line = _jsonl.dumps_line({"t": text})
    assert line.decode("utf-8")  # valid UTF-8: lone surrogates are escapes, pairs are raw


@settings(max_examples=1500, deadline=None)
@given(text=st.text(st.characters(exclude_categories=()), max_size=40))
def test_every_string_matches_quote_json_string(text: str) -> None:
    assert _jsonl.dumps_js(text) == spec_quote(text)
    assert _jsonl.dumps_js({text: 1}) == "{" + spec_quote(text) + ":1}"


def test_object_keys_follow_javascript_property_order() -> None:
    value = {"b": 1, "10": 2, "2": 3, "01": 4, "4294967295": 5, "4294967294": 6, "-1": 7, "a": 8}
    assert _jsonl.dumps_js(value) == (
        '{"2":3,"10":2,"4294967294":6,"b":1,"01":4,"4294967295":5,"-1":7,"a":8}'
    )
    assert _jsonl.dumps_js({1: "x", 2.5: "y", None: "z"}) == '{"1":"x","2.5":"y","null":"z"}'
    assert _jsonl.dumps_js({True: "t", 1e21: "e"}) == '{"true":"t","1e+21":"e"}'


def test_circular_and_unserialisable_values_are_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular"):
        _jsonl.dumps_line(loop)
    with pytest.raises(TypeError):
        _jsonl.dumps_line({"v": object()})


# --------------------------------------------------------------------------------------
# Real-shaped lines, every parser
# --------------------------------------------------------------------------------------


def fixture_lines() -> list[bytes]:
    lines = []
    for path in sorted(FIXTURES.glob("*.jsonl")):
        lines += [x for x in path.read_bytes().split(b"\n") if x]
    return lines


def test_fixtures_hold_the_number_shapes_the_issue_names() -> None:
    blob = b"\n".join(fixture_lines())
    for shape in (b"0.00008375", b"0.000005", b"1e-7", b"1.5e-7", b"1e+21", b"2.5e+21"):
        assert shape in blob, shape
    python_lines = [
        json.dumps(json.loads(x), separators=(",", ":"), ensure_ascii=False).encode()
        for x in fixture_lines()
    ]
    # the old writer (json.dumps) changed some of these lines; the check below is not empty
    assert sum(a != b for a, b in zip(python_lines, fixture_lines(), strict=True)) >= 5


def test_real_shaped_lines_are_rewritten_byte_for_byte(parser: str) -> None:
    lines = fixture_lines()
    assert len(lines) > 40
    for line in lines:
        value, _ = _jsonl.loads_line(line)
        assert _jsonl.dumps_line(value) == line + b"\n", line[:120]


# --------------------------------------------------------------------------------------
# Real JSON.stringify (node)
# --------------------------------------------------------------------------------------

NODE_DOUBLES = r"""
const lines = require("fs").readFileSync(0, "utf8").split("\n").filter(Boolean);
const out = lines.map((h) => JSON.stringify(Buffer.from(h, "hex").readDoubleBE(0)));
process.stdout.write(out.join("\n") + "\n");
"""
NODE_STRINGS = r"""
const lines = require("fs").readFileSync(0, "utf8").split("\n").filter(Boolean);
const out = lines.map((l) => JSON.stringify(String.fromCharCode(...JSON.parse(l))));
process.stdout.write(out.join("\n") + "\n");
"""
NODE_RESTRINGIFY = r"""
const lines = require("fs").readFileSync(0, "utf8").split("\n").filter(Boolean);
process.stdout.write(lines.map((l) => JSON.stringify(JSON.parse(l))).join("\n") + "\n");
"""


def run_node(script: str, lines: list[str]) -> list[str]:
    assert NODE is not None
    done = subprocess.run(
        [NODE, "-e", script],
        input=("\n".join(lines) + "\n").encode(),
        capture_output=True,
        check=True,
        timeout=120,
    )
    return done.stdout.decode("utf-8").split("\n")[:-1]


def sample_doubles(count: int) -> list[float]:
    rng = random.Random(20261104)
    values = [x for x, _ in EXAMPLES]
    for _ in range(count):
        (x,) = struct.unpack(">d", rng.getrandbits(64).to_bytes(8, "big"))
        if math.isfinite(x):
            values.append(x)
    for exponent in range(-330, 310):  # every decade, the thresholds and their neighbours
        for mantissa in (1.0, 1.5, 8.375, 9.999999999999999, 2.220446049250313):
            x = (
                mantissa * 10.0**exponent
                if -300 < exponent < 300
                else float(f"{mantissa}e{exponent}")
            )
            if math.isfinite(x):
                values += [x, math.nextafter(x, 0.0), math.nextafter(x, math.inf)]
    values += [rng.uniform(0, 0.001) for _ in range(2000)]  # usage cost shapes
    values += [float(rng.randrange(-(2**60), 2**60)) for _ in range(1000)]  # integral floats
    return values


@needs_node
def test_numbers_match_real_json_stringify() -> None:
    values = sample_doubles(20000)
    got = run_node(NODE_DOUBLES, [struct.pack(">d", x).hex() for x in values])
    mismatches = [
        (x, ours, js)
        for x, js in zip(values, got, strict=True)
        if (ours := _jsonl.js_number(x)) != js
    ]
    assert not mismatches[:10], f"{len(mismatches)} of {len(values)} differ"


@needs_node
def test_strings_match_real_json_stringify() -> None:
    rng = random.Random(7)
    pool = [0, 8, 9, 10, 12, 13, 31, 32, 34, 47, 92, 127, 0xE9, 0x2028, 0x2029, 0x4E2D, 0xFFFF]
    pool += [0xD800, 0xDBFF, 0xDC00, 0xDFFF, 0xD83D, 0xDE00]
    texts = ["".join(chr(rng.choice(pool)) for _ in range(rng.randrange(12))) for _ in range(3000)]
    units = [
        list(struct.unpack(f"<{len(t)}H", t.encode("utf-16-le", "surrogatepass"))) for t in texts
    ]
    got = run_node(NODE_STRINGS, [json.dumps(u) for u in units])
    for text, js in zip(texts, got, strict=True):
        # node writes its own output as UTF-8; lone surrogates never reach it unescaped
        assert _jsonl.dumps_js(text) == js, ascii(text)


@needs_node
def test_real_shaped_and_random_lines_match_real_json_stringify() -> None:
    lines = [x.decode("utf-8") for x in fixture_lines()]
    rng = random.Random(11)
    for _ in range(500):
        lines.append(_jsonl.dumps_js(_random_value(rng, 4)))
    got = run_node(NODE_RESTRINGIFY, lines)
    for line, js in zip(lines, got, strict=True):
        value, _ = _jsonl.loads_line(line.encode("utf-8"))
        assert _jsonl.dumps_js(value) == js, line[:160]


def _random_value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth == 0 or roll < 0.5:
        return rng.choice(
            [
                None,
                True,
                rng.randrange(-(2**53), 2**53),  # integers a JavaScript number holds exactly
                rng.uniform(-1e-4, 1e-4),
                rng.uniform(-1e22, 1e22),
                struct.unpack(">d", rng.getrandbits(62).to_bytes(8, "big"))[0],
                "".join(chr(rng.choice([9, 34, 92, 0xE9, 0x2028, 0x1F600, 65])) for _ in range(5)),
            ]
        )
    if roll < 0.75:
        return [_random_value(rng, depth - 1) for _ in range(rng.randrange(4))]
    keys = ["a", "0", "17", "01", "-2", "é", "4294967295", "4294967294", "x y"]
    return {rng.choice(keys): _random_value(rng, depth - 1) for _ in range(rng.randrange(5))}
