"""Declaring kinds as Python classes."""

from __future__ import annotations

from typing import Annotated, ClassVar

import pytest

import convergedb.declare as cdb
from convergedb.schema.errors import InvalidData, InvalidSchema, ReservedName
from convergedb.schema.patch import parse_patch
from convergedb.schema.types import Field, FieldType


@cdb.struct
class Vec3:
    x: Annotated[float, cdb.F32(0)] = 0.0
    y: Annotated[float, cdb.F32(1)] = 0.0
    z: Annotated[float, cdb.F32(2)] = 0.0


@cdb.kind("player", event_stream=True)
class Player:
    # declaration order need not follow ordinals
    hp: Annotated[int, cdb.U16(1)] = 0
    name: Annotated[str, cdb.String(0, max_length=32)] = ""
    pos: Annotated[Vec3, cdb.Struct(2)] = Vec3()
    inventory: Annotated[list[int], cdb.Array(3, cdb.U32(), max_count=64)] = []
    path: Annotated[list[Vec3], cdb.Array(4, Vec3, max_count=8)] = []
    tag: Annotated[bytes, cdb.Bytes(5, max_length=4, fixed=True)] = b""
    alive: Annotated[bool, cdb.Bool(6)] = False
    score: Annotated[int, cdb.I64(7)] = 0
    uid: Annotated[int, cdb.U128(8)] = 0
    ratio: Annotated[float, cdb.F64(9)] = 0.0
    team_names: Annotated[
        list[str], cdb.Array(10, cdb.String(max_length=8, fixed=True), max_count=2)
    ] = []
    VERSION: ClassVar[int] = 3


MODEL = cdb.kind_model(Player)


def test_the_definition_follows_the_declaration() -> None:
    definition = MODEL.definition
    assert definition.name == "player"
    assert definition.event_stream and not definition.disk_backed
    assert [f.name for f in definition.fields][:3] == ["name", "hp", "pos"]
    assert definition.fields[0] == Field(0, "name", FieldType.STRING, max_length=32)
    assert definition.fields[2].struct_name == "Vec3"
    assert [s.name for s in definition.fields[2].subfields] == ["x", "y", "z"]
    assert definition.fields[3] == Field(3, "inventory", FieldType.U32, array=True, max_count=64)
    assert definition.fields[4].array and definition.fields[4].type is FieldType.STRUCT
    assert definition.fields[5] == Field(5, "tag", FieldType.BYTES, fixed=True, max_length=4)
    assert definition.fields[10] == Field(
        10, "team_names", FieldType.STRING, fixed=True, array=True, max_length=8, max_count=2
    )


def test_instances_round_trip_through_rows() -> None:
    player = Player(
        hp=90,
        name="ana",
        pos=Vec3(1, 2, 3),
        inventory=[7, 8],
        path=[Vec3(0, 1, 0)],
        tag=b"ab",
        alive=True,
        score=-5,
        uid=2**127,
        ratio=0.25,
        team_names=["red"],
    )
    row = MODEL.encode(player)
    MODEL.codec.validate(row)
    assert MODEL.decode(row) == player


def test_defaults_are_zero_and_mutable_defaults_are_not_shared() -> None:
    a, b = Player(), Player()
    a.inventory.append(1)
    a.pos.x = 5.0
    assert b.inventory == [] and b.pos == Vec3()
    assert MODEL.encode(Player()) == MODEL.codec.zero_row


def test_a_patch_carries_only_the_fields_set() -> None:
    mask, values = MODEL.patch({"hp": 5, "pos": Vec3(1, 1, 1)})
    assert mask == 0b110
    assert [o for o, _ in parse_patch(MODEL.codec, mask, values)] == [1, 2]
    with pytest.raises(AttributeError, match="Player has no field 'hpp'"):
        MODEL.patch({"hpp": 1})
    with pytest.raises(InvalidData, match="at least one field"):
        MODEL.patch({})


def test_values_that_do_not_fit_name_their_field() -> None:
    with pytest.raises(InvalidData, match=r"'hp' \(u16\): 70000 is out of range 0..65535"):
        MODEL.encode(Player(hp=70_000))
    with pytest.raises(InvalidData, match=r"'name' \(string\(32\)\): value is 33 bytes"):
        MODEL.encode(Player(name="x" * 33))
    with pytest.raises(InvalidData, match=r"'path\[0\].y' \(f32\): expected float"):
        MODEL.encode(Player(path=[Vec3(0, "no", 0)]))  # type: ignore[arg-type]


def test_values_of_a_newer_wider_schema_are_ignored() -> None:
    values = MODEL.to_values(Player(hp=3))
    assert MODEL.from_values([*values, 123, "extra"]) == Player(hp=3)


def test_declaration_errors_say_what_to_do() -> None:
    with pytest.raises(InvalidSchema, match="needs a wire type"):

        @cdb.kind("a")
        class NoSpec:
            hp: int = 0

    with pytest.raises(InvalidSchema, match="needs an ordinal"):

        @cdb.kind("b")
        class NoOrdinal:
            hp: Annotated[int, cdb.U16()] = 0

    with pytest.raises(InvalidSchema, match=r"exactly 0..1 with no gap"):

        @cdb.kind("c")
        class Gap:
            a: Annotated[int, cdb.U16(0)] = 0
            b: Annotated[int, cdb.U16(2)] = 0

    with pytest.raises(InvalidSchema, match="annotated <class 'str'>, which does not hold a U16"):

        @cdb.kind("d")
        class WrongType:
            a: Annotated[str, cdb.U16(0)] = ""

    with pytest.raises(InvalidSchema, match="max_length"):

        @cdb.kind("e")
        class NoLength:
            a: Annotated[str, cdb.String(0)] = ""

    with pytest.raises(ReservedName):

        @cdb.kind("convergedb_mine")
        class Reserved:
            a: Annotated[int, cdb.U8(0)] = 0

    with pytest.raises(TypeError, match=r"decorate it with @convergedb\.kind"):
        cdb.kind_model(Vec3)
