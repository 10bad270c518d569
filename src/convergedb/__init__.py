"""ConvergeDB: the live, merged state of typed entities written by many independent sources.

The public surface of the Python package: declaring kinds (`kind`, `struct` and the field
specs), entity-id helpers, and the errors a user may catch.
"""

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
from .schema.errors import InvalidData, InvalidSchema, ReservedName, SchemaConflict, SchemaError

__version__ = "0.1.0"

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
    "Bool",
    "Bytes",
    "EntityId",
    "FieldSpec",
    "InvalidData",
    "InvalidSchema",
    "KindModel",
    "ReservedName",
    "SchemaConflict",
    "SchemaError",
    "String",
    "Struct",
    "StructModel",
    "__version__",
    "entity_id",
    "id_from_bytes",
    "id_from_int",
    "id_from_str",
    "id_from_uuid",
    "id_to_int",
    "kind",
    "kind_model",
    "struct",
    "struct_model",
]
