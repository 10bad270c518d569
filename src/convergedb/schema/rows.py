"""The canonical row codec (docs/protocol.md, "Row encoding").

A `RowCodec` is compiled once per schema version of a kind. It turns Python values into row
bytes and back, validates raw row bytes without building Python values (the server's hot path),
splits a row into per-field segments and joins them again (patches, changed-field masks), and
widens a row written under an older schema version.

Values are positional, by ordinal: a scalar is an `int`, `float` or `bool`; a string a `str`; bytes
a `bytes`; a struct a sequence of its sub-values in sub-ordinal order; an array a sequence of
elements. `decode` gives structs back as tuples and arrays as lists.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Final

from .errors import InvalidData
from .fastcheck import row_check
from .types import (
    FIXED_TEXT_LENGTH_SIZE,
    INTEGER_RANGES,
    Field,
    FieldType,
)

_SCALAR_FORMATS: Final[dict[FieldType, str]] = {
    FieldType.U8: "B",
    FieldType.U16: "H",
    FieldType.U32: "I",
    FieldType.U64: "Q",
    FieldType.U128: "QQ",
    FieldType.I8: "b",
    FieldType.I16: "h",
    FieldType.I32: "i",
    FieldType.I64: "q",
    FieldType.F32: "f",
    FieldType.F64: "d",
    FieldType.BOOL: "?",
}
_U64_MASK: Final = (1 << 64) - 1
_U32 = struct.Struct("<I")

Items = list[Any]
"""The flat list of struct items a fixed-size value packs into."""
ToItems = Callable[[Any, Items], None]
RowCheck = Callable[[bytes, int, int], None]
"""Checks the bytes row[start:end] of one value; raises InvalidData."""


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --- fixed-size values: struct format pieces and their converters ------------------------------


def _fixed_format(f: Field) -> str:
    """The struct format of one fixed-size value (an array element, or a non-variable field)."""
    if f.type is FieldType.STRUCT:
        return "".join(_fixed_format(sub) for sub in f.subfields)
    if f.type.is_text:
        return f"H{f.max_length}s"
    return _SCALAR_FORMATS[f.type]


def _text_bytes(f: Field, value: Any, path: str) -> bytes:
    """A string/bytes value as bytes, checked against `max_length`."""
    if f.type is FieldType.STRING:
        if not isinstance(value, str):
            raise InvalidData(f"field {path!r} ({f.describe_type()}): expected str, got {value!r}")
        data = value.encode()
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    else:
        raise InvalidData(f"field {path!r} ({f.describe_type()}): expected bytes, got {value!r}")
    if len(data) > f.max_length:
        raise InvalidData(
            f"field {path!r} ({f.describe_type()}): value is {len(data)} bytes, "
            f"longer than max_length {f.max_length}"
        )
    return data


def _fixed_to_items(f: Field, path: str) -> ToItems:
    """A converter that appends the struct items of one fixed-size value of `f`."""
    if f.type is FieldType.STRUCT:
        subs = [(_fixed_to_items(sub, _path(path, sub.name))) for sub in f.subfields]
        count = len(subs)

        def struct_items(value: Any, out: Items) -> None:
            if not isinstance(value, Sequence) or len(value) != count:
                raise InvalidData(
                    f"field {path!r} ({f.describe_type()}): expected {count} sub-values, "
                    f"got {value!r}"
                )
            for convert, sub_value in zip(subs, value, strict=True):
                convert(sub_value, out)

        return struct_items
    if f.type.is_text:

        def text_items(value: Any, out: Items) -> None:
            data = _text_bytes(f, value, path)
            out.append(len(data))
            out.append(data)

        return text_items
    if f.type is FieldType.U128:

        def u128_items(value: Any, out: Items) -> None:
            if not isinstance(value, int) or not 0 <= value < 1 << 128:
                raise _out_of_range(f, value, path)
            out.append(value & _U64_MASK)
            out.append(value >> 64)

        return u128_items
    if f.type is FieldType.BOOL:

        def bool_items(value: Any, out: Items) -> None:
            if value is not True and value is not False and value not in (0, 1):
                raise InvalidData(f"field {path!r} (bool): expected True or False, got {value!r}")
            out.append(bool(value))

        return bool_items
    return _plain_item


def _plain_item(value: Any, out: Items) -> None:
    out.append(value)


def _out_of_range(f: Field, value: Any, path: str) -> InvalidData:
    if f.type.is_integer and isinstance(value, int) and not isinstance(value, bool):
        low, high = INTEGER_RANGES[f.type]
        return InvalidData(
            f"field {path!r} ({f.describe_type()}): {value} is out of range {low}..{high}"
        )
    if f.type.is_integer:
        return InvalidData(f"field {path!r} ({f.describe_type()}): expected int, got {value!r}")
    if f.type in (FieldType.F32, FieldType.F64):
        if isinstance(value, int | float):
            return InvalidData(f"field {path!r} ({f.describe_type()}): {value!r} does not fit")
        return InvalidData(f"field {path!r} ({f.describe_type()}): expected float, got {value!r}")
    return InvalidData(f"field {path!r} ({f.describe_type()}): cannot encode {value!r}")


# --- checks of raw bytes --------------------------------------------------------------------------


def _fixed_checks(f: Field, offset: int, path: str) -> list[Callable[[bytes, int], None]]:
    """Checks of one fixed-size value of `f` at `offset` from a base position in the row."""
    if f.type is FieldType.STRUCT:
        checks: list[Callable[[bytes, int], None]] = []
        for sub in f.subfields:
            checks += _fixed_checks(sub, offset, _path(path, sub.name))
            offset += sub.element_size
        return checks
    if f.type is FieldType.BOOL:

        def check_bool(row: bytes, base: int) -> None:
            if row[base + offset] > 1:
                raise InvalidData(
                    f"field {path!r} (bool) holds 0x{row[base + offset]:02x}; "
                    "a bool is exactly 0x00 or 0x01"
                )

        return [check_bool]
    if f.type.is_text:
        return [_fixed_text_check(f, offset, path)]
    return []


def _fixed_text_check(f: Field, offset: int, path: str) -> Callable[[bytes, int], None]:
    max_length = f.max_length
    is_string = f.type is FieldType.STRING

    def check_fixed_text(row: bytes, base: int) -> None:
        start = base + offset + FIXED_TEXT_LENGTH_SIZE
        (length,) = struct.unpack_from("<H", row, base + offset)
        if length > max_length:
            raise InvalidData(
                f"field {path!r} ({f.describe_type()}): length {length} exceeds max_length "
                f"{max_length}"
            )
        end = start + max_length
        if row.count(0, start + length, end) != max_length - length:
            raise InvalidData(
                f"field {path!r} ({f.describe_type()}): non-zero padding after the value"
            )
        if is_string:
            _check_utf8(row, start, start + length, f, path)

    return check_fixed_text


def _check_utf8(row: bytes, start: int, end: int, f: Field, path: str) -> None:
    segment = row[start:end]
    if segment.isascii():
        return
    try:
        segment.decode()
    except UnicodeDecodeError as exc:
        raise InvalidData(f"field {path!r} ({f.describe_type()}): invalid UTF-8 ({exc})") from None


def _variable_check(f: Field, path: str) -> RowCheck:
    """The check of a variable value (string/bytes or array) in the data zone."""
    if not f.array:
        max_length = f.max_length
        is_string = f.type is FieldType.STRING

        def check_text(row: bytes, start: int, end: int) -> None:
            if end - start > max_length:
                raise InvalidData(
                    f"field {path!r} ({f.describe_type()}): value is {end - start} bytes, "
                    f"longer than max_length {max_length}"
                )
            if is_string:
                _check_utf8(row, start, end, f, path)

        return check_text
    size = f.element_size
    max_count = f.max_count
    element_checks = _fixed_checks(f, 0, path)

    def check_array(row: bytes, start: int, end: int) -> None:
        length = end - start
        if length % size:
            raise InvalidData(
                f"field {path!r} ({f.describe_type()}): {length} bytes is not a whole number "
                f"of {size}-byte elements"
            )
        if length // size > max_count:
            raise InvalidData(
                f"field {path!r} ({f.describe_type()}): {length // size} elements, "
                f"more than max_count {max_count}"
            )
        for base in range(start, end, size) if element_checks else ():
            for check in element_checks:
                check(row, base)

    return check_array


# --- decoding: a straight-line decoder generated per layout ----------------------------------


class _DecodeBuilder:
    """Writes the Python expressions that rebuild values from the items of one struct unpack."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.names: list[str] = []
        """The names the unpacked items are bound to, in struct order."""

    def item(self) -> str:
        """The name of the next unpacked item."""
        name = f"{self.prefix}{len(self.names)}"
        self.names.append(name)
        return name

    def unpacked(self) -> str:
        """The assignment target of the unpacked items."""
        return ", ".join(self.names) + ("," if len(self.names) == 1 else "")

    def fixed(self, f: Field) -> str:
        """The expression of one fixed-size value of `f` (what `_fixed_format` packs)."""
        item = self.item
        if f.type is FieldType.STRUCT:
            parts = [self.fixed(sub) for sub in f.subfields]
            return f"({', '.join(parts)}{',' if len(parts) == 1 else ''})"
        if f.type.is_text:
            length, data = item(), item()
            text = f"{data}[:{length}]"
            return f"{text}.decode()" if f.type is FieldType.STRING else text
        if f.type is FieldType.U128:
            low, high = item(), item()
            return f"({low} | {high} << 64)"
        return item()


def _compile_decode(
    fields: Sequence[Field], fixed_struct: struct.Struct, fixed_size: int, plain: bool
) -> Callable[[bytes], list[Any]]:
    """The decoder of rows of `fields`: one `unpack_from` of the whole fixed zone (directory
    entries included), then one expression per field with the layout inlined, so that nothing
    about the schema is looked up per row.

    For a kind of a variable string, a u32 and an 8-byte fixed string (`unpack` is that of
    "<IIH8s", the 18-byte fixed zone):

        def decode(row):
            i0, i1, i2, i3 = unpack(row)
            p = 18
            e = p + i0
            v0 = row[p:e].decode()
            p = e
            return [v0, i1, i3[:i2].decode()]
    """
    unpack = fixed_struct.unpack_from
    if plain:  # every item is a field's value
        return lambda row: list(unpack(row))
    b = _DecodeBuilder("i")
    namespace: dict[str, Any] = {"unpack": unpack}
    lines: list[str] = []
    values: list[str] = []
    for f in fields:
        if not f.is_variable:
            values.append(b.fixed(f))
            continue
        length = b.item()
        value = f"v{f.ordinal}"
        if not f.array:
            data = "row[p:e].decode()" if f.type is FieldType.STRING else "bytes(row[p:e])"
        else:
            elements = _DecodeBuilder("a")
            element = elements.fixed(f)
            namespace[f"elements{f.ordinal}"] = struct.Struct("<" + _fixed_format(f)).iter_unpack
            data = f"[{element} for {elements.unpacked()} in elements{f.ordinal}(row[p:e])]"
        lines += [f"e = p + {length}", f"{value} = {data}", "p = e"]
        values.append(value)
    body = []
    if b.names:
        body.append(f"{b.unpacked()} = unpack(row)")
    if lines:
        body.append(f"p = {fixed_size}")
    body += lines
    body.append(f"return [{', '.join(values)}]")
    source = "def decode(row):\n" + "".join(f"    {line}\n" for line in body)
    exec(compile(source, "<convergedb row decoder>", "exec"), namespace)
    decode: Callable[[bytes], list[Any]] = namespace["decode"]
    return decode


# --- the codec --------------------------------------------------------------------------------


class RowCodec:
    """The compiled row layout of one schema version of a kind.

    Build it once per (kind, schema version) and reuse it: every method is cheap to call.
    """

    __slots__ = (
        "_directory",
        "_encoders",
        "_field_structs",
        "_fixed_checks",
        "_fixed_spans",
        "_fixed_struct",
        "_plain",
        "_variable_checks",
        "_variable_encoders",
        "_variable_ordinals",
        "_zero_fill",
        "all_fields_mask",
        "decode",
        "fields",
        "fixed_size",
        "is_valid",
        "offsets",
        "zero_row",
    )

    def __init__(self, fields: Sequence[Field]) -> None:
        self.fields: tuple[Field, ...] = tuple(fields)
        self.all_fields_mask = (1 << len(self.fields)) - 1
        offsets = []
        offset = 0
        for f in self.fields:
            offsets.append(offset)
            offset += f.fixed_size
        self.offsets: tuple[int, ...] = (*offsets, offset)
        """Fixed-zone offset of each field; the last entry is the fixed-zone size."""
        self.fixed_size = offset
        self.zero_row = bytes(offset)
        """The row of an entity whose every field is zero (what a PATCH starts from)."""
        self._fixed_struct = struct.Struct("<" + "".join(self._field_format(f) for f in fields))
        self._field_structs = tuple(struct.Struct("<" + self._field_format(f)) for f in fields)
        self._plain = all(f.type.is_scalar and not f.array for f in self.fields) and not any(
            f.type in (FieldType.U128, FieldType.BOOL) for f in self.fields
        )
        self._directory = self._compile_directory()
        self._encoders = tuple(self._compile_encoder(f) for f in self.fields)
        self._variable_encoders = {
            f.ordinal: self._compile_data_encoder(f) for f in self.fields if f.is_variable
        }
        self._fixed_checks = tuple(
            check
            for f, off in zip(self.fields, offsets, strict=True)
            if not f.is_variable
            for check in _fixed_checks(f, off, f.name)
        )
        self._variable_checks = tuple(
            _variable_check(f, f.name) for f in self.fields if f.is_variable
        )
        self._zero_fill: dict[int, bytes] = {}
        self._variable_ordinals = tuple(f.ordinal for f in self.fields if f.is_variable)
        self._fixed_spans = tuple(
            (start * 8, (1 << ((end - start) * 8)) - 1, 1 << ordinal)
            for ordinal, (start, end) in enumerate(zip(offsets, self.offsets[1:], strict=True))
        )
        """(bit shift, bit mask, field bit) of each field in the fixed zone read as an integer."""
        self.decode: Callable[[bytes], list[Any]] = _compile_decode(
            self.fields, self._fixed_struct, self.fixed_size, self._plain
        )
        """The field values of a valid row, in ordinal order (`decode(row) -> list`): structs
        as tuples, arrays as lists. Validate untrusted rows first. Generated straight-line code
        (see `_compile_decode`)."""
        self.is_valid = row_check(self.fields, self.offsets, self.fixed_size, self._variable_checks)
        """Whether raw row bytes are valid (the fast check, compiled or generated: see
        `fastcheck`; `validate` says why not)."""

    @staticmethod
    def _field_format(f: Field) -> str:
        return "I" if f.is_variable else _fixed_format(f)

    def _compile_directory(self) -> struct.Struct | None:
        """A struct that unpacks every directory entry of a row in one call (others skipped)."""
        parts = []
        gap = 0
        for f in self.fields:
            if f.is_variable:
                parts.append(f"{gap}xI" if gap else "I")
                gap = 0
            else:
                gap += f.fixed_size
        return struct.Struct("<" + "".join(parts)) if parts else None

    # encoding -------------------------------------------------------------------------------

    def _compile_encoder(self, f: Field) -> Callable[[Any, Items, list[bytes]], None]:
        if f.is_variable:
            encode_data = self._compile_data_encoder(f)

            def variable(value: Any, items: Items, data: list[bytes]) -> None:
                blob = encode_data(value)
                items.append(len(blob))
                data.append(blob)

            return variable
        to_items = _fixed_to_items(f, f.name)
        return lambda value, items, data: to_items(value, items)

    def _compile_data_encoder(self, f: Field) -> Callable[[Any], bytes]:
        """The data-zone bytes of a variable field's value."""
        if not f.array:
            return lambda value: _text_bytes(f, value, f.name)
        element_format = _fixed_format(f)
        element = replace(f, array=False, max_count=0)
        to_items = _fixed_to_items(element, f"{f.name}[]")
        max_count = f.max_count

        def encode_array(value: Any) -> bytes:
            if not isinstance(value, Sequence) or isinstance(value, str | bytes):
                raise InvalidData(
                    f"field {f.name!r} ({f.describe_type()}): expected a list, got {value!r}"
                )
            if len(value) > max_count:
                raise InvalidData(
                    f"field {f.name!r} ({f.describe_type()}): {len(value)} elements, "
                    f"more than max_count {max_count}"
                )
            items: Items = []
            for item in value:
                to_items(item, items)
            try:
                return struct.pack("<" + element_format * len(value), *items)
            except (struct.error, OverflowError, TypeError):
                raise _array_error(element, value, f.name) from None

        return encode_array

    def encode(self, values: Sequence[Any]) -> bytes:
        """The canonical row of `values` (one per field, in ordinal order).

        Raises InvalidData, naming the field, for a value that does not fit.
        """
        if len(values) != len(self.fields):
            raise InvalidData(f"expected {len(self.fields)} field values, got {len(values)}")
        try:
            if self._plain:
                return self._fixed_struct.pack(*values)
            items: Items = []
            data: list[bytes] = []
            for encode, value in zip(self._encoders, values, strict=True):
                encode(value, items, data)
            return self._fixed_struct.pack(*items) + b"".join(data)
        except (struct.error, OverflowError, TypeError):
            raise self._diagnose(values) from None

    def encode_field(self, ordinal: int, value: Any) -> bytes:
        """One field's value as it appears in a patch: fixed bytes, or u32 length + data."""
        f = self.fields[ordinal]
        if f.is_variable:
            blob = self._variable_encoders[ordinal](value)
            return _U32.pack(len(blob)) + blob
        try:
            items: Items = []
            self._encoders[ordinal](value, items, [])
            return self._field_structs[ordinal].pack(*items)
        except (struct.error, OverflowError, TypeError):
            raise _value_error(f, value, f.name) or InvalidData(f"field {f.name!r}") from None

    def _diagnose(self, values: Sequence[Any]) -> InvalidData:
        """Find which value failed to pack, for an error message that names it."""
        for f, value in zip(self.fields, values, strict=True):
            try:
                self.encode_field(f.ordinal, value)
            except InvalidData as exc:
                return exc
        return InvalidData("the values do not fit the schema")

    # decoding -------------------------------------------------------------------------------

    def decode_named(self, row: bytes) -> dict[str, Any]:
        """The field values of a valid row by field name; structs as dicts by sub-field name
        (for tools that have a schema but no Python class)."""
        return {
            f.name: _named(f, value) for f, value in zip(self.fields, self.decode(row), strict=True)
        }

    # validation -----------------------------------------------------------------------------

    def validate(self, row: bytes) -> None:
        """Check raw row bytes against the schema without decoding them.

        Raises InvalidData for a wrong length, a bool other than 0/1, a text longer than its
        max_length, non-zero padding, invalid UTF-8, or an array that is not whole elements or
        has too many.
        """
        if not self.is_valid(row):
            self._explain_invalid(row)
            raise InvalidData("the row does not fit the schema")

    def _explain_invalid(self, row: bytes) -> None:
        """The detailed checks, which name the field at fault. Slower than `is_valid`."""
        size = len(row)
        if size < self.fixed_size:
            raise InvalidData(
                f"row is {size} bytes, shorter than the fixed zone ({self.fixed_size} bytes)"
            )
        directory = self._directory
        if directory is None:
            if size != self.fixed_size:
                raise InvalidData(f"row is {size} bytes; this kind's rows are {self.fixed_size}")
        else:
            lengths = directory.unpack_from(row)
            expected = self.fixed_size + sum(lengths)
            if size != expected:
                raise InvalidData(
                    f"row is {size} bytes; its fixed zone and directory say {expected}"
                )
        for check_fixed in self._fixed_checks:
            check_fixed(row, 0)
        if directory is not None:
            start = self.fixed_size
            for length, check_variable in zip(lengths, self._variable_checks, strict=True):
                check_variable(row, start, start + length)
                start += length

    # segments, patches and evolution -----------------------------------------------------------

    def split(self, row: bytes) -> list[bytes]:
        """Each field's raw segment: its fixed-zone bytes, or its data-zone bytes if variable."""
        offsets = self.offsets
        segments = [row[offsets[i] : offsets[i + 1]] for i in range(len(self.fields))]
        if self._directory is not None:
            position = self.fixed_size
            lengths = self._directory.unpack_from(row)
            for ordinal, length in zip(self._variable_ordinals, lengths, strict=True):
                segments[ordinal] = row[position : position + length]
                position += length
        return segments

    def join(self, segments: Sequence[bytes]) -> bytes:
        """The row made of per-field segments (the inverse of `split`)."""
        if self._directory is None:
            return b"".join(segments)
        fixed = list(segments)
        data = []
        for ordinal in self._variable_ordinals:
            segment = segments[ordinal]
            fixed[ordinal] = _U32.pack(len(segment))
            data.append(segment)
        return b"".join(fixed) + b"".join(data)

    def changed_fields(self, old: bytes, new: bytes) -> int:
        """The bitmask of fields whose values differ between two rows of this schema.

        When the data zones (variable strings and arrays) are equal, only fixed-zone fields can
        differ, and each has a fixed place there (a variable field's directory entry holds its
        length): one XOR of the two zones, read as integers, finds them all. Otherwise the rows
        are compared field by field.
        """
        if old == new:
            return 0
        size = self.fixed_size
        if len(old) != len(new) or old[size:] != new[size:]:
            return self._changed_segments(old, new)
        diff = int.from_bytes(old[:size], "little") ^ int.from_bytes(new[:size], "little")
        mask = 0
        for shift, bits, field_bit in self._fixed_spans:
            if diff >> shift & bits:
                mask |= field_bit
        return mask

    def _changed_segments(self, old: bytes, new: bytes) -> int:
        mask = 0
        for ordinal, (a, b) in enumerate(zip(self.split(old), self.split(new), strict=True)):
            if a != b:
                mask |= 1 << ordinal
        return mask

    def widen(self, row: bytes, field_count: int) -> bytes:
        """A row written under the schema version with `field_count` fields, as this version.

        Appended fields read as zero: their fixed-zone bytes are zero, their directory entries 0.
        """
        if field_count == len(self.fields):
            return row
        split_at = self.offsets[field_count]
        zeros = self._zero_fill.get(field_count)
        if zeros is None:
            zeros = self._zero_fill[field_count] = bytes(self.fixed_size - split_at)
        return row[:split_at] + zeros + row[split_at:]


def _value_error(f: Field, value: Any, path: str) -> InvalidData | None:
    """Why `value` does not fit the fixed-size field `f` (None if it does)."""
    if f.type is FieldType.STRUCT:
        if not isinstance(value, Sequence) or len(value) != len(f.subfields):
            return InvalidData(
                f"field {path!r} ({f.describe_type()}): expected {len(f.subfields)} sub-values, "
                f"got {value!r}"
            )
        for sub, sub_value in zip(f.subfields, value, strict=True):
            error = _value_error(sub, sub_value, _path(path, sub.name))
            if error is not None:
                return error
        return None
    try:
        items: Items = []
        _fixed_to_items(f, path)(value, items)
        struct.pack("<" + _fixed_format(f), *items)
    except InvalidData as exc:
        return exc
    except (struct.error, OverflowError, TypeError):
        return _out_of_range(f, value, path)
    return None


def _array_error(element: Field, values: Sequence[Any], name: str) -> InvalidData:
    """Which element of an array does not fit, as an error naming it."""
    for i, value in enumerate(values):
        error = _value_error(element, value, f"{name}[{i}]")
        if error is not None:
            return error
    return InvalidData(f"field {name!r}: the elements do not fit")


def _named(f: Field, value: Any) -> Any:
    if f.type is not FieldType.STRUCT:
        return value
    if f.array:
        return [_struct_dict(f, item) for item in value]
    return _struct_dict(f, value)


def _struct_dict(f: Field, value: Sequence[Any]) -> dict[str, Any]:
    return {sub.name: item for sub, item in zip(f.subfields, value, strict=True)}
