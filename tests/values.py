"""Hypothesis strategies for Python values that fit a schema's fields."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from convergedb.schema.types import INTEGER_RANGES, Field, FieldType


def _text(f: Field) -> st.SearchStrategy[Any]:
    if f.type is FieldType.BYTES:
        return st.binary(max_size=f.max_length)
    # characters of up to 4 UTF-8 bytes: keep the encoded length within max_length
    return st.text(max_size=f.max_length).filter(lambda s: len(s.encode()) <= f.max_length)


def element_values(f: Field, *, allow_nan: bool = False) -> st.SearchStrategy[Any]:
    """One fixed-size value (or one array element) of `f`."""
    if f.type is FieldType.STRUCT:
        return st.tuples(*(element_values(sub, allow_nan=allow_nan) for sub in f.subfields))
    if f.type.is_text:
        return _text(f)
    if f.type is FieldType.BOOL:
        return st.booleans()
    if f.type is FieldType.F32:
        return st.floats(width=32, allow_nan=allow_nan)
    if f.type is FieldType.F64:
        return st.floats(allow_nan=allow_nan)
    low, high = INTEGER_RANGES[f.type]
    return st.integers(low, high)


def field_values(f: Field, *, allow_nan: bool = False) -> st.SearchStrategy[Any]:
    """A value of a top-level field (arrays as lists)."""
    element = element_values(f, allow_nan=allow_nan)
    if f.array:
        return st.lists(element, max_size=min(f.max_count, 8))
    return element


def row_values(
    fields: tuple[Field, ...], *, allow_nan: bool = False
) -> st.SearchStrategy[list[Any]]:
    """Values for every field of a schema, in ordinal order."""
    return st.tuples(*(field_values(f, allow_nan=allow_nan) for f in fields)).map(list)
