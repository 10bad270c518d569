"""The row check: whether raw row bytes are valid, the server's hottest path.

Two implementations give the same verdicts (the tests hold both, and `RowCodec`'s detailed
checks, to the same answers):

- **compiled** (`rowcheck.py`, built with mypyc by `make compile`): one compiled function walks
  a table of field checks made once per schema version (`row_checker`). It runs whenever its
  build matches its source (the guard below).
- **generated** (`compile_row_check`): one straight-line Python function per schema version,
  with the offsets and limits of the layout inlined: one `unpack_from` fetches every directory
  entry, bool byte and fixed-text length at once, then a few comparisons follow. Interpreted,
  this is the faster of the two, so it runs when the compiled check does not.

Both only answer valid / not valid; `RowCodec` explains a failure with its detailed (slower)
checks.

The guard: Python prefers a compiled module to its source, so a build left behind by an edit of
`rowcheck.py` would run old code. When this module is imported, the digest the build recorded
(`compiled.sha256`, beside it) is compared with the source as it is now; if they differ, the
source is loaded instead (then the generated check runs) with a warning naming
`make compile`. The row check is its own build unit, guarded here rather than by
`server/native.py`: the SDK validates rows too, without the server, and this package is
imported before the server's guard runs.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import struct
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Literal

from .errors import InvalidData
from .types import FIXED_TEXT_LENGTH_SIZE, Field, FieldType

COMPILED_MODULE: Final = "rowcheck"
"""The module `make compile` builds in this package (on its own, not in the server's group)."""
DIGEST_FILE: Final = Path(__file__).with_name("compiled.sha256")
"""Written by the build: the digest of the source of the compiled row check."""

State = Literal["compiled", "pure", "stale"]


def source_digest() -> str:
    """The digest of the compiled row check's source as it is now."""
    return hashlib.sha256(
        Path(__file__).with_name(f"{COMPILED_MODULE}.py").read_bytes()
    ).hexdigest()


def _guard() -> State:
    here = Path(__file__).parent
    built = any(
        (here / f"{COMPILED_MODULE}{suffix}").exists()
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )
    if not built:
        return "pure"
    recorded = DIGEST_FILE.read_text().strip() if DIGEST_FILE.exists() else ""
    if recorded == source_digest():
        return "compiled"
    warnings.warn(
        "the compiled row check was built from another source than this one: running the "
        "generated check instead (run `make compile` to rebuild it)",
        RuntimeWarning,
        stacklevel=2,
    )
    qualified = f"{__name__.rpartition('.')[0]}.{COMPILED_MODULE}"
    spec = importlib.util.spec_from_file_location(qualified, here / f"{COMPILED_MODULE}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    spec.loader.exec_module(module)
    return "stale"


state: Final[State] = _guard()
"""What checks rows: the compiled build, the generated check (no build), or the generated check
because the build is stale (`make compile` refreshes it)."""

from .rowcheck import (  # noqa: E402 (after the guard, which may load its source instead)
    FIXED_BOOL,
    FIXED_BYTES,
    FIXED_STRING,
    VARIABLE_ARRAY,
    VARIABLE_BYTES,
    VARIABLE_STRING,
    RowChecker,
)

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


def row_check(
    fields: Sequence[Field],
    offsets: Sequence[int],
    fixed_size: int,
    variable_checks: Sequence[RowCheck],
) -> Callable[[bytes], bool]:
    """The row check of `fields` that runs here: compiled if built, else generated."""
    if state == "compiled":
        return row_checker(fields, offsets, fixed_size).is_valid
    return compile_row_check(fields, offsets, fixed_size, variable_checks)


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


# --- the table of the compiled check (schema/rowcheck.py) ---------------------------------------


def row_checker(fields: Sequence[Field], offsets: Sequence[int], fixed_size: int) -> RowChecker:
    """The table-driven check of `fields` (see `rowcheck`): the same verdicts as
    `compile_row_check`, but data for one compiled function rather than generated code."""
    fixed: list[int] = []
    directory: list[int] = []
    variable: list[int] = []
    elements: list[list[int]] = []
    for f in fields:
        if not f.is_variable:
            _fixed_table(f, offsets[f.ordinal], fixed)
            continue
        directory.append(offsets[f.ordinal])
        if not f.array:
            kind = VARIABLE_STRING if f.type is FieldType.STRING else VARIABLE_BYTES
            variable += [kind, f.max_length, 0, -1]
            continue
        table: list[int] = []
        _fixed_table(f, 0, table)
        if table:
            elements.append(table)
        size = f.element_size
        variable += [VARIABLE_ARRAY, size * f.max_count, size, len(elements) - 1 if table else -1]
    return RowChecker(fixed_size, fixed, directory, variable, elements)


def _fixed_table(f: Field, offset: int, out: list[int]) -> None:
    """Append the fixed checks of one fixed-size value of `f` at `offset` (as `_fixed_value`)."""
    if f.type is FieldType.STRUCT:
        for sub in f.subfields:
            _fixed_table(sub, offset, out)
            offset += sub.element_size
    elif f.type is FieldType.BOOL:
        out += [FIXED_BOOL, offset, 0]
    elif f.type.is_text:
        out += [FIXED_STRING if f.type is FieldType.STRING else FIXED_BYTES, offset, f.max_length]
