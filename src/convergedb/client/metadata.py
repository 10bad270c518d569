"""Key/value metadata: build and read the opaque `meta` bytes of writes, notifications and events.

The server never looks inside metadata; this module is the SDK's convention for putting string
key/value pairs in it, so that writers and subscribers written in any language agree:

    meta = encode_metadata({"actor": "player:ana", "action": "trade"})
    await players.patch(pid, {"gold": 10}, meta=meta)
    ...
    decode_metadata(change.meta)  # {"actor": "player:ana", "action": "trade"}

The format is described in the docstring of `encode_metadata`, which is what the API reference
shows.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Final

from ..limits import MAX_METADATA_LENGTH

_U16: Final = struct.Struct("<H")
_MAX_U16: Final = 0xFFFF


class MetadataError(ValueError):
    """Metadata that cannot be encoded (too large, not strings) or that is not in the key/value
    format when decoded."""


def encode_metadata(pairs: Mapping[str, str]) -> bytes:
    """Encode string key/value pairs as the `meta` bytes of a write.

    The server never looks inside metadata; this is the SDK's convention for putting string
    key/value pairs in it, so that writers and subscribers written in any language agree.

    **The format**, for other languages: all integers are little-endian. The bytes are a `u16`
    pair count, then for each pair the key and then the value, each as a `u16` byte length
    followed by that many bytes of UTF-8. Keys are unique within one blob; order is kept as
    written. The whole blob is at most 65,535 bytes (the protocol's metadata limit). An empty
    blob (no bytes at all) is the empty mapping, and it is what `encode_metadata({})` returns,
    so writes without metadata stay without it. Anything else (bytes left over after the last
    pair, a length that runs past the end, invalid UTF-8, a repeated key) is not key/value
    metadata.

    Args:
        pairs: Keys to values, all `str`.

    Returns:
        The metadata bytes (empty for no pairs).

    Raises:
        MetadataError: A key or value is not a `str`, or the result would exceed 65,535 bytes.

    Example:
        ```python
        meta = cdb.encode_metadata({"actor": "player:ana", "action": "trade"})
        await players.patch(pid, {"gold": 10}, meta=meta)
        # a subscriber: change.metadata() == {"actor": "player:ana", "action": "trade"}
        ```
    """
    if not pairs:
        return b""
    if len(pairs) > _MAX_U16:
        raise MetadataError(f"metadata holds at most {_MAX_U16} pairs, got {len(pairs)}")
    parts = [_U16.pack(len(pairs))]
    size = _U16.size
    for key, value in pairs.items():
        for what, text in (("key", key), ("value", value)):
            encoded = _utf8(what, key, text)
            parts += (_U16.pack(len(encoded)), encoded)
            size += _U16.size + len(encoded)
        if size > MAX_METADATA_LENGTH:
            raise MetadataError(_too_large(size, key))
    return b"".join(parts)


def decode_metadata(meta: bytes | bytearray | memoryview) -> dict[str, str]:
    """Decode metadata bytes built by `encode_metadata` (or in the same format).

    Args:
        meta: The metadata bytes, e.g. `Change.meta` or `EventItem.meta`.

    Returns:
        The key/value pairs, in the order written; empty bytes give an empty dict.

    Raises:
        MetadataError: The bytes are not in the format (e.g. metadata some writer set as free
            text); the message names the problem and its byte offset.

    Example:
        ```python
        assert cdb.decode_metadata(cdb.encode_metadata({"a": "1"})) == {"a": "1"}
        ```
    """
    data = bytes(meta)
    if not data:
        return {}
    if len(data) > MAX_METADATA_LENGTH:
        raise MetadataError(
            f"metadata is {len(data)} bytes, above the limit of {MAX_METADATA_LENGTH} bytes"
        )
    count, position = _read_u16(data, 0, "the pair count")
    pairs: dict[str, str] = {}
    for index in range(count):
        key, position = _read_str16(data, position, f"the key of pair {index}")
        value, position = _read_str16(data, position, f"the value of pair {key!r}")
        if key in pairs:
            raise MetadataError(f"metadata repeats the key {key!r}")
        pairs[key] = value
    if position != len(data):
        raise MetadataError(
            f"metadata has {len(data) - position} bytes left over after its {count} pairs "
            f"(at offset {position}): it is not key/value metadata"
        )
    return pairs


def is_metadata(meta: bytes | bytearray | memoryview) -> bool:
    """Whether the bytes are key/value metadata that `decode_metadata` accepts.

    Args:
        meta: The metadata bytes.

    Returns:
        True when `decode_metadata` would decode them (empty bytes included).
    """
    try:
        decode_metadata(meta)
    except MetadataError:
        return False
    return True


def _utf8(what: str, key: object, text: object) -> bytes:
    if not isinstance(text, str):
        owner = "" if what == "key" else f" of key {key!r}"
        raise MetadataError(f"metadata {what}s must be str, got {type(text).__name__}{owner}")
    encoded = text.encode()
    if len(encoded) > MAX_METADATA_LENGTH:
        raise MetadataError(_too_large(len(encoded), key if what == "value" else text))
    return encoded


def _too_large(size: int, key: object) -> str:
    return (
        f"metadata would be at least {size} bytes (at key {key!r}), above the limit of "
        f"{MAX_METADATA_LENGTH} bytes: keep metadata to short descriptions of why a write happened"
    )


def _read_u16(data: bytes, position: int, what: str) -> tuple[int, int]:
    end = position + _U16.size
    if end > len(data):
        raise MetadataError(
            f"metadata ends inside {what} (offset {position}, {len(data)} bytes in all)"
        )
    return _U16.unpack_from(data, position)[0], end


def _read_str16(data: bytes, position: int, what: str) -> tuple[str, int]:
    length, start = _read_u16(data, position, f"the length of {what}")
    end = start + length
    if end > len(data):
        raise MetadataError(
            f"metadata ends inside {what}: {length} bytes announced at offset {position}, "
            f"{len(data) - start} left"
        )
    try:
        return data[start:end].decode(), end
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{what} is not valid UTF-8 (at offset {start}): {exc}") from None
