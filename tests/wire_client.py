"""A raw protocol client for server tests: real TCP, real frames, no SDK in between.

It lets a test send exactly the bytes it wants (malformed ones included) and see every frame the
server answers with.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import TYPE_CHECKING, Any

from convergedb.protocol import (
    Connect,
    Connected,
    ConnectMode,
    Error,
    ErrorCode,
    Frame,
    FrameReader,
    Message,
    Ok,
    Sync,
    decode_message,
    encode_message,
)

if TYPE_CHECKING:
    from server_fixture import ServerProcess

TIMEOUT = 10.0
OPEN: list[WireClient] = []
"""Every client opened by the current test; `close_all` (an autouse fixture) closes them."""


class WireClient:
    """One raw connection. Frames on stream 0 collect in `unsolicited`; replies by stream id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = FrameReader(max_payload=0xFFFF_FFFF)
        self._replies: dict[int, asyncio.Queue[tuple[Frame, Message]]] = {}
        self.unsolicited: asyncio.Queue[tuple[Frame, Message]] = asyncio.Queue()
        self.eof = asyncio.Event()
        self._streams = itertools.count(1)
        self._task = asyncio.create_task(self._read())
        OPEN.append(self)

    @classmethod
    async def open(cls, host: str, port: int) -> WireClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def _read(self) -> None:
        try:
            while data := await self._reader.read(65536):
                for frame in self._frames.feed(data):
                    message = decode_message(frame.opcode, frame.payload)
                    queue = self._replies.setdefault(frame.stream_id, asyncio.Queue())
                    target = self.unsolicited if frame.stream_id == 0 else queue
                    target.put_nowait((frame, message))
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof.set()

    def next_stream(self) -> int:
        return next(self._streams) % 65535 + 1

    def send(self, message: Message, stream_id: int = 0) -> None:
        self._writer.write(encode_message(message, stream_id))

    def send_raw(self, data: bytes) -> None:
        self._writer.write(data)

    async def reply(self, stream_id: int) -> tuple[Frame, Message]:
        queue = self._replies.setdefault(stream_id, asyncio.Queue())
        return await asyncio.wait_for(queue.get(), TIMEOUT)

    async def request(self, message: Message, stream_id: int | None = None) -> Message:
        """Send a request and return its reply (an Error reply is returned, not raised)."""
        stream = self.next_stream() if stream_id is None else stream_id
        self.send(message, stream)
        _, reply = await self.reply(stream)
        return reply

    async def connect(self, mode: ConnectMode = ConnectMode.ALLOCATE, **fields: Any) -> Connected:
        reply = await self.request(Connect(mode, **fields))
        assert isinstance(reply, Connected), reply
        return reply

    async def sync(self) -> int:
        reply = await self.request(Sync())
        assert isinstance(reply, Ok), reply
        return reply.value

    async def next_unsolicited(self) -> tuple[Frame, Message]:
        return await asyncio.wait_for(self.unsolicited.get(), TIMEOUT)

    async def expect_async_error(self, code: ErrorCode, op: int | None = None) -> Error:
        """The next stream-0 frame, which must be an ERROR with `code` (and `op`)."""
        _, message = await self.next_unsolicited()
        assert isinstance(message, Error), message
        assert message.code == code, message
        if op is not None:
            assert message.op == op, message
        return message

    async def wait_closed(self) -> None:
        """Wait until the server has closed the connection."""
        await asyncio.wait_for(self.eof.wait(), TIMEOUT)

    async def close(self) -> None:
        if self._writer.is_closing() and self._task.done():
            return
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def open_client(server: ServerProcess) -> WireClient:
    """A new, not yet connected client of `server`."""
    return await WireClient.open(server.host, server.port)


async def close_all() -> None:
    """Close every client the test opened (the server may already have closed them)."""
    while OPEN:
        await OPEN.pop().close()
