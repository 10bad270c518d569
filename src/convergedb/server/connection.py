"""One client connection: frames in, dispatch by opcode, replies and errors out.

Where a frame is parsed: `data_received` feeds the FrameReader, `_dispatch` routes each frame.
Write operations go to the engine (`server/engine.py`); requests are answered here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from ..limits import DEFAULT_LIVENESS_DEADLINE_MS, READ_ONLY_SOURCE_ID
from ..protocol.codes import (
    CLOSING_ERRORS,
    SERVER_CLOSING_FLAG,
    ConnectMode,
    DeleteCause,
    ErrorCode,
    Opcode,
    QueryStatus,
)
from ..protocol.errors import ProtocolError, error_code_for, malformed
from ..protocol.frame import Frame, FrameReader
from ..protocol.messages import (
    BATCH_ASSERT_HEAD,
    BATCH_COUNT_SIZE,
    QUERY_BODY,
    Connect,
    Connected,
    CreateKind,
    EpochBegin,
    EpochEnd,
    Error,
    GetKind,
    KindInfo,
    KindList,
    ListKinds,
    Message,
    Ok,
    Pong,
    Query,
    Sync,
    batch_count,
    batch_spans_from,
    encode_message,
    encode_query_result,
    parse_assert,
    parse_patch,
    parse_retract,
)
from ..schema.errors import SchemaError
from ..schema.evolution import check_prefix
from .catalog import KindState

if TYPE_CHECKING:
    from .app import Server

log = logging.getLogger("convergedb.connection")

BytesLike = bytes | memoryview
Handler = Callable[["ServerConnection", Frame], None]

_REQUESTS: Final = frozenset(
    {
        Opcode.CONNECT,
        Opcode.QUERY,
        Opcode.SUBSCRIBE,
        Opcode.UNSUBSCRIBE,
        Opcode.SOURCE_EPOCH_BEGIN,
        Opcode.SOURCE_EPOCH_END,
        Opcode.SYNC,
        Opcode.SUBSCRIBE_EVENTS,
        Opcode.CREATE_KIND,
        Opcode.GET_KIND,
        Opcode.LIST_KINDS,
    }
)
"""Opcodes that need a reply, hence a non-zero stream id."""


class Epoch:
    """An open source epoch: the baseline at EPOCH_BEGIN and what was re-asserted since."""

    __slots__ = ("baseline", "reasserted")

    def __init__(self, baseline: set[tuple[int, bytes]]) -> None:
        self.baseline = baseline
        self.reasserted: set[tuple[int, bytes]] = set()


class ServerConnection(asyncio.Protocol):
    """The server side of one TCP connection."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.engine = server.engine
        self.catalog = server.catalog
        self.reader = FrameReader(server.config.max_payload)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.connected = False
        self.read_only = True
        self.source_id: int | None = None
        self.bit = 0
        self.name = ""
        self.liveness_deadline_ms = 0
        self.connected_at_ms = 0
        self.last_write_generation = 0
        self.closing = False
        self.reading_held = False
        self.silent = False
        """Closed by the server for silence: its source is dead at once."""
        self.heartbeat_interval_ms = 0
        self.last_seen = time.monotonic()
        self.presence_written_ms = 0
        self.epoch: Epoch | None = None
        self.read_timer: asyncio.TimerHandle | None = None
        """Due when the read timeout would run out: no CONNECT yet, or a frame half-received."""

    # transport events ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if not self.server.admit(self):
            self.send_error(
                ProtocolError(ErrorCode.LIMIT_EXCEEDED, "the server has too many connections"),
                0,
                close=True,
            )
            return
        self._arm_read_timer(self.server.config.read_timeout_s)

    def data_received(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        if self.bit and self.connected:
            self.server.presence.seen(self)
        try:
            frames = self.reader.feed(data)
        except ProtocolError as exc:
            for frame in self.reader.frames_before_failure():  # they came first: handle them
                if self.closing:
                    return
                self._dispatch(frame)
            if not self.closing:
                self.send_error(exc, 0, close=True)
            return
        for frame in frames:
            if self.closing:
                return
            self._dispatch(frame)
        if self.read_timer is None and self.reader.buffered and not self.closing:
            self._arm_read_timer(self.server.config.read_timeout_s)
        if self.engine.overdue() and not self.reading_held and self.transport is not None:
            self.reading_held = True
            self.transport.pause_reading()
            self.engine.hold_reading(self._resume_reading)

    def _resume_reading(self) -> None:
        self.reading_held = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None
        self.server.forget(self)

    def _arm_read_timer(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self.read_timer = loop.call_later(delay, self._check_read_timeout)

    def _check_read_timeout(self) -> None:
        """The read timeout: a connection must send CONNECT within it, and a frame whose first
        bytes arrived must not stall for longer (the liveness deadline, up to minutes, watches
        whole silence; this bounds what a half-sent frame holds)."""
        self.read_timer = None
        if self.closing:
            return
        timeout = self.server.config.read_timeout_s
        if not self.connected:
            message = f"no CONNECT within {timeout:g} s of opening the connection"
            self.send_error(ProtocolError(ErrorCode.NOT_CONNECTED, message), 0, close=True)
            return
        if not self.reader.buffered:
            return  # nothing half-received: the timer is armed again when something is
        idle = time.monotonic() - self.last_seen
        if self.reading_held or idle < timeout:  # the server itself holds reading: not stalled
            self._arm_read_timer(timeout if self.reading_held else timeout - idle)
            return
        message = f"a frame stalled half-received: nothing arrived for {timeout:g} s"
        self.send_error(ProtocolError(ErrorCode.BAD_FRAME, message), 0, close=True)

    def pause_writing(self) -> None:
        self.server.subscriptions.pause(self)

    def resume_writing(self) -> None:
        self.server.subscriptions.resume(self)

    # sending ------------------------------------------------------------------------------------

    def send(self, message: Message, stream_id: int, flags: int = 0) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_message(message, stream_id, flags))

    def send_error(self, exc: ProtocolError, stream_id: int, *, close: bool = False) -> None:
        """Report an error; closing errors (and `close`) end the connection after it."""
        closes = close or exc.code in CLOSING_ERRORS
        self.send(Error.from_exception(exc), stream_id, SERVER_CLOSING_FLAG if closes else 0)
        if closes:
            log.info("%s: %s (%s), closing the connection", self.peer, exc.code.name, exc.message)
            self.close()
        else:
            log.debug("%s: %s (%s)", self.peer, exc.code.name, exc.message)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def taken_over(self) -> None:
        """Another connection took this one's source over."""
        message = f"source {self.source_id} was taken over by another connection"
        log.info("%s: %s", self.peer, message)
        self.source_id = None  # the source is no longer ours to release
        self.send_error(ProtocolError(ErrorCode.TAKEN_OVER, message), 0)

    # dispatch -----------------------------------------------------------------------------------

    def _dispatch(self, frame: Frame) -> None:
        opcode = frame.opcode
        stream_id = frame.stream_id
        if not self.connected and opcode not in (Opcode.CONNECT, Opcode.HEARTBEAT):
            error = ProtocolError(ErrorCode.NOT_CONNECTED, "send CONNECT first", opcode)
            self.send_error(error, stream_id, close=True)
            return
        handler = _HANDLERS.get(opcode)
        try:
            if handler is None:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_OPCODE, f"unknown opcode 0x{opcode:02x}", opcode
                )
            if stream_id == 0 and opcode in _REQUESTS:
                raise malformed(f"{Opcode(opcode).name} needs a non-zero stream id", opcode)
            handler(self, frame)
        except (ProtocolError, SchemaError) as exc:
            self._report(exc, opcode, stream_id)
        except Exception:  # a bug: answer INTERNAL and keep the connection (and the log)
            log.exception("%s: handling a frame with opcode 0x%02x failed", self.peer, opcode)
            failed = ProtocolError(ErrorCode.INTERNAL, "the server failed to handle the frame")
            self._report(failed, opcode, stream_id)

    def _report(self, exc: Exception, opcode: int, stream_id: int) -> None:
        error = (
            exc
            if isinstance(exc, ProtocolError)
            else ProtocolError(error_code_for(exc), str(exc), opcode)
        )
        if not error.op:
            error.op = opcode
        if opcode in _WRITES:
            stream_id = 0  # rejected writes are reported asynchronously
            self.server.rejected[error.code] += 1
        self.send_error(error, stream_id, close=not self.connected)

    # connecting ---------------------------------------------------------------------------------

    def _on_connect(self, frame: Frame) -> None:
        request = Connect.decode(frame.payload)
        if self.connected:
            raise ProtocolError(
                ErrorCode.ALREADY_CONNECTED, "this connection is already connected", Opcode.CONNECT
            )
        server = self.server
        grant = server.authenticator.authorize(request.auth_token, request.mode, request.source_id)
        deadline = request.liveness_deadline_ms or DEFAULT_LIVENESS_DEADLINE_MS
        self.liveness_deadline_ms = min(deadline, server.config.max_liveness_ms)
        self.heartbeat_interval_ms = request.heartbeat_interval_ms
        self.name = request.name
        if request.mode is not ConnectMode.READ_ONLY:
            previous = None
            if request.mode is ConnectMode.ALLOCATE:
                allowed = None if grant is None else grant.sources
                self.source_id = server.sources.allocate(self, allowed)
            else:
                takeover = request.mode is ConnectMode.TAKEOVER
                previous = server.sources.claim(request.source_id, self, takeover=takeover)
                self.source_id = request.source_id
            self.bit = 1 << self.source_id
            self.engine.source_reused(self.bit)  # an expiry of it comes before its writes
            self.read_only = False
            if previous is not None:
                previous.taken_over()
        self.connected = True
        self.connected_at_ms = int(time.time() * 1000)
        if self.source_id is not None:
            self.engine.declare_deadline(self.source_id, self.liveness_deadline_ms)
            server.presence.connected(self)
            self.last_write_generation = self.engine.generation  # SYNC covers the presence
        server.connected(self)
        source = READ_ONLY_SOURCE_ID if self.source_id is None else self.source_id
        config = server.config
        reply = Connected(
            source, self.liveness_deadline_ms, config.window_ms, config.max_payload, server.version
        )
        self.send(reply, frame.stream_id)

    def _on_heartbeat(self, frame: Frame) -> None:
        if frame.stream_id:
            self.send(Pong(), frame.stream_id)

    # writes -------------------------------------------------------------------------------------

    def _writable_kind(self, kind_id: int, op: int) -> KindState:
        if self.read_only:
            raise ProtocolError(ErrorCode.READ_ONLY, "a read-only connection cannot write", op)
        kind = self.catalog.get(kind_id, op)
        if kind.system:
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"{kind.name} is a system kind: only the server writes it", op
            )
        return kind

    def _write_assert(self, payload: BytesLike, start: int, end: int) -> None:
        kind_id, eid, data, meta = parse_assert(payload, start, end)
        kind = self._writable_kind(kind_id, Opcode.ASSERT)
        self.engine.write_assert(kind, eid, data, self.bit, meta)
        self.last_write_generation = self.engine.generation
        if self.epoch is not None:
            self.epoch.reasserted.add((kind_id, eid))

    def _write_patch(self, payload: BytesLike, start: int, end: int) -> None:
        kind_id, eid, mask, values, meta = parse_patch(payload, start, end)
        kind = self._writable_kind(kind_id, Opcode.PATCH)
        self.engine.write_patch(kind, eid, mask, values, self.bit, meta)
        self.last_write_generation = self.engine.generation
        if self.epoch is not None:
            self.epoch.reasserted.add((kind_id, eid))

    def _write_retract(self, payload: BytesLike, start: int, end: int) -> None:
        kind_id, eid, meta = parse_retract(payload, start, end)
        kind = self._writable_kind(kind_id, Opcode.RETRACT)
        self.engine.write_retract(kind, eid, self.bit, meta)
        self.last_write_generation = self.engine.generation
        if self.epoch is not None:
            self.epoch.reasserted.discard((kind_id, eid))

    def _on_write(self, frame: Frame) -> None:
        payload = frame.payload
        _WRITE_APPLIERS[frame.opcode](self, payload, 0, len(payload))

    def _on_batch(self, frame: Frame) -> None:
        # one copy of the frame, so that every row sliced out of it is already `bytes`
        payload = bytes(frame.payload)
        try:
            count = batch_count(payload)
            done, pos = self._assert_plainly(payload, count)
            for op, start, end in batch_spans_from(payload, count, done, pos):
                apply = _WRITE_APPLIERS.get(op)
                try:
                    if apply is None:
                        raise malformed(f"BATCH: 0x{op:02x} is not a write operation", op)
                    apply(self, payload, start, end)
                except (ProtocolError, SchemaError) as exc:
                    self._report(exc, op, 0)
        except ProtocolError as exc:
            self._report(exc, Opcode.BATCH, 0)
        self.last_write_generation = self.engine.generation

    def _assert_plainly(self, payload: bytes, count: int) -> tuple[int, int]:
        """The BATCH fast path: apply the leading run of sub-operations that are well-formed
        ASSERTs, outside an epoch (the bulk of a writer's traffic), with one
        unpack each and no per-operation parsing call. Returns (how many it applied, where the
        next one starts); `_on_batch` takes the rest through the general path."""
        done = 0
        pos = BATCH_COUNT_SIZE
        if self.epoch is not None:
            return done, pos
        length = len(payload)
        engine = self.engine  # called natively when compiled: no bound method
        bit = self.bit
        kind: KindState | None = None
        kind_id_of_kind = -1
        while done < count and length - pos >= _BATCH_ASSERT_SIZE:
            # BATCH_ASSERT_HEAD read byte by byte: compiled, these are native integers (no
            # tuple, no int objects, no generic arithmetic as with `unpack_from`)
            op = payload[pos]
            end = pos + _BATCH_HEAD_SIZE + _u32(payload, pos + 1)
            if op != _ASSERT or end > length:
                break
            size = _u32(payload, pos + _SIZE_AT)
            data_end = pos + _BATCH_ASSERT_SIZE + size
            if end == data_end:
                meta = b""
            elif end > data_end + 1 and end == data_end + 2 + (
                payload[data_end] | payload[data_end + 1] << 8  # the meta's u16 length
            ):
                meta = payload[data_end + 2 : end]
            else:
                break  # malformed: the general path says how
            kind_id = payload[pos + _KIND_AT] | payload[pos + _KIND_AT + 1] << 8
            try:
                if kind_id != kind_id_of_kind:
                    kind = self._writable_kind(kind_id, op)
                    kind_id_of_kind = kind_id
                eid = payload[pos + _EID_AT : pos + _SIZE_AT]
                engine.write_assert(kind, eid, payload[data_end - size : data_end], bit, meta)  # type: ignore[arg-type]
            except (ProtocolError, SchemaError) as exc:
                self._report(exc, op, 0)
            pos = end
            done += 1
        return done, pos

    # requests -----------------------------------------------------------------------------------

    def _on_query(self, frame: Frame) -> None:
        payload = frame.payload
        if len(payload) != QUERY_BODY.size:
            Query.decode(payload)  # raises, saying what is wrong with it
        kind_id, eid = QUERY_BODY.unpack(payload)
        kind = self.catalog.get(kind_id, Opcode.QUERY)
        entity = self.engine.committed(kind, eid)
        stream_id = frame.stream_id
        if entity is None:
            reply = encode_query_result(stream_id, _NOT_FOUND, 0, 0, b"")
        elif entity.sources:
            row = kind.current_row(entity)
            reply = encode_query_result(stream_id, _ALIVE, entity.version, entity.sources, row)
        else:
            reply = encode_query_result(stream_id, _TOMBSTONE, entity.version, 0, b"")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply)

    def _on_sync(self, frame: Frame) -> None:
        Sync.decode(frame.payload)
        stream_id = frame.stream_id
        flushed = self.engine.wait_flushed(self.last_write_generation)
        flushed.add_done_callback(lambda done: self.send(Ok(done.result()), stream_id))

    def _on_create_kind(self, frame: Frame) -> None:
        request = CreateKind.decode(frame.payload)
        if self.read_only:
            raise ProtocolError(
                ErrorCode.READ_ONLY,
                "a read-only connection cannot register kinds",
                Opcode.CREATE_KIND,
            )
        before = self.catalog.by_name.get(request.kind.name)
        old_count = None if before is None else len(before.definition.fields)
        kind, changed = self.catalog.register(request.kind)
        stream_id = frame.stream_id
        if not changed:
            self.send(_kind_info(kind), stream_id)
            return
        appended = old_count is not None and len(kind.definition.fields) > old_count
        self.engine.kind_changed(kind, old_count if appended else None)
        log.info("kind %r registered: id %d, schema version %d", kind.name, kind.kind_id,
                 kind.schema_version)  # fmt: skip
        durable = self.engine.wait_flushed(self.engine.generation)
        durable.add_done_callback(lambda _: self.send(_kind_info(kind), stream_id))

    def _on_get_kind(self, frame: Frame) -> None:
        request = GetKind.decode(frame.payload)
        kind = self.catalog.by_name.get(request.name)
        if kind is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_KIND,
                f"no kind named {request.name!r}; a writer must register it first",
                Opcode.GET_KIND,
            )
        if request.definition is not None:
            if request.definition.name != kind.name:
                raise ProtocolError(
                    ErrorCode.SCHEMA_CONFLICT,
                    f"GET_KIND {kind.name!r} carries the definition of {request.definition.name!r}"
                    ": the definition must be of the kind named",
                    Opcode.GET_KIND,
                )
            check_prefix(kind.definition, request.definition)
        self.send(_kind_info(kind), frame.stream_id)

    def _on_epoch_begin(self, frame: Frame) -> None:
        EpochBegin.decode(frame.payload)
        self._require_writer(Opcode.SOURCE_EPOCH_BEGIN, "begin an epoch")
        held = self.engine.held_by(self.bit, system=False)
        self.epoch = Epoch({(kind.kind_id, eid) for kind, eid in held})
        log.info("%s: source %s began an epoch over %d entities", self.peer, self.source_id,
                 len(held))  # fmt: skip
        self.send(Ok(len(held)), frame.stream_id)

    def _on_epoch_end(self, frame: Frame) -> None:
        EpochEnd.decode(frame.payload)
        self._require_writer(Opcode.SOURCE_EPOCH_END, "end an epoch")
        epoch = self.epoch
        if epoch is None:
            raise ProtocolError(
                ErrorCode.EPOCH_NOT_OPEN, "no epoch is open: send EPOCH_BEGIN first",
                Opcode.SOURCE_EPOCH_END,
            )  # fmt: skip
        self.epoch = None
        by_id = self.catalog.by_id
        stale = [(by_id[kind_id], eid) for kind_id, eid in epoch.baseline - epoch.reasserted]
        retracted = self.engine.retract_many(stale, self.bit, DeleteCause.EPOCH_END)
        self.last_write_generation = self.engine.generation
        log.info("%s: source %s ended an epoch: %d retracted", self.peer, self.source_id,
                 retracted)  # fmt: skip
        self.send(Ok(retracted), frame.stream_id)

    def _require_writer(self, op: int, what: str) -> None:
        if self.read_only:
            raise ProtocolError(ErrorCode.READ_ONLY, f"a read-only connection cannot {what}", op)

    def _on_subscribe(self, frame: Frame) -> None:
        self.server.subscriptions.on_subscribe(self, frame)

    def _on_unsubscribe(self, frame: Frame) -> None:
        self.server.subscriptions.on_unsubscribe(self, frame)

    def _on_subscribe_events(self, frame: Frame) -> None:
        self.server.subscriptions.on_subscribe_events(self, frame)

    def _on_list_kinds(self, frame: Frame) -> None:
        ListKinds.decode(frame.payload)
        infos = tuple(_kind_info(kind) for kind in self.catalog.by_id.values())
        self.send(KindList(infos), frame.stream_id)


def _kind_info(kind: KindState) -> KindInfo:
    return KindInfo(kind.kind_id, kind.schema_version, kind.definition)


_WRITE_APPLIERS: Final[dict[int, Callable[[ServerConnection, BytesLike, int, int], None]]] = {
    Opcode.ASSERT: ServerConnection._write_assert,
    Opcode.PATCH: ServerConnection._write_patch,
    Opcode.RETRACT: ServerConnection._write_retract,
}
_WRITES: Final = frozenset({*_WRITE_APPLIERS, Opcode.BATCH})
_ASSERT: Final = int(Opcode.ASSERT)
_ALIVE: Final = int(QueryStatus.ALIVE)
_TOMBSTONE: Final = int(QueryStatus.TOMBSTONE)
_NOT_FOUND: Final = int(QueryStatus.NOT_FOUND)
_BATCH_ASSERT_SIZE: Final = BATCH_ASSERT_HEAD.size
_BATCH_HEAD_SIZE: Final = 5
"""op u8, body_len u32."""
_KIND_AT: Final = 5
_EID_AT: Final = 7
_SIZE_AT: Final = 39
"""Where kind_id (u16), the eid (32 bytes) and the data length (u32) of a BATCH's ASSERT are,
from its sub-operation header: the layout of BATCH_ASSERT_HEAD."""
assert BATCH_ASSERT_HEAD.format == "<BIH32sI" and _SIZE_AT + 4 == _BATCH_ASSERT_SIZE


def _u32(data: bytes, at: int) -> int:
    return data[at] | data[at + 1] << 8 | data[at + 2] << 16 | data[at + 3] << 24


_HANDLERS: Final[dict[int, Handler]] = {
    Opcode.CONNECT: ServerConnection._on_connect,
    Opcode.HEARTBEAT: ServerConnection._on_heartbeat,
    Opcode.ASSERT: ServerConnection._on_write,
    Opcode.PATCH: ServerConnection._on_write,
    Opcode.RETRACT: ServerConnection._on_write,
    Opcode.BATCH: ServerConnection._on_batch,
    Opcode.QUERY: ServerConnection._on_query,
    Opcode.SYNC: ServerConnection._on_sync,
    Opcode.CREATE_KIND: ServerConnection._on_create_kind,
    Opcode.GET_KIND: ServerConnection._on_get_kind,
    Opcode.LIST_KINDS: ServerConnection._on_list_kinds,
    Opcode.SOURCE_EPOCH_BEGIN: ServerConnection._on_epoch_begin,
    Opcode.SOURCE_EPOCH_END: ServerConnection._on_epoch_end,
    Opcode.SUBSCRIBE: ServerConnection._on_subscribe,
    Opcode.UNSUBSCRIBE: ServerConnection._on_unsubscribe,
    Opcode.SUBSCRIBE_EVENTS: ServerConnection._on_subscribe_events,
}
