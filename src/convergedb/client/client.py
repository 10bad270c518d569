"""The client: `connect()` to a server, register kinds, write, read.

    import convergedb as cdb

    async with cdb.connect("127.0.0.1", 3727, name="game-server-1") as client:
        players = await client.register_kind(Player)
        await players.assert_("player:ana", Player(name="ana", hp=90))
        await client.sync()  # durable and visible from here
        result = await players.query("player:ana")

`connect()` can also be awaited directly (`client = await cdb.connect(...)`); then close the client
with `await client.close()`.

**Reconnection** is on by default (`connect(reconnect=True)`, SPEC §8): a lost connection is
re-established with exponential backoff (100 ms, doubling, capped at 10 s), reclaiming the same
source with takeover, refreshing the kind handles and re-subscribing (see
`convergedb.client.reconnect`). While the client is disconnected, every call — writes included —
raises `ConnectionLost` at once: writes are fire-and-forget, and holding them back would only
hide the outage. A writer that must not lose its state re-asserts it from `on_reconnect` (its
entities themselves survive: the source is reclaimed within its liveness deadline), or waits
with `await client.wait_connected()`. Calls that were waiting for a reply when the connection
was lost fail with `ConnectionLost`; they are not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Final, TypeVar

from ..declare import kind_model
from ..limits import (
    DEFAULT_HEARTBEAT_INTERVAL_MS,
    DEFAULT_HOST,
    DEFAULT_LIVENESS_DEADLINE_MS,
    DEFAULT_PORT,
    DEFAULT_RECONNECT_CAP_S,
    DEFAULT_RECONNECT_INITIAL_S,
    MAX_SOURCE_ID,
    READ_ONLY_SOURCE_ID,
)
from ..protocol.codes import ConnectMode, Opcode
from ..protocol.messages import (
    Connect,
    Connected,
    CreateKind,
    EpochBegin,
    EpochEnd,
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
from ..schema.errors import SchemaConflict
from ..schema.evolution import check_prefix
from .batch import Batch
from .connection import Connection, ErrorCallback, open_connection
from .dynamic import DynamicKindHandle
from .errors import ConnectionLost, ConvergeError, ServerError
from .handle import KindHandle
from .reconnect import ReconnectPolicy, is_permanent_refusal, should_reconnect
from .subscription import _StreamSubscription

T = TypeVar("T")
M = TypeVar("M", bound=Message)

_MAX_U32: Final = 0xFFFF_FFFF
_log = logging.getLogger("convergedb.client")

ReconnectCallback = Callable[["Client"], Awaitable[None] | None]
"""Called with the client after each reconnection (a coroutine function is awaited)."""


@dataclass
class Epoch:
    """An epoch opened by `Client.epoch()`: its baseline size, then how many it retracted."""

    baseline: int
    """Entities this source asserted when the epoch began."""
    retracted: int = 0
    """Entities the end of the epoch retracted (set when the block ends)."""


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What `connect()` was given: used to connect, and again to reconnect."""

    host: str
    port: int
    connect: Connect
    on_error: ErrorCallback | None = None
    connect_timeout: float = 10.0
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)
    on_reconnect: ReconnectCallback | None = None

    @property
    def address(self) -> str:
        """HOST:PORT."""
        return f"{self.host}:{self.port}"


async def open_client_connection(
    settings: ClientSettings, message: Connect
) -> tuple[Connection, Connected]:
    """Connect to the server and send `message` (CONNECT); on any failure, close the socket.

    Raises `TimeoutError` after `settings.connect_timeout`, the typed `ServerError` the server
    answers CONNECT with, or `OSError` when the server cannot be reached.
    """
    try:
        async with asyncio.timeout(settings.connect_timeout):
            connection = await open_connection(
                settings.host, settings.port, on_error=settings.on_error
            )
            try:
                connected = await connection.request(message)
            except BaseException:
                await connection.close()
                raise
    except TimeoutError:
        raise TimeoutError(
            f"could not connect to the ConvergeDB server at {settings.address} within "
            f"{settings.connect_timeout} s"
        ) from None
    if not isinstance(connected, Connected):
        await connection.close()
        raise ConvergeError(f"the server answered CONNECT with {connected.OPCODE.name}")
    return connection, connected


class Client:
    """A connection to a ConvergeDB server, as a writer (one source) or read-only.

    Make one with `connect()`. Every method but `close` first raises a pending `WriteRejected`
    (a write the server dropped since the last call), then `ConnectionLost` if the client is not
    connected (closed, or lost and not re-established yet). So do the methods of its kind handles
    and batches.
    """

    def __init__(self, connection: Connection, connected: Connected, settings: ClientSettings):
        self._settings = settings
        self._connection = connection
        self.name = settings.connect.name
        """The name this client gave the server (shown in the `convergedb_connections` kind)."""
        self.source_id: int | None = (
            None if connected.source_id == READ_ONLY_SOURCE_ID else connected.source_id
        )
        """The source this client writes as (0..63), or None for a read-only client. It stays
        the same across reconnections."""
        self.liveness_deadline_ms = connected.liveness_deadline_ms
        """The liveness deadline in force (the one asked for, capped by the server's maximum)."""
        self.window_ms = connected.window_ms
        """The server's coalescing window."""
        self.max_payload = connected.max_payload
        """The largest frame payload the server accepts; batches are split to stay under it."""
        self.server_version = connected.server_version
        """The server's version string."""
        self.heartbeat_interval_ms = settings.connect.heartbeat_interval_ms
        """How often this client sends a HEARTBEAT: as asked, or half the deadline in force
        when the server capped the deadline to or below the interval asked for."""
        self.reconnects = 0
        """How many times the connection was re-established."""
        self._closing = False
        self._gave_up: ConnectionLost | None = None
        self._settled = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._handles: weakref.WeakSet[KindHandle[Any]] = weakref.WeakSet()
        self._subscriptions: set[_StreamSubscription[Any]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._install(connection, connected)

    def __repr__(self) -> str:
        who = "read-only" if self.source_id is None else f"source {self.source_id}"
        if self.connected:
            state = "open"
        elif self.reconnecting:
            state = "reconnecting"
        else:
            state = "closed"
        return f"<convergedb.Client {who}, {state}>"

    @property
    def read_only(self) -> bool:
        """Whether this client is read-only (it has no source and cannot write)."""
        return self.source_id is None

    @property
    def connected(self) -> bool:
        """Whether the client has a working connection now (False while it reconnects)."""
        return not self._closing and not self._connection.is_lost

    @property
    def closed(self) -> bool:
        """Whether the client has no working connection now: closed, lost for good, or lost and
        being re-established (`reconnecting`). The opposite of `connected`."""
        return not self.connected

    @property
    def reconnecting(self) -> bool:
        """Whether the connection was lost and the client is re-establishing it."""
        return self._reconnect_task is not None and not self._reconnect_task.done()

    @property
    def connection(self) -> Connection:
        """The protocol connection underneath (for tools and tests that send raw frames); a new
        one after each reconnection."""
        return self._connection

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Return once the client is connected (at once if it is), e.g. while it reconnects.

        Raises `ConnectionLost` if the client is closed or gave up reconnecting, and
        `TimeoutError` after `timeout` seconds.
        """
        async with asyncio.timeout(timeout):
            while not self.connected:
                if self._closing or self._gave_up is not None or not self._will_reconnect():
                    raise self._gave_up or self._connection.lost_error()
                self._settled.clear()
                await self._settled.wait()

    # --- kinds --------------------------------------------------------------------------------

    async def register_kind(self, cls: type[T]) -> KindHandle[T]:
        """Register the kind declared by `cls` (a `@convergedb.kind` class) and return its handle.

        Safe to call on every start-up: registering the same schema again returns the existing
        kind; a declaration that appends fields migrates the kind. A change to existing fields
        raises `SchemaConflictError`. Needs a writer connection (`ReadOnlyError` otherwise).
        After a reconnection the client registers it again and refreshes the handle.
        """
        model = kind_model(cls)
        info = await self._request(CreateKind(model.definition), KindInfo)
        return self._handle(cls, info, registered=True)

    async def resolve_kind(self, cls: type[T]) -> KindHandle[T]:
        """The handle of a kind that already exists on the server, without registering it.

        The declaration may be an older schema (a prefix of the server's): the handle then reads
        the entities without the newer fields, and cannot write (writes raise
        `ReadOnlyHandle`). Raises `UnknownKind` if the kind does not exist and
        `SchemaConflictError` if the declaration is not a prefix of the server's schema.
        """
        model = kind_model(cls)
        info = await self._request(GetKind(model.name, model.definition), KindInfo)
        return self._handle(cls, info, registered=False)

    async def kind(self, name: str) -> DynamicKindHandle:
        """The handle of the kind `name` as the server defines it, with no Python class.

        Its values are dicts by field name (structs as dicts, arrays as lists): queries,
        subscriptions, events and mirrors decode to them, and a writer client writes from them
        (a field missing from the dict is its zero value). See `convergedb.client.dynamic`.
        Raises `UnknownKind` if the kind does not exist.
        """
        info = await self._request(GetKind(name), KindInfo)
        handle = DynamicKindHandle(self, info)
        self._handles.add(handle)
        return handle

    def _handle(self, cls: type[T], info: KindInfo, *, registered: bool) -> KindHandle[T]:
        model = kind_model(cls)
        check_prefix(info.kind, model.definition)
        handle = KindHandle(
            self, model, info.kind_id, info.schema_version, info.kind, registered=registered
        )
        self._handles.add(handle)
        return handle

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

    # --- source epochs ------------------------------------------------------------------------

    async def epoch_begin(self) -> int:
        """Begin a source epoch (SPEC §7): the server records every entity this source asserts
        now (counting writes sent before) as the baseline, and returns its size.

        Re-assert the whole new snapshot (ASSERT or PATCH, best in batches), then call
        `epoch_end()`: it retracts, for this source only, every baseline entity not re-asserted.
        A second `epoch_begin()` starts afresh; an epoch open when the connection drops is
        discarded (nothing is retracted because of it).
        """
        reply = await self._request(EpochBegin(), Ok)
        return reply.value

    async def epoch_end(self) -> int:
        """End the open epoch: retract the baseline entities this source did not re-assert, all
        in one flush. Returns how many it retracted. `EpochNotOpen` if no epoch is open."""
        reply = await self._request(EpochEnd(), Ok)
        return reply.value

    @contextlib.asynccontextmanager
    async def epoch(self) -> AsyncIterator[Epoch]:
        """`async with client.epoch() as epoch:` re-assert a snapshot inside the block; the
        epoch ends when the block ends (`epoch.retracted` then holds the count). If the block
        raises, the epoch is left open and nothing is retracted: a later `epoch_begin()` starts
        afresh, and a lost connection discards it."""
        state = Epoch(baseline=await self.epoch_begin())
        yield state
        state.retracted = await self.epoch_end()

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
        keeps its entities. A reconnection under way stops, and the client's subscriptions
        end (their iteration stops, with no error).
        """
        self._closing = True
        for subscription in list(self._subscriptions):
            subscription._end(None)
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for background in list(self._tasks):
            background.cancel()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._settled.set()
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

    # --- internals shared with handles, batches and subscriptions -------------------------------

    def raise_pending_errors(self) -> None:
        """Raise the pending `WriteRejected` if any (once), then `ConnectionLost` if the client
        is not connected."""
        self._raise_rejections()
        if self._closing and not self._connection.is_lost:
            raise ConnectionLost("the connection was closed by this client")
        self._connection.check_open()

    def _raise_rejections(self) -> None:
        rejected = self._connection.take_rejections()
        if rejected is not None:
            raise rejected

    async def _request(self, message: Message, reply_type: type[M]) -> M:
        """Send a request and return its reply, checked to be of the expected type."""
        self.raise_pending_errors()
        reply = await self._connection.request(message)
        return _checked_reply(message, reply, reply_type)

    async def _send_write(
        self, opcode: Opcode, payload: bytes | bytearray, *, check: bool = True
    ) -> None:
        """Send an encoded write (or BATCH) on stream 0, raising pending errors first."""
        if check:
            self.raise_pending_errors()
        await self._connection.send_payload(opcode, payload)

    def _attach_subscription(self, subscription: _StreamSubscription[Any]) -> Connection:
        """Register a subscription that starts, and return the connection to subscribe on."""
        self.raise_pending_errors()
        self._subscriptions.add(subscription)
        return self._connection

    def _detach_subscription(self, subscription: _StreamSubscription[Any]) -> None:
        """Forget a subscription that ended."""
        self._subscriptions.discard(subscription)

    def _will_reconnect(self) -> bool:
        """Whether a lost connection will be re-established (as far as the client knows)."""
        return self._settings.reconnect.enabled and not self._closing and self._gave_up is None

    def _keep_task(self, task: asyncio.Task[Any]) -> None:
        """Keep a background task referenced until it is done (cancelled by `close`)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- the connection's life ------------------------------------------------------------------

    def _install(self, connection: Connection, connected: Connected) -> None:
        """Make `connection` (just CONNECTED) the client's, and start its heartbeats."""
        self._connection = connection
        self.liveness_deadline_ms = connected.liveness_deadline_ms
        self.window_ms = connected.window_ms
        self.max_payload = connected.max_payload
        self.server_version = connected.server_version
        self.heartbeat_interval_ms = _effective_heartbeat(
            self._settings.connect.heartbeat_interval_ms, connected.liveness_deadline_ms
        )
        connection.max_payload = connected.max_payload
        connection.on_lost = lambda lost: self._connection_lost(connection, lost)
        self._heartbeat = asyncio.get_running_loop().create_task(
            _send_heartbeats(connection, self.heartbeat_interval_ms / 1000),
            name="convergedb-heartbeat",
        )
        self._settled.set()
        if connection.is_lost:  # lost between CONNECTED and here: on_lost was not set yet
            self._connection_lost(connection, connection.lost_error())

    def _connection_lost(self, connection: Connection, lost: ConnectionLost) -> None:
        """The client's connection is gone: reconnect, or end everything."""
        if connection is not self._connection:
            return  # a connection the client already left behind
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._closing or self.reconnecting:
            return
        if self._settings.reconnect.enabled and should_reconnect(lost):
            _log.warning("connection to %s lost (%s); reconnecting", self._settings.address, lost)
            self._settled.clear()
            self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect(), name="convergedb-reconnect"
            )
        else:
            self._give_up(lost)

    def _give_up(self, lost: ConnectionLost) -> None:
        """The connection will not be re-established: end every subscription with `lost`."""
        self._gave_up = lost
        for subscription in list(self._subscriptions):
            subscription._end(lost)
        self._settled.set()

    async def _reconnect(self) -> None:
        """Reconnect with backoff until it works or cannot work, then restore the client."""
        message = self._reconnect_message()
        policy = self._settings.reconnect
        for attempt, delay in enumerate(policy.delays(), start=1):
            await asyncio.sleep(delay)
            try:
                connection, connected = await open_client_connection(self._settings, message)
            except Exception as exc:
                if is_permanent_refusal(exc):
                    self._refused_for_good(exc)
                    return
                _log.info(
                    "reconnection attempt %d to %s failed: %s", attempt, self._settings.address, exc
                )
                continue
            try:
                await self._restore(connection)
            except (ConnectionLost, OSError):
                await connection.close()
                continue  # lost again while restoring: try again
            except Exception as exc:
                await connection.close()
                _log.exception("restoring the client after reconnecting failed")
                self._reconnect_task = None
                self._give_up(
                    ConnectionLost("could not restore the client after reconnecting", exc)
                )
                return
            except BaseException:
                await connection.close()
                raise
            if connection.is_lost:
                continue
            self._reconnect_task = None
            self._install(connection, connected)
            self.reconnects += 1
            _log.info("reconnected to %s after %d attempts", self._settings.address, attempt)
            await self._call_on_reconnect()
            return

    def _reconnect_message(self) -> Connect:
        """CONNECT for a reconnection: the same source, with takeover (or read-only again)."""
        if self.source_id is None:
            return replace(self._settings.connect, mode=ConnectMode.READ_ONLY, source_id=0)
        return replace(self._settings.connect, mode=ConnectMode.TAKEOVER, source_id=self.source_id)

    def _refused_for_good(self, exc: Exception) -> None:
        """A reconnection the server refuses for good (e.g. the token is no longer valid)."""
        _log.error("giving up reconnecting to %s: %s", self._settings.address, exc)
        self._reconnect_task = None
        if isinstance(exc, ConvergeError):
            self._report(exc)
        self._give_up(ConnectionLost("could not reconnect to the server", exc))

    async def _restore(self, connection: Connection) -> None:
        """On a new connection: refresh every kind handle, then re-subscribe."""
        groups: dict[tuple[bool, int], list[KindHandle[Any]]] = {}
        for handle in list(self._handles):
            groups.setdefault((handle.registered, id(handle.model)), []).append(handle)
        await asyncio.gather(*(self._refresh_kind(connection, hs) for hs in groups.values()))
        for subscription in list(self._subscriptions):
            subscription._resubscribe(connection)

    async def _refresh_kind(self, connection: Connection, handles: list[KindHandle[Any]]) -> None:
        """Register (or resolve) one kind again and refresh its handles; a kind the server
        refuses now is reported to `on_error`, and its handles keep their old ids."""
        first = handles[0]
        model = first.model
        message: Message = (
            CreateKind(model.definition)
            if first.registered
            else GetKind(model.name, model.definition)
        )
        try:
            info = _checked_reply(message, await connection.request(message), KindInfo)
            check_prefix(info.kind, model.definition)
        except (ServerError, SchemaConflict) as exc:
            _log.error("kind %r after reconnecting: %s", model.name, exc)
            error = exc if isinstance(exc, ConvergeError) else ConvergeError(str(exc))
            self._report(error)
            return
        for handle in handles:
            handle.refresh(info)

    def _report(self, error: ConvergeError) -> None:
        """Pass an error of the reconnection to the `on_error` callback, if any."""
        callback = self._settings.on_error
        if callback is None:
            return
        try:
            callback(error)
        except Exception as exc:
            asyncio.get_running_loop().call_exception_handler(
                {"message": "the on_error callback raised", "exception": exc}
            )

    async def _call_on_reconnect(self) -> None:
        callback = self._settings.on_reconnect
        if callback is None:
            return
        try:
            result = callback(self)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            asyncio.get_running_loop().call_exception_handler(
                {"message": "the on_reconnect callback raised", "exception": exc}
            )


def _checked_reply(message: Message, reply: Message, reply_type: type[M]) -> M:
    """The reply, checked to be of the expected type."""
    if not isinstance(reply, reply_type):
        raise ConvergeError(
            f"the server answered {message.OPCODE.name} with {reply.OPCODE.name}, "
            f"expected {reply_type.OPCODE.name}",
            op=message.OPCODE,
        )
    return reply


async def _send_heartbeats(connection: Connection, interval: float) -> None:
    """Send a HEARTBEAT every `interval` seconds until the connection is lost."""
    while not connection.is_lost:
        await asyncio.sleep(interval)
        try:
            connection.send_nowait(Heartbeat())
        except ConnectionLost:
            return


class Connector:
    """What `connect()` returns: await it for a `Client`, or use it as `async with`.

    `async with connect(...) as client:` closes the client when the block ends.
    """

    def __init__(self, settings: ClientSettings) -> None:
        self._settings = settings
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
        connection, connected = await open_client_connection(self._settings, self._settings.connect)
        return Client(connection, connected, self._settings)


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
    reconnect: bool = True,
    reconnect_delay: float = DEFAULT_RECONNECT_INITIAL_S,
    reconnect_max_delay: float = DEFAULT_RECONNECT_CAP_S,
    on_reconnect: ReconnectCallback | None = None,
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
    - `connect_timeout`: seconds for the TCP connection and the CONNECT handshake together
      (each reconnection attempt too).
    - `reconnect` (default True): re-establish a lost connection, with backoff from
      `reconnect_delay` seconds (0.1), doubling up to `reconnect_max_delay` (10). The client
      reclaims its source with takeover and re-subscribes (see `convergedb.client.reconnect`).
      A connection closed with TAKEN_OVER is never re-established. With False, a lost
      connection ends the client like `close()` would, but for the error.
    - `on_reconnect`: called with the client after each reconnection, once kinds and
      subscriptions are restored (a coroutine function is awaited): the place to re-assert
      state written while disconnected (writes raise `ConnectionLost` then).

    Only the first connection attempt raises; reconnection failures are retried, and reported
    by the subscriptions (`ConnectionLost`) when the client gives up.

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
    policy = ReconnectPolicy(bool(reconnect), float(reconnect_delay), float(reconnect_max_delay))
    settings = ClientSettings(
        host, port, message, on_error, float(connect_timeout), policy, on_reconnect
    )
    return Connector(settings)


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
