"""The client: `connect()` to a server, register kinds, write, read.

    import convergedb as cdb

    async with cdb.connect("127.0.0.1", 3727, name="game-server-1") as client:
        players = await client.register_kind(Player)
        await players.assert_("player:ana", Player(name="ana", hp=90))
        await client.sync()  # durable and visible from here
        result = await players.query("player:ana")

`connect()` can also be awaited directly (`client = await cdb.connect(...)`); then close the client
with `await client.close()`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any, Final, TypeVar

from ..declare import kind_model
from ..limits import (
    DEFAULT_HEARTBEAT_INTERVAL_MS,
    DEFAULT_HOST,
    DEFAULT_LIVENESS_DEADLINE_MS,
    DEFAULT_PORT,
    MAX_SOURCE_ID,
    READ_ONLY_SOURCE_ID,
)
from ..protocol.codes import ConnectMode, Opcode
from ..protocol.messages import (
    Connect,
    Connected,
    CreateKind,
    GetKind,
    Heartbeat,
    KindInfo,
    KindList,
    ListKinds,
    Message,
    Ok,
    Pong,
    Sync,
)
from ..schema.evolution import check_prefix
from .batch import Batch
from .connection import Connection, ErrorCallback, open_connection
from .errors import ConnectionLost, ConvergeError
from .handle import KindHandle

T = TypeVar("T")
M = TypeVar("M", bound=Message)

_MAX_U32: Final = 0xFFFF_FFFF


class Client:
    """A connection to a ConvergeDB server, as a writer (one source) or read-only.

    Make one with `connect()`. Every method but `close` first raises a pending `WriteRejected`
    (a write the server dropped since the last call), then `ConnectionLost` if the connection
    is gone. So do the methods of its kind handles and batches.
    """

    def __init__(
        self,
        connection: Connection,
        connected: Connected,
        heartbeat_interval_ms: int,
        name: str,
    ) -> None:
        self._connection = connection
        self.name = name
        """The name this client gave the server (shown in the `convergedb_connections` kind)."""
        self.source_id: int | None = (
            None if connected.source_id == READ_ONLY_SOURCE_ID else connected.source_id
        )
        """The source this client writes as (0..63), or None for a read-only client."""
        self.liveness_deadline_ms = connected.liveness_deadline_ms
        """The liveness deadline in force (the one asked for, capped by the server's maximum)."""
        self.window_ms = connected.window_ms
        """The server's coalescing window."""
        self.max_payload = connected.max_payload
        """The largest frame payload the server accepts; batches are split to stay under it."""
        self.server_version = connected.server_version
        """The server's version string."""
        self.heartbeat_interval_ms = _effective_heartbeat(
            heartbeat_interval_ms, connected.liveness_deadline_ms
        )
        """How often this client sends a HEARTBEAT: as asked, or half the deadline in force
        when the server capped the deadline to or below the interval asked for."""
        connection.max_payload = connected.max_payload
        connection.on_lost = self._stop_heartbeats
        self._heartbeat = asyncio.get_running_loop().create_task(
            self._send_heartbeats(self.heartbeat_interval_ms / 1000), name="convergedb-heartbeat"
        )

    def __repr__(self) -> str:
        who = "read-only" if self.source_id is None else f"source {self.source_id}"
        state = "closed" if self.closed else "open"
        return f"<convergedb.Client {who}, {state}>"

    @property
    def read_only(self) -> bool:
        """Whether this client is read-only (it has no source and cannot write)."""
        return self.source_id is None

    @property
    def closed(self) -> bool:
        """Whether the connection is closed or lost."""
        return self._connection.is_lost

    @property
    def connection(self) -> Connection:
        """The protocol connection underneath (for tools and tests that send raw frames)."""
        return self._connection

    # --- kinds --------------------------------------------------------------------------------

    async def register_kind(self, cls: type[T]) -> KindHandle[T]:
        """Register the kind declared by `cls` (a `@convergedb.kind` class) and return its handle.

        Safe to call on every start-up: registering the same schema again returns the existing
        kind; a declaration that appends fields migrates the kind. A change to existing fields
        raises `SchemaConflictError`. Needs a writer connection (`ReadOnlyError` otherwise).
        """
        model = kind_model(cls)
        info = await self._request(CreateKind(model.definition), KindInfo)
        return self._handle(cls, info)

    async def resolve_kind(self, cls: type[T]) -> KindHandle[T]:
        """The handle of a kind that already exists on the server, without registering it.

        The declaration may be an older schema (a prefix of the server's): the handle then reads
        the entities without the newer fields, and cannot write (writes raise
        `ReadOnlyHandle`). Raises `UnknownKind` if the kind does not exist and
        `SchemaConflictError` if the declaration is not a prefix of the server's schema.
        """
        model = kind_model(cls)
        info = await self._request(GetKind(model.name, model.definition), KindInfo)
        return self._handle(cls, info)

    def _handle(self, cls: type[T], info: KindInfo) -> KindHandle[T]:
        model = kind_model(cls)
        check_prefix(info.kind, model.definition)
        return KindHandle(self, model, info.kind_id, info.schema_version, info.kind)

    async def list_kinds(self) -> list[KindInfo]:
        """Every kind of the server (system kinds included): id, schema version, definition."""
        reply = await self._request(ListKinds(), KindList)
        return list(reply.kinds)

    # --- writes and barriers ------------------------------------------------------------------

    def batch(self) -> Batch:
        """A new batch: `async with client.batch() as b: b.assert_(handle, id, value) ...`.

        The writes are sent as BATCH frames when the block ends, or at each `await b.flush()`.
        An exception in the block discards the writes not yet flushed.
        """
        self.raise_pending_errors()
        return Batch(self)

    async def sync(self) -> int:
        """Wait until every write this client sent before is flushed: durable and visible.

        Returns the seq of the flush that carried them (the last committed seq if there was
        nothing to flush); seqs increase over the server's whole life.

        The server reports a rejected write as soon as it receives it, so before it answers the
        SYNC: if any write sent before it was rejected, `sync` raises the `WriteRejected` (once)
        after the barrier. A `sync` that returns means every earlier write was accepted.
        """
        reply = await self._request(Sync(), Ok)
        self._raise_rejections()
        return reply.value

    async def ping(self) -> float:
        """The round-trip time to the server, in seconds (a HEARTBEAT answered by a PONG)."""
        start = time.perf_counter()
        await self._request(Heartbeat(), Pong)
        return time.perf_counter() - start

    # --- closing ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the connection and wait until it is closed. Calling it again does nothing.

        Writes already sent are delivered first, but `close` does not wait for the server to
        flush them: call `sync()` before closing for that. A writer's source then enters its
        liveness grace period: reconnecting with the same `source_id` before the deadline
        keeps its entities.
        """
        self._heartbeat.cancel()
        await self._connection.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # --- internals shared with handles and batches ---------------------------------------------

    def raise_pending_errors(self) -> None:
        """Raise the pending `WriteRejected` if any (once), then `ConnectionLost` if the
        connection is gone."""
        self._raise_rejections()
        self._connection.check_open()

    def _raise_rejections(self) -> None:
        rejected = self._connection.take_rejections()
        if rejected is not None:
            raise rejected

    async def _request(self, message: Message, reply_type: type[M]) -> M:
        """Send a request and return its reply, checked to be of the expected type."""
        self.raise_pending_errors()
        reply = await self._connection.request(message)
        if not isinstance(reply, reply_type):
            raise ConvergeError(
                f"the server answered {message.OPCODE.name} with {reply.OPCODE.name}, "
                f"expected {reply_type.OPCODE.name}",
                op=message.OPCODE,
            )
        return reply

    async def _send_write(
        self, opcode: Opcode, payload: bytes | bytearray, *, check: bool = True
    ) -> None:
        """Send an encoded write (or BATCH) on stream 0, raising pending errors first."""
        if check:
            self.raise_pending_errors()
        await self._connection.send_payload(opcode, payload)

    async def _send_heartbeats(self, interval: float) -> None:
        connection = self._connection
        while not connection.is_lost:
            await asyncio.sleep(interval)
            try:
                connection.send_nowait(Heartbeat())
            except ConnectionLost:
                return

    def _stop_heartbeats(self, _: ConnectionLost) -> None:
        self._heartbeat.cancel()


class Connector:
    """What `connect()` returns: await it for a `Client`, or use it as `async with`.

    `async with connect(...) as client:` closes the client when the block ends.
    """

    def __init__(
        self,
        host: str,
        port: int,
        connect_message: Connect,
        *,
        on_error: ErrorCallback | None,
        connect_timeout: float,
    ) -> None:
        self._host = host
        self._port = port
        self._connect = connect_message
        self._on_error = on_error
        self._timeout = connect_timeout
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._open().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._open()
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.close()

    async def _open(self) -> Client:
        """Connect, send CONNECT, and make the client; on any failure, close the socket."""
        address = f"{self._host}:{self._port}"
        try:
            async with asyncio.timeout(self._timeout):
                connection = await open_connection(self._host, self._port, on_error=self._on_error)
                try:
                    connected = await connection.request(self._connect)
                except BaseException:
                    await connection.close()
                    raise
        except TimeoutError:
            raise TimeoutError(
                f"could not connect to the ConvergeDB server at {address} within {self._timeout} s"
            ) from None
        if not isinstance(connected, Connected):
            await connection.close()
            raise ConvergeError(f"the server answered CONNECT with {connected.OPCODE.name}")
        return Client(
            connection, connected, self._connect.heartbeat_interval_ms, self._connect.name
        )


def connect(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    source_id: int | None = None,
    takeover: bool = False,
    read_only: bool = False,
    name: str = "",
    token: str = "",
    liveness_deadline_ms: int = DEFAULT_LIVENESS_DEADLINE_MS,
    heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS,
    on_error: Callable[[ConvergeError], None] | None = None,
    connect_timeout: float = 10.0,
) -> Connector:
    """Connect to a ConvergeDB server: `client = await connect(...)` or
    `async with connect(...) as client: ...`.

    - `source_id`: the source to write as (0..63). None (the default) has the server allocate
      the lowest free one; the client's `source_id` says which.
    - `takeover`: claim `source_id` even while another live connection holds it (that one is
      closed with TAKEN_OVER). For a writer that restarted before the server noticed that its
      old connection died.
    - `read_only`: no source; the client can read but not write.
    - `name`: shown in the `convergedb_connections` system kind. `token`: the authentication
      token, when the server requires one.
    - `liveness_deadline_ms`: how long the server waits after this connection is lost (or
      silent) before retracting everything the source asserts; the server may cap it.
      `heartbeat_interval_ms` must be below it.
    - `on_error`: called with each asynchronous error, e.g. a `WriteRejected`, as it arrives.
      (It is also raised by the next call made on the client.)
    - `connect_timeout`: seconds for the TCP connection and the CONNECT handshake together.

    Raises `ValueError` at once for inconsistent arguments; `SourceConflict`, `NoFreeSource`,
    `AuthFailed`, `Forbidden`, ... when the server refuses; `TimeoutError` or `OSError` when it
    cannot be reached.
    """
    message = Connect(
        _connect_mode(source_id, takeover, read_only),
        0 if source_id is None else source_id,
        liveness_deadline_ms,
        heartbeat_interval_ms,
        name,
        token,
    )
    _check_liveness(liveness_deadline_ms, heartbeat_interval_ms)
    message.encode()  # a name or token too long for the wire: EncodeError (a ValueError) now
    if connect_timeout <= 0:
        raise ValueError(f"connect_timeout must be positive, got {connect_timeout}")
    return Connector(host, port, message, on_error=on_error, connect_timeout=float(connect_timeout))


def _connect_mode(source_id: int | None, takeover: bool, read_only: bool) -> ConnectMode:
    if read_only:
        if source_id is not None or takeover:
            raise ValueError("a read_only connection has no source: drop source_id and takeover")
        return ConnectMode.READ_ONLY
    if source_id is None:
        if takeover:
            raise ValueError("takeover=True needs the source_id to take over")
        return ConnectMode.ALLOCATE
    if isinstance(source_id, bool) or not 0 <= source_id <= MAX_SOURCE_ID:
        raise ValueError(f"source_id must be 0..{MAX_SOURCE_ID}, got {source_id!r}")
    return ConnectMode.TAKEOVER if takeover else ConnectMode.CLAIM


def _effective_heartbeat(asked_ms: int, deadline_ms: int) -> int:
    """The heartbeat interval to use under the deadline the server granted."""
    return asked_ms if asked_ms < deadline_ms else max(deadline_ms // 2, 1)


def _check_liveness(deadline_ms: int, heartbeat_ms: int) -> None:
    if not 0 < deadline_ms <= _MAX_U32:
        raise ValueError(f"liveness_deadline_ms must be 1..{_MAX_U32}, got {deadline_ms}")
    if not 0 < heartbeat_ms <= _MAX_U32:
        raise ValueError(f"heartbeat_interval_ms must be 1..{_MAX_U32}, got {heartbeat_ms}")
    if heartbeat_ms >= deadline_ms:
        raise ValueError(
            f"heartbeat_interval_ms ({heartbeat_ms}) must be below liveness_deadline_ms "
            f"({deadline_ms}): the server would declare the connection dead between two "
            "heartbeats (the usual choice is half the deadline)"
        )
