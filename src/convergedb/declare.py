"""Declaring kinds as Python classes.

A kind is a class whose attributes are annotated with `typing.Annotated[<python type>, <spec>]`,
where the spec gives the wire type and the permanent ordinal:

```python
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
```

The decorators turn the class into a dataclass (mutable defaults are copied per instance) and
attach a `KindModel` / `StructModel` that derives the kind definition, encodes and decodes
instances, and builds patches that carry only the fields the caller sets.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from .schema.definition import check_user_kind_name, validate_kind
from .schema.errors import InvalidData, InvalidSchema
from .schema.patch import encode_patch
from .schema.rows import RowCodec
from .schema.types import Field, FieldType, KindDef

T = TypeVar("T")
_MODEL_ATTRIBUTE = "__convergedb_model__"
_GENERATED_INIT: weakref.WeakSet[type] = weakref.WeakSet()
"""The classes `_as_dataclass` gave a dataclass-generated `__init__` (the class had none of its
own), whose instances `_compile_from_values` may build without calling it."""


# --- field specs ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """The wire type of one field: the base class of `U8`, `String`, `Struct`, `Array`, ...

    A spec goes in the field's annotation, `Annotated[<python type>, <spec>]`, and gives the
    wire type and the field's permanent ordinal.

    Example:
        ```python
        hp: Annotated[int, cdb.U16(1)] = 0  # a u16 at ordinal 1
        ```
    """

    ordinal: int | None = None
    """The field's permanent position in the kind, from 0 with no gap. Ordinals are never
    reused or changed: a new field takes the next one. Omitted only for array elements."""
    field_type: typing.ClassVar[FieldType]
    """The wire type. @private: set by each spec class."""
    python_types: typing.ClassVar[tuple[type, ...]] = (int,)
    """The Python types an attribute of this spec may be annotated with. @private: set by each
    spec class."""

    def to_field(self, name: str, ordinal: int) -> Field:
        """Make the schema field this spec declares.

        Args:
            name: The attribute's name.
            ordinal: The field's ordinal.

        Returns:
            The field of the kind definition.
        """
        return Field(ordinal, name, self.field_type)


class U8(FieldSpec):
    """Unsigned 8-bit integer (0..255), held as an `int`; e.g. `U8(0)`."""

    field_type = FieldType.U8


class U16(FieldSpec):
    """Unsigned 16-bit integer (0..65,535), held as an `int`; e.g. `U16(1)`."""

    field_type = FieldType.U16


class U32(FieldSpec):
    """Unsigned 32-bit integer, held as an `int`; e.g. `U32(2)`."""

    field_type = FieldType.U32


class U64(FieldSpec):
    """Unsigned 64-bit integer, held as an `int`; e.g. `U64(3)`."""

    field_type = FieldType.U64


class U128(FieldSpec):
    """Unsigned 128-bit integer, held as an `int`; e.g. `U128(4)`."""

    field_type = FieldType.U128


class I8(FieldSpec):
    """Signed 8-bit integer (-128..127), held as an `int`; e.g. `I8(0)`."""

    field_type = FieldType.I8


class I16(FieldSpec):
    """Signed 16-bit integer, held as an `int`; e.g. `I16(1)`."""

    field_type = FieldType.I16


class I32(FieldSpec):
    """Signed 32-bit integer, held as an `int`; e.g. `I32(2)`."""

    field_type = FieldType.I32


class I64(FieldSpec):
    """Signed 64-bit integer, held as an `int`; e.g. `I64(3)`."""

    field_type = FieldType.I64


class F32(FieldSpec):
    """32-bit float, held as a `float` (values are rounded to single precision); e.g. `F32(0)`."""

    field_type = FieldType.F32
    python_types = (float, int)


class F64(FieldSpec):
    """64-bit float, held as a `float`; e.g. `F64(1)`."""

    field_type = FieldType.F64
    python_types = (float, int)


class Bool(FieldSpec):
    """Boolean, held as a `bool`; e.g. `Bool(2)`."""

    field_type = FieldType.BOOL
    python_types = (bool,)


@dataclasses.dataclass(frozen=True)
class String(FieldSpec):
    """UTF-8 text of at most `max_length` bytes, held as a `str`.

    Example:
        ```python
        name: Annotated[str, cdb.String(0, max_length=32)] = ""
        tag: Annotated[str, cdb.String(1, max_length=8, fixed=True)] = ""
        ```
    """

    max_length: int = 0
    """The most bytes of UTF-8 the value may hold."""
    fixed: bool = False
    """Reserve all `max_length` bytes in every row (needed for an array element); a variable
    string (the default) takes only its length."""
    field_type = FieldType.STRING
    python_types: typing.ClassVar[tuple[type, ...]] = (str,)

    def to_field(self, name: str, ordinal: int) -> Field:
        """Make the schema field this spec declares (see `FieldSpec.to_field`).

        Args:
            name: The attribute's name.
            ordinal: The field's ordinal.
        """
        return Field(ordinal, name, self.field_type, fixed=self.fixed, max_length=self.max_length)


@dataclasses.dataclass(frozen=True)
class Bytes(String):
    """Raw bytes, at most `max_length` of them, held as `bytes`; `fixed` reserves all of them in
    every row. E.g. `Bytes(3, max_length=16)`."""

    field_type = FieldType.BYTES
    python_types = (bytes,)


@dataclasses.dataclass(frozen=True)
class Struct(FieldSpec):
    """A field holding an instance of a `@struct` class.

    Example:
        ```python
        pos: Annotated[Vec3, cdb.Struct(2)] = Vec3()
        ```
    """

    of: type | None = None
    """The `@struct` class; None takes it from the annotation."""
    field_type = FieldType.STRUCT
    python_types = ()

    def to_field(self, name: str, ordinal: int) -> Field:
        """Make the schema field this spec declares (see `FieldSpec.to_field`).

        Args:
            name: The attribute's name.
            ordinal: The field's ordinal.

        Raises:
            InvalidSchema: The struct class is unknown, or not a `@struct` class.
        """
        if self.of is None:
            raise InvalidSchema(f"field {name!r}: Struct needs the struct class")
        sub: StructModel[Any] = struct_model(self.of)
        return Field(
            ordinal, name, self.field_type, struct_name=sub.name, subfields=sub.definition_fields
        )


@dataclasses.dataclass(frozen=True)
class Array(FieldSpec):
    """A list of up to `max_count` elements, held as a `list`.

    The elements are of a scalar spec, a fixed `String` or `Bytes`, or a `@struct` class.

    Example:
        ```python
        inventory: Annotated[list[int], cdb.Array(3, cdb.U32(), max_count=64)] = []
        path: Annotated[list[Vec3], cdb.Array(4, Vec3, max_count=16)] = []
        ```
    """

    element: FieldSpec | type | None = None
    """The elements' spec, without an ordinal (e.g. `U32()`), or a `@struct` class."""
    max_count: int = 0
    """The most elements the list may hold."""
    field_type = FieldType.STRUCT  # replaced by the element's type in to_field
    python_types = (list,)

    @property
    def element_spec(self) -> FieldSpec:
        """The elements' spec (a `Struct` for a `@struct` class).

        Raises:
            InvalidSchema: No element was given.
        """
        if isinstance(self.element, FieldSpec):
            return self.element
        if isinstance(self.element, type):
            return Struct(of=self.element)
        raise InvalidSchema("Array needs an element: a spec like U32() or a @struct class")

    def to_field(self, name: str, ordinal: int) -> Field:
        """Make the schema field this spec declares (see `FieldSpec.to_field`).

        Args:
            name: The attribute's name.
            ordinal: The field's ordinal.

        Raises:
            InvalidSchema: No element was given, or its struct class is not a `@struct`.
        """
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
        """Read the declared members of `cls`.

        Args:
            cls: The decorated class (a dataclass by now).
            what: What the class declares, for error messages.

        Raises:
            InvalidSchema: An attribute has no spec or no ordinal, its Python type does not
                hold its spec, or the ordinals are not exactly 0..N-1.
        """
        self.cls = cls
        """The declared class."""
        members = _read_members(cls, what)
        self.members: tuple[_Member, ...] = members
        """The declared attributes, by ordinal."""
        self.definition_fields: tuple[Field, ...] = tuple(m.field for m in members)
        """The schema fields, by ordinal."""
        self.names: tuple[str, ...] = tuple(m.name for m in members)
        """The attribute names, by ordinal."""
        self._ordinal_of = {m.name: m.field.ordinal for m in members}
        self._converters = tuple((m.to_wire, m.from_wire) for m in members)
        self._from_values = _compile_from_values(cls, members, self._from_values_slowly)

    def ordinal_of(self, name: str) -> int:
        """The ordinal of a declared attribute.

        Args:
            name: The attribute's name.

        Raises:
            AttributeError: The class has no such field.
        """
        try:
            return self._ordinal_of[name]
        except KeyError:
            raise AttributeError(
                f"{self.cls.__name__} has no field {name!r}; its fields are {', '.join(self.names)}"
            ) from None

    def to_values(self, obj: T) -> list[Any]:
        """Turn an instance into positional wire values (by ordinal).

        Args:
            obj: An instance of the declared class.

        Raises:
            TypeError: `obj` is not an instance of the declared class.
        """
        if not isinstance(obj, self.cls):
            raise TypeError(f"expected a {self.cls.__name__}, got {type(obj).__name__}")
        values = []
        for name, (to_wire, _) in zip(self.names, self._converters, strict=True):
            value = getattr(obj, name)
            values.append(value if to_wire is None else to_wire(value))
        return values

    def from_values(self, values: Sequence[Any]) -> T:
        """Make an instance from positional wire values (by ordinal).

        Args:
            values: The wire values; extra trailing values (the fields of a newer schema
                version) are ignored.
        """
        return self._from_values(values)

    def _from_values_slowly(self, values: Sequence[Any]) -> T:
        """`from_values` through the class's constructor, by keyword (what the generated fast
        path does not cover: fewer values than fields, a class with its own `__init__`...)."""
        kwargs = {}
        for name, (_, from_wire), value in zip(self.names, self._converters, values, strict=False):
            kwargs[name] = value if from_wire is None else from_wire(value)
        return self.cls(**kwargs)


def _compile_from_values(
    cls: type[T], members: Sequence[_Member], slowly: Callable[[Sequence[Any]], T]
) -> Callable[[Sequence[Any]], T]:
    """A fast `from_values` for `cls`, generated once per model.

    The subscriber's hot path builds one instance per change. `cls(**kwargs)` costs a dict and
    a keyword call into the dataclass `__init__`; when that `__init__` is the generated one (it
    only stores each argument, in field order) and nothing else runs on construction, the
    instance is made with `object.__new__` and its attributes stored in the same order, with
    the values unpacked at once. Anything else goes through `slowly` (the constructor).
    """
    names = [m.name for m in members]
    fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
    direct = (
        cls in _GENERATED_INIT
        and cls.__new__ is object.__new__
        and cls.__setattr__ is object.__setattr__
        and not hasattr(cls, "__post_init__")
        and all(f.init for f in fields)
        and sorted(f.name for f in fields) == sorted(names)
    )
    if not direct or not members:
        return slowly
    namespace: dict[str, Any] = {"cls": cls, "new": object.__new__, "slowly": slowly}
    count = len(members)
    ordinal = {m.name: m.field.ordinal for m in members}
    stores = []
    for f in fields:  # the order the dataclass __init__ stores them in
        value = f"v{ordinal[f.name]}"
        converter = members[ordinal[f.name]].from_wire
        if converter is not None:
            namespace[f"from_wire{ordinal[f.name]}"] = converter
            value = f"from_wire{ordinal[f.name]}({value})"
        stores.append(f"self.{f.name} = {value}")
    target = ", ".join(f"v{i}" for i in range(count)) + ("," if count == 1 else "")
    source = "\n".join(
        [
            "def from_values(values):",
            "    if type(values) is not list and type(values) is not tuple:",
            "        return slowly(values)",
            f"    if len(values) != {count}:",
            f"        if len(values) < {count}:",
            "            return slowly(values)",
            f"        values = values[:{count}]",
            f"    {target} = values",
            "    self = new(cls)",
            *(f"    {store}" for store in stores),
            "    return self",
            "",
        ]
    )
    exec(compile(source, f"<convergedb from_values of {cls.__qualname__}>", "exec"), namespace)
    compiled: Callable[[Sequence[Any]], T] = namespace["from_values"]
    return compiled


class StructModel(_Model[T]):
    """The model of a `@struct` class (`struct_model` returns it): its fields and conversions."""

    def __init__(self, cls: type[T], name: str) -> None:
        """Read the struct's declaration (`@struct` does it).

        Args:
            cls: The decorated class.
            name: The struct's name.

        Raises:
            InvalidSchema: The declaration breaks a rule (see `KindModel`).
        """
        super().__init__(cls, f"struct {name!r}")
        self.name = name
        """The struct's name."""


class KindModel(_Model[T]):
    """The model of a `@kind` class (`kind_model` returns it): its definition, row codec and
    conversions. The client uses it; a user rarely needs it."""

    def __init__(self, cls: type[T], name: str, *, event_stream: bool, disk_backed: bool) -> None:
        """Read the kind's declaration and check it (`@kind` does it).

        Args:
            cls: The decorated class.
            name: The kind's name.
            event_stream: Whether the kind keeps a per-operation event log.
            disk_backed: Whether the kind keeps its entities on disk.

        Raises:
            InvalidSchema: The declaration breaks a rule or a limit (e.g. no spec on an
                attribute, a gap in the ordinals, too many fields).
            ReservedName: The name starts with the reserved `convergedb_`.
        """
        check_user_kind_name(name)
        super().__init__(cls, f"kind {name!r}")
        self.name = name
        """The kind's name."""
        self.definition = KindDef(name, self.definition_fields, event_stream, disk_backed)
        """The kind definition registered with the server."""
        validate_kind(self.definition)
        self.codec = RowCodec(self.definition_fields)
        """The row codec of the definition."""

    def encode(self, obj: T) -> bytes:
        """Encode an instance as its canonical row.

        Args:
            obj: An instance of the declared class.

        Raises:
            TypeError: `obj` is not an instance of the declared class.
            InvalidData: A value does not fit its field.
        """
        return self.codec.encode(self.to_values(obj))

    def decode(self, row: bytes) -> T:
        """Decode a valid row of exactly this schema into an instance.

        For rows of a newer, wider server schema, decode with the server's codec and pass the
        values to `from_values`, which ignores the fields this class does not declare.

        Args:
            row: The row bytes (not checked: validate rows from elsewhere first).
        """
        return self.from_values(self.codec.decode(row))

    def patch(self, changes: Mapping[str, Any]) -> tuple[int, bytes]:
        """Encode a patch setting the named attributes.

        Args:
            changes: Attribute names to new values.

        Returns:
            The patch's field mask and its values.

        Raises:
            AttributeError: A name is not a field of the class.
            InvalidData: No field is given, or a value does not fit.
        """
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
    own_init = "__init__" in vars(cls)
    made = dataclasses.dataclass(cls)
    if not own_init:
        _GENERATED_INIT.add(made)
    return made


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

    Use as `@struct` or `@struct(name="Vec3")`. The class becomes a dataclass, like a kind's;
    its attributes are declared like a kind's, with their own ordinals from 0. Its fields must
    be fixed-size (scalars, fixed `String` or `Bytes`): a kind that uses a struct with a
    variable-length field is refused with `InvalidSchema` when the kind is declared.

    Args:
        cls: The class, when used as `@struct` without arguments.
        name: The struct's name in the schema; the class name by default.

    Returns:
        The class, made a dataclass (or, with `name`, the decorator that does it).

    Raises:
        InvalidSchema: The declaration breaks a rule (an attribute without a spec or an
            ordinal, an annotation that does not hold its spec, a gap in the ordinals).

    Example:
        ```python
        @cdb.struct
        class Vec3:
            x: Annotated[float, cdb.F32(0)] = 0.0
            y: Annotated[float, cdb.F32(1)] = 0.0
            z: Annotated[float, cdb.F32(2)] = 0.0
        ```
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
    """Declare a kind: a class whose instances are the entities' values.

    The class becomes a dataclass (mutable defaults are copied per instance). Each attribute is
    annotated `Annotated[<python type>, <spec>]`, where the spec (`U16(1)`, `String(0,
    max_length=32)`, ...) gives the wire type and the permanent ordinal. Register the kind
    with `Client.register_kind` to use it. `event_stream` and `disk_backed` cannot change
    after the first registration.

    Args:
        name: The kind's name on the server (names starting with `convergedb_` are reserved).
        event_stream: Keep a per-operation event log (`KindHandle.subscribe_events`).
        disk_backed: Keep the entities on disk rather than in memory.

    Returns:
        The decorator: it returns the class, made a dataclass.

    Raises:
        InvalidSchema: The declaration breaks a rule or a limit (an attribute without a spec
            or an ordinal, a gap in the ordinals, ...), when the class is decorated.
        ReservedName: The name starts with `convergedb_`.

    Example:
        ```python
        @cdb.kind("player")
        class Player:
            name: Annotated[str, cdb.String(0, max_length=32)] = ""
            hp: Annotated[int, cdb.U16(1)] = 0
            pos: Annotated[Vec3, cdb.Struct(2)] = Vec3()
            inventory: Annotated[list[int], cdb.Array(3, cdb.U32(), max_count=64)] = []
        ```
    """

    def decorate(target: type[T]) -> type[T]:
        made = _as_dataclass(target)
        model = KindModel(made, name, event_stream=event_stream, disk_backed=disk_backed)
        setattr(made, _MODEL_ATTRIBUTE, model)
        return made

    return decorate


def kind_model(cls: type[T]) -> KindModel[T]:
    """The model of a `@kind` class: its definition, row codec and conversions.

    Args:
        cls: A class decorated with `@kind`.

    Raises:
        TypeError: `cls` is not a `@kind` class.
    """
    model = getattr(cls, _MODEL_ATTRIBUTE, None)
    if not isinstance(model, KindModel):
        raise TypeError(f"{cls!r} is not a kind: decorate it with @convergedb.kind(name)")
    return model


def struct_model(cls: type[T]) -> StructModel[T]:
    """The model of a `@struct` class: its fields and conversions.

    Args:
        cls: A class decorated with `@struct`.

    Raises:
        InvalidSchema: `cls` is not a `@struct` class.
    """
    model = getattr(cls, _MODEL_ATTRIBUTE, None)
    if not isinstance(model, StructModel):
        raise InvalidSchema(f"{cls!r} is not a struct: decorate it with @convergedb.struct")
    return model
