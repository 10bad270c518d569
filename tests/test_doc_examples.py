"""Every fenced Python example in the README and docs/ runs, so no example can rot."""

from __future__ import annotations

import contextlib
import re
import runpy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_fixture import LISTENING, STOP_TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _examples() -> list[tuple[str, str]]:
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [
        (f"{doc.relative_to(ROOT)}#{i}", block)
        for doc in documents
        for i, block in enumerate(FENCE.findall(doc.read_text()))
    ]


@pytest.mark.parametrize(("where", "source"), _examples(), ids=[w for w, _ in _examples()])
def test_example_runs(
    where: str, source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each example runs as a script; examples that talk to a server find one on the port in
    CONVERGEDB_PORT (a fresh server per example)."""
    script = tmp_path / "example.py"
    script.write_text(source)
    if "CONVERGEDB_PORT" not in source:
        runpy.run_path(str(script), run_name="__main__")
        return
    with server_for_example(tmp_path) as port:
        monkeypatch.setenv("CONVERGEDB_PORT", str(port))
        runpy.run_path(str(script), run_name="__main__")


@contextlib.contextmanager
def server_for_example(tmp_path: Path) -> Iterator[int]:
    """A server subprocess for one example (the example runs its own event loop, so this one
    is managed without asyncio)."""
    command = [sys.executable, "-m", "convergedb", "serve", "--port", "0", "--admin-port", "0"]
    command += ["--data-dir", str(tmp_path / "data")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        match = LISTENING.match(line)
        assert match, f"the server did not start: {line!r}"
        yield int(match["port"])
    finally:
        process.terminate()
        process.wait(timeout=STOP_TIMEOUT)


def test_there_are_examples() -> None:
    assert any(where.startswith("README.md") for where, _ in _examples())
