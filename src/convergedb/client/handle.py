"""Kind handles: writing, reading and subscribing to the entities of one kind through a client.

`client.register_kind(Player)` (or `resolve_kind`) returns a `KindHandle[Player]`, which knows the
kind's id on the server and encodes `Player` instances to rows and back. `handle.subscribe()` and
`handle.subscribe_events()` open subscriptions (see `convergedb.client.subscription`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from ..ids import entity_id as make_entity_id
from ..protocol.codes import Opcode, QueryStatus
from ..protocol.messages import Assert, KindInfo, Patch, Query, Retract
from ..protocol.messages import QueryResult as QueryResultMessage
from ..protocol.wire import BytesLike, EncodeError
from ..schema.errors import InvalidData
from ..schema.patch import apply_patch, mask_ordinals
from ..schema.rows import RowCodec
from ..schema.types import Field, KindDef
from .errors import ConvergeError
from .reconnect import ReconnectMode
from .subscription import DEFAULT_MAX_QUEUE, EventSubscription, Subscription

if TYPE_CHECKING:
    from .client import Client

T = TypeVar("T")

EntityKey = int | str | uuid.UUID | bytes | bytearray | memoryview
"""Anything that names an entity: an int (u64), a str (hashed), a UUID, or raw bytes (<= 32)."""


class ReadOnlyHandle(ConvergeError, TypeError):
    """A write through a handle whose class does not declare every field of the server's schema.

    Such a handle comes from `Client.resolve_kind` with an older declaration than the server's:
    it can read (the newer fields are not seen) but writing would drop the fields it does not
    know. Declare every field and use `Client.register_kind` to write. Raised before anything
    is sent; also a `TypeError`.
    """


class ModelField(Protocol):
    """One field as a handle's model names it: the model's name for it and the schema field."""

    @property
    def name(self) -> str: ...

    @property
    def field(self) -> Field: ...


class HandleModel(Protocol[T]):
    """What a `KindHandle` needs of its model: the kind's definition and row codec, and the
    conversions between values of type `T` and positional wire values.

    `convergedb.KindModel` (a class declared with `@convergedb.kind`) is one; the
    `DynamicModel` of `convergedb.client.dynamic` (values as dicts by field name, built from
    the server's schema) is the other.
    """

    @property
    def name(self) -> str: ...

    @property
    def cls(self) -> type[Any]: ...

    @property
    def definition(self) -> KindDef: ...

    @property
    def codec(self) -> RowCodec: ...

    @property
    def members(self) -> Sequence[ModelField]: ...

    @property
    def names(self) -> tuple[str, ...]: ...

    def from_values(self, values: Sequence[Any]) -> T: ...

    def encode(self, obj: T) -> bytes: ...

    def patch(self, changes: Mapping[str, Any]) -> tuple[int, bytes]: ...


@dataclass(frozen=True, slots=True)
class QueryResult(Generic[T]):
    """The answer to a point query (`KindHandle.query`).

    | `status` | `value` | `version` | `source_set` |
    |---|---|---|---|
    | `ALIVE` | the entity | its version | the sources asserting it |
    | `TOMBSTONE` | None | the tombstone's version | 0 |
    | `NOT_FOUND` | None | 0 | 0 |
    """

    status: QueryStatus
    """ALIVE (the entity exists), TOMBSTONE (it was deleted, and its tombstone is still kept)
    or NOT_FOUND (never existed, or its tombstone has been compacted away)."""
    version: int
    """The entity's version (the tombstone's for TOMBSTONE; 0 for NOT_FOUND)."""
    source_set: int
    """Bit N set when source N asserts the entity (0 unless ALIVE); `sources` lists them."""
    value: T | None
    """The entity's value, decoded into the handle's class (a dict for a
    `DynamicKindHandle`); None unless ALIVE."""

    @property
    def alive(self) -> bool:
        """Whether the entity exists (some source asserts it)."""
        return self.status is QueryStatus.ALIVE

    @property
    def found(self) -> bool:
        """Whether the server knows the entity at all: alive, or a tombstone still kept."""
        return self.status is not QueryStatus.NOT_FOUND

    @property
    def sources(self) -> list[int]:
        """The ids of the sources that assert the entity, ascending."""
        return [bit for bit in range(64) if self.source_set >> bit & 1]


class KindHandle(Generic[T]):
    """One kind on one client: write and read its entities as instances of the declared class.

    Made by `Client.register_kind` (writers) or `Client.resolve_kind` (readers); a
    `DynamicKindHandle` from `Client.kind` has dicts as values. After a reconnection the client
    refreshes the handle: keep using the same object.

    Writes (`assert_`, `patch`, `retract`) are fire-and-forget: they return once the frame is
    handed to the connection, with no reply from the server. A write the server rejects is
    reported later (see `WriteRejected`); each write first raises any such pending rejection.
    Values that do not fit the schema raise `convergedb.InvalidData` before anything is sent.
    Use `Client.sync` to wait until the writes sent so far are durable and visible.

    Example:
        ```python
        players = await client.register_kind(Player)
        await players.assert_("player:ana", Player(name="ana", hp=90))
        await players.patch("player:ana", hp=75)
        await client.sync()
        print((await players.query("player:ana")).value.hp)  # 75
        ```
    """

    def __init__(
        self,
        client: Client,
        model: HandleModel[T],
        kind_id: int,
        schema_version: int,
        server_definition: KindDef,
        *,
        registered: bool = False,
    ) -> None:
        """Make a handle from the server's answer about the kind (the client does it).

        Args:
            client: The client to write and read through.
            model: The model of the declared class (or a `DynamicModel`).
            kind_id: The kind's id on the server.
            schema_version: The server's schema version of the kind.
            server_definition: The kind's definition on the server.
            registered: Whether the handle comes from `Client.register_kind` rather than
                `Client.resolve_kind`.
        """
        self._client = client
        self.model: HandleModel[T] = model
        """The model of the declared class (its definition, row codec and conversions), or a
        `DynamicModel` for a handle from `Client.kind`."""
        self.registered = registered
        """Whether the handle came from `Client.register_kind` (re-registered after a
        reconnection) rather than `Client.resolve_kind` (re-resolved)."""
        self.kind_id = kind_id
        """The kind's id on the server (refreshed after a reconnection)."""
        self.schema_version = schema_version
        """The server's schema version of the kind when the handle was made (or refreshed)."""
        self.server_definition = server_definition
        """The kind's current definition on the server (may have more fields than the class)."""
        self.writable = False
        """False when the server's schema has fields the class does not declare (read-only)."""
        self.field_names: tuple[str, ...] = ()
        """The names of the server's fields by ordinal: the class's attribute names, then the
        server's names for the fields the class does not declare."""
        self._codec = model.codec
        self._set_definition(server_definition)

    def _set_definition(self, server_definition: KindDef) -> None:
        model = self.model
        self.server_definition = server_definition
        self.writable = len(server_definition.fields) == len(model.definition.fields)
        self._codec = model.codec if self.writable else RowCodec(server_definition.fields)
        declared = {m.field.ordinal: m.name for m in model.members}
        self.field_names = tuple(declared.get(f.ordinal, f.name) for f in server_definition.fields)

    def refresh(self, info: KindInfo) -> None:
        """Take the kind's id, schema version and definition from the server's KIND_INFO.

        @private: the client does it after reconnecting; there is no need to call it.

        Args:
            info: The server's answer to CREATE_KIND or GET_KIND for this kind.
        """
        self.kind_id = info.kind_id
        self.schema_version = info.schema_version
        self._set_definition(info.kind)

    @property
    def client(self) -> Client:
        """The client this handle writes and reads through."""
        return self._client

    @property
    def name(self) -> str:
        """The kind's name."""
        return self.model.name

    def __repr__(self) -> str:
        mode = "" if self.writable else ", read-only"
        return (
            f"KindHandle({self.name!r}, kind_id={self.kind_id}, "
            f"schema_version={self.schema_version}{mode})"
        )

    # --- writes -------------------------------------------------------------------------------

    async def assert_(self, entity_id: EntityKey, value: T, *, meta: BytesLike = b"") -> None:
        """Assert that the entity exists with exactly `value` (this source's full record).

        Creates the entity (or re-creates a tombstone), or replaces its field data; identical
        data changes nothing. Sets this source's bit in the entity's source set.

        Args:
            entity_id: The entity: an `EntityKey` (an int, a str, a UUID or raw bytes).
            value: The entity's whole value: an instance of the handle's class.
            meta: Opaque metadata (at most 65,535 bytes) delivered to subscribers with the
                resulting change, and kept in the event stream; `encode_metadata` builds
                key/value metadata.

        Raises:
            InvalidData: `value` does not fit the schema (nothing is sent).
            TypeError: `entity_id` is of a type that names no entity, or `meta` is not bytes.
            ValueError: `entity_id` is out of range (an int above a u64, bytes over 32).
            ReadOnlyHandle: The handle's class declares fewer fields than the server's schema
                (a `Client.resolve_kind` handle with an older declaration).
            ReadOnlyError: A `DynamicKindHandle` of a read-only client.
            PayloadTooLarge: The write exceeds the server's maximum payload.
            WriteRejected: A write sent earlier was rejected (raised once, before this one is
                sent; see `Client`).
            ConnectionLost: The client is not connected.

        Example:
            ```python
            await players.assert_("player:ana", Player(name="ana", hp=90))
            await players.assert_(42, Player(name="bob"), meta=cdb.encode_metadata({"by": "gm"}))
            ```
        """
        payload = self.assert_payload(entity_id, value, meta)
        await self._client._send_write(Opcode.ASSERT, payload)

    async def patch(
        self,
        entity_id: EntityKey,
        changes: Mapping[str, Any] | None = None,
        /,
        *,
        meta: BytesLike = b"",
        **fields: Any,
    ) -> None:
        """Set only the named fields of the entity; the other fields keep their stored values.

        A missing entity (or a tombstone) is created, with zero values for the fields not
        given. Like an assert, it sets this source's bit in the entity's source set; only the
        fields given travel on the wire.

        Args:
            entity_id: The entity: an `EntityKey` (an int, a str, a UUID or raw bytes).
            changes: Field names to new values (optional; a field named `meta` must go here).
            meta: Opaque metadata (at most 65,535 bytes) delivered to subscribers with the
                resulting change, and kept in the event stream; `encode_metadata` builds
                key/value metadata.
            fields: More field names to new values, as keyword arguments.

        Raises:
            AttributeError: A name is not a field of the handle's class.
            InvalidData: No field is given, or a value does not fit its field (nothing is
                sent).
            TypeError: A field is given both in `changes` and as a keyword, `entity_id` is of
                a type that names no entity, or `meta` is not bytes.
            ValueError: `entity_id` is out of range.
            ReadOnlyHandle: The handle's class declares fewer fields than the server's schema
                (a `Client.resolve_kind` handle with an older declaration).
            ReadOnlyError: A `DynamicKindHandle` of a read-only client.
            PayloadTooLarge: The write exceeds the server's maximum payload.
            WriteRejected: A write sent earlier was rejected (raised once, before this one is
                sent; see `Client`).
            ConnectionLost: The client is not connected.

        Example:
            ```python
            await players.patch("player:ana", hp=75)
            await players.patch("player:ana", {"hp": 60, "name": "Ana"}, meta=meta)
            ```
        """
        payload = self.patch_payload(entity_id, merge_changes(changes, fields), meta)
        await self._client._send_write(Opcode.PATCH, payload)

    async def retract(self, entity_id: EntityKey, *, meta: BytesLike = b"") -> None:
        """Withdraw this source's assertion of the entity.

        The entity becomes a tombstone (subscribers see DELETED, with the cause RETRACTED)
        when no other source asserts it; retracting an entity this source does not assert is
        a no-op.

        Args:
            entity_id: The entity: an `EntityKey` (an int, a str, a UUID or raw bytes).
            meta: Opaque metadata (at most 65,535 bytes) delivered to subscribers with the
                resulting change, and kept in the event stream; `encode_metadata` builds
                key/value metadata.

        Raises:
            TypeError: `entity_id` is of a type that names no entity, or `meta` is not bytes.
            ValueError: `entity_id` is out of range (an int above a u64, bytes over 32).
            ReadOnlyHandle: The handle's class declares fewer fields than the server's schema
                (a `Client.resolve_kind` handle with an older declaration).
            ReadOnlyError: A `DynamicKindHandle` of a read-only client.
            PayloadTooLarge: The write exceeds the server's maximum payload.
            WriteRejected: A write sent earlier was rejected (raised once, before this one is
                sent; see `Client`).
            ConnectionLost: The client is not connected.

        Example:
            ```python
            await players.retract("player:ana")
            ```
        """
        payload = self.retract_payload(entity_id, meta)
        await self._client._send_write(Opcode.RETRACT, payload)

    # --- reads --------------------------------------------------------------------------------

    async def query(self, entity_id: EntityKey) -> QueryResult[T]:
        """Read the committed state of one entity.

        Writes become visible once flushed: a writer that wants to read its own write calls
        `Client.sync` first.

        Args:
            entity_id: The entity: an `EntityKey` (an int, a str, a UUID or raw bytes).

        Returns:
            A `QueryResult`: its `status` (ALIVE, TOMBSTONE or NOT_FOUND), `version`,
            `source_set` and `value` (None unless ALIVE).

        Raises:
            TypeError: `entity_id` is of a type that names no entity.
            ValueError: `entity_id` is out of range.
            InvalidData: The server's row does not decode (a bug, or a corrupt store).
            WriteRejected: A write sent earlier was rejected (see `Client`).
            ConnectionLost: The client is not connected, or the connection was lost before the
                reply.

        Example:
            ```python
            result = await players.query("player:ana")
            if result.alive:
                print(result.version, result.value)
            ```
        """
        eid = make_entity_id(entity_id)
        reply = await self._client._request(Query(self.kind_id, eid), QueryResultMessage)
        value = self.decode(reply.data) if reply.status is QueryStatus.ALIVE else None
        return QueryResult(reply.status, reply.version, reply.source_set, value)

    def decode(self, row: bytes) -> T:
        """Decode a row the server sent (of the server's schema) into a value, checking it.

        Fields of a newer server schema than the class declares are dropped.

        Args:
            row: The row bytes, e.g. of a query result or a STATE notification.

        Returns:
            An instance of the handle's class (a dict for a `DynamicKindHandle`).

        Raises:
            InvalidData: The row does not fit the server's schema.
        """
        codec = self._codec
        if not codec.is_valid(row):
            codec.validate(row)
        return self.model.from_values(codec.decode(row))

    def decode_patch(self, mask: int, values: bytes) -> dict[str, Any]:
        """Decode the fields a PATCH sets (its mask and values, as an event carries them).

        Args:
            mask: The PATCH's field mask: bit N set for the field of ordinal N.
            values: The PATCH's values, in ordinal order.

        Returns:
            Field name to value, converted like the class's attributes. Fields the class does
            not declare keep their wire value, under the server's name.

        Raises:
            InvalidData: The mask or the values do not fit the schema.
        """
        codec = self._codec
        row = apply_patch(codec, codec.zero_row, mask, values)
        wire = codec.decode(row)
        instance = self.model.from_values(wire)
        names = self.field_names
        declared = len(self.model.names)
        return {
            names[o]: getattr(instance, names[o]) if o < declared else wire[o]
            for o in mask_ordinals(mask)
        }

    # --- subscriptions --------------------------------------------------------------------------

    def subscribe(
        self,
        *,
        bootstrap: bool = True,
        include_previous: bool = False,
        mode: ReconnectMode = ReconnectMode.RESUME,
        reconnect: bool = True,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> Subscription[T]:
        """Subscribe to the live changes of this kind.

        Nothing is sent before the subscription starts (`async with`, `Subscription.start`, or
        the first item of an `async for`). See `Subscription` for the items it yields.

        Args:
            bootstrap: First receive every existing entity (BOOTSTRAP changes between
                `BootstrapStarted` and `BootstrapComplete`); live changes may interleave with
                it: keep the highest version of each entity.
            include_previous: UPDATED (and DELETED) changes also carry the previous state.
            mode: How the subscription is re-established after the client reconnects: RESUME
                (only what changed meanwhile), FULL (a full bootstrap again) or LIVE_ONLY (no
                catching up). See `ReconnectMode`.
            reconnect: False ends the subscription with `ConnectionLost` when the connection
                is lost, even if the client reconnects.
            max_queue: Items queued before the client stops reading its socket (backpressure:
                see `Subscription`).

        Returns:
            The `Subscription`, not started yet.

        Raises:
            ValueError: `max_queue` is not a positive int.

        Example:
            ```python
            async with players.subscribe(include_previous=True) as changes:
                async for item in changes:
                    if isinstance(item, cdb.Change):
                        print(item.type.name, item.changed_field_names, item.value)
                    elif isinstance(item, cdb.BootstrapComplete):
                        print("in sync:", item.count, "entities")
            ```
        """
        return Subscription(
            self,
            bootstrap=bootstrap,
            include_previous=include_previous,
            mode=mode,
            reconnect=reconnect,
            max_queue=max_queue,
        )

    def subscribe_events(
        self, from_seq: int = 0, *, reconnect: bool = True, max_queue: int = DEFAULT_MAX_QUEUE
    ) -> EventSubscription[T]:
        """Subscribe to the event stream of this kind: every write, before coalescing.

        The kind must be declared with `event_stream=True`. The subscription yields one
        `EventItem` per ASSERT, PATCH or RETRACT the server received (and per retract it
        synthesised at an epoch end or a liveness expiry), each with its own metadata. After a
        reconnection the stream resumes after the last event received. Nothing is sent before
        the subscription starts.

        Args:
            from_seq: The first event wanted, if the server still keeps it; 0 means only
                events recorded from now on.
            reconnect: False ends the subscription with `ConnectionLost` when the connection
                is lost, even if the client reconnects.
            max_queue: Items queued before the client stops reading its socket.

        Returns:
            The `EventSubscription`, not started yet. Starting it (or iterating) raises
            `NotEventStream` for a kind without an event stream, and `EventsTruncated` when
            `from_seq` is no longer kept.

        Raises:
            ValueError: `from_seq` is negative or `max_queue` not a positive int.

        Example:
            ```python
            async for event in trades.subscribe_events(from_seq=1):
                print(event.seq, event.op.name, event.source_id, event.data)
            ```
        """
        return EventSubscription(self, from_seq=from_seq, reconnect=reconnect, max_queue=max_queue)

    # --- encoding (shared with batches) ---------------------------------------------------------

    def assert_payload(self, entity_id: EntityKey, value: T, meta: BytesLike = b"") -> bytes:
        """Encode an ASSERT of `value`, without sending it (what `Batch.assert_` uses).

        Args:
            entity_id: The entity.
            value: The entity's whole value.
            meta: The write's metadata.

        Returns:
            The ASSERT frame's payload.

        Raises:
            InvalidData: `value` does not fit the schema.
            ReadOnlyHandle: The handle cannot write (see `assert_`).
        """
        self._check_writable()
        row = self.model.encode(value)
        return _encoded(Assert(self.kind_id, make_entity_id(entity_id), row, _meta(meta)))

    def patch_payload(
        self, entity_id: EntityKey, changes: Mapping[str, Any], meta: BytesLike = b""
    ) -> bytes:
        """Encode a PATCH setting the named fields, without sending it (what `Batch.patch` uses).

        Args:
            entity_id: The entity.
            changes: Field names to new values.
            meta: The write's metadata.

        Returns:
            The PATCH frame's payload.

        Raises:
            AttributeError: A name is not a field of the handle's class.
            InvalidData: No field is given, or a value does not fit.
            ReadOnlyHandle: The handle cannot write (see `assert_`).
        """
        self._check_writable()
        mask, values = self.model.patch(changes)
        return _encoded(Patch(self.kind_id, make_entity_id(entity_id), mask, values, _meta(meta)))

    def retract_payload(self, entity_id: EntityKey, meta: BytesLike = b"") -> bytes:
        """Encode a RETRACT of the entity, without sending it (what `Batch.retract` uses).

        Args:
            entity_id: The entity.
            meta: The write's metadata.

        Returns:
            The RETRACT frame's payload.

        Raises:
            ReadOnlyHandle: The handle cannot write (see `assert_`).
        """
        self._check_writable()
        return _encoded(Retract(self.kind_id, make_entity_id(entity_id), _meta(meta)))

    def _check_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyHandle(
                f"kind {self.name!r} has {len(self.server_definition.fields)} fields on the "
                f"server but {self.model.cls.__name__} declares only "
                f"{len(self.model.definition.fields)}: a handle from resolve_kind with an older "
                "declaration can read but not write. Declare every field and use register_kind "
                "to write."
            )


def merge_changes(changes: Mapping[str, Any] | None, fields: dict[str, Any]) -> dict[str, Any]:
    """The fields of a patch given as a mapping and as keywords (a name in both is an error)."""
    if changes is None:
        return fields
    merged = dict(changes)
    for name in fields:
        if name in merged:
            raise TypeError(f"field {name!r} is given both in the mapping and as a keyword")
    merged.update(fields)
    return merged


def _meta(meta: BytesLike) -> bytes:
    if not isinstance(meta, bytes | bytearray | memoryview):
        raise TypeError(f"meta must be bytes, got {type(meta).__name__}")
    return bytes(meta)


def _encoded(message: Assert | Patch | Retract) -> bytes:
    """The payload of a write; values the wire cannot carry (metadata over 65,535 bytes) raise
    `InvalidData`, before anything is sent."""
    try:
        return message.encode()
    except EncodeError as exc:
        raise InvalidData(str(exc)) from None
