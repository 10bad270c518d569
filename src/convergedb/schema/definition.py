"""Kind definitions: the validation rules, and the wire encoding of docs/protocol.md.

Layout (all integers little-endian)::

    kind:  name str16, flags u8, field_count u8, field_count x field
    field: ordinal u8, name str16, type u8, flags u8, max_length u16, max_count u16,
           [type 15: struct_name str16, sub_count u8, sub_count x field]

A definition is validated before it is encoded and after it is decoded, so an invalid definition
never reaches the wire and never leaves the decoder.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from ..limits import (
    MAX_ARRAY_COUNT,
    MAX_FIELDS,
    MAX_NAME_LENGTH,
    MAX_VALUE_LENGTH,
    RESERVED_KIND_PREFIX,
)
from .errors import InvalidSchema, ReservedName
from .types import Field, FieldFlags, FieldType, KindDef, KindFlags

_U8: Final = struct.Struct("<B")
_U16: Final = struct.Struct("<H")
_KIND_HEAD: Final = struct.Struct("<BB")
"""flags u8, field_count u8 (after the kind name)."""
_FIELD_BODY: Final = struct.Struct("<BBHH")
"""type u8, flags u8, max_length u16, max_count u16 (after the field name)."""

_KNOWN_KIND_FLAGS: Final = int(KindFlags.EVENT_STREAM | KindFlags.DISK_BACKED)
_KNOWN_FIELD_FLAGS: Final = int(FieldFlags.FIXED | FieldFlags.ARRAY)
_SHOWN_NAME_CHARS: Final = 40
"""Longer names are cut in error messages."""

_NAME_RULE: Final = f"names are 1..{MAX_NAME_LENGTH} bytes of UTF-8"
_TYPE_NAMES: Final = ", ".join(f"{t.value} {t.name.lower()}" for t in FieldType)
_NESTED_STRUCT: Final = "a struct sub-field cannot be a struct (structs are one level deep)"


# --- validation --------------------------------------------------------------------------------


def validate_kind(kind: KindDef) -> None:
    """Check every rule of a kind definition; raise `InvalidSchema` naming what breaks which rule.

    The rules (docs/protocol.md, "Kind definition"): kind, field and struct names are 1..255 bytes
    of UTF-8; a kind has 1..64 fields and a struct 1..64 sub-fields, with ordinals exactly 0..n-1
    in order and names unique within their level; `fixed` only on string/bytes; `max_length`
    1..65535 on string/bytes and 0 otherwise; `max_count` 1..1024 on arrays and 0 otherwise; array
    elements are fixed-size; struct sub-fields are scalars or fixed string/bytes; `struct_name` and
    `subfields` only on structs.
    """
    where = f"kind {_show(kind.name)}"
    _check_name(kind.name, where, "the kind name")
    _check_field_list(kind.fields, where, in_struct=False)


def check_user_kind_name(name: str) -> None:
    """Raise `ReservedName` if a user tries to register a name of the server's system kinds."""
    if name.startswith(RESERVED_KIND_PREFIX):
        raise ReservedName(
            f"kind {_show(name)}: names starting with {RESERVED_KIND_PREFIX!r} are reserved for "
            "the server's system kinds; pick another name"
        )


def _show(name: object) -> str:
    """A name for an error message: quoted, and cut if very long."""
    if isinstance(name, str) and len(name) > _SHOWN_NAME_CHARS:
        return repr(name[:_SHOWN_NAME_CHARS]) + "..."
    return repr(name)


def _check_name(name: object, where: str, what: str) -> None:
    if not isinstance(name, str):
        raise InvalidSchema(f"{where}: {what} must be a str, not {type(name).__name__}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidSchema(
            f"{where}: {what} is not valid UTF-8 (it has a lone surrogate); {_NAME_RULE}"
        ) from None
    if not 1 <= size <= MAX_NAME_LENGTH:
        raise InvalidSchema(f"{where}: {what} is {size} bytes of UTF-8; {_NAME_RULE}")


def _check_field_list(fields: Sequence[Field], where: str, *, in_struct: bool) -> None:
    """The rules of one level: a kind's fields or a struct's sub-fields."""
    noun, owner, separator = (
        ("sub-field", "a struct", " ") if in_struct else ("field", "a kind", ": ")
    )
    if not 1 <= len(fields) <= MAX_FIELDS:
        raise InvalidSchema(
            f"{where}: has {len(fields)} {noun}s; {owner} must have 1..{MAX_FIELDS} {noun}s"
        )
    first_use: dict[str, int] = {}
    for index, field in enumerate(fields):
        path = f"{where}{separator}{noun} {index} {_show(field.name)}"
        _check_name(field.name, path, f"the {noun} name")
        if field.ordinal != index:
            raise InvalidSchema(
                f"{path}: has ordinal {field.ordinal!r}; ordinals must be exactly "
                f"0..{len(fields) - 1} in order, so this one must be {index}"
            )
        if field.name in first_use:
            raise InvalidSchema(
                f"{path}: the name is already used by {noun} {first_use[field.name]}; "
                f"{noun} names must be unique within {owner}"
            )
        first_use[field.name] = index
        _check_field(field, path, in_struct=in_struct)


def _check_field(field: Field, path: str, *, in_struct: bool) -> None:
    """The rules of one field's type and options (its name and ordinal are checked by the level)."""
    if not isinstance(field.type, FieldType):
        raise InvalidSchema(f"{path}: unknown type {field.type!r}; the types are {_TYPE_NAMES}")
    if in_struct:
        _check_struct_member(field, path)
    _check_fixed(field, path)
    _check_max_length(field, path)
    _check_array(field, path)
    if field.type is FieldType.STRUCT:
        _check_name(field.struct_name, path, "the struct name")
        _check_field_list(field.subfields, path, in_struct=True)
    else:
        _check_not_struct(field, path)


def _check_struct_member(field: Field, path: str) -> None:
    """A struct holds fixed-size values only: scalars and fixed string/bytes."""
    if field.type is FieldType.STRUCT:
        raise InvalidSchema(f"{path}: {_NESTED_STRUCT}")
    if field.array:
        raise InvalidSchema(
            f"{path}: a struct sub-field cannot be an array (use an array of structs instead)"
        )
    if field.type.is_text and not field.fixed:
        raise InvalidSchema(
            f"{path}: a struct sub-field cannot be variable-length; make the "
            f"{field.type.name.lower()} fixed"
        )


def _check_fixed(field: Field, path: str) -> None:
    if field.fixed and not field.type.is_text:
        raise InvalidSchema(
            f"{path}: the fixed flag is only for string/bytes; a {field.type.name.lower()} "
            "is always fixed-size"
        )


def _check_max_length(field: Field, path: str) -> None:
    if field.type.is_text:
        if not 1 <= field.max_length <= MAX_VALUE_LENGTH:
            raise InvalidSchema(
                f"{path}: max_length is {field.max_length!r}; a {field.type.name.lower()} needs "
                f"max_length 1..{MAX_VALUE_LENGTH}"
            )
    elif field.max_length != 0:
        raise InvalidSchema(
            f"{path}: max_length is {field.max_length!r}; it is only for string/bytes and must "
            f"be 0 on a {field.type.name.lower()}"
        )


def _check_array(field: Field, path: str) -> None:
    if not field.array:
        if field.max_count != 0:
            raise InvalidSchema(
                f"{path}: max_count is {field.max_count!r}; it is only for arrays and must be 0 "
                "on a field that is not an array"
            )
        return
    if not 1 <= field.max_count <= MAX_ARRAY_COUNT:
        raise InvalidSchema(
            f"{path}: max_count is {field.max_count!r}; an array needs max_count "
            f"1..{MAX_ARRAY_COUNT}"
        )
    if field.type.is_text and not field.fixed:
        raise InvalidSchema(
            f"{path}: array elements must be fixed-size; make the {field.type.name.lower()} "
            "fixed (arrays hold scalars, fixed string/bytes or structs)"
        )


def _check_not_struct(field: Field, path: str) -> None:
    if field.struct_name:
        raise InvalidSchema(
            f"{path}: has struct name {_show(field.struct_name)}; only a struct has one, "
            f"so it must be empty on a {field.type.name.lower()}"
        )
    if field.subfields:
        raise InvalidSchema(
            f"{path}: has {len(field.subfields)} sub-fields; only a struct has sub-fields, "
            f"a {field.type.name.lower()} has none"
        )


# --- encoding ----------------------------------------------------------------------------------


def encode_kind_definition(kind: KindDef) -> bytes:
    """Validate `kind` and return its wire encoding; raise `InvalidSchema` if it is invalid."""
    validate_kind(kind)
    out = bytearray()
    _put_str16(out, kind.name)
    out += _KIND_HEAD.pack(kind.flags, len(kind.fields))
    for field in kind.fields:
        _put_field(out, field)
    return bytes(out)


def _put_str16(out: bytearray, text: str) -> None:
    raw = text.encode("utf-8")
    out += _U16.pack(len(raw))
    out += raw


def _put_field(out: bytearray, field: Field) -> None:
    out += _U8.pack(field.ordinal)
    _put_str16(out, field.name)
    out += _FIELD_BODY.pack(field.type, field.flags, field.max_length, field.max_count)
    if field.type is FieldType.STRUCT:
        _put_str16(out, field.struct_name)
        out += _U8.pack(len(field.subfields))
        for sub in field.subfields:
            _put_field(out, sub)


# --- decoding ----------------------------------------------------------------------------------


class _Reader:
    """A cursor over a buffer that raises `InvalidSchema` on truncation."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview, pos: int) -> None:
        self.buf = buf
        self.pos = pos

    def take(self, size: int, what: str) -> memoryview:
        end = self.pos + size
        if end > len(self.buf):
            left = max(len(self.buf) - self.pos, 0)
            raise InvalidSchema(
                f"kind definition is truncated: {what} needs {size} bytes at offset "
                f"{self.pos}, but only {left} remain"
            )
        chunk = self.buf[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, layout: struct.Struct, what: str) -> tuple[int, ...]:
        values: tuple[int, ...] = layout.unpack(self.take(layout.size, what))
        return values

    def u8(self, what: str) -> int:
        return self.unpack(_U8, what)[0]

    def str16(self, what: str) -> str:
        (size,) = self.unpack(_U16, what)
        raw = self.take(size, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidSchema(f"{what} is not valid UTF-8 ({exc.reason})") from None


def decode_kind_definition(
    buf: bytes | bytearray | memoryview, offset: int = 0
) -> tuple[KindDef, int]:
    """Decode the kind definition at `offset` of `buf`.

    Returns the kind and the offset just after it; bytes after it are left alone. Raises
    `InvalidSchema` for truncation, invalid UTF-8, undefined flag bits, unknown type codes and
    every broken rule of `validate_kind`.
    """
    if offset < 0:
        raise ValueError(f"offset must not be negative, got {offset}")
    reader = _Reader(memoryview(buf), offset)
    name = reader.str16("the kind name")
    where = f"kind {_show(name)}"
    flags, field_count = reader.unpack(_KIND_HEAD, f"{where}: flags and field_count")
    _check_flag_bits(flags, _KNOWN_KIND_FLAGS, where, "kind flags", "0 event_stream, 1 disk_backed")
    _check_count(field_count, where, in_struct=False)
    fields = tuple(
        _read_field(reader, f"{where}: field {index}", in_struct=False)
        for index in range(field_count)
    )
    kind = KindDef(
        name,
        fields,
        event_stream=bool(flags & KindFlags.EVENT_STREAM),
        disk_backed=bool(flags & KindFlags.DISK_BACKED),
    )
    validate_kind(kind)
    return kind, reader.pos


def _read_field(reader: _Reader, where: str, *, in_struct: bool) -> Field:
    ordinal = reader.u8(f"{where}: ordinal")
    name = reader.str16(f"{where}: name")
    path = f"{where} {_show(name)}"
    code, flags, max_length, max_count = reader.unpack(_FIELD_BODY, f"{path}: type and options")
    field_type = _decode_type(code, path)
    _check_flag_bits(flags, _KNOWN_FIELD_FLAGS, path, "field flags", "0 fixed, 1 array")
    struct_name = ""
    subfields: tuple[Field, ...] = ()
    if field_type is FieldType.STRUCT:
        if in_struct:
            raise InvalidSchema(f"{path}: {_NESTED_STRUCT}")
        struct_name = reader.str16(f"{path}: struct name")
        sub_count = reader.u8(f"{path}: sub_count")
        _check_count(sub_count, path, in_struct=True)
        subfields = tuple(
            _read_field(reader, f"{path} sub-field {index}", in_struct=True)
            for index in range(sub_count)
        )
    return Field(
        ordinal,
        name,
        field_type,
        fixed=bool(flags & FieldFlags.FIXED),
        array=bool(flags & FieldFlags.ARRAY),
        max_length=max_length,
        max_count=max_count,
        struct_name=struct_name,
        subfields=subfields,
    )


def _decode_type(code: int, path: str) -> FieldType:
    try:
        return FieldType(code)
    except ValueError:
        raise InvalidSchema(
            f"{path}: unknown type code {code}; the types are {_TYPE_NAMES}"
        ) from None


def _check_flag_bits(flags: int, known: int, where: str, what: str, defined: str) -> None:
    undefined = flags & ~known
    if undefined:
        raise InvalidSchema(
            f"{where}: {what} 0x{flags:02x} set undefined bits 0x{undefined:02x}; "
            f"the defined bits are {defined}"
        )


def _check_count(count: int, where: str, *, in_struct: bool) -> None:
    """Reject a field/sub-field count early, before reading that many fields."""
    if not 1 <= count <= MAX_FIELDS:
        noun, owner = ("sub_count", "a struct") if in_struct else ("field_count", "a kind")
        raise InvalidSchema(f"{where}: {noun} is {count}; {owner} must have 1..{MAX_FIELDS} fields")
