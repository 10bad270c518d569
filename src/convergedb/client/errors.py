"""The exceptions of the client SDK.

Every error the SDK raises about the server or the connection is a `ConvergeError`:

- `ServerError` and its subclasses report an ERROR frame; each subclass is named for the
  situation and its message says what to do. `error_from_frame` maps an error code to its class.
- `WriteRejected` reports a write (ASSERT, PATCH, RETRACT, a BATCH sub-operation) the server
  dropped. Writes get no reply, so the rejection arrives later, on its own: it goes to the
  client's `on_error` callback at once and is raised by the next call made on the client.
- `ConnectionLost` fails every call that was waiting for a reply, and every later call, once the
  connection is gone.

Values that do not fit a kind's schema are refused before anything is sent, with
`convergedb.InvalidData` (a `ValueError`) rather than a `ConvergeError`.
"""

from __future__ import annotations

from typing import ClassVar

from ..protocol.codes import ErrorCode, Opcode
from ..protocol.wire import op_name
from ..schema.errors import InvalidData, InvalidSchema, SchemaConflict


class ConvergeError(Exception):
    """Base class of the SDK's errors about the server and the connection.

    `code` is the protocol error code (an `ErrorCode`, a plain int for a code this SDK does not
    know, or None for errors no ERROR frame carried); `op` the opcode of the operation that failed
    (0 if none); `message` the text without the hint the subclasses add.
    """

    def __init__(self, message: str, *, code: ErrorCode | int | None = None, op: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.op = op
        self.message = message


class ServerError(ConvergeError):
    """The server answered with an ERROR frame.

    `str()` gives the server's message, the code and the operation, then what to do about it.
    """

    hint: ClassVar[str] = ""
    """What the user can do about this error (appended to the message)."""

    def __init__(self, code: ErrorCode | int, op: int, message: str) -> None:
        super().__init__(message, code=code, op=op)
        self.args = (self._describe(),)

    def _describe(self) -> str:
        code = self.code
        name = code.name if isinstance(code, ErrorCode) else f"error code {code}"
        where = f" ({name}" + (f", in answer to {op_name(self.op)})" if self.op else ")")
        text = f"{self.message}{where}"
        return f"{text}. {self.hint}" if self.hint else text


class AuthFailed(ServerError):
    """AUTH_FAILED: the server requires a token and this one is missing or unknown."""

    hint = "Pass the token the server's operator configured: connect(..., token=...)."


class SourceConflict(ServerError):
    """SOURCE_CONFLICT: the claimed source id is held by another live connection."""

    def _describe(self) -> str:
        return (
            f"{self.message} (SOURCE_CONFLICT). The source is held by a live connection; pick "
            "another id, omit source_id to have one allocated, or pass takeover=True if the old "
            "holder is your own dead process."
        )


class NoFreeSource(ServerError):
    """NO_FREE_SOURCE: every source id (that the token allows) is in use or in its grace period."""

    hint = (
        "All 64 source ids (or all those your token allows) are held or in their liveness grace "
        "period: close unused writers, wait for dead ones to expire, or connect read_only=True "
        "to only read."
    )


class ReadOnlyError(ServerError):
    """READ_ONLY: the operation needs a writer connection and this one is read-only."""

    hint = "Connect without read_only=True (with a source id, or none to allocate one) to write."


class Forbidden(ServerError):
    """FORBIDDEN: the token does not allow this, or the kind is a system kind (read-only)."""

    hint = (
        "System kinds (convergedb_*) cannot be written, and a token only allows its role's "
        "modes and sources: use a token that allows this."
    )


class UnknownKind(ServerError):
    """UNKNOWN_KIND: no kind with that id or name exists on the server."""

    hint = "Register the kind first with client.register_kind(cls)."


class SchemaConflictError(ServerError, SchemaConflict):
    """SCHEMA_CONFLICT: the definition changes, removes or reorders registered fields.

    Also a `convergedb.SchemaConflict`, the error the local schema checks raise.
    """

    hint = (
        "Ordinals are permanent: keep every registered field as it is and add new fields at new "
        "ordinals after the last one."
    )


class InvalidSchemaError(ServerError, InvalidSchema):
    """INVALID_SCHEMA or RESERVED_NAME: the kind definition breaks a rule or a limit.

    Also a `convergedb.InvalidSchema`, the error the local schema checks raise.
    """

    hint = "Fix the kind declaration (names starting with 'convergedb_' are reserved)."


class InvalidDataError(ServerError, InvalidData):
    """INVALID_DATA: the server found that data does not fit the kind's schema.

    Also a `convergedb.InvalidData`, the error the SDK raises itself, before sending, for a value
    that does not fit.
    """

    hint = "Check that the class you write with matches the kind's registered schema."


class LimitExceeded(ServerError):
    """LIMIT_EXCEEDED or PAYLOAD_TOO_LARGE: a hard limit of the server was broken."""

    hint = "See the limits in the documentation (64 sources, 65,535 bytes per value, ...)."


class EpochNotOpen(ServerError):
    """EPOCH_NOT_OPEN: an epoch was ended that was never begun (or was discarded)."""

    hint = "Begin an epoch before ending it; an epoch does not survive a lost connection."


class UnknownSubscription(ServerError):
    """UNKNOWN_SUBSCRIPTION: no subscription with that id exists on this connection."""


class EventsTruncated(ServerError):
    """EVENTS_TRUNCATED: the requested start of the event log is no longer kept."""

    hint = "Start from a later sequence number, or from 0 for only new events."


class NotEventStream(ServerError):
    """NOT_EVENT_STREAM: event subscriptions need a kind registered with event_stream=True."""

    hint = "Declare the kind with @convergedb.kind(..., event_stream=True)."


class TakenOver(ServerError):
    """TAKEN_OVER: another connection claimed this source with takeover; this one is closed."""

    hint = "Another process now writes as this source; do not reconnect with takeover from both."


class ShuttingDown(ServerError):
    """SHUTTING_DOWN: the server is stopping and closes the connection."""

    hint = "Reconnect once the server is back."


class SlowSubscriber(ServerError):
    """SLOW_SUBSCRIBER: the connection read nothing for the subscriber timeout and was closed."""

    hint = "Consume notifications promptly (do not block the event loop)."


class ProtocolViolation(ServerError):
    """The server did not understand what it received: BAD_FRAME, MALFORMED, UNKNOWN_OPCODE, ...

    Seeing it means a bug (in the SDK, or a client that writes raw frames), or an SDK and a
    server that speak different protocol versions.
    """

    hint = "This is a bug or a version mismatch between the SDK and the server; please report it."


class InternalError(ServerError):
    """INTERNAL: the server failed while handling the request."""

    hint = "The server's log says more; please report it."


class WriteRejected(ServerError):
    """The server dropped a write (ASSERT, PATCH, RETRACT, or a sub-operation of a BATCH).

    Writes get no reply: the rejection arrives asynchronously. It is passed to the `on_error`
    callback of `connect` as soon as it arrives and raised by the next call made on the client,
    once. If several arrived in between, the oldest is raised and `more` holds the others.
    `reason` is the typed error of the code (e.g. `InvalidDataError`); it is also the exception's
    `__cause__`. Every other write, before and after it, goes on as normal.
    """

    def __init__(self, code: ErrorCode | int, op: int, message: str) -> None:
        self.reason: ServerError = error_from_frame(code, op, message)
        self.more: tuple[WriteRejected, ...] = ()
        super().__init__(code, op, message)
        self.__cause__ = self.reason

    def _describe(self) -> str:
        return f"the server rejected a write: {self.reason}"

    def with_more(self, more: tuple[WriteRejected, ...]) -> WriteRejected:
        """Attach the rejections that arrived after this one; they are counted in the message."""
        self.more = more
        if more:
            self.args = (f"{self._describe()} (and {len(more)} more rejected writes: see .more)",)
        return self


class ConnectionLost(ConvergeError):
    """The connection to the server is gone (closed by either side, reset, or unreachable).

    Every call waiting for a reply fails with it, and so does every later call. When the server
    said why before closing (TAKEN_OVER, SHUTTING_DOWN, SLOW_SUBSCRIBER, ...), `reason` is that
    error, and it is also the exception's `__cause__`.
    """

    def __init__(self, message: str, reason: BaseException | None = None) -> None:
        code = reason.code if isinstance(reason, ConvergeError) else None
        super().__init__(message if reason is None else f"{message}: {reason}", code=code)
        self.reason = reason
        self.__cause__ = reason


class PayloadTooLarge(ConvergeError, ValueError):
    """A frame would exceed the server's maximum payload; it is refused before being sent.

    Batches are split to stay under the maximum; a single write this large cannot be sent.
    """

    def __init__(self, size: int, max_payload: int, what: str) -> None:
        super().__init__(
            f"{what} is {size} bytes, above the server's maximum payload of {max_payload} bytes",
            code=ErrorCode.PAYLOAD_TOO_LARGE,
        )


WRITE_OPS = frozenset({Opcode.ASSERT, Opcode.RETRACT, Opcode.PATCH, Opcode.BATCH})
"""The opcodes of an asynchronous ERROR that reports a rejected write."""

_CLASSES: dict[ErrorCode, type[ServerError]] = {
    ErrorCode.BAD_FRAME: ProtocolViolation,
    ErrorCode.UNSUPPORTED_VERSION: ProtocolViolation,
    ErrorCode.UNKNOWN_OPCODE: ProtocolViolation,
    ErrorCode.PAYLOAD_TOO_LARGE: LimitExceeded,
    ErrorCode.NOT_CONNECTED: ProtocolViolation,
    ErrorCode.ALREADY_CONNECTED: ProtocolViolation,
    ErrorCode.AUTH_FAILED: AuthFailed,
    ErrorCode.SOURCE_CONFLICT: SourceConflict,
    ErrorCode.NO_FREE_SOURCE: NoFreeSource,
    ErrorCode.READ_ONLY: ReadOnlyError,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.UNKNOWN_KIND: UnknownKind,
    ErrorCode.SCHEMA_CONFLICT: SchemaConflictError,
    ErrorCode.RESERVED_NAME: InvalidSchemaError,
    ErrorCode.INVALID_DATA: InvalidDataError,
    ErrorCode.MALFORMED: ProtocolViolation,
    ErrorCode.LIMIT_EXCEEDED: LimitExceeded,
    ErrorCode.EPOCH_NOT_OPEN: EpochNotOpen,
    ErrorCode.SLOW_SUBSCRIBER: SlowSubscriber,
    ErrorCode.UNKNOWN_SUBSCRIPTION: UnknownSubscription,
    ErrorCode.EVENTS_TRUNCATED: EventsTruncated,
    ErrorCode.NOT_EVENT_STREAM: NotEventStream,
    ErrorCode.SHUTTING_DOWN: ShuttingDown,
    ErrorCode.INTERNAL: InternalError,
    ErrorCode.TAKEN_OVER: TakenOver,
    ErrorCode.INVALID_SCHEMA: InvalidSchemaError,
}


def error_class(code: ErrorCode | int) -> type[ServerError]:
    """The exception class of an error code (`ServerError` itself for a code not known here)."""
    try:
        return _CLASSES[ErrorCode(code)]
    except ValueError:
        return ServerError


def error_from_frame(code: ErrorCode | int, op: int, message: str) -> ServerError:
    """The typed exception of an ERROR frame's code, operation and message."""
    return error_class(code)(code, op, message)


def is_write_rejection(op: int) -> bool:
    """Whether an asynchronous ERROR (stream 0) with this `op` reports a rejected write."""
    return op in WRITE_OPS
