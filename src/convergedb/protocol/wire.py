"""The building blocks of payloads (docs/protocol.md, "Building blocks").

Decoding goes through `Reader`, a cursor over one payload that raises `ProtocolError(MALFORMED)`
naming what it was reading whenever the payload ends too early. Encoding goes through the `pack_*`
helpers, which refuse values that break a limit with `EncodeError` (a `ValueError`).

    str16  = u16 byte length + UTF-8 bytes
    bytes32 = u32 byte length + bytes
    eid    = 32 raw bytes
    meta   = optional tail: u16 length + bytes; a payload that ends before it means b""

Encoders always write the meta length, even when it is 0; decoders accept it absent.
"""

from __future__ import annotations

import struct
from typing import Final

from ..limits import ENTITY_ID_LENGTH, MAX_METADATA_LENGTH
from .codes import Opcode
from .errors import ProtocolError, malformed

BytesLike = bytes | bytearray | memoryview
"""What the decoders accept as a payload."""

U8: Final = struct.Struct("<B")
U16: Final = struct.Struct("<H")
U32: Final = struct.Struct("<I")
U64: Final = struct.Struct("<Q")

MAX_U16: Final = 0xFFFF
MAX_U32: Final = 0xFFFF_FFFF
MAX_STR16_LENGTH: Final = MAX_U16
"""The largest UTF-8 encoding a str16 can carry."""
MAX_BYTES32_LENGTH: Final = MAX_U32

EMPTY_META: Final = b"\x00\x00"
"""The encoding of an empty metadata tail."""


class EncodeError(ValueError):
    """A value cannot be encoded: it breaks a limit of the wire format."""


def op_name(op: int) -> str:
    """A readable name of an opcode for messages: `ASSERT`, or `0x4242` when it is not defined."""
    try:
        return Opcode(op).name
    except ValueError:
        return f"0x{op:02x}"


class Reader:
    """A cursor over one payload (or one BATCH sub-operation body).

    Every read advances the cursor; a read past the end raises `ProtocolError` with code
    MALFORMED and `op` set to the opcode given at construction. `what` arguments name the field
    being read, for the error message.
    """

    __slots__ = ("_len", "buf", "op", "pos")

    def __init__(self, buf: BytesLike, op: int = 0, pos: int = 0) -> None:
        self.buf: bytes | memoryview = memoryview(buf) if isinstance(buf, bytearray) else buf
        self.op = op
        self.pos = pos
        self._len = len(buf)

    # --- errors -------------------------------------------------------------------------------

    def error(self, message: str) -> ProtocolError:
        """A MALFORMED error about this payload, prefixed with its opcode name."""
        return malformed(f"{op_name(self.op)}: {message}", self.op)

    def _truncated(self, what: str, size: int) -> ProtocolError:
        left = self._len - self.pos
        return self.error(
            f"payload ends while reading {what} ({size} bytes needed at offset {self.pos}, "
            f"{left} left)"
        )

    # --- integers -----------------------------------------------------------------------------

    def u8(self, what: str = "u8") -> int:
        """Read an unsigned byte."""
        pos = self.pos
        if pos >= self._len:
            raise self._truncated(what, 1)
        self.pos = pos + 1
        value: int = self.buf[pos]
        return value

    def u16(self, what: str = "u16") -> int:
        """Read a little-endian u16."""
        pos = self.pos
        try:
            (value,) = U16.unpack_from(self.buf, pos)
        except struct.error:
            raise self._truncated(what, 2) from None
        self.pos = pos + 2
        result: int = value
        return result

    def u32(self, what: str = "u32") -> int:
        """Read a little-endian u32."""
        pos = self.pos
        try:
            (value,) = U32.unpack_from(self.buf, pos)
        except struct.error:
            raise self._truncated(what, 4) from None
        self.pos = pos + 4
        result: int = value
        return result

    def u64(self, what: str = "u64") -> int:
        """Read a little-endian u64."""
        pos = self.pos
        try:
            (value,) = U64.unpack_from(self.buf, pos)
        except struct.error:
            raise self._truncated(what, 8) from None
        self.pos = pos + 8
        result: int = value
        return result

    # --- byte strings -------------------------------------------------------------------------

    def raw(self, size: int, what: str = "bytes") -> bytes:
        """Read exactly `size` bytes, as an immutable copy."""
        pos = self.pos
        end = pos + size
        if end > self._len:
            raise self._truncated(what, size)
        self.pos = end
        return bytes(self.buf[pos:end])

    def eid(self, what: str = "eid") -> bytes:
        """Read a 32-byte entity id."""
        return self.raw(ENTITY_ID_LENGTH, what)

    def bytes16(self, what: str = "bytes16") -> bytes:
        """Read a u16 length followed by that many bytes."""
        size = self.u16(f"{what} length")
        return self.raw(size, what)

    def bytes32(self, what: str = "bytes32") -> bytes:
        """Read a u32 length followed by that many bytes."""
        size = self.u32(f"{what} length")
        return self.raw(size, what)

    def str16(self, what: str = "str16") -> str:
        """Read a u16 length followed by that many bytes of UTF-8; invalid UTF-8 is MALFORMED."""
        size = self.u16(f"{what} length")
        pos = self.pos
        end = pos + size
        if end > self._len:
            raise self._truncated(what, size)
        self.pos = end
        try:
            return str(self.buf[pos:end], "utf-8")
        except UnicodeDecodeError as exc:
            raise self.error(f"{what} is not valid UTF-8 ({exc.reason})") from None

    def meta(self, what: str = "meta") -> bytes:
        """Read the optional metadata tail: b"" when the payload ends here."""
        if self.pos == self._len:
            return b""
        return self.bytes16(what)

    # --- position -----------------------------------------------------------------------------

    def remaining(self) -> int:
        """Bytes not read yet."""
        return self._len - self.pos

    def at_end(self) -> bool:
        """Whether every byte has been read."""
        return self.pos >= self._len

    def expect_end(self) -> None:
        """Raise MALFORMED if bytes are left over after the last field."""
        left = self._len - self.pos
        if left:
            raise self.error(f"{left} bytes left over after the last field")


# --- encoders ---------------------------------------------------------------------------------


def check_eid(eid: bytes) -> bytes:
    """Return `eid` if it is exactly 32 bytes, else raise `EncodeError`."""
    if len(eid) != ENTITY_ID_LENGTH:
        raise EncodeError(f"an entity id is exactly {ENTITY_ID_LENGTH} bytes, got {len(eid)}")
    return eid


def pack_str16(text: str, what: str = "string") -> bytes:
    """Encode `text` as a str16: u16 byte length + UTF-8."""
    data = text.encode("utf-8")
    if len(data) > MAX_STR16_LENGTH:
        raise EncodeError(
            f"{what} is {len(data)} bytes of UTF-8, above the str16 limit of {MAX_STR16_LENGTH}"
        )
    return U16.pack(len(data)) + data


def pack_bytes16(data: BytesLike, what: str = "bytes") -> bytes:
    """Encode `data` as u16 length + bytes."""
    if len(data) > MAX_U16:
        raise EncodeError(f"{what} is {len(data)} bytes, above the u16 length limit of {MAX_U16}")
    return U16.pack(len(data)) + data


def pack_bytes32(data: BytesLike, what: str = "bytes") -> bytes:
    """Encode `data` as a bytes32: u32 length + bytes."""
    if len(data) > MAX_BYTES32_LENGTH:
        raise EncodeError(f"{what} is {len(data)} bytes, above the u32 length limit")
    return U32.pack(len(data)) + data


def pack_meta(meta: BytesLike) -> bytes:
    """Encode a metadata tail. The length is always written, even for empty metadata."""
    if not meta:
        return EMPTY_META
    if len(meta) > MAX_METADATA_LENGTH:
        raise EncodeError(
            f"metadata is {len(meta)} bytes, above the limit of {MAX_METADATA_LENGTH}"
        )
    return U16.pack(len(meta)) + meta
