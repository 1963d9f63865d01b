"""What exact GraB costs on a wide MLP when its Linear layers are balanced by the ghost form
(`watch(sketch="ghost")`: each example's weight gradient g_b a_b^T is never formed; the sign scan reads
B x B Gram products of the factors, and the running sums are updated by weight-sized products) against the
other ways to balance the same training loop, on this CPU.

    .venv/bin/python benchmarks/watch_ghost.py [--part cost|loss] [--hidden 1024] [--steps 100] [--rounds 5]
        [--orderings grab,pair] [--threads 1] [--no-reference] [--epochs 4] [--seeds 3] [--quick]

Model: MNIST (60,000 images), an MLP 784-H-H-10 with ReLU, batch 64, SGD lr 0.01 momentum 0.9, torch on
--threads threads. Arms, all the same loop (`loss.backward()`, `opt.step()`), only the sampler and the watch
differ:

- rr: `torch.randperm` order, nothing watched;
- watch(): the default sketch (k = 32 per factor, budget 0.25): inexact rows, K numbers per example;
- watch(sketch="ghost"): exact, from the factors (the biases' small gradients go in the rows);
- watch(sketch=None): exact per-example rows, d numbers per example, formed from the same hooks;
- grab-sampler 0.1.3 recipe (grab only): the reference implementation's documented loop, per-example
  gradients by torch.func vmap, then its sampler.step.

Paired rounds: each round runs --steps steps of every arm, in alternating order, and each arm's time over
the rr time of the same round; medians and quartiles over rounds. The per-step memory each arm adds is
computed, not measured: B x K or B x d rows, or B + B^2 inner products, the bias rows and the factors
(each ghost layer's output gradients and a copy of its input, held from the backward to the next
forward). The machine's memory read bandwidth is printed, since the exact rows are bound by it.

Part "loss" (--part loss): what exactness buys over the sketch on this model. rr, grab with watch() (the
sketch) and grab with watch(sketch="ghost") (exact) train side by side from the same initial weights,
--epochs epochs of all 60,000 images, --seeds seeds; the full training loss after each epoch, and per
seed and epoch the share of exact GraB's gain over rr that the sketch keeps, (rr - sketch) / (rr - ghost).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import torchgrab  # noqa: E402
import torchgrab.capture  # noqa: E402
from end_to_end import load_mnist  # noqa: E402

BATCH = 64
SKETCHES = {"watch()": torchgrab.capture.DEFAULT_SKETCH, 'watch(sketch="ghost")': "ghost", "watch(sketch=None)": None}
REFERENCE = "grab-sampler 0.1.3 recipe"


def make_model(hidden, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class Arm:
    def __init__(self, name, ordering, x, y, hidden, grabsampler=None, seed=0):
        self.name, self.x, self.y = name, x, y
        self.model = make_model(hidden, seed)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.gen = torch.Generator().manual_seed(seed)
        self.sampler = self.handle = self.ref = None
        self.order: list = []
        if name in SKETCHES:
            self.sampler = torchgrab.GraBSampler(n=len(x), ordering=ordering, seed=seed)
            self.handle = self.sampler.watch(self.model, sketch=SKETCHES[name])
        elif name == REFERENCE:
            self._reference(grabsampler)

    def _reference(self, grabsampler):
        from functools import partial

        from torch.func import functional_call, grad_and_value, vmap

        self.params = {k: v.detach() for k, v in self.model.named_parameters()}
        self.opt = torch.optim.SGD(self.params.values(), lr=0.01, momentum=0.9)
        self.ref = grabsampler.GraBSampler(range(len(self.x)), self.params, device="cpu")

        def compute_loss(params, inputs, targets):
            out = functional_call(self.model, params, (inputs.unsqueeze(0),))
            return nn.functional.cross_entropy(out, targets.unsqueeze(0))

        self.per_sample = vmap(grad_and_value(partial(compute_loss)), in_dims=(None, 0, 0))

    def _next(self):
        """The next batch of this arm's order (a new epoch's order when the last one is used up)."""
        if len(self.order) < BATCH:
            if self.sampler is not None:
                self.order = list(self.sampler)
            elif self.ref is not None:
                self.order = list(iter(self.ref))
            else:
                self.order = torch.randperm(len(self.x), generator=self.gen).tolist()
        idx, self.order = self.order[:BATCH], self.order[BATCH:]
        return self.x[idx], self.y[idx]

    def run(self, steps):
        batches = [self._next() for _ in range(steps)]  # slicing is not what is measured
        t0 = time.perf_counter()
        for xb, yb in batches:
            self.opt.zero_grad(set_to_none=True)
            if self.ref is not None:
                grads, _ = self.per_sample(self.params, xb, yb)
                self.ref.step(grads)
                for k, p in self.params.items():
                    p.grad = grads[k].mean(0)
            else:
                nn.functional.cross_entropy(self.model(xb), yb).backward()
            self.opt.step()
        if self.handle is not None:
            self.handle.flush()  # the last step balanced: part of the time
            self.sampler.synchronize()
        return time.perf_counter() - t0


def added_bytes(name, handle, d):
    """Per step, what balancing holds beyond the training step itself."""
    if name == "rr":
        return 0
    if name == 'watch(sketch="ghost")':
        # Inner products; bias rows; each ghost layer's factors G and A (a copy of its input), held from the
        # backward until the step is balanced at the next forward.
        factors = sum(sk.in_f + sk.out_f for sk in handle._ghosts)
        return 8 * (BATCH + BATCH * BATCH) + 4 * BATCH * (handle._row_width + factors)
    if name == REFERENCE:
        return 4 * BATCH * d
    return 4 * BATCH * handle.width


def full_loss(model, x, y):
    with torch.no_grad():
        return sum(
            float(nn.functional.cross_entropy(model(x[k : k + 4096]), y[k : k + 4096], reduction="sum"))
            for k in range(0, len(x), 4096)
        ) / len(x)


def part_loss(x, y, args, out):
    arms = ["rr", "watch()", 'watch(sketch="ghost")']
    steps = len(x) // BATCH
    losses = {}  # (arm, seed) -> full training loss after each epoch
    for seed in range(args.seeds):
        # Every arm of a seed starts from the seed's weights; the two grab arms share their first order.
        runs = {a: Arm(a, "grab", x, y, args.hidden, seed=seed) for a in arms}
        for e in tqdm(range(args.epochs), desc=f"seed {seed}", leave=False, file=sys.stderr):
            for a in arms if e % 2 == 0 else arms[::-1]:
                runs[a].run(steps)
                losses.setdefault((a, seed), []).append(full_loss(runs[a].model, x, y))
    out.line(
        f"\n## Full training loss after each epoch: MLP 784-{args.hidden}-{args.hidden}-10, {len(x):,} images, "
        f"batch {BATCH}, SGD lr 0.01 momentum 0.9, {args.seeds} seeds, load {_common.load_average()}"
    )
    out.line(f"{'epoch':>5} " + " ".join(f"{a:>22}" for a in arms) + f" {'kept by the sketch, per seed':>32}")
    kept_all = []
    for e in range(args.epochs):
        means = [np.mean([losses[(a, s)][e] for s in range(args.seeds)]) for a in arms]
        kept = []
        for s in range(args.seeds):
            rr, sk, gh = (losses[(a, s)][e] for a in arms)
            kept.append((rr - sk) / (rr - gh) if rr != gh else float("nan"))
        if e >= 1:  # from epoch 2 on
            kept_all += kept
        out.line(f"{e + 1:>5} " + " ".join(f"{m:>22.5f}" for m in means) + f" {' '.join(f'{k:.2f}' for k in kept):>32}")
    out.line(
        "grab (ghost, exact) - rr after the last epoch, per seed: "
        + ", ".join(f"{losses[(arms[2], s)][-1] - losses[('rr', s)][-1]:+.5f}" for s in range(args.seeds))
    )
    out.line(
        "grab (sketch) - rr after the last epoch, per seed: "
        + ", ".join(f"{losses[(arms[1], s)][-1] - losses[('rr', s)][-1]:+.5f}" for s in range(args.seeds))
    )
    if kept_all:
        out.line(
            f"kept by the sketch from epoch 2 on: median {np.nanmedian(kept_all):.2f}, min {np.nanmin(kept_all):.2f}"
        )
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "watch_ghost_loss.txt")
        out.save(path)
        print(f"# written: {path}")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=100, help="steps per arm and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--orderings", default="grab,pair")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-reference", action="store_true", help="leave out the grab-sampler 0.1.3 arm")
    ap.add_argument("--part", choices=["cost", "loss"], default="cost")
    ap.add_argument("--epochs", type=int, default=4, help="part loss: epochs")
    ap.add_argument("--seeds", type=int, default=3, help="part loss: seeds")
    ap.add_argument("--quick", action="store_true", help="hidden 64, 3 steps, 2 rounds: a smoke run")
    ap.add_argument("--out", default=os.path.join(here, "out"))
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.steps, args.rounds, args.epochs, args.seeds = 64, 3, 2, 2, 2
    torch.set_num_threads(args.threads)
    out = _common.begin_result("watch(sketch='ghost'): exact GraB from the factors, against sketched and exact rows")
    x, y = load_mnist(args.data)
    if args.quick:
        x, y = x[:2048], y[:2048]
    if args.part == "loss":
        part_loss(x, y, args, out)
        return
    grabsampler = None
    if not args.no_reference:
        try:
            grabsampler, shims = _common.import_reference()
            out.line(f"# reference: grab-sampler 0.1.3; shims (its algorithm untouched): {'; '.join(shims) or 'none'}")
        except ImportError as e:
            out.line(f"# reference not importable: {e}")
    d = sum(p.numel() for p in make_model(args.hidden).parameters())
    for ordering in args.orderings.split(","):
        arms = ["rr", *SKETCHES]
        if grabsampler is not None and ordering == "grab":
            arms.append(REFERENCE)
        runs = {a: Arm(a, ordering, x, y, args.hidden, grabsampler) for a in arms}
        for a in arms:  # warm-up: allocator, projections, the first epoch's order
            runs[a].run(min(3, args.steps))
        secs = {a: [] for a in arms}
        for r in tqdm(range(args.rounds), desc=ordering, leave=False, file=sys.stderr):
            for a in arms if r % 2 == 0 else arms[::-1]:
                secs[a].append(runs[a].run(args.steps))
        out.line(
            f"\n## {ordering}: MLP 784-{args.hidden}-{args.hidden}-10 (d = {d:,}), batch {BATCH}, "
            f"{args.threads} torch thread(s), {args.rounds} paired rounds of {args.steps} steps, load {_common.load_average()}"
        )
        out.line(
            f"{'arm':<28} {'K or d':>10} {'ms/step':>9} {'x RR median':>12} {'x RR quartiles':>15} {'added MB/step':>14}"
        )
        rr = np.array(secs["rr"])
        for a in arms:
            t = np.array(secs[a])
            q1, q2, q3 = np.percentile(t / rr, [25, 50, 75])
            h = runs[a].handle
            k = "" if a == "rr" else f"{d:,}" if a == REFERENCE else f"{h.width:,}"
            mb = added_bytes(a, h, d) / 1e6
            out.line(
                f"{a:<28} {k:>10} {np.median(t) / args.steps * 1e3:>9.2f} {q2:>12.2f} {f'{q1:.2f}-{q3:.2f}':>15} {mb:>14.2f}"
            )
    os.makedirs(args.out, exist_ok=True)
    if not args.quick:
        path = os.path.join(args.out, "watch_ghost.txt")
        out.save(path)
        print(f"# written: {path}")


if __name__ == "__main__":
    main()
