"""Every fenced Python example in the README and docs/ runs, so no example can rot."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

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
def test_example_runs(where: str, source: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(source)
    runpy.run_path(str(script), run_name="__main__")


def test_there_are_examples() -> None:
    assert any(where.startswith("README.md") for where, _ in _examples())
