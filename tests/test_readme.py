"""The README's runnable code blocks (marked `<!-- ci: run -->`) run here, so they cannot rot."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def quickstart(text: str) -> str:
    """The Quickstart: the one code block between the quickstart markers (scripts/test_wheel.sh runs it too)."""
    found = re.findall(
        r"<!-- quickstart: begin -->\n.*?```python\n(.*?)```\n<!-- quickstart: end -->", text, flags=re.S
    )
    assert len(found) == 1, "the README must hold exactly one delimited Quickstart block"
    return found[0]


def test_readme_blocks_run(capsys):
    text = README.read_text()
    blocks = re.findall(r"<!-- ci: run -->\n```python\n(.*?)```", text, flags=re.S)
    assert quickstart(text) in blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "epoch 2: last batch loss" in out
    assert namespace["sampler"].pending == 0


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 200, "the README is a front door; put the rest on a docs page"
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative links only (no scheme)
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
