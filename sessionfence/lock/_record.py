"""The owner record inside a lock file, process liveness, and the operator knobs.

The record is diagnostics and fence input, never the lock itself: the OS lock decides who
holds. Decisions taken from a record (its age, whether it is stale) use the host-wide
monotonic clock when the record was written on this boot of this host, so stepping the
wall clock changes nothing; ``created_at`` is only for humans and foreign records.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import socket
import sys
import time
from datetime import datetime, timezone
from typing import Any

# An "infinite" max hold is recorded and watched as MAX_TIMER_SECONDS (the timer cap).
from .._util import MAX_TIMER_SECONDS as MAX_TIMER_SECONDS

__all__ = [
    "DEFAULT_MAX_HOLD",
    "DEFAULT_STALE",
    "DEFAULT_TIMEOUT",
    "ENV_MAX_HOLD",
    "ENV_STALE",
    "ENV_TIMEOUT",
    "MAX_TIMER_SECONDS",
    "Default",
    "OwnerRecord",
    "boot_id",
    "check_seconds",
    "describe_owner",
    "encode_record",
    "env_seconds",
    "hostname",
    "is_owner_record",
    "parse_record",
    "pid_alive",
    "process_starttime",
    "record_age",
    "record_generation",
    "resolve_settings",
    "stale_reasons",
    "stale_setting",
]

OwnerRecord = dict[str, Any]

_MAX_SAFE_INTEGER = 2**53 - 1
_DIGITS = re.compile(r"[0-9]+")

STATE_HELD = b"held"
STATE_FREE = b"free"  # same length as "held": release rewrites four bytes in place


def env_seconds(name: str) -> float | None:
    """An operator override in milliseconds, as seconds; None when unset or invalid.

    Only plain decimal digits count, so ``1e3``, ``0x1000``, ``-5`` or a value past 2**53
    (where float ms lose precision) are ignored rather than half-understood.
    """
    raw = _getenv(name)
    if raw is None:
        return None
    text = raw.strip()
    if not _DIGITS.fullmatch(text):
        return None
    value = int(text)
    if value <= 0 or value > _MAX_SAFE_INTEGER:
        return None
    return value / 1000.0


def _getenv(name: str) -> str | None:
    """``os.environ.get(name)``; on POSIX without the KeyError that ``Mapping.get`` raises
    and catches inside for an unset variable (most of the cost of an acquisition's three
    lookups): ``os.environ`` keeps its values, encoded, in the ``_data`` dict it updates on
    every change, which is what its own ``__getitem__`` reads."""
    if _ENV_DATA is not None:
        raw = _ENV_DATA.get(os.fsencode(name))
        return None if raw is None else os.fsdecode(raw)
    return os.environ.get(name)


_env_data = getattr(os.environ, "_data", None)
_ENV_DATA: dict[bytes, bytes] | None = (
    _env_data
    if sys.platform != "win32" and isinstance(_env_data, dict) and os.supports_bytes_environ
    else None
)

ENV_TIMEOUT = "SESSIONFENCE_LOCK_TIMEOUT_MS"
ENV_STALE = "SESSIONFENCE_LOCK_STALE_MS"
ENV_MAX_HOLD = "SESSIONFENCE_LOCK_MAX_HOLD_MS"


class Default(float):
    """A default argument value the resolver can tell apart from the same number passed
    explicitly: environment overrides replace defaults only, explicit arguments win."""

    __slots__ = ()


DEFAULT_TIMEOUT = Default(60.0)
DEFAULT_STALE = Default(1800.0)
DEFAULT_MAX_HOLD = Default(300.0)


def check_seconds(name: str, value: object, *, zero_ok: bool, inf_ok: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not zero_ok):
        raise ValueError(f"{name} must be {'>= 0' if zero_ok else '> 0'} seconds, got {value!r}")
    if math.isinf(seconds) and not inf_ok:
        raise ValueError(f"{name} must be finite, got {value!r}")
    return seconds


def resolve_settings(
    timeout: float | None, stale: float | None, max_hold: float | None
) -> tuple[float, float, float]:
    """Resolve arguments, environment overrides (read now, at call time) and defaults.

    ``None`` means "not given" too, so wrappers can forward an unset option and still let
    the operator's environment override the default.
    """
    # Environment values and defaults are valid by construction (positive, finite): only
    # explicit arguments are checked. A positive finite float passes at a glance.
    if timeout is None or timeout is DEFAULT_TIMEOUT:
        timeout = env_seconds(ENV_TIMEOUT) or _TIMEOUT
    elif not (type(timeout) is float and 0.0 < timeout < math.inf):
        timeout = check_seconds("timeout", timeout, zero_ok=True, inf_ok=True)
    if stale is None or stale is DEFAULT_STALE:
        stale = env_seconds(ENV_STALE) or _STALE
    elif not (type(stale) is float and 0.0 < stale < math.inf):
        stale = check_seconds("stale", stale, zero_ok=False, inf_ok=False)
    if max_hold is None or max_hold is DEFAULT_MAX_HOLD:
        max_hold = env_seconds(ENV_MAX_HOLD) or _MAX_HOLD
    elif not (type(max_hold) is float and 0.0 < max_hold < math.inf):
        max_hold = check_seconds("max_hold", max_hold, zero_ok=False, inf_ok=True)
    return timeout, stale, max_hold


_TIMEOUT = float(DEFAULT_TIMEOUT)
_STALE = float(DEFAULT_STALE)
_MAX_HOLD = float(DEFAULT_MAX_HOLD)


def stale_setting(stale: float | None) -> float:
    """``stale`` for inspection: the argument, else the environment, else the default."""
    if stale is None:
        return env_seconds(ENV_STALE) or float(DEFAULT_STALE)
    return check_seconds("stale", stale, zero_ok=False, inf_ok=False)


_host: str | None = None
_boot_id: str | bool | None = False  # False: not read yet


def hostname() -> str:
    global _host
    if _host is None:
        _host = socket.gethostname()
    return _host


def boot_id() -> str | None:
    """Linux's per-boot id: monotonic readings are comparable only within one boot."""
    global _boot_id
    if _boot_id is False:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
                _boot_id = fh.read().strip() or None
        except OSError:
            _boot_id = None
    return _boot_id if isinstance(_boot_id, str) else None


def _proc_stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses; the fields after the last ')' are fixed.
    end = raw.rfind(b")")
    if end < 0:
        return None
    return raw[end + 1 :].decode("ascii", "replace").split()


def process_starttime(pid: int) -> int | None:
    """Linux ``/proc/<pid>/stat`` field 22 (start time in clock ticks), else None."""
    if not sys.platform.startswith("linux"):
        return None
    fields = _proc_stat_fields(pid)
    # fields[0] is field 3 (state), so field 22 is fields[19].
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a running (not zombie) process on this host."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        import ctypes
        from ctypes import wintypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = wintypes.HANDLE
        kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
        kernel32.GetExitCodeProcess.argtypes = (wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD))
        kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)
        process_query_limited_information = 0x1000
        handle = kernel32.OpenProcess(process_query_limited_information, False, pid)
        if not handle:
            # Access denied means it exists; anything else (invalid parameter) means gone.
            return bool(ctypes.get_last_error() == 5)
        try:
            code = wintypes.DWORD()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return bool(code.value == 259)  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, it is just not ours
    except OSError as exc:
        return exc.errno != errno.ESRCH
    fields = _proc_stat_fields(pid)
    # A zombie keeps its pid until reaped but holds no locks any more.
    return not (fields is not None and fields and fields[0] in ("Z", "X"))


# The fields that only change with the process, serialised once per pid: acquisition is
# on every writer's hot path, and json.dumps of the whole record dominated its cost.
_static_head: tuple[int, str] | None = None


def _head() -> str:
    global _static_head
    pid = os.getpid()
    if _static_head is None or _static_head[0] != pid:
        fields = {"pid": pid, "host": hostname(), "starttime": process_starttime(pid)}
        _static_head = (pid, json.dumps(fields, separators=(",", ":"))[:-1])
    return _static_head[1]


_boot_field: str | None = None
# The created_at text of the current second, re-rendered once a second.
_second: tuple[int, str] = (-1, "")


def _created_at(wall: float) -> str:
    """``iso_utc(wall)``, with the calendar part rendered once per second."""
    global _second
    seconds, rest = divmod(math.floor(wall * 1000), 1000)
    cached = _second
    if cached[0] != seconds:
        cached = _second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{cached[1]}.{rest:03d}Z"


def encode_record(
    *, generation: int, max_hold: float, monotonic: float, wall: float
) -> tuple[bytes, int, str]:
    """Serialise a fresh owner record: ``(bytes, offset of the state value, token)``.

    Key order: pid, host, starttime, created_at, max_hold_ms, generation, token, boot_id,
    monotonic, state. ``state`` comes last so release can flip it in place.
    """
    global _boot_field
    if _boot_field is None:
        _boot_field = json.dumps(boot_id())
    token = os.urandom(16).hex()
    max_hold_ms = int(min(max_hold, MAX_TIMER_SECONDS) * 1000)
    prefix = (
        f'{_head()},"created_at":"{_created_at(wall)}","max_hold_ms":{max_hold_ms},'
        f'"generation":{int(generation)},"token":"{token}","boot_id":{_boot_field},'
        f'"monotonic":{float(monotonic)!r},"state":"'
    ).encode("ascii")
    return prefix + STATE_HELD + b'"}\n', len(prefix), token


def parse_record(raw: bytes) -> OwnerRecord | None:
    """The record as a dict, or None for empty, truncated, non-UTF-8 or non-object data."""
    if not raw or len(raw) > (1 << 20):
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# The fields every record sessionfence writes has, with their JSON types (docs/design.md,
# "Owner record").
_RECORD_FIELDS: tuple[tuple[str, type], ...] = (
    ("pid", int),
    ("host", str),
    ("created_at", str),
    ("max_hold_ms", int),
    ("generation", int),
    ("token", str),
)


def is_owner_record(record: OwnerRecord | None) -> bool:
    """Whether ``record`` is an owner record as sessionfence writes it.

    Tells a session lock file apart from other ``*.lock`` files (``poetry.lock``,
    ``composer.lock``, another program's JSON lock file): every field of ``_RECORD_FIELDS``
    present with its type, a positive pid, a parseable ``created_at`` and, if there is a
    ``state``, one of ours.
    """
    if record is None:
        return False
    for key, kind in _RECORD_FIELDS:
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return False
    if record["pid"] <= 0 or not record["token"]:
        return False
    if _parse_created_at(record["created_at"]) is None:
        return False
    starttime = record.get("starttime")
    if starttime is not None and (not isinstance(starttime, int) or isinstance(starttime, bool)):
        return False
    return record.get("state", STATE_HELD.decode()) in (STATE_HELD.decode(), STATE_FREE.decode())


def _int_field(record: OwnerRecord, key: str) -> int | None:
    value = record.get(key)
    # bool is an int subclass; a record saying pid=true is garbage, not pid 1.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def record_generation(record: OwnerRecord | None) -> int:
    gen = _int_field(record, "generation") if record is not None else None
    return max(0, gen) if gen is not None else 0


def _parse_created_at(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _same_boot(record: OwnerRecord) -> bool:
    """Whether the record's monotonic reading is comparable with ours.

    The monotonic clock is host-wide (CLOCK_MONOTONIC, mach_absolute_time, the Windows
    tick count) but restarts at boot. Linux names each boot; elsewhere neither side has a
    boot id and the same host is taken as the same boot: a record from before a reboot
    is overwritten by the first holder after it, so at worst it is read once, in the
    moment between a new holder's lock and its record write.
    """
    host = record.get("host")
    if host is not None and host != hostname():
        return False
    return record.get("boot_id") == boot_id()


def record_age(record: OwnerRecord) -> float | None:
    """Seconds since the record was written, never negative; None when it cannot tell."""
    mono = record.get("monotonic")
    if (
        isinstance(mono, (int, float))
        and not isinstance(mono, bool)
        and math.isfinite(mono)
        and _same_boot(record)
    ):
        return max(0.0, time.monotonic() - float(mono))
    # A foreign or hand-written record: only its wall-clock stamp is available. A stamp in
    # the future (skewed writer) reads as age 0, never negative.
    created = _parse_created_at(record.get("created_at"))
    if created is None:
        return None
    return max(0.0, time.time() - created)


def _owner_facts(record: OwnerRecord | None) -> tuple[int | None, bool | None, bool]:
    """``(pid, alive, local)``; alive is None when liveness cannot be known (other host)."""
    if record is None:
        return None, None, True
    pid = _int_field(record, "pid")
    host = record.get("host")
    local = host is None or host == hostname()
    if pid is None or pid <= 0:
        return None, None, local
    if not local:
        return pid, None, False
    if pid == os.getpid():
        return pid, True, True
    alive = pid_alive(pid)
    if alive:
        recorded = _int_field(record, "starttime")
        if recorded is not None and _same_boot_or_unknown(record):
            current = process_starttime(pid)
            # Same pid, different start time: the pid was recycled; the writer is gone.
            if current is not None and current != recorded:
                alive = False
    return pid, alive, local


def _same_boot_or_unknown(record: OwnerRecord) -> bool:
    theirs = record.get("boot_id")
    ours = boot_id()
    return theirs is None or ours is None or theirs == ours


def describe_owner(record: OwnerRecord | None) -> str:
    """``pid=123 host=h alive=true ageMs=5000``: the owner as the lock errors print it."""
    if record is None:
        return "owner=unknown"
    pid, alive, _ = _owner_facts(record)
    if pid is None:
        raw = record.get("pid")
        parts = [f"pid={raw!r}" if raw is not None else "owner=unknown"]
    else:
        parts = [f"pid={pid}"]
    host = record.get("host")
    if isinstance(host, str) and host:
        parts.append(f"host={host}")
    if pid is not None:
        parts.append("alive=" + ("unknown" if alive is None else "true" if alive else "false"))
    age = record_age(record)
    if age is not None:
        parts.append(f"ageMs={math.floor(age * 1000)}")
    return " ".join(parts)


def stale_reasons(record: OwnerRecord | None, stale: float) -> list[str]:
    """Why a *held* lock's live holder should be reported (never broken); [] if it should not.

    Only a live holder on this host, in another process, that has not marked its record
    released can be stale. A dead or recycled pid means the record is left over from a
    holder that is gone, so whoever holds the OS lock now has not written its record yet:
    that is contention, not staleness. Our own process is never reported.
    """
    if record is None or record.get("state") == STATE_FREE.decode():
        return []
    pid, alive, local = _owner_facts(record)
    if pid is None or not local or pid == os.getpid() or not alive:
        return []
    age = record_age(record)
    if age is None:
        return []
    reasons = []
    if age > stale:
        reasons.append("too-old")
    max_hold_ms = _int_field(record, "max_hold_ms")
    if max_hold_ms is not None and max_hold_ms > 0 and age * 1000 > max_hold_ms:
        reasons.append("hold-exceeded")
    return reasons
