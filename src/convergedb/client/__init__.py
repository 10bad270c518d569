"""The Python client SDK: `connect()` to a ConvergeDB server, then write and read kinds.

import convergedb as cdb

async with cdb.connect(name="game-server-1") as client:
    players = await client.register_kind(Player)
    await players.assert_("player:ana", Player(name="ana", hp=90))
    async with client.batch() as b:
        b.patch(players, "player:ana", hp=75)
    seq = await client.sync()
    print((await players.query("player:ana")).value)
"""

from .batch import Batch
from .client import Client, Connector, connect
from .connection import Connection
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

__all__ = [
    "AuthFailed",
    "Batch",
    "Client",
    "Connection",
    "ConnectionLost",
    "Connector",
    "ConvergeError",
    "EntityKey",
    "EpochNotOpen",
    "EventsTruncated",
    "Forbidden",
    "InternalError",
    "InvalidDataError",
    "InvalidSchemaError",
    "KindHandle",
    "LimitExceeded",
    "NoFreeSource",
    "NotEventStream",
    "PayloadTooLarge",
    "ProtocolViolation",
    "QueryResult",
    "ReadOnlyError",
    "ReadOnlyHandle",
    "SchemaConflictError",
    "ServerError",
    "ShuttingDown",
    "SlowSubscriber",
    "SourceConflict",
    "TakenOver",
    "UnknownKind",
    "UnknownSubscription",
    "WriteRejected",
    "connect",
    "error_from_frame",
]
