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

    Such a handle comes from `resolve_kind` with an older declaration than the server's: it can
    read (the newer fields are not seen) but writing would drop the fields it does not know.
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
    """The answer to a point query.

    `status` is ALIVE (`value` holds the entity), TOMBSTONE (the entity was deleted and its
    tombstone is still kept; `version` is the tombstone's) or NOT_FOUND (`version` 0).
    `source_set` has bit N set when source N asserts the entity (0 unless ALIVE).
    """

    status: QueryStatus
    version: int
    source_set: int
    value: T | None

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

    Writes (`assert_`, `patch`, `retract`) are fire-and-forget: they return once the frame is
    handed to the connection, with no reply from the server. A write the server rejects is
    reported later (see `WriteRejected`); each write first raises any such pending rejection.
    Values that do not fit the schema raise `convergedb.InvalidData` before anything is sent.
    Use `client.sync()` to wait until the writes sent so far are durable and visible.
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
        self._client = client
        self.model: HandleModel[T] = model
        """The model of the declared class (its definition, row codec and conversions), or a
        `DynamicModel` for a handle from `client.kind(name)`."""
        self.registered = registered
        """Whether the handle came from `register_kind` (re-registered after a reconnection)
        rather than `resolve_kind` (re-resolved)."""
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
        """Take the kind's id, schema version and definition from a KIND_INFO of the server
        (the client does it after reconnecting)."""
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
        data changes nothing. `meta` travels to subscribers with the resulting notification.
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
        """Set only the named fields, e.g. `await players.patch(pid, hp=75)`.

        Fields may be given as a mapping, as keywords, or both (a field named `meta` must go in
        the mapping). The other fields keep their stored values; a missing entity is created with
        zero values for the fields not given. Like an assert, it sets this source's bit.
        """
        payload = self.patch_payload(entity_id, merge_changes(changes, fields), meta)
        await self._client._send_write(Opcode.PATCH, payload)

    async def retract(self, entity_id: EntityKey, *, meta: BytesLike = b"") -> None:
        """Withdraw this source's assertion of the entity.

        The entity becomes a tombstone when no other source asserts it; retracting an entity
        this source does not assert is a no-op.
        """
        payload = self.retract_payload(entity_id, meta)
        await self._client._send_write(Opcode.RETRACT, payload)

    # --- reads --------------------------------------------------------------------------------

    async def query(self, entity_id: EntityKey) -> QueryResult[T]:
        """The committed state of one entity (writes become visible once flushed: see `sync`)."""
        eid = make_entity_id(entity_id)
        reply = await self._client._request(Query(self.kind_id, eid), QueryResultMessage)
        value = self.decode(reply.data) if reply.status is QueryStatus.ALIVE else None
        return QueryResult(reply.status, reply.version, reply.source_set, value)

    def decode(self, row: bytes) -> T:
        """An instance from a row the server sent (of the server's schema), checking it first.

        Fields of a newer server schema than the class declares are dropped.
        """
        codec = self._codec
        if not codec.is_valid(row):
            codec.validate(row)
        return self.model.from_values(codec.decode(row))

    def decode_patch(self, mask: int, values: bytes) -> dict[str, Any]:
        """The fields a PATCH sets (its mask and values, as an event carries them), by name,
        converted like the class's attributes. Fields the class does not declare keep their
        wire value, under the server's name. Raises `InvalidData` for values that do not fit.
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
        """The live changes of this kind: `async with handle.subscribe() as sub: async for ...`.

        - `bootstrap`: first receive every existing entity (BOOTSTRAP changes between
          `BootstrapStarted` and `BootstrapComplete`); live changes may interleave with it.
        - `include_previous`: UPDATED (and DELETED) changes also carry the previous state.
        - `mode`: how the subscription is re-established after the client reconnects:
          RESUME (default: only what changed meanwhile), FULL (bootstrap again) or LIVE_ONLY.
        - `reconnect`: False ends the subscription with `ConnectionLost` when the connection is
          lost, even if the client reconnects.
        - `max_queue`: items queued before the client stops reading its socket (backpressure,
          see `convergedb.client.subscription`).

        Nothing is sent before the subscription starts (`async with`, `start()`, or the first
        item of an `async for`).
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
        """The event stream of this kind (registered with `event_stream=True`): one `EventItem`
        per ASSERT / PATCH / RETRACT received, before coalescing, with its own metadata.

        `from_seq` is the first event wanted, if the server still keeps it (else the iterator
        raises `EventsTruncated`); 0 means only events recorded from now on. After a
        reconnection the stream resumes after the last event received.
        """
        return EventSubscription(self, from_seq=from_seq, reconnect=reconnect, max_queue=max_queue)

    # --- encoding (shared with batches) ---------------------------------------------------------

    def assert_payload(self, entity_id: EntityKey, value: T, meta: BytesLike = b"") -> bytes:
        """The ASSERT payload of `value`; raises `InvalidData` if it does not fit the schema."""
        self._check_writable()
        row = self.model.encode(value)
        return _encoded(Assert(self.kind_id, make_entity_id(entity_id), row, _meta(meta)))

    def patch_payload(
        self, entity_id: EntityKey, changes: Mapping[str, Any], meta: BytesLike = b""
    ) -> bytes:
        """The PATCH payload setting the named fields; raises `InvalidData` if one does not fit."""
        self._check_writable()
        mask, values = self.model.patch(changes)
        return _encoded(Patch(self.kind_id, make_entity_id(entity_id), mask, values, _meta(meta)))

    def retract_payload(self, entity_id: EntityKey, meta: BytesLike = b"") -> bytes:
        """The RETRACT payload of the entity."""
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
