"""Building instances of frozen slots dataclasses quickly, on the subscriber's hot path.

The `__init__` of a frozen dataclass stores each field through `object.__setattr__` (its own
`__setattr__` refuses): a call per field, about 2 µs for the ten fields of a STATE message,
more than decoding it. A subscriber builds three such objects per change (the `State` message,
the `Change`, the `MirrorEntry`). `frozen_constructor` makes an equivalent constructor that
stores the fields into an instance of a mutable twin class with the same slots, then turns it
into the frozen class by assigning `__class__` (allowed between classes of the same layout).
The result is an ordinary instance of the frozen class: same type, fields, equality, hash and
immutability.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def frozen_constructor(cls: type[T]) -> Callable[..., T]:
    """A constructor of `cls` that takes every field positionally, in field order.

    Args:
        cls: A frozen dataclass made with `slots=True`, whose `__init__` is the generated one
            (no `__post_init__`, every field an init field).

    Returns:
        A function of one positional argument per field; `cls` itself when the fast way does
        not apply (the call is then the plain constructor, with every field given).
    """
    if not dataclasses.is_dataclass(cls):
        return cls
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    slots = getattr(cls, "__slots__", None)
    if (
        not cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
        or hasattr(cls, "__post_init__")
        or not all(f.init for f in fields)
        or slots is None
        or list(slots) != names
        or "__dict__" in dir(cls)
    ):
        return cls
    bases = getattr(cls, "__orig_bases__", cls.__bases__)
    try:
        twin = types.new_class(
            f"_Mutable{cls.__name__}", bases, exec_body=lambda ns: ns.update(__slots__=slots)
        )
    except TypeError:  # e.g. a base that cannot be subclassed (a compiled class)
        return cls
    arguments = ", ".join(names)
    stores = "".join(f"    self.{name} = {name}\n" for name in names)
    source = (
        f"def make({arguments}):\n    self = new(twin)\n{stores}    self.__class__ = cls\n"
        "    return self\n"
    )
    namespace: dict[str, Any] = {"new": object.__new__, "twin": twin, "cls": cls}
    exec(compile(source, f"<convergedb constructor of {cls.__qualname__}>", "exec"), namespace)
    make: Callable[..., T] = namespace["make"]
    try:
        sample = make(*range(len(names)))
    except TypeError:  # the layouts differ after all: keep the plain constructor
        return cls
    if type(sample) is not cls or sample != cls(*range(len(names))):
        return cls
    return make
