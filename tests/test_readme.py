"""The README's runnable code blocks (marked `<!-- ci: run -->`) run here, so they cannot rot."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_blocks_run(capsys):
    text = README.read_text()
    blocks = re.findall(r"<!-- ci: run -->\n```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "epoch 2: last batch loss" in out
    assert namespace["sampler"].pending == 0
