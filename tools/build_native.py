"""Compile the write path's modules with mypyc, in place (what `make compile` runs).

Builds `convergedb.server.native.COMPILED_MODULES` (one group) and the row check
`convergedb.schema.fastcheck.COMPILED_MODULE` (on its own) beside their sources (the C sources
and objects go to a temporary directory) and records the digests of the sources compiled, which
the guards (`native.guard()`, `fastcheck`) check at import. Run from the repository root with
the project's venv.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def main() -> None:
    sys.path.insert(0, str(SRC))
    from mypyc.build import mypycify
    from setuptools import setup

    from convergedb.schema import fastcheck
    from convergedb.server import native

    sources = [f"convergedb/server/{name}.py" for name in native.COMPILED_MODULES]
    row_check = f"convergedb/schema/{fastcheck.COMPILED_MODULE}.py"
    digest = native.sources_digest()
    row_check_digest = fastcheck.source_digest()
    native.DIGEST_FILE.unlink(missing_ok=True)
    fastcheck.DIGEST_FILE.unlink(missing_ok=True)
    os.chdir(SRC)
    with tempfile.TemporaryDirectory(prefix="convergedb-mypyc-") as build:
        os.environ["MYPY_CACHE_DIR"] = str(Path(build, "mypy-cache"))
        setup(
            name="convergedb-native",
            ext_modules=[
                *mypycify(sources, opt_level="3", target_dir=build, group_name="convergedb"),
                # imports nothing of the package: a module of its own, no shared library
                *mypycify([row_check], opt_level="3", target_dir=build),
            ],
            script_args=[
                "--quiet",
                "build_ext",
                "--inplace",
                "--build-temp",
                build,
                "--build-lib",
                build,
            ],
        )
    native.DIGEST_FILE.write_text(digest + "\n")
    fastcheck.DIGEST_FILE.write_text(row_check_digest + "\n")
    print(f"compiled {', '.join(native.COMPILED_MODULES)} (mypyc); digest {digest[:12]}")
    print(f"compiled {row_check} (mypyc); digest {row_check_digest[:12]}")


if __name__ == "__main__":
    main()
