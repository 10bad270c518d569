"""The client: `connect()` to a server, register kinds, write, read.

    import convergedb as cdb

    async with cdb.connect("127.0.0.1", 3727, name="game-server-1") as client:
        players = await client.register_kind(Player)
        await players.assert_("player:ana", Player(name="ana", hp=90))
        await client.sync()  # durable and visible from here
        result = await players.query("player:ana")

`connect()` can also be awaited directly (`client = await cdb.connect(...)`); then close the client
with `await client.close()`.

**Reconnection** is on by default (`connect(reconnect=True)`, SPEC §8); `connect`'s docstring
says what it does, and `convergedb.client.reconnect` holds its policy. A writer that must not
lose its state re-asserts it from `on_reconnect` (its entities themselves survive: the source is
reclaimed within its liveness deadline), or waits with `await client.wait_connected()`.
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
from .errors import ConnectionLost, ConvergeError, ServerError, WriteRejected, WritesLost
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

    Make one with `connect()` rather than directly. A client gives kind handles
    (`register_kind`, `resolve_kind`, `kind`) that write and read entities, sends many writes
    at once (`batch`), waits until its writes are durable (`sync`), replaces its source's whole
    snapshot (`epoch`), and closes (`close`, or the end of `async with connect(...)`).

    Every method but `close` first raises a pending `WriteRejected` (a write the server dropped
    since the last call), then `ConnectionLost` if the client is not connected (closed, or lost
    and not re-established yet). So do the methods of its kind handles and batches.

    Example:
        ```python
        async with cdb.connect(name="game-server-1") as client:
            print(client.source_id, client.server_version)  # e.g. 0 0.1.0
            players = await client.register_kind(Player)
        ```
    """

    def __init__(self, connection: Connection, connected: Connected, settings: ClientSettings):
        """Wrap a connection whose CONNECT handshake succeeded (`connect()` does it).

        Args:
            connection: The protocol connection, just answered with CONNECTED.
            connected: The server's CONNECTED reply: the source, deadline, window and limits.
            settings: What `connect()` was given, kept to reconnect.
        """
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
        """The heartbeat interval in force: as asked, or half the deadline in force when the
        server capped the deadline to or below the interval asked for. The client sends a
        HEARTBEAT at least this often, and at least every quarter of the deadline (each asks
        for a PONG: see `Connection.keep_alive`)."""
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
        self._lost_writes = 0
        """Writes sent on lost connections that no SYNC covered, not yet reported."""
        self._lost_writes_cause: ConnectionLost | None = None
        self._lost_noted: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._carried_rejections: list[WriteRejected] = []
        """Rejections a lost connection received and no call raised yet."""
        self._install(connection, connected, self._start_keep_alive(connection, connected))

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
        """Return once the client is connected: at once if it is, or when it has reconnected.

        Args:
            timeout: Seconds to wait at most; None waits as long as reconnection goes on.

        Raises:
            ConnectionLost: The client is closed, or it gave up reconnecting (reconnection is
                off, or the server refused it for good).
            TimeoutError: `timeout` seconds passed first.

        Example:
            ```python
            try:
                await players.assert_(pid, player)
            except cdb.ConnectionLost:
                await client.wait_connected(timeout=30)
                await players.assert_(pid, player)
            ```
        """
        async with asyncio.timeout(timeout):
            while not self.connected:
                if self._closing or self._gave_up is not None or not self._will_reconnect():
                    raise self._gave_up or self._connection.lost_error()
                self._settled.clear()
                await self._settled.wait()

    # --- kinds --------------------------------------------------------------------------------

    async def register_kind(self, cls: type[T]) -> KindHandle[T]:
        """Register the kind declared by `cls` and return its handle.

        Safe to call on every start-up: registering the same schema again returns the existing
        kind, and a declaration that appends fields (at new ordinals) migrates it. After a
        reconnection the client registers the kind again and refreshes the handle.

        Args:
            cls: A class decorated with `@convergedb.kind`.

        Returns:
            A writable `KindHandle` whose values are instances of `cls`.

        Raises:
            TypeError: `cls` is not a `@convergedb.kind` class.
            SchemaConflictError: The declaration changes, removes or reorders fields the kind
                already has on the server.
            InvalidSchemaError: The server refuses the definition (a limit, a reserved name).
            ReadOnlyError: The client is read-only.
            WriteRejected: A write sent earlier was rejected (raised once, before anything is
                sent; see `Client`).
            ConnectionLost: The client is not connected, or the connection was lost before
                the reply.

        Example:
            ```python
            players = await client.register_kind(Player)
            await players.assert_("player:ana", Player(name="ana"))
            ```
        """
        model = kind_model(cls)
        info = await self._request(CreateKind(model.definition), KindInfo)
        return self._handle(cls, info, registered=True)

    async def resolve_kind(self, cls: type[T]) -> KindHandle[T]:
        """The handle of a kind that already exists on the server, without registering it.

        What a reader uses. The declaration may be an older schema (a prefix of the server's
        fields): the handle then reads the entities without the newer fields, and cannot write
        (its writes raise `ReadOnlyHandle`). After a reconnection the client resolves the kind
        again and refreshes the handle.

        Args:
            cls: A class decorated with `@convergedb.kind`, the same schema as the server's or
                an older one.

        Returns:
            A `KindHandle` whose values are instances of `cls` (writable only when `cls`
            declares every field of the server's schema).

        Raises:
            TypeError: `cls` is not a `@convergedb.kind` class.
            UnknownKind: No kind of that name exists on the server.
            SchemaConflictError: The declaration is not a prefix of the server's schema.
            WriteRejected: A write sent earlier was rejected (raised once, before anything is
                sent; see `Client`).
            ConnectionLost: The client is not connected, or the connection was lost before
                the reply.

        Example:
            ```python
            async with cdb.connect(read_only=True) as reader:
                players = await reader.resolve_kind(Player)
                print((await players.query("player:ana")).value)
            ```
        """
        model = kind_model(cls)
        info = await self._request(GetKind(model.name, model.definition), KindInfo)
        return self._handle(cls, info, registered=False)

    async def kind(self, name: str) -> DynamicKindHandle:
        """The handle of the kind `name` as the server defines it, with no Python class.

        Its values are dicts by field name (structs as dicts, arrays as lists): queries,
        subscriptions, events and mirrors decode to them, and a writer client writes from them
        (a field missing from the dict is its zero value). See `DynamicKindHandle`.

        Args:
            name: The kind's name, e.g. `"player"` or the system kind
                `"convergedb_connections"`.

        Returns:
            A `DynamicKindHandle` with the server's current schema.

        Raises:
            UnknownKind: No kind of that name exists on the server.
            WriteRejected: A write sent earlier was rejected (raised once, before anything is
                sent; see `Client`).
            ConnectionLost: The client is not connected, or the connection was lost before
                the reply.

        Example:
            ```python
            players = await client.kind("player")
            result = await players.query("player:ana")
            print(result.value)  # {'name': 'ana', 'hp': 75, ...}
            ```
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
        """Every kind of the server, system kinds included.

        Returns:
            One `KindInfo` per kind: its `kind_id`, `schema_version` and definition (`kind`,
            with its `name` and `fields`).

        Raises:
            WriteRejected: A write sent earlier was rejected (raised once, before anything is
                sent; see `Client`).
            ConnectionLost: The client is not connected, or the connection was lost before
                the reply.

        Example:
            ```python
            names = [info.kind.name for info in await client.list_kinds()]
            ```
        """
        reply = await self._request(ListKinds(), KindList)
        return list(reply.kinds)

    # --- writes and barriers ------------------------------------------------------------------

    def batch(self) -> Batch:
        """A new, empty `Batch`: many writes, of any kinds, sent together in few frames.

        The writes are sent as BATCH frames when the `async with` block ends, or at each
        `await b.flush()`. An exception in the block discards the writes not yet flushed.

        Returns:
            The batch (nothing is sent until it is flushed).

        Raises:
            WriteRejected: A write sent earlier was rejected (see `Client`).
            ConnectionLost: The client is not connected.

        Example:
            ```python
            async with client.batch() as b:
                for pid, player in snapshot.items():
                    b.assert_(players, pid, player)
                b.retract(matches, old_match_id)
            # sent here
            ```
        """
        self.raise_pending_errors()
        return Batch(self)

    async def sync(self) -> int:
        """Wait until every write this client sent before is flushed: durable and visible.

        The server reports a rejected write as soon as it receives it, so before it answers the
        SYNC: a `sync` that returns means every earlier write was accepted.

        A `sync` that returns also means no write was lost with a connection: if writes sent
        since the last `sync` went out on a connection that was then lost (the client has
        reconnected since, or is reconnecting), `sync` raises `WritesLost` instead, once, since
        a SYNC on the new connection cannot answer for them. Re-assert their state (best in an
        epoch: an epoch that ends after the loss supersedes the lost writes and clears the
        error) and `sync` again.

        Returns:
            The seq of the flush that carried the writes (the last committed seq if there was
            nothing to flush). Seqs increase over the server's whole life; `Mirror.wait_seq`
            waits for one.

        Raises:
            WriteRejected: A write sent before the SYNC was rejected: raised once, after the
                barrier (every other write is flushed).
            WritesLost: Writes sent since the last `sync` went out on a connection that was
                lost, before or during this call: they may never have reached the server.
                Raised once (a `ConnectionLost`).
            ConnectionLost: The client is not connected, or the connection was lost before the
                reply, and no write was pending (otherwise: `WritesLost`).

        Example:
            ```python
            await players.patch("player:ana", hp=75)
            seq = await client.sync()  # a query now sees hp == 75
            ```
        """
        self._raise_rejections()
        connection = self._connection
        try:
            if self._closing:
                self.raise_pending_errors()  # closed by the user: nothing was lost
            self._raise_lost_writes()
            connection.check_open()
            covered = connection.writes_sent
            reply = await connection.request(Sync())
        except WritesLost:
            raise
        except ConnectionLost as lost:
            if not self._closing:
                self._note_lost_writes(connection, lost)
                self._raise_lost_writes(lost)
            raise
        checked = _checked_reply(Sync(), reply, Ok)
        connection.writes_synced = max(connection.writes_synced, covered)
        self._raise_rejections()
        return checked.value

    # --- source epochs ------------------------------------------------------------------------

    async def epoch_begin(self) -> int:
        """Begin a source epoch: the start of replacing this source's whole snapshot.

        The server records every entity this source asserts now (counting writes sent before)
        as the baseline. Re-assert the whole new snapshot (ASSERT or PATCH, best in batches),
        then call `epoch_end()`: it retracts, for this source only, every baseline entity not
        re-asserted. A second `epoch_begin()` starts afresh; an epoch open when the connection
        drops is discarded (nothing is retracted because of it). `epoch()` wraps the two calls.

        Returns:
            The size of the baseline: how many entities this source asserts now.

        Raises:
            ReadOnlyError: The client is read-only.
            WriteRejected: A write sent earlier was rejected (raised once, before anything is
                sent; see `Client`).
            ConnectionLost: The client is not connected, or the connection was lost before
                the reply.
        """
        reply = await self._request(EpochBegin(), Ok)
        return reply.value

    async def epoch_end(self) -> int:
        """End the open epoch: retract the baseline entities this source did not re-assert.

        The retractions all land in one flush, with the cause `DeleteCause.EPOCH_END`; other
        sources' assertions are untouched. The epoch replaced this source's whole state, so
        it also clears a pending `WritesLost` (writes lost with an earlier connection).

        Returns:
            How many entities it retracted.

        Raises:
            EpochNotOpen: No epoch is open (never begun, or discarded with a lost connection).
            ReadOnlyError: The client is read-only.
            WriteRejected: A write sent earlier was rejected (raised once, before anything is
                sent; see `Client`).
            ConnectionLost: The client is not connected, or the connection was lost before
                the reply.
        """
        reply = await self._request(EpochEnd(), Ok)
        # the epoch re-asserted this source's whole state after any loss: it supersedes every
        # write a lost connection dropped (an epoch does not survive a lost connection)
        self._lost_writes = 0
        self._lost_writes_cause = None
        return reply.value

    @contextlib.asynccontextmanager
    async def epoch(self) -> AsyncIterator[Epoch]:
        """A source epoch as a block: re-assert the whole snapshot inside it.

        `epoch_begin()` runs when the block is entered and `epoch_end()` when it ends. The
        object it yields has `baseline` (the size of the baseline) and, after the block,
        `retracted` (how many baseline entities were not re-asserted, and so retracted). If the
        block raises, the epoch is left open and nothing is retracted: a later `epoch_begin()`
        starts afresh, and a lost connection discards it.

        Raises:
            ReadOnlyError: The client is read-only.
            EpochNotOpen: The epoch was discarded during the block (the connection was lost).
            WriteRejected: A write sent earlier was rejected (raised once, before anything is
                sent; see `Client`).
            ConnectionLost: The client is not connected, or the connection was lost before
                the reply.

        Example:
            ```python
            async with client.epoch() as epoch:
                async with client.batch() as b:
                    for pid, player in snapshot.items():
                        b.assert_(players, pid, player)
            print(epoch.baseline, epoch.retracted)
            ```
        """
        state = Epoch(baseline=await self.epoch_begin())
        yield state
        state.retracted = await self.epoch_end()

    async def ping(self) -> float:
        """Measure the round-trip time to the server (a HEARTBEAT answered by a PONG).

        Returns:
            The round-trip time, in seconds.

        Raises:
            WriteRejected: A write sent earlier was rejected (raised once, before anything is
                sent; see `Client`).
            ConnectionLost: The client is not connected, or the connection was lost before
                the reply.
        """
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
        end (their iteration stops, with no error). It raises nothing about the connection.
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
        """Check the client, as every call does before anything is sent.

        Raises:
            WriteRejected: A write was rejected since the last check (raised once; the others
                that arrived meanwhile are in its `more`).
            ConnectionLost: The client is not connected.
        """
        self._raise_rejections()
        if self._closing and not self._connection.is_lost:
            raise ConnectionLost("the connection was closed by this client")
        self._connection.check_open()

    def _raise_rejections(self) -> None:
        rejected = self._connection.take_rejections()
        if self._carried_rejections:
            carried, self._carried_rejections = self._carried_rejections, []
            if rejected is not None:
                carried += [rejected, *rejected.more]
            first, *more = carried
            rejected = first.with_more(tuple(more))
        if rejected is not None:
            raise rejected

    def _note_lost_writes(self, connection: Connection, lost: ConnectionLost) -> None:
        """Count the writes a lost connection carried that no SYNC covered (once per
        connection): the next `sync` raises `WritesLost` for them."""
        if not connection.is_lost or connection in self._lost_noted:
            return
        self._lost_noted.add(connection)
        if connection.unsynced_writes > 0:
            self._lost_writes += connection.unsynced_writes
            self._lost_writes_cause = lost

    def _raise_lost_writes(self, lost: ConnectionLost | None = None) -> None:
        """Raise `WritesLost` (once) if writes were lost with a connection since last told."""
        if self._lost_writes:
            cause = self._lost_writes_cause or lost
            error = WritesLost(self._lost_writes, cause)
            self._lost_writes = 0
            self._lost_writes_cause = None
            raise error from cause

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

    def _start_keep_alive(self, connection: Connection, connected: Connected) -> asyncio.Task[None]:
        """Start the heartbeats of a connection just CONNECTED (before it is restored, so that
        a dead link fails the restoring requests too)."""
        heartbeat_ms = _effective_heartbeat(
            self._settings.connect.heartbeat_interval_ms, connected.liveness_deadline_ms
        )
        return asyncio.get_running_loop().create_task(
            connection.keep_alive(heartbeat_ms / 1000, connected.liveness_deadline_ms / 2000),
            name="convergedb-heartbeat",
        )

    def _install(
        self, connection: Connection, connected: Connected, keep_alive: asyncio.Task[None]
    ) -> None:
        """Make `connection` (just CONNECTED, its heartbeats started) the client's."""
        if connection is not self._connection:
            previous = self._connection.take_rejections()
            if previous is not None:
                self._carried_rejections += [previous, *previous.more]
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
        self._heartbeat = keep_alive
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
        self._note_lost_writes(connection, lost)
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
            keep_alive = self._start_keep_alive(connection, connected)
            try:
                await self._restore(connection)
            except (ConnectionLost, OSError):
                keep_alive.cancel()
                await connection.close()
                continue  # lost again while restoring: try again
            except Exception as exc:
                keep_alive.cancel()
                await connection.close()
                _log.exception("restoring the client after reconnecting failed")
                self._reconnect_task = None
                self._give_up(
                    ConnectionLost("could not restore the client after reconnecting", exc)
                )
                return
            except BaseException:
                keep_alive.cancel()
                await connection.close()
                raise
            if connection.is_lost:
                keep_alive.cancel()
                continue
            self._reconnect_task = None
            self._install(connection, connected, keep_alive)
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


class Connector:
    """What `connect()` returns: await it for a `Client`, or use it as `async with`.

    `async with connect(...) as client:` closes the client when the block ends;
    `client = await connect(...)` leaves closing to you (`await client.close()`). Nothing is
    sent before either: `connect()` itself only checks its arguments.
    """

    def __init__(self, settings: ClientSettings) -> None:
        """Keep the settings to connect with (`connect()` makes them).

        Args:
            settings: The address, the CONNECT message and the reconnection settings.
        """
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
    """Connect to a ConvergeDB server, as a writer (one source) or read-only.

    Use it as `async with connect(...) as client:` (the client is closed when the block ends)
    or `client = await connect(...)` (then `await client.close()`). The arguments are checked
    at once; the connection is made when the result is awaited or entered.

    **Reconnection.** With `reconnect=True` (the default) a lost connection is re-established
    with exponential backoff (`reconnect_delay`, doubling, capped at `reconnect_max_delay`)
    until it succeeds, the server refuses it for good (e.g. a token no longer valid) or the
    client is closed. The client reclaims the same source with takeover (so the server hands
    it over with nothing retracted, if within the liveness deadline; a read-only client
    reconnects read-only), registers or resolves its kinds again (refreshing the handles),
    re-establishes each subscription according to its `ReconnectMode`, then calls
    `on_reconnect`. While it is disconnected every call, writes included, raises
    `ConnectionLost` at once: writes are fire-and-forget, and holding them back would only
    hide the outage. Calls that were waiting for a reply fail with `ConnectionLost` and are
    not retried. A connection closed with TAKEN_OVER is never re-established (another
    process owns the source now). Only the first connection raises: reconnection failures
    are retried, and reported to the subscriptions (`ConnectionLost`) and to
    `Client.wait_connected` if the client gives up. Writes sent on the lost connection since
    the last `Client.sync` are not sent again: the next `sync()` raises `WritesLost` (once)
    instead of vouching for them; re-assert them, best in an epoch (an epoch that ends
    after the loss clears it).

    **Dead links.** Each heartbeat asks the server for a PONG. When nothing at all has come
    from the server for half the liveness deadline (while the client was reading), the
    connection is taken for dead and re-established like a lost one, so that a link the
    network dropped on the server's side only is noticed before the server retracts the
    source, and no call waits on it for ever.

    Args:
        host: The server's address.
        port: The server's client port.
        source_id: The source to write as (0..63). None (the default) has the server allocate
            the lowest free one; the client's `Client.source_id` says which.
        takeover: Claim `source_id` even while another live connection holds it (that one is
            closed with TAKEN_OVER): for a writer that restarted before the server noticed
            that its old connection died.
        read_only: Connect with no source: the client can read but not write.
        name: A name for this client, shown in the `convergedb_connections` system kind.
        token: The authentication token, when the server requires one.
        liveness_deadline_ms: How long the server waits after this connection is lost (or
            silent) before retracting everything the source asserts; the server may cap it.
        heartbeat_interval_ms: How often the client sends a HEARTBEAT; must be below
            `liveness_deadline_ms`. The client also sends one at least every quarter of the
            deadline in force, to hear from the server often enough (see "Dead links").
        on_error: Called with each asynchronous error as it arrives, e.g. a `WriteRejected`
            (which the next call made on the client also raises), or an error of a
            reconnection.
        connect_timeout: Seconds for the TCP connection and the CONNECT handshake together
            (each reconnection attempt too).
        reconnect: Whether to re-establish a lost connection (see above). With False, a lost
            connection ends the client like `Client.close` would, but for the error.
        reconnect_delay: Seconds before the first reconnection attempt.
        reconnect_max_delay: The longest wait between two attempts.
        on_reconnect: Called with the client after each reconnection, once kinds and
            subscriptions are restored (a coroutine function is awaited): the place to
            re-assert state written while disconnected.

    Returns:
        A `Connector`: await it for the `Client`, or enter it with `async with`.

    Raises:
        ValueError: At once, for inconsistent arguments (e.g. `takeover` without
            `source_id`, a heartbeat interval not below the deadline, a name too long). The
            other errors are raised when the result is awaited or entered.
        SourceConflict: The source is held by another live connection.
        NoFreeSource: No source is free to allocate.
        AuthFailed: The token is missing or unknown.
        Forbidden: The token does not allow this mode or source.
        TimeoutError: The server did not answer within `connect_timeout`.
        OSError: The server cannot be reached.

    Example:
        ```python
        async with cdb.connect("127.0.0.1", 3727, name="game-server-1") as client:
            players = await client.register_kind(Player)

        reader = await cdb.connect(read_only=True, token="r1")
        try:
            ...
        finally:
            await reader.close()
        ```
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
