"""A straight-line validity check of raw rows, generated once per schema version.

The server validates every written row, so this is its hottest path. Instead of a loop over
per-field checks, we generate one function with the offsets and limits of the layout inlined:
one `unpack_from` fetches every directory entry, bool byte and fixed-text length at once, then a
few comparisons follow. It only answers valid / not valid; `RowCodec` explains a failure with
its detailed (slower) checks, and the tests hold both to the same verdict.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from .errors import InvalidData
from .types import FIXED_TEXT_LENGTH_SIZE, Field, FieldType

RowCheck = Callable[[bytes, int, int], None]


class _Builder:
    def __init__(self) -> None:
        self.formats: list[str] = []
        self.names: list[str] = []
        self.lines: list[str] = []
        self.position = 0

    def fetch(self, offset: int, fmt: str, size: int) -> str:
        """Fetch one item at `offset` of the fixed zone through the probe; returns its name.

        Offsets must come in increasing order."""
        if offset > self.position:
            self.formats.append(f"{offset - self.position}x")
        self.formats.append(fmt)
        self.position = offset + size
        name = f"v{len(self.names)}"
        self.names.append(name)
        return name

    def utf8(self, start: str, end: str) -> None:
        self.lines += [f"s = row[{start}:{end}]", "if not s.isascii(): s.decode()"]


def _fixed_value(b: _Builder, f: Field, offset: int) -> None:
    if f.type is FieldType.STRUCT:
        for sub in f.subfields:
            _fixed_value(b, sub, offset)
            offset += sub.element_size
    elif f.type is FieldType.BOOL:
        b.lines.append(f"if {b.fetch(offset, 'B', 1)} > 1: return False")
    elif f.type.is_text:
        length = b.fetch(offset, "H", FIXED_TEXT_LENGTH_SIZE)
        start = offset + FIXED_TEXT_LENGTH_SIZE
        size = f.max_length
        b.lines += [
            f"if {length} > {size}: return False",
            f"if row.count(0, {start} + {length}, {start + size}) != {size} - {length}: "
            "return False",
        ]
        if f.type is FieldType.STRING:
            b.utf8(str(start), f"{start} + {length}")


def compile_row_check(
    fields: Sequence[Field],
    offsets: Sequence[int],
    fixed_size: int,
    variable_checks: Sequence[RowCheck],
) -> Callable[[bytes], bool]:
    """A function telling whether raw row bytes are valid for `fields`.

    `variable_checks` are the detailed checks of the variable fields, in ordinal order; the
    generated code calls them only for arrays whose elements hold bools or fixed text.
    """
    b = _Builder()
    directory = []
    for f in fields:  # in offset order, as the probe requires
        if f.is_variable:
            directory.append(b.fetch(offsets[f.ordinal], "I", 4))
        else:
            directory.append("")
            _fixed_value(b, f, offsets[f.ordinal])
    namespace: dict[str, object] = {"InvalidData": InvalidData}
    variable = [f for f in fields if f.is_variable]
    total = " + ".join([str(fixed_size), *(d for d in directory if d)])
    b.lines.append(f"if len(row) != {total}: return False")
    if variable:
        b.lines.append(f"p = {fixed_size}")
    for f, check in zip(variable, variable_checks, strict=True):
        length = directory[f.ordinal]
        if not f.array:
            b.lines.append(f"if {length} > {f.max_length}: return False")
            if f.type is FieldType.STRING:
                b.utf8("p", f"p + {length}")
        elif _has_element_checks(f):
            namespace[f"check{f.ordinal}"] = check
            b.lines.append(f"check{f.ordinal}(row, p, p + {length})")
        else:
            size = f.element_size
            b.lines.append(f"if {length} % {size} or {length} > {size * f.max_count}: return False")
        b.lines.append(f"p += {length}")
    return _generate(b, fixed_size, namespace)


def _has_element_checks(f: Field) -> bool:
    members = f.subfields if f.type is FieldType.STRUCT else (f,)
    return any(m.type is FieldType.BOOL or m.type.is_text for m in members)


def _generate(
    b: _Builder, fixed_size: int, namespace: dict[str, object]
) -> Callable[[bytes], bool]:
    body = [f"if len(row) < {fixed_size}: return False"]
    if b.names:
        namespace["probe"] = struct.Struct("<" + "".join(b.formats)).unpack_from
        unpacked = ", ".join(b.names)
        body.append(f"{unpacked}{',' if len(b.names) == 1 else ''} = probe(row)")
    body += b.lines
    body.append("return True")
    source = "def is_valid(row):\n    try:\n" + "".join(f"        {line}\n" for line in body)
    source += "    except (UnicodeDecodeError, InvalidData):\n        return False\n"
    exec(compile(source, "<convergedb row check>", "exec"), namespace)
    check = namespace["is_valid"]
    assert callable(check)
    return check
