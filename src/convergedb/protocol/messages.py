"""One class per message of the wire protocol, both directions (docs/protocol.md).

Each class is a frozen dataclass whose fields follow the protocol table, with

- `OPCODE`: its opcode,
- `encode() -> bytes`: the payload (not the frame; see `encode_message`),
- `decode(payload)`: the inverse, consuming the whole payload.

Decoding errors are `ProtocolError` with code MALFORMED (INVALID_SCHEMA for a kind definition that
breaks a rule or ends early) and `op` set to the opcode. Bytes left over are MALFORMED, except that
write operations and notifications may end before their metadata tail (meaning no metadata).
Enumerated fields decode into their `IntEnum`; an undefined value is MALFORMED — except the code of
an ERROR, which stays a plain int when this side does not know it (a newer server may send codes an
older client has never heard of). Encoders refuse values that break a limit with `EncodeError`
(a `ValueError`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Final, Self, TypeVar

from .._frozen import frozen_constructor
from ..limits import (
    DEFAULT_HEARTBEAT_INTERVAL_MS,
    DEFAULT_LIVENESS_DEADLINE_MS,
    MAX_METADATA_LENGTH,
)
from ..schema.definition import decode_kind_definition, encode_kind_definition
from ..schema.errors import InvalidSchema
from ..schema.types import KindDef
from .codes import (
    BootstrapMode,
    ChangeType,
    ConnectMode,
    DeleteCause,
    ErrorCode,
    EventCause,
    Opcode,
    QueryStatus,
    SubscribeFlags,
)
from .errors import ProtocolError, malformed
from .frame import encode_frame, encode_header
from .wire import (
    U16,
    U32,
    U64,
    BytesLike,
    EncodeError,
    Reader,
    check_eid,
    op_name,
    pack_bytes32,
    pack_meta,
    pack_str16,
)

# --- shared helpers ---------------------------------------------------------------------------

_E = TypeVar("_E", bound=IntEnum)


def _members(enum: type[_E]) -> dict[int, _E]:
    return {member.value: member for member in enum}


_CONNECT_MODES: Final = _members(ConnectMode)
_CHANGE_TYPES: Final = _members(ChangeType)
_DELETE_CAUSES: Final = _members(DeleteCause)
_EVENT_CAUSES: Final = _members(EventCause)
_QUERY_STATUSES: Final = _members(QueryStatus)
_BOOTSTRAP_MODES: Final = _members(BootstrapMode)
_ERROR_CODES: Final = _members(ErrorCode)
_EVENT_OPS: Final = {op.value: op for op in (Opcode.ASSERT, Opcode.RETRACT, Opcode.PATCH)}
_SUBSCRIBE_FLAG_BITS: Final = int(
    SubscribeFlags.BOOTSTRAP | SubscribeFlags.INCLUDE_PREVIOUS | SubscribeFlags.RESUME
)


def _member(table: dict[int, _E], value: int, what: str, op: int) -> _E:
    """The enum member for `value`, or MALFORMED when it is not defined."""
    member = table.get(value)
    if member is None:
        raise malformed(f"{op_name(op)}: undefined {what} {value}", op)
    return member


def _truncated(op: int, what: str, pos: int, size: int, length: int) -> ProtocolError:
    return malformed(
        f"{op_name(op)}: payload ends while reading {what} ({size} bytes needed at offset {pos}, "
        f"{max(length - pos, 0)} left)",
        op,
    )


def _unpack_head(head: struct.Struct, payload: BytesLike, op: int, what: str) -> tuple[Any, ...]:
    """Unpack the fixed-size start of a payload in one go."""
    try:
        return head.unpack_from(payload, 0)
    except struct.error:
        raise _truncated(op, what, 0, head.size, len(payload)) from None


def _as_bytes(payload: BytesLike) -> bytes:
    """The payload as `bytes` (itself if it is), to slice copies out of."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, memoryview):
        return payload.tobytes()
    return bytes(payload)


def _blob(payload: BytesLike, pos: int, size: int, op: int, what: str) -> bytes:
    """The `size` bytes at `pos`, copied; MALFORMED when the payload is shorter."""
    end = pos + size
    if end > len(payload):
        raise _truncated(op, what, pos, size, len(payload))
    return bytes(payload[pos:end])


def _meta_tail(payload: BytesLike, pos: int, op: int, length: int | None = None) -> bytes:
    """The optional metadata tail at `pos`, which must end the payload exactly (or at `length`,
    when the message is a part of `payload`)."""
    if length is None:
        length = len(payload)
    if pos == length:
        return b""
    try:
        (size,) = U16.unpack_from(payload, pos)
    except struct.error:
        raise _truncated(op, "meta length", pos, 2, length) from None
    end = pos + 2 + size
    if end != length:
        if end > length:
            raise _truncated(op, "meta", pos + 2, size, length)
        raise malformed(f"{op_name(op)}: {length - end} bytes left over after meta", op)
    return bytes(payload[pos + 2 : end]) if size else b""


def _check_meta(meta: BytesLike) -> None:
    if len(meta) > MAX_METADATA_LENGTH:
        raise EncodeError(
            f"metadata is {len(meta)} bytes, above the limit of {MAX_METADATA_LENGTH}"
        )


def _expect_empty(payload: BytesLike, op: int) -> None:
    if len(payload):
        raise malformed(f"{op_name(op)}: payload must be empty, got {len(payload)} bytes", op)


def _read_kind(r: Reader) -> KindDef:
    """A kind definition at the reader's position; rule breaks and truncation are INVALID_SCHEMA."""
    try:
        kind, r.pos = decode_kind_definition(r.buf, r.pos)
    except InvalidSchema as exc:
        raise ProtocolError(ErrorCode.INVALID_SCHEMA, f"{op_name(r.op)}: {exc}", r.op) from None
    return kind


# --- base -------------------------------------------------------------------------------------


class Message:
    """Base of every message class."""

    __slots__ = ()
    OPCODE: ClassVar[Opcode]

    def encode(self) -> bytes:
        """The payload of this message. Raises `EncodeError` for a value that breaks a limit."""
        try:
            return self._encode()
        except struct.error as exc:
            raise EncodeError(f"{self.OPCODE.name}: a field is out of range ({exc})") from None

    def _encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        """Decode a whole payload; raise `ProtocolError` if it does not parse."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class _Empty(Message):
    """A message with an empty payload."""

    def _encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        _expect_empty(payload, cls.OPCODE)
        return cls()


# --- client -> server -------------------------------------------------------------------------

_CONNECT_HEAD: Final = struct.Struct("<BBII")


@dataclass(frozen=True, slots=True)
class Connect(Message):
    """CONNECT: open a session as a writer (claiming or allocating a source) or read-only."""

    OPCODE: ClassVar[Opcode] = Opcode.CONNECT
    mode: ConnectMode
    source_id: int = 0
    liveness_deadline_ms: int = DEFAULT_LIVENESS_DEADLINE_MS
    heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS
    name: str = ""
    auth_token: str = ""

    def _encode(self) -> bytes:
        return b"".join(
            (
                _CONNECT_HEAD.pack(
                    self.mode,
                    self.source_id,
                    self.liveness_deadline_ms,
                    self.heartbeat_interval_ms,
                ),
                pack_str16(self.name, "name"),
                pack_str16(self.auth_token, "auth_token"),
            )
        )

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.CONNECT)
        mode = _member(_CONNECT_MODES, r.u8("mode"), "CONNECT mode", r.op)
        msg = cls(
            mode,
            r.u8("source_id"),
            r.u32("liveness_deadline_ms"),
            r.u32("heartbeat_interval_ms"),
            r.str16("name"),
            r.str16("auth_token"),
        )
        r.expect_end()
        return msg


_ASSERT_HEAD: Final = struct.Struct("<H32sI")
"""kind_id, eid, data length."""
_ASSERT_SIZE: Final = _ASSERT_HEAD.size
_ASSERT: Final = int(Opcode.ASSERT)


@dataclass(frozen=True, slots=True)
class Assert(Message):
    """ASSERT: this source says the entity exists with exactly this row."""

    OPCODE: ClassVar[Opcode] = Opcode.ASSERT
    kind_id: int
    eid: bytes
    data: bytes
    meta: bytes = b""

    def _encode(self) -> bytes:
        check_eid(self.eid)
        meta = self.meta
        _check_meta(meta)
        data = self.data
        head = _ASSERT_HEAD.pack(self.kind_id, self.eid, len(data))
        return b"".join((head, data, U16.pack(len(meta)), meta))

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        return cls(*parse_assert(payload))


def parse_assert(
    payload: BytesLike, start: int = 0, end: int | None = None
) -> tuple[int, bytes, bytes, bytes]:
    """(kind_id, eid, data, meta) of the ASSERT payload in `payload[start:end]`, without
    building a message object or slicing the buffer (the server's hot path, also used for the
    sub-operations of a BATCH; `Assert.decode` uses it too)."""
    if end is None:
        end = len(payload)
    if end - start < _ASSERT_SIZE:
        raise _truncated(_ASSERT, "kind_id, eid, data length", 0, _ASSERT_SIZE, end - start)
    kind_id, eid, size = _ASSERT_HEAD.unpack_from(payload, start)
    data_start = start + _ASSERT_SIZE
    data_end = data_start + size
    if data_end > end:
        raise _truncated(_ASSERT, "data", _ASSERT_SIZE, size, end - start)
    data = bytes(payload[data_start:data_end])
    if data_end == end:
        return kind_id, eid, data, b""
    return kind_id, eid, data, _meta_tail(payload, data_end, _ASSERT, end)


_RETRACT_HEAD: Final = struct.Struct("<H32s")
"""kind_id, eid."""
_RETRACT_SIZE: Final = _RETRACT_HEAD.size
_RETRACT: Final = int(Opcode.RETRACT)


@dataclass(frozen=True, slots=True)
class Retract(Message):
    """RETRACT: this source no longer asserts the entity."""

    OPCODE: ClassVar[Opcode] = Opcode.RETRACT
    kind_id: int
    eid: bytes
    meta: bytes = b""

    def _encode(self) -> bytes:
        check_eid(self.eid)
        meta = self.meta
        _check_meta(meta)
        return b"".join((_RETRACT_HEAD.pack(self.kind_id, self.eid), U16.pack(len(meta)), meta))

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        return cls(*parse_retract(payload))


def parse_retract(
    payload: BytesLike, start: int = 0, end: int | None = None
) -> tuple[int, bytes, bytes]:
    """(kind_id, eid, meta) of the RETRACT payload in `payload[start:end]` (see
    `parse_assert`)."""
    if end is None:
        end = len(payload)
    if end - start < _RETRACT_SIZE:
        raise _truncated(_RETRACT, "kind_id, eid", 0, _RETRACT_SIZE, end - start)
    kind_id, eid = _RETRACT_HEAD.unpack_from(payload, start)
    return kind_id, eid, _meta_tail(payload, start + _RETRACT_SIZE, _RETRACT, end)


QUERY_BODY: Final = struct.Struct("<H32s")
"""The whole payload of a QUERY: kind id, entity id (the server's read path unpacks it)."""


@dataclass(frozen=True, slots=True)
class Query(Message):
    """QUERY: a point read of one entity."""

    OPCODE: ClassVar[Opcode] = Opcode.QUERY
    kind_id: int
    eid: bytes

    def _encode(self) -> bytes:
        return QUERY_BODY.pack(self.kind_id, check_eid(self.eid))

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.QUERY)
        msg = cls(r.u16("kind_id"), r.eid())
        r.expect_end()
        return msg


_SUBSCRIBE: Final = struct.Struct("<HBQ")


@dataclass(frozen=True, slots=True)
class Subscribe(Message):
    """SUBSCRIBE: live notifications of a kind; the stream id becomes the subscription id."""

    OPCODE: ClassVar[Opcode] = Opcode.SUBSCRIBE
    kind_id: int
    flags: SubscribeFlags = SubscribeFlags.NONE
    since_seq: int = 0

    def _encode(self) -> bytes:
        return _SUBSCRIBE.pack(self.kind_id, self.flags, self.since_seq)

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.SUBSCRIBE)
        kind_id = r.u16("kind_id")
        flags = r.u8("flags")
        if flags & ~_SUBSCRIBE_FLAG_BITS:
            raise r.error(f"undefined SUBSCRIBE flag bits 0x{flags & ~_SUBSCRIBE_FLAG_BITS:02x}")
        msg = cls(kind_id, SubscribeFlags(flags), r.u64("since_seq"))
        r.expect_end()
        return msg


@dataclass(frozen=True, slots=True)
class Unsubscribe(Message):
    """UNSUBSCRIBE: end a state or event subscription of this connection."""

    OPCODE: ClassVar[Opcode] = Opcode.UNSUBSCRIBE
    subscription_id: int

    def _encode(self) -> bytes:
        return U16.pack(self.subscription_id)

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.UNSUBSCRIBE)
        msg = cls(r.u16("subscription_id"))
        r.expect_end()
        return msg


@dataclass(frozen=True, slots=True)
class Heartbeat(_Empty):
    """HEARTBEAT: a sign of life; answered with PONG on a non-zero stream."""

    OPCODE: ClassVar[Opcode] = Opcode.HEARTBEAT


_PATCH_HEAD: Final = struct.Struct("<H32sQI")
"""kind_id, eid, mask, values length."""
_PATCH_SIZE: Final = _PATCH_HEAD.size
_PATCH: Final = int(Opcode.PATCH)


@dataclass(frozen=True, slots=True)
class Patch(Message):
    """PATCH: set the fields in `mask` to `values`, leaving the others as stored."""

    OPCODE: ClassVar[Opcode] = Opcode.PATCH
    kind_id: int
    eid: bytes
    mask: int
    values: bytes
    meta: bytes = b""

    def _encode(self) -> bytes:
        check_eid(self.eid)
        meta = self.meta
        _check_meta(meta)
        values = self.values
        head = _PATCH_HEAD.pack(self.kind_id, self.eid, self.mask, len(values))
        return b"".join((head, values, U16.pack(len(meta)), meta))

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        return cls(*parse_patch(payload))


def parse_patch(
    payload: BytesLike, start: int = 0, end: int | None = None
) -> tuple[int, bytes, int, bytes, bytes]:
    """(kind_id, eid, mask, values, meta) of the PATCH payload in `payload[start:end]` (see
    `parse_assert`)."""
    if end is None:
        end = len(payload)
    if end - start < _PATCH_SIZE:
        raise _truncated(_PATCH, "kind_id, eid, mask, values length", 0, _PATCH_SIZE, end - start)
    kind_id, eid, mask, size = _PATCH_HEAD.unpack_from(payload, start)
    values_start = start + _PATCH_SIZE
    values_end = values_start + size
    if values_end > end:
        raise _truncated(_PATCH, "values", _PATCH_SIZE, size, end - start)
    values = bytes(payload[values_start:values_end])
    return kind_id, eid, mask, values, _meta_tail(payload, values_end, _PATCH, end)


@dataclass(frozen=True, slots=True)
class EpochBegin(_Empty):
    """SOURCE_EPOCH_BEGIN: record the baseline of this source's entities."""

    OPCODE: ClassVar[Opcode] = Opcode.SOURCE_EPOCH_BEGIN


@dataclass(frozen=True, slots=True)
class EpochEnd(_Empty):
    """SOURCE_EPOCH_END: retract every baseline entity not re-asserted during the epoch."""

    OPCODE: ClassVar[Opcode] = Opcode.SOURCE_EPOCH_END


WriteOp = Assert | Retract | Patch
"""The operations a BATCH may carry."""

_WRITE_CLASSES: Final[dict[int, type[Assert] | type[Retract] | type[Patch]]] = {
    Opcode.ASSERT: Assert,
    Opcode.RETRACT: Retract,
    Opcode.PATCH: Patch,
}
_BATCH_OP_HEAD: Final = struct.Struct("<BI")
BATCH_COUNT_SIZE: Final = 4
BATCH_ASSERT_HEAD: Final = struct.Struct("<BIH32sI")
"""A BATCH sub-operation's header (op, body_len) and, if it is an ASSERT, the fixed head of its
body (kind_id, eid, data length) in one unpack: the server's BATCH fast path."""
"""op u8, body_len u32."""


def iter_batch_spans(payload: BytesLike) -> Iterator[tuple[int, int, int]]:
    """Yield each sub-operation of a BATCH payload as (op, start, end): its body is
    `payload[start:end]`. In order, without decoding or copying anything.

    The op code is not checked (an unknown one is the caller's to reject alone). A generator, so
    that the caller applies the sub-operations before a bad part: it raises MALFORMED with `op`
    0x0B when the count field is missing, when a header or `body_len` overruns the frame (the
    rest of the batch is lost), or when bytes are left over after `count` sub-operations.
    """
    return batch_spans_from(payload, batch_count(payload), 0, BATCH_COUNT_SIZE)


def batch_count(payload: BytesLike) -> int:
    """The `count` field of a BATCH payload (MALFORMED if the payload is shorter)."""
    if len(payload) < BATCH_COUNT_SIZE:
        raise _truncated(Opcode.BATCH, "count", 0, BATCH_COUNT_SIZE, len(payload))
    return int(U32.unpack_from(payload, 0)[0])


def batch_spans_from(
    payload: BytesLike, count: int, first: int, pos: int
) -> Iterator[tuple[int, int, int]]:
    """`iter_batch_spans` from sub-operation `first` (of `count`), whose header is at `pos`:
    for a reader that handled the first ones itself."""
    op = Opcode.BATCH
    length = len(payload)
    head_size = _BATCH_OP_HEAD.size
    unpack_head = _BATCH_OP_HEAD.unpack_from
    for index in range(first, count):
        if length - pos < head_size:
            raise malformed(
                f"BATCH declares {count} operations but the frame ends after {index}", op
            )
        sub_op, body_len = unpack_head(payload, pos)
        start = pos + head_size
        pos = start + body_len
        if pos > length:
            raise malformed(
                f"BATCH operation {index} ({op_name(sub_op)}): body_len {body_len} overruns the "
                f"frame ({length - start} bytes left)",
                op,
            )
        yield sub_op, start, pos
    if pos != length:
        raise malformed(f"BATCH: {length - pos} bytes left over after its {count} operations", op)


def iter_batch(payload: BytesLike) -> Iterator[tuple[int, memoryview]]:
    """Like `iter_batch_spans`, yielding (op, body) with the body as a memoryview."""
    view = memoryview(payload)
    for op, start, end in iter_batch_spans(view):
        yield op, view[start:end]


@dataclass(frozen=True, slots=True)
class Batch(Message):
    """BATCH: several write operations in one frame, applied in order, each on its own."""

    OPCODE: ClassVar[Opcode] = Opcode.BATCH
    ops: tuple[WriteOp, ...]

    def _encode(self) -> bytes:
        parts = [U32.pack(len(self.ops))]
        for sub in self.ops:
            if not isinstance(sub, Assert | Retract | Patch):
                raise EncodeError(f"a BATCH carries ASSERT, RETRACT or PATCH, not {sub!r}")
            body = sub.encode()
            parts.append(_BATCH_OP_HEAD.pack(sub.OPCODE, len(body)))
            parts.append(body)
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        """Strict decoding: any bad sub-operation fails the whole batch.

        An unknown sub-operation op code is MALFORMED with `op` set to that code; a sub-operation
        body that does not parse fails with that sub-operation's opcode. The server, which must
        apply the good sub-operations alone, uses `iter_batch` instead.
        """
        ops: list[WriteOp] = []
        for index, (sub_op, body) in enumerate(iter_batch(payload)):
            sub_cls = _WRITE_CLASSES.get(sub_op)
            if sub_cls is None:
                raise malformed(
                    f"BATCH operation {index}: op 0x{sub_op:02x} is not ASSERT, RETRACT or PATCH",
                    sub_op,
                )
            ops.append(sub_cls.decode(body))
        return cls(tuple(ops))


@dataclass(frozen=True, slots=True)
class Sync(_Empty):
    """SYNC (ours): answered once every write this connection sent before it is flushed."""

    OPCODE: ClassVar[Opcode] = Opcode.SYNC


_SUBSCRIBE_EVENTS: Final = struct.Struct("<HQ")


@dataclass(frozen=True, slots=True)
class SubscribeEvents(Message):
    """SUBSCRIBE_EVENTS (ours): the event log of an event-stream kind, from `from_seq`."""

    OPCODE: ClassVar[Opcode] = Opcode.SUBSCRIBE_EVENTS
    kind_id: int
    from_seq: int = 0

    def _encode(self) -> bytes:
        return _SUBSCRIBE_EVENTS.pack(self.kind_id, self.from_seq)

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.SUBSCRIBE_EVENTS)
        msg = cls(r.u16("kind_id"), r.u64("from_seq"))
        r.expect_end()
        return msg


@dataclass(frozen=True, slots=True)
class CreateKind(Message):
    """CREATE_KIND: register a kind, or append fields to it."""

    OPCODE: ClassVar[Opcode] = Opcode.CREATE_KIND
    kind: KindDef

    def _encode(self) -> bytes:
        return encode_kind_definition(self.kind)

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.CREATE_KIND)
        msg = cls(_read_kind(r))
        r.expect_end()
        return msg


@dataclass(frozen=True, slots=True)
class GetKind(Message):
    """GET_KIND: resolve a kind by name; with a definition, the server checks it is a prefix."""

    OPCODE: ClassVar[Opcode] = Opcode.GET_KIND
    name: str
    definition: KindDef | None = None

    def _encode(self) -> bytes:
        name = pack_str16(self.name, "name")
        if self.definition is None:
            return name + b"\x00"
        return b"".join((name, b"\x01", encode_kind_definition(self.definition)))

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.GET_KIND)
        name = r.str16("name")
        has_definition = r.u8("has_definition")
        if has_definition > 1:
            raise r.error(f"has_definition must be 0 or 1, got {has_definition}")
        definition = _read_kind(r) if has_definition else None
        r.expect_end()
        return cls(name, definition)


@dataclass(frozen=True, slots=True)
class ListKinds(_Empty):
    """LIST_KINDS (ours): every kind of the server."""

    OPCODE: ClassVar[Opcode] = Opcode.LIST_KINDS


# --- server -> client -------------------------------------------------------------------------

_STATE_HEAD: Final = struct.Struct("<H32sBQQQQI")
"""kind_id, eid, type, version, source_set, changed_fields, seq, data length."""
_STATE_UNPACK: Final = _STATE_HEAD.unpack_from
_STATE_SIZE: Final = _STATE_HEAD.size
_U32_UNPACK: Final = U32.unpack_from
_U16_UNPACK: Final = U16.unpack_from


def _fast_tail(payload: BytesLike, pos: int) -> tuple[bytes, bytes, bytes] | None:
    """The hot paths' end of a STATE or DELETED: `previous` (a u32 length at `pos`), then
    nothing or the meta (a u16 length), ending exactly at the payload's end.

    Returns (the payload as bytes, previous, meta), or None when the spans do not fit, and
    the caller's general path must say what is wrong.
    """
    end = len(payload)
    previous_start = pos + 4
    if previous_start > end:
        return None
    (previous_size,) = _U32_UNPACK(payload, pos)
    previous_end = previous_start + previous_size
    if previous_end != end:
        meta_start = previous_end + 2
        if meta_start > end or meta_start + _U16_UNPACK(payload, previous_end)[0] != end:
            return None
    # one copy of the payload, then slices of it: cheaper than copies of memoryview slices
    data = payload.tobytes() if payload.__class__ is memoryview else _as_bytes(payload)
    return (
        data,
        data[previous_start:previous_end] if previous_size else b"",
        data[previous_end + 2 :] if previous_end != end else b"",
    )


@dataclass(frozen=True, slots=True)
class State(Message):
    """STATE: an entity was created, updated, or is sent by a bootstrap."""

    OPCODE: ClassVar[Opcode] = Opcode.STATE
    kind_id: int
    eid: bytes
    type: ChangeType
    version: int
    source_set: int
    changed_fields: int
    seq: int
    data: bytes
    previous: bytes = b""
    meta: bytes = b""

    def _encode(self) -> bytes:
        check_eid(self.eid)
        _check_meta(self.meta)
        head = _STATE_HEAD.pack(
            self.kind_id,
            self.eid,
            self.type,
            self.version,
            self.source_set,
            self.changed_fields,
            self.seq,
            len(self.data),
        )
        return b"".join((head, self.data, pack_bytes32(self.previous), pack_meta(self.meta)))

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        # The subscriber's hot path: one unpack, the spans checked by `_fast_tail`, and no
        # frozen-dataclass __init__. Anything unusual (a short payload, an undefined type, a
        # subclass) takes the general path, which says what is wrong.
        try:
            kind_id, eid, change, version, source_set, changed, seq, size = _STATE_UNPACK(
                payload, 0
            )
            change_type = _CHANGE_TYPES[change]
        except (struct.error, KeyError):
            return cls._decode(payload)
        data_end = _STATE_SIZE + size
        tail = _fast_tail(payload, data_end) if cls is State else None
        if tail is None:
            return cls._decode(payload)
        data, previous, meta = tail
        state: Self = _new_state(
            kind_id,
            eid,
            change_type,
            version,
            source_set,
            changed,
            seq,
            data[_STATE_SIZE:data_end],
            previous,
            meta,
        )
        return state

    @classmethod
    def _decode(cls, payload: BytesLike) -> Self:
        """`decode`, step by step: the path of a payload that is not a plain, whole STATE."""
        op = Opcode.STATE
        kind_id, eid, change, version, source_set, changed, seq, size = _unpack_head(
            _STATE_HEAD, payload, op, "the fixed fields"
        )
        change_type = _member(_CHANGE_TYPES, change, "STATE type", op)
        pos = _STATE_HEAD.size
        data = _blob(payload, pos, size, op, "data")
        pos += size
        previous = _blob32(payload, pos, op, "previous")
        pos += 4 + len(previous)
        meta = _meta_tail(payload, pos, op)
        return cls(
            kind_id, eid, change_type, version, source_set, changed, seq, data, previous, meta
        )


def _blob32(payload: BytesLike, pos: int, op: int, what: str) -> bytes:
    """A u32 length at `pos` and the bytes after it."""
    try:
        (size,) = U32.unpack_from(payload, pos)
    except struct.error:
        raise _truncated(op, f"{what} length", pos, 4, len(payload)) from None
    return _blob(payload, pos + 4, size, op, what)


_DELETED_HEAD: Final = struct.Struct("<H32sQQB")
"""kind_id, eid, version, seq, cause."""
_DELETED_UNPACK: Final = _DELETED_HEAD.unpack_from
_DELETED_SIZE: Final = _DELETED_HEAD.size


@dataclass(frozen=True, slots=True)
class Deleted(Message):
    """DELETED: an entity became a tombstone."""

    OPCODE: ClassVar[Opcode] = Opcode.DELETED
    kind_id: int
    eid: bytes
    version: int
    seq: int
    cause: DeleteCause
    previous: bytes = b""
    meta: bytes = b""

    def _encode(self) -> bytes:
        check_eid(self.eid)
        head = _DELETED_HEAD.pack(self.kind_id, self.eid, self.version, self.seq, self.cause)
        return b"".join((head, pack_bytes32(self.previous), pack_meta(self.meta)))

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        # the hot path, as in `State.decode`
        try:
            kind_id, eid, version, seq, cause = _DELETED_UNPACK(payload, 0)
            delete_cause = _DELETE_CAUSES[cause]
        except (struct.error, KeyError):
            return cls._decode(payload)
        tail = _fast_tail(payload, _DELETED_SIZE) if cls is Deleted else None
        if tail is None:
            return cls._decode(payload)
        _, previous, meta = tail
        deleted: Self = _new_deleted(kind_id, eid, version, seq, delete_cause, previous, meta)
        return deleted

    @classmethod
    def _decode(cls, payload: BytesLike) -> Self:
        """`decode`, step by step: the path of a payload that is not a plain, whole DELETED."""
        op = Opcode.DELETED
        kind_id, eid, version, seq, cause = _unpack_head(
            _DELETED_HEAD, payload, op, "the fixed fields"
        )
        delete_cause = _member(_DELETE_CAUSES, cause, "DELETED cause", op)
        pos = _DELETED_HEAD.size
        previous = _blob32(payload, pos, op, "previous")
        meta = _meta_tail(payload, pos + 4 + len(previous), op)
        return cls(kind_id, eid, version, seq, delete_cause, previous, meta)


_new_state: Final[Callable[..., Any]] = frozen_constructor(State)
"""`State(...)` with every field given, without the frozen dataclass's slow `__init__`."""
_new_deleted: Final[Callable[..., Any]] = frozen_constructor(Deleted)
"""`Deleted(...)` likewise."""

_BOOTSTRAP_BEGIN: Final = struct.Struct("<HBQ")


@dataclass(frozen=True, slots=True)
class BootstrapBegin(Message):
    """BOOTSTRAP_BEGIN: `count` bootstrap frames follow, full or delta."""

    OPCODE: ClassVar[Opcode] = Opcode.BOOTSTRAP_BEGIN
    kind_id: int
    mode: BootstrapMode
    count: int

    def _encode(self) -> bytes:
        return _BOOTSTRAP_BEGIN.pack(self.kind_id, self.mode, self.count)

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.BOOTSTRAP_BEGIN)
        kind_id = r.u16("kind_id")
        mode = _member(_BOOTSTRAP_MODES, r.u8("mode"), "BOOTSTRAP_BEGIN mode", r.op)
        msg = cls(kind_id, mode, r.u64("count"))
        r.expect_end()
        return msg


_BOOTSTRAP_END: Final = struct.Struct("<HQ")


@dataclass(frozen=True, slots=True)
class BootstrapEnd(Message):
    """BOOTSTRAP_END: the bootstrap is complete; `count` frames were sent."""

    OPCODE: ClassVar[Opcode] = Opcode.BOOTSTRAP_END
    kind_id: int
    count: int

    def _encode(self) -> bytes:
        return _BOOTSTRAP_END.pack(self.kind_id, self.count)

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.BOOTSTRAP_END)
        msg = cls(r.u16("kind_id"), r.u64("count"))
        r.expect_end()
        return msg


_CONNECTED_HEAD: Final = struct.Struct("<BIII")


@dataclass(frozen=True, slots=True)
class Connected(Message):
    """CONNECTED: the answer to CONNECT (source_id 0xFF for read-only)."""

    OPCODE: ClassVar[Opcode] = Opcode.CONNECTED
    source_id: int
    liveness_deadline_ms: int
    window_ms: int
    max_payload: int
    server_version: str

    def _encode(self) -> bytes:
        head = _CONNECTED_HEAD.pack(
            self.source_id, self.liveness_deadline_ms, self.window_ms, self.max_payload
        )
        return head + pack_str16(self.server_version, "server_version")

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.CONNECTED)
        msg = cls(
            r.u8("source_id"),
            r.u32("liveness_deadline_ms"),
            r.u32("window_ms"),
            r.u32("max_payload"),
            r.str16("server_version"),
        )
        r.expect_end()
        return msg


_QUERY_RESULT_HEAD: Final = struct.Struct("<BQQ")
_QUERY_RESULT_DATA_AT: Final = _QUERY_RESULT_HEAD.size + 4
_QUERY_RESULT_BODY: Final = struct.Struct("<BQQI")


def encode_query_result(
    stream_id: int, status: int, version: int, source_set: int, data: bytes
) -> bytes:
    """A whole QUERY_RESULT frame, as `encode_message(QueryResult(...), stream_id)` makes it,
    in one step (the server's point-read path; `data` is a stored row, far below the u32
    length limit)."""
    head = encode_header(Opcode.QUERY_RESULT, stream_id, _QUERY_RESULT_DATA_AT + len(data))
    return head + _QUERY_RESULT_BODY.pack(status, version, source_set, len(data)) + data


@dataclass(frozen=True, slots=True)
class QueryResult(Message):
    """QUERY_RESULT: the answer to QUERY."""

    OPCODE: ClassVar[Opcode] = Opcode.QUERY_RESULT
    status: QueryStatus
    version: int
    source_set: int
    data: bytes = b""

    def _encode(self) -> bytes:
        head = _QUERY_RESULT_HEAD.pack(self.status, self.version, self.source_set)
        return head + pack_bytes32(self.data, "data")

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.QUERY_RESULT)
        status = _member(_QUERY_STATUSES, r.u8("status"), "QUERY_RESULT status", r.op)
        msg = cls(status, r.u64("version"), r.u64("source_set"), r.bytes32("data"))
        r.expect_end()
        return msg


_KIND_INFO_HEAD: Final = struct.Struct("<HH")


@dataclass(frozen=True, slots=True)
class KindInfo(Message):
    """KIND_INFO: a kind's id, schema version and current definition."""

    OPCODE: ClassVar[Opcode] = Opcode.KIND_INFO
    kind_id: int
    schema_version: int
    kind: KindDef

    def _encode(self) -> bytes:
        head = _KIND_INFO_HEAD.pack(self.kind_id, self.schema_version)
        return head + encode_kind_definition(self.kind)

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.KIND_INFO)
        msg = cls.read(r)
        r.expect_end()
        return msg

    @classmethod
    def read(cls, r: Reader) -> Self:
        """Read a KIND_INFO body at the reader's position (also an entry of KIND_LIST)."""
        return cls(r.u16("kind_id"), r.u16("schema_version"), _read_kind(r))


@dataclass(frozen=True, slots=True)
class Ok(Message):
    """OK: success, with a value whose meaning depends on the request."""

    OPCODE: ClassVar[Opcode] = Opcode.OK
    value: int = 0

    def _encode(self) -> bytes:
        return U64.pack(self.value)

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.OK)
        msg = cls(r.u64("value"))
        r.expect_end()
        return msg


_ERROR_HEAD: Final = struct.Struct("<HH")


@dataclass(frozen=True, slots=True)
class Error(Message):
    """ERROR: a request or a write failed, or the server is closing the connection.

    `code` is an `ErrorCode`, or a plain int for a code this side does not know.
    """

    OPCODE: ClassVar[Opcode] = Opcode.ERROR
    code: ErrorCode | int
    op: int
    message: str

    def _encode(self) -> bytes:
        return _ERROR_HEAD.pack(self.code, self.op) + pack_str16(self.message, "message")

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.ERROR)
        code = r.u16("code")
        msg = cls(_ERROR_CODES.get(code, code), r.u16("op"), r.str16("message"))
        r.expect_end()
        return msg

    @classmethod
    def from_exception(cls, exc: ProtocolError) -> Self:
        """The ERROR frame that reports `exc`."""
        return cls(exc.code, exc.op, exc.message)


_EVENT_HEAD: Final = struct.Struct("<HQBBB32sQI")
"""kind_id, seq, source_id, op, cause, eid, mask, data length."""


@dataclass(frozen=True, slots=True)
class Event(Message):
    """EVENT: one recorded write of an event-stream kind."""

    OPCODE: ClassVar[Opcode] = Opcode.EVENT
    kind_id: int
    seq: int
    source_id: int
    op: Opcode
    cause: EventCause
    eid: bytes
    mask: int
    data: bytes
    meta: bytes = b""

    def _encode(self) -> bytes:
        check_eid(self.eid)
        _check_meta(self.meta)
        head = _EVENT_HEAD.pack(
            self.kind_id,
            self.seq,
            self.source_id,
            self.op,
            self.cause,
            self.eid,
            self.mask,
            len(self.data),
        )
        return b"".join((head, self.data, pack_meta(self.meta)))

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        code = Opcode.EVENT
        kind_id, seq, source_id, op, cause, eid, mask, size = _unpack_head(
            _EVENT_HEAD, payload, code, "the fixed fields"
        )
        event_op = _member(_EVENT_OPS, op, "EVENT op", code)
        event_cause = _member(_EVENT_CAUSES, cause, "EVENT cause", code)
        pos = _EVENT_HEAD.size
        data = _blob(payload, pos, size, code, "data")
        meta = _meta_tail(payload, pos + size, code)
        return cls(kind_id, seq, source_id, event_op, event_cause, eid, mask, data, meta)


@dataclass(frozen=True, slots=True)
class Pong(_Empty):
    """PONG: the answer to a HEARTBEAT on a non-zero stream."""

    OPCODE: ClassVar[Opcode] = Opcode.PONG


@dataclass(frozen=True, slots=True)
class KindList(Message):
    """KIND_LIST (ours): every kind, as (kind_id, schema_version, definition) entries."""

    OPCODE: ClassVar[Opcode] = Opcode.KIND_LIST
    kinds: tuple[KindInfo, ...]

    def _encode(self) -> bytes:
        parts = [U16.pack(len(self.kinds))]
        parts.extend(info.encode() for info in self.kinds)
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: BytesLike) -> Self:
        r = Reader(payload, Opcode.KIND_LIST)
        count = r.u16("count")
        kinds = tuple(KindInfo.read(r) for _ in range(count))
        r.expect_end()
        return cls(kinds)


# --- registry ---------------------------------------------------------------------------------

CLIENT_MESSAGES: Final[dict[int, type[Message]]] = {
    cls.OPCODE: cls
    for cls in (
        Connect,
        Assert,
        Retract,
        Query,
        Subscribe,
        Unsubscribe,
        Heartbeat,
        Patch,
        EpochBegin,
        EpochEnd,
        Batch,
        Sync,
        SubscribeEvents,
        CreateKind,
        GetKind,
        ListKinds,
    )
}
"""Client-to-server opcode -> message class."""

SERVER_MESSAGES: Final[dict[int, type[Message]]] = {
    cls.OPCODE: cls
    for cls in (
        State,
        Deleted,
        BootstrapBegin,
        BootstrapEnd,
        Connected,
        QueryResult,
        KindInfo,
        Ok,
        Error,
        Event,
        Pong,
        KindList,
    )
}
"""Server-to-client opcode -> message class."""

_ALL_MESSAGES: Final = {**CLIENT_MESSAGES, **SERVER_MESSAGES}


def decode_message(opcode: int, payload: BytesLike) -> Message:
    """Decode the payload of a frame with `opcode` (either direction).

    An opcode that names no message is `ProtocolError(UNKNOWN_OPCODE)`.
    """
    cls = _ALL_MESSAGES.get(opcode)
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_OPCODE, f"unknown opcode 0x{opcode:02x}", opcode)
    return cls.decode(payload)


def encode_message(msg: Message, stream_id: int = 0, flags: int = 0) -> bytes:
    """A whole frame carrying `msg` on `stream_id`."""
    return encode_frame(msg.OPCODE, stream_id, msg.encode(), flags)
