"""The patch codec (docs/protocol.md, "Patch values"): a presence mask and the present values.

For each field whose bit is set, in ascending ordinal order: a fixed-size field as in the fixed
zone; a variable field or array as u32 length + its data-zone bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from typing import Any

from .errors import InvalidData
from .rows import RowCodec

_U32 = struct.Struct("<I")


def mask_ordinals(mask: int) -> Iterator[int]:
    """The ordinals whose bits are set in `mask`, ascending."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def encode_patch(codec: RowCodec, values: Mapping[int, Any]) -> tuple[int, bytes]:
    """The (mask, values) of a patch that sets the given fields (by ordinal)."""
    mask = 0
    parts = []
    for ordinal in sorted(values):
        if not 0 <= ordinal < len(codec.fields):
            raise InvalidData(f"no field with ordinal {ordinal} (the kind has {len(codec.fields)})")
        mask |= 1 << ordinal
        parts.append(codec.encode_field(ordinal, values[ordinal]))
    return mask, b"".join(parts)


def parse_patch(codec: RowCodec, mask: int, values: bytes) -> list[tuple[int, bytes]]:
    """Split patch values into (ordinal, raw segment) pairs, checking their sizes and the mask.

    Segments are checked against the schema only once applied (see `apply_patch`).
    """
    fields = codec.fields
    if mask >> len(fields):
        raise InvalidData(
            f"patch mask 0x{mask:x} sets bit {mask.bit_length() - 1}; "
            f"the kind has {len(fields)} fields"
        )
    segments = []
    position = 0
    size = len(values)
    for ordinal in mask_ordinals(mask):
        f = fields[ordinal]
        if f.is_variable:
            if position + 4 > size:
                raise InvalidData(f"patch values end inside the length of field {f.name!r}")
            (length,) = _U32.unpack_from(values, position)
            position += 4
        else:
            length = f.fixed_size
        end = position + length
        if end > size:
            raise InvalidData(f"patch values end inside field {f.name!r}")
        segments.append((ordinal, values[position:end]))
        position = end
    if position != size:
        raise InvalidData(f"{size - position} bytes left over after the patched fields")
    return segments


def apply_patch(codec: RowCodec, row: bytes, mask: int, values: bytes) -> bytes:
    """The row that results from patching `row` (a valid row of `codec`); validated.

    A missing entity is patched from `codec.zero_row`.
    """
    segments = codec.split(row)
    for ordinal, segment in parse_patch(codec, mask, values):
        segments[ordinal] = segment
    patched = codec.join(segments)
    codec.validate(patched)
    return patched
