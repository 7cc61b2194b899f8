"""JSON and JSONL helpers for the transcript model (SPEC §6, reference §10.6-§10.9).

Reading follows what the TypeScript original sees after ``readFileSync(path, "utf8")`` and
``JSON.parse``: invalid UTF-8 becomes U+FFFD (``errors="replace"``), ``NaN``/``Infinity``
literals are rejected, and a value that is not a JSON object is not an entry. The standard
``json`` module is the reference; ``orjson`` (optional) is only a faster route to the same
values, and every input where the two could differ is handed to ``json``:

- anything ``orjson`` refuses (invalid UTF-8, lone surrogate escapes, numbers that overflow
  a double, nesting deeper than 1024) is parsed again by ``json``;
- ``orjson`` silently turns integers outside 64 bits into floats, so a line that has a run
  of 19 or more digits anywhere (cheap to find, rare in transcripts) goes to ``json`` too.

Writing always uses ``json.dumps`` (compact separators, ``ensure_ascii=False``,
``allow_nan=False``): its float text is Python's ``repr``, so the bytes written do not depend
on whether ``orjson`` is installed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

__all__ = [
    "JS_WHITESPACE",
    "dumps_line",
    "has_orjson",
    "js_trim",
    "loads_line",
    "loads_text",
    "set_fast_parser",
]

# What JavaScript's String.prototype.trim() strips: WhiteSpace and LineTerminator, which
# include U+FEFF; Python's str.strip() does not strip U+FEFF (reference §10.7).
JS_WHITESPACE = (
    "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)

_BIG_INT = re.compile(rb"[0-9]{19}")


def js_trim(text: str) -> str:
    return text.strip(JS_WHITESPACE)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_decode = _decoder.decode


def loads_text(text: str) -> Any:
    """``JSON.parse``: raises ``ValueError`` (or ``RecursionError``) on invalid JSON."""
    return _decode(text)


_FastLoads = Callable[[bytes], Any]
_fast_loads: _FastLoads | None
try:  # optional extra: same results, several times faster on large transcripts
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _fast_loads = None
else:
    _fast_loads = _orjson.loads
_installed_fast_loads = _fast_loads


def has_orjson() -> bool:
    return _installed_fast_loads is not None


def set_fast_parser(enabled: bool) -> bool:
    """Turns the ``orjson`` route on or off (tests compare both); returns the old state."""
    global _fast_loads
    old = _fast_loads is not None
    _fast_loads = _installed_fast_loads if enabled else None
    return old


def loads_line(line: bytes) -> tuple[Any, bool]:
    """Parses one JSONL line: ``(value, had_invalid_utf8)``.

    Raises ``ValueError`` or ``RecursionError`` when the line is not JSON. Surrounding JSON
    whitespace (space, tab, CR, LF) is allowed, as ``JSON.parse`` allows it.
    """
    fast = _fast_loads
    if fast is not None and _BIG_INT.search(line) is None:
        try:
            return fast(line), False
        except ValueError:
            pass  # json decides: it may accept what orjson refused (see module docstring)
    try:
        text = line.decode("utf-8")
        replaced = False
    except UnicodeDecodeError:
        text = line.decode("utf-8", "replace")
        replaced = True
    return _decode(text), replaced


def _dumps(value: Any, ascii_only: bool) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=ascii_only, allow_nan=False)


def dumps_line(value: Any) -> bytes:
    """One compact JSON line, newline included.

    ``ValueError`` for NaN/Infinity (``JSON.stringify`` would write ``null`` and silently
    change the value) and for circular structures; ``TypeError`` for values JSON cannot
    hold. A string with a lone surrogate cannot be UTF-8; such a value is written with
    ``\\uXXXX`` escapes instead, as ``JSON.stringify`` does, so it still round-trips.
    """
    try:
        text = _dumps(value, False)
    except ValueError as exc:
        raise ValueError(f"entry cannot be written as JSON: {exc}") from exc
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = _dumps(value, True).encode("ascii")
    return data + b"\n"
