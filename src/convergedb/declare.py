"""Declaring kinds as Python classes.

A kind is a class whose attributes are annotated with `typing.Annotated[<python type>, <spec>]`,
where the spec gives the wire type and the permanent ordinal::

    from typing import Annotated
    import convergedb as cdb

    @cdb.struct
    class Vec3:
        x: Annotated[float, cdb.F32(0)] = 0.0
        y: Annotated[float, cdb.F32(1)] = 0.0
        z: Annotated[float, cdb.F32(2)] = 0.0

    @cdb.kind("player")
    class Player:
        name: Annotated[str, cdb.String(0, max_length=32)] = ""
        hp: Annotated[int, cdb.U16(1)] = 0
        pos: Annotated[Vec3, cdb.Struct(2)] = Vec3()
        inventory: Annotated[list[int], cdb.Array(3, cdb.U32(), max_count=64)] = []

The decorators turn the class into a dataclass (mutable defaults are copied per instance) and
attach a `KindModel` / `StructModel` that derives the kind definition, encodes and decodes
instances, and builds patches that carry only the fields the caller sets.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from .schema.definition import check_user_kind_name, validate_kind
from .schema.errors import InvalidData, InvalidSchema
from .schema.patch import encode_patch
from .schema.rows import RowCodec
from .schema.types import Field, FieldType, KindDef

T = TypeVar("T")
_MODEL_ATTRIBUTE = "__convergedb_model__"


# --- field specs ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """The wire type of one field. `ordinal` is omitted only for array elements."""

    ordinal: int | None = None
    field_type: typing.ClassVar[FieldType]
    python_types: typing.ClassVar[tuple[type, ...]] = (int,)

    def to_field(self, name: str, ordinal: int) -> Field:
        return Field(ordinal, name, self.field_type)


class U8(FieldSpec):
    """Unsigned 8-bit integer."""

    field_type = FieldType.U8


class U16(FieldSpec):
    """Unsigned 16-bit integer."""

    field_type = FieldType.U16


class U32(FieldSpec):
    """Unsigned 32-bit integer."""

    field_type = FieldType.U32


class U64(FieldSpec):
    """Unsigned 64-bit integer."""

    field_type = FieldType.U64


class U128(FieldSpec):
    """Unsigned 128-bit integer."""

    field_type = FieldType.U128


class I8(FieldSpec):
    """Signed 8-bit integer."""

    field_type = FieldType.I8


class I16(FieldSpec):
    """Signed 16-bit integer."""

    field_type = FieldType.I16


class I32(FieldSpec):
    """Signed 32-bit integer."""

    field_type = FieldType.I32


class I64(FieldSpec):
    """Signed 64-bit integer."""

    field_type = FieldType.I64


class F32(FieldSpec):
    """32-bit float (values are rounded to single precision)."""

    field_type = FieldType.F32
    python_types = (float, int)


class F64(FieldSpec):
    """64-bit float."""

    field_type = FieldType.F64
    python_types = (float, int)


class Bool(FieldSpec):
    """Boolean."""

    field_type = FieldType.BOOL
    python_types = (bool,)


@dataclasses.dataclass(frozen=True)
class String(FieldSpec):
    """UTF-8 text of at most `max_length` bytes; `fixed` reserves all of them in every row."""

    max_length: int = 0
    fixed: bool = False
    field_type = FieldType.STRING
    python_types: typing.ClassVar[tuple[type, ...]] = (str,)

    def to_field(self, name: str, ordinal: int) -> Field:
        return Field(ordinal, name, self.field_type, fixed=self.fixed, max_length=self.max_length)


@dataclasses.dataclass(frozen=True)
class Bytes(String):
    """Raw bytes, at most `max_length`; `fixed` reserves all of them in every row."""

    field_type = FieldType.BYTES
    python_types = (bytes,)


@dataclasses.dataclass(frozen=True)
class Struct(FieldSpec):
    """A field holding a `@struct` class (the annotation says which; `of` may say it too)."""

    of: type | None = None
    field_type = FieldType.STRUCT
    python_types = ()

    def to_field(self, name: str, ordinal: int) -> Field:
        if self.of is None:
            raise InvalidSchema(f"field {name!r}: Struct needs the struct class")
        sub: StructModel[Any] = struct_model(self.of)
        return Field(
            ordinal, name, self.field_type, struct_name=sub.name, subfields=sub.definition_fields
        )


@dataclasses.dataclass(frozen=True)
class Array(FieldSpec):
    """Up to `max_count` elements: a scalar spec, a fixed String/Bytes, or a `@struct` class."""

    element: FieldSpec | type | None = None
    max_count: int = 0
    field_type = FieldType.STRUCT  # replaced by the element's type in to_field
    python_types = (list,)

    @property
    def element_spec(self) -> FieldSpec:
        if isinstance(self.element, FieldSpec):
            return self.element
        if isinstance(self.element, type):
            return Struct(of=self.element)
        raise InvalidSchema("Array needs an element: a spec like U32() or a @struct class")

    def to_field(self, name: str, ordinal: int) -> Field:
        element = self.element_spec.to_field(name, ordinal)
        return dataclasses.replace(element, array=True, max_count=self.max_count)


# --- models -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Member:
    """One declared attribute: its name, spec and Python-side converters."""

    name: str
    spec: FieldSpec
    field: Field
    to_wire: Callable[[Any], Any] | None
    from_wire: Callable[[Any], Any] | None


class _Model(Generic[T]):
    """What `kind` and `struct` share: the declared members, ordered by ordinal."""

    def __init__(self, cls: type[T], what: str) -> None:
        self.cls = cls
        members = _read_members(cls, what)
        self.members: tuple[_Member, ...] = members
        self.definition_fields: tuple[Field, ...] = tuple(m.field for m in members)
        self.names: tuple[str, ...] = tuple(m.name for m in members)
        self._ordinal_of = {m.name: m.field.ordinal for m in members}
        self._converters = tuple((m.to_wire, m.from_wire) for m in members)

    def ordinal_of(self, name: str) -> int:
        """The ordinal of a declared attribute."""
        try:
            return self._ordinal_of[name]
        except KeyError:
            raise AttributeError(
                f"{self.cls.__name__} has no field {name!r}; its fields are {', '.join(self.names)}"
            ) from None

    def to_values(self, obj: T) -> list[Any]:
        """An instance as positional wire values (by ordinal)."""
        if not isinstance(obj, self.cls):
            raise TypeError(f"expected a {self.cls.__name__}, got {type(obj).__name__}")
        values = []
        for name, (to_wire, _) in zip(self.names, self._converters, strict=True):
            value = getattr(obj, name)
            values.append(value if to_wire is None else to_wire(value))
        return values

    def from_values(self, values: Sequence[Any]) -> T:
        """An instance from positional wire values (by ordinal); extra trailing values, the
        fields of a newer schema version, are ignored."""
        kwargs = {}
        for name, (_, from_wire), value in zip(self.names, self._converters, values, strict=False):
            kwargs[name] = value if from_wire is None else from_wire(value)
        return self.cls(**kwargs)


class StructModel(_Model[T]):
    """The model of a `@struct` class."""

    def __init__(self, cls: type[T], name: str) -> None:
        super().__init__(cls, f"struct {name!r}")
        self.name = name


class KindModel(_Model[T]):
    """The model of a `@kind` class: its definition, row codec and conversions."""

    def __init__(self, cls: type[T], name: str, *, event_stream: bool, disk_backed: bool) -> None:
        check_user_kind_name(name)
        super().__init__(cls, f"kind {name!r}")
        self.name = name
        self.definition = KindDef(name, self.definition_fields, event_stream, disk_backed)
        validate_kind(self.definition)
        self.codec = RowCodec(self.definition_fields)

    def encode(self, obj: T) -> bytes:
        """The canonical row of an instance."""
        return self.codec.encode(self.to_values(obj))

    def decode(self, row: bytes) -> T:
        """An instance from a valid row of exactly this schema.

        For rows of a newer, wider server schema, decode with the server's codec and pass the
        values to `from_values`, which ignores the fields this class does not declare.
        """
        return self.from_values(self.codec.decode(row))

    def patch(self, changes: Mapping[str, Any]) -> tuple[int, bytes]:
        """The (mask, values) of a patch setting the named attributes."""
        by_ordinal = {}
        for name, value in changes.items():
            ordinal = self.ordinal_of(name)
            to_wire = self._converters[ordinal][0]
            by_ordinal[ordinal] = value if to_wire is None else to_wire(value)
        if not by_ordinal:
            raise InvalidData("a patch must set at least one field")
        return encode_patch(self.codec, by_ordinal)


def _read_members(cls: type, what: str) -> tuple[_Member, ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    members = []
    for name, hint in hints.items():
        if typing.get_origin(hint) is typing.ClassVar:
            continue
        spec = _spec_of(hint)
        if spec is None:
            raise InvalidSchema(
                f"{what}: attribute {name!r} needs a wire type, e.g. "
                f"`{name}: Annotated[int, U32(<ordinal>)]`"
            )
        if spec.ordinal is None:
            raise InvalidSchema(f"{what}: attribute {name!r} needs an ordinal, e.g. U32(3)")
        python_type = typing.get_args(hint)[0]
        if isinstance(spec, Struct) and spec.of is None:
            spec = dataclasses.replace(spec, of=python_type)
        _check_python_type(what, name, spec, python_type)
        members.append(_member(name, spec))
    members.sort(key=lambda m: m.field.ordinal)
    ordinals = [m.field.ordinal for m in members]
    if ordinals != list(range(len(members))):
        raise InvalidSchema(
            f"{what}: ordinals must be exactly 0..{len(members) - 1} with no gap or repeat; "
            f"got {sorted(ordinals)}"
        )
    return tuple(members)


def _spec_of(hint: Any) -> FieldSpec | None:
    if typing.get_origin(hint) is not typing.Annotated:
        return None
    specs = [arg for arg in typing.get_args(hint)[1:] if isinstance(arg, FieldSpec)]
    return specs[0] if len(specs) == 1 else None


def _check_python_type(what: str, name: str, spec: FieldSpec, python_type: Any) -> None:
    origin = typing.get_origin(python_type) or python_type
    if isinstance(spec, Struct):
        ok = origin is spec.of
    else:
        ok = not spec.python_types or origin in spec.python_types
    if not ok:
        raise InvalidSchema(
            f"{what}: attribute {name!r} is annotated {python_type!r}, "
            f"which does not hold a {type(spec).__name__}"
        )


def _member(name: str, spec: FieldSpec) -> _Member:
    assert spec.ordinal is not None
    f = spec.to_field(name, spec.ordinal)
    to_wire: Callable[[Any], Any] | None = None
    from_wire: Callable[[Any], Any] | None = None
    element = spec.element_spec if isinstance(spec, Array) else spec
    if isinstance(element, Struct):
        assert element.of is not None
        sub: StructModel[Any] = struct_model(element.of)
        if isinstance(spec, Array):
            to_wire = lambda items: [sub.to_values(item) for item in items]  # noqa: E731
            from_wire = lambda items: [sub.from_values(item) for item in items]  # noqa: E731
        else:
            to_wire, from_wire = sub.to_values, sub.from_values
    return _Member(name, spec, f, to_wire, from_wire)


# --- decorators -------------------------------------------------------------------------------


def _as_dataclass(cls: type[T]) -> type[T]:
    """Make `cls` a dataclass, copying mutable defaults (lists, structs) per instance."""
    for name, value in list(vars(cls).items()):
        if isinstance(value, list) or hasattr(type(value), _MODEL_ATTRIBUTE):
            setattr(cls, name, dataclasses.field(default_factory=_copier(value)))
    return dataclasses.dataclass(cls)


def _copier(value: Any) -> Callable[[], Any]:
    """A cheap factory of copies of a mutable default: a struct holds only immutable values, so
    a shallow copy does; so does an empty list; other lists (of structs, maybe) are deep-copied."""
    if isinstance(value, list):
        if not value:
            return list
        return lambda: copy.deepcopy(value)
    return lambda: copy.copy(value)


@typing.dataclass_transform()
def struct(cls: type[T] | None = None, *, name: str | None = None) -> Any:
    """Declare a struct: a named group of fixed-size fields, usable as a field or array element.

    Use as `@struct` or `@struct(name="Vec3")` (the name defaults to the class name).
    """

    def decorate(target: type[T]) -> type[T]:
        made = _as_dataclass(target)
        setattr(made, _MODEL_ATTRIBUTE, StructModel(made, name or target.__name__))
        return made

    return decorate if cls is None else decorate(cls)


@typing.dataclass_transform()
def kind(
    name: str, *, event_stream: bool = False, disk_backed: bool = False
) -> Callable[[type[T]], type[T]]:
    """Declare a kind named `name` (register it with the client to use it).

    `event_stream` keeps a per-operation event log; `disk_backed` keeps entities on disk rather
    than in memory. Neither can change after the first registration.
    """

    def decorate(target: type[T]) -> type[T]:
        made = _as_dataclass(target)
        model = KindModel(made, name, event_stream=event_stream, disk_backed=disk_backed)
        setattr(made, _MODEL_ATTRIBUTE, model)
        return made

    return decorate


def kind_model(cls: type[T]) -> KindModel[T]:
    """The model of a `@kind` class."""
    model = getattr(cls, _MODEL_ATTRIBUTE, None)
    if not isinstance(model, KindModel):
        raise TypeError(f"{cls!r} is not a kind: decorate it with @convergedb.kind(name)")
    return model


def struct_model(cls: type[T]) -> StructModel[T]:
    """The model of a `@struct` class."""
    model = getattr(cls, _MODEL_ATTRIBUTE, None)
    if not isinstance(model, StructModel):
        raise InvalidSchema(f"{cls!r} is not a struct: decorate it with @convergedb.struct")
    return model
