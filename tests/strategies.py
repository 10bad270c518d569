"""Hypothesis strategies for the schema model, shared by the test modules.

`kind_definitions()` draws random valid kinds; `valid_fields()` a valid field list (ordinals
0..n-1, unique names); `valid_field(ordinal)` one field. Every type appears: scalars, fixed and
variable string/bytes, structs, and arrays of scalars, fixed string/bytes and structs. The bounds
default to the protocol's limits; row-codec tests that build values may want smaller
`max_length` / `max_count` / `max_subfields`.
"""

from __future__ import annotations

import string

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from convergedb.limits import MAX_ARRAY_COUNT, MAX_FIELDS, MAX_NAME_LENGTH, MAX_VALUE_LENGTH
from convergedb.schema.types import Field, FieldType, KindDef

SCALAR_TYPES: tuple[FieldType, ...] = tuple(t for t in FieldType if t.is_scalar)
TEXT_TYPES: tuple[FieldType, ...] = (FieldType.STRING, FieldType.BYTES)

_MAX_CHAR_BYTES = 4


def names() -> SearchStrategy[str]:
    """Valid names: 1..255 bytes of UTF-8, any characters but surrogates (or long ASCII)."""
    unicode_names = st.text(
        st.characters(codec="utf-8"), min_size=1, max_size=MAX_NAME_LENGTH // _MAX_CHAR_BYTES
    )
    ascii_names = st.text(
        string.ascii_letters + string.digits + "_", min_size=1, max_size=MAX_NAME_LENGTH
    )
    return st.one_of(unicode_names, ascii_names)


def _options(max_length: int, max_count: int) -> tuple[SearchStrategy[int], SearchStrategy[int]]:
    return st.integers(1, max_length), st.integers(1, max_count)


@st.composite
def struct_members(
    draw: st.DrawFn, ordinal: int, name: str, *, max_length: int = MAX_VALUE_LENGTH
) -> Field:
    """A valid struct sub-field: a scalar or a fixed string/bytes."""
    field_type = draw(st.sampled_from(SCALAR_TYPES + TEXT_TYPES))
    if field_type.is_text:
        return Field(
            ordinal, name, field_type, fixed=True, max_length=draw(st.integers(1, max_length))
        )
    return Field(ordinal, name, field_type)


@st.composite
def valid_field(
    draw: st.DrawFn,
    ordinal: int,
    name: str | None = None,
    *,
    max_length: int = MAX_VALUE_LENGTH,
    max_count: int = MAX_ARRAY_COUNT,
    max_subfields: int = 16,
) -> Field:
    """One valid top-level field with the given ordinal (and name, else a random one)."""
    lengths, counts = _options(max_length, max_count)
    field_name = draw(names()) if name is None else name
    shape = draw(st.sampled_from(["scalar", "variable text", "fixed text", "struct"]))
    array = shape != "variable text" and draw(st.booleans())
    count = draw(counts) if array else 0
    if shape == "scalar":
        field_type = draw(st.sampled_from(SCALAR_TYPES))
        return Field(ordinal, field_name, field_type, array=array, max_count=count)
    if shape in ("variable text", "fixed text"):
        return Field(
            ordinal,
            field_name,
            draw(st.sampled_from(TEXT_TYPES)),
            fixed=shape == "fixed text",
            array=array,
            max_length=draw(lengths),
            max_count=count,
        )
    sub_names = draw(st.lists(names(), min_size=1, max_size=max_subfields, unique=True))
    subfields = tuple(
        draw(struct_members(index, sub_name, max_length=max_length))
        for index, sub_name in enumerate(sub_names)
    )
    return Field(
        ordinal,
        field_name,
        FieldType.STRUCT,
        array=array,
        max_count=count,
        struct_name=draw(names()),
        subfields=subfields,
    )


@st.composite
def valid_fields(
    draw: st.DrawFn,
    min_size: int = 1,
    max_size: int = MAX_FIELDS,
    *,
    max_length: int = MAX_VALUE_LENGTH,
    max_count: int = MAX_ARRAY_COUNT,
    max_subfields: int = 16,
) -> tuple[Field, ...]:
    """A valid field list: ordinals 0..n-1 in order, names unique, n in min_size..max_size."""
    field_names = draw(st.lists(names(), min_size=min_size, max_size=max_size, unique=True))
    return tuple(
        draw(
            valid_field(
                ordinal,
                field_name,
                max_length=max_length,
                max_count=max_count,
                max_subfields=max_subfields,
            )
        )
        for ordinal, field_name in enumerate(field_names)
    )


@st.composite
def kind_definitions(
    draw: st.DrawFn,
    min_fields: int = 1,
    max_fields: int = MAX_FIELDS,
    *,
    max_length: int = MAX_VALUE_LENGTH,
    max_count: int = MAX_ARRAY_COUNT,
    max_subfields: int = 16,
    name: SearchStrategy[str] | None = None,
) -> KindDef:
    """A random valid kind definition (any flags; the name from `name`, default `names()`)."""
    fields = draw(
        valid_fields(
            min_fields,
            max_fields,
            max_length=max_length,
            max_count=max_count,
            max_subfields=max_subfields,
        )
    )
    return KindDef(
        draw(names() if name is None else name),
        fields,
        event_stream=draw(st.booleans()),
        disk_backed=draw(st.booleans()),
    )
