"""Opcodes, error codes and the small enumerations of the wire protocol (docs/protocol.md)."""

from enum import IntEnum, IntFlag


class Opcode(IntEnum):
    """Frame opcodes. Client-to-server opcodes are below 0x80, server-to-client ones above."""

    CONNECT = 0x01
    ASSERT = 0x02
    RETRACT = 0x03
    QUERY = 0x04
    SUBSCRIBE = 0x05
    UNSUBSCRIBE = 0x06
    HEARTBEAT = 0x07
    PATCH = 0x08
    SOURCE_EPOCH_BEGIN = 0x09
    SOURCE_EPOCH_END = 0x0A
    BATCH = 0x0B
    SYNC = 0x0C
    SUBSCRIBE_EVENTS = 0x0D
    CREATE_KIND = 0x10
    GET_KIND = 0x11
    LIST_KINDS = 0x12

    STATE = 0x81
    DELETED = 0x82
    BOOTSTRAP_BEGIN = 0x83
    BOOTSTRAP_END = 0x84
    CONNECTED = 0x85
    QUERY_RESULT = 0x86
    KIND_INFO = 0x87
    OK = 0x88
    ERROR = 0x89
    EVENT = 0x8A
    PONG = 0x8B
    KIND_LIST = 0x8C


WRITE_OPCODES = frozenset({Opcode.ASSERT, Opcode.RETRACT, Opcode.PATCH})
"""The operations a BATCH may carry."""


class ErrorCode(IntEnum):
    """Error codes carried by ERROR frames."""

    BAD_FRAME = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_OPCODE = 3
    PAYLOAD_TOO_LARGE = 4
    NOT_CONNECTED = 5
    ALREADY_CONNECTED = 6
    AUTH_FAILED = 7
    SOURCE_CONFLICT = 8
    NO_FREE_SOURCE = 9
    READ_ONLY = 10
    FORBIDDEN = 11
    UNKNOWN_KIND = 12
    SCHEMA_CONFLICT = 13
    RESERVED_NAME = 14
    INVALID_DATA = 15
    MALFORMED = 16
    LIMIT_EXCEEDED = 17
    EPOCH_NOT_OPEN = 18
    SLOW_SUBSCRIBER = 19
    UNKNOWN_SUBSCRIPTION = 20
    EVENTS_TRUNCATED = 21
    NOT_EVENT_STREAM = 22
    SHUTTING_DOWN = 23
    INTERNAL = 24
    TAKEN_OVER = 25
    INVALID_SCHEMA = 26


CLOSING_ERRORS = frozenset(
    {
        ErrorCode.BAD_FRAME,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.PAYLOAD_TOO_LARGE,
        ErrorCode.NOT_CONNECTED,
        ErrorCode.AUTH_FAILED,
        ErrorCode.SOURCE_CONFLICT,
        ErrorCode.NO_FREE_SOURCE,
        ErrorCode.SLOW_SUBSCRIBER,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.TAKEN_OVER,
    }
)
"""Errors after which the server closes a connected connection."""


class ConnectMode(IntEnum):
    """How a CONNECT asks for its source."""

    CLAIM = 0
    ALLOCATE = 1
    READ_ONLY = 2
    TAKEOVER = 3


class ChangeType(IntEnum):
    """The `type` of a STATE frame."""

    CREATED = 1
    UPDATED = 2
    BOOTSTRAP = 3


class DeleteCause(IntEnum):
    """Why an entity became a tombstone (DELETED `cause`, EVENT `cause`)."""

    RETRACTED = 0
    EPOCH_END = 1
    LIVENESS = 2


class EventCause(IntEnum):
    """Why an EVENT was recorded: a client's write, or a retract the server synthesised."""

    CLIENT_WRITE = 0
    EPOCH_END = 1
    LIVENESS = 2


class QueryStatus(IntEnum):
    """The `status` of a QUERY_RESULT."""

    NOT_FOUND = 0
    ALIVE = 1
    TOMBSTONE = 2


class BootstrapMode(IntEnum):
    """The `mode` of BOOTSTRAP_BEGIN."""

    FULL = 0
    DELTA = 1


class SubscribeFlags(IntFlag):
    """SUBSCRIBE flags."""

    NONE = 0
    BOOTSTRAP = 1
    INCLUDE_PREVIOUS = 2
    RESUME = 4


SERVER_CLOSING_FLAG = 0x01
"""Header flag bit 0 from the server: it closes the connection after this frame."""
