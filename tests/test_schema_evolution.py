"""Schema evolution: identical and appended registrations, conflicts, the prefix check."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convergedb.schema import (
    Evolution,
    Field,
    FieldType,
    InvalidSchema,
    KindDef,
    SchemaConflict,
    check_prefix,
    compare_kinds,
    merge_names,
)
from strategies import kind_definitions, names, valid_field

U16, U32, F32, F64, STRING, STRUCT = (
    FieldType.U16,
    FieldType.U32,
    FieldType.F32,
    FieldType.F64,
    FieldType.STRING,
    FieldType.STRUCT,
)

POS = Field(
    3,
    "pos",
    STRUCT,
    struct_name="Vec2",
    subfields=(Field(0, "x", F32), Field(1, "y", F32)),
)
PLAYER = KindDef(
    "player",
    (
        Field(0, "id", U32),
        Field(1, "hp", U16),
        Field(2, "name", STRING, max_length=16),
        POS,
        Field(4, "scores", U16, array=True, max_count=8),
    ),
)


def changed(index: int, **options: Any) -> KindDef:
    """PLAYER with field `index` changed."""
    fields = list(PLAYER.fields)
    fields[index] = replace(fields[index], **options)
    return replace(PLAYER, fields=tuple(fields))


def changed_sub(index: int, **options: Any) -> KindDef:
    """PLAYER with sub-field `index` of 'pos' changed."""
    subs = list(POS.subfields)
    subs[index] = replace(subs[index], **options)
    return changed(3, subfields=tuple(subs))


def appended(*fields: Field) -> KindDef:
    return replace(PLAYER, fields=PLAYER.fields + fields)


# --- Evolution ---------------------------------------------------------------------------------


def test_evolution_values() -> None:
    assert Evolution.identical() == Evolution(0)
    assert Evolution.identical().is_identical
    assert not Evolution.identical().is_appended
    assert Evolution.appended(2).is_appended
    assert Evolution.appended(2).added_fields == 2
    assert str(Evolution.identical()) == "IDENTICAL"
    assert str(Evolution.appended(3)) == "APPENDED(3)"
    with pytest.raises(ValueError):
        Evolution.appended(0)
    with pytest.raises(ValueError):
        Evolution(-1)


# --- identical and appended --------------------------------------------------------------------


def test_the_same_definition_is_identical() -> None:
    assert compare_kinds(PLAYER, PLAYER) == Evolution.identical()


def test_renamed_fields_are_identical_and_the_new_names_are_kept() -> None:
    renamed = changed(1, name="health")
    renamed = replace(
        renamed,
        fields=(
            *renamed.fields[:3],
            replace(
                POS,
                name="position",
                struct_name="Point",
                subfields=(
                    Field(0, "px", F32),
                    Field(1, "py", F32),
                ),
            ),
            renamed.fields[4],
        ),
    )
    assert compare_kinds(PLAYER, renamed) == Evolution.identical()
    assert merge_names(PLAYER, renamed) == renamed


def test_appending_fields() -> None:
    one = appended(Field(5, "level", U16))
    three = appended(
        Field(5, "level", U16),
        Field(6, "bio", STRING, max_length=200),
        replace(POS, ordinal=7, name="aim"),
    )
    assert compare_kinds(PLAYER, one) == Evolution.appended(1)
    assert compare_kinds(PLAYER, three) == Evolution.appended(3)
    assert merge_names(PLAYER, three) == three


def test_appending_with_renames() -> None:
    proposed = replace(
        PLAYER,
        fields=(*changed(1, name="health").fields, Field(5, "hp", U16)),
    )
    assert compare_kinds(PLAYER, proposed) == Evolution.appended(1)


@given(kind_definitions(), st.data())
def test_every_prefix_evolves_to_the_whole(kind: KindDef, data: st.DataObject) -> None:
    count = data.draw(st.integers(1, len(kind.fields)))
    assert compare_kinds(kind.prefix(count), kind) == Evolution(len(kind.fields) - count)
    check_prefix(kind, kind.prefix(count))


@given(kind_definitions(max_fields=8), st.data())
def test_renaming_everything_is_identical(kind: KindDef, data: st.DataObject) -> None:
    new_names = data.draw(
        st.lists(names(), min_size=len(kind.fields), max_size=len(kind.fields), unique=True)
    )
    renamed = replace(
        kind,
        fields=tuple(
            replace(field, name=name) for field, name in zip(kind.fields, new_names, strict=True)
        ),
    )
    assert compare_kinds(kind, renamed) == Evolution.identical()
    assert merge_names(kind, renamed) == renamed


@given(kind_definitions(max_fields=8), st.data())
def test_a_changed_random_field_conflicts(kind: KindDef, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(kind.fields) - 1))
    old = kind.fields[index]
    new = data.draw(valid_field(index, old.name).filter(lambda f: f.identity() != old.identity()))
    proposed = replace(kind, fields=(*kind.fields[:index], new, *kind.fields[index + 1 :]))
    with pytest.raises(SchemaConflict, match=f"field {index} "):
        compare_kinds(kind, proposed)
    with pytest.raises(SchemaConflict, match=f"field {index} "):
        check_prefix(kind, proposed)


# --- conflicts ---------------------------------------------------------------------------------


def test_a_removed_field() -> None:
    with pytest.raises(SchemaConflict) as caught:
        compare_kinds(PLAYER, PLAYER.prefix(4))
    assert str(caught.value).startswith(
        "kind 'player' has 5 fields; this registration has 4: fields cannot be removed"
    )


@given(kind_definitions(min_fields=2), st.data())
def test_any_removal_conflicts(kind: KindDef, data: st.DataObject) -> None:
    count = data.draw(st.integers(1, len(kind.fields) - 1))
    with pytest.raises(SchemaConflict, match="fields cannot be removed"):
        compare_kinds(kind, kind.prefix(count))


CHANGES = [
    pytest.param(
        changed(1, type=U32),
        "field 1 'hp' is u16 in the registered definition but u32 in this registration",
        id="type",
    ),
    pytest.param(
        changed(2, max_length=32),
        "field 2 'name' is string(16) in the registered "
        "definition but string(32) in this registration",
        id="max_length",
    ),
    pytest.param(
        changed(2, fixed=True),
        "field 2 'name' is string(16) in the registered definition but string(16, fixed)",
        id="fixed",
    ),
    pytest.param(
        changed(4, max_count=9),
        "field 4 'scores' is array<u16>[8] in the registered definition but array<u16>[9]",
        id="max_count",
    ),
    pytest.param(
        changed(4, array=False, max_count=0),
        "field 4 'scores' is array<u16>[8] in the registered definition but u16",
        id="array flag",
    ),
    pytest.param(
        changed(3, array=True, max_count=2),
        "field 3 'pos' is struct Vec2 in the registered definition but array<struct Vec2>[2]",
        id="struct to array",
    ),
    pytest.param(
        changed_sub(1, type=F64),
        "field 3 'pos' sub-field 1 'y' is f32 in the "
        "registered definition but f64 in this registration",
        id="sub-field type",
    ),
    pytest.param(
        changed(3, subfields=(*POS.subfields, Field(2, "z", F32))),
        "field 3 'pos' is a struct of 2 sub-fields in the registered definition but of 3 in "
        "this registration",
        id="sub-field appended",
    ),
    pytest.param(
        changed(1, name="health", type=U32),
        "field 1 'hp' (named 'health' in this registration) is u16",
        id="renamed and changed",
    ),
    pytest.param(
        changed(3, struct_name="Vec3", subfields=(Field(0, "x", F32), Field(1, "y", F64))),
        "field 3 'pos' sub-field 1 'y' is f32",
        id="renamed struct with a changed sub-field",
    ),
    pytest.param(
        replace(
            PLAYER,
            fields=(
                PLAYER.fields[0],
                replace(PLAYER.fields[2], ordinal=1),
                replace(PLAYER.fields[1], ordinal=2),
                *PLAYER.fields[3:],
            ),
        ),
        "field 1 'hp' (named 'name' in this registration) is u16 in the registered definition "
        "but string(16) in this registration",
        id="reordered",
    ),
]


@pytest.mark.parametrize(("proposed", "message"), CHANGES)
def test_a_changed_field(proposed: KindDef, message: str) -> None:
    with pytest.raises(SchemaConflict) as caught:
        compare_kinds(PLAYER, proposed)
    assert str(caught.value).startswith(f"kind 'player': {message}")
    assert "cannot change" in str(caught.value)


@pytest.mark.parametrize(("proposed", "message"), CHANGES)
def test_a_changed_field_with_appended_ones(proposed: KindDef, message: str) -> None:
    longer = replace(proposed, fields=(*proposed.fields, Field(5, "level", U16)))
    with pytest.raises(SchemaConflict) as caught:
        compare_kinds(PLAYER, longer)
    assert str(caught.value).startswith(f"kind 'player': {message}")


@pytest.mark.parametrize(
    "flags",
    [{"event_stream": True}, {"disk_backed": True}, {"event_stream": True, "disk_backed": True}],
)
def test_changed_flags(flags: dict[str, Any]) -> None:
    with pytest.raises(SchemaConflict) as caught:
        compare_kinds(PLAYER, replace(PLAYER, **flags))
    message = str(caught.value)
    assert message.startswith(
        "kind 'player': event_stream/disk_backed cannot change after the first registration"
    )
    assert "registered with event_stream=False, disk_backed=False" in message
    with pytest.raises(SchemaConflict, match="event_stream/disk_backed cannot change"):
        compare_kinds(replace(PLAYER, **flags), PLAYER)


def test_an_invalid_registration_is_invalid_schema() -> None:
    with pytest.raises(InvalidSchema, match="field 5 'x': has ordinal 9"):
        compare_kinds(PLAYER, appended(Field(9, "x", U16)))


def test_definitions_of_different_kinds_are_a_bug() -> None:
    with pytest.raises(ValueError, match="different kinds"):
        compare_kinds(PLAYER, replace(PLAYER, name="monster"))
    with pytest.raises(ValueError, match="different kinds"):
        check_prefix(PLAYER, replace(PLAYER, name="monster"))


# --- the prefix check (GET_KIND with a definition) ---------------------------------------------


def test_prefixes_pass() -> None:
    for count in range(1, len(PLAYER.fields) + 1):
        check_prefix(PLAYER, PLAYER.prefix(count))


def test_a_renamed_prefix_passes() -> None:
    check_prefix(PLAYER, changed(1, name="health").prefix(3))


def test_a_client_with_more_fields_conflicts() -> None:
    with pytest.raises(SchemaConflict) as caught:
        check_prefix(PLAYER, appended(Field(5, "level", U16)))
    assert str(caught.value).startswith(
        "kind 'player': this client's definition has 6 fields but the server's has only 5"
    )


def test_a_client_with_a_changed_field_conflicts() -> None:
    with pytest.raises(SchemaConflict) as caught:
        check_prefix(PLAYER, changed(1, type=U32).prefix(2))
    assert str(caught.value) == (
        "kind 'player': field 1 'hp' is u16 in the server's definition but u32 in this client's "
        "definition: the client's definition must be a prefix of the server's"
    )


def test_a_client_with_other_flags_conflicts() -> None:
    with pytest.raises(SchemaConflict, match="the flags must match"):
        check_prefix(PLAYER, replace(PLAYER.prefix(2), disk_backed=True))


def test_an_invalid_client_definition_is_invalid_schema() -> None:
    with pytest.raises(InvalidSchema):
        check_prefix(PLAYER, replace(PLAYER, fields=()))
