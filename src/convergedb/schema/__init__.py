"""The schema model: kind definitions, their validation, wire encoding and evolution."""

from .definition import (
    check_user_kind_name,
    decode_kind_definition,
    encode_kind_definition,
    validate_kind,
)
from .errors import InvalidData, InvalidSchema, ReservedName, SchemaConflict, SchemaError
from .evolution import Evolution, check_prefix, compare_kinds, merge_names
from .patch import apply_patch, encode_patch, mask_ordinals, parse_patch
from .rows import RowCodec
from .types import Field, FieldFlags, FieldType, KindDef, KindFlags

__all__ = [
    "Evolution",
    "Field",
    "FieldFlags",
    "FieldType",
    "InvalidData",
    "InvalidSchema",
    "KindDef",
    "KindFlags",
    "ReservedName",
    "RowCodec",
    "SchemaConflict",
    "SchemaError",
    "apply_patch",
    "check_prefix",
    "check_user_kind_name",
    "compare_kinds",
    "decode_kind_definition",
    "encode_kind_definition",
    "encode_patch",
    "mask_ordinals",
    "merge_names",
    "parse_patch",
    "validate_kind",
]
