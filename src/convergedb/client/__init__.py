"""The Python client SDK: `connect()` to a ConvergeDB server, then write and read kinds.

Everything here is also importable from the top-level package (`import convergedb as cdb`,
then `cdb.connect`, `cdb.Mirror`, ...); kinds are declared with `convergedb.kind` and
`convergedb.struct`.

## Connecting

`connect()` returns a `Connector`: use it as `async with connect(...) as client:` (the client is
closed when the block ends) or await it (`client = await connect(...)`, then
`await client.close()`). A writer `Client` writes as one source (0..63); a client made with
`read_only=True` only reads. A lost connection is re-established by itself (see `connect`).

```python
import convergedb as cdb

async with cdb.connect("127.0.0.1", 3727, name="game-server-1") as client:
    players = await client.register_kind(Player)  # a KindHandle[Player]
    await players.assert_("player:ana", Player(name="ana", hp=90))
    async with client.batch() as b:  # many writes, few frames
        b.patch(players, "player:ana", hp=75)
    seq = await client.sync()  # durable and visible from here
    print((await players.query("player:ana")).value)
```

## Reading

A `KindHandle` queries one entity (`KindHandle.query`), subscribes to every change of the kind
(`KindHandle.subscribe`, a `Subscription` of `Change` items), or follows its event stream
(`KindHandle.subscribe_events`, an `EventSubscription` of `EventItem`s). A `Mirror` keeps a
local copy of a whole kind. `Client.kind` gives a `DynamicKindHandle` whose values are dicts,
for a kind you have no Python class for.

```python
async with players.subscribe() as changes:  # bootstrap, then live changes
    async for item in changes:
        if isinstance(item, cdb.Change):
            print(item.type.name, item.value)

async with cdb.Mirror(players) as mirror:  # a local copy of the kind, always up to date
    await mirror.wait_synced()

async with cdb.connect(read_only=True) as reader:  # no Python class: the server's schema
    players = await reader.kind("player")  # values are dicts by field name
```

## Errors

Every error about the server or the connection is a `ConvergeError`:

- `ServerError` and its subclasses (`UnknownKind`, `SchemaConflictError`, `AuthFailed`, ...)
  report an ERROR the server answered with; each is named for the situation and its message
  says what to do.
- `WriteRejected` reports a write the server dropped. Writes get no reply, so the rejection
  arrives later: it goes to the `on_error` callback of `connect` at once, and is raised by
  the next call made on the client (`Client.sync` raises it after its barrier).
- `ConnectionLost` fails every call waiting for a reply, and every call made while the client
  is disconnected. Its subclass `WritesLost` is what `Client.sync` raises when writes sent
  since the last sync went out on a connection that was then lost: re-assert them (best in
  an epoch) and sync again.

A value that does not fit its kind's schema is refused before anything is sent, with
`convergedb.InvalidData` (a `ValueError`).

## Type aliases

- `EntityKey`: anything that names an entity: an `int` (a u64), a `str` (hashed with
  SHA-256), a `uuid.UUID`, or raw `bytes` (at most 32). See `convergedb.entity_id`.
- `SubscriptionItem`: what a `Subscription` yields: a `Change`, `BootstrapStarted`,
  `BootstrapComplete` or `Resubscribed`.
"""

from ..protocol.codes import BootstrapMode, DeleteCause, EventCause
from .batch import Batch
from .client import Client, Connector, connect
from .connection import Connection
from .dynamic import DynamicKindHandle, DynamicModel
from .errors import (
    AuthFailed,
    ConnectionLost,
    ConvergeError,
    EpochNotOpen,
    EventsTruncated,
    Forbidden,
    InternalError,
    InvalidDataError,
    InvalidSchemaError,
    LimitExceeded,
    NoFreeSource,
    NotEventStream,
    PayloadTooLarge,
    ProtocolViolation,
    ReadOnlyError,
    SchemaConflictError,
    ServerError,
    ShuttingDown,
    SlowSubscriber,
    SourceConflict,
    TakenOver,
    UnknownKind,
    UnknownSubscription,
    WriteRejected,
    WritesLost,
    error_from_frame,
)
from .handle import EntityKey, KindHandle, QueryResult, ReadOnlyHandle
from .metadata import MetadataError, decode_metadata, encode_metadata, is_metadata
from .mirror import Mirror, MirrorEntry
from .reconnect import ReconnectMode, ReconnectPolicy
from .subscription import (
    BootstrapComplete,
    BootstrapStarted,
    Change,
    ChangeType,
    EventItem,
    EventOp,
    EventSubscription,
    Resubscribed,
    Subscription,
    SubscriptionItem,
)

__all__ = [
    "AuthFailed",
    "Batch",
    "BootstrapComplete",
    "BootstrapMode",
    "BootstrapStarted",
    "Change",
    "ChangeType",
    "Client",
    "Connection",
    "ConnectionLost",
    "Connector",
    "ConvergeError",
    "DeleteCause",
    "DynamicKindHandle",
    "DynamicModel",
    "EntityKey",
    "EpochNotOpen",
    "EventCause",
    "EventItem",
    "EventOp",
    "EventSubscription",
    "EventsTruncated",
    "Forbidden",
    "InternalError",
    "InvalidDataError",
    "InvalidSchemaError",
    "KindHandle",
    "LimitExceeded",
    "MetadataError",
    "Mirror",
    "MirrorEntry",
    "NoFreeSource",
    "NotEventStream",
    "PayloadTooLarge",
    "ProtocolViolation",
    "QueryResult",
    "ReadOnlyError",
    "ReadOnlyHandle",
    "ReconnectMode",
    "ReconnectPolicy",
    "Resubscribed",
    "SchemaConflictError",
    "ServerError",
    "ShuttingDown",
    "SlowSubscriber",
    "SourceConflict",
    "Subscription",
    "SubscriptionItem",
    "TakenOver",
    "UnknownKind",
    "UnknownSubscription",
    "WriteRejected",
    "WritesLost",
    "connect",
    "decode_metadata",
    "encode_metadata",
    "error_from_frame",
    "is_metadata",
]
