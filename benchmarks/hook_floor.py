"""What a layer's hooks cost before they do anything: the floor under any capture of per-example rows
from module hooks, against what `watch()` adds on the same model.

    .venv/bin/python benchmarks/hook_floor.py [--layers 48] [--width 64] [--batch-size 8] [--tokens 16]
        [--steps 40] [--rounds 9] [--threads 1] [--device cpu] [--quick]

A stack of --layers Linear layers (--width wide, tanh between them) on [batch, tokens, width] inputs and a
3-way head on the first token, cross-entropy, `loss.backward()`, no optimizer: at these sizes a step is
short enough that a hook's dispatch shows (as on a GPU, where the kernels run asynchronously and a step's
CPU time is its Python and dispatch). Arms, each on its own copy of the model, timed in paired rounds
of --steps steps, arms alternating in order from round to round:

- plain: no hooks;
- empty forward hook: a forward hook on each layer that returns at once (a module with a hook takes
  `nn.Module`'s slower call path);
- forward hook + node pre-hook: what `watch()` registers per layer and call, both empty: the forward
  hook puts a pre-hook on the autograd node that made the layer's output, which the backward calls
  with the output's gradient (Python, on the engine's thread);
- forward hook + retain_grad: the engine's own way to keep an output's gradient, no Python in the
  backward (the gradient is stored in the output's `.grad`, read after the backward);
- watch(sketch=4), watch(): `GraBSampler(ordering="grab").watch(model)`, the rows formed and balanced.

Each arm's step time, x plain (median and quartiles over rounds), and what it adds per layer. With
--device cuda (`scripts/gpu_watch.sh` runs it so) the model and the batch are on the GPU, and a run's time
ends when the device and the sampler are done: there a small model's step is the CPU's dispatch, and the
floor of the hooks is most of what `watch()` can cost.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as B  # noqa: E402
import torchgrab  # noqa: E402
from torchgrab.capture.eager import eager  # noqa: E402


class Stack(nn.Module):
    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x[:, 0])


def _hook_every_layer(model: nn.Module, hook) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(eager(hook))  # eager(): as watch() wraps its hooks


def _empty_pre(grads):
    return None


def _with_pre_hook(module, args, out):
    out.grad_fn.register_prehook(_empty_pre)


class Arm:
    def __init__(self, kind: str, args, x: torch.Tensor, y: torch.Tensor) -> None:
        torch.manual_seed(0)
        self.model = Stack(args.layers, args.width).to(x.device)
        self.x, self.y, self.steps, self.kept = x, y, args.steps, []
        self.sampler = None
        if kind == "empty forward hook":
            _hook_every_layer(self.model, lambda m, a, o: None)
        elif kind == "forward hook + node pre-hook":
            _hook_every_layer(self.model, _with_pre_hook)
        elif kind == "forward hook + retain_grad":

            def keep(m, a, o):
                o.retain_grad()
                self.kept.append(o)

            _hook_every_layer(self.model, keep)
        elif kind.startswith("watch"):
            # One epoch of the sampler per timed run: --steps batches.
            self.sampler = torchgrab.GraBSampler(n=args.steps * x.shape[0], ordering="grab", seed=0)
            sketch = 4 if kind == "watch(sketch=4)" else torchgrab.capture.DEFAULT_SKETCH
            self.handle = self.sampler.watch(self.model, sketch=sketch)

    def epoch(self) -> float:
        b = self.x.shape[0]
        it = iter(self.sampler) if self.sampler is not None else None
        t = time.perf_counter()
        for _ in range(self.steps):
            if it is not None:
                for _ in range(b):  # the batch's indices, as a DataLoader draws them (the same inputs each step)
                    next(it)
            F.cross_entropy(self.model(self.x), self.y).backward()
            for p in self.model.parameters():
                p.grad = None
            self.kept.clear()  # (retain_grad's outputs and their .grad, read here by a capture)
        if self.sampler is not None:
            self.sampler.synchronize()
        if self.x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t


ARMS = [
    "plain",
    "empty forward hook",
    "forward hook + node pre-hook",
    "forward hook + retain_grad",
    "watch(sketch=4)",
    "watch()",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40, help="steps per timed run")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is lent")
    ap.add_argument("--quick", action="store_true", help="4 layers, 4 steps, 2 rounds: a smoke run")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "hook_floor.txt"))
    args = ap.parse_args()
    if args.quick:
        args.layers, args.steps, args.rounds = 4, 4, 2
    torch.set_num_threads(args.threads)
    out = B.begin_result("the floor of hooks: what a layer's hooks cost before they do anything")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, args.tokens, args.width, generator=g).to(args.device)
    y = torch.randint(0, 3, (args.batch_size,), generator=g).to(args.device)
    runs = {kind: Arm(kind, args, x, y) for kind in ARMS}
    hooked = args.layers + 1  # the head too
    out.line(
        f"# {args.layers} Linear layers of width {args.width} and a head; batch {args.batch_size} x "
        f"{args.tokens} tokens; {args.device}, {args.threads} torch thread(s); watch() rows K = {runs['watch()'].handle.width}, "
        f"K = {runs['watch(sketch=4)'].handle.width} at sketch=4"
    )
    secs = B.paired_epochs(runs, args.rounds)
    plain = np.asarray(secs["plain"])
    out.line(f"\n## {args.rounds} paired rounds of {args.steps} steps")
    out.line(f"{'arm':30s} {'ms/step':>8s} {'x plain':>8s} {'quartiles':>12s} {'us/layer added':>15s}")
    for kind, s in secs.items():
        s = np.asarray(s)
        r = s / plain
        q1, med, q3 = np.percentile(r, [25, 50, 75])
        added = 1e6 * (np.median(s) - np.median(plain)) / args.steps / hooked
        out.line(f"{kind:30s} {1e3 * np.median(s) / args.steps:8.2f} {med:8.3f} {q1:6.3f}-{q3:.3f} {added:15.1f}")
    out.line(f"# load average at end: {B.load_average()}")
    out.save(args.out)


if __name__ == "__main__":
    main()
