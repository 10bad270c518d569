"""Whether the write path runs compiled, and the guard that keeps a stale build from running.

The two modules on the write path, `engine` (accumulator, flush) and `connection` (frames in,
the BATCH fast path), can be compiled with mypyc: `make compile` (which `make test` and
`make bench` run) builds them in place, beside their sources, and records a digest of the
sources it compiled from. Python prefers a compiled module to its source, so a build left
behind by an edit would run old code: when the package is imported, `guard()` compares the
digest with the sources as they are now and, if they differ (or a compiled module is missing),
loads the pure-Python modules instead, all of them (compiled modules call each other
natively, so they cannot mix with interpreted ones), and warns. Nothing needs a compiler: with
no build, everything runs as plain Python, only slower (see docs/performance.md).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Final, Literal

COMPILED_MODULES: Final = ("engine", "connection")
"""The modules `make compile` builds, by name inside this package, in dependency order."""
DIGEST_FILE: Final = Path(__file__).with_name("compiled.sha256")
"""Written by the build: the digest of the sources it compiled."""

State = Literal["compiled", "pure", "stale"]
state: State = "pure"
"""What runs: the compiled build, plain Python (no build), or plain Python because the build is
stale (`make compile` refreshes it)."""


def sources_digest() -> str:
    """The digest of the compiled modules' sources as they are now."""
    digest = hashlib.sha256()
    for name in COMPILED_MODULES:
        digest.update(Path(__file__).with_name(f"{name}.py").read_bytes())
    return digest.hexdigest()


def _compiled_files(name: str) -> list[Path]:
    here = Path(__file__).parent
    return [
        here / f"{name}{suffix}"
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        if (here / f"{name}{suffix}").exists()
    ]


def guard() -> State:
    """Decide what runs (before any compiled module is imported); see the module docstring."""
    global state
    built = [name for name in COMPILED_MODULES if _compiled_files(name)]
    if not built:
        state = "pure"
        return state
    recorded = DIGEST_FILE.read_text().strip() if DIGEST_FILE.exists() else ""
    if len(built) == len(COMPILED_MODULES) and recorded == sources_digest():
        state = "compiled"
        return state
    state = "stale"
    warnings.warn(
        "the compiled write path was built from other sources than these: running plain "
        "Python instead (run `make compile` to rebuild it)",
        RuntimeWarning,
        stacklevel=2,
    )
    package = __name__.rpartition(".")[0]
    for name in COMPILED_MODULES:
        _load_source(f"{package}.{name}", Path(__file__).with_name(f"{name}.py"))
    return state


def _load_source(qualified: str, path: Path) -> None:
    spec = importlib.util.spec_from_file_location(qualified, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    spec.loader.exec_module(module)
