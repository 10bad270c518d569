"""The size of the torture suites: a fast default for `make test`, a long mode for `make torture`.

    CONVERGEDB_TORTURE=long pytest -m torture -s

Suites that break things for real (crash torture, soak, and any later fuzz or network-fault
suite) mark themselves `@pytest.mark.torture` and take their counts from `sized(fast, long)`,
so that one variable scales all of them.
"""

from __future__ import annotations

import os
from typing import Final, TypeVar

T = TypeVar("T")

MODE_VARIABLE: Final = "CONVERGEDB_TORTURE"
"""The environment variable that selects the mode: `long`, or anything else for fast."""


def long_mode() -> bool:
    """Whether the long mode is selected (`CONVERGEDB_TORTURE=long`)."""
    return os.environ.get(MODE_VARIABLE, "").strip().lower() == "long"


def sized(fast: T, long: T) -> T:
    """`long` in the long mode, else `fast`."""
    return long if long_mode() else fast


def mode_name() -> str:
    """`long` or `fast`, for what the suites print."""
    return "long" if long_mode() else "fast"
