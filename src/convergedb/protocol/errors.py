"""Protocol errors: exceptions that carry the error code of docs/protocol.md."""

from __future__ import annotations

from ..schema.errors import InvalidData, InvalidSchema, ReservedName, SchemaConflict, SchemaError
from .codes import CLOSING_ERRORS, ErrorCode


class ProtocolError(Exception):
    """A violation of the wire protocol, answerable with an ERROR frame.

    `code` is the protocol error code; `op` the opcode of the frame that caused it (0 if none).
    """

    def __init__(self, code: ErrorCode, message: str, op: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.op = op

    @property
    def closes(self) -> bool:
        """Whether the server closes a connected connection after reporting this error."""
        return self.code in CLOSING_ERRORS

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.name}, {self.message!r}, op=0x{self.op:02x})"


def malformed(message: str, op: int = 0) -> ProtocolError:
    """A payload that does not parse."""
    return ProtocolError(ErrorCode.MALFORMED, message, op)


def error_code_for(exc: BaseException) -> ErrorCode:
    """The wire error code that reports `exc`: its own code for a `ProtocolError`, the matching
    code for a schema error, INTERNAL for anything else."""
    if isinstance(exc, ProtocolError):
        return exc.code
    for error_type, code in _SCHEMA_ERROR_CODES:
        if isinstance(exc, error_type):
            return code
    return ErrorCode.INTERNAL


_SCHEMA_ERROR_CODES: tuple[tuple[type[SchemaError], ErrorCode], ...] = (
    (InvalidSchema, ErrorCode.INVALID_SCHEMA),
    (ReservedName, ErrorCode.RESERVED_NAME),
    (SchemaConflict, ErrorCode.SCHEMA_CONFLICT),
    (InvalidData, ErrorCode.INVALID_DATA),
)
