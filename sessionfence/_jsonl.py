"""JSON and JSONL helpers for the transcript model (SPEC §6, reference §10.6-§10.9).

Reading follows what the TypeScript original sees after ``readFileSync(path, "utf8")`` and
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

Writing always uses ``json.dumps`` (compact separators, ``ensure_ascii=False``,
``allow_nan=False``): its float text is Python's ``repr``, so the bytes written do not depend
on which parser is installed.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Callable
from typing import Any

__all__ = [
    "JS_WHITESPACE",
    "available_fast_parsers",
    "dumps_line",
    "fast_parser",
    "js_trim",
    "loads_line",
    "loads_text",
    "may_hold_long_integer",
    "set_fast_parser",
]

# What JavaScript's String.prototype.trim() strips: WhiteSpace and LineTerminator, which
# include U+FEFF; Python's str.strip() does not strip U+FEFF (reference §10.7).
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
