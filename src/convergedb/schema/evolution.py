"""Schema evolution: what a registration does to a stored kind definition (SPEC §2).

A field's identity is everything but its names (`Field.identity`). A registration may repeat every
registered identity (IDENTICAL: a no-op, except that the new names are kept) and append new trailing
ordinals (APPENDED: the schema version goes up by one). Removing, changing or reordering a
registered field, or changing the kind's flags, is a `SchemaConflict`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .definition import validate_kind
from .errors import SchemaConflict
from .types import Field, FieldType, KindDef

_REGISTERED = ("the registered definition", "this registration")
_SERVER = ("the server's definition", "this client's definition")


@dataclass(frozen=True, slots=True)
class Evolution:
    """The outcome of a valid registration: IDENTICAL (`added_fields == 0`) or APPENDED."""

    added_fields: int

    def __post_init__(self) -> None:
        if self.added_fields < 0:
            raise ValueError(f"added_fields must not be negative, got {self.added_fields}")

    @classmethod
    def identical(cls) -> Evolution:
        """Every registered field again and nothing more: a no-op (names may differ)."""
        return cls(0)

    @classmethod
    def appended(cls, added_fields: int) -> Evolution:
        """Every registered field again plus `added_fields` (>= 1) new trailing fields."""
        if added_fields < 1:
            raise ValueError(f"an append adds at least one field, got {added_fields}")
        return cls(added_fields)

    @property
    def is_identical(self) -> bool:
        return self.added_fields == 0

    @property
    def is_appended(self) -> bool:
        """Whether the registration adds fields (and so bumps the schema version)."""
        return self.added_fields > 0

    def __str__(self) -> str:
        return "IDENTICAL" if self.is_identical else f"APPENDED({self.added_fields})"


def compare_kinds(current: KindDef, proposed: KindDef) -> Evolution:
    """Compare a registration (`proposed`) with the stored definition of the same kind.

    Returns IDENTICAL or APPENDED(n). Raises `InvalidSchema` if `proposed` is invalid and
    `SchemaConflict`, saying what changed, if it changes the flags or removes or changes a field.
    `ValueError` if the two definitions are not of the same kind name (a caller's bug).
    """
    _require_same_name(current, proposed)
    validate_kind(proposed)
    where = f"kind {current.name!r}"
    if current.flags != proposed.flags:
        raise SchemaConflict(
            f"{where}: event_stream/disk_backed cannot change after the first registration "
            f"(registered with {_describe_flags(current)}; this registration has "
            f"{_describe_flags(proposed)})"
        )
    registered, offered = len(current.fields), len(proposed.fields)
    if offered < registered:
        raise SchemaConflict(
            f"{where} has {registered} fields; this registration has {offered}: fields cannot be "
            f"removed (list all {registered} registered fields, then any new ones after them)"
        )
    difference = _first_difference(current.fields, proposed.fields[:registered], _REGISTERED)
    if difference is not None:
        raise SchemaConflict(
            f"{where}: {difference}: a registered field's type and options cannot change "
            f"(ordinals are permanent; add a new field at ordinal {offered} instead)"
        )
    return Evolution(offered - registered)


def check_prefix(server: KindDef, client: KindDef) -> None:
    """Check that a client's definition is a prefix of the server's (GET_KIND with a definition).

    The client may know fewer fields than the server (an older schema) but not more, and the
    fields it knows and the kind's flags must be the same; otherwise `SchemaConflict`. Raises
    `InvalidSchema` if `client` is invalid and `ValueError` if the kind names differ.
    """
    _require_same_name(server, client)
    validate_kind(client)
    where = f"kind {server.name!r}"
    if server.flags != client.flags:
        raise SchemaConflict(
            f"{where}: this client's definition has {_describe_flags(client)} but the server's "
            f"has {_describe_flags(server)}; the flags must match"
        )
    known, offered = len(server.fields), len(client.fields)
    if offered > known:
        raise SchemaConflict(
            f"{where}: this client's definition has {offered} fields but the server's has only "
            f"{known}: the client's schema is newer than the server's (register it first)"
        )
    difference = _first_difference(server.fields[:offered], client.fields, _SERVER)
    if difference is not None:
        raise SchemaConflict(
            f"{where}: {difference}: the client's definition must be a prefix of the server's"
        )


def merge_names(current: KindDef, proposed: KindDef) -> KindDef:
    """The definition to store after registering `proposed`: all its fields, with its names.

    Raises as `compare_kinds` does if the registration is not IDENTICAL or APPENDED.
    """
    compare_kinds(current, proposed)
    return KindDef(current.name, proposed.fields, current.event_stream, current.disk_backed)


def _require_same_name(first: KindDef, second: KindDef) -> None:
    if first.name != second.name:
        raise ValueError(
            f"comparing definitions of different kinds: {first.name!r} and {second.name!r}"
        )


def _describe_flags(kind: KindDef) -> str:
    return f"event_stream={kind.event_stream}, disk_backed={kind.disk_backed}"


def _first_difference(
    old_fields: tuple[Field, ...], new_fields: tuple[Field, ...], sides: tuple[str, str]
) -> str | None:
    """Describe the first field whose identity differs, or None; both have the same length."""
    for old, new in zip(old_fields, new_fields, strict=True):
        difference = _field_difference(old, new, f"field {old.ordinal}", sides)
        if difference is not None:
            return difference
    return None


def _field_difference(old: Field, new: Field, path: str, sides: tuple[str, str]) -> str | None:
    """Describe how `new` differs from `old` in identity, or None if it does not."""
    if old.identity() == new.identity():
        return None
    label = f"{path} {old.name!r}"
    if new.name != old.name:
        label += f" (named {new.name!r} in {sides[1]})"
    if _same_struct_shape(old, new):
        return _struct_difference(old, new, label, sides)
    return f"{label} is {old.describe_type()} in {sides[0]} but {new.describe_type()} in {sides[1]}"


def _same_struct_shape(old: Field, new: Field) -> bool:
    """Both structs, both arrays or not, same max_count: the difference is in the sub-fields."""
    return (
        old.type is FieldType.STRUCT
        and new.type is FieldType.STRUCT
        and old.array == new.array
        and old.max_count == new.max_count
    )


def _struct_difference(old: Field, new: Field, label: str, sides: tuple[str, str]) -> str:
    if len(old.subfields) != len(new.subfields):
        return (
            f"{label} is a struct of {len(old.subfields)} sub-fields in {sides[0]} "
            f"but of {len(new.subfields)} in {sides[1]}"
        )
    for old_sub, new_sub in zip(old.subfields, new.subfields, strict=True):
        difference = _field_difference(
            old_sub, new_sub, f"{label} sub-field {old_sub.ordinal}", sides
        )
        if difference is not None:
            return difference
    raise AssertionError("identities differ but no sub-field differs")  # pragma: no cover
