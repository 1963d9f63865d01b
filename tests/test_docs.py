"""The documentation: runnable code blocks of docs/*.md (marked `<!-- ci: run -->`) run here, as the README's
do (tests/test_readme.py), and the API reference lists every public name. `make docs` builds the site."""

import ast
import importlib
import pathlib
import re

import pytest
import torchgrab

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"<!-- ci: run -->\n```python\n(.*?)```", flags=re.S)
PAGES = sorted(p for p in DOCS.rglob("*.md") if BLOCK.search(p.read_text()))


def test_pages_with_runnable_blocks_exist():
    names = {p.name for p in PAGES}
    assert {"getting-started.md", "how-grab-works.md", "orderings.md", "checkpoints.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_docs_blocks_run(page, capsys):
    namespace: dict = {}
    for block in BLOCK.findall(page.read_text()):  # one namespace per page: later blocks build on earlier ones
        exec(compile(block, str(page), "exec"), namespace)
    capsys.readouterr()


def test_api_reference_lists_every_public_name():
    text = (DOCS / "api.md").read_text()
    targets = re.findall(r"^::: ([\w.]+)$", text, flags=re.M)
    documented = {}
    for target in targets:
        module, _, name = target.rpartition(".")
        try:
            imported = importlib.import_module(module)
        except ImportError:
            if module.startswith("torchgrab.integrations."):  # needs its framework (an extra), not installed
                continue
            raise
        obj = getattr(imported, name, None)
        if obj is not None and not isinstance(obj, type(torchgrab)):
            documented[name] = obj
    for name in torchgrab.__all__:
        assert name in documented, f"docs/api.md does not document torchgrab.{name}"
        assert documented[name] is getattr(torchgrab, name), f"docs/api.md documents another {name}"
        assert getattr(torchgrab, name).__doc__, f"torchgrab.{name} has no docstring"


def test_native_stub_docstrings_match_the_extension():
    # The API reference reads the Rust exceptions' docstrings from _native.pyi (a stub is what static
    # analysis sees); they must say what the compiled module says.
    stub = ast.parse((ROOT / "python" / "torchgrab" / "_native.pyi").read_text())
    checked = 0
    for node in stub.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
            assert ast.get_docstring(node) == getattr(torchgrab._native, node.name).__doc__, node.name
            checked += 1
    assert checked >= 8


def test_nav_lists_every_page():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.rglob("*.md"):
        rel = str(page.relative_to(DOCS))
        assert f": {rel}" in nav, f"mkdocs.yml nav does not list {rel}"
