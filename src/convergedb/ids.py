"""Entity ids: 32 bytes, built from an int, a UUID, a string or short raw bytes.

Shorter ids are zero-padded on the right to 32 bytes, so `id_from_bytes(b"abc")` and
`b"abc" + bytes(29)` name the same entity.
"""

from __future__ import annotations

import hashlib
import uuid

from .limits import ENTITY_ID_LENGTH

EntityId = bytes
"""An entity id: exactly 32 bytes."""

_U64_MAX = (1 << 64) - 1
_INT_PAD = bytes(ENTITY_ID_LENGTH - 8)
_UUID_PAD = bytes(ENTITY_ID_LENGTH - 16)


def id_from_int(value: int) -> EntityId:
    """The id of an integer key: the u64 little-endian, zero-padded."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"an int id must be an int, got {value!r}")
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"an int id must fit a u64 (0..{_U64_MAX}), got {value}")
    return value.to_bytes(8, "little") + _INT_PAD


def id_from_uuid(value: uuid.UUID) -> EntityId:
    """The id of a UUID: its 16 bytes, zero-padded."""
    return value.bytes + _UUID_PAD


def id_from_str(value: str) -> EntityId:
    """The id of a string key: the SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(value.encode()).digest()


def id_from_bytes(value: bytes | bytearray | memoryview) -> EntityId:
    """Raw bytes (at most 32) as an id, zero-padded on the right."""
    data = bytes(value)
    if len(data) > ENTITY_ID_LENGTH:
        raise ValueError(
            f"an entity id is at most {ENTITY_ID_LENGTH} bytes, got {len(data)}; "
            "hash longer keys with id_from_str"
        )
    return data + bytes(ENTITY_ID_LENGTH - len(data))


def entity_id(value: int | str | uuid.UUID | bytes | bytearray | memoryview) -> EntityId:
    """An id from any supported key: int (u64), str (SHA-256), UUID, or raw bytes (<= 32)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return id_from_int(value)
    if isinstance(value, str):
        return id_from_str(value)
    if isinstance(value, uuid.UUID):
        return id_from_uuid(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return id_from_bytes(value)
    raise TypeError(f"cannot make an entity id from {type(value).__name__}: {value!r}")


def id_to_int(eid: EntityId) -> int:
    """The integer of an id made by `id_from_int` (its first 8 bytes, little-endian)."""
    return int.from_bytes(eid[:8], "little")
