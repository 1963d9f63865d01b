"""GraB through `sampler.watch(model)` on a convolutional autoencoder: transposed convolutions in the loop.

    .venv/bin/python benchmarks/watch_decoder.py                  # out/watch_decoder.{txt,csv,png}
    .venv/bin/python benchmarks/watch_decoder.py --budget 1.0     # every weight sketched (out/watch_decoder_budget1.*)
    .venv/bin/python benchmarks/watch_decoder.py --quick          # a smoke run of a few seconds

A U-Net's or an autoencoder's decoder upsamples with `nn.ConvTranspose2d`, which `watch()` sketches as the
block of the convolution it is the adjoint of (docs/capturing-gradients.md). This script trains such a model
with each ordering and reports what a user would look at: the training loss per epoch and per second, what a
watched epoch costs against an RR epoch, and the time GraB needs to reach RR's final loss.

Model: encoder Conv2d(1, 16, 3, stride 2) + ReLU, Conv2d(16, 32, 3, stride 2) + ReLU (28x28 -> 7x7); decoder
ConvTranspose2d(32, 16, 3, stride 2, output padding 1) + ReLU, ConvTranspose2d(16, 1, 3, stride 2, output
padding 1) (7x7 -> 28x28), per-pixel logits. Loss: binary cross-entropy of the logits against the image's
pixels (in [0, 1]), mean over pixels and batch. Data: the first `--n` MNIST training images of ../shared/data
(default all 60,000). SGD lr `--lr` momentum 0.9, batch 64, the rate decayed per step along half a cosine to
0 at the last step (`--schedule constant` keeps it), every arm the same schedule.

Arms, per seed from the same initial weights and the same first-epoch permutation (every arm a GraBSampler
with that seed): `rr` (ordering="rr", no hooks), `grab` and `pair` fed by `sampler.watch(model,
budget=--budget)` (default: watch()'s own default budget). Every arm runs the same loop: the sampler's order
in index slices of the in-memory images, `loss.backward()`, `opt.step()`; `sampler.synchronize()` ends the
epoch (part of its timed seconds). Within a seed the arms take each epoch in turn, rotating who goes first,
so a slow spell of this shared machine falls on all of them; each epoch's seconds over RR's same epoch is
one paired ratio. After each epoch, untimed: the mean loss over all n training images.

Writes OUT/watch_decoder.txt (the printed tables, with the command line at the top), OUT/watch_decoder.csv (one
row per arm, seed and epoch) and OUT/watch_decoder.png (loss against epochs and against training seconds, and
each arm's loss minus RR's); `--replot OUT/watch_decoder.csv` draws the plot again from a run's CSV.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from torchgrab import GraBSampler  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
YLABEL = "per-pixel BCE"
EX = _common.load_module("torchgrab_examples_common", REPO / "examples" / "_common.py")


class ConvAutoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.dec = nn.Sequential(
            nn.ConvTranspose2d(32, 16, 3, 2, 1, output_padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(16, 1, 3, 2, 1, output_padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


def loss_fn(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, x)


@torch.no_grad()
def full_loss(model: nn.Module, x: torch.Tensor, batch: int = 2000) -> float:
    total = sum(
        float(F.binary_cross_entropy_with_logits(model(x[i : i + batch]), x[i : i + batch], reduction="sum"))
        for i in range(0, len(x), batch)
    )
    return total / x.numel()


class Arm:
    def __init__(self, name: str, seed: int, n: int, args) -> None:
        torch.manual_seed(seed)
        self.model = ConvAutoencoder()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9)
        self.sched = None
        if args.schedule == "cosine":
            self.sched = _common.cosine_to_zero(self.opt, args.epochs * math.ceil(n / args.batch))
        self.sampler = GraBSampler(n=n, ordering=name, seed=seed)
        self.handle = None
        if name != "rr":
            kw = {} if args.budget is None else {"budget": args.budget}
            self.handle = self.sampler.watch(self.model, **kw)
        self.batch = args.batch

    def epoch(self, x: torch.Tensor) -> float:
        model, opt = self.model, self.opt
        t0 = time.perf_counter()
        order = torch.as_tensor(np.fromiter(iter(self.sampler), dtype=np.int64, count=len(x)))
        for i in range(0, len(order), self.batch):
            b = x[order[i : i + self.batch]]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(b), b).backward()
            opt.step()
            if self.sched is not None:
                self.sched.step()
        self.sampler.synchronize()
        return time.perf_counter() - t0


def replot(csv_path: str) -> None:
    """The plot again from a run's CSV (next to it, same name): no training."""
    rows = EX.read_csv(csv_path)  # (numbers parsed)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    seeds = 1 + max(r["seed"] for r in rows)
    epochs = 1 + max(r["epoch"] for r in rows)
    loss = {a: np.full((seeds, epochs), np.nan) for a in arms}
    secs = {a: np.zeros((seeds, epochs)) for a in arms}
    for r in rows:
        loss[r["arm"]][r["seed"], r["epoch"]] = r["train_loss"]
        secs[r["arm"]][r["seed"], r["epoch"]] = r["epoch_seconds"]
    folder, base = os.path.split(os.path.abspath(csv_path))
    name = os.path.splitext(base)[0]
    title = f"{name}: {seeds} seeds, {epochs - 1} epochs"
    txt = os.path.join(folder, f"{name}.txt")  # the run's settings line, when its .txt is there
    if os.path.exists(txt):
        with open(txt) as f:
            title = next((ln[2:].strip() for ln in f if ln.startswith("# MNIST conv autoencoder")), title)
    _common.plot_against_rr(folder, name, arms, loss, secs, title, YLABEL)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help=f"data root in the layout of ../shared/data ({EX.DEFAULT_DATA})")
    ap.add_argument("--n", type=int, default=60000, help="training images (the first n)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--arms", default="rr,grab,pair", help="comma-separated, rr first: rr, grab, pair")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument(
        "--schedule",
        choices=("cosine", "constant"),
        default="cosine",
        help="learning rate: per-step cosine decay to 0 at the last step (as the ResNet study), or constant",
    )
    ap.add_argument("--budget", type=float, default=None, help="watch(budget=...) (default: watch()'s own)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out; with --quick a temp folder)")
    ap.add_argument("--quick", action="store_true", help="512 images, 2 epochs, 1 seed: a smoke run")
    ap.add_argument("--replot", metavar="CSV", help="only draw the plot again from a run's CSV, next to it")
    args = ap.parse_args(argv)
    if args.replot:
        replot(args.replot)
        return
    if args.quick:
        args.n, args.epochs, args.seeds = 512, 2, 1
    arms = _common.rotation_setup(ap, args, "watch_decoder")
    name = "watch_decoder" if args.budget is None else f"watch_decoder_budget{args.budget:g}"

    out = _common.begin_result("watch() on a convolutional autoencoder (transposed convolutions): GraB against RR")
    (xtr, _), _ = EX.load_mnist(EX.data_root(args.data))
    x = torch.tensor(xtr[: args.n]).float().div(255.0).unsqueeze(1).contiguous()
    d = sum(p.numel() for p in ConvAutoencoder().parameters())
    title = (
        f"MNIST conv autoencoder (d = {d:,}), {len(x):,} images, SGD lr {args.lr}"
        f"{' cosine to 0' if args.schedule == 'cosine' else ''} m 0.9, batch {args.batch}, "
        f"{args.epochs} epochs, {args.seeds} seeds, {args.threads} torch thread(s), "
        f"budget {'default' if args.budget is None else args.budget}"
    )
    runs = (lambda s: {a: Arm(a, s, len(x), args) for a in arms}, lambda r: r.epoch(x), lambda r: full_loss(r.model, x))
    what = "per-pixel binary cross-entropy over the n images"
    _common.rotation_study(out, args, arms, name, title, runs, what, digits=6, ylabel=YLABEL)


if __name__ == "__main__":
    main()
