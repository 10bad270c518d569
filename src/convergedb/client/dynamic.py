"""Dynamic kinds: a handle built from the server's own schema, with values as plain dicts.

Tools, and programs that have no Python class for a kind, ask the client for the kind by name:

    async with cdb.connect(read_only=True) as client:
        players = await client.kind("player")           # KindHandle[dict[str, Any]]
        result = await players.query("player:ana")
        print(result.value)   # {'name': 'ana', 'hp': 75, 'pos': {'x': 1.0, ...}, 'inventory': []}
        async with players.subscribe() as changes:
            async for item in changes: ...             # Change.value is a dict too

The values and the writes are described in the docstring of `DynamicKindHandle`, which is what
the API reference shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from ..protocol.codes import ErrorCode
from ..protocol.messages import KindInfo
from ..schema.errors import InvalidData
from ..schema.patch import apply_patch, encode_patch, mask_ordinals
from ..schema.rows import RowCodec
from ..schema.types import Field, FieldType, KindDef
from .errors import ReadOnlyError
from .handle import KindHandle

if TYPE_CHECKING:
    from .client import Client

Record: TypeAlias = dict[str, Any]
"""An entity's value in a dynamic handle: field name -> value."""


@dataclass(frozen=True, slots=True)
class DynamicField:
    """One field of a dynamic model: its name (the server's) and its schema field."""

    name: str
    field: Field


class DynamicModel:
    """What a `KindHandle` needs of a model, built from a kind definition rather than a class:
    values are dicts by field name (see `DynamicKindHandle`)."""

    cls = dict
    """The type of the values (what error messages name)."""

    def __init__(self, definition: KindDef) -> None:
        """Build the model of a kind definition.

        Args:
            definition: The kind's definition, as the server has it.
        """
        self.name = definition.name
        """The kind's name."""
        self.definition = definition
        """The kind's definition, as the server has it."""
        self.codec = RowCodec(definition.fields)
        """The row codec of the definition."""
        self.members = tuple(DynamicField(f.name, f) for f in definition.fields)
        """Every field, by ordinal."""
        self.names = tuple(f.name for f in definition.fields)
        """The field names, by ordinal."""
        self._ordinals = {f.name: f.ordinal for f in definition.fields}

    def __repr__(self) -> str:
        return f"DynamicModel({self.name!r}, fields={list(self.names)})"

    def from_values(self, values: Sequence[Any]) -> Record:
        """Make a record (a dict by field name) from positional wire values.

        Args:
            values: The wire values, by ordinal (as a row codec decodes them); values beyond
                the definition's fields are ignored.

        Returns:
            The record: structs as dicts by sub-field name, arrays as lists.
        """
        return {
            f.name: _named_value(f, value)
            for f, value in zip(self.definition.fields, values, strict=False)
        }

    def to_values(self, record: Mapping[str, Any]) -> list[Any]:
        """Turn a record into positional wire values; a missing field is its zero value.

        Args:
            record: Field names to values.

        Returns:
            The wire values, by ordinal.

        Raises:
            TypeError: `record` is not a mapping.
            InvalidData: A name is not a field (or sub-field) of the kind, or a struct or
                array value has the wrong shape.
        """
        if not isinstance(record, Mapping):
            raise TypeError(
                f"a value of kind {self.name!r} is a dict by field name, "
                f"got {type(record).__name__}"
            )
        self._check_names(record)
        return [
            _wire_value(f, record[f.name], f.name) if f.name in record else _zero(f)
            for f in self.definition.fields
        ]

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Encode a record as the kind's canonical row.

        Args:
            record: Field names to values; missing fields are zero.

        Returns:
            The row bytes.

        Raises:
            TypeError: `record` is not a mapping.
            InvalidData: A name is not a field of the kind, or a value does not fit.
        """
        return self.codec.encode(self.to_values(record))

    def patch(self, changes: Mapping[str, Any]) -> tuple[int, bytes]:
        """Encode a patch setting the named fields.

        Args:
            changes: Field names to new values (a struct field is replaced whole).

        Returns:
            The patch's field mask and its values.

        Raises:
            InvalidData: No field is given, a name is not a field, or a value does not fit.
        """
        self._check_names(changes)
        if not changes:
            raise InvalidData("a patch must set at least one field")
        by_ordinal = {
            self._ordinals[name]: _wire_value(self.codec.fields[self._ordinals[name]], value, name)
            for name, value in changes.items()
        }
        return encode_patch(self.codec, by_ordinal)

    def _check_names(self, record: Mapping[str, Any]) -> None:
        unknown = [name for name in record if name not in self._ordinals]
        if unknown:
            raise InvalidData(
                f"kind {self.name!r} has no field {unknown[0]!r}; "
                f"its fields are {', '.join(self.names)}"
            )


class DynamicKindHandle(KindHandle[Record]):
    """A `KindHandle` whose values are dicts by field name, built from the server's own schema.

    Made by `Client.kind`, for tools and for programs that have no Python class for a kind.
    Values are dicts by field name: a struct is a dict by sub-field name, an array a list (of
    dicts for an array of structs), strings `str`, bytes `bytes`, numbers `int` or `float`,
    booleans `bool`. Queries, subscriptions, events and mirrors decode to such dicts.

    A writer client can write dicts too (`assert_`, `patch`, batches): a field (or a struct's
    sub-field) missing from the dict is written as its zero value (0, 0.0, False, "", b"", an
    empty list), and a name the schema does not have is `convergedb.InvalidData`. A patch
    replaces a struct field whole, so its missing sub-fields are zero as well. Writes through
    a read-only client raise `ReadOnlyError` before anything is sent.

    A dynamic handle always has the server's latest schema: after a reconnection it takes the
    kind's current definition (a schema that grew meanwhile adds its fields to the dicts). A
    handle made before another writer appended fields while this client stayed connected still
    has the older schema: ask `Client.kind` again to see the new fields.

    Example:
        ```python
        async with cdb.connect(read_only=True) as client:
            players = await client.kind("player")
            result = await players.query("player:ana")
            print(result.value)  # {'name': 'ana', 'hp': 75, 'pos': {'x': 1.0, ...}, ...}
        ```
    """

    def __init__(self, client: Client, info: KindInfo) -> None:
        """Make the handle from the server's answer about the kind (`Client.kind` does it).

        Args:
            client: The client to write and read through.
            info: The server's KIND_INFO for the kind.
        """
        super().__init__(
            client,
            DynamicModel(info.kind),
            info.kind_id,
            info.schema_version,
            info.kind,
            registered=False,
        )

    def _set_definition(self, server_definition: KindDef) -> None:
        if server_definition != self.model.definition:
            self.model = DynamicModel(server_definition)  # follow the server's latest schema
        super()._set_definition(server_definition)
        self.writable = self.writable and not self.client.read_only

    def decode_patch(self, mask: int, values: bytes) -> Record:
        """Decode the fields a PATCH sets (its mask and values, as an event carries them).

        Args:
            mask: The PATCH's field mask: bit N set for the field of ordinal N.
            values: The PATCH's values, in ordinal order.

        Returns:
            Field name to value (structs as dicts).

        Raises:
            InvalidData: The mask or the values do not fit the schema.
        """
        codec = self._codec
        record = self.model.from_values(
            codec.decode(apply_patch(codec, codec.zero_row, mask, values))
        )
        names = self.field_names
        return {names[o]: record[names[o]] for o in mask_ordinals(mask)}

    def _check_writable(self) -> None:
        if self.client.read_only:
            raise ReadOnlyError(
                ErrorCode.READ_ONLY,
                0,
                f"cannot write kind {self.name!r} through a read-only client",
            )
        super()._check_writable()


def _named_value(f: Field, value: Any) -> Any:
    """A decoded wire value as a record holds it: structs as dicts by sub-field name."""
    if f.type is not FieldType.STRUCT:
        return value
    if f.array:
        return [_struct_record(f, item) for item in value]
    return _struct_record(f, value)


def _struct_record(f: Field, value: Sequence[Any]) -> Record:
    return {sub.name: item for sub, item in zip(f.subfields, value, strict=True)}


def _wire_value(f: Field, value: Any, path: str) -> Any:
    """A record's value as the row codec takes it: structs as tuples by sub-ordinal."""
    if f.type is not FieldType.STRUCT:
        return value
    if not f.array:
        return _struct_values(f, value, path)
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise InvalidData(f"field {path!r} ({f.describe_type()}): expected a list, got {value!r}")
    return [_struct_values(f, item, f"{path}[{i}]") for i, item in enumerate(value)]


def _struct_values(f: Field, value: Any, path: str) -> tuple[Any, ...]:
    """A struct given as a dict by sub-field name (missing ones zero) as positional values."""
    if not isinstance(value, Mapping):
        raise InvalidData(
            f"field {path!r} ({f.describe_type()}): expected a dict by sub-field name, "
            f"got {value!r}"
        )
    names = {sub.name for sub in f.subfields}
    unknown = [name for name in value if name not in names]
    if unknown:
        raise InvalidData(
            f"field {path!r} ({f.describe_type()}) has no sub-field {unknown[0]!r}; "
            f"its sub-fields are {', '.join(sub.name for sub in f.subfields)}"
        )
    return tuple(value[sub.name] if sub.name in value else _zero(sub) for sub in f.subfields)


def _zero(f: Field) -> Any:
    """The zero value of a field, as the row codec takes it."""
    if f.array:
        return []
    if f.type is FieldType.STRUCT:
        return tuple(_zero(sub) for sub in f.subfields)
    if f.type is FieldType.STRING:
        return ""
    if f.type is FieldType.BYTES:
        return b""
    if f.type is FieldType.BOOL:
        return False
    if f.type in (FieldType.F32, FieldType.F64):
        return 0.0
    return 0
