"""Frames: the 12-byte header, its CRC, and an incremental reader for a TCP byte stream.

offset 0  version     u8   1
       1  flags       u8
       2  stream_id   u16
       4  opcode      u16
       6  payload_len u32
      10  crc16       u16  CRC-16/XMODEM of bytes 0..9
"""

from __future__ import annotations

import struct
from binascii import crc_hqx
from typing import Final, NamedTuple, NoReturn

from ..limits import DEFAULT_MAX_PAYLOAD, HEADER_SIZE, MAX_PAYLOAD_CEILING, PROTOCOL_VERSION
from .codes import ErrorCode
from .errors import ProtocolError

HEADER: Final = struct.Struct("<BBHHIH")
"""The whole header: version, flags, stream_id, opcode, payload_len, crc16."""
_CRC_COVERED: Final = HEADER_SIZE - 2
"""The CRC covers header bytes 0..9."""
_HEADER_BODY: Final = struct.Struct("<BBHHI")

assert HEADER.size == HEADER_SIZE


def crc16_xmodem(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/XMODEM (poly 0x1021, init 0, no reflection, no final xor)."""
    return crc_hqx(data, 0)


def encode_header(opcode: int, stream_id: int, payload_len: int, flags: int = 0) -> bytes:
    """The 12-byte header of a frame, CRC included."""
    body = _HEADER_BODY.pack(PROTOCOL_VERSION, flags, stream_id, opcode, payload_len)
    return body + crc_hqx(body, 0).to_bytes(2, "little")


def encode_frame(
    opcode: int, stream_id: int, payload: bytes | bytearray | memoryview = b"", flags: int = 0
) -> bytes:
    """A whole frame: header followed by `payload`."""
    return encode_header(opcode, stream_id, len(payload), flags) + payload


class Frame(NamedTuple):
    """One received frame.

    `payload` is a read-only memoryview into an immutable chunk that was fed to the reader when
    the frame arrived within one chunk, or `bytes` when it had to be assembled from several.
    Either way it never changes. The opcode is not checked: unknown opcodes are the dispatcher's
    business.
    """

    flags: int
    stream_id: int
    opcode: int
    payload: memoryview | bytes


class _PendingHeader(NamedTuple):
    flags: int
    stream_id: int
    opcode: int
    payload_len: int


class FrameReader:
    """Splits a byte stream into frames, whatever the chunk boundaries.

    `feed()` takes each chunk as it comes off the socket and returns the frames it completes.
    Header checks run as soon as the 12 header bytes are in, in the protocol's order, the first
    failure winning: CRC (BAD_FRAME), version (UNSUPPORTED_VERSION), payload size
    (PAYLOAD_TOO_LARGE, raised before any of the payload arrives).

    A raised `ProtocolError` is final: the connection must be closed, and every later `feed()`
    raises the same error again. The frames that chunk completed before the bad header are
    valid and came first: `frames_before_failure()` gives them, so that they are handled
    before the error is reported, whatever the chunk boundaries.

    Cost: frames inside one chunk are sliced out of it without copying. A frame split over
    several chunks keeps references to its pieces and joins them once, when it is complete, so
    each byte is copied at most once however small the chunks are.
    """

    __slots__ = (
        "_before_failure",
        "_chunks",
        "_failed",
        "_have",
        "_head",
        "_max_payload",
        "_pending",
    )

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        if not 0 <= max_payload <= MAX_PAYLOAD_CEILING:
            raise ValueError(f"max_payload must be 0..{MAX_PAYLOAD_CEILING}, got {max_payload}")
        self._max_payload = max_payload
        self._head = bytearray()
        """The first bytes of a header that has not arrived whole (fewer than 12)."""
        self._pending: _PendingHeader | None = None
        """The checked header of a frame whose payload is still arriving."""
        self._chunks: list[memoryview] = []
        """The pieces of that payload received so far, views of immutable chunks."""
        self._have = 0
        self._failed: ProtocolError | None = None
        self._before_failure: list[Frame] = []

    @property
    def max_payload(self) -> int:
        """The largest payload accepted."""
        return self._max_payload

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._head) + (HEADER_SIZE + self._have if self._pending else 0)

    def feed(self, data: bytes) -> list[Frame]:
        """Take the next chunk of the stream; return the frames it completes, in order.

        Raises `ProtocolError` (BAD_FRAME, UNSUPPORTED_VERSION, PAYLOAD_TOO_LARGE) on a bad header;
        the reader is then unusable. A chunk that is not `bytes` is copied first, so that the
        returned payloads never change.
        """
        if self._failed is not None:
            raise self._failed
        if type(data) is not bytes:
            data = bytes(data)
        view = memoryview(data)
        frames: list[Frame] = []
        try:
            pos = 0
            if self._head:
                pos = self._complete_header(view)
                if self._pending is None:
                    return frames
            if self._pending is not None:
                pos = self._complete_payload(view, pos, frames)
                if self._awaiting_payload():
                    return frames
            self._split(view, pos, frames)
        except ProtocolError:
            self._before_failure = frames
            raise
        return frames

    def frames_before_failure(self) -> list[Frame]:
        """The frames the failing `feed()` completed before the bad header, in order (each
        given once). They are valid: handle them, then report the error."""
        frames, self._before_failure = self._before_failure, []
        return frames

    # --- internals ----------------------------------------------------------------------------

    def _awaiting_payload(self) -> bool:
        # a method, not `self._pending is not None` inline: mypy keeps the narrowing of an
        # attribute across the call that may reset it, and mypyc (tried on this module, see
        # docs/performance.md) compiles that stale narrowing into a failing type check
        return self._pending is not None

    def _split(self, view: memoryview, pos: int, frames: list[Frame]) -> None:
        """Slice whole frames out of `view` from `pos`; keep the incomplete rest."""
        end = len(view)
        while end - pos >= HEADER_SIZE:
            header = self._check_header(view, pos)
            start = pos + HEADER_SIZE
            stop = start + header.payload_len
            if stop > end:
                self._pending = header
                if start < end:
                    self._chunks.append(view[start:])
                    self._have = end - start
                return
            frames.append(Frame(header.flags, header.stream_id, header.opcode, view[start:stop]))
            pos = stop
        if pos < end:
            self._head += view[pos:]

    def _complete_header(self, view: memoryview) -> int:
        """Add bytes to a partial header; check it once whole. Return the bytes consumed."""
        take = min(HEADER_SIZE - len(self._head), len(view))
        self._head += view[:take]
        if len(self._head) == HEADER_SIZE:
            self._pending = self._check_header(self._head, 0)
            self._head.clear()
        return take

    def _complete_payload(self, view: memoryview, pos: int, frames: list[Frame]) -> int:
        """Add bytes to the pending payload; emit the frame once whole. Return the new position."""
        pending = self._pending
        assert pending is not None
        take = min(pending.payload_len - self._have, len(view) - pos)
        if take:
            self._chunks.append(view[pos : pos + take])
            self._have += take
            pos += take
        if self._have == pending.payload_len:
            chunks = self._chunks
            payload: memoryview | bytes = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            frames.append(Frame(pending.flags, pending.stream_id, pending.opcode, payload))
            self._pending = None
            self._chunks = []
            self._have = 0
        return pos

    def _check_header(self, buf: memoryview | bytearray, pos: int) -> _PendingHeader:
        version, flags, stream_id, opcode, payload_len, crc = HEADER.unpack_from(buf, pos)
        if crc_hqx(buf[pos : pos + _CRC_COVERED], 0) != crc:
            self._fail(ErrorCode.BAD_FRAME, f"header CRC mismatch (received 0x{crc:04x})")
        if version != PROTOCOL_VERSION:
            self._fail(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {version} is not supported (this server speaks "
                f"{PROTOCOL_VERSION})",
            )
        if payload_len > self._max_payload:
            self._fail(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"payload of {payload_len} bytes is above the maximum of {self._max_payload}",
                opcode,
            )
        return _PendingHeader(flags, stream_id, opcode, payload_len)

    def _fail(self, code: ErrorCode, message: str, op: int = 0) -> NoReturn:
        self._failed = ProtocolError(code, message, op)
        self._head.clear()
        self._chunks = []
        raise self._failed
