"""GraB through `sampler.watch(model)` on a bag-of-words text classifier: `nn.EmbeddingBag` with offsets.

    .venv/bin/python benchmarks/watch_textbag.py                  # out/watch_textbag.{txt,csv,png}
    .venv/bin/python benchmarks/watch_textbag.py --sketch 128     # a larger sketch (out/watch_textbag_sketch128.*)
    .venv/bin/python benchmarks/watch_textbag.py --quick          # a smoke run of a few seconds

The model of PyTorch's text classification tutorial (and of fastText): each sentence's word vectors averaged
by `nn.EmbeddingBag(mode="mean")`, the batch's sentences end to end cut by offsets (`model(text, offsets)`),
then one Linear layer. `watch()` sketches the bag as Embedding's block with each token weighted, and takes the
step's batch size from the offsets (docs/capturing-gradients.md). A step here is a fraction of a millisecond,
the regime where what `watch()` adds per step weighs most (as MNIST logistic regression).

Data: the SST-2 training sentences of ../shared/data (GLUE, 67,349; `--n` the first n), lowercased and split
on whitespace, the vocabulary every word of them (unknown words never occur: the loss is the training
loss). Model: EmbeddingBag(V, `--dim`, mode="mean") + Linear(`--dim`, 2), cross-entropy. SGD lr `--lr`
momentum 0.9, batch 64, the rate decayed per step along half a cosine to 0 at the last step (`--lr`,
`--momentum`, `--schedule constant` change them; the output files then say so in their names).

Arms, per seed from the same initial weights and the same first-epoch permutation (every arm a GraBSampler
with that seed): `rr` (no hooks), `grab` and `pair` fed by `sampler.watch(model)` (its defaults). Every arm runs
the same loop: each batch's sentences gathered end to end with their offsets (vectorized, from one flat token
tensor), `loss.backward()`, `opt.step()`; `sampler.synchronize()` ends the epoch (part of its timed seconds).
The arms take each epoch in turn, rotating who goes first; each epoch's seconds over RR's same epoch is one
paired ratio. After each epoch, untimed: the mean loss over all n training sentences.

Writes OUT/watch_textbag.txt (the printed tables, with the command line at the top), OUT/watch_textbag.csv and
OUT/watch_textbag.png (loss against epochs and against training seconds, and each arm's loss minus RR's).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from torchgrab import GraBSampler  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EX = _common.load_module("torchgrab_examples_common", REPO / "examples" / "_common.py")


class TextBag(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.fc = nn.Linear(dim, 2)

    def forward(self, text: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(text, offsets))


class Corpus:
    """Every sentence's token ids end to end in one tensor, with each sentence's start and length."""

    def __init__(self, sentences: List[str]) -> None:
        words = [s.lower().split() for s in sentences]
        counts = Counter(w for ws in words for w in ws)
        index = {w: i for i, (w, _) in enumerate(counts.most_common())}
        self.vocab = len(index)
        self.lengths = torch.tensor([len(ws) for ws in words])
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths
        self.tokens = torch.tensor([index[w] for ws in words for w in ws])

    def batch(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The sentences ``idx`` end to end, and their offsets (the tutorial's collate_fn, vectorized)."""
        lengths = self.lengths[idx]
        offsets = torch.cumsum(lengths, 0) - lengths
        at = torch.repeat_interleave(self.starts[idx] - offsets, lengths)
        return self.tokens[at + torch.arange(at.shape[0])], offsets


def load_sst2(data: Optional[str], n: int) -> Tuple[Corpus, torch.Tensor]:
    """The SST-2 training sentences of the data root (the first n; 0: all) as a Corpus, and their labels."""
    texts, labels = EX.load_glue(EX.data_root(data), "SST-2", "train")
    if n:
        texts, labels = texts[:n], labels[:n]
    return Corpus([t[0] for t in texts]), torch.as_tensor(labels)


@torch.no_grad()
def full_loss(model: nn.Module, corpus: Corpus, y: torch.Tensor, batch: int = 4096) -> float:
    total = 0.0
    for i in range(0, len(y), batch):
        idx = torch.arange(i, min(i + batch, len(y)))
        total += float(F.cross_entropy(model(*corpus.batch(idx)), y[idx], reduction="sum"))
    return total / len(y)


class Arm:
    def __init__(self, name: str, seed: int, corpus: Corpus, n: int, args) -> None:
        torch.manual_seed(seed)
        self.model = TextBag(corpus.vocab, args.dim)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=args.momentum)
        self.sched = None
        if args.schedule == "cosine":
            self.sched = _common.cosine_to_zero(self.opt, args.epochs * math.ceil(n / args.batch))
        self.sampler = GraBSampler(n=n, ordering=name, seed=seed)
        kw = {} if args.sketch is None else {"sketch": args.sketch}
        self.handle = None if name == "rr" else self.sampler.watch(self.model, **kw)
        self.batch = args.batch

    def epoch(self, corpus: Corpus, y: torch.Tensor) -> float:
        model, opt = self.model, self.opt
        t0 = time.perf_counter()
        order = torch.as_tensor(np.fromiter(iter(self.sampler), dtype=np.int64, count=len(y)))
        for i in range(0, len(order), self.batch):
            idx = order[i : i + self.batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(*corpus.batch(idx)), y[idx]).backward()
            opt.step()
            if self.sched is not None:
                self.sched.step()
        self.sampler.synchronize()
        return time.perf_counter() - t0


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help=f"data root in the layout of ../shared/data ({EX.DEFAULT_DATA})")
    ap.add_argument("--n", type=int, default=0, help="training sentences (the first n; 0: all 67,349)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--arms", default="rr,grab,pair", help="comma-separated, rr first: rr, grab, pair")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument(
        "--schedule", choices=("cosine", "constant"), default="cosine", help="per-step cosine decay to 0, or constant"
    )
    ap.add_argument("--sketch", type=int, default=None, help="watch(sketch=...) (default: watch()'s own, 32)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out; with --quick a temp folder)")
    ap.add_argument("--quick", action="store_true", help="1,000 sentences, 2 epochs, 1 seed: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.epochs, args.seeds = 1000, 2, 1
    arms = _common.rotation_setup(ap, args, "watch_textbag")
    name = "watch_textbag" + "".join(
        f"_{k}{v:g}" if isinstance(v, float) else f"_{k}{v}"
        for k, v, default in (("sketch", args.sketch, None), ("momentum", args.momentum, 0.9), ("lr", args.lr, 0.5))
        if v != default
    )
    name += "_constant" if args.schedule == "constant" else ""

    out = _common.begin_result("watch() on an EmbeddingBag text classifier (SST-2): GraB against RR")
    corpus, y = load_sst2(args.data, args.n)
    n = len(y)
    d = sum(p.numel() for p in TextBag(corpus.vocab, args.dim).parameters())
    title = (
        f"SST-2 EmbeddingBag(mean) + Linear (vocabulary {corpus.vocab:,}, d = {d:,}), {n:,} sentences "
        f"({int(corpus.lengths.sum()):,} tokens), SGD lr {args.lr}{' cosine to 0' if args.schedule == 'cosine' else ''} "
        f"m {args.momentum:g}, batch {args.batch}, "
        f"{args.epochs} epochs, {args.seeds} seeds, {args.threads} torch thread(s), "
        f"sketch {'default' if args.sketch is None else args.sketch}"
    )
    runs = (
        lambda s: {a: Arm(a, s, corpus, n, args) for a in arms},
        lambda r: r.epoch(corpus, y),
        lambda r: full_loss(r.model, corpus, y),
    )
    what = "cross-entropy over the n sentences"
    _common.rotation_study(out, args, arms, name, title, runs, what, digits=5, ylabel="cross-entropy")


if __name__ == "__main__":
    main()
