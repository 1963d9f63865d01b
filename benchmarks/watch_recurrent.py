"""GraB through `sampler.watch(model)` on a recurrent text classifier: an LSTM (or GRU) over packed sentences.

    .venv/bin/python benchmarks/watch_recurrent.py                 # out/watch_recurrent.{txt,csv,png}
    .venv/bin/python benchmarks/watch_recurrent.py --kind GRU      # out/watch_recurrent_GRU.*
    .venv/bin/python benchmarks/watch_recurrent.py --layers 2 --dropout 0.5   # out/watch_recurrent_2layers.*
    .venv/bin/python benchmarks/watch_recurrent.py --quick         # a smoke run of a few seconds
    .venv/bin/python benchmarks/watch_recurrent.py --layer         # the layer alone: out/watch_recurrent_layer.txt

The classic recurrent sentence classifier: word embeddings, a one-layer LSTM over each sentence (the batch
padded to its longest sentence and packed with `pack_padded_sequence`, so padding is never read), and a
Linear layer on the final hidden state. torch's recurrent kernels keep no per-step gradients and torch.func
has no batching rule for them; `watch()` replays the layer step by step inside the backward to get each
example's rows (capture/recurrent.py), so a GraB step costs about one more forward and backward of the
recurrent layer. This script measures what that costs and what the order gains, against RR, in one run.

Data: the SST-2 training sentences of ../shared/data (GLUE, 67,349; `--n` the first n), lowercased and split
on whitespace, the vocabulary every word of them (the loss is the training loss). Model: Embedding(V, `--dim`,
padding id 0) + `--kind`(`--dim`, `--hidden`, `--layers` layers, `--dropout` between them) + Linear(`--hidden`,
2) on the last layer's final state, cross-entropy (the losses after each epoch with dropout off). SGD lr `--lr` momentum
0.9, batch 64, the rate decayed per step along half a cosine to 0 at the last step.

Arms, per seed from the same initial weights and the same first-epoch permutation (every arm a GraBSampler
with that seed): `rr` (no hooks), `grab` and `pair` fed by `sampler.watch(model)` (its defaults). The arms take
each epoch in turn, rotating who goes first; each epoch's seconds over RR's same epoch is one paired ratio.
After each epoch, untimed: the mean loss over all n training sentences.

`--layer`: what the replay costs against the layer's own step, the recurrent layer alone (no model, no
sampler): a forward and backward of `--kind` through torch's kernel, and the same with the layer's rows
formed from its tap (the `watch()` sketch's own code, default sketch), for a few shapes of batch, length
and width, unpacked and packed (lengths uniform from 1 to T), paired rounds alternating the two. The last
shape has two layers with dropout 0.5 between them, which `watch()` runs one layer at a time to draw the
dropout itself: its plain step is torch's two-layer kernel with its own dropout.

Writes OUT/watch_recurrent[_GRU].txt (the printed tables, with the command line at the top), .csv and .png
(loss against epochs and against training seconds, and each arm's loss minus RR's).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from torchgrab import GraBSampler  # noqa: E402
from watch_textbag import EX, Corpus, load_sst2  # noqa: E402


class RecurrentClassifier(nn.Module):
    def __init__(self, kind: str, vocab: int, dim: int, hidden: int, layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab + 1, dim, padding_idx=0)
        self.rnn = getattr(nn, kind)(dim, hidden, layers, batch_first=True, dropout=dropout)
        self.fc = nn.Linear(hidden, 2)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = pack_padded_sequence(self.emb(ids), lengths, batch_first=True, enforce_sorted=False)
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.fc(h[-1])


def padded(corpus: Corpus, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The sentences ``idx`` as ids [B, longest] (word ids shifted by one; 0 pads) and their lengths."""
    lengths = corpus.lengths[idx].clamp_min(1)  # (an empty sentence reads one padding id)
    t = int(lengths.max())
    at = corpus.starts[idx][:, None] + torch.arange(t)
    inside = torch.arange(t) < corpus.lengths[idx][:, None]
    ids = torch.where(inside, corpus.tokens[at.clamp_max(len(corpus.tokens) - 1)] + 1, 0)
    return ids, lengths


@torch.no_grad()
def full_loss(model: nn.Module, corpus: Corpus, y: torch.Tensor, batch: int = 2048) -> float:
    model.eval()  # (dropout between stacked layers off)
    total = 0.0
    for i in range(0, len(y), batch):
        idx = torch.arange(i, min(i + batch, len(y)))
        total += float(F.cross_entropy(model(*padded(corpus, idx)), y[idx], reduction="sum"))
    model.train()
    return total / len(y)


class Arm:
    def __init__(self, name: str, seed: int, corpus: Corpus, n: int, args) -> None:
        torch.manual_seed(seed)
        self.model = RecurrentClassifier(args.kind, corpus.vocab, args.dim, args.hidden, args.layers, args.dropout)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9)
        self.sched = _common.cosine_to_zero(self.opt, args.epochs * math.ceil(n / args.batch))
        self.sampler = GraBSampler(n=n, ordering=name, seed=seed)
        self.handle = None if name == "rr" else self.sampler.watch(self.model)
        self.batch = args.batch

    def epoch(self, corpus: Corpus, y: torch.Tensor) -> float:
        model, opt = self.model, self.opt
        t0 = time.perf_counter()
        order = torch.as_tensor(np.fromiter(iter(self.sampler), dtype=np.int64, count=len(y)))
        for i in range(0, len(order), self.batch):
            idx = order[i : i + self.batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(*padded(corpus, idx)), y[idx]).backward()
            opt.step()
            self.sched.step()
        self.sampler.synchronize()
        return time.perf_counter() - t0


def layer_costs(out: "_common.Out", kind: str, rounds: int) -> None:
    """The layer's step with its rows over its plain step, per shape (see the docstring, ``--layer``)."""
    from torchgrab.capture.recurrent import RecurrentSketch, install_stacked

    out.line(f"\n{kind} alone: forward + backward with the rows formed over without, median of {rounds} paired rounds")
    out.line(f"{'B':>4} {'T':>5} {'in':>5} {'hidden':>6} {'layers':>6} {'input':>8} {'plain ms':>9} {'with rows':>10}")
    g = torch.Generator().manual_seed(0)
    shapes = ((64, 30, 64, 64, 1), (32, 256, 128, 128, 1), (32, 64, 256, 256, 1), (32, 64, 128, 128, 2))
    for b, t, d_in, hidden, layers in shapes:
        # Two layers: with dropout 0.5 between them, which watch() draws itself, running the layers one at a
        # time (StackedDropoutForward); the plain step is torch's kernel with its own dropout.
        layer = getattr(nn, kind)(d_in, hidden, layers, batch_first=True, dropout=0.5 if layers > 1 else 0.0)
        sk = RecurrentSketch("rnn", layer, 32, 0)
        if layers > 1:
            install_stacked(layer, None, lambda: True)
        x = torch.randn(b, t, d_in, generator=g)
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        for packed in (False, True):
            inp = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False) if packed else x

            def step(rows: bool) -> None:
                res = layer(inp) if rows else type(layer).forward(layer, inp)
                if rows:
                    call = sk.save(layer, (inp, None))

                    def hook(grads: Tuple[Optional[torch.Tensor], ...]) -> None:
                        call.grads = grads
                        with torch.no_grad():
                            sk.rows(layer, call, None)

                    res, _, _ = sk.tap(layer, res, hook)
                y = res[0].data if packed else res[0]
                (y.sum() + res[1][0].sum() if kind == "LSTM" else y.sum() + res[1].sum()).backward()

            ratios, plain = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                step(False)
                t1 = time.perf_counter()
                step(True)
                t2 = time.perf_counter()
                ratios.append((t2 - t1) / (t1 - t0))
                plain.append(t1 - t0)
            name = "packed" if packed else "tensor"
            out.line(
                f"{b:>4} {t:>5} {d_in:>5} {hidden:>6} {layers:>6} {name:>8} {1e3 * np.median(plain):>9.1f} "
                f"{np.median(ratios):>10.2f}"
            )


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help=f"data root in the layout of ../shared/data ({EX.DEFAULT_DATA})")
    ap.add_argument("--kind", choices=("LSTM", "GRU", "RNN"), default="LSTM")
    ap.add_argument("--n", type=int, default=0, help="training sentences (the first n; 0: all 67,349)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--arms", default="rr,grab,pair", help="comma-separated, rr first: rr, grab, pair")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1, help="stacked layers of the recurrent layer")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout between the stacked layers")
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out; with --quick a temp folder)")
    ap.add_argument("--quick", action="store_true", help="600 sentences, 2 epochs, 1 seed: a smoke run")
    ap.add_argument("--layer", action="store_true", help="the layer alone: the replay's cost against its step")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.epochs, args.seeds = 600, 2, 1
    arms = _common.rotation_setup(ap, args, "watch_recurrent")
    name = "watch_recurrent" + ("" if args.kind == "LSTM" else f"_{args.kind}")
    if args.layers > 1 and not args.layer:
        name += f"_{args.layers}layers"
    if args.layer:
        out = _common.begin_result(f"watch() on a {args.kind} layer alone: the replay against the layer's step")
        layer_costs(out, args.kind, 3 if args.quick else 15)
        out.line(f"\n# load average now {_common.load_average()}")
        out.save(os.path.join(args.out, f"{name}_layer.txt"))
        print(f"# wrote {args.out}/{name}_layer.txt")
        return

    out = _common.begin_result(f"watch() on a {args.kind} text classifier (SST-2): GraB against RR")
    corpus, y = load_sst2(args.data, args.n)
    n = len(y)
    d = sum(
        p.numel() for p in RecurrentClassifier(args.kind, corpus.vocab, args.dim, args.hidden, args.layers).parameters()
    )
    stack = f", {args.layers} layers, dropout {args.dropout:g} between" if args.layers > 1 else ""
    title = (
        f"SST-2 Embedding + {args.kind}({args.dim}, {args.hidden}{stack}) + Linear (vocabulary {corpus.vocab:,}, "
        f"d = {d:,}), {n:,} sentences (mean length {float(corpus.lengths.float().mean()):.1f} tokens, packed), "
        f"SGD lr {args.lr} cosine to 0 m 0.9, batch {args.batch}, {args.epochs} epochs, {args.seeds} seeds, "
        f"{args.threads} torch thread(s), watch() defaults"
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
