"""The Python client SDK: `connect()` to a ConvergeDB server, then write and read kinds.

import convergedb as cdb

async with cdb.connect(name="game-server-1") as client:
    players = await client.register_kind(Player)
    await players.assert_("player:ana", Player(name="ana", hp=90))
    async with client.batch() as b:
        b.patch(players, "player:ana", hp=75)
    seq = await client.sync()
    print((await players.query("player:ana")).value)

async with players.subscribe() as changes:   # bootstrap, then live changes; resumes on reconnect
    async for item in changes:
        ...

async with cdb.Mirror(players) as mirror:     # a local copy of the kind, always up to date
    await mirror.wait_synced()

async with cdb.connect(read_only=True) as reader:   # no Python class: the server's schema
    players = await reader.kind("player")           # values are dicts by field name
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
    "connect",
    "decode_metadata",
    "encode_metadata",
    "error_from_frame",
    "is_metadata",
]
