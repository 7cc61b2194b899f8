"""JSON and JSONL helpers for the transcript model (docs/design.md, "JavaScript JSON rules").

Reading follows what the JavaScript readers see after ``readFileSync(path, "utf8")`` and
``JSON.parse``: invalid UTF-8 becomes U+FFFD (``errors="replace"``), ``NaN``/``Infinity``
literals are rejected, and a value that is not a JSON object is not an entry. The standard
``json`` module is the reference. A faster parser, when installed, is only a quicker route
to the same values; ``msgspec`` is preferred, then ``orjson``. Every input where one could
differ from ``json`` is handed to ``json``:

- anything the fast parser refuses (invalid UTF-8, lone surrogate escapes, numbers that
  overflow a double, very deep nesting) is parsed again by ``json``, which may accept it;
- ``orjson`` silently turns integers outside 64 bits into floats, so with ``orjson`` a line
  with a run of 19 or more digits that is not a fraction or an exponent (found at C speed
  with ``bytes.translate`` and ``bytes.find``; rare in transcripts) goes to ``json`` too.
  ``msgspec`` keeps such integers exact and needs no such check.

Writing (``dumps_line``, ``dumps_js``) produces exactly the bytes JavaScript's
``JSON.stringify`` writes for the same value, so a line sessionfence appends, or a file it
migrates, is byte for byte what pi-mono's and openclaw's writers would have written
(``JSON.stringify(entry)`` in pi-mono ``SessionManager._persist``/``_rewriteFile`` and openclaw
``serializeJsonlLine`` in ``src/config/sessions/transcript-jsonl.ts``). The rules, from the
ECMAScript specification (``Number::toString``, ``SerializeJSONProperty``, ``QuoteJSONString``,
``OrdinaryOwnPropertyKeys``):

- numbers: the shortest digits that round-trip (Python's ``repr`` computes the same digits),
  laid out as ``Number::toString`` does: plain notation for 1e-7 <= |x| < 1e21
  (``0.00008375``, ``100000000000000000000``), exponent form outside it (``1e+21``,
  ``1.5e-7``, exponent without leading zeros); a float that holds an integer has no ``.0``;
  ``-0`` is ``0``. Python ``int`` values are written exactly (a JavaScript number cannot hold
  an integer beyond 2**53 exactly, so JavaScript never writes one that Python reads back
  differently). NaN and infinities are refused (``JSON.stringify`` would write ``null`` and
  silently change the value);
- strings: non-ASCII characters raw (UTF-8), ``"`` and ``\\`` escaped, ``\\b \\f \\n \\r \\t``
  short escapes, other control characters as lowercase ``\\u00XX``; U+2028/U+2029 and ``/``
  raw; a lone surrogate (possible in a Python ``str`` and in a JavaScript string) as a
  lowercase ``\\udXXX`` escape, while a high and a low surrogate next to each other are one
  character, written raw, as JavaScript's UTF-16 strings see them;
- object keys in JavaScript's property order: keys that are array indices (``"0"``,
  ``"17"``: canonical decimal integers below 2**32 - 1) first, in ascending numeric order,
  then the other keys in insertion (file) order. Non-string keys become strings as
  ``json.dumps`` makes them, numbers in JavaScript notation.

The bytes written never depend on which parser is installed: every parser yields the same
values (above), and the writer is this module's alone.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import json.encoder
import math
import re
from collections.abc import Callable
from typing import Any

__all__ = [
    "JS_WHITESPACE",
    "available_fast_parsers",
    "dumps_js",
    "dumps_line",
    "fast_parser",
    "js_number",
    "js_trim",
    "json_equal",
    "loads_line",
    "loads_text",
    "may_hold_long_integer",
    "parse_json",
    "set_fast_parser",
]

# What JavaScript's String.prototype.trim() strips: WhiteSpace and LineTerminator, which
# include U+FEFF; Python's str.strip() does not strip U+FEFF.
JS_WHITESPACE = (
    "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)

# Every integer outside 64 bits has at least 19 digits.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19
_FRACTION_OR_EXPONENT = frozenset(b".eE")


def may_hold_long_integer(line: bytes) -> bool:
    """False when no integer literal in ``line`` can have 19 or more digits.

    A run of 19 digits right after ``.``, ``e`` or ``E`` is part of a float, which both
    parsers round the same way; any other run (a big integer, or digits inside a string)
    answers True, and a string only costs a slower, equally correct parse.
    """
    if len(line) < 19:
        return False
    zeros = line.translate(_DIGITS_TO_ZERO)
    at = zeros.find(_LONG_RUN)
    while at >= 0:
        # find() returns the leftmost match, so ``at`` starts its run of digits
        if at == 0 or line[at - 1] not in _FRACTION_OR_EXPONENT:
            return True
        end = at + 19
        while end < len(zeros) and zeros[end] == 0x30:
            end += 1
        at = zeros.find(_LONG_RUN, end)
    return False


def js_trim(text: str) -> str:
    return text.strip(JS_WHITESPACE)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_decode = _decoder.decode


def loads_text(text: str) -> Any:
    """``JSON.parse``: raises ``ValueError`` (or ``RecursionError``) on invalid JSON."""
    return _decode(text)


def parse_json(text: str) -> tuple[bool, Any]:
    """(True, value) for text ``JSON.parse`` accepts, else (False, None). Nesting deeper
    than the interpreter's stack (a hostile line of 200 KB of ``[[``) is no entry any
    reader can use: refused like invalid JSON, never a ``RecursionError``."""
    try:
        return True, _decode(text)
    except (ValueError, RecursionError):
        return False, None


def json_equal(a: Any, b: Any) -> bool:
    """Deep strict equality of parsed JSON as Node's ``isDeepStrictEqual`` on
    ``JSON.parse`` output: key order ignored, bool is not a number, 1 and 1.0 are equal."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b  # JSON numbers are doubles: 1 and 1.0 are the same value
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if a is None or b is None:
        return a is None and b is None
    return type(a) is type(b) and bool(a == b)


_FastLoads = Callable[[bytes | memoryview], Any]


def _find_fast_parsers() -> dict[str, _FastLoads]:
    # import_module, not import: both are optional, and a static import would make the
    # type check depend on which extras are installed.
    found: dict[str, _FastLoads] = {}
    with contextlib.suppress(ImportError):  # exact big integers, the fastest here
        found["msgspec"] = importlib.import_module("msgspec").json.Decoder().decode
    with contextlib.suppress(ImportError):  # fast too, but needs the long-integer check
        found["orjson"] = importlib.import_module("orjson").loads
    return found


_FAST_PARSERS = _find_fast_parsers()
_fast_name: str | None = next(iter(_FAST_PARSERS), None)
_fast_loads: _FastLoads | None = _FAST_PARSERS.get(_fast_name) if _fast_name else None
_check_long_integers = _fast_name == "orjson"


def available_fast_parsers() -> list[str]:
    """The optional parsers importable here, in order of preference."""
    return list(_FAST_PARSERS)


def fast_parser() -> str | None:
    """The parser ``loads_line`` tries first (``None``: the stdlib ``json`` only)."""
    return _fast_name


def set_fast_parser(choice: str | bool | None) -> str | None:
    """Selects the fast parser: a name from ``available_fast_parsers()``, ``True`` for the
    preferred one, ``False``/``None`` for ``json`` only. Returns the previous choice, which
    can be passed back to restore it (tests and benchmarks compare the routes)."""
    global _fast_name, _fast_loads, _check_long_integers
    old = _fast_name
    if choice is True:
        name = next(iter(_FAST_PARSERS), None)
    elif choice is False or choice is None:
        name = None
    elif choice in _FAST_PARSERS:
        name = choice
    else:
        raise ValueError(f"unknown or missing JSON parser {choice!r}")
    _fast_name = name
    _fast_loads = _FAST_PARSERS[name] if name is not None else None
    _check_long_integers = name == "orjson"
    return old


def loads_line(line: bytes | memoryview) -> tuple[Any, bool]:
    """Parses one JSONL line: ``(value, had_invalid_utf8)``.

    Raises ``ValueError`` or ``RecursionError`` when the line is not JSON (a blank line is
    not JSON either). Surrounding JSON whitespace (space, tab, CR, LF) is allowed, as
    ``JSON.parse`` allows it.
    """
    fast = _fast_loads
    if fast is not None:
        if _check_long_integers:
            line = bytes(line)  # translate() needs bytes; orjson alone would take the view
            use_fast = not may_hold_long_integer(line)
        else:
            use_fast = True
        if use_fast:
            try:
                return fast(line), False
            except (ValueError, RecursionError):
                pass  # json decides: it may accept what the fast parser refused
    try:
        text = str(line, "utf-8")
        replaced = False
    except UnicodeDecodeError:
        text = str(line, "utf-8", "replace")
        replaced = True
    return _decode(text), replaced


# ------------------------------------------------------------------------------------------
# Writing: JSON.stringify, byte for byte.
# ------------------------------------------------------------------------------------------


def js_number(value: float | int) -> str:
    """``Number::toString(value)`` (ECMAScript 2024 §6.1.6.1.20), as ``JSON.stringify``
    writes a finite number. ``ValueError`` for NaN and infinities.

    A Python ``int`` (not ``bool``) is written exactly; a ``float`` gets the shortest digits
    that round-trip (``repr``) in JavaScript's layout.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return int.__repr__(value)
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{x!r} is not valid JSON")
    if x == 0.0:
        return "0"  # -0 too
    if x < 0.0:
        return "-" + _js_positive(-x)
    return _js_positive(x)


def _js_positive(x: float) -> str:
    # repr gives the shortest round-trip digits (k of them) and the decimal exponent; only
    # the layout differs from JavaScript's. With the digits s1..sk and n such that
    # x = 0.s1..sk * 10**n, the layout rules of Number::toString follow.
    text = float.__repr__(x)
    mantissa, _, exponent = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    leading = len(whole) + len(fraction) - len(digits)
    digits = digits.rstrip("0")
    n = len(whole) - leading + (int(exponent) if exponent else 0)
    k = len(digits)
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + digits
    e = n - 1
    sign = "+" if e >= 0 else "-"
    if k == 1:
        return f"{digits}e{sign}{abs(e)}"
    return f"{digits[0]}.{digits[1:]}e{sign}{abs(e)}"


# The C accelerated string quoter: with ensure_ascii=False it escapes exactly what
# QuoteJSONString escapes (``"``, ``\``, control characters, lowercase hex), except lone
# surrogates, which it leaves raw; those are handled below.
_quote = json.encoder.encode_basestring
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_INDEX = 2**32 - 2  # the largest array index


def _quote_js(text: str) -> str:
    """``QuoteJSONString`` for a string that may hold surrogate code points."""
    if _SURROGATE.search(text) is None:
        return _quote(text)
    # JavaScript strings are UTF-16: a high and a low surrogate side by side are one
    # character there, written raw; only lone ones are escaped.
    text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", _quote(text))


def _is_array_index(key: str) -> bool:
    return (
        key.isascii()
        and key.isdigit()
        and (key == "0" or key[0] != "0")
        and (len(key) < 10 or int(key) <= _MAX_INDEX)
    )


def _key_text(key: object) -> str:
    if isinstance(key, str):
        return key
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, (int, float)):
        return js_number(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


class _Writer:
    """One ``JSON.stringify`` run: recursion over the value, pieces joined at the end."""

    __slots__ = ("markers", "out", "quote")

    def __init__(self, quote: Callable[[str], str]) -> None:
        self.out: list[str] = []
        self.markers: set[int] = set()
        self.quote = quote

    def value(self, o: Any) -> None:
        out = self.out
        t = type(o)
        if t is str:
            out.append(self.quote(o))
        elif o is None:
            out.append("null")
        elif o is True:
            out.append("true")
        elif o is False:
            out.append("false")
        elif t is int:
            out.append(int.__repr__(o))
        elif t is float:
            out.append(js_number(o))
        elif isinstance(o, dict):
            self.mapping(o)
        elif isinstance(o, (list, tuple)):
            self.sequence(o)
        elif isinstance(o, str):
            out.append(self.quote(str.__str__(o)))
        elif isinstance(o, (int, float)):  # subclasses (IntEnum, ...); bool is handled above
            out.append(js_number(o))
        else:
            raise TypeError(f"Object of type {t.__name__} is not JSON serializable")

    def _enter(self, o: object) -> int:
        marker = id(o)
        if marker in self.markers:
            raise ValueError("Circular reference detected")
        self.markers.add(marker)
        return marker

    def sequence(self, items: list[Any] | tuple[Any, ...]) -> None:
        out = self.out
        if not items:
            out.append("[]")
            return
        marker = self._enter(items)
        out.append("[")
        first = True
        for item in items:
            if not first:
                out.append(",")
            first = False
            self.value(item)
        out.append("]")
        self.markers.discard(marker)

    def mapping(self, obj: dict[Any, Any]) -> None:
        out = self.out
        if not obj:
            out.append("{}")
            return
        marker = self._enter(obj)
        pairs = [(k if type(k) is str else _key_text(k), v) for k, v in obj.items()]
        if any(_is_array_index(k) for k, _ in pairs if k[:1].isdigit()):
            # OrdinaryOwnPropertyKeys: array indices first, ascending; then the rest
            index = sorted(((int(k), k, v) for k, v in pairs if _is_array_index(k)))
            rest = [(k, v) for k, v in pairs if not _is_array_index(k)]
            pairs = [(k, v) for _, k, v in index] + rest
        quote = self.quote
        out.append("{")
        first = True
        for key, item in pairs:
            if not first:
                out.append(",")
            first = False
            out.append(quote(key))
            out.append(":")
            self.value(item)
        out.append("}")
        self.markers.discard(marker)


def _stringify(value: Any, quote: Callable[[str], str]) -> str:
    writer = _Writer(quote)
    writer.value(value)
    return "".join(writer.out)


def dumps_js(value: Any) -> str:
    """``JSON.stringify(value)`` (see the module notes). ``ValueError`` for NaN/Infinity and
    circular structures, ``TypeError`` for values JSON cannot hold, ``RecursionError`` for
    nesting deeper than the interpreter's recursion limit."""
    text = _stringify(value, _quote)
    if not text.isascii() and _SURROGATE.search(text) is not None:
        # rare: some string holds surrogate code points; quote every string again
        text = _stringify(value, _quote_js)
    return text


def dumps_line(value: Any) -> bytes:
    """One compact JSON line as ``JSON.stringify`` writes it, UTF-8, newline included.

    ``ValueError`` for NaN/Infinity (``JSON.stringify`` would write ``null`` and silently
    change the value) and for circular structures; ``TypeError`` for values JSON cannot
    hold. A lone surrogate is written as a ``\\uXXXX`` escape, as ``JSON.stringify`` does,
    so it still round-trips.
    """
    try:
        text = _stringify(value, _quote)
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # surrogate code points: the rare slow path
            data = _stringify(value, _quote_js).encode("utf-8")
    except ValueError as exc:
        raise ValueError(f"entry cannot be written as JSON: {exc}") from exc
    return data + b"\n"
