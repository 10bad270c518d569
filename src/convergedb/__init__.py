"""ConvergeDB: the live, merged state of typed entities written by many independent sources.

The public surface of the Python package, all importable from here (`import convergedb as
cdb`):

- **Declaring kinds**: the decorators `kind` and `struct`, and the field specs (`U8` ...
  `U128`, `I8` ... `I64`, `F32`, `F64`, `Bool`, `String`, `Bytes`, `Struct`, `Array`).
- **The client SDK**, documented with an overview in `convergedb.client`: `connect`,
  `Client`, `KindHandle`, `Batch`, `Subscription`, `Mirror`, and the errors (`ConvergeError`
  and its subclasses).
- **Entity ids**: `entity_id` and the `id_from_*` helpers. An `EntityId` is exactly 32
  bytes; an int key is its u64 little-endian, a str key the SHA-256 of its UTF-8, a UUID its
  16 bytes, and raw bytes (at most 32) are zero-padded.
- **Schema errors** raised before anything is sent: `InvalidSchema`, `InvalidData`,
  `SchemaConflict`, `ReservedName` (all `SchemaError`, a `ValueError`).

## Declaring a kind

A kind is a class whose attributes are annotated `Annotated[<python type>, <spec>]`, where
the spec gives the wire type and the field's permanent ordinal:

```python
from typing import Annotated

import convergedb as cdb


@cdb.struct
class Vec3:
    x: Annotated[float, cdb.F32(0)] = 0.0
    y: Annotated[float, cdb.F32(1)] = 0.0
    z: Annotated[float, cdb.F32(2)] = 0.0


@cdb.kind("player")
class Player:
    name: Annotated[str, cdb.String(0, max_length=32)] = ""
    hp: Annotated[int, cdb.U16(1)] = 0
    pos: Annotated[Vec3, cdb.Struct(2)] = Vec3()
    inventory: Annotated[list[int], cdb.Array(3, cdb.U32(), max_count=64)] = []


async def main() -> None:
    async with cdb.connect(name="game-server-1") as client:
        players = await client.register_kind(Player)
        await players.assert_("player:ana", Player(name="ana", hp=90, pos=Vec3(1, 2, 3)))
        await client.sync()
```
"""

from .client import (
    AuthFailed,
    Batch,
    BootstrapComplete,
    BootstrapMode,
    BootstrapStarted,
    Change,
    ChangeType,
    Client,
    ConnectionLost,
    ConvergeError,
    DeleteCause,
    EpochNotOpen,
    EventCause,
    EventItem,
    EventOp,
    EventsTruncated,
    EventSubscription,
    Forbidden,
    InternalError,
    InvalidDataError,
    InvalidSchemaError,
    KindHandle,
    LimitExceeded,
    MetadataError,
    Mirror,
    MirrorEntry,
    NoFreeSource,
    NotEventStream,
    PayloadTooLarge,
    ProtocolViolation,
    QueryResult,
    ReadOnlyError,
    ReadOnlyHandle,
    ReconnectMode,
    ReconnectPolicy,
    Resubscribed,
    SchemaConflictError,
    ServerError,
    ShuttingDown,
    SlowSubscriber,
    SourceConflict,
    Subscription,
    SubscriptionItem,
    TakenOver,
    UnknownKind,
    UnknownSubscription,
    WriteRejected,
    WritesLost,
    connect,
    decode_metadata,
    encode_metadata,
    is_metadata,
)
from .declare import (
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    U128,
    Array,
    Bool,
    Bytes,
    FieldSpec,
    KindModel,
    String,
    Struct,
    StructModel,
    kind,
    kind_model,
    struct,
    struct_model,
)
from .ids import (
    EntityId,
    entity_id,
    id_from_bytes,
    id_from_int,
    id_from_str,
    id_from_uuid,
    id_to_int,
)
from .protocol.codes import ErrorCode, QueryStatus
from .schema.errors import InvalidData, InvalidSchema, ReservedName, SchemaConflict, SchemaError

__version__ = "0.1.0"
"""The version of this package (the SDK; a server reports its own in `Client.server_version`)."""

__all__ = [
    "F32",
    "F64",
    "I8",
    "I16",
    "I32",
    "I64",
    "U8",
    "U16",
    "U32",
    "U64",
    "U128",
    "Array",
    "AuthFailed",
    "Batch",
    "Bool",
    "BootstrapComplete",
    "BootstrapMode",
    "BootstrapStarted",
    "Bytes",
    "Change",
    "ChangeType",
    "Client",
    "ConnectionLost",
    "ConvergeError",
    "DeleteCause",
    "EntityId",
    "EpochNotOpen",
    "ErrorCode",
    "EventCause",
    "EventItem",
    "EventOp",
    "EventSubscription",
    "EventsTruncated",
    "FieldSpec",
    "Forbidden",
    "InternalError",
    "InvalidData",
    "InvalidDataError",
    "InvalidSchema",
    "InvalidSchemaError",
    "KindHandle",
    "KindModel",
    "LimitExceeded",
    "MetadataError",
    "Mirror",
    "MirrorEntry",
    "NoFreeSource",
    "NotEventStream",
    "PayloadTooLarge",
    "ProtocolViolation",
    "QueryResult",
    "QueryStatus",
    "ReadOnlyError",
    "ReadOnlyHandle",
    "ReconnectMode",
    "ReconnectPolicy",
    "ReservedName",
    "Resubscribed",
    "SchemaConflict",
    "SchemaConflictError",
    "SchemaError",
    "ServerError",
    "ShuttingDown",
    "SlowSubscriber",
    "SourceConflict",
    "String",
    "Struct",
    "StructModel",
    "Subscription",
    "SubscriptionItem",
    "TakenOver",
    "UnknownKind",
    "UnknownSubscription",
    "WriteRejected",
    "WritesLost",
    "__version__",
    "connect",
    "decode_metadata",
    "encode_metadata",
    "entity_id",
    "id_from_bytes",
    "id_from_int",
    "id_from_str",
    "id_from_uuid",
    "id_to_int",
    "is_metadata",
    "kind",
    "kind_model",
    "struct",
    "struct_model",
]
