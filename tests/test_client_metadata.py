"""Key/value metadata helpers: the documented format, round trips, limits and clear errors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import convergedb as cdb
from convergedb.limits import MAX_METADATA_LENGTH


def test_the_format_is_a_count_then_str16_pairs() -> None:
    encoded = cdb.encode_metadata({"actor": "p1", "action": "trade"})
    expected = (
        struct.pack("<H", 2)
        + struct.pack("<H", 5)
        + b"actor"
        + struct.pack("<H", 2)
        + b"p1"
        + struct.pack("<H", 6)
        + b"action"
        + struct.pack("<H", 5)
        + b"trade"
    )
    assert encoded == expected
    assert cdb.decode_metadata(encoded) == {"actor": "p1", "action": "trade"}


def test_no_pairs_is_no_metadata() -> None:
    assert cdb.encode_metadata({}) == b""
    assert cdb.decode_metadata(b"") == {}
    assert cdb.decode_metadata(b"\x00\x00") == {}


def test_utf8_and_order_are_kept() -> None:
    pairs = {"zé": "ünïcødé ✓", "a": "", "": "empty key"}
    decoded = cdb.decode_metadata(cdb.encode_metadata(pairs))
    assert decoded == pairs
    assert list(decoded) == list(pairs)


@given(st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=20))
def test_round_trip(pairs: dict[str, str]) -> None:
    encoded = cdb.encode_metadata(pairs)
    assert len(encoded) <= MAX_METADATA_LENGTH
    assert cdb.decode_metadata(encoded) == pairs
    assert cdb.is_metadata(encoded)


def test_the_limit_is_65535_bytes() -> None:
    # count (2) + key length (2) + "k" (1) + value length (2) + value = 65,535 exactly
    value = "v" * (MAX_METADATA_LENGTH - 7)
    at_limit = cdb.encode_metadata({"k": value})
    assert len(at_limit) == MAX_METADATA_LENGTH
    assert cdb.decode_metadata(at_limit) == {"k": value}
    with pytest.raises(cdb.MetadataError, match="65535 bytes"):
        cdb.encode_metadata({"k": value + "v"})
    with pytest.raises(cdb.MetadataError, match="65535 bytes"):
        cdb.encode_metadata({f"key{i}": "x" * 1000 for i in range(70)})
    with pytest.raises(cdb.MetadataError, match="above the limit"):
        cdb.decode_metadata(at_limit + b"x")


def test_non_strings_are_refused() -> None:
    with pytest.raises(cdb.MetadataError, match="values must be str, got int of key 'n'"):
        cdb.encode_metadata({"n": 1})  # type: ignore[dict-item]
    with pytest.raises(cdb.MetadataError, match="keys must be str, got bytes"):
        cdb.encode_metadata({b"k": "v"})  # type: ignore[dict-item]
    assert issubclass(cdb.MetadataError, ValueError)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x01", "ends inside the pair count"),
        (b"\x01\x00", "ends inside the length of the key of pair 0"),
        (b"\x01\x00\x05\x00ab", "ends inside the key of pair 0"),
        (b"\x01\x00\x01\x00a", "ends inside the length of the value of pair 'a'"),
        (b"\x01\x00\x01\x00a\x00\x00!", "1 bytes left over"),
        (b"\x01\x00\x01\x00\xff\x00\x00", "not valid UTF-8"),
        (b"\x02\x00\x01\x00a\x00\x00\x01\x00a\x00\x00", "repeats the key 'a'"),
        (b"free text, not key/value", "not key/value metadata|ends inside"),
    ],
)
def test_bytes_not_in_the_format_are_refused(data: bytes, problem: str) -> None:
    with pytest.raises(cdb.MetadataError, match=problem):
        cdb.decode_metadata(data)
    assert not cdb.is_metadata(data)
