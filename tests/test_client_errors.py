"""The SDK's exceptions: one class per situation, messages that say what to do."""

from __future__ import annotations

import pytest

import convergedb as cdb
from convergedb.client.errors import error_class, error_from_frame
from convergedb.protocol import ErrorCode, Opcode


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_a_class(code: ErrorCode) -> None:
    error = error_from_frame(code, Opcode.QUERY, "the server's words")
    assert isinstance(error, cdb.ServerError)
    assert type(error) is not cdb.ServerError
    assert error.code is code
    assert error.op == Opcode.QUERY
    assert error.message == "the server's words"
    assert str(error).startswith(f"the server's words ({code.name}")


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (ErrorCode.AUTH_FAILED, cdb.AuthFailed),
        (ErrorCode.SOURCE_CONFLICT, cdb.SourceConflict),
        (ErrorCode.NO_FREE_SOURCE, cdb.NoFreeSource),
        (ErrorCode.READ_ONLY, cdb.ReadOnlyError),
        (ErrorCode.FORBIDDEN, cdb.Forbidden),
        (ErrorCode.UNKNOWN_KIND, cdb.UnknownKind),
        (ErrorCode.SCHEMA_CONFLICT, cdb.SchemaConflictError),
        (ErrorCode.INVALID_SCHEMA, cdb.InvalidSchemaError),
        (ErrorCode.RESERVED_NAME, cdb.InvalidSchemaError),
        (ErrorCode.INVALID_DATA, cdb.InvalidDataError),
        (ErrorCode.LIMIT_EXCEEDED, cdb.LimitExceeded),
        (ErrorCode.PAYLOAD_TOO_LARGE, cdb.LimitExceeded),
        (ErrorCode.EPOCH_NOT_OPEN, cdb.EpochNotOpen),
        (ErrorCode.UNKNOWN_SUBSCRIPTION, cdb.UnknownSubscription),
        (ErrorCode.EVENTS_TRUNCATED, cdb.EventsTruncated),
        (ErrorCode.NOT_EVENT_STREAM, cdb.NotEventStream),
        (ErrorCode.TAKEN_OVER, cdb.TakenOver),
        (ErrorCode.SHUTTING_DOWN, cdb.ShuttingDown),
        (ErrorCode.SLOW_SUBSCRIBER, cdb.SlowSubscriber),
        (ErrorCode.BAD_FRAME, cdb.ProtocolViolation),
        (ErrorCode.MALFORMED, cdb.ProtocolViolation),
        (ErrorCode.UNKNOWN_OPCODE, cdb.ProtocolViolation),
        (ErrorCode.INTERNAL, cdb.InternalError),
    ],
)
def test_the_class_of_a_code(code: ErrorCode, cls: type[cdb.ServerError]) -> None:
    assert error_class(code) is cls


def test_schema_errors_are_also_the_local_schema_errors() -> None:
    assert isinstance(error_from_frame(ErrorCode.SCHEMA_CONFLICT, 0, "x"), cdb.SchemaConflict)
    assert isinstance(error_from_frame(ErrorCode.INVALID_DATA, 0, "x"), cdb.InvalidData)
    assert isinstance(error_from_frame(ErrorCode.INVALID_SCHEMA, 0, "x"), cdb.InvalidSchema)


def test_an_unknown_code_stays_an_int() -> None:
    error = error_from_frame(999, 0, "something new")
    assert type(error) is cdb.ServerError
    assert error.code == 999
    assert str(error) == "something new (error code 999)"


def test_source_conflict_says_what_to_do() -> None:
    error = error_from_frame(ErrorCode.SOURCE_CONFLICT, Opcode.CONNECT, "source 3 is held")
    text = str(error)
    assert "pick another id" in text
    assert "omit source_id" in text
    assert "takeover=True" in text


def test_write_rejected_carries_the_typed_reason() -> None:
    rejected = cdb.WriteRejected(ErrorCode.INVALID_DATA, Opcode.PATCH, "field 'hp' is too big")
    assert isinstance(rejected.reason, cdb.InvalidDataError)
    assert rejected.__cause__ is rejected.reason
    assert rejected.code == ErrorCode.INVALID_DATA and rejected.op == Opcode.PATCH
    assert "rejected a write" in str(rejected) and "field 'hp' is too big" in str(rejected)


def test_connection_lost_names_its_reason() -> None:
    reason = error_from_frame(ErrorCode.TAKEN_OVER, 0, "source 2 was taken over")
    lost = cdb.ConnectionLost("the server closed the connection", reason)
    assert lost.reason is reason
    assert lost.code == ErrorCode.TAKEN_OVER
    assert "taken over" in str(lost)
