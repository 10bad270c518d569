"""Kind definitions: validation rules, wire encoding and decoding (docs/protocol.md)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convergedb.limits import MAX_FIELDS
from convergedb.schema import (
    Field,
    FieldType,
    InvalidSchema,
    KindDef,
    ReservedName,
    check_user_kind_name,
    decode_kind_definition,
    encode_kind_definition,
    validate_kind,
)
from strategies import kind_definitions, valid_fields

U8, U16, F32, STRING, BYTES, STRUCT = (
    FieldType.U8,
    FieldType.U16,
    FieldType.F32,
    FieldType.STRING,
    FieldType.BYTES,
    FieldType.STRUCT,
)


def scalar(ordinal: int, name: str, field_type: FieldType = U8) -> Field:
    return Field(ordinal, name, field_type)


def vec2(ordinal: int = 0, name: str = "pos", **options: Any) -> Field:
    subs = (scalar(0, "x", F32), scalar(1, "y", F32))
    return replace(Field(ordinal, name, STRUCT, struct_name="Vec2", subfields=subs), **options)


def kind_of(*fields: Field, name: str = "player") -> KindDef:
    return KindDef(name, fields)


def with_sub(sub: Field) -> KindDef:
    """A kind whose field 1 'pos' is a struct with `sub` as its sub-field 1."""
    return kind_of(scalar(0, "hp"), vec2(1, subfields=(scalar(0, "x", F32), sub)))


# --- a hand-written vector ---------------------------------------------------------------------

SHIP = KindDef(
    "ship",
    (
        Field(0, "hp", U16),
        Field(1, "name", STRING, max_length=16),
        Field(
            2, "pos", STRUCT, struct_name="Vec2", subfields=(Field(0, "x", F32), Field(1, "y", F32))
        ),
        Field(3, "tags", BYTES, fixed=True, array=True, max_length=8, max_count=4),
    ),
    event_stream=True,
)

SHIP_BYTES = bytes.fromhex(
    "0400 73686970"  # name str16 "ship"
    "01"  # flags: event_stream
    "04"  # field_count 4
    "00 0200 6870 02 00 0000 0000"  # 0 "hp" u16
    "01 0400 6e616d65 0d 00 1000 0000"  # 1 "name" string, max_length 16
    "02 0300 706f73 0f 00 0000 0000"  # 2 "pos" struct
    "0400 56656332 02"  # struct_name "Vec2", sub_count 2
    "00 0100 78 0a 00 0000 0000"  # sub 0 "x" f32
    "01 0100 79 0a 00 0000 0000"  # sub 1 "y" f32
    "03 0400 74616773 0e 03 0800 0400"  # 3 "tags" bytes, fixed|array, max_length 8, max_count 4
)


def test_encode_matches_the_hand_written_vector() -> None:
    assert encode_kind_definition(SHIP) == SHIP_BYTES


def test_decode_of_the_hand_written_vector() -> None:
    assert decode_kind_definition(SHIP_BYTES) == (SHIP, len(SHIP_BYTES))


def test_decode_starts_at_offset_and_stops_at_the_end_of_the_definition() -> None:
    buf = b"\xaa\xbb\xcc" + SHIP_BYTES + b"trailing"
    assert decode_kind_definition(buf, 3) == (SHIP, 3 + len(SHIP_BYTES))
    assert decode_kind_definition(memoryview(buf), 3) == (SHIP, 3 + len(SHIP_BYTES))


def test_decode_rejects_a_negative_offset() -> None:
    with pytest.raises(ValueError):
        decode_kind_definition(SHIP_BYTES, -1)


# --- round trips -------------------------------------------------------------------------------


@given(kind_definitions())
def test_round_trip(kind: KindDef) -> None:
    encoded = encode_kind_definition(kind)
    assert decode_kind_definition(encoded) == (kind, len(encoded))


@given(kind_definitions(), st.binary(max_size=8), st.binary(max_size=8))
def test_round_trip_inside_a_larger_buffer(kind: KindDef, before: bytes, after: bytes) -> None:
    encoded = encode_kind_definition(kind)
    decoded = decode_kind_definition(before + encoded + after, len(before))
    assert decoded == (kind, len(before) + len(encoded))


@given(valid_fields(MAX_FIELDS, MAX_FIELDS, max_subfields=2))
@settings(max_examples=10)
def test_round_trip_with_the_most_fields(fields: tuple[Field, ...]) -> None:
    kind = KindDef("big", fields)
    assert decode_kind_definition(encode_kind_definition(kind))[0] == kind


def test_round_trip_of_the_largest_names_and_options() -> None:
    name = "é" * 127 + "a"  # 255 bytes
    subs = tuple(Field(i, f"s{i}", BYTES, fixed=True, max_length=65_535) for i in range(64))
    kind = KindDef(
        name,
        (
            Field(0, name, STRUCT, array=True, max_count=1024, struct_name=name, subfields=subs),
            Field(1, "text", STRING, max_length=65_535),
        ),
        event_stream=True,
        disk_backed=True,
    )
    assert decode_kind_definition(encode_kind_definition(kind))[0] == kind


# --- decoding malformed bytes ------------------------------------------------------------------


@given(kind_definitions(max_fields=4), st.data())
def test_every_truncation_is_invalid_schema(kind: KindDef, data: st.DataObject) -> None:
    encoded = encode_kind_definition(kind)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(InvalidSchema, match="truncated"):
        decode_kind_definition(encoded[:cut])


def test_each_truncation_of_the_vector_is_invalid_schema() -> None:
    for cut in range(len(SHIP_BYTES)):
        with pytest.raises(InvalidSchema, match="truncated"):
            decode_kind_definition(SHIP_BYTES[:cut])


@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_invalid_schema(buf: bytes) -> None:
    try:
        kind, end = decode_kind_definition(buf)
    except InvalidSchema:
        return
    assert encode_kind_definition(kind) == buf[:end]


@given(kind_definitions(max_fields=4), st.data())
def test_a_corrupted_byte_decodes_canonically_or_is_invalid(
    kind: KindDef, data: st.DataObject
) -> None:
    encoded = bytearray(encode_kind_definition(kind))
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] = data.draw(st.integers(0, 255))
    try:
        decoded, end = decode_kind_definition(bytes(encoded))
    except InvalidSchema:
        return
    assert encode_kind_definition(decoded) == bytes(encoded[:end])


def patched(offset: int, value: bytes) -> bytes:
    """SHIP_BYTES with `value` written at `offset`."""
    return SHIP_BYTES[:offset] + value + SHIP_BYTES[offset + len(value) :]


# Offsets in SHIP_BYTES.
KIND_FLAGS, FIELD_COUNT = 6, 7
HP_NAME = SHIP_BYTES.index(b"hp")
HP_ORDINAL, HP_TYPE, HP_FLAGS, HP_MAX_LENGTH = HP_NAME - 3, HP_NAME + 2, HP_NAME + 3, HP_NAME + 4
NAME_TYPE = SHIP_BYTES.index(b"name") + 4
POS_TYPE = SHIP_BYTES.index(b"pos") + 3
STRUCT_NAME = SHIP_BYTES.index(b"Vec2")
SUB_COUNT = STRUCT_NAME + 4
X_TYPE = SUB_COUNT + 1 + 1 + 2 + 1


def test_the_offsets_used_below_point_where_they_claim() -> None:
    assert SHIP_BYTES[HP_ORDINAL] == 0
    assert SHIP_BYTES[HP_TYPE] == U16
    assert SHIP_BYTES[HP_MAX_LENGTH : HP_MAX_LENGTH + 4] == bytes(4)
    assert SHIP_BYTES[NAME_TYPE] == STRING
    assert SHIP_BYTES[POS_TYPE] == STRUCT
    assert SHIP_BYTES[STRUCT_NAME : STRUCT_NAME + 4] == b"Vec2"
    assert SHIP_BYTES[SUB_COUNT] == 2
    assert SHIP_BYTES[X_TYPE] == F32


@pytest.mark.parametrize(
    ("buf", "message"),
    [
        (patched(2, b"\xff"), "the kind name is not valid UTF-8"),
        (patched(HP_NAME, b"\xc3\x28"), "kind 'ship': field 0: name is not valid UTF-8"),
        (patched(STRUCT_NAME, b"\xed\xa0\x80"), "field 2 'pos': struct name is not valid UTF-8"),
        (patched(KIND_FLAGS, b"\x04"), "kind 'ship': kind flags 0x04 set undefined bits 0x04"),
        (patched(KIND_FLAGS, b"\x83"), "undefined bits 0x80"),
        (patched(HP_FLAGS, b"\x04"), "field 0 'hp': field flags 0x04 set undefined bits"),
        (patched(HP_TYPE, b"\x00"), "field 0 'hp': unknown type code 0"),
        (patched(HP_TYPE, b"\x10"), "field 0 'hp': unknown type code 16"),
        (patched(HP_TYPE, b"\xff"), "unknown type code 255"),
        (patched(X_TYPE, b"\x63"), "field 2 'pos' sub-field 0 'x': unknown type code 99"),
        (patched(X_TYPE, b"\x0f"), "field 2 'pos' sub-field 0 'x': a struct sub-field cannot"),
        (patched(FIELD_COUNT, b"\x00"), "kind 'ship': field_count is 0; a kind must have 1..64"),
        (patched(FIELD_COUNT, b"\x41"), "field_count is 65"),
        (patched(SUB_COUNT, b"\x00"), "field 2 'pos': sub_count is 0; a struct must have 1..64"),
        (patched(SUB_COUNT, b"\x41"), "sub_count is 65"),
        (patched(HP_FLAGS, b"\x01"), "field 0 'hp': the fixed flag is only for string/bytes"),
        (patched(HP_MAX_LENGTH, b"\x05\x00"), "field 0 'hp': max_length is 5"),
        (patched(HP_ORDINAL, b"\x05"), "field 0 'hp': has ordinal 5"),
        (patched(0, b"\x00\x00"), None),  # empty kind name, so the rest is misread
    ],
)
def test_decode_rejects(buf: bytes, message: str | None) -> None:
    with pytest.raises(InvalidSchema) as caught:
        decode_kind_definition(buf)
    if message is not None:
        assert message in str(caught.value)


def test_decode_validates_names() -> None:
    empty_name = b"\x00\x00" + b"\x00\x01" + SHIP_BYTES[8:]  # kind name "", flags 0, 1 field
    with pytest.raises(InvalidSchema, match="kind '': the kind name is 0 bytes"):
        decode_kind_definition(empty_name)


def test_decode_rejects_duplicate_names() -> None:
    two_hp = bytes.fromhex("0100 6b 00 02" + "00 0200 6870 02 00 0000 0000" * 2)
    buf = two_hp[:16] + b"\x01" + two_hp[17:]  # second ordinal 1
    with pytest.raises(InvalidSchema, match="field 1 'hp': the name is already used by field 0"):
        decode_kind_definition(buf)


# --- validation --------------------------------------------------------------------------------


def test_the_message_names_the_kind_and_the_field_path() -> None:
    kind = kind_of(
        scalar(0, "a"),
        scalar(1, "b"),
        scalar(2, "c"),
        vec2(3, subfields=(scalar(0, "x", F32), Field(1, "y", F32, array=True, max_count=2))),
    )
    with pytest.raises(InvalidSchema) as caught:
        validate_kind(kind)
    assert str(caught.value) == (
        "kind 'player': field 3 'pos' sub-field 1 'y': a struct sub-field cannot be an array "
        "(use an array of structs instead)"
    )


VALID = [
    pytest.param(kind_of(scalar(0, "a"), name="k" * 255), id="kind name of 255 bytes"),
    pytest.param(kind_of(scalar(0, "a"), name="é" * 127 + "a"), id="255 bytes of 2-byte chars"),
    pytest.param(kind_of(*(scalar(i, f"f{i}") for i in range(64))), id="64 fields"),
    pytest.param(kind_of(scalar(0, "a" * 255)), id="field name of 255 bytes"),
    pytest.param(kind_of(Field(0, "s", STRING, max_length=1)), id="max_length 1"),
    pytest.param(kind_of(Field(0, "s", BYTES, fixed=True, max_length=65_535)), id="65535"),
    pytest.param(kind_of(Field(0, "a", U8, array=True, max_count=1)), id="max_count 1"),
    pytest.param(kind_of(Field(0, "a", U8, array=True, max_count=1024)), id="max_count 1024"),
    pytest.param(
        kind_of(Field(0, "a", STRING, fixed=True, array=True, max_length=4, max_count=3)),
        id="array of fixed string",
    ),
    pytest.param(kind_of(vec2(0, array=True, max_count=8)), id="array of structs"),
    pytest.param(
        kind_of(vec2(0, subfields=tuple(scalar(i, f"s{i}") for i in range(64)))),
        id="struct of 64 sub-fields",
    ),
    pytest.param(
        kind_of(vec2(0, subfields=(Field(0, "t", STRING, fixed=True, max_length=3),))),
        id="struct with a fixed string",
    ),
    pytest.param(kind_of(vec2(0, name="x")), id="a sub-field may share a top-level name"),
    pytest.param(kind_of(vec2(0, struct_name="x" * 255)), id="struct name of 255 bytes"),
]


@pytest.mark.parametrize("kind", VALID)
def test_valid(kind: KindDef) -> None:
    validate_kind(kind)
    assert decode_kind_definition(encode_kind_definition(kind))[0] == kind


INVALID = [
    # kind-level rules
    (kind_of(scalar(0, "a"), name=""), "kind '': the kind name is 0 bytes of UTF-8"),
    (kind_of(scalar(0, "a"), name="k" * 256), "the kind name is 256 bytes of UTF-8"),
    (kind_of(scalar(0, "a"), name="é" * 128), "the kind name is 256 bytes"),
    (kind_of(scalar(0, "a"), name="a\ud800"), "the kind name is not valid UTF-8"),
    (kind_of(), "kind 'player': has 0 fields; a kind must have 1..64 fields"),
    (kind_of(*(scalar(i, f"f{i}") for i in range(65))), "has 65 fields; a kind must have 1..64"),
    # ordinals and names of a level
    (kind_of(scalar(0, "a"), scalar(2, "b")), "field 1 'b': has ordinal 2; ordinals must be"),
    (kind_of(scalar(1, "a"), scalar(0, "b")), "field 0 'a': has ordinal 1"),
    (kind_of(scalar(0, "a"), scalar(1, "a")), "field 1 'a': the name is already used by field 0"),
    (kind_of(scalar(0, "")), "field 0 '': the field name is 0 bytes of UTF-8"),
    (kind_of(scalar(0, "n" * 256)), "field 0 'nnnn"),
    (kind_of(scalar(0, "n" * 256)), "the field name is 256 bytes"),
    (kind_of(scalar(0, "\udc80")), "field 0 '\\udc80': the field name is not valid UTF-8"),
    # types and options
    (kind_of(Field(0, "t", cast(FieldType, 99))), "field 0 't': unknown type 99"),
    (kind_of(Field(0, "hp", U16, fixed=True)), "field 0 'hp': the fixed flag is only for"),
    (kind_of(vec2(0, fixed=True)), "field 0 'pos': the fixed flag is only for string/bytes"),
    (kind_of(Field(0, "s", STRING)), "field 0 's': max_length is 0; a string needs max_length"),
    (kind_of(Field(0, "s", BYTES, max_length=65_536)), "max_length is 65536; a bytes needs"),
    (kind_of(Field(0, "s", STRING, fixed=True, max_length=-1)), "max_length is -1"),
    (kind_of(Field(0, "hp", U8, max_length=4)), "field 0 'hp': max_length is 4; it is only for"),
    (kind_of(vec2(0, max_length=4)), "field 0 'pos': max_length is 4"),
    (kind_of(Field(0, "a", U8, array=True)), "field 0 'a': max_count is 0; an array needs"),
    (kind_of(Field(0, "a", U8, array=True, max_count=1025)), "max_count is 1025; an array needs"),
    (kind_of(Field(0, "a", U8, max_count=3)), "field 0 'a': max_count is 3; it is only for arrays"),
    (
        kind_of(Field(0, "a", STRING, array=True, max_length=4, max_count=3)),
        "field 0 'a': array elements must be fixed-size; make the string fixed",
    ),
    # struct rules
    (kind_of(vec2(0, subfields=())), "field 0 'pos': has 0 sub-fields; a struct must have 1..64"),
    (
        kind_of(vec2(0, subfields=tuple(scalar(i, f"s{i}") for i in range(65)))),
        "has 65 sub-fields",
    ),
    (kind_of(vec2(0, struct_name="")), "field 0 'pos': the struct name is 0 bytes of UTF-8"),
    (kind_of(vec2(0, struct_name="v" * 256)), "the struct name is 256 bytes"),
    (kind_of(Field(0, "a", U8, struct_name="Vec2")), "field 0 'a': has struct name 'Vec2'"),
    (kind_of(Field(0, "a", U8, subfields=(scalar(0, "x"),))), "field 0 'a': has 1 sub-fields"),
    (
        kind_of(Field(0, "s", STRING, max_length=3, subfields=(scalar(0, "x"),))),
        "only a struct has sub-fields",
    ),
    (
        with_sub(vec2(1, "y")),
        "field 1 'pos' sub-field 1 'y': a struct sub-field cannot be a struct",
    ),
    (
        with_sub(Field(1, "y", F32, array=True, max_count=2)),
        "field 1 'pos' sub-field 1 'y': a struct sub-field cannot be an array",
    ),
    (
        with_sub(Field(1, "y", STRING, max_length=8)),
        "sub-field 1 'y': a struct sub-field cannot be variable-length; make the string fixed",
    ),
    (with_sub(scalar(2, "y")), "field 1 'pos' sub-field 1 'y': has ordinal 2"),
    (with_sub(scalar(1, "x")), "sub-field 1 'x': the name is already used by sub-field 0"),
    (with_sub(scalar(1, "")), "sub-field 1 '': the sub-field name is 0 bytes"),
    (with_sub(Field(1, "y", F32, fixed=True)), "sub-field 1 'y': the fixed flag is only for"),
    (with_sub(Field(1, "y", F32, max_length=2)), "sub-field 1 'y': max_length is 2"),
    (with_sub(Field(1, "y", F32, max_count=2)), "sub-field 1 'y': max_count is 2"),
    (with_sub(Field(1, "y", BYTES, fixed=True)), "sub-field 1 'y': max_length is 0"),
    (
        with_sub(Field(1, "y", cast(FieldType, 0))),
        "kind 'player': field 1 'pos' sub-field 1 'y': unknown type 0",
    ),
]


@pytest.mark.parametrize(("kind", "message"), INVALID)
def test_invalid(kind: KindDef, message: str) -> None:
    with pytest.raises(InvalidSchema) as caught:
        validate_kind(kind)
    assert message in str(caught.value)


@pytest.mark.parametrize(("kind", "message"), INVALID)
def test_encode_refuses_an_invalid_definition(kind: KindDef, message: str) -> None:
    with pytest.raises(InvalidSchema, match="kind '"):
        encode_kind_definition(kind)


def test_a_long_name_is_cut_in_the_message() -> None:
    with pytest.raises(InvalidSchema) as caught:
        validate_kind(kind_of(scalar(0, "a"), name="k" * 10_000))
    assert len(str(caught.value)) < 200


@given(valid_fields(min_size=2, max_size=8))
def test_swapping_two_fields_breaks_the_ordinals(fields: tuple[Field, ...]) -> None:
    swapped = (fields[1], fields[0], *fields[2:])
    with pytest.raises(InvalidSchema, match=r"field 0 .*: has ordinal 1"):
        validate_kind(KindDef("k", swapped))


# --- reserved names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["convergedb_sources", "convergedb_", "convergedb_x"])
def test_reserved_prefix(name: str) -> None:
    with pytest.raises(ReservedName, match="reserved for the server's system kinds; pick another"):
        check_user_kind_name(name)


@pytest.mark.parametrize("name", ["player", "convergedb", "my_convergedb_kind", "convergedbx"])
def test_user_names(name: str) -> None:
    check_user_kind_name(name)


def test_system_kinds_still_validate() -> None:
    validate_kind(kind_of(scalar(0, "id"), name="convergedb_sources"))
