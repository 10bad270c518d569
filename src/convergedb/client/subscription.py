"""Subscriptions: the live changes of a kind, and its event stream.

    async with players.subscribe() as changes:      # bootstrap, then live changes
        async for item in changes:
            if isinstance(item, cdb.Change):
                print(item.type.name, item.entity_id.hex(), item.value)
            elif isinstance(item, cdb.BootstrapComplete):
                print("in sync with", item.count, "entities")

    async for event in players.subscribe_events(from_seq=1):   # every write, before coalescing
        print(event.seq, event.op.name, event.data)

The lifecycle, the items, backpressure and reconnection are described in the docstring of
`Subscription` (and `EventSubscription`), which is what the API reference shows.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, TypeAlias, TypeVar, cast

from .._frozen import frozen_constructor
from ..ids import EntityId
from ..protocol.codes import BootstrapMode, DeleteCause, EventCause, SubscribeFlags
from ..protocol.codes import ChangeType as WireChangeType
from ..protocol.messages import (
    BootstrapBegin,
    BootstrapEnd,
    Deleted,
    Error,
    Event,
    Message,
    Ok,
    State,
    Subscribe,
    SubscribeEvents,
    Unsubscribe,
)
from ..schema.patch import mask_ordinals
from .errors import ConnectionLost, ConvergeError, error_from_frame
from .metadata import decode_metadata
from .reconnect import ReconnectMode, should_reconnect

if TYPE_CHECKING:
    from typing import Self

    from .client import Client
    from .connection import Connection
    from .handle import KindHandle

T = TypeVar("T")
ItemT = TypeVar("ItemT")

DEFAULT_MAX_QUEUE: Final = 4096
"""Items a subscription queues before the client stops reading its socket."""


# --- items ------------------------------------------------------------------------------------


class ChangeType(enum.IntEnum):
    """What happened to an entity (`Change.type`). The first three match the wire's STATE type."""

    CREATED = 1
    """The entity was created, or re-created after being deleted."""
    UPDATED = 2
    """The entity's field data changed."""
    BOOTSTRAP = 3
    """The entity's current state, sent by a bootstrap."""
    DELETED = 4
    """The entity became a tombstone (`Change.cause` says why)."""


class EventOp(enum.IntEnum):
    """The operation an event records (`EventItem.op`); the values are the write opcodes."""

    ASSERT = 0x02
    """An assert: `EventItem.data` is the whole value written."""
    RETRACT = 0x03
    """A retract (a client's, or one the server synthesised: see `EventItem.cause`)."""
    PATCH = 0x08
    """A patch: `EventItem.data` is a dict of the fields it set."""


def field_names_of(mask: int, names: tuple[str, ...]) -> tuple[str, ...]:
    """The names of the fields whose bits are set in `mask` (`#N` for an ordinal not named).

    Args:
        mask: A field mask: bit N set for the field of ordinal N.
        names: The field names, by ordinal.
    """
    return tuple(names[o] if o < len(names) else f"#{o}" for o in mask_ordinals(mask))


@dataclass(frozen=True, slots=True)
class Change(Generic[T]):
    """One change of one entity, as a `Subscription` delivers it.

    Changes of one entity may arrive more than once, and bootstrap and live changes may
    interleave: keep, for each entity, the change with the highest `version` (a `Mirror` does
    it for you).

    Example:
        ```python
        if isinstance(item, cdb.Change):
            if item.deleted:
                print(item.entity_id.hex(), "deleted:", item.cause.name)
            else:
                print(item.type.name, item.version, item.changed_field_names, item.value)
        ```
    """

    type: ChangeType
    """CREATED, UPDATED, DELETED, or BOOTSTRAP (the entity as a bootstrap sends it)."""
    entity_id: EntityId
    """The entity's 32-byte id (`convergedb.id_to_int` turns an int id back)."""
    value: T | None
    """The new state, decoded into the kind's class (a dict for a `DynamicKindHandle`); None
    for DELETED."""
    version: int
    """The entity's version after the change; keep the highest one you receive."""
    source_set: int
    """Bit N set when source N asserts the entity (0 for DELETED); `sources` lists them."""
    changed_fields: int
    """A bitmask of the fields that changed, by ordinal (every field for CREATED and
    BOOTSTRAP); `changed_field_names` gives their names."""
    seq: int
    """The server flush that made the change (for BOOTSTRAP: the last flush that changed the
    entity). The changes of one flush share one seq."""
    previous: T | None = None
    """The state before an UPDATED (or the last state before a DELETED) when the subscription
    asked for `include_previous`; else None."""
    meta: bytes = b""
    """The metadata of the write that caused the change (live changes only; the last write's
    when several coalesced). `metadata()` reads key/value metadata."""
    cause: DeleteCause | None = None
    """Why a DELETED happened: RETRACTED, EPOCH_END or LIVENESS; None for other types."""
    field_names: tuple[str, ...] = field(default=(), repr=False, compare=False)
    """The names of the kind's fields by ordinal (what `changed_field_names` reads)."""

    @property
    def deleted(self) -> bool:
        """Whether the entity became a tombstone."""
        return self.type is ChangeType.DELETED

    @property
    def changed_field_names(self) -> tuple[str, ...]:
        """The names of the changed fields, in ordinal order."""
        return field_names_of(self.changed_fields, self.field_names)

    @property
    def sources(self) -> list[int]:
        """The ids of the sources that assert the entity, ascending."""
        return [bit for bit in range(64) if self.source_set >> bit & 1]

    def metadata(self) -> dict[str, str]:
        """Read `meta` as key/value metadata (see `encode_metadata`).

        Returns:
            The key/value pairs; empty when the write had no metadata.

        Raises:
            MetadataError: The writer put something other than key/value metadata there.
        """
        return decode_metadata(self.meta)


_new_change: Final = frozen_constructor(Change)
"""`Change(...)` with every field given, without the frozen dataclass's slow `__init__`."""
_CHANGE_TYPES: Final = {wire: ChangeType(wire) for wire in WireChangeType}
"""The wire's STATE type -> the `ChangeType` of the change."""


@dataclass(frozen=True, slots=True)
class BootstrapStarted:
    """A bootstrap begins: `count` entities will be sent (as BOOTSTRAP changes, and DELETED ones
    for the tombstones of a delta), then `BootstrapComplete`.

    Live changes may arrive between this item and `BootstrapComplete`; keep the highest version
    of each entity.
    """

    mode: BootstrapMode
    """FULL: the bootstrap sends every alive entity, and any entity it does not send does not
    exist (a consumer that keeps a copy drops what the bootstrap did not send, once it is
    complete). DELTA (a resumed subscription): only what changed after the last seq seen."""
    count: int
    """How many entities the bootstrap sends."""
    resubscribed: bool = False
    """Whether the bootstrap follows a reconnection (False for the subscription's first one)."""

    @property
    def full(self) -> bool:
        """Whether the bootstrap is full (entities not sent do not exist)."""
        return self.mode is BootstrapMode.FULL


@dataclass(frozen=True, slots=True)
class BootstrapComplete:
    """A bootstrap ended: `count` entities were sent; from here the consumer is in sync."""

    mode: BootstrapMode
    """FULL or DELTA, as in `BootstrapStarted.mode`."""
    count: int
    """How many entities the bootstrap sent."""

    @property
    def full(self) -> bool:
        """Whether the bootstrap was full: drop the entities it did not send."""
        return self.mode is BootstrapMode.FULL


@dataclass(frozen=True, slots=True)
class Resubscribed:
    """The subscription was re-established after its client reconnected.

    With `mode` RESUME or FULL a bootstrap follows; with LIVE_ONLY live changes simply go on,
    and changes made during the outage may have been missed. A bootstrap that was under way
    when the connection was lost is abandoned.
    """

    mode: ReconnectMode
    """The subscription's `ReconnectMode`."""
    since_seq: int
    """The seq a RESUME asked for the changes after (0 for FULL and LIVE_ONLY)."""


SubscriptionItem: TypeAlias = Change[T] | BootstrapStarted | BootstrapComplete | Resubscribed
"""What a state subscription yields."""


@dataclass(frozen=True, slots=True)
class EventItem(Generic[T]):
    """One recorded write of an event-stream kind, as `KindHandle.subscribe_events` delivers it.

    Example:
        ```python
        if event.op is cdb.EventOp.PATCH:
            print(event.seq, event.source_id, event.fields)
        ```
    """

    seq: int
    """The event's sequence number (contiguous per kind)."""
    source_id: int
    """The source that wrote (for a synthesised retract, the source it was for)."""
    op: EventOp
    """ASSERT, PATCH or RETRACT."""
    cause: EventCause
    """CLIENT_WRITE for a client's write; EPOCH_END or LIVENESS for a retract the server
    synthesised at an epoch end or a liveness expiry."""
    entity_id: EntityId
    """The entity's 32-byte id."""
    mask: int
    """The PATCH's field mask (bit N for the field of ordinal N); 0 for other ops."""
    data: T | dict[str, Any] | None
    """For ASSERT the written value (the kind's class); for PATCH a dict of the patched field
    names to their values; for RETRACT None. `value` and `fields` read it typed."""
    meta: bytes = b""
    """The write's own metadata (every write keeps its own, coalesced or not)."""

    @property
    def value(self) -> T | None:
        """The asserted value (ASSERT only), else None."""
        return cast("T | None", self.data) if self.op is EventOp.ASSERT else None

    @property
    def fields(self) -> dict[str, Any] | None:
        """The patched fields by name (PATCH only), else None."""
        return self.data if isinstance(self.data, dict) else None

    def metadata(self) -> dict[str, str]:
        """Read `meta` as key/value metadata (see `encode_metadata`).

        Returns:
            The key/value pairs; empty when the write had no metadata.

        Raises:
            MetadataError: The writer put something other than key/value metadata there.
        """
        return decode_metadata(self.meta)


# --- the shared machinery -----------------------------------------------------------------------


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    ACTIVE = "active"
    DETACHED = "detached"
    CLOSING = "closing"
    ENDED = "ended"


# Enum members as module constants: on the per-frame path, `_State.ENDED` (a lookup through the
# enum class) costs more than the rest of the comparison.
_NEW: Final = _State.NEW
_CLOSING: Final = _State.CLOSING
_ENDED: Final = _State.ENDED
_WIRE_BOOTSTRAP: Final = WireChangeType.BOOTSTRAP


class _StreamSubscription(Generic[ItemT]):
    """What state and event subscriptions share: the stream on the connection, the queue with
    its backpressure, the lifecycle, and being re-established after a reconnection.

    Subclasses say what to send (`_subscribe_message`), what the OK and each frame mean to them
    (`_on_ok`, `_on_frame`, which run in the connection's reader and must be quick), and how a
    queued entry becomes an item (`_to_item`, which runs in the consumer).
    """

    def __init__(self, client: Client, *, reconnect: bool, max_queue: int) -> None:
        """Set up the queue and the lifecycle (the subclasses' constructors do it).

        Args:
            client: The client whose connection carries the subscription.
            reconnect: Whether to re-establish the subscription after a reconnection.
            max_queue: Queued items at which the client stops reading its socket.

        Raises:
            ValueError: `max_queue` is not a positive int.
        """
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be a positive int, got {max_queue!r}")
        self._client = client
        self.reconnect = reconnect
        """Whether the subscription is re-established when its client reconnects."""
        self.max_queue = max_queue
        """Queued items at which the client stops reading its socket (see "Backpressure" in
        `Subscription`)."""
        self._low_water = max_queue // 2
        self._queue: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._state = _State.NEW
        self._connection: Connection | None = None
        self._stream_id = 0
        self._accepted: asyncio.Future[int] | None = None
        self._awaiting_ok = False
        self._holding = False
        self._error: BaseException | None = None
        self._entered = False
        self._received = 0
        self.resubscriptions = 0
        """How many times the subscription was re-established after a reconnection."""

    # --- subclass hooks -------------------------------------------------------------------------

    def _subscribe_message(self) -> Message:
        raise NotImplementedError

    def _on_ok(self, value: int) -> None:
        raise NotImplementedError

    def _on_frame(self, message: Message) -> Any:
        """What to queue for a frame of the stream (None: nothing)."""
        raise NotImplementedError

    def _to_item(self, entry: Any) -> ItemT:
        raise NotImplementedError

    def _on_resubscribe(self) -> None:
        """Called when the subscription is sent again on a new connection."""

    # --- state ----------------------------------------------------------------------------------

    @property
    def subscription_id(self) -> int:
        """The subscription's id on the current connection (0 while not subscribed)."""
        return self._stream_id

    @property
    def active(self) -> bool:
        """Whether the subscription is open (subscribed, or waiting to be re-established)."""
        return self._state in (_State.STARTING, _State.ACTIVE, _State.DETACHED)

    @property
    def closed(self) -> bool:
        """Whether the subscription has ended (closed, refused, or its connection gone for good)."""
        return self._state in (_State.CLOSING, _State.ENDED)

    @property
    def pending(self) -> int:
        """The number of items received and not yet taken by the consumer."""
        return len(self._queue)

    @property
    def received(self) -> int:
        """The number of items queued since the subscription started (taken or not)."""
        return self._received

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> Self:
        """Subscribe, and return once the server has accepted (the items follow).

        Called by `async with` and by the first item of an `async for`; calling it again does
        nothing.

        Returns:
            The subscription itself.

        Raises:
            UnknownKind: The kind no longer exists on the server.
            NotEventStream: An event subscription of a kind without an event stream.
            EventsTruncated: An event subscription whose `from_seq` is no longer kept.
            WriteRejected: A write sent earlier was rejected (see `Client`).
            ConnectionLost: The client is not connected, or the connection was lost before the
                server accepted.
        """
        if self._state is not _State.NEW:
            return self
        connection = self._client._attach_subscription(self)
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[int] = loop.create_future()
        self._accepted = accepted
        self._state = _State.STARTING
        try:
            self._send_subscribe(connection)
            with connection.expecting_reply():
                await accepted
        except BaseException:
            self._abandon_start(connection)
            raise
        if self._state is _State.STARTING:
            self._state = _State.ACTIVE
        return self

    async def close(self) -> None:
        """Unsubscribe and end the iteration; items not yet taken are dropped.

        Leaving the `async with` block calls it; calling it again does nothing. It raises
        nothing about the connection (a lost connection has ended the subscription already).
        """
        if self._state in (_State.CLOSING, _State.ENDED):
            return
        connection, stream_id = self._connection, self._stream_id
        self._state = _State.CLOSING
        self._queue.clear()
        self._release_hold()
        try:
            if connection is not None and stream_id and not connection.is_lost:
                await self._unsubscribe(connection, stream_id)
        finally:
            self._finish(None)

    async def __aenter__(self) -> Self:
        self._entered = True
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[ItemT]:
        return self._iterate()

    async def __anext__(self) -> ItemT:
        return await self._next()

    async def _iterate(self) -> AsyncIterator[ItemT]:
        """The items; a plain `async for` (outside `async with`) closes the subscription when
        the loop ends."""
        owned = not self._entered
        queue = self._queue
        take = self._take
        to_item = self._to_item
        try:
            while True:
                if queue and self._state is not _NEW:  # `_next` without a coroutine
                    yield to_item(take())
                    continue
                try:
                    item = await self._next()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if owned:
                await self.close()

    async def _next(self) -> ItemT:
        if self._state is _State.NEW:
            await self.start()
        while True:
            if self._queue:
                return self._to_item(self._take())
            if self._state is _State.ENDED or self._state is _State.CLOSING:
                error, self._error = self._error, None
                if error is not None:
                    raise error
                raise StopAsyncIteration
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    # --- the stream (StreamSink) ------------------------------------------------------------------

    def deliver(self, message: Message) -> bool:
        """Take a frame of the subscription's stream, from the connection's reader.

        @private: the connection calls it; it is not for users.

        Args:
            message: The decoded frame.

        Returns:
            True when the stream is finished (its id is then free for reuse).
        """
        state = self._state
        if state is _CLOSING or state is _ENDED:
            return False
        if isinstance(message, Error):
            self._refused(error_from_frame(message.code, message.op, message.message))
            return True
        if self._awaiting_ok and isinstance(message, Ok):
            self._awaiting_ok = False
            self._on_ok(message.value)
            if self._accepted is not None and not self._accepted.done():
                self._accepted.set_result(message.value)
            return False
        entry = self._on_frame(message)
        if entry is not None:  # `_push`, inlined: this runs once per frame
            queue = self._queue
            queue.append(entry)
            self._received += 1
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if not self._holding and len(queue) >= self.max_queue:
                self._hold()
        return False

    def fail(self, exc: BaseException) -> None:
        """End the stream without an UNSUBSCRIBE, from the connection.

        @private: the connection calls it; it is not for users.

        Args:
            exc: Why: the connection is lost (the subscription waits to be re-established if
                the client reconnects) or a frame did not decode (it ends with that error).
        """
        if self._state in (_State.CLOSING, _State.ENDED, _State.NEW):
            return
        self._connection = None
        self._stream_id = 0
        self._holding = False
        self._awaiting_ok = False
        if self._state is _State.STARTING:
            if self._accepted is not None and not self._accepted.done():
                self._accepted.set_exception(exc)
            return
        if (
            isinstance(exc, ConnectionLost)
            and self.reconnect
            and should_reconnect(exc)
            and self._client._will_reconnect()
        ):
            self._state = _State.DETACHED
            return
        self._finish(exc)

    # --- used by the client -----------------------------------------------------------------------

    def _resubscribe(self, connection: Connection) -> None:
        """Send the subscription again on the client's new connection (no wait for the OK)."""
        if self._state is not _State.DETACHED:
            return
        self.resubscriptions += 1
        self._state = _State.ACTIVE
        try:
            self._send_subscribe(connection)
        except ConnectionLost:
            self._state = _State.DETACHED  # the next reconnection tries again
            return
        except ConvergeError as exc:
            self._finish(exc)
            return
        self._on_resubscribe()

    def _end(self, error: BaseException | None) -> None:
        """End the subscription from the client's side: closed (None) or lost for good."""
        if self._state is _State.STARTING:
            if self._accepted is not None and not self._accepted.done():
                self._accepted.set_exception(error or ConnectionLost("the client was closed"))
            return
        if error is None:
            self._queue.clear()
        self._finish(error)

    # --- internals --------------------------------------------------------------------------------

    def _send_subscribe(self, connection: Connection) -> None:
        message = self._subscribe_message()
        self._awaiting_ok = True
        self._stream_id = connection.open_subscription(message, self)
        self._connection = connection
        if len(self._queue) >= self.max_queue:
            self._hold()

    def _refused(self, error: BaseException) -> None:
        """The server answered the subscription with an ERROR: it does not exist any more."""
        self._connection = None
        self._stream_id = 0
        self._awaiting_ok = False
        if self._state is _State.STARTING:
            if self._accepted is not None and not self._accepted.done():
                self._accepted.set_exception(error)
            return
        self._finish(error)

    def _abandon_start(self, connection: Connection) -> None:
        """`start` failed or was cancelled: forget the subscription, and if the server may have
        accepted it, unsubscribe in the background."""
        stream_id = self._stream_id
        self._state = _State.ENDED
        self._release_hold()
        self._client._detach_subscription(self)
        self._connection = None
        self._stream_id = 0
        if stream_id and not connection.is_lost:  # accepted or not yet answered: unsubscribe
            task = asyncio.get_running_loop().create_task(self._unsubscribe(connection, stream_id))
            self._client._keep_task(task)

    async def _unsubscribe(self, connection: Connection, stream_id: int) -> None:
        try:
            await connection.request(Unsubscribe(stream_id))
        except ConvergeError:
            pass  # the connection is gone, or the server forgot it already: either way, ended
        finally:
            connection.release_stream(stream_id)

    def _finish(self, error: BaseException | None) -> None:
        if self._state is _State.ENDED:
            return
        self._state = _State.ENDED
        self._error = error
        self._release_hold()
        self._client._detach_subscription(self)
        self._wake()

    def _push(self, entry: Any) -> None:
        """Queue an entry for the consumer (`deliver` has it inlined)."""
        self._queue.append(entry)
        self._received += 1
        self._wake()
        if not self._holding and len(self._queue) >= self.max_queue:
            self._hold()

    def _take(self) -> Any:
        entry = self._queue.popleft()
        if self._holding and len(self._queue) <= self._low_water:
            self._release_hold()
        return entry

    def _hold(self) -> None:
        if self._connection is not None and not self._holding:
            self._connection.hold_reading(self)
            self._holding = True

    def _release_hold(self) -> None:
        if self._holding:
            self._holding = False
            if self._connection is not None:
                self._connection.release_reading(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


# --- state subscriptions ----------------------------------------------------------------------


class Subscription(_StreamSubscription[SubscriptionItem[T]]):
    """The live changes of one kind, made by `KindHandle.subscribe`.

    A subscription is an async iterator and an async context manager. It subscribes when the
    `async with` block is entered (or at the first item of a plain `async for`, or with
    `start()`) and unsubscribes when the block ends, when `close()` is called, or when a plain
    `async for` loop is left (the loop's generator is closed then; prefer `async with`, which
    closes at a known point).

    **Items.** It yields `Change` items (CREATED, UPDATED, DELETED, and BOOTSTRAP for the
    entities a bootstrap sends), `BootstrapStarted` and `BootstrapComplete` around each
    bootstrap, and `Resubscribed` each time it was re-established after its client
    reconnected. Errors the server reports for the subscription (e.g. `UnknownKind`) are raised
    by the iterator; so is `ConnectionLost` when the connection is gone for good (reconnection
    off or impossible, or the subscription made with `reconnect=False`). After
    `Client.close` the iteration simply ends.

    **Backpressure.** Notifications are queued per subscription by the connection's reader,
    which never waits for a consumer. When a subscription's queue reaches `max_queue` items,
    the client stops reading its socket until the consumer has taken half of them. The server
    then sees a backed-up subscriber and merges the notifications it holds for it per entity,
    so a slow consumer costs the server memory bounded by the number of entities, and costs
    this client at most `max_queue` items plus the socket's buffers. Stopping the socket stops
    every subscription of the client, and the replies to its requests: reading goes on while a
    reply is awaited (a consumer that queries between two items cannot deadlock), but a
    consumer that takes nothing for the server's subscriber timeout (60 s by default) gets its
    connection closed with SLOW_SUBSCRIBER; the client then reconnects and resumes the
    subscription.

    **Reconnection.** When the client reconnects, a subscription made with `reconnect=True` is
    re-established according to its `mode` (a `ReconnectMode`); items already queued are kept
    and delivered first. RESUME asks for the changes after the last seq received *completely*
    (`resume_seq`: the highest seq seen, minus one, so that a flush whose frames were cut by
    the disconnect is sent again whole): the resulting bootstrap may repeat a few entities,
    which every consumer already tolerates (keep the highest version).

    Example:
        ```python
        async with players.subscribe() as changes:
            async for item in changes:
                if isinstance(item, cdb.Change):
                    print(item.type.name, item.entity_id.hex(), item.value)
                elif isinstance(item, cdb.BootstrapComplete):
                    print("in sync with", item.count, "entities")
        ```
    """

    def __init__(
        self,
        handle: KindHandle[T],
        *,
        bootstrap: bool,
        include_previous: bool,
        mode: ReconnectMode,
        reconnect: bool,
        max_queue: int,
    ) -> None:
        """Prepare a subscription; `KindHandle.subscribe` does it, and says more.

        Args:
            handle: The kind to subscribe to.
            bootstrap: First receive every existing entity.
            include_previous: UPDATED (and DELETED) changes also carry the previous state.
            mode: How the subscription is re-established after a reconnection.
            reconnect: Whether it is re-established at all (False: it ends with the
                connection).
            max_queue: Queued items at which the client stops reading its socket.

        Raises:
            ValueError: `max_queue` is not a positive int.
        """
        super().__init__(handle.client, reconnect=reconnect, max_queue=max_queue)
        self.handle = handle
        """The kind subscribed to."""
        self.bootstrap = bootstrap
        """Whether the subscription started with a bootstrap of the kind's current entities."""
        self.include_previous = include_previous
        """Whether UPDATED changes carry the previous state."""
        self.mode = ReconnectMode(mode)
        """How the subscription is re-established after a reconnection."""
        self._ok_seq = 0
        self._seq = 0
        self._resume_seq = 0
        self._live_max = 0
        self._accepted_once = False
        self._asked_bootstrap = False
        self._bootstrap_mode: BootstrapMode | None = None

    def __repr__(self) -> str:
        return (
            f"<Subscription {self.handle.name!r} id={self.subscription_id} "
            f"{self._state.value} seq={self._seq}>"
        )

    @property
    def seq(self) -> int:
        """The highest seq received so far (the SUBSCRIBE OK value included)."""
        return self._seq

    @property
    def accepted_seq(self) -> int:
        """The server's committed seq when it accepted the latest (re)subscription (its OK)."""
        return self._ok_seq

    @property
    def resume_seq(self) -> int:
        """The `since_seq` a RESUME would ask from now: every change up to it was received."""
        return self._resume_seq

    @property
    def bootstrapping(self) -> bool:
        """Whether a bootstrap is being received (BOOTSTRAP_BEGIN seen, not BOOTSTRAP_END)."""
        return self._bootstrap_mode is not None

    def _subscribe_message(self) -> Subscribe:
        flags = SubscribeFlags.INCLUDE_PREVIOUS if self.include_previous else SubscribeFlags.NONE
        since = 0
        if not self._accepted_once:
            if self.bootstrap:
                flags |= SubscribeFlags.BOOTSTRAP
        elif self.mode is ReconnectMode.FULL:
            flags |= SubscribeFlags.BOOTSTRAP
        elif self.mode is ReconnectMode.RESUME:
            flags |= SubscribeFlags.BOOTSTRAP | SubscribeFlags.RESUME
            since = self._resume_seq
        self._asked_bootstrap = bool(flags & SubscribeFlags.BOOTSTRAP)
        self._bootstrap_mode = None
        return Subscribe(self.handle.kind_id, flags, since)

    def _on_resubscribe(self) -> None:
        since = self._resume_seq if self.mode is ReconnectMode.RESUME else 0
        self._push(Resubscribed(self.mode, since))

    def _on_ok(self, value: int) -> None:
        self._accepted_once = True
        self._ok_seq = value
        self._seq = max(self._seq, value)
        if not self._asked_bootstrap:
            self._resume_seq = max(self._resume_seq, value)

    def _on_frame(self, message: Message) -> Any:
        if isinstance(message, State):  # once per change: `_saw_live` inlined
            seq = message.seq
            if seq > self._seq:
                self._seq = seq
            if message.type is not _WIRE_BOOTSTRAP:
                if self._bootstrap_mode is None:
                    if seq - 1 > self._resume_seq:
                        self._resume_seq = seq - 1
                elif seq > self._live_max:
                    self._live_max = seq
            return message
        if isinstance(message, Deleted):
            self._seq = max(self._seq, message.seq)
            if self._bootstrap_mode is None:  # inside a bootstrap it may be a delta's tombstone
                self._saw_live(message.seq)
            return message
        if isinstance(message, BootstrapBegin):
            self._bootstrap_mode = message.mode
            self._live_max = 0
            return BootstrapStarted(message.mode, message.count, self.resubscriptions > 0)
        if isinstance(message, BootstrapEnd):
            mode = self._bootstrap_mode or BootstrapMode.FULL
            self._bootstrap_mode = None
            self._resume_seq = max(self._resume_seq, self._ok_seq, self._live_max - 1)
            return BootstrapComplete(mode, message.count)
        return None

    def _saw_live(self, seq: int) -> None:
        """A live change of flush `seq`: every flush before it was received whole."""
        if self._bootstrap_mode is None:
            self._resume_seq = max(self._resume_seq, seq - 1)
        else:
            self._live_max = max(self._live_max, seq)

    def _to_item(self, entry: Any) -> SubscriptionItem[T]:
        if isinstance(entry, State):
            return self._change(entry)
        if isinstance(entry, Deleted):
            return self._deletion(entry)
        item: BootstrapStarted | BootstrapComplete | Resubscribed = entry
        return item

    def _change(self, message: State) -> Change[T]:
        handle = self.handle
        previous = handle.decode(message.previous) if message.previous else None
        change_type = _CHANGE_TYPES.get(message.type)
        if change_type is None:  # not a wire type: say so as ChangeType() does
            change_type = ChangeType(message.type)
        change: Change[T] = _new_change(
            change_type,
            message.eid,
            handle.decode(message.data),
            message.version,
            message.source_set,
            message.changed_fields,
            message.seq,
            previous,
            message.meta,
            None,
            handle.field_names,
        )
        return change

    def _deletion(self, message: Deleted) -> Change[T]:
        handle = self.handle
        previous = handle.decode(message.previous) if message.previous else None
        change: Change[T] = _new_change(
            ChangeType.DELETED,
            message.eid,
            None,
            message.version,
            0,
            0,
            message.seq,
            previous,
            message.meta,
            message.cause,
            handle.field_names,
        )
        return change


# --- event subscriptions ----------------------------------------------------------------------


class EventSubscription(_StreamSubscription[EventItem[T]]):
    """The event stream of an event-stream kind, made by `KindHandle.subscribe_events`.

    Yields one `EventItem` per recorded write, in sequence order. Its lifecycle and
    backpressure are those of a `Subscription` (`async with`, `start()`, `close()`). After a
    reconnection it resumes from the event after the last one received; if the server no
    longer keeps it, the iterator raises `EventsTruncated`.

    Example:
        ```python
        async with trades.subscribe_events(from_seq=1) as events:
            async for event in events:
                print(event.seq, event.op.name, event.data, event.metadata())
        ```
    """

    def __init__(
        self, handle: KindHandle[T], *, from_seq: int, reconnect: bool, max_queue: int
    ) -> None:
        """Prepare an event subscription; `KindHandle.subscribe_events` does it, and says more.

        Args:
            handle: The kind whose events to receive (an event-stream kind).
            from_seq: The first event wanted (0: only events recorded from now on).
            reconnect: Whether it is re-established after a reconnection (False: it ends
                with the connection).
            max_queue: Queued items at which the client stops reading its socket.

        Raises:
            ValueError: `from_seq` is negative or `max_queue` not a positive int.
        """
        if isinstance(from_seq, bool) or not isinstance(from_seq, int) or from_seq < 0:
            raise ValueError(f"from_seq must be an int >= 0, got {from_seq!r}")
        super().__init__(handle.client, reconnect=reconnect, max_queue=max_queue)
        self.handle = handle
        """The kind whose events are delivered."""
        self.from_seq = from_seq
        """The first event asked for (0: only events recorded after subscribing)."""
        self._next_seq = from_seq

    def __repr__(self) -> str:
        return (
            f"<EventSubscription {self.handle.name!r} id={self.subscription_id} "
            f"{self._state.value} next_seq={self._next_seq}>"
        )

    @property
    def next_seq(self) -> int:
        """The sequence number of the next event expected (where a resume starts)."""
        return self._next_seq

    def _subscribe_message(self) -> SubscribeEvents:
        return SubscribeEvents(self.handle.kind_id, self._next_seq)

    def _on_ok(self, value: int) -> None:
        self._next_seq = max(self._next_seq, value)

    def _on_frame(self, message: Message) -> Any:
        if isinstance(message, Event):
            self._next_seq = max(self._next_seq, message.seq + 1)
            return message
        return None

    def _to_item(self, entry: Any) -> EventItem[T]:
        message: Event = entry
        handle = self.handle
        op = EventOp(message.op)
        data: T | dict[str, Any] | None = None
        if op is EventOp.ASSERT:
            data = handle.decode(message.data)
        elif op is EventOp.PATCH:
            data = handle.decode_patch(message.mask, message.data)
        return EventItem(
            message.seq,
            message.source_id,
            op,
            EventCause(message.cause),
            message.eid,
            message.mask,
            data,
            message.meta,
        )
