"""The schema model: field types, fields, struct and kind definitions.

These are plain immutable values. Validation of a definition lives in `definition.py`, the row
layout and codec in `rows.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Final


class FieldType(IntEnum):
    """Wire codes of the field types (docs/protocol.md, "Kind definition")."""

    U8 = 1
    U16 = 2
    U32 = 3
    U64 = 4
    U128 = 5
    I8 = 6
    I16 = 7
    I32 = 8
    I64 = 9
    F32 = 10
    F64 = 11
    BOOL = 12
    STRING = 13
    BYTES = 14
    STRUCT = 15

    @property
    def is_scalar(self) -> bool:
        return self in SCALAR_SIZES

    @property
    def is_text(self) -> bool:
        """string or bytes: the types that take `max_length` and may be `fixed`."""
        return self is FieldType.STRING or self is FieldType.BYTES

    @property
    def is_integer(self) -> bool:
        return self in INTEGER_RANGES


SCALAR_SIZES: Final[dict[FieldType, int]] = {
    FieldType.U8: 1,
    FieldType.U16: 2,
    FieldType.U32: 4,
    FieldType.U64: 8,
    FieldType.U128: 16,
    FieldType.I8: 1,
    FieldType.I16: 2,
    FieldType.I32: 4,
    FieldType.I64: 8,
    FieldType.F32: 4,
    FieldType.F64: 8,
    FieldType.BOOL: 1,
}

INTEGER_RANGES: Final[dict[FieldType, tuple[int, int]]] = {
    FieldType.U8: (0, 2**8 - 1),
    FieldType.U16: (0, 2**16 - 1),
    FieldType.U32: (0, 2**32 - 1),
    FieldType.U64: (0, 2**64 - 1),
    FieldType.U128: (0, 2**128 - 1),
    FieldType.I8: (-(2**7), 2**7 - 1),
    FieldType.I16: (-(2**15), 2**15 - 1),
    FieldType.I32: (-(2**31), 2**31 - 1),
    FieldType.I64: (-(2**63), 2**63 - 1),
}

DIRECTORY_ENTRY_SIZE: Final = 4
"""A variable string/bytes or an array takes a u32 directory entry in the fixed zone."""
FIXED_TEXT_LENGTH_SIZE: Final = 2
"""A fixed string/bytes is a u16 length followed by `max_length` bytes."""


class FieldFlags(IntFlag):
    """Field flag bits."""

    NONE = 0
    FIXED = 1
    ARRAY = 2


class KindFlags(IntFlag):
    """Kind flag bits."""

    NONE = 0
    EVENT_STREAM = 1
    DISK_BACKED = 2


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a kind, or one sub-field of a struct.

    `subfields` is set only for `FieldType.STRUCT`. For an array, `type`, `fixed`, `max_length`
    and `subfields` describe the element and `max_count` bounds the element count.
    """

    ordinal: int
    name: str
    type: FieldType
    fixed: bool = False
    array: bool = False
    max_length: int = 0
    max_count: int = 0
    struct_name: str = ""
    subfields: tuple[Field, ...] = field(default=())

    @property
    def flags(self) -> FieldFlags:
        flags = FieldFlags.NONE
        if self.fixed:
            flags |= FieldFlags.FIXED
        if self.array:
            flags |= FieldFlags.ARRAY
        return flags

    @property
    def is_variable(self) -> bool:
        """Whether the value lives in the data zone (behind a u32 directory entry)."""
        return self.array or (self.type.is_text and not self.fixed)

    @property
    def element_size(self) -> int:
        """Size of one fixed-size value of this field's type (one element, for an array).

        Undefined (0) for a variable string/bytes, whose size is its length.
        """
        if self.type is FieldType.STRUCT:
            return sum(sub.element_size for sub in self.subfields)
        if self.type.is_text:
            return FIXED_TEXT_LENGTH_SIZE + self.max_length if self.fixed else 0
        return SCALAR_SIZES[self.type]

    @property
    def fixed_size(self) -> int:
        """Bytes this field takes in the fixed zone of a row."""
        return DIRECTORY_ENTRY_SIZE if self.is_variable else self.element_size

    def identity(self) -> tuple[object, ...]:
        """What makes two fields the same for schema evolution: everything but the names."""
        return (
            self.ordinal,
            self.type,
            self.flags,
            self.max_length,
            self.max_count,
            tuple(sub.identity() for sub in self.subfields),
        )

    def describe_type(self) -> str:
        """A short human description, e.g. `u16`, `string(32, fixed)`, `array<Vec3>[8]`."""
        if self.type is FieldType.STRUCT:
            base = f"struct {self.struct_name or '?'}"
        elif self.type.is_text:
            base = f"{self.type.name.lower()}({self.max_length}{', fixed' if self.fixed else ''})"
        else:
            base = self.type.name.lower()
        return f"array<{base}>[{self.max_count}]" if self.array else base


@dataclass(frozen=True, slots=True)
class KindDef:
    """A kind definition: a name, flags and top-level fields with ordinals 0..n-1."""

    name: str
    fields: tuple[Field, ...]
    event_stream: bool = False
    disk_backed: bool = False

    @property
    def flags(self) -> KindFlags:
        flags = KindFlags.NONE
        if self.event_stream:
            flags |= KindFlags.EVENT_STREAM
        if self.disk_backed:
            flags |= KindFlags.DISK_BACKED
        return flags

    def prefix(self, field_count: int) -> KindDef:
        """This definition cut to its first `field_count` fields (an older schema version)."""
        return KindDef(self.name, self.fields[:field_count], self.event_stream, self.disk_backed)
