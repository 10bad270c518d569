"""The patch codec: encoding, parsing, applying, and its INVALID_DATA rules."""

from __future__ import annotations

import re
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convergedb.schema.errors import InvalidData
from convergedb.schema.patch import apply_patch, encode_patch, mask_ordinals, parse_patch
from convergedb.schema.rows import RowCodec
from convergedb.schema.types import Field, FieldType
from strategies import valid_fields
from values import field_values, row_values

F = FieldType
SCHEMAS = valid_fields(max_size=10, max_length=30, max_count=5, max_subfields=4)


@given(SCHEMAS, st.data())
@settings(max_examples=200)
def test_applying_a_patch_sets_exactly_the_patched_fields(
    fields: tuple[Field, ...], data: st.DataObject
) -> None:
    codec = RowCodec(fields)
    stored = data.draw(row_values(fields))
    ordinals = data.draw(st.sets(st.integers(0, len(fields) - 1), min_size=1))
    changes = {o: data.draw(field_values(fields[o])) for o in sorted(ordinals)}
    mask, values = encode_patch(codec, changes)
    assert list(mask_ordinals(mask)) == sorted(ordinals)
    patched = apply_patch(codec, codec.encode(stored), mask, values)
    expected = list(stored)
    for ordinal, value in changes.items():
        expected[ordinal] = value
    assert patched == codec.encode(expected)


@given(SCHEMAS, st.data())
@settings(max_examples=100)
def test_patching_a_missing_entity_starts_from_zero(
    fields: tuple[Field, ...], data: st.DataObject
) -> None:
    codec = RowCodec(fields)
    ordinal = data.draw(st.integers(0, len(fields) - 1))
    value = data.draw(field_values(fields[ordinal]))
    mask, values = encode_patch(codec, {ordinal: value})
    expected = codec.decode(codec.zero_row)
    expected[ordinal] = value
    assert apply_patch(codec, codec.zero_row, mask, values) == codec.encode(expected)


CODEC = RowCodec(
    (
        Field(0, "name", F.STRING, max_length=8),
        Field(1, "hp", F.U16),
        Field(2, "alive", F.BOOL),
    )
)
ROW = CODEC.encode(["bob", 10, True])


def test_patch_values_layout_byte_for_byte() -> None:
    mask, values = encode_patch(CODEC, {2: False, 0: "al"})
    assert mask == 0b101
    assert values == struct.pack("<I", 2) + b"al" + b"\x00"


def test_a_field_can_be_patched_to_its_zero_value() -> None:
    mask, values = encode_patch(CODEC, {1: 0, 0: ""})
    assert CODEC.decode(apply_patch(CODEC, ROW, mask, values)) == ["", 0, True]


@pytest.mark.parametrize(
    ("mask", "values", "message"),
    [
        (0b1000, b"", "sets bit 3; the kind has 3 fields"),
        (1 << 63, b"", "sets bit 63"),
        (0b010, b"\x01", "patch values end inside field 'hp'"),
        (0b001, b"\x01\x00", "end inside the length of field 'name'"),
        (0b001, struct.pack("<I", 5) + b"ab", "end inside field 'name'"),
        (0b010, b"\x01\x00\x00", "1 bytes left over"),
        (0b100, b"\x02", "'alive' (bool) holds 0x02"),
        (0b001, struct.pack("<I", 9) + b"123456789", "longer than max_length 8"),
        (0b001, struct.pack("<I", 1) + b"\xff", "invalid UTF-8"),
    ],
)
def test_invalid_patches_are_rejected(mask: int, values: bytes, message: str) -> None:
    with pytest.raises(InvalidData, match=re.escape(message)):
        apply_patch(CODEC, ROW, mask, values)


def test_parse_patch_gives_segments_in_ordinal_order() -> None:
    mask, values = encode_patch(CODEC, {1: 513, 0: "x"})
    assert parse_patch(CODEC, mask, values) == [(0, b"x"), (1, b"\x01\x02")]


@pytest.mark.parametrize(
    ("changes", "message"), [({3: 1}, "no field with ordinal 3"), ({1: -1}, "out of range")]
)
def test_encode_patch_rejects_what_does_not_fit(changes: dict[int, Any], message: str) -> None:
    with pytest.raises(InvalidData, match=message):
        encode_patch(CODEC, changes)
