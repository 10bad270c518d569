"""A table-driven validity check of raw rows, compiled with mypyc (`make compile`).

The server validates every written row, so this is its hottest check. `RowChecker` walks, over
the row bytes, a table of field checks built once per schema version: the checks of the fixed
zone (bools, fixed string/bytes), then the length of every variable field from the directory,
then each variable field (its limit, UTF-8 of strings, the elements of arrays). It answers
valid / not valid only, exactly as the generated straight-line check of `fastcheck` (which runs
instead when this module is not compiled: interpreted, that generated code is the faster one);
`RowCodec` explains a failure with its detailed checks, and the tests hold all three to the
same verdict.

Keep this module free of imports from the rest of the package: it is compiled on its own.
"""

from __future__ import annotations

from typing import Final

# --- the table -------------------------------------------------------------------------------
#
# A fixed check is three ints: (kind, offset, max_length); offset from the start of the row for
# the fixed zone, from the start of the element for an array's elements.
FIXED_BOOL: Final = 0
"""A bool byte: 0 or 1."""
FIXED_BYTES: Final = 1
"""A fixed bytes value: u16 length <= max_length, zeros after the value up to max_length."""
FIXED_STRING: Final = 2
"""A fixed string: as FIXED_BYTES, and the value is UTF-8."""

# A variable check is four ints: (kind, limit, element size, element table), one per variable
# field in ordinal order (the order of the data zone).
VARIABLE_BYTES: Final = 0
"""Variable bytes: length <= limit (max_length)."""
VARIABLE_STRING: Final = 1
"""A variable string: length <= limit, and UTF-8."""
VARIABLE_ARRAY: Final = 2
"""An array: whole elements of `element size` bytes, length <= limit (size * max_count); each
element passes the fixed checks of `element table` (an index into the element tables; -1 for
none)."""


class RowChecker:
    """The row check of one schema version (see the module docstring); call `is_valid`."""

    def __init__(
        self,
        fixed_size: int,
        fixed: list[int],
        directory: list[int],
        variable: list[int],
        elements: list[list[int]],
    ) -> None:
        self.fixed_size = fixed_size
        self.fixed = fixed
        """The fixed-zone checks, three ints each."""
        self.directory = directory
        """The offset of each variable field's u32 length in the fixed zone, in ordinal order."""
        self.variable = variable
        """The variable checks, four ints each, in the order of `directory`."""
        self.elements = elements
        """The fixed checks of array elements, referred to by index from `variable`."""

    def is_valid(self, row: bytes) -> bool:
        """Whether raw row bytes are valid for the schema."""
        size = len(row)
        fixed_size = self.fixed_size
        if size < fixed_size:
            return False
        if not _fixed_ok(row, self.fixed, 0):
            return False
        directory = self.directory
        if not directory:
            return size == fixed_size
        total = fixed_size
        for offset in directory:
            total += _u32(row, offset)
        if total != size:
            return False
        variable = self.variable
        position = fixed_size
        i = 0
        for offset in directory:
            length = _u32(row, offset)
            kind = variable[i]
            limit = variable[i + 1]
            if kind == VARIABLE_ARRAY:
                element_size = variable[i + 2]
                if length % element_size or length > limit:
                    return False
                table = variable[i + 3]
                if table >= 0:
                    checks = self.elements[table]
                    base = position
                    end = position + length
                    while base < end:
                        if not _fixed_ok(row, checks, base):
                            return False
                        base += element_size
            else:
                if length > limit:
                    return False
                if kind == VARIABLE_STRING and not _utf8(row, position, position + length):
                    return False
            position += length
            i += 4
        return True


def _fixed_ok(row: bytes, checks: list[int], base: int) -> bool:
    """Whether the fixed checks hold for the value at `base` (the row's start, or an element's)."""
    n = len(checks)
    i = 0
    while i < n:
        kind = checks[i]
        offset = base + checks[i + 1]
        if kind == FIXED_BOOL:
            if row[offset] > 1:
                return False
        else:
            max_length = checks[i + 2]
            length = row[offset] | row[offset + 1] << 8
            if length > max_length:
                return False
            start = offset + 2
            stop = start + max_length
            pad = start + length
            while pad < stop:
                if row[pad]:
                    return False
                pad += 1
            if kind == FIXED_STRING and not _utf8(row, start, start + length):
                return False
        i += 3
    return True


def _u32(row: bytes, offset: int) -> int:
    return row[offset] | row[offset + 1] << 8 | row[offset + 2] << 16 | row[offset + 3] << 24


def _utf8(row: bytes, start: int, end: int) -> bool:
    """Whether row[start:end] is UTF-8 (strict, as `bytes.decode`); ASCII is checked in place."""
    i = start
    while i < end:
        if row[i] >= 0x80:
            try:
                row[start:end].decode()
            except UnicodeDecodeError:
                return False
            return True
        i += 1
    return True
