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
- `keep_alive` sends the heartbeats, as probes the server answers with PONG, and aborts the
  connection when nothing at all has been received for too long while reading: a link the
  network dropped on the server's side only (no RST or FIN ever reaches us) is noticed, and
  every request waiting on it fails, instead of hanging for ever.
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
from ..protocol.messages import SERVER_MESSAGES, Error, Heartbeat, Message
from ..protocol.wire import op_name
from .errors import (
    WRITE_OPS,
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


class _Probe:
    """The sink of a heartbeat sent as a probe: its PONG only needs to arrive (any frame
    received counts as a sign of life); the connection then may send the next probe."""

    __slots__ = ("connection",)

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def deliver(self, message: Message) -> bool:
        self.connection._probe_answered()
        return True

    def fail(self, exc: BaseException) -> None:
        self.connection._probe_answered()


class Connection(asyncio.Protocol):
    """One TCP connection to a server, as an asyncio protocol: frames in and out.

    The layer under `Client`, for tools and tests that send raw protocol messages; a client's
    is `Client.connection` (a new one after each reconnection). It knows frames and messages,
    not kinds or sources:

    - Every frame received is dispatched by its stream id: a request waiting for its one reply
      (`request`), or a subscription that receives many frames on its stream
      (`open_subscription`).
    - Stream 0 carries the server's asynchronous ERROR frames: rejected writes (kept as
      `WriteRejected` until `take_rejections`), and the reasons the server closes the
      connection (TAKEN_OVER, SHUTTING_DOWN, SLOW_SUBSCRIBER, ...). Each is also passed to
      `on_error`.
    - `send` writes a fire-and-forget frame on stream 0 and then waits while the transport's
      buffer is above its high-water mark, so a fast writer is slowed to the speed of the
      network instead of buffering without bound.
    - When the connection is lost, every open stream fails with `ConnectionLost`, and so does
      every later call.
    - Reading is flow-controlled for subscriptions (`hold_reading`), but never pauses while a
      reply is awaited.
    - `keep_alive` (run by the client) sends heartbeats that ask for a PONG and aborts the
      connection when the server has been silent too long: a dead link is always noticed.

    Example:
        ```python
        from convergedb.protocol.messages import ListKinds

        reply = await client.connection.request(ListKinds())  # a KindList
        ```
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        on_error: ErrorCallback | None = None,
        on_lost: Callable[[ConnectionLost], None] | None = None,
    ) -> None:
        """Make the protocol object (the SDK's `open_connection` does it, for asyncio).

        Args:
            loop: The running event loop.
            on_error: Called with each asynchronous error the server reports.
            on_lost: Called once with the `ConnectionLost` when the connection is gone.
        """
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
        self.writes_sent = 0
        """How many write frames (ASSERT, PATCH, RETRACT, BATCH) were handed to this
        connection."""
        self.writes_synced = 0
        """How many of `writes_sent` an answered SYNC covers (`Client.sync` sets it): the
        writes of this connection known to be flushed."""
        self._heard = 0
        self._probe_stream = 0
        self._bytes_out = 0

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
        """The number of open streams (requests waiting for their reply, subscriptions); the
        heartbeat probe of `keep_alive` is not counted."""
        return len(self._streams) - (1 if self._probe_stream else 0)

    @property
    def unsynced_writes(self) -> int:
        """How many writes were sent on this connection since the last answered SYNC covered
        them (see `writes_sent`): the writes a lost connection may have dropped."""
        return self.writes_sent - self.writes_synced

    def lost_error(self) -> ConnectionLost:
        """Make a fresh `ConnectionLost` saying why the connection is gone (not raised)."""
        return ConnectionLost(self._lost_message or "the connection is closed", self._lost_reason)

    def check_open(self) -> None:
        """Check that the connection is open.

        Raises:
            ConnectionLost: The connection is gone.
        """
        if self._lost_message is not None:
            raise self.lost_error()

    def take_rejections(self) -> WriteRejected | None:
        """Take the rejected writes reported since the last call.

        Returns:
            The oldest `WriteRejected`, with the others in its `more`; None if there were none.
        """
        if not self._rejections:
            return None
        first, *more = self._rejections
        self._rejections = []
        return first.with_more(tuple(more))

    # --- streams ------------------------------------------------------------------------------

    def open_stream(self, sink: StreamSink) -> int:
        """Register `sink` under a free non-zero stream id.

        Args:
            sink: What receives the frames of the stream (`deliver`, `fail`).

        Returns:
            The stream id.

        Raises:
            ConnectionLost: The connection is gone.
            ConvergeError: Every stream id is in use.
        """
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
        """Free a stream id (a sink that is done before its stream ends, e.g. after UNSUBSCRIBE).

        Args:
            stream_id: The id `open_stream` or `open_subscription` returned.
        """
        self._streams.pop(stream_id, None)

    async def request(self, message: Message) -> Message:
        """Send `message` on a new stream and return the reply.

        If the caller is cancelled, the stream id stays reserved until the reply arrives, so
        that a late reply is never taken for the answer to another request.

        Args:
            message: A request message (e.g. QUERY, SYNC, LIST_KINDS).

        Returns:
            The server's reply message.

        Raises:
            ServerError: The server answered with an ERROR (its typed subclass).
            ConnectionLost: The connection is gone, or was lost before the reply.
            PayloadTooLarge: The message exceeds the server's maximum payload.
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
        """Open a subscription's stream: register `sink` on a new stream and send `message`.

        Every frame of the stream goes to `sink` until it says the stream is finished or
        `release_stream` frees it.

        Args:
            message: The SUBSCRIBE or SUBSCRIBE_EVENTS message.
            sink: What receives the frames of the stream.

        Returns:
            The stream id, which is the subscription id.

        Raises:
            ConnectionLost: The connection is gone.
            PayloadTooLarge: The message exceeds the server's maximum payload.
        """
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
        """Stop reading the socket on behalf of `owner`, until `release_reading(owner)`.

        Reading goes on while a reply is awaited.

        Args:
            owner: Who holds reading back (a subscription whose queue is full).
        """
        self._read_holds.add(owner)
        self._update_reading()

    def release_reading(self, owner: object) -> None:
        """Withdraw `owner`'s hold; reading resumes when no hold is left.

        Args:
            owner: Who held reading back with `hold_reading`.
        """
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
                self._heard += 1  # the time reading was held is not silence (`keep_alive`)
                transport.resume_reading()

    # --- fire-and-forget ----------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        """Send `message` on stream 0 (no reply), then wait while the write buffer is full.

        Args:
            message: A fire-and-forget message (a write, a BATCH, a HEARTBEAT).

        Raises:
            PayloadTooLarge: The message exceeds the server's maximum payload (nothing is
                written).
            ValueError: The message cannot be encoded (the encoder's `EncodeError`).
            ConnectionLost: The connection is gone.
        """
        self._write(message.OPCODE, 0, self._payload_of(message))
        if not self._write_ready.is_set():
            await self.drain()

    async def send_payload(self, opcode: Opcode, payload: bytes | bytearray) -> None:
        """Send an already encoded payload on stream 0, then wait while the write buffer is full.

        The payload is not copied: it must not change after the call.

        Args:
            opcode: The frame's opcode.
            payload: The frame's payload.

        Raises:
            PayloadTooLarge: The payload exceeds the server's maximum (nothing is written).
            ConnectionLost: The connection is gone.
        """
        self.check_open()
        self._check_size(len(payload), op_name(opcode))
        self._write(opcode, 0, payload)
        if not self._write_ready.is_set():
            await self.drain()

    def send_nowait(self, message: Message) -> None:
        """Send `message` on stream 0 without waiting for the buffer (small frames: heartbeats).

        Args:
            message: A small fire-and-forget message.

        Raises:
            ConnectionLost: The connection is gone.
        """
        self.check_open()
        self._write(message.OPCODE, 0, message.encode())

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark.

        Raises:
            ConnectionLost: The connection is gone (or was lost while waiting).
        """
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
        if opcode in WRITE_OPS:
            self.writes_sent += 1
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
            self._bytes_out += len(data)

    # --- liveness -----------------------------------------------------------------------------

    async def keep_alive(self, heartbeat_interval: float, silence_limit: float) -> None:
        """Send heartbeats and watch the server's silence, until the connection is lost.

        Every `heartbeat_interval` seconds, or every quarter of the liveness deadline if that
        is shorter (`silence_limit` / 2), a HEARTBEAT goes out on a non-zero stream, so the
        server answers it with a PONG (while one is unanswered, the next goes on stream 0: it
        only keeps the server's liveness count going). Any byte received is a sign of life.
        When nothing at all was received for `silence_limit` seconds while the socket was
        being read, the connection is aborted as dead: every request waiting on it fails with
        `ConnectionLost`, and the client reconnects. Time during which reading is held (a full
        subscription queue: the replies are stuck behind the notifications we do not read) or
        the event loop is blocked does not count as silence, nor does time during which a
        backed-up write buffer keeps draining (a writer saturating a slow link: the PONG is
        queued behind its writes, but the peer is evidently taking them).

        Args:
            heartbeat_interval: Seconds between two heartbeats (the interval declared in
                CONNECT; the server counts on at least this rate).
            silence_limit: Seconds without receiving anything after which the connection is
                taken for dead; the client uses half the liveness deadline, so that it notices
                (and reconnects) before the server retracts its source.
        """
        loop = self._loop
        probe_every = min(heartbeat_interval, silence_limit / 2)
        step = min(probe_every, silence_limit / 4)
        silent = 0.0
        heard = self._heard
        backlog, accepted = self._write_backlog()
        last = loop.time()
        next_probe = last + probe_every
        while not self.is_lost:
            await asyncio.sleep(max(min(step, next_probe - last), 0.0))
            now = loop.time()
            was_backed_up, was_accepted = backlog > 0, accepted
            backlog, accepted = self._write_backlog()
            if (
                self._heard != heard
                or self._reading_paused
                or (was_backed_up and accepted != was_accepted)
            ):
                heard = self._heard
                silent = 0.0
            else:
                silent += min(now - last, step)  # a blocked event loop counts one step at most
            last = now
            if silent >= silence_limit:
                self.abort(
                    f"the server sent nothing for {silent:.1f} s, although it answers every "
                    "heartbeat: the connection is presumed dead (the network dropped it)"
                )
                return
            if now >= next_probe:
                next_probe = now + probe_every
                try:
                    self._send_probe()
                except ConnectionLost:
                    return

    def _write_backlog(self) -> tuple[int, int]:
        """(bytes waiting in the transport, bytes the transport has handed to the socket)."""
        transport = self._transport
        backlog = transport.get_write_buffer_size() if transport is not None else 0
        return backlog, self._bytes_out - backlog

    def _send_probe(self) -> None:
        """A HEARTBEAT that asks for a PONG, or a plain one while the last is unanswered."""
        self.check_open()
        if self._probe_stream or len(self._streams) >= MAX_STREAM_ID:
            self._write(Heartbeat.OPCODE, 0, b"")
            return
        stream_id = self.open_stream(_Probe(self))
        self._probe_stream = stream_id
        self._write(Heartbeat.OPCODE, stream_id, b"")

    def _probe_answered(self) -> None:
        self._probe_stream = 0

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
        """Drop the connection at once (a broken server, or a protocol error).

        Args:
            message: How it was lost, for the `ConnectionLost` every stream fails with.
            reason: Why, if known.
        """
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
        self._probe_stream = 0
        streams, self._streams = self._streams, {}
        for sink in streams.values():
            sink.fail(self.lost_error())
        self._write_ready.set()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by asyncio once connected.

        @private: asyncio calls it.

        Args:
            transport: The connection's transport.
        """
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def connection_lost(self, exc: Exception | None) -> None:
        """Called by asyncio when the connection is closed: fail every stream, wake writers.

        @private: asyncio calls it.

        Args:
            exc: The network error, or None for a clean close.
        """
        if exc is None:
            self._mark_lost("the server closed the connection", None)
        else:
            self._mark_lost(f"the connection to the server was lost ({exc})", exc)
        if not self._closed.done():
            self._closed.set_result(None)
        if self.on_lost is not None:
            self.on_lost(self.lost_error())

    def pause_writing(self) -> None:
        """Called by asyncio when the write buffer goes above the high-water mark.

        @private: asyncio calls it.
        """
        self._write_ready.clear()

    def resume_writing(self) -> None:
        """Called by asyncio when the write buffer drains below the low-water mark.

        @private: asyncio calls it.
        """
        self._write_ready.set()

    def data_received(self, data: bytes) -> None:
        """Called by asyncio with each chunk received: split it into frames and dispatch them.

        @private: asyncio calls it.

        Args:
            data: The bytes received.
        """
        self._heard += 1
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
    """Open a TCP connection to a server (no CONNECT yet: see `Client`).

    Args:
        host: The server's address.
        port: The server's client port.
        on_error: Called with each asynchronous error the server reports.
        on_lost: Called once with the `ConnectionLost` when the connection is gone.

    Returns:
        The connected `Connection`.

    Raises:
        OSError: The server cannot be reached.
    """
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(
        lambda: Connection(loop, on_error=on_error, on_lost=on_lost), host, port
    )
    return protocol
