"""Does GraB through `sampler.watch(model)` still beat random reshuffling on a BatchNorm ResNet? (issue 14, point 3)

    .venv/bin/python benchmarks/watch_batchnorm.py                 # out/watch_batchnorm.{txt,csv,png}
    .venv/bin/python benchmarks/watch_batchnorm.py --n 2500 --epochs 6
    .venv/bin/python benchmarks/watch_batchnorm.py --quick         # a smoke run of a few seconds
    .venv/bin/python benchmarks/watch_batchnorm.py --part cost     # out/watch_batchnorm_cost.txt: a watched epoch / RR's
    .venv/bin/python benchmarks/watch_batchnorm.py --part cost --norm group   # out/watch_groupnorm_cost.txt

For BatchNorm in training mode per-example gradients are not defined (the batch statistics couple the examples);
watch() hands the sampler each example's *contribution* g_b * x_hat_b instead (BN's coupling inside g_b), which
sums to the batch gradient. This script measures whether an order balanced on that proxy lowers the training loss.

Model: a ResNet-8 (conv3x3 16 + BN + ReLU; three stages of one BasicBlock each, 16/32/64 channels, stride 2 between
stages, 1x1 conv + BN shortcut where the shape changes; global average pool; Linear to 10), no bias in the
convolutions (BN follows each). Data: a seeded random subset of the CIFAR-10 training JPEGs of ../shared/data
(`--n`, default 5,000) and a seeded random 2,000 of the test images, channel mean/std normalized, no augmentation.
SGD lr 0.05 momentum 0.9 weight decay 5e-4, batch 64, constant learning rate by default; `--schedule cosine` decays it
per step along half a cosine to 0 at the last step (every arm the same schedule), which quiets the epoch-to-epoch
swings of the loss that a constant rate leaves (the run at 862da54 could not tell the orders apart through them).

Arms, per seed from the same initial weights and the same first-epoch permutation (every arm is a GraBSampler with
that seed; its first epoch is a seeded random permutation, the same for every ordering):
  rr    GraBSampler(ordering="rr"): a fresh random permutation each epoch, ordinary loss.backward(), no hooks;
  grab  GraBSampler(ordering="grab") fed by sampler.watch(model) with its defaults (sketch 32, budget 0.25);
  pair  the same with ordering="pair" (balanced pairs).
Every arm runs the same loop: the sampler's order in index slices of the in-memory tensors (what
DataLoader(sampler=...) would yield, without collate cost), loss_fn(model(x), y).backward(), opt.step();
sampler.synchronize() ends the epoch (part of the timed training seconds). Arms take their epochs in rotation, so a
slow spell of this shared machine does not fall on one arm. After each epoch, untimed and with the model in eval
mode (BatchNorm uses its running statistics): the mean cross-entropy over all n training images and the loss and
accuracy on the test images.

With watch()'s defaults the budget leaves the weights of the bias-free convolutions out (they get no
columns). At commit 862da54, where benchmarks/out/watch_batchnorm.txt was made, such a layer broke a step
(IndexError, fixed in e8da525), so that run passed those layers as watch(exclude=...), which gives the same
rows; `--exclude-empty` repeats it. By default the script now calls plain watch(model).

`--part cost` times what watch() adds to an epoch instead: RR, GraB through watch(), and GraB through watch()
with the BatchNorm rows formed by torch ops (normalize again, multiply, sum: what watch() did before the Rust
pass `_native.norm_sums`), `--cost-n` images a timed epoch, `--rounds` paired rounds in alternating order after a
warm-up epoch each, one seed; it prints each arm's epoch over RR's (median and quartiles over the rounds) and
writes OUT/watch_batchnorm_cost.txt.

`--norm group` puts a GroupNorm (4 groups) where each BatchNorm was, in either part, and writes
OUT/watch_groupnorm*. GroupNorm normalizes each example by its own statistics, so its rows are the exact
per-example gradients; the Rust pass takes it too (`norm_sums` with groups), and the cost part's third arm forms
its rows by torch ops instead.

Writes OUT/watch_batchnorm.txt (the printed tables, the command line at the top), OUT/watch_batchnorm.csv (one row
per arm, seed and epoch) and OUT/watch_batchnorm.png (loss against epochs and against training seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from torchgrab import GraBSampler  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
loss_fn = nn.CrossEntropyLoss()


EX = _common.load_module("torchgrab_examples_common", REPO / "examples" / "_common.py")


# --------------------------------------------------------------------------- model and data
GROUPS = 4  # --norm group: GroupNorm(4, c) for every BatchNorm2d(c) (16, 32 and 64 channels)
NORMS = {"batch": "BatchNorm", "group": "GroupNorm"}


def norm_layer(norm: str, c: int) -> nn.Module:
    return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(GROUPS, c)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet8(nn.Module):
    def __init__(self, classes: int = 10, norm: str = "batch") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = norm_layer(norm, 16)
        self.layer1 = BasicBlock(16, 16, 1, norm)
        self.layer2 = BasicBlock(16, 32, 2, norm)
        self.layer3 = BasicBlock(32, 64, 2, norm)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn(self.conv(x))))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def load_data(root: Path, n: int, test_n: int, seed: int):
    """Seeded random subsets of the CIFAR-10 training and test images, channel mean/std normalized, NCHW."""
    (xtr, ytr), (xte, yte) = EX.load_cifar10(root, cache=REPO / "out" / "cifar10.npz")
    rng = np.random.default_rng(seed)
    tr = np.sort(rng.choice(len(xtr), size=min(n, len(xtr)), replace=False))
    te = np.sort(rng.choice(len(xte), size=min(test_n, len(xte)), replace=False))

    def norm(x: np.ndarray) -> torch.Tensor:
        return ((torch.tensor(x).permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD).contiguous()

    return norm(xtr[tr]), torch.tensor(ytr[tr]).long(), norm(xte[te]), torch.tensor(yte[te]).long()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000):
    """(mean cross-entropy, accuracy) over all of (x, y), model in eval mode (BN running statistics)."""
    was = model.training
    model.eval()
    total, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i : i + batch])
        total += float(F.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    model.train(was)
    return total / len(x), correct / len(x)


def zero_width_layers(model: nn.Module) -> List[str]:
    """Layers to which watch()'s defaults give no columns (weight left out by the budget, no bias)."""
    h = GraBSampler(n=2, ordering="grab", seed=0).watch(model)
    try:
        return [name for name, _, width in h.layers if width == 0]
    finally:
        h.remove()


# --------------------------------------------------------------------------- training
class Arm:
    def __init__(self, name: str, seed: int, n: int, args, exclude: List[str], norm_torch_ops: bool = False) -> None:
        self.name = name
        self.norm_torch_ops = norm_torch_ops  # part cost: the norms' rows by torch ops, not the Rust pass
        torch.manual_seed(seed)
        self.model = ResNet8(norm=args.norm)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
        self.sched = None
        if args.schedule == "cosine":
            self.sched = _common.cosine_to_zero(self.opt, args.epochs * math.ceil(n / args.batch))
        self.sampler = GraBSampler(n=n, ordering=name, seed=seed)
        self.handle = None
        if name != "rr":
            self.handle = self.sampler.watch(self.model, exclude=exclude) if exclude else self.sampler.watch(self.model)
        self.width = 0 if self.handle is None else self.handle.width
        self.batch = args.batch

    def epoch(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.norm_torch_ops:
            with torch_ops_for_norms():
                return self._epoch(x, y)
        return self._epoch(x, y)

    def _epoch(self, x: torch.Tensor, y: torch.Tensor) -> float:
        model, opt = self.model, self.opt
        model.train()
        t0 = time.perf_counter()
        order = torch.as_tensor(np.fromiter(iter(self.sampler), dtype=np.int64, count=len(x)))
        for i in range(0, len(order), self.batch):
            idx = order[i : i + self.batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            if self.sched is not None:
                self.sched.step()
        self.sampler.synchronize()  # the last steps' rows fed and balanced: part of the epoch
        return time.perf_counter() - t0


@contextlib.contextmanager
def torch_ops_for_norms():
    """watch()'s BatchNorm and GroupNorm rows by torch ops (the kernel declines every call, so the torch path runs)."""
    from torchgrab.capture.layers import _ChannelNormSketch

    kernel = _ChannelNormSketch._sums
    _ChannelNormSketch._sums = lambda self, *a: None
    try:
        yield
    finally:
        _ChannelNormSketch._sums = kernel


def cost_arms(norm: str) -> Dict[str, tuple]:
    short = "BN" if norm == "batch" else "GN"
    return {"rr": ("rr", False), "grab": ("grab", False), f"grab, {short} rows by torch ops": ("grab", True)}


def stem(norm: str) -> str:
    """Output file names: watch_batchnorm* or watch_groupnorm*."""
    return f"watch_{norm}norm"


def cost(args, x: torch.Tensor, y: torch.Tensor) -> None:
    """Part 'cost': paired epochs of RR and of GraB through watch(), with and without the Rust norm pass."""
    kind = NORMS[args.norm]
    out = _common.begin_result(f"watch() on a {kind} ResNet: what a watched epoch costs against RR")
    x, y = x[: args.cost_n], y[: args.cost_n]
    out.line(
        f"# CIFAR-10 ResNet-8 with {kind}{f' ({GROUPS} groups)' if args.norm == 'group' else ''}, {len(x):,} images a timed epoch (batch {args.batch}, "
        f"{math.ceil(len(x) / args.batch)} steps), {args.rounds} paired rounds after a warm-up epoch each, "
        f"{args.threads} torch thread(s), SGD lr {args.lr} m 0.9 wd {args.wd}"
    )

    class Timed:
        def __init__(self, arm: Arm) -> None:
            self.arm = arm

        def epoch(self) -> float:
            return self.arm.epoch(x, y)

    runs = {a: Timed(Arm(o, 0, len(x), args, [], norm_torch_ops=t)) for a, (o, t) in cost_arms(args.norm).items()}
    out.line(f"# grab: K = {runs['grab'].arm.width:,} columns per example")
    secs = _common.paired_epochs(runs, args.rounds)
    out.line(f"\n{'arm':<28} {'epoch s (median)':>16} {'x RR (median)':>14} {'quartiles':>13}")
    for a in runs:
        ratio = np.array(secs[a]) / np.array(secs["rr"])
        q1, med, q3 = np.percentile(ratio, [25, 50, 75])
        out.line(f"{a:<28} {np.median(secs[a]):>16.3f} {med:>14.3f} {q1:>6.3f}-{q3:.3f}")
    out.line("\nper round, seconds: " + "; ".join(f"{a}: {', '.join(f'{v:.2f}' for v in secs[a])}" for a in runs))
    # Untimed: one more epoch of each watched arm, counting the Rust pass's calls (the torch-ops arm makes none).
    from torchgrab import _native

    kernel, calls = _native.norm_sums, [0]

    def counted(*a):
        calls[0] += 1
        return kernel(*a)

    _native.norm_sums = counted
    try:
        counts = {}
        for a in list(runs)[1:]:
            calls[0] = 0
            runs[a].epoch()
            counts[a] = calls[0]
    finally:
        _native.norm_sums = kernel
    out.line(
        f"check, {kind} rows through the Rust pass in one more epoch: "
        + ", ".join(f"{a} {n} calls" for a, n in counts.items())
    )
    out.line(f"\n# load average now {_common.load_average()}")
    out.save(os.path.join(args.out, f"{stem(args.norm)}_cost.txt"))
    print(f"# wrote {args.out}/{stem(args.norm)}_cost.txt")


def binom_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): a one-sided sign test."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


# --------------------------------------------------------------------------- output
def plot(out_dir: str, arms: List[str], loss: Dict, secs: Dict, acc: Dict, title: str, name: str) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    fig, (ax_e, ax_t, ax_a) = plt.subplots(1, 3, figsize=(16, 4.6))
    seeds = next(iter(loss.values())).shape[0]
    for c, a in enumerate(arms):
        color = f"C{c}"
        ep = np.arange(loss[a].shape[1])
        for s in range(seeds):
            ax_e.plot(ep, loss[a][s], color=color, alpha=0.25, lw=0.8)
            ax_t.plot(np.cumsum(secs[a][s]), loss[a][s], color=color, alpha=0.25, lw=0.8)
        ax_e.plot(ep, loss[a].mean(0), color=color, marker="o", label=f"{a} (mean of {seeds})")
        ax_t.plot(np.cumsum(secs[a], axis=1).mean(0), loss[a].mean(0), color=color, marker="o", label=a)
        ax_a.plot(ep, 100 * acc[a].mean(0), color=color, marker="o", label=a)
    ax_e.set(title="full training loss (eval mode) per epoch", xlabel="epoch", ylabel="mean cross-entropy")
    ax_t.set(title="... against training seconds (1 thread)", xlabel="cumulative training seconds", ylabel="loss")
    ax_a.set(title="test accuracy", xlabel="epoch", ylabel="% correct")
    for ax in (ax_e, ax_t):
        ax.set_yscale("log")
    for ax in (ax_e, ax_t, ax_a):
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    _common.save_plot(fig, out_dir, f"{name}.png")


def main(argv: Optional[List[str]] = None) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help=f"data root in the layout of ../shared/data ({EX.DEFAULT_DATA})")
    ap.add_argument("--n", type=int, default=5000, help="training images (seeded random subset)")
    ap.add_argument("--test-n", type=int, default=2000, help="test images (seeded random subset)")
    ap.add_argument("--subset-seed", type=int, default=0, help="seed of the two subsets")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--arms", default="rr,grab,pair", help="comma-separated, rr first: rr, grab, pair")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument(
        "--schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="learning rate: constant, or per-step cosine decay to 0 at the last step",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument(
        "--norm",
        choices=tuple(NORMS),
        default="batch",
        help=f"the ResNet's norm layers: BatchNorm2d, or GroupNorm with {GROUPS} groups (outputs watch_groupnorm*)",
    )
    ap.add_argument(
        "--exclude-empty",
        action="store_true",
        help="pass the layers the budget leaves without columns as exclude= (what the run at 862da54 did; same rows)",
    )
    ap.add_argument(
        "--part", choices=("train", "cost"), default="train", help="the loss study, or the cost of an epoch"
    )
    ap.add_argument("--rounds", type=int, default=8, help="part cost: paired rounds")
    ap.add_argument("--cost-n", type=int, default=2560, help="part cost: images a timed epoch")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out; with --quick a temp folder)")
    ap.add_argument("--quick", action="store_true", help="a few hundred images, 1 epoch, 1 seed: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.test_n, args.epochs, args.seeds = 320, 200, 1, 1
        args.rounds, args.cost_n = 2, 256
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="watch_batchnorm_") if args.quick else os.path.join(here, "out")
    os.makedirs(args.out, exist_ok=True)
    arms = [a for a in args.arms.split(",") if a]
    if arms[0] != "rr":
        ap.error("--arms must start with rr (the differences are taken against it)")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.part == "cost":
        x, y, _, _ = load_data(EX.data_root(args.data), max(args.n, args.cost_n), args.test_n, args.subset_seed)
        cost(args, x, y)
        return

    heading = (
        "watch() on a BatchNorm ResNet: does the BN-contribution order beat RR? (issue 14, point 3)"
        if args.norm == "batch"
        else f"watch() on a GroupNorm ResNet ({GROUPS} groups): does the order beat RR?"
    )
    out = _common.begin_result(heading, bandwidth=False)

    x, y, xte, yte = load_data(EX.data_root(args.data), args.n, args.test_n, args.subset_seed)
    probe = ResNet8(norm=args.norm)
    exclude = zero_width_layers(probe) if args.exclude_empty else []
    d = sum(p.numel() for p in probe.parameters())
    title = (
        f"CIFAR-10 ResNet-8 with {NORMS[args.norm]} (d = {d:,}), {len(x):,} training / {len(xte):,} test images, "
        f"SGD lr {args.lr}{' cosine to 0' if args.schedule == 'cosine' else ''} m 0.9 wd {args.wd}, batch {args.batch}, {args.epochs} epochs, {args.seeds} seeds"
    )
    out.line(f"# {title}")
    out.line(
        f"# subsets: seeded random (subset seed {args.subset_seed}); seeds 0..{args.seeds - 1} set the initial weights "
        "and the first-epoch permutation shared by every arm of a seed"
    )
    cut = [
        f"{k} {v} (default {dv})"
        for k, v, dv in (
            ("n", len(x), 5000),
            ("epochs", args.epochs, 8),
            ("seeds", args.seeds, 3),
            ("arms", ",".join(arms), "rr,grab,pair"),
        )
        if str(v) != str(dv)
    ]
    if cut and not args.quick:
        out.line(f"# reduced from the defaults to keep the run short on this shared 2-core machine: {'; '.join(cut)}")
    if exclude:
        out.line(
            f"# --exclude-empty: exclude={exclude} (the defaults give these layers 0 columns), so the rows are "
            "the defaults' rows"
        )
    widths: Dict[str, int] = {}
    loss = {a: np.full((args.seeds, args.epochs + 1), np.nan) for a in arms}
    acc = {a: np.full((args.seeds, args.epochs + 1), np.nan) for a in arms}
    tloss = {a: np.full((args.seeds, args.epochs + 1), np.nan) for a in arms}
    secs = {a: np.zeros((args.seeds, args.epochs + 1)) for a in arms}
    rows: List[Dict] = []
    for s in range(args.seeds):
        runs = {a: Arm(a, s, len(x), args, exclude) for a in arms}
        widths = {a: r.width for a, r in runs.items()}
        if s == 0:
            for a, r in runs.items():
                if r.handle is not None:
                    blocks = ", ".join(f"{name} {kind} {w}" for name, kind, w in r.handle.layers)
                    out.line(f"# {a}: K = {r.width:,} columns per example: {blocks}")
        for a, r in runs.items():
            loss[a][s, 0] = evaluate(r.model, x, y)[0]
            tloss[a][s, 0], acc[a][s, 0] = evaluate(r.model, xte, yte)
        for e in range(1, args.epochs + 1):
            rot = (e - 1) % len(arms)
            for a in arms[rot:] + arms[:rot]:
                secs[a][s, e] = runs[a].epoch(x, y)
                loss[a][s, e] = evaluate(runs[a].model, x, y)[0]
                tloss[a][s, e], acc[a][s, e] = evaluate(runs[a].model, xte, yte)
            print(
                f"# seed {s} epoch {e}: "
                + ", ".join(f"{a} loss {loss[a][s, e]:.4f} acc {acc[a][s, e]:.3f} {secs[a][s, e]:.1f}s" for a in arms)
                + f"  (load {_common.load_average()})",
                file=sys.stderr,
                flush=True,
            )
        for a in arms:
            for e in range(args.epochs + 1):
                rows.append(
                    dict(
                        arm=a,
                        K=widths[a],
                        seed=s,
                        epoch=e,
                        train_loss=f"{loss[a][s, e]:.6f}",
                        test_loss=f"{tloss[a][s, e]:.6f}",
                        test_acc=f"{acc[a][s, e]:.4f}",
                        epoch_seconds=f"{secs[a][s, e]:.3f}",
                    )
                )

    E = args.epochs
    others = arms[1:]
    same = all(np.array_equal(loss[a][:, : min(1, E) + 1], loss["rr"][:, : min(1, E) + 1]) for a in others)
    out.line(
        f"\n# check: epoch 0 and epoch 1 losses equal in every arm of a seed (same init, same first order): {same}"
    )
    out.line(
        "\nFull training loss (mean cross-entropy over the n training images, model in eval mode), mean over seeds:"
    )
    out.line(f"{'epoch':>5} " + " ".join(f"{a:>9}" for a in arms) + "".join(f" {a + '-rr':>10}" for a in others))
    for e in range(E + 1):
        diffs = "".join(f" {(loss[a][:, e] - loss['rr'][:, e]).mean():>+10.5f}" for a in others)
        out.line(f"{e:>5} " + " ".join(f"{loss[a][:, e].mean():>9.5f}" for a in arms) + diffs)
    for a in others:
        out.line(f"\n{a} - rr, full training loss, paired by seed (< 0: {a} lower):")
        out.line(f"{'epoch':>5} " + " ".join(f"{'seed ' + str(s):>9}" for s in range(args.seeds)) + f" {'mean':>9}")
        for e in range(1, E + 1):
            dd = loss[a][:, e] - loss["rr"][:, e]
            out.line(f"{e:>5} " + " ".join(f"{v:>+9.5f}" for v in dd) + f" {dd.mean():>+9.5f}")
    out.line("\nTest accuracy (%) on the test images, mean over seeds; test loss in brackets:")
    out.line(f"{'epoch':>5} " + " ".join(f"{a:>17}" for a in arms))
    for e in range(E + 1):
        out.line(
            f"{e:>5} " + " ".join(f"{100 * acc[a][:, e].mean():>8.2f} ({tloss[a][:, e].mean():.4f})" for a in arms)
        )
    out.line("\nTraining seconds per epoch (sampler iteration, steps, synchronize; evaluation not included):")
    out.line(
        "  "
        + ", ".join(
            f"{a} median {np.median(secs[a][:, 1:]):.2f} s (total {secs[a].sum() / args.seeds:.1f} s per run)"
            for a in arms
        )
    )
    for a in others:
        ratio = secs[a][:, 1:] / secs["rr"][:, 1:]
        out.line(
            f"  {a} / rr, same seed and epoch: median {np.median(ratio):.2f}x (range {ratio.min():.2f}-{ratio.max():.2f})"
        )
    out.line(
        "\nTime to RR's final training loss, from each run's training seconds (interpolated between epochs; "
        "arms in rotation, so a slow spell falls on all; 'never': not reached in the run):"
    )
    for a in others:
        ratios = []
        cells = []
        for s in range(args.seeds):
            target = loss["rr"][s, E]
            t_rr = secs["rr"][s, 1:].sum()
            t_a = _common.time_to(list(zip(np.cumsum(secs[a][s]), loss[a][s])), target)
            ratios.append(t_a / t_rr if t_a is not None else float("inf"))
            cells.append(f"{ratios[-1]:.3f}" if t_a is not None else "never")
        out.line(f"  {a} / rr: seeds {' / '.join(cells)}; median {np.median(ratios):.3f}")
    first = min(3, E)
    out.line(f"\nSummary, (seed, epoch) pairs from epoch {first} on:")
    verdicts = {}
    for a in others:
        dd = loss[a][:, first:] - loss["rr"][:, first:]
        wins, total = int((dd < 0).sum()), dd.size
        rel = (dd / loss["rr"][:, first:]).mean()
        gap = (loss[a] - loss["rr"]).mean(0)[first:]
        out.line(
            f"  {a}: loss below rr's in {wins}/{total} ({wins / total:.0%}); mean paired difference {dd.mean():+.5f} "
            f"({rel:+.1%} of rr's loss); mean over seeds below rr at {int((gap < 0).sum())}/{len(gap)} epochs; "
            f"final epoch {dd[:, -1].mean():+.5f} (seeds: {', '.join(f'{v:+.4f}' for v in dd[:, -1])}); "
            f"sign test (pairs not independent, only a guide) P(>= {wins} of {total} | coin) = {binom_tail(wins, total):.3f}"
        )
        if wins == total:
            verdicts[a] = "below RR in every seed and epoch"
        elif wins / total >= 0.75 and (gap < 0).all():
            verdicts[a] = "below RR on the whole, not in every seed and epoch"
        elif wins / total > 0.5:
            verdicts[a] = "at most a weak, seed-dependent gain over RR"
        else:
            verdicts[a] = "not below RR"
    out.line(
        "  rule: 'every' = all pairs below; 'on the whole' = >= 75% of pairs and the seed mean below at every epoch"
    )
    for a in others:
        out.line(f"  -> {a} (K = {widths[a]:,}): {verdicts[a]}")
    out.line(f"\n# total {time.perf_counter() - t_start:.0f} s, load average now {_common.load_average()}")

    name = stem(args.norm)
    out.save(os.path.join(args.out, f"{name}.txt"))
    _common.write_csv(os.path.join(args.out, f"{name}.csv"), rows)
    plot(args.out, arms, loss, secs, acc, title, name)
    print(f"# wrote {args.out}/{name}.txt, .csv and .png")


if __name__ == "__main__":
    main()
