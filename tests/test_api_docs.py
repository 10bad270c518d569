"""The API reference (`make docs`): it builds without a warning, its key pages are there, its
links resolve, its docstrings render, and every public callable of the SDK is documented."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pdoc.doc
import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKEFILE = ROOT / "Makefile"
SDK_MODULES = ("convergedb", "convergedb.client")
"""The modules whose `__all__` is the SDK's public surface."""
OWN_SOURCES = ("convergedb.client", "convergedb.declare")
"""Where the SDK is defined. The other names `convergedb` exports come from the id, protocol and
schema modules, outside the SDK."""


def _make_variable(name: str) -> list[str]:
    """A variable of the Makefile, split into words: the test builds what `make docs` builds."""
    match = re.search(rf"^{name} := (.*)$", MAKEFILE.read_text(), re.MULTILINE)
    assert match, f"the Makefile has no {name}"
    return match[1].split()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The API reference, built as `make docs` does (warnings are errors) into a tmp dir."""
    out = tmp_path_factory.mktemp("api")
    command = [sys.executable, "-W", "error", "-m", "pdoc", *_make_variable("PDOC_FLAGS")]
    command += ["--output-directory", str(out), *_make_variable("API_MODULES")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"pdoc failed:\n{done.stderr}"
    assert not done.stderr.strip(), f"pdoc warned:\n{done.stderr}"
    return out


def test_the_key_pages_exist(api: Path) -> None:
    assert "convergedb.html" in (api / "index.html").read_text()
    top = (api / "convergedb.html").read_text()
    client = (api / "convergedb" / "client.html").read_text()
    for name in ("kind", "struct", "String", "Array", "entity_id", "connect", "Mirror"):
        assert f'id="{name}"' in top, name
    for name in (
        "connect",
        "Client",
        "Client.register_kind",
        "Client.sync",
        "KindHandle",
        "KindHandle.assert_",
        "KindHandle.subscribe",
        "Batch",
        "Subscription",
        "Subscription.start",  # inherited from a private base: shown by docs/api-template
        "DynamicKindHandle.query",  # inherited from KindHandle: listed, linked to it
        "Mirror",
        "Mirror.wait_seq",
        "ConvergeError",
        "WriteRejected",
        "ConnectionLost",
    ):
        assert f'id="{name}"' in client, name
    # the submodules are not part of the reference: only what __all__ lists
    assert sorted(p.relative_to(api).as_posix() for p in api.rglob("*.html")) == [
        "convergedb.html",
        "convergedb/client.html",
        "index.html",
    ]


def test_links_resolve(api: Path) -> None:
    """Every link between the pages, and to an entry of a page, reaches its target."""
    pages = {path.resolve(): path.read_text() for path in api.rglob("*.html")}
    anchors = {path: set(re.findall(r'\bid="([^"]+)"', text)) for path, text in pages.items()}
    broken = []
    for path, text in pages.items():
        for href in set(re.findall(r'href="([^"]+)"', text)):
            if href.startswith(("http://", "https://", "data:", "${")):
                continue  # external, or a placeholder of the search script
            target, _, fragment = href.partition("#")
            page = (path.parent / target).resolve() if target else path
            if page not in pages or (fragment and fragment not in anchors[page]):
                broken.append(f"{path.name}: {href}")
    assert not broken, broken


def test_docstring_sections_render(api: Path) -> None:
    """Google-style sections became headings: none is left as a paragraph of raw text (the
    sign of a section whose lines are not indented under it)."""
    for page in api.rglob("*.html"):
        raw = re.findall(
            r"<p>(?:Args|Arguments|Returns|Yields|Raises|Example|Examples|Attributes):",
            page.read_text(),
        )
        assert not raw, f"{page.name}: {raw}"


def _defined_in(obj: Any, prefixes: tuple[str, ...]) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _own_docstring(obj: Any) -> str:
    doc = obj.__doc__ if isinstance(obj, property) else getattr(obj, "__doc__", None)
    return (doc or "").strip()


def _public_callables(module: ModuleType) -> Iterator[tuple[str, Any]]:
    """Each function and class of `module.__all__` defined in the SDK, and the public methods
    and properties of those classes (and of their bases in the SDK), with an explicit
    `__init__`."""
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # a type alias or a constant
        if not _defined_in(obj, OWN_SOURCES):
            continue
        yield f"{module.__name__}.{name}", obj
        if not inspect.isclass(obj):
            continue
        seen: set[str] = set()
        for klass in obj.__mro__:  # the first definition of a name is the one in force
            if not _defined_in(klass, OWN_SOURCES):
                continue
            for attr, member in vars(klass).items():
                if attr in seen or (attr.startswith("_") and attr != "__init__"):
                    continue
                seen.add(attr)
                function = getattr(member, "__func__", member)  # staticmethod, classmethod
                if inspect.isfunction(function):
                    if function.__code__.co_filename == "<string>":
                        continue  # made by @dataclass: its fields are documented instead
                    yield f"{module.__name__}.{name}.{attr}", function
                elif isinstance(member, property):
                    yield f"{module.__name__}.{name}.{attr}", member


@pytest.mark.parametrize("module_name", SDK_MODULES)
def test_every_public_callable_has_a_docstring(module_name: str) -> None:
    module = importlib.import_module(module_name)
    found = list(_public_callables(module))
    missing = [where for where, obj in found if not _own_docstring(obj)]
    assert not missing, f"no docstring: {missing}"
    names = {where.rsplit(".", 1)[-1] for where, _ in found}
    assert {"connect", "Client", "KindHandle", "Mirror", "register_kind", "kind"} <= names


def _documented_arguments(docstring: str) -> set[str]:
    """The names described in the docstring's Google-style `Args:` section."""
    section = re.search(r"^Args:\n((?:[ \t]+.*\n|\n)*)", inspect.cleandoc(docstring) + "\n", re.M)
    return set(re.findall(r"^ {4}(\w+):", section[1], re.M)) if section else set()


@pytest.mark.parametrize("module_name", SDK_MODULES)
def test_every_parameter_is_described(module_name: str) -> None:
    """Each parameter of a public function or method of the SDK has its line under `Args:`."""
    module = importlib.import_module(module_name)
    undocumented = []
    for where, obj in _public_callables(module):
        if not inspect.isfunction(obj):
            continue  # a class (its __init__ is checked) or a property
        parameters = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
        missing = set(parameters) - _documented_arguments(obj.__doc__ or "")
        undocumented += [f"{where}({name})" for name in parameters if name in missing]
    assert not undocumented, undocumented


def _members(doc: pdoc.doc.Namespace[Any]) -> Iterator[pdoc.doc.Doc[Any]]:
    """What the reference shows of a module or class: public members, recursively."""
    for member in doc.members.values():
        if member.name.startswith("_") or "@private" in member.docstring:
            continue
        yield member
        if isinstance(member, pdoc.doc.Class):
            yield from _members(member)


def test_every_documented_member_of_the_sdk_has_a_docstring() -> None:
    """What pdoc renders for `convergedb.client`, attributes and enum members included, has a
    docstring wherever it is defined in the SDK (inherited docstrings count, as pdoc shows
    them)."""
    module = pdoc.doc.Module(importlib.import_module("convergedb.client"))
    missing = [
        member.fullname
        for member in _members(module)
        if member.taken_from[0].startswith(OWN_SOURCES) and not member.docstring.strip()
    ]
    assert not missing, f"no docstring: {missing}"
