"""The journal's records and header: round trips, and every kind of damage is detected."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sessionfence.journal._format import (
    APPEND,
    CLAIM,
    CLAIMANT,
    COTENANT,
    RECORD_SIZE,
    VOID,
    FormatError,
    Header,
    Record,
    chain_start,
    check_run_id,
    key_hash,
)

SALT = b"0123456789abcdef"
START = chain_start(SALT)

runs = st.text(min_size=1, max_size=8).filter(lambda s: 0 < len(s.encode()) <= 32 and "\0" not in s)
offsets = st.integers(0, 2**62)


@given(
    kind=st.sampled_from([APPEND, CLAIM, VOID]),
    role=st.sampled_from([CLAIMANT, COTENANT]),
    seq=st.integers(1, 2**62),
    revision=st.integers(0, 2**62),
    run=runs,
    start=offsets,
    length=st.integers(0, 2**20),
    digest=st.binary(min_size=16, max_size=16),
    khash=st.integers(0, 2**64 - 1),
    other=st.none() | runs,
)
def test_records_round_trip(
    kind: int,
    role: int,
    seq: int,
    revision: int,
    run: str,
    start: int,
    length: int,
    digest: bytes,
    khash: int,
    other: str | None,
) -> None:
    end = start + length if kind == APPEND else start
    record = Record(
        type=kind,
        role=role,
        seq=seq,
        revision=revision,
        run_id=run,
        start=start,
        end=end,
        digest=digest if kind == APPEND else b"",
        key_hash=khash if kind == APPEND else 0,
        superseded=other if kind == CLAIM else None,
    )
    raw, chain = record.pack(START)
    assert len(raw) == RECORD_SIZE
    back = Record.unpack(raw, START)
    assert back.chain == chain
    assert (back.type, back.role, back.seq, back.revision, back.run_id) == (
        kind,
        role,
        seq,
        revision,
        run,
    )
    assert (back.start, back.end) == (start, end)
    if kind == APPEND:
        assert (back.digest, back.key_hash) == (digest, khash)
    if kind == CLAIM:
        assert back.superseded == other


def _record() -> bytes:
    record = Record(APPEND, COTENANT, 1, 1, "gateway", 10, 20, b"d" * 16, 5)
    return record.pack(START)[0]


@pytest.mark.parametrize("at", [0, 9, 40, 80, 107, 110, 125])
def test_any_flipped_byte_is_detected(at: int) -> None:
    raw = bytearray(_record())
    raw[at] ^= 0x40
    with pytest.raises(FormatError):
        Record.unpack(bytes(raw), START)


def test_a_torn_record_is_detected() -> None:
    with pytest.raises(FormatError):
        Record.unpack(_record()[:100], START)


def test_an_edit_that_fixes_the_crc_still_breaks_the_chain() -> None:
    import struct
    import zlib

    raw = bytearray(_record())
    raw[60] ^= 1  # inside the range fields
    raw[124:128] = struct.pack("<I", zlib.crc32(bytes(raw[:124])))
    with pytest.raises(FormatError, match="chain"):
        Record.unpack(bytes(raw), START)


def test_a_record_read_after_the_wrong_predecessor_is_refused() -> None:
    with pytest.raises(FormatError, match="chain"):
        Record.unpack(_record(), chain_start(b"another journal!"))


def test_header_round_trip_and_damage() -> None:
    header = Header(SALT, 7, 1234, START, "run-a", 3, 2, 99, 5)
    raw = header.pack()
    assert Header.unpack(raw) == header
    assert header.data_start == 4096 + 128  # two keys, padded to a record
    damaged = bytearray(raw)
    damaged[30] ^= 1
    with pytest.raises(FormatError):
        Header.unpack(bytes(damaged))
    with pytest.raises(FormatError, match="magic"):
        Header.unpack(b"NOTAJRNL" + raw[8:])


@pytest.mark.parametrize("bad", ["", "x" * 33, "a\0b"])
def test_run_ids_are_checked(bad: str) -> None:
    with pytest.raises(ValueError):
        check_run_id(bad)


def test_idempotency_key_hashes_are_never_zero() -> None:
    assert key_hash("k") != 0
    with pytest.raises(ValueError):
        key_hash("")
