"""Errors of the schema model. The protocol layer maps each to its wire error code."""


class SchemaError(ValueError):
    """Base class of every schema-model error."""


class InvalidSchema(SchemaError):
    """A kind definition breaks a rule or a limit (INVALID_SCHEMA)."""


class ReservedName(SchemaError):
    """A user kind uses the reserved `convergedb_` prefix (RESERVED_NAME)."""


class SchemaConflict(SchemaError):
    """A registration changes, removes or reorders existing fields (SCHEMA_CONFLICT)."""


class InvalidData(SchemaError):
    """Row bytes, patch values or a Python value do not fit the schema (INVALID_DATA)."""
