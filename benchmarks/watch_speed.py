"""What `sampler.watch(model)` costs and buys, in wall-clock time, on this CPU.

    .venv/bin/python benchmarks/watch_speed.py [--part cost|loss|kernels|both] [--threads 1 2] [--rounds 8]
        [--tasks mnist,lenet] [--arms watch,watch torch ops,watch budget=1.0,...] [--quick]

Part "cost": paired rounds of one training epoch each, plain random reshuffling (RR: `shuffle=True`-style
random order, ordinary `loss.backward()`) against GraB with `sampler.watch(model)` (the same loop; only the
sampler and the watch differ), in alternating order within a round; each round's GraB/RR ratio, then the
median and quartiles over rounds. Also `watch()` with its Rust CPU kernels for Linear rows switched off
("watch torch ops": the torch ops they replaced, measured in the same run), `watch(sketch=None)` (exact
per-example rows from the same hooks), the earlier `sampler.backward(method="hooks", non_blocking=True)`
path, `watch(non_blocking=True)` and `watch(non_blocking=False)` ("watch background", "watch blocking": by
default watch() balances in the background only when a core is free for it), "rr + empty hooks" (RR with
the hooks `watch()` registers, doing nothing: the floor of any capture from module and tensor hooks, since
a small model's step is short enough to notice their dispatch), "rr via sampler" (RR drawn by
`GraBSampler(ordering="rr")` instead of `randperm`: what iterating the sampler costs), "watch no
balancing" (`watch()` forming its rows as always, their examples then skipped instead of balanced: the
capture alone) and, on request, `watch(budget=B)` ("watch budget=B": on LeNet the budget decides whether the
convolutions' weights are sketched; the K and the weights left out of each are printed). MNIST logistic
regression on all 60,000 images and LeNet-5 on a seeded CIFAR-10 subset, batch 64, SGD, data in memory
(index slices: the strictest loop, no DataLoader overhead to hide behind); and the MNIST loop through a
DataLoader.

Part "kernels": what one call of the Rust CPU kernels of a Linear layer's rows costs against the torch ops
they replaced, on MNIST's shapes (64 images, 784 pixels count-sketched to 102 columns, 10 outputs
kept exact), median over many calls with the inputs in cache, beside this machine's memory bandwidth.

Part "loss": RR and GraB trained side by side, epoch by epoch in alternation (so a slow spell of this
shared machine hits both), the full training loss after each epoch (not timed); then the training time
GraB needs to reach RR's end-of-training loss, over RR's time (linear interpolation in time between
epochs), per seed. Plots loss against epochs and against wall-clock seconds.
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
from end_to_end import LeNet, load_cifar10, load_mnist  # noqa: E402
from torchgrab.capture import projection  # noqa: E402
from torchgrab.capture.feed import FEED_EVERY  # noqa: E402

BATCH = 64
loss_fn = nn.CrossEntropyLoss()


def make_model(task, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(784, 10) if task == "mnist" else LeNet()


def make_opt(task, model):
    # The paper's settings (examples/mnist_logreg.py, examples/cifar10_lenet.py).
    lr = 0.01 if task == "mnist" else 0.01
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


class Arm:
    """One training run: model, optimizer, ordering, capture; `epoch()` trains one epoch, timed."""

    def __init__(self, task, x, y, kind, seed=0, loader=False):
        self.task, self.x, self.y, self.kind, self.loader = task, x, y, kind, loader
        self.model = make_model(task, seed)
        self.opt = make_opt(task, self.model)
        self.gen = torch.Generator().manual_seed(seed)
        self.sampler = None
        if kind == EMPTY_HOOKS:
            _empty_hooks(self.model)
        elif kind == BARE:
            self.sampler = torchgrab.GraBSampler(n=len(x), ordering="grab", seed=seed)
            self.bare = BareCapture(self.model, self.sampler, x[:2])
        elif kind == RR_SAMPLER:
            self.sampler = torchgrab.GraBSampler(n=len(x), ordering="rr", seed=seed)
        elif kind != "rr":
            self.sampler = torchgrab.GraBSampler(n=len(x), ordering="grab", seed=seed)
            if kind.startswith("watch"):
                sketch = {"watch exact": None, GHOST: "ghost"}.get(kind, torchgrab.capture.DEFAULT_SKETCH)
                extra = {"budget": _budget(kind)} if kind.startswith(BUDGET_ARM) else {}
                if kind in NON_BLOCKING:
                    extra["non_blocking"] = NON_BLOCKING[kind]
                self.handle = self.sampler.watch(self.model, sketch=sketch, **extra)
                if kind == AT_CALL:
                    self.handle._held_inputs = set()
                    self.handle._outer = None  # (a layer not held hands rows)
                if kind == ROWS:
                    self.handle._outer = None
                if kind == NO_BALANCING:
                    # The rows are formed as always and handed to no kernel: their examples are skipped
                    # (unseen), which keeps the sampler's cursor where balancing would have put it.
                    handle, sampler = self.handle, self.sampler
                    handle._feeder._feed_rows = lambda rows, outer=None: sampler.skip(len(rows))
        self.seconds = 0.0
        if loader:
            ds = torch.utils.data.TensorDataset(x, y)
            if self.sampler is None:
                self.dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, generator=self.gen)
            else:
                self.dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, sampler=self.sampler)

    def batches(self):
        if self.loader:
            yield from self.dl
            return
        if self.sampler is None:
            order = torch.randperm(len(self.x), generator=self.gen)
        else:
            # The epoch's order as one tensor, as the RR arm gets it (np.fromiter: building a list of
            # Python ints for torch.as_tensor took several times as long as iterating the sampler).
            order = torch.from_numpy(np.fromiter(iter(self.sampler), dtype=np.int64, count=len(self.x)))
        for k in range(0, len(order), BATCH):
            idx = order[k : k + BATCH]
            yield self.x[idx], self.y[idx]

    def epoch(self):
        model, opt = self.model, self.opt
        # "watch, torch ops": the same watch() with the Rust CPU kernels of its Linear rows switched off.
        projection._CPU_KERNELS = self.kind != "watch torch ops"
        t0 = time.perf_counter()
        for xb, yb in self.batches():
            opt.zero_grad(set_to_none=True)
            if self.kind == "backward(hooks)":
                self.sampler.backward(model, loss_fn, xb, yb, method="hooks", non_blocking=True)
            else:
                loss_fn(model(xb), yb).backward()
            opt.step()
        if self.kind == BARE:
            self.bare.flush()
        if self.sampler is not None:
            self.sampler.synchronize()  # the last step's rows fed and balanced: part of the epoch
        dt = time.perf_counter() - t0
        self.seconds += dt
        return dt

    def full_loss(self):
        with torch.no_grad():
            return float(sum(loss_fn(self.model(xb), yb) * len(xb) for xb, yb in _chunks(self.x, self.y)) / len(self.x))


def _chunks(x, y, n=4096):
    for k in range(0, len(x), n):
        yield x[k : k + n], y[k : k + n]


EMPTY_HOOKS = "rr + empty hooks"
# The breakdown: RR through GraBSampler(ordering="rr") instead of randperm (what iterating the sampler
# costs), and watch() whose rows are formed but not balanced (what the capture alone costs).
RR_SAMPLER = "rr via sampler"
NO_BALANCING = "watch no balancing"
# watch() balances in the background only when a core is free for it (non_blocking=None); these force it.
NON_BLOCKING = {"watch background": True, "watch blocking": False}
# watch(sketch="ghost"): Linear layers exact from their factors (B x B Gram products), the rest exact rows.
GHOST = "watch ghost"
ARMS = ["rr", "watch", "watch torch ops", "watch exact", GHOST, "backward(hooks)", EMPTY_HOOKS, *NON_BLOCKING]
# The floor of watch()'s design on MNIST: its kernels and hooks without its bookkeeping (BareCapture).
BARE = "bare capture"
# watch() with a wide Linear input count-sketched at the layer's call, as before layers.HeldInput (held to
# the backward and sketched there by the rows kernel, _native.count_outer_rows).
AT_CALL = "watch input at call"
# watch() whose lone Linear layer writes its rows into the block, as before the sampler took their factors
# (_segments.OuterRows: [B, k_out + k_in] a step, the rows formed where they are balanced).
ROWS = "watch rows"
ARMS += [RR_SAMPLER, NO_BALANCING, BARE, AT_CALL, ROWS]


def _empty_hooks(model):
    """The hooks watch() registers on a model (a forward pre-hook on it; a forward hook on each layer it
    sketches, which puts a hook on the layer's output), each doing nothing."""
    handle = torchgrab.GraBSampler(n=1).watch(model)  # the layers watch() would hook, chosen by it
    layers = list(handle._sketches)
    handle.remove()
    model.register_forward_pre_hook(lambda m, args, kwargs: None, with_kwargs=True)

    def on_forward(m, args, out):
        if out.requires_grad:
            out.register_hook(lambda g: None)

    for m in layers:
        m.register_forward_hook(on_forward)


class BareCapture:
    """The floor of watch()'s design on one nn.Linear (MNIST logistic regression): the same two Rust
    kernels, the count sketch of the input in a forward hook and the scaled rows written by a pre-hook
    on the output's autograd node, into two preallocated blocks of rows fed to the sampler every
    FEED_EVERY steps (in the background when a core is free, as watch() does), and nothing else. None
    of watch()'s bookkeeping: no step boundaries from the model's pre-hook, no checks of the loop
    (accumulation, scalers, checkpointing, evaluation forwards, non-finite rows), no other layer kinds,
    no refusals. Not a usable capture: its cost over RR is what the kernels and hooks themselves cost,
    and watch()'s cost over it is that bookkeeping."""

    def __init__(self, model, sampler, sample):
        if type(model) is not nn.Linear:
            raise ValueError("the bare capture takes a single nn.Linear (MNIST logistic regression)")
        # watch()'s own sketch of this layer (seeded by the sampler's seed, as watch() seeds it).
        handle = torchgrab.GraBSampler(n=1, seed=sampler.seed).watch(model)
        sk = handle._sketches[model]
        handle.remove()
        sk.save(model, sample)  # builds the count sketch's tables
        self.tables, width = sk.p_in._np_tables, sk.width
        assert self.tables is not None and sk.p_out.identity and sk.train_b
        self.blocks = [np.empty((FEED_EVERY * BATCH, width), np.float32) for _ in range(2)]
        self.k = self.used = 0
        self.sampler = sampler
        self.background = torch.get_num_threads() < len(os.sched_getaffinity(0))
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._forward)

    def _pre(self, module, args):
        if self.used + BATCH > len(self.blocks[self.k]):
            self.flush()

    def flush(self):
        if self.used:
            # In the background the other block is written meanwhile; each call waits for the step before.
            self.sampler.step(self.blocks[self.k][: self.used], non_blocking=self.background)
            self.k ^= 1
            self.used = 0

    def _forward(self, module, args, out):
        a = torchgrab._native.count_sketch(args[0].numpy(), *self.tables)
        i = out.output_nr

        def rows(grads):
            g = grads[i]
            b, u = g.shape[0], self.used
            self.used = u + b
            torchgrab._native.outer_rows(g.numpy(), a, float(b), True, False, self.blocks[self.k][u : u + b])

        out.grad_fn.register_prehook(rows)


# "watch budget=B" (B a fraction, or none): watch(budget=B), e.g. on LeNet, where the budget decides whether
# the convolutions' weights are sketched or left out.
BUDGET_ARM = "watch budget="


def _budget(arm):
    b = arm[len(BUDGET_ARM) :]
    return None if b.lower() == "none" else float(b)


def _known_arm(arm):
    if not arm.startswith(BUDGET_ARM):
        return arm in ARMS
    try:
        _budget(arm)
    except ValueError:  # "watch budget=x"
        return False
    return True


NAMES = {
    "watch": "grab, watch()",
    "watch torch ops": "grab, watch(), torch ops",
    "watch exact": "grab, watch(sketch=None)",
    GHOST: "grab, watch(sketch='ghost')",
    "watch background": "grab, non_blocking=True",
    "watch blocking": "grab, non_blocking=False",
    EMPTY_HOOKS: EMPTY_HOOKS,
    RR_SAMPLER: RR_SAMPLER,
    NO_BALANCING: "grab, watch(), no balancing",
    AT_CALL: "grab, watch(), input at call",
    ROWS: "grab, watch(), rows written out",
    BARE: "grab, bare capture",
}


def part_cost(tasks, args):
    for threads in args.threads:
        torch.set_num_threads(threads)
        for task, (x, y) in tasks.items():
            # The bare capture is built for one Linear layer: MNIST only.
            arms = ["rr"] + [a for a in args.arms.split(",") if a != "rr" and (a != BARE or task == "mnist")]
            for loader in [False, True] if task == "mnist" else [False]:
                ratios = {a: [] for a in arms[1:]}
                secs = {a: [] for a in arms}
                runs = {a: Arm(task, x, y, a, loader=loader) for a in arms}
                for a in arms:  # warm-up epoch each (allocator, projections, first-epoch checks)
                    runs[a].epoch()
                desc = f"{task}{' DataLoader' if loader else ''} {threads}t"
                for r in tqdm(range(args.rounds), desc=desc, leave=False, file=sys.stderr):
                    seq = arms if r % 2 == 0 else arms[::-1]
                    t = {a: runs[a].epoch() for a in seq}
                    for a in arms:
                        secs[a].append(t[a])
                    for a in arms[1:]:
                        ratios[a].append(t[a] / t["rr"])
                d = sum(p.numel() for p in runs["rr"].model.parameters())
                k = next(r.handle.width for r in runs.values() if hasattr(r, "handle"))
                print(
                    f"\n## {task}, {'DataLoader' if loader else 'in-memory slices'}, {threads} torch thread(s): "
                    f"n = {len(x)}, d = {d}, K = {k} (sketch {torchgrab.capture.DEFAULT_SKETCH}), "
                    f"{args.rounds} paired rounds, load {_common.load_average()}"
                )
                w = max([28] + [len(NAMES.get(a, f"grab, {a}")) for a in arms[1:]])
                print(f"{'arm':<{w}} {'median epoch s':>15} {'x RR median':>12} {'x RR quartiles':>16}")
                print(f"{'rr (plain)':<{w}} {np.median(secs['rr']):>15.3f} {1.0:>12.3f} {'':>16}")
                for a in arms[1:]:
                    q1, q2, q3 = np.percentile(ratios[a], [25, 50, 75])
                    name = NAMES.get(a, f"grab, {a}")
                    print(f"{name:<{w}} {np.median(secs[a]):>15.3f} {q2:>12.3f} {f'{q1:.3f}-{q3:.3f}':>16}")
                for a in arms[1:]:
                    if a.startswith(BUDGET_ARM):
                        h = runs[a].handle
                        left_out = [name for name, kind, _ in h.layers if "left out" in kind]
                        print(f"{a}: K = {h.width}, weights left out: {', '.join(left_out) or 'none'}")


def _per_call_us(fn, calls=2000, rounds=7):
    """Median over rounds of the mean time of one call, in microseconds."""
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return float(np.median(times))


def part_kernels(x, args):
    torch.set_num_threads(args.threads[0])
    model = make_model("mnist")
    handle = torchgrab.GraBSampler(n=len(x), ordering="grab").watch(model)
    sk = handle._sketches[model]  # the LinearSketch watch() made for this layer (count-sketched input)
    xb = x[:BATCH].contiguous()
    g = torch.randn(BATCH, 10, generator=torch.Generator().manual_seed(0))
    saved = sk.save(model, xb)
    rows = torch.empty(BATCH, handle.width)
    slot = rows.numpy()

    def with_kernels(on, fn):
        def call():
            projection._CPU_KERNELS = on
            fn()

        return call

    def torch_rows():
        torch.cat(sk.rows(model, saved, g), dim=1, out=rows)
        rows.mul_(float(BATCH))

    # (name, the call with the kernels, the call without, bytes read or written); the count sketch is one
    # call either way (Factor picks the kernel or index_add_ by the switch).
    cases = [
        (f"count sketch {BATCH} x 784 -> {sk.p_in.k}", lambda: sk.p_in(xb), lambda: sk.p_in(xb), xb.numel() * 4),
        (
            f"Linear rows {BATCH} x {handle.width}, scaled",
            lambda: sk.rows_into(model, saved, g, slot, float(BATCH), False),
            torch_rows,
            rows.numel() * 4,
        ),
    ]
    bw = _common.memory_read_bandwidth()
    print(f"\n## kernels of a Linear layer's rows, MNIST shapes, {args.threads[0]} torch thread(s)")
    print("memory read bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items()))
    print(f"{'kernel':<34} {'Rust us/call':>13} {'torch ops us/call':>18} {'torch/Rust':>11} {'Rust GB/s':>10}")
    calls, rounds = (20, 2) if args.quick else (2000, 7)
    for name, rust_call, torch_call, nbytes in cases:
        rust = _per_call_us(with_kernels(True, rust_call), calls, rounds)
        ref = _per_call_us(with_kernels(False, torch_call), calls, rounds)
        print(f"{name:<34} {rust:>13.2f} {ref:>18.2f} {ref / rust:>11.2f} {nbytes / rust / 1e3:>10.1f}")
    projection._CPU_KERNELS = True
    print("(GB/s: the bytes the kernel reads (count sketch) or writes (rows) over its time per call)")


def part_loss(tasks, args, plt):
    torch.set_num_threads(args.threads[0])
    curves = {}
    for task, (x, y) in tasks.items():
        epochs = args.epochs if task == "mnist" else args.cifar_epochs
        print(
            f"\n## {task}: time to RR's end-of-training loss, {epochs} epochs, n = {len(x)}, batch {BATCH}, "
            f"SGD lr 0.01 momentum 0.9 wd 1e-4, {args.threads[0]} thread(s), epochs alternating RR/GraB"
        )
        print(f"{'seed':>4} {'rr final loss':>14} {'rr s':>8} {'grab s to it':>13} {'ratio':>7} {'grab final':>11}")
        ratios = []
        for seed in range(args.seeds):
            arms = {"rr": Arm(task, x, y, "rr", seed), "grab": Arm(task, x, y, "watch", seed)}
            hist = {a: [(0.0, arms[a].full_loss())] for a in arms}
            for e in tqdm(range(epochs), desc=f"{task} seed {seed}", leave=False, file=sys.stderr):
                for a in arms if e % 2 == 0 else list(arms)[::-1]:
                    arms[a].epoch()
                    hist[a].append((arms[a].seconds, arms[a].full_loss()))
            target = hist["rr"][-1][1]
            t_rr = hist["rr"][-1][0]
            t_g = _common.time_to(hist["grab"], target)
            # GraB never reaching RR's final loss counts as slower than any time it could have taken (inf),
            # so the median still says something when one seed never gets there.
            ratio = t_g / t_rr if t_g is not None else float("inf")
            ratios.append(ratio)
            curves[(task, seed)] = hist
            reached = f"{t_g:>13.1f} {ratio:>7.3f}" if t_g is not None else f"{'never':>13} {'-':>7}"
            print(f"{seed:>4} {target:>14.5f} {t_rr:>8.1f} {reached} {hist['grab'][-1][1]:>11.5f}")
        print(f"median ratio (GraB time to RR's final loss / RR time; never = inf): {np.median(ratios):.3f}")
    if plt is not None:
        fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
        for j, task in enumerate(tasks):
            for (t_, seed), hist in curves.items():
                if t_ != task:
                    continue
                for a, color in (("rr", "C0"), ("grab", "C1")):
                    ts, ls = zip(*hist[a])
                    label = a if seed == 0 else None
                    axes[0][j].plot(range(len(ls)), ls, color=color, alpha=0.7, label=label)
                    axes[1][j].plot(ts, ls, color=color, alpha=0.7, label=label)
            axes[0][j].set(title=f"{task}: loss vs epoch", xlabel="epoch", ylabel="full training loss", yscale="log")
            axes[1][j].set(
                title=f"{task}: loss vs wall-clock",
                xlabel="training seconds",
                ylabel="full training loss",
                yscale="log",
            )
            axes[0][j].legend()
        _common.save_plot(fig, args.out, "watch_speed.png")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data"))
    ap.add_argument("--part", choices=["cost", "loss", "kernels", "both"], default="both")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=8, help="MNIST epochs of part 'loss'")
    ap.add_argument("--cifar-epochs", type=int, default=10)
    ap.add_argument("--cifar-n", type=int, default=10000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tasks", default="mnist,lenet", help="comma-separated: mnist, lenet")
    ap.add_argument(
        "--arms",
        default=",".join(ARMS[1:]),
        help="comma-separated arms of part 'cost' besides rr (paired with it): "
        + ", ".join(ARMS[1:])
        + f", {BUDGET_ARM}B (B a fraction or none)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny data, 2 rounds, 2 epochs: a smoke run")
    ap.add_argument("--out", default=os.path.join(here, "out"))
    args = ap.parse_args()
    unknown = [a for a in args.arms.split(",") if not _known_arm(a)]
    if unknown:
        ap.error(f"unknown arms {unknown}; choose from {ARMS}")
    if args.quick:
        args.rounds, args.epochs, args.cifar_epochs, args.seeds, args.cifar_n = 2, 2, 2, 1, 256
        args.threads = args.threads[:1]
    _common.header(f"watch(): epoch cost and time to loss, CPU, batch {BATCH}")
    x, y = load_mnist(args.data)
    wanted = args.tasks.split(",")
    tasks = {}
    if "mnist" in wanted:
        tasks["mnist"] = (x[:2048], y[:2048]) if args.quick else (x, y)
    if "lenet" in wanted:
        tasks["lenet"] = load_cifar10(args.data, args.cifar_n)
    os.makedirs(args.out, exist_ok=True)
    if args.part == "kernels":
        part_kernels(x, args)
        return
    if args.part in ("cost", "both"):
        part_cost(tasks, args)
    if args.part in ("loss", "both"):
        part_loss(tasks, args, _common.pyplot())


if __name__ == "__main__":
    main()
