"""The canonical row codec: round trips, canonical bytes, every INVALID_DATA rule, widening."""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convergedb.schema import fastcheck
from convergedb.schema.errors import InvalidData
from convergedb.schema.rows import RowCodec
from convergedb.schema.types import Field, FieldType
from strategies import valid_fields
from values import row_values

F = FieldType
SMALL_SCHEMAS = valid_fields(max_size=12, max_length=40, max_count=6, max_subfields=4)


@st.composite
def schemas_with_values(draw: st.DrawFn, allow_nan: bool = False) -> tuple[RowCodec, list[Any]]:
    fields = draw(SMALL_SCHEMAS)
    return RowCodec(fields), draw(row_values(fields, allow_nan=allow_nan))


@given(schemas_with_values())
@settings(max_examples=300)
def test_encode_validate_decode_round_trip(case: tuple[RowCodec, list[Any]]) -> None:
    codec, values = case
    row = codec.encode(values)
    codec.validate(row)
    assert _normalise(codec.decode(row)) == _normalise(values)


@given(schemas_with_values(allow_nan=True))
@settings(max_examples=200)
def test_one_state_has_one_encoding(case: tuple[RowCodec, list[Any]]) -> None:
    codec, values = case
    row = codec.encode(values)
    assert codec.encode(list(values)) == row
    assert codec.encode(codec.decode(row)) == row


@given(SMALL_SCHEMAS, st.data())
@settings(max_examples=150)
def test_widening_reads_appended_fields_as_zero(
    fields: tuple[Field, ...], data: st.DataObject
) -> None:
    old_count = data.draw(st.integers(1, len(fields)))
    old = RowCodec(fields[:old_count])
    new = RowCodec(fields)
    values = data.draw(row_values(fields[:old_count]))
    widened = new.widen(old.encode(values), old_count)
    new.validate(widened)
    assert widened == new.encode(values + new.decode(new.zero_row)[old_count:])


def test_zero_row_is_valid_and_decodes_to_zeros() -> None:
    codec = RowCodec(_sample_fields())
    codec.validate(codec.zero_row)
    assert codec.decode(codec.zero_row) == ["", 0, "", (0.0, False), [], [], 0]


def _sample_fields() -> tuple[Field, ...]:
    vec = (Field(0, "x", F.F32), Field(1, "ok", F.BOOL))
    return (
        Field(0, "name", F.STRING, max_length=8),
        Field(1, "hp", F.U16),
        Field(2, "tag", F.STRING, fixed=True, max_length=4),
        Field(3, "pos", F.STRUCT, struct_name="V", subfields=vec),
        Field(4, "flags", F.BOOL, array=True, max_count=3),
        Field(5, "path", F.STRUCT, array=True, max_count=2, struct_name="V", subfields=vec),
        Field(6, "big", F.U128),
    )


SAMPLE_VALUES = ["héllo", 7, "ab", (1.5, True), [True, False], [(2.0, True)], 2**100]


def test_sample_row_layout_byte_for_byte() -> None:
    row = RowCodec(_sample_fields()).encode(SAMPLE_VALUES)
    fixed = (
        struct.pack("<I", 6)  # name: directory
        + struct.pack("<H", 7)  # hp
        + struct.pack("<H", 2)
        + b"ab\0\0"  # tag: fixed string
        + struct.pack("<f?", 1.5, True)  # pos
        + struct.pack("<I", 2)  # flags: directory
        + struct.pack("<I", 5)  # path: directory
        + (2**100).to_bytes(16, "little")  # big
    )
    data = "héllo".encode() + b"\x01\x00" + struct.pack("<f?", 2.0, True)
    assert row == fixed + data


# --- every INVALID_DATA rule of raw rows --------------------------------------------------------


def _corrupt(row: bytes, offset: int, value: bytes) -> bytes:
    return row[:offset] + value + row[offset + len(value) :]


SAMPLE = RowCodec(_sample_fields())
ROW = SAMPLE.encode(SAMPLE_VALUES)
FIXED = SAMPLE.fixed_size
NAME_DATA = FIXED  # the data zone starts with name's bytes
FLAGS_DATA = FIXED + 6
PATH_DATA = FLAGS_DATA + 2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (ROW[:-1], "fixed zone and directory"),
        (ROW + b"\0", "fixed zone and directory"),
        (ROW[: FIXED - 1], "shorter than the fixed zone"),
        (_corrupt(ROW, 0, struct.pack("<I", 7)), "fixed zone and directory"),
        (_corrupt(ROW, NAME_DATA, b"\xff"), "invalid UTF-8"),
        (_corrupt(ROW, 6, struct.pack("<H", 5)), "exceeds max_length"),
        (_corrupt(ROW, 8 + 3, b"x"), "non-zero padding"),
        (_corrupt(ROW, 8, b"\xc3\x28"), "invalid UTF-8"),
        (_corrupt(ROW, 12 + 4, b"\x02"), "'pos.ok' (bool) holds 0x02"),
        (_corrupt(ROW, FLAGS_DATA + 1, b"\x07"), "'flags' (bool) holds 0x07"),
        (_corrupt(ROW, PATH_DATA + 4, b"\x02"), "'path.ok' (bool) holds 0x02"),
    ],
)
def test_invalid_rows_are_rejected(row: bytes, message: str) -> None:
    with pytest.raises(InvalidData, match=re.escape(message)):
        SAMPLE.validate(row)


def test_variable_value_longer_than_max_length() -> None:
    codec = RowCodec((Field(0, "name", F.BYTES, max_length=3),))
    with pytest.raises(InvalidData, match="longer than max_length 3"):
        codec.validate(struct.pack("<I", 4) + b"abcd")


def test_array_of_partial_elements_and_too_many_elements() -> None:
    codec = RowCodec((Field(0, "xs", F.U16, array=True, max_count=2),))
    with pytest.raises(InvalidData, match="not a whole number of 2-byte elements"):
        codec.validate(struct.pack("<I", 3) + b"abc")
    with pytest.raises(InvalidData, match="3 elements, more than max_count 2"):
        codec.validate(struct.pack("<I", 6) + bytes(6))


def test_fixed_size_row_of_wrong_length() -> None:
    codec = RowCodec((Field(0, "a", F.U32), Field(1, "b", F.F64)))
    codec.validate(bytes(12))
    with pytest.raises(InvalidData, match="this kind's rows are 12"):
        codec.validate(bytes(13))


# --- Python values that do not fit ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("ordinal", "value", "message"),
    [
        (0, "x" * 9, "'name' (string(8)): value is 9 bytes, longer than max_length 8"),
        (0, 5, "'name' (string(8)): expected str"),
        (1, 70_000, "'hp' (u16): 70000 is out of range 0..65535"),
        (1, -1, "'hp' (u16): -1 is out of range"),
        (1, "7", "'hp' (u16): expected int"),
        (2, "abcde", "'tag' (string(4, fixed)): value is 5 bytes"),
        (3, (1e300, True), "'pos.x' (f32): 1e+300 does not fit"),
        (3, (1.0,), "'pos' (struct V): expected 2 sub-values"),
        (3, (1.0, 2), "'pos.ok' (bool): expected True or False"),
        (4, [True] * 4, "'flags' (array<bool>[3]): 4 elements, more than max_count 3"),
        (4, "abc", "expected a list"),
        (5, [(1.0, True), ("x", True)], "'path[1].x' (f32): expected float"),
        (6, -5, "'big' (u128): -5 is out of range"),
        (6, 2**128, f"'big' (u128): {2**128} is out of range"),
    ],
)
def test_values_that_do_not_fit_name_their_field(ordinal: int, value: Any, message: str) -> None:
    values = list(SAMPLE_VALUES)
    values[ordinal] = value
    pattern = re.escape(message)
    with pytest.raises(InvalidData, match=pattern):
        SAMPLE.encode(values)
    with pytest.raises(InvalidData, match=pattern):
        SAMPLE.encode_field(ordinal, value)


def test_wrong_number_of_values() -> None:
    with pytest.raises(InvalidData, match="expected 7 field values, got 6"):
        SAMPLE.encode(SAMPLE_VALUES[:-1])


@given(st.sampled_from([F.I8, F.I16, F.I32, F.I64, F.U8, F.U32, F.U64]), st.integers())
def test_integer_ranges(field_type: FieldType, value: int) -> None:
    codec = RowCodec((Field(0, "n", field_type),))
    size = codec.fixed_size
    signed = field_type.name.startswith("I")
    low, high = (
        (-(2 ** (8 * size - 1)), 2 ** (8 * size - 1) - 1) if signed else (0, 2 ** (8 * size) - 1)
    )
    if low <= value <= high:
        assert codec.decode(codec.encode([value])) == [value]
    else:
        with pytest.raises(InvalidData, match="out of range"):
            codec.encode([value])


# --- segments -------------------------------------------------------------------------------------


@given(schemas_with_values())
@settings(max_examples=100)
def test_split_then_join_is_identity(case: tuple[RowCodec, list[Any]]) -> None:
    codec, values = case
    row = codec.encode(values)
    assert codec.join(codec.split(row)) == row


def test_changed_fields_marks_exactly_the_differing_fields() -> None:
    other = list(SAMPLE_VALUES)
    other[0] = "bye"
    other[5] = []
    assert SAMPLE.changed_fields(ROW, SAMPLE.encode(other)) == 0b100001
    assert SAMPLE.changed_fields(ROW, ROW) == 0


def _normalise(values: Any) -> Any:
    """Floats compared by their bits (NaN != NaN); tuples as lists."""
    if isinstance(values, list | tuple):
        return [_normalise(v) for v in values]
    if isinstance(values, float):
        return struct.pack("<d", values) if not math.isnan(values) else "nan"
    return values


@given(schemas_with_values(), st.data())
@settings(max_examples=300)
def test_fast_check_and_detailed_check_agree_on_mutated_rows(
    case: tuple[RowCodec, list[Any]], data: st.DataObject
) -> None:
    codec, values = case
    row = bytearray(codec.encode(values))
    for _ in range(data.draw(st.integers(0, 3))):
        action = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if action == "flip" and row:
            row[data.draw(st.integers(0, len(row) - 1))] = data.draw(st.integers(0, 255))
        elif action == "cut" and row:
            del row[data.draw(st.integers(0, len(row) - 1)) :]
        else:
            row += data.draw(st.binary(min_size=1, max_size=4))
    mutated = bytes(row)
    try:
        codec._explain_invalid(mutated)
        explained_valid = True
    except InvalidData:
        explained_valid = False
    assert codec.is_valid(mutated) == explained_valid
    for check in _row_checks(codec):
        assert check(mutated) == explained_valid
    if explained_valid:
        codec.validate(mutated)
        assert codec.encode(codec.decode(mutated)) == mutated


def _row_checks(codec: RowCodec) -> list[Callable[[bytes], bool]]:
    """Both implementations of the fast check (schema/fastcheck.py), whichever one the codec
    runs: the generated straight-line function and the table-driven one (compiled by
    `make compile`, else its interpreted source)."""
    args = (codec.fields, codec.offsets, codec.fixed_size)
    return [
        fastcheck.compile_row_check(*args, codec._variable_checks),
        fastcheck.row_checker(*args).is_valid,
    ]


def test_the_row_check_is_compiled_when_built() -> None:
    """The codec runs the table-driven check exactly when its compiled build is current."""
    method = getattr(SAMPLE.is_valid, "__self__", None)
    assert isinstance(method, fastcheck.RowChecker) == (fastcheck.state == "compiled")


@pytest.mark.parametrize(
    "row",
    [
        b"",
        b"\x00" * 3,
        "héllo".encode(),
        b"\xc3",  # cut in the middle of a character
        b"\xed\xa0\x80",  # a surrogate: not UTF-8
        b"\xf4\x90\x80\x80",  # above U+10FFFF
        b"\xc0\xaf",  # an overlong encoding
        b"ab\xff",
    ],
)
def test_both_row_checks_read_utf8_as_python_does(row: bytes) -> None:
    codec = RowCodec([Field(0, "s", F.STRING, max_length=8)])
    try:
        row.decode()
        expected = True
    except UnicodeDecodeError:
        expected = False
    framed = struct.pack("<I", len(row)) + row
    assert codec.is_valid(framed) == expected
    for check in _row_checks(codec):
        assert check(framed) == expected


def test_decode_named_gives_fields_by_name() -> None:
    assert SAMPLE.decode_named(ROW) == {
        "name": "héllo",
        "hp": 7,
        "tag": "ab",
        "pos": {"x": 1.5, "ok": True},
        "flags": [True, False],
        "path": [{"x": 2.0, "ok": True}],
        "big": 2**100,
    }


@given(schemas_with_values(), st.data())
@settings(max_examples=200)
def test_changed_fields_fast_path_agrees_with_field_by_field(
    case: tuple[RowCodec, list[Any]], data: st.DataObject
) -> None:
    codec, values = case
    other = list(values)
    for ordinal in data.draw(st.sets(st.integers(0, len(values) - 1))):
        other[ordinal] = data.draw(row_values(codec.fields))[ordinal]
    old, new = codec.encode(values), codec.encode(other)
    assert codec.changed_fields(old, new) == codec._changed_segments(old, new)
