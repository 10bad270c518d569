"""A loopback TCP proxy that injects network faults between clients and a server, for tests.

    proxy = FaultProxy(server.host, server.port)
    await proxy.start()
    client = await cdb.connect(*proxy.address)
    proxy.set_delay(0.05)            # 50 ms more latency, each way, on every link
    proxy.stall()                    # stop forwarding (a silent partition); proxy.resume() ends it
    proxy.cut(reset=True)            # RST both sides of every open link
    proxy.half_close(Direction.UP)   # the server reads EOF; server -> client still flows
    proxy.cut(side=Side.CLIENT)      # drop the client's side only: a half-open link on the server
    proxy.refuse_new = True          # new connections are reset at once (reconnects fail)
    await proxy.close()

Each accepted connection is a `Link` with one `Pump` per direction. A pump reads a chunk,
stamps it with its due time (now + the delay), and a sender writes it once due, in order: the
delay is latency, not a throughput cap. A stalled pump neither reads nor sends, so TCP flow
control backs the sender up as a silent network would. End of stream is forwarded as a TCP
half-close (`write_eof`), so a peer that closes its writing side is seen as such on the other.

Faults act on the links open when they are called; `set_delay`, `stall` and `refuse_new` also
apply to links opened later, until changed. Counters (`Pump.forwarded`, `Pump.last_forward`)
let a test relate what the server saw to when it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import time
from collections.abc import Iterable

CHUNK = 65536


class Direction(enum.Flag):
    """Which way bytes flow: UP is client -> server, DOWN is server -> client."""

    UP = enum.auto()
    DOWN = enum.auto()
    BOTH = UP | DOWN


class Side(enum.Enum):
    """Which sockets a cut drops."""

    BOTH = "both"
    CLIENT = "client"
    """Only the client's socket: the server's stays open and silent (a half-open connection)."""
    SERVER = "server"
    """Only the server's socket: the client's stays open and silent."""


class Pump:
    """One direction of one link: reads from `reader`, writes to `writer` after the delay."""

    def __init__(
        self,
        proxy: FaultProxy,
        direction: Direction,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.direction = direction
        self.reader = reader
        self.writer = writer
        self.flowing = asyncio.Event()
        if not proxy.stalled & direction:
            self.flowing.set()
        self.forwarded = 0
        """Bytes written to the far side so far."""
        self.last_forward = 0.0
        """`time.monotonic()` of the last write to the far side (0 if none yet)."""
        self.eof_sent = False
        self._queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self.tasks = (
            asyncio.ensure_future(self._receive()),
            asyncio.ensure_future(self._send()),
        )

    @property
    def done(self) -> bool:
        return all(task.done() for task in self.tasks)

    async def _receive(self) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                await self.flowing.wait()
                data = await self.reader.read(CHUNK)
                due = time.monotonic() + self.proxy.delay_of(self.direction)
                self._queue.put_nowait((due, data))
                if not data:
                    return
        self._queue.put_nowait((0.0, b""))  # a reset or an error ends the stream too

    async def _send(self) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                due, data = await self._queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)  # the injected latency itself
                await self.flowing.wait()
                if not data:
                    self.half_close()
                    return
                self.writer.write(data)
                self.forwarded += len(data)
                self.last_forward = time.monotonic()
                await self.writer.drain()

    def half_close(self) -> None:
        """Send EOF to the far side (its peer reads end of stream; the other way still flows)."""
        if self.eof_sent:
            return
        self.eof_sent = True
        transport = self.writer.transport
        if not transport.is_closing() and transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()


class Link:
    """One proxied connection: the client's socket, the server's socket and two pumps."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.client_writer = client[1]
        self.server_writer = server[1]
        self.opened_at = time.monotonic()
        self.up = Pump(proxy, Direction.UP, client[0], server[1])
        self.down = Pump(proxy, Direction.DOWN, server[0], client[1])
        self.kept_open: list[asyncio.StreamWriter] = []
        """Sockets a one-sided cut leaves open (and silent) until the proxy closes."""
        self.ended = asyncio.ensure_future(self._close_when_done())

    async def _close_when_done(self) -> None:
        """Once both directions have ended, close the sockets (but those kept open)."""
        await asyncio.gather(*self.up.tasks, *self.down.tasks, return_exceptions=True)
        for writer in (self.client_writer, self.server_writer):
            if writer not in self.kept_open:
                writer.transport.abort()

    def pumps(self, direction: Direction) -> list[Pump]:
        return [pump for pump in (self.up, self.down) if pump.direction & direction]

    @property
    def closed(self) -> bool:
        """Whether both directions have ended (or the link was cut)."""
        return self.up.done and self.down.done

    def cut(self, *, reset: bool, side: Side) -> None:
        """Drop the link's sockets (`side`), with an RST (`reset`) or a plain close (FIN)."""
        self.up.stop()
        self.down.stop()
        dropped = {
            Side.BOTH: (self.client_writer, self.server_writer),
            Side.CLIENT: (self.client_writer,),
            Side.SERVER: (self.server_writer,),
        }[side]
        for writer in (self.client_writer, self.server_writer):
            if writer in dropped:
                _drop(writer, reset=reset)
            else:
                self.kept_open.append(writer)


def _drop(writer: asyncio.StreamWriter, *, reset: bool) -> None:
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if reset and sock is not None:
        with contextlib.suppress(OSError):
            # linger on, timeout 0: close() sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class FaultProxy:
    """The proxy: listens on 127.0.0.1 (any free port) and forwards to `host:port`."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.links: list[Link] = []
        """Every link ever opened (cut ones included); `open_links` has the live ones."""
        self.accepted = 0
        self.refused = 0
        self.refuse_new = False
        """Reset new connections at once instead of forwarding them."""
        self.stalled = Direction(0)
        """Directions that stop forwarding (current and new links) until `resume`."""
        self._delay = {Direction.UP: 0.0, Direction.DOWN: 0.0}
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Event()

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    @property
    def open_links(self) -> list[Link]:
        return [link for link in self.links if not link.closed]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every link (with a plain close)."""
        if self._server is not None:
            self._server.close()
        for link in self.links:
            link.cut(reset=False, side=Side.BOTH)
            link.kept_open.clear()
        for link in self.links:
            await link.ended
            for writer in (link.client_writer, link.server_writer):
                writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    # --- faults ----------------------------------------------------------------------------------

    def delay_of(self, direction: Direction) -> float:
        return self._delay[direction]

    def set_delay(self, seconds: float, direction: Direction = Direction.BOTH) -> None:
        """Add `seconds` of latency to every chunk going `direction` (0 turns it off)."""
        for single in (Direction.UP, Direction.DOWN):
            if single & direction:
                self._delay[single] = seconds

    def stall(self, direction: Direction = Direction.BOTH) -> None:
        """Stop forwarding `direction` on every link, current and new, until `resume`."""
        self.stalled |= direction
        for pump in self._pumps(direction):
            pump.flowing.clear()

    def resume(self, direction: Direction = Direction.BOTH) -> None:
        """Forward `direction` again (what the stall held back goes through, in order)."""
        self.stalled &= ~direction
        for pump in self._pumps(direction):
            pump.flowing.set()

    def cut(self, *, reset: bool = True, side: Side = Side.BOTH) -> int:
        """Drop every open link: an RST (`reset`) or a FIN, on `side`. Returns how many."""
        links = self.open_links
        for link in links:
            link.cut(reset=reset, side=side)
        return len(links)

    def half_close(self, direction: Direction) -> int:
        """Send EOF in `direction` on every open link; the other direction keeps flowing.
        Bytes still queued for that direction are dropped. Returns how many links."""
        links = self.open_links
        for link in links:
            for pump in link.pumps(direction):
                pump.stop()
                pump.half_close()
        return len(links)

    async def wait_accepted(self, count: int, timeout: float = 15.0) -> None:
        """Wait until `count` connections in all have been accepted and forwarded."""
        async with asyncio.timeout(timeout):
            while self.accepted < count:
                self._changed.clear()
                await self._changed.wait()

    # --- internals -------------------------------------------------------------------------------

    def _pumps(self, direction: Direction) -> Iterable[Pump]:
        for link in self.open_links:
            yield from link.pumps(direction)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse_new:
            self.refused += 1
            _drop(writer, reset=True)
            return
        try:
            upstream = await asyncio.open_connection(*self.target)
        except OSError:
            self.refused += 1
            _drop(writer, reset=True)
            return
        self.links.append(Link(self, (reader, writer), upstream))
        self.accepted += 1
        self._changed.set()
