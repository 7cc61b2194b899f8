"""The owned-write journal's on-disk format: ``<transcript>.fence``.

One file beside the transcript, written only by the holder of the transcript's write lock
(docs/journal.md). Little-endian, fixed sizes, so record *n* sits at
``data_start + (n - base_seq) * RECORD_SIZE`` and a reader seeks to it in O(1):

- a 4096-byte header: magic, version, a random salt (new for every journal created, kept by
  compaction), the base (the sequence number, transcript offset and chain value the first
  record continues from, and the writer claim in force there), the idempotency-key table's
  size and hash, a CRC-32 of those fields; then, from byte ``SLOTS_AT``, the active-fence
  slot table (mutable, LMDB's reader table: which live controller still needs records from
  which sequence number, so compaction keeps them);
- the idempotency-key table carried over by compaction (``KEY_SIZE`` bytes per key);
- 128-byte records, each CRC'd and chained: ``chain = XXH3-128(previous chain || the
  record's first CHAINED bytes)``. A torn record fails its CRC; an edited, removed or
  reordered one breaks the chain.

Record types: ``CLAIM`` (a writer run claimed the session: its run id, the new revision and
the run it superseded), ``APPEND`` (bytes ``[start, end)`` of the transcript with their
XXH3-128, written *before* the bytes: write-ahead), ``VOID`` (records' claims past
``start`` are void: a dead writer's intent, a repaired torn tail).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import xxhash

__all__ = [
    "APPEND",
    "CHAIN_AT",
    "CLAIM",
    "CLAIMANT",
    "COTENANT",
    "HEADER_SIZE",
    "KEY_SIZE",
    "MAGIC",
    "OPERATOR",
    "RECORD_SIZE",
    "ROLE_NAMES",
    "SLOTS_AT",
    "SLOT_COUNT",
    "SLOT_SIZE",
    "TYPE_NAMES",
    "VOID",
    "FormatError",
    "Header",
    "KeyEntry",
    "Record",
    "Slot",
    "chain_start",
    "check_run_id",
    "crc_ok",
    "digest_bytes",
    "key_hash",
    "keys_hash",
    "pack_keys",
    "unpack_keys",
]

MAGIC = b"SFJRNL01"
VERSION = 1
HEADER_SIZE = 4096
RECORD_SIZE = 128
SLOTS_AT = 512
SLOT_SIZE = 64
SLOT_COUNT = (HEADER_SIZE - SLOTS_AT) // SLOT_SIZE  # 56
KEY_SIZE = 32

CLAIM, APPEND, VOID = 1, 2, 3
TYPE_NAMES = {CLAIM: "claim", APPEND: "append", VOID: "void"}
CLAIMANT, COTENANT, OPERATOR = 0, 1, 2
ROLE_NAMES = {CLAIMANT: "claimant", COTENANT: "co-tenant", OPERATOR: "operator"}

RUN_ID_BYTES = 32

# type, role, flags, pid, seq, revision, run id, 44 type-specific bytes, time: the bytes the
# chain covers; then the chain value and a CRC-32 of everything before it.
_HEAD = struct.Struct("<BBHIQQ32s44sQ")
CHAINED = _HEAD.size  # 108
CHAIN_AT = CHAINED  # the chain value's 16 bytes start here
_APPEND_BODY = struct.Struct("<QQ16sQ4x")  # start, end, XXH3-128 of the bytes, key hash
_CLAIM_BODY = struct.Struct("<Q32s4x")  # transcript size at the claim, the superseded run
_VOID_BODY = struct.Struct("<Q36x")  # the transcript's valid end
assert CHAINED + 16 + 4 == RECORD_SIZE

# magic, version, header size, record size, flags, salt, base seq, base offset, base chain,
# base claim run, base claim revision, key count, keys hash, created ns; then a CRC-32.
_HEADER = struct.Struct("<8sIIII16sQQ16s32sQIQQ")
_HEADER_CRC = struct.Struct("<I")
assert _HEADER.size + _HEADER_CRC.size <= SLOTS_AT
# pid, flags, process start time, fence seq, token, updated ns, run id prefix
_SLOT = struct.Struct("<IIQQQQ24s")
assert _SLOT.size <= SLOT_SIZE
_KEY = struct.Struct("<QQQ8s")  # key hash, start, end, first 8 bytes of the digest
assert _KEY.size == KEY_SIZE


class FormatError(ValueError):
    """Bytes that are not a valid journal header or record (torn, edited, foreign)."""


def check_run_id(run_id: str) -> bytes:
    """A run id as stored: 1 to 32 bytes of UTF-8 without NUL."""
    if not isinstance(run_id, str):
        raise TypeError(f"run_id must be a str, not {type(run_id).__name__}")
    raw = run_id.encode("utf-8")
    if not raw or len(raw) > RUN_ID_BYTES or b"\0" in raw:
        raise ValueError(f"run_id must be 1 to {RUN_ID_BYTES} UTF-8 bytes without NUL: {run_id!r}")
    return raw


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def crc_ok(raw: bytes) -> bool:
    """Whether a record's CRC-32 matches its bytes (a torn or edited record fails)."""
    return (
        len(raw) == RECORD_SIZE
        and zlib.crc32(raw[:-4]) == struct.unpack_from("<I", raw, RECORD_SIZE - 4)[0]
    )


def digest_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """XXH3-128 of ``data``, as records store it."""
    return xxhash.xxh3_128_digest(data)


def key_hash(key: str) -> int:
    """64-bit hash of an idempotency key (never 0: 0 means "no key")."""
    if not isinstance(key, str) or not key:
        raise ValueError("an idempotency key must be a non-empty str")
    return xxhash.xxh3_64_intdigest(key.encode("utf-8")) or 1


def chain_start(salt: bytes) -> bytes:
    """The chain value a new journal's first record continues from."""
    return xxhash.xxh3_128_digest(MAGIC + salt)


@dataclass(frozen=True)
class Record:
    """One record. ``start``/``end``: the transcript range (APPEND), the transcript size at
    the claim (CLAIM) or the valid end (VOID; both equal for those two)."""

    type: int
    role: int
    seq: int
    revision: int
    run_id: str
    start: int
    end: int
    digest: bytes = b""
    key_hash: int = 0
    superseded: str | None = None  # CLAIM: the run it replaced
    pid: int = 0
    time_ns: int = 0
    chain: bytes = b""  # set by pack/unpack

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, str(self.type))

    @property
    def role_name(self) -> str:
        return ROLE_NAMES.get(self.role, str(self.role))

    def pack(self, prev_chain: bytes, seq: int | None = None) -> tuple[bytes, bytes]:
        """The record's bytes chained to ``prev_chain`` (numbered ``seq``, default its
        own), and its chain value."""
        if self.type == APPEND:
            body = _APPEND_BODY.pack(self.start, self.end, self.digest, self.key_hash)
        elif self.type == CLAIM:
            other = check_run_id(self.superseded) if self.superseded else b""
            body = _CLAIM_BODY.pack(self.start, other)
        elif self.type == VOID:
            body = _VOID_BODY.pack(self.start)
        else:
            raise ValueError(f"unknown record type {self.type}")
        head = _HEAD.pack(
            self.type,
            self.role,
            0,
            self.pid & 0xFFFFFFFF,
            self.seq if seq is None else seq,
            self.revision,
            check_run_id(self.run_id),
            body,
            self.time_ns,
        )
        chain = xxhash.xxh3_128_digest(prev_chain + head)
        body_crc = head + chain
        return body_crc + struct.pack("<I", zlib.crc32(body_crc)), chain

    @classmethod
    def unpack(cls, raw: bytes, prev_chain: bytes) -> Record:
        """Decode and check one record; ``FormatError`` when its CRC or chain fails."""
        if len(raw) != RECORD_SIZE:
            raise FormatError(f"a record is {RECORD_SIZE} bytes, got {len(raw)}")
        (crc,) = struct.unpack_from("<I", raw, RECORD_SIZE - 4)
        if zlib.crc32(raw[: RECORD_SIZE - 4]) != crc:
            raise FormatError("record CRC mismatch (torn or edited)")
        head = raw[:CHAINED]
        chain = raw[CHAINED : CHAINED + 16]
        if xxhash.xxh3_128_digest(prev_chain + head) != chain:
            raise FormatError("record chain mismatch (a record was removed, edited or reordered)")
        kind, role, _flags, pid, seq, revision, run, body, time_ns = _HEAD.unpack(head)
        common = {
            "type": kind,
            "role": role,
            "seq": seq,
            "revision": revision,
            "run_id": _text(run),
            "pid": pid,
            "time_ns": time_ns,
            "chain": chain,
        }
        if kind == APPEND:
            start, end, digest, khash = _APPEND_BODY.unpack(body)
            if end < start:
                raise FormatError(f"record {seq}: end {end} before start {start}")
            return cls(start=start, end=end, digest=digest, key_hash=khash, **common)
        if kind == CLAIM:
            size, other = _CLAIM_BODY.unpack(body)
            return cls(start=size, end=size, superseded=_text(other) or None, **common)
        if kind == VOID:
            (valid,) = _VOID_BODY.unpack(body)
            return cls(start=valid, end=valid, **common)
        raise FormatError(f"record {seq}: unknown type {kind}")


@dataclass(frozen=True)
class Header:
    """The journal's fixed header (without the slot table)."""

    salt: bytes
    base_seq: int
    base_offset: int
    base_chain: bytes
    claim_run: str | None
    claim_revision: int
    key_count: int = 0
    keys_hash: int = 0
    created_ns: int = 0

    @property
    def data_start(self) -> int:
        """Where record ``base_seq`` sits: after the header and the key table."""
        keys = self.key_count * KEY_SIZE
        return HEADER_SIZE + -(-keys // RECORD_SIZE) * RECORD_SIZE

    def record_at(self, seq: int) -> int:
        return self.data_start + (seq - self.base_seq) * RECORD_SIZE

    def pack(self) -> bytes:
        claim = check_run_id(self.claim_run) if self.claim_run else b""
        fixed = _HEADER.pack(
            MAGIC,
            VERSION,
            HEADER_SIZE,
            RECORD_SIZE,
            0,
            self.salt,
            self.base_seq,
            self.base_offset,
            self.base_chain,
            claim,
            self.claim_revision,
            self.key_count,
            self.keys_hash,
            self.created_ns,
        )
        return fixed + _HEADER_CRC.pack(zlib.crc32(fixed))

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) < _HEADER.size + _HEADER_CRC.size:
            raise FormatError("journal header is truncated")
        if raw[:8] != MAGIC:
            raise FormatError("not a sessionfence journal (bad magic)")
        fixed = raw[: _HEADER.size]
        (crc,) = _HEADER_CRC.unpack_from(raw, _HEADER.size)
        if zlib.crc32(fixed) != crc:
            raise FormatError("journal header CRC mismatch (torn or edited)")
        (
            _magic,
            version,
            header_size,
            record_size,
            _flags,
            salt,
            base_seq,
            base_offset,
            base_chain,
            claim,
            claim_revision,
            key_count,
            keys_hash,
            created_ns,
        ) = _HEADER.unpack(fixed)
        if version != VERSION or header_size != HEADER_SIZE or record_size != RECORD_SIZE:
            raise FormatError(f"unsupported journal version {version}")
        if base_seq < 1:
            raise FormatError("journal base sequence number is 0")
        return cls(
            salt=salt,
            base_seq=base_seq,
            base_offset=base_offset,
            base_chain=base_chain,
            claim_run=_text(claim) or None,
            claim_revision=claim_revision,
            key_count=key_count,
            keys_hash=keys_hash,
            created_ns=created_ns,
        )


@dataclass(frozen=True)
class Slot:
    """An active fence: a live controller that still needs records from ``fence_seq`` on."""

    pid: int
    starttime: int
    fence_seq: int
    token: int
    updated_ns: int
    run_prefix: str

    def pack(self) -> bytes:
        run = self.run_prefix.encode("utf-8")[:24]
        raw = _SLOT.pack(
            self.pid, 1, self.starttime, self.fence_seq, self.token, self.updated_ns, run
        )
        return raw.ljust(SLOT_SIZE, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> Slot | None:
        pid, used, starttime, fence_seq, token, updated_ns, run = _SLOT.unpack_from(raw)
        if not used:
            return None
        return cls(pid, starttime, fence_seq, token, updated_ns, _text(run))


@dataclass(frozen=True)
class KeyEntry:
    """An idempotency key carried over by compaction: its hash, the entry's range and the
    first 8 bytes of the bytes' digest (a retry checks them before answering)."""

    key_hash: int
    start: int
    end: int
    digest: bytes = b""


def pack_keys(keys: list[KeyEntry]) -> bytes:
    raw = b"".join(_KEY.pack(k.key_hash, k.start, k.end, k.digest) for k in keys)
    return raw.ljust(-(-len(raw) // RECORD_SIZE) * RECORD_SIZE, b"\0")


def unpack_keys(raw: bytes, count: int, expected_hash: int) -> list[KeyEntry]:
    table = raw[: count * KEY_SIZE]
    if len(table) != count * KEY_SIZE or xxhash.xxh3_64_intdigest(table) != expected_hash:
        raise FormatError("journal key table is truncated or edited")
    return [KeyEntry(*_KEY.unpack_from(table, i * KEY_SIZE)) for i in range(count)]


def keys_hash(keys: list[KeyEntry]) -> int:
    return xxhash.xxh3_64_intdigest(
        b"".join(_KEY.pack(k.key_hash, k.start, k.end, k.digest) for k in keys)
    )
