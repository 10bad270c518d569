"""The compiled write path (mypyc, `make compile`) runs only when built from the sources as
they are: the import-time guard of `convergedb.server.native`."""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import convergedb
from convergedb.schema import fastcheck, rowcheck
from convergedb.server import connection, engine, native

PACKAGE = Path(convergedb.__file__).parent
EXTENSION = importlib.machinery.EXTENSION_SUFFIXES[0]
PROBE = (
    "import warnings; warnings.simplefilter('always');"
    "from convergedb.server import native, engine, connection;"
    "print(native.state, engine.__file__.endswith('.py'), connection.__file__.endswith('.py'))"
)


ROW_CHECK_PROBE = (
    "import warnings; warnings.simplefilter('always');"
    "from convergedb.schema import fastcheck, rowcheck;"
    "print(fastcheck.state, rowcheck.__file__.endswith('.py'))"
)


def test_what_runs_is_what_the_guard_says() -> None:
    compiled = [
        m.__file__ is not None and not m.__file__.endswith(".py") for m in (engine, connection)
    ]
    assert compiled == [native.state == "compiled"] * 2
    if os.environ.get("CONVERGEDB_NATIVE") == "required":  # set by `make test`
        assert native.state == "compiled", "make test runs the compiled write path"


def copy_of_the_package(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    shutil.copytree(
        PACKAGE,
        root / "convergedb",
        ignore=shutil.ignore_patterns("*.so", "compiled.sha256", "__pycache__"),
    )
    return root


def probe(root: Path, code: str = PROBE) -> tuple[str, str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip(), done.stderr


def test_no_build_runs_plain_python(tmp_path: Path) -> None:
    out, err = probe(copy_of_the_package(tmp_path))
    assert out == "pure True True" and "make compile" not in err


def test_a_stale_build_is_not_run(tmp_path: Path) -> None:
    """Compiled files whose recorded digest is not that of the sources (an edit since the
    build): the sources run, with a warning that says how to rebuild. The files here are not
    even loadable, so a test that passes proves the guard never imported them."""
    root = copy_of_the_package(tmp_path)
    server = root / "convergedb" / "server"
    for name in native.COMPILED_MODULES:
        (server / f"{name}{EXTENSION}").write_bytes(b"not a shared object")
    (server / "compiled.sha256").write_text("0" * 64 + "\n")
    out, err = probe(root)
    assert out == "stale True True"
    assert "make compile" in err


def test_a_partial_build_is_not_run(tmp_path: Path) -> None:
    """The digest matches but one module has no compiled file: compiled modules call each other
    natively, so it is all of them or none."""
    root = copy_of_the_package(tmp_path)
    server = root / "convergedb" / "server"
    (server / f"engine{EXTENSION}").write_bytes(b"not a shared object")
    digest = subprocess.run(
        [
            sys.executable,
            "-c",
            "from convergedb.server import native; print(native.sources_digest())",
        ],
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (server / "compiled.sha256").write_text(digest + "\n")
    out, _ = probe(root)
    assert out == "stale True True"


# --- the row check (schema/rowcheck.py): its own build unit, guarded by schema/fastcheck.py ---


def test_the_row_check_runs_as_its_guard_says() -> None:
    assert (rowcheck.__file__ is not None and not rowcheck.__file__.endswith(".py")) == (
        fastcheck.state == "compiled"
    )
    if os.environ.get("CONVERGEDB_NATIVE") == "required":  # set by `make test`
        assert fastcheck.state == "compiled", "make test runs the compiled row check"


def test_no_build_of_the_row_check_runs_the_generated_check(tmp_path: Path) -> None:
    out, err = probe(copy_of_the_package(tmp_path), ROW_CHECK_PROBE)
    assert out == "pure True" and "make compile" not in err


def test_a_stale_row_check_is_not_run(tmp_path: Path) -> None:
    """A compiled row check whose recorded digest is not that of its source: the source is
    loaded (and the generated check runs), with a warning that says how to rebuild. The file
    is not even loadable, so a test that passes proves the guard never imported it."""
    root = copy_of_the_package(tmp_path)
    schema = root / "convergedb" / "schema"
    (schema / f"{fastcheck.COMPILED_MODULE}{EXTENSION}").write_bytes(b"not a shared object")
    (schema / "compiled.sha256").write_text("0" * 64 + "\n")
    out, err = probe(root, ROW_CHECK_PROBE)
    assert out == "stale True"
    assert "make compile" in err
