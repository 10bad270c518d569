"""The protocol connection: one TCP connection to a server, frames in and out.

`Connection` is an `asyncio.Protocol` (the split between a protocol and the user-facing client
follows asyncpg). It knows frames and messages, not kinds or sources:

- Every frame received is decoded in `data_received` and dispatched by its stream id. A non-zero
  stream belongs to a `StreamSink` registered with `open_stream`: a request waiting for its one
  reply (`request`), or a subscription that receives many frames on its stream
  (`open_subscription`).
- Stream 0 carries the server's asynchronous ERROR frames: rejected writes (kept as
  `WriteRejected` until `take_rejections`), and the reasons the server closes the connection
  (TAKEN_OVER, SHUTTING_DOWN, SLOW_SUBSCRIBER, ...). Each is also passed to `on_error`.
- `send` writes a fire-and-forget frame on stream 0 (writes, BATCH, heartbeats) and then waits
  while the transport's buffer is above its high-water mark, so a fast writer is slowed to the
  speed of the network instead of buffering without bound.
- When the connection is lost, every open stream fails with `ConnectionLost`, and so does every
  later call.
- Reading is flow-controlled for subscriptions: a subscription whose queue is full calls
  `hold_reading`, and the socket is not read while any hold is in place, so the server's buffer
  for this connection backs up and the server merges our pending notifications per entity
  (SPEC §8). Reading never pauses while a reply is awaited (`request`, `expecting_reply`): a
  consumer that queries the server between two notifications cannot deadlock itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Final, Protocol, cast

from ..limits import DEFAULT_MAX_PAYLOAD, HEADER_SIZE, MAX_PAYLOAD_CEILING
from ..protocol.codes import CLOSING_ERRORS, SERVER_CLOSING_FLAG, ErrorCode, Opcode
from ..protocol.errors import ProtocolError
from ..protocol.frame import Frame, FrameReader, encode_header
from ..protocol.messages import SERVER_MESSAGES, Error, Message
from ..protocol.wire import op_name
from .errors import (
    ConnectionLost,
    ConvergeError,
    PayloadTooLarge,
    ServerError,
    WriteRejected,
    error_from_frame,
    is_write_rejection,
)

ErrorCallback = Callable[[ConvergeError], None]
"""Called with each asynchronous error the server reports (rejected writes included)."""

MAX_STREAM_ID: Final = 0xFFFF
WRITE_BUFFER_HIGH: Final = 1024 * 1024
"""Bytes buffered in the transport above which writers wait (`send`, `drain`)."""
COALESCE_LIMIT: Final = 64 * 1024
"""Queued frame bytes above which they are written to the transport at once (see `_write`)."""
CLOSE_TIMEOUT: Final = 10.0
"""Seconds `close` waits for buffered frames to be written before aborting the transport."""


class StreamSink(Protocol):
    """What receives the frames of one non-zero stream."""

    def deliver(self, message: Message) -> bool:
        """Take a message that arrived on the stream; return True when the stream is finished
        (its id is then free for reuse)."""

    def fail(self, exc: BaseException) -> None:
        """The stream ends without a reply: the connection is lost, or a reply did not decode."""


class _Reply:
    """A request waiting for its one reply: an ERROR becomes the typed exception."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Message]) -> None:
        self.future = future

    def deliver(self, message: Message) -> bool:
        if not self.future.done():
            if isinstance(message, Error):
                self.future.set_exception(
                    error_from_frame(message.code, message.op, message.message)
                )
            else:
                self.future.set_result(message)
        return True

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class Connection(asyncio.Protocol):
    """One connection to a server, as an asyncio protocol. Open it with `open_connection`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        on_error: ErrorCallback | None = None,
        on_lost: Callable[[ConnectionLost], None] | None = None,
    ) -> None:
        self._loop = loop
        self._on_error = on_error
        self.on_lost = on_lost
        """Called once with the `ConnectionLost` when the connection is gone."""
        self._reader = FrameReader(MAX_PAYLOAD_CEILING)
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, StreamSink] = {}
        self._next_stream = 1
        self._write_ready = asyncio.Event()
        self._write_ready.set()
        self._closed: asyncio.Future[None] = loop.create_future()
        self._lost_message: str | None = None
        self._lost_reason: BaseException | None = None
        self._rejections: list[WriteRejected] = []
        self._out: list[bytes | bytearray] = []
        self._out_size = 0
        self._flush_scheduled = False
        self._read_holds: set[object] = set()
        self._replies_awaited = 0
        self._reading_paused = False
        self.max_payload: int = DEFAULT_MAX_PAYLOAD
        """The largest payload the server accepts (from CONNECTED)."""

    # --- state --------------------------------------------------------------------------------

    @property
    def is_lost(self) -> bool:
        """Whether the connection is gone (or going: the server said it closes, or we closed)."""
        return self._lost_message is not None

    @property
    def writing_paused(self) -> bool:
        """Whether the transport's buffer is above its high-water mark (writers are waiting)."""
        return not self._write_ready.is_set()

    @property
    def reading_paused(self) -> bool:
        """Whether the socket is not being read (a subscription's queue is full)."""
        return self._reading_paused

    @property
    def in_flight(self) -> int:
        """The number of open streams (requests waiting for their reply, subscriptions)."""
        return len(self._streams)

    def lost_error(self) -> ConnectionLost:
        """A fresh `ConnectionLost` saying why the connection is gone."""
        return ConnectionLost(self._lost_message or "the connection is closed", self._lost_reason)

    def check_open(self) -> None:
        """Raise `ConnectionLost` if the connection is gone."""
        if self._lost_message is not None:
            raise self.lost_error()

    def take_rejections(self) -> WriteRejected | None:
        """The rejected writes reported since the last call: the oldest, with the others in its
        `more`; None if there were none."""
        if not self._rejections:
            return None
        first, *more = self._rejections
        self._rejections = []
        return first.with_more(tuple(more))

    # --- streams ------------------------------------------------------------------------------

    def open_stream(self, sink: StreamSink) -> int:
        """Register `sink` under a free non-zero stream id, and return the id."""
        self.check_open()
        if len(self._streams) >= MAX_STREAM_ID:
            raise ConvergeError(
                f"{MAX_STREAM_ID} requests and subscriptions are already open on this connection"
            )
        stream_id = self._next_stream
        while stream_id in self._streams:
            stream_id = stream_id % MAX_STREAM_ID + 1
        self._next_stream = stream_id % MAX_STREAM_ID + 1
        self._streams[stream_id] = sink
        return stream_id

    def release_stream(self, stream_id: int) -> None:
        """Free a stream id (a sink that is done before its stream ends, e.g. after UNSUBSCRIBE)."""
        self._streams.pop(stream_id, None)

    async def request(self, message: Message) -> Message:
        """Send `message` on a new stream and return the reply.

        An ERROR reply raises its typed `ServerError`; a lost connection `ConnectionLost`. If the
        caller is cancelled, the stream id stays reserved until the reply arrives, so that a late
        reply is never taken for the answer to another request.
        """
        payload = self._payload_of(message)
        future: asyncio.Future[Message] = self._loop.create_future()
        stream_id = self.open_stream(_Reply(future))
        try:
            self._write(message.OPCODE, stream_id, payload)
        except BaseException:
            self.release_stream(stream_id)
            raise
        with self.expecting_reply():
            return await future

    def open_subscription(self, message: Message, sink: StreamSink) -> int:
        """Register `sink` on a new stream, send `message` (SUBSCRIBE, SUBSCRIBE_EVENTS) on it,
        and return the stream id, which is the subscription id. Every frame of the stream goes
        to `sink` until it says the stream is finished or `release_stream` frees it."""
        payload = self._payload_of(message)
        stream_id = self.open_stream(sink)
        try:
            self._write(message.OPCODE, stream_id, payload)
        except BaseException:
            self.release_stream(stream_id)
            raise
        return stream_id

    # --- reading flow control -----------------------------------------------------------------

    def hold_reading(self, owner: object) -> None:
        """Stop reading the socket on behalf of `owner` (a subscription whose queue is full),
        until `release_reading(owner)`. Reading goes on while a reply is awaited."""
        self._read_holds.add(owner)
        self._update_reading()

    def release_reading(self, owner: object) -> None:
        """Withdraw `owner`'s hold; reading resumes when no hold is left."""
        if owner in self._read_holds:
            self._read_holds.discard(owner)
            self._update_reading()

    @contextlib.contextmanager
    def expecting_reply(self) -> Iterator[None]:
        """Keep reading the socket during the block, whatever the holds: a reply is awaited."""
        self._replies_awaited += 1
        self._update_reading()
        try:
            yield
        finally:
            self._replies_awaited -= 1
            self._update_reading()

    def _update_reading(self) -> None:
        """Pause or resume reading the transport to match the holds and the awaited replies."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        pause = bool(self._read_holds) and self._replies_awaited == 0
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    # --- fire-and-forget ----------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        """Send `message` on stream 0 (no reply), then wait while the write buffer is full.

        Raises `PayloadTooLarge` (or the encoder's `EncodeError`) before anything is written.
        """
        self._write(message.OPCODE, 0, self._payload_of(message))
        if not self._write_ready.is_set():
            await self.drain()

    async def send_payload(self, opcode: Opcode, payload: bytes | bytearray) -> None:
        """Send an already encoded payload on stream 0, then wait while the write buffer is full.

        The payload is not copied: it must not change after the call.
        """
        self.check_open()
        self._check_size(len(payload), op_name(opcode))
        self._write(opcode, 0, payload)
        if not self._write_ready.is_set():
            await self.drain()

    def send_nowait(self, message: Message) -> None:
        """Send `message` on stream 0 without waiting for the buffer (small frames: heartbeats)."""
        self.check_open()
        self._write(message.OPCODE, 0, message.encode())

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        await self._write_ready.wait()
        self.check_open()

    def _payload_of(self, message: Message) -> bytes:
        self.check_open()
        payload = message.encode()
        self._check_size(len(payload), message.OPCODE.name)
        return payload

    def _check_size(self, size: int, what: str) -> None:
        if size > self.max_payload:
            raise PayloadTooLarge(size, self.max_payload, f"the {what} frame's payload")

    def _write(self, opcode: int, stream_id: int, payload: bytes | bytearray) -> None:
        """Queue a frame. Frames queued during one pass of the event loop are written to the
        transport together (one system call rather than one per frame), at the end of the pass
        or as soon as `COALESCE_LIMIT` bytes are queued, whichever comes first."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise self.lost_error()
        out = self._out
        out.append(encode_header(opcode, stream_id, len(payload)))
        out.append(payload)
        self._out_size += HEADER_SIZE + len(payload)
        if self._out_size >= COALESCE_LIMIT:
            self._flush_out()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        """Hand the queued frames to the transport (which may then call `pause_writing`)."""
        self._flush_scheduled = False
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    # --- closing ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the connection (idempotent) and wait until the transport is closed.

        Frames already written are sent first; after `CLOSE_TIMEOUT` seconds of a peer that does
        not read, the transport is aborted.
        """
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self._flush_out()
            self._mark_lost("the connection was closed by this client", None)
            transport.close()
        if transport is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), CLOSE_TIMEOUT)
        except TimeoutError:
            transport.abort()
            await asyncio.shield(self._closed)

    def abort(self, message: str, reason: BaseException | None = None) -> None:
        """Drop the connection at once (a broken server, or a protocol error)."""
        self._mark_lost(message, reason)
        if self._transport is not None:
            self._transport.abort()

    def _mark_lost(self, message: str, reason: BaseException | None) -> None:
        """Record why the connection is gone (the first reason wins) and fail every stream."""
        if self._lost_message is None:
            self._lost_message = message
            self._lost_reason = reason
        self._out.clear()
        self._out_size = 0
        streams, self._streams = self._streams, {}
        for sink in streams.values():
            sink.fail(self.lost_error())
        self._write_ready.set()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by asyncio once connected."""
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def connection_lost(self, exc: Exception | None) -> None:
        """Called by asyncio when the connection is closed: fail every stream, wake writers."""
        if exc is None:
            self._mark_lost("the server closed the connection", None)
        else:
            self._mark_lost(f"the connection to the server was lost ({exc})", exc)
        if not self._closed.done():
            self._closed.set_result(None)
        if self.on_lost is not None:
            self.on_lost(self.lost_error())

    def pause_writing(self) -> None:
        """Called by asyncio when the write buffer goes above the high-water mark."""
        self._write_ready.clear()

    def resume_writing(self) -> None:
        """Called by asyncio when the write buffer drains below the low-water mark."""
        self._write_ready.set()

    def data_received(self, data: bytes) -> None:
        """Called by asyncio with each chunk received: split it into frames and dispatch them."""
        try:
            frames = self._reader.feed(data)
        except ProtocolError as exc:
            self.abort(f"the server sent a bad frame ({exc.message})")
            return
        for frame in frames:
            self._dispatch(frame)

    # --- dispatch -----------------------------------------------------------------------------

    def _dispatch(self, frame: Frame) -> None:
        message = self._decode(frame)
        if message is not None:
            if frame.stream_id == 0:
                if isinstance(message, Error):
                    self._asynchronous_error(message, frame.flags & SERVER_CLOSING_FLAG != 0)
            else:
                sink = self._streams.get(frame.stream_id)
                if sink is not None and sink.deliver(message):
                    self._streams.pop(frame.stream_id, None)
        if frame.flags & SERVER_CLOSING_FLAG:
            self._server_closes(message)

    def _decode(self, frame: Frame) -> Message | None:
        """The message of a frame; on a frame that does not decode, fail its stream (if any)."""
        cls = SERVER_MESSAGES.get(frame.opcode)
        try:
            if cls is None:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_OPCODE, f"unknown opcode 0x{frame.opcode:02x}", frame.opcode
                )
            return cls.decode(frame.payload)
        except ProtocolError as exc:
            error = ConvergeError(
                f"could not decode a frame from the server ({exc.message}); the SDK and the "
                "server may speak different protocol versions",
                code=exc.code,
                op=frame.opcode,
            )
            sink = self._streams.pop(frame.stream_id, None) if frame.stream_id else None
            if sink is not None:
                sink.fail(error)
            else:
                self._report(error)
            return None

    def _asynchronous_error(self, message: Error, closing: bool) -> None:
        """An ERROR on stream 0: a rejected write, or why the server closes the connection."""
        error: ServerError
        if closing or message.code in CLOSING_ERRORS:
            error = error_from_frame(message.code, message.op, message.message)
            self._mark_lost("the server closed the connection", error)
        elif is_write_rejection(message.op):
            error = WriteRejected(message.code, message.op, message.message)
            self._rejections.append(error)
        else:
            error = error_from_frame(message.code, message.op, message.message)
        self._report(error)

    def _server_closes(self, message: Message | None) -> None:
        """The frame had the closing flag: nothing more will come. Close our side too."""
        reason = None
        if isinstance(message, Error):
            reason = error_from_frame(message.code, message.op, message.message)
        self._mark_lost("the server closed the connection", reason)
        if self._transport is not None:
            self._transport.close()

    def _report(self, error: ConvergeError) -> None:
        """Pass an asynchronous error to the `on_error` callback, shielding the reader from it."""
        if self._on_error is None:
            return
        try:
            self._on_error(error)
        except Exception as exc:
            self._loop.call_exception_handler(
                {"message": "the on_error callback raised", "exception": exc, "protocol": self}
            )


async def open_connection(
    host: str,
    port: int,
    *,
    on_error: ErrorCallback | None = None,
    on_lost: Callable[[ConnectionLost], None] | None = None,
) -> Connection:
    """Open a TCP connection to a server (no CONNECT yet: see `Client`)."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(
        lambda: Connection(loop, on_error=on_error, on_lost=on_lost), host, port
    )
    return protocol
