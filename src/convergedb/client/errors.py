"""The exceptions of the client SDK.

Every error the SDK raises about the server or the connection is a `ConvergeError`:

- `ServerError` and its subclasses report an ERROR frame; each subclass is named for the
  situation and its message says what to do. `error_from_frame` maps an error code to its class.
- `WriteRejected` reports a write (ASSERT, PATCH, RETRACT, a BATCH sub-operation) the server
  dropped. Writes get no reply, so the rejection arrives later, on its own: it goes to the
  client's `on_error` callback at once and is raised by the next call made on the client.
- `ConnectionLost` fails every call that was waiting for a reply, and every later call, once the
  connection is gone. Its subclass `WritesLost` is raised by `Client.sync` when writes sent
  since the last sync went out on a connection that was then lost.

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

    Catch it to handle every such error; its subclasses name the situation: `ServerError` (and
    its subclasses) for an ERROR the server answered with, `WriteRejected` for a write the
    server dropped, `ConnectionLost` for a connection that is gone.

    Example:
        ```python
        try:
            await client.sync()
        except cdb.WriteRejected as rejected:
            print("dropped:", rejected.reason, "and", len(rejected.more), "more")
        except cdb.ConvergeError as error:
            print(error.code, error)
        ```
    """

    def __init__(self, message: str, *, code: ErrorCode | int | None = None, op: int = 0) -> None:
        """Make an error (the SDK does it).

        Args:
            message: What happened.
            code: The protocol error code, if an ERROR frame carried one.
            op: The opcode of the operation that failed (0 if none).
        """
        super().__init__(message)
        self.code = code
        """The protocol error code: an `ErrorCode`, a plain int for a code this SDK does not
        know, or None for errors no ERROR frame carried."""
        self.op = op
        """The opcode of the operation that failed (0 if none)."""
        self.message = message
        """The text, without the hint the subclasses add to `str()`."""


class ServerError(ConvergeError):
    """The server answered with an ERROR frame.

    `str()` gives the server's message, the code and the operation, then what to do about it.
    """

    hint: ClassVar[str] = ""
    """What the user can do about this error (appended to the message)."""

    def __init__(self, code: ErrorCode | int, op: int, message: str) -> None:
        """Make the error of an ERROR frame (`error_from_frame` picks the subclass).

        Args:
            code: The frame's error code.
            op: The opcode of the request it answers (0 if none).
            message: The server's message.
        """
        super().__init__(message, code=code, op=op)
        self.args = (self._describe(),)
        """What `str()` shows: the message, the code, the operation, and the hint."""

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
        """Make the rejection of a write from the server's ERROR frame (the connection does it).

        Args:
            code: The frame's error code.
            op: The opcode of the rejected write.
            message: The server's message.
        """
        self.reason: ServerError = error_from_frame(code, op, message)
        """The typed error of the code, e.g. `InvalidDataError` (also the `__cause__`)."""
        self.more: tuple[WriteRejected, ...] = ()
        """The rejections that arrived after this one and before it was raised, oldest first."""
        super().__init__(code, op, message)
        self.__cause__ = self.reason

    def _describe(self) -> str:
        return f"the server rejected a write: {self.reason}"

    def with_more(self, more: tuple[WriteRejected, ...]) -> WriteRejected:
        """Attach the rejections that arrived after this one; they are counted in the message.

        Args:
            more: The later rejections, oldest first.

        Returns:
            This error.
        """
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
        """Make the error (the SDK does it).

        Args:
            message: How the connection was lost.
            reason: Why, when known: the server's error, or the network error.
        """
        code = reason.code if isinstance(reason, ConvergeError) else None
        super().__init__(message if reason is None else f"{message}: {reason}", code=code)
        self.reason = reason
        """Why the connection was lost, when known: the error the server sent before closing
        (e.g. a `TakenOver`), or the network error. Also the exception's `__cause__`."""
        self.__cause__ = reason


class WritesLost(ConnectionLost):
    """`Client.sync` cannot vouch for every write: some went out on a connection that was lost.

    Writes are fire-and-forget. Those sent since the last `sync()` that returned, on a
    connection that was then lost, may never have reached the server (they were in the
    network, or in a buffer, when it broke), and the client does not send them again: a
    stale write replayed later could undo another source's newer one, and after a long
    outage the whole state is better re-asserted than replayed. So the next `sync()` raises
    this error instead of answering for the new connection alone, once; the `sync()` after it
    is a plain barrier again. A `sync()` that was waiting when the connection was lost raises
    it too (with that connection's writes).

    What to do: re-assert the state those writes carried and `sync()` again. The robust way
    is an epoch (`async with client.epoch(): ...` re-asserting the whole snapshot), which
    also sweeps entities whose RETRACT was lost; an epoch that ends successfully after the
    loss supersedes the lost writes, so it also clears this error. It is a `ConnectionLost`,
    so code that already handles that keeps working; `reason` is why the connection was
    lost, when known.

    Example:
        ```python
        try:
            await client.sync()
        except cdb.WritesLost:
            async with client.epoch(), client.batch() as b:
                for pid, player in snapshot.items():
                    b.assert_(players, pid, player)
            await client.sync()
        ```
    """

    def __init__(self, count: int, lost: ConnectionLost | None) -> None:
        """Make the error (the client does it).

        Args:
            count: How many writes (frames: a BATCH counts once) were sent on lost
                connections since the last SYNC that covered them.
            lost: How the connection that carried them was lost (the last one, if several).
        """
        how = lost.message if lost is not None else "the connection was lost"
        super().__init__(
            f"{count} write{'s' if count != 1 else ''} sent since the last sync() went out on a "
            f"connection that was lost ({how}) and may never have reached the server; sync() "
            "cannot vouch for them. Re-assert that state (best in an epoch: async with "
            "client.epoch(): ...) and sync() again",
        )
        if lost is not None:
            self.code = lost.code
            self.reason = lost.reason
            self.__cause__ = lost
        self.count = count
        """How many write frames may have been lost (a BATCH counts once)."""
        self.lost = lost
        """The `ConnectionLost` of the connection that carried them."""


class PayloadTooLarge(ConvergeError, ValueError):
    """A frame would exceed the server's maximum payload; it is refused before being sent.

    Batches are split to stay under the maximum; a single write this large cannot be sent.
    """

    def __init__(self, size: int, max_payload: int, what: str) -> None:
        """Make the error (the SDK does it).

        Args:
            size: The payload's size, in bytes.
            max_payload: The server's maximum payload, in bytes.
            what: The frame, for the message.
        """
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
    """The exception class of an error code (`ServerError` itself for a code not known here).

    Args:
        code: A protocol error code.
    """
    try:
        return _CLASSES[ErrorCode(code)]
    except ValueError:
        return ServerError


def error_from_frame(code: ErrorCode | int, op: int, message: str) -> ServerError:
    """Make the typed exception of an ERROR frame, e.g. `UnknownKind` for UNKNOWN_KIND.

    Args:
        code: The frame's error code (`ServerError` itself for a code this SDK does not know).
        op: The opcode of the request it answers (0 if none).
        message: The server's message.

    Returns:
        The exception (not raised).
    """
    return error_class(code)(code, op, message)


def is_write_rejection(op: int) -> bool:
    """Whether an asynchronous ERROR (stream 0) with this `op` reports a rejected write.

    Args:
        op: The ERROR frame's opcode field.
    """
    return op in WRITE_OPS
