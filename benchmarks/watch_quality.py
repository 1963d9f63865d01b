"""What the sketch of `sampler.watch(model)` keeps of GraB: training loss and herding discrepancy.

    .venv/bin/python benchmarks/watch_quality.py --tasks mnist --ks 8,16,32,64,128   # out/watch_quality_mnist.*
    .venv/bin/python benchmarks/watch_quality.py --tasks cifar                      # out/watch_quality_cifar.*
    .venv/bin/python benchmarks/watch_quality.py --part disc --tasks cifar --disc-cifar-n 8192
    .venv/bin/python benchmarks/watch_quality.py --quick               # a smoke run of a few seconds
    .venv/bin/python benchmarks/watch_quality.py --plot-only           # the figure again, from OUT's CSVs

Part "train" (training-loss gain): the paper's two experiments with the settings of examples/mnist_logreg.py
(MNIST logistic regression, all 60,000 images, SGD lr 0.01 momentum 0.9 wd 1e-4, batch 64) and
examples/cifar10_lenet.py (LeNet-5 on a class-balanced CIFAR-10 subset, SGD lr 1e-3 momentum 0.9 wd 1e-2,
batch 16), same data loading, normalization and models. Arms, per seed from the same initial weights and the
same first-epoch permutation: `rr` (plain random reshuffling, ordinary `loss.backward()`), `exact`
(`sampler.watch(model, sketch=None)`: the rows are the exact per-example gradients) and `k<K>`
(`sampler.watch(model, sketch=K)`, the default being k = 32). Every arm runs the same loop: the sampler's
order in index slices of the in-memory data (what `DataLoader(sampler=...)` would yield, without its
collate cost), `loss_fn(model(x), y).backward()`, `opt.step()`; `sampler.synchronize()` ends the epoch. Arms
take their epochs in rotation, so a slow spell of this shared machine does not fall on one arm. After each
epoch: the full-pass training loss (mean cross-entropy over all training images; not timed) and the
epoch's wall-clock seconds (recorded only: cost is measured with paired rounds elsewhere, watch_speed.py).
"kept" = (rr - sketched) / (rr - exact) of the training loss, paired per seed; the issue's target is kept
>= 0.8 at every epoch from the third on.

Part "disc" (herding discrepancy of the true per-example gradients): weights fixed after `--disc-after`
RR epochs on the training set; the true per-example gradients (torch.func, vmap of grad) of a seeded
subset of the training set; GraB samplers over that subset are fed, epoch after epoch at those fixed
weights, rows = `handle.project(true gradients)` (the projection the hooks apply, for each sketch size),
or the exact gradients; the order each builds for the next epoch is scored with
`torchgrab.herding_discrepancy(true gradients, order)` (l2), against random orders (mean of a few).
"kept" = (random - sketched) / (random - exact).

Writes OUT/watch_quality_{mnist,cifar}.txt (the printed tables, the command line at the top),
OUT/watch_quality_{mnist,cifar}.csv (one row per arm, seed and epoch, and per discrepancy measurement) and
OUT/watch_quality.png (from every OUT/watch_quality_<task>.csv present, so tasks can be run separately).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import torchgrab  # noqa: E402
from torchgrab import GraBSampler  # noqa: E402
from torchgrab.capture import DEFAULT_SKETCH  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


TASKS = ("mnist", "cifar")
EX = _common.load_module("torchgrab_examples_common", REPO / "examples" / "_common.py")
LeNet = _common.load_module("torchgrab_examples_cifar10_lenet", REPO / "examples" / "cifar10_lenet.py").LeNet
loss_fn = nn.CrossEntropyLoss()
watch_kw: Dict = {}  # extra keywords of every watch() call (--budget)


# --------------------------------------------------------------------------- tasks
class Task:
    """Data, model and optimizer of one experiment, with the settings of its examples/ script."""

    def __init__(self, name, x, y, make_model, lr, wd, batch, eval_batch, title):
        self.name, self.x, self.y = name, x, y
        self.make_model, self.lr, self.wd, self.batch, self.eval_batch = make_model, lr, wd, batch, eval_batch
        self.title = title

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return self.make_model()

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.wd)

    def full_loss(self, model: nn.Module) -> float:
        return EX.full_pass(model, self.x, self.y, loss_fn, batch=self.eval_batch)[0]


def mnist_task(root: Path, n: int, batch: int, lr: float) -> Task:
    # examples/mnist_logreg.py: pixels / 255, then (x - 0.1307) / 0.3081, flattened; nn.Linear(784, 10)
    (xtr, ytr), _ = EX.load_mnist(root)
    if n:
        xtr, ytr = xtr[:n], ytr[:n]
    x = ((torch.tensor(xtr, dtype=torch.float32) / 255.0 - 0.1307) / 0.3081).reshape(len(xtr), -1)
    title = f"MNIST logistic regression, {len(x):,} training images, SGD lr {lr} m 0.9 wd 1e-4, batch {batch}"
    return Task("mnist", x, torch.tensor(ytr), lambda: nn.Linear(784, 10), lr, 1e-4, batch, 4096, title)


def cifar_task(root: Path, n: int, batch: int, lr: float) -> Task:
    # examples/cifar10_lenet.py: the first n/10 images of every class, channel mean/std normalization, LeNet-5
    (xtr, ytr), _ = EX.load_cifar10(root, cache=REPO / "out" / "cifar10.npz")
    if n:
        keep = np.concatenate([np.flatnonzero(ytr == c)[: n // 10] for c in range(10)])
        xtr, ytr = xtr[keep], ytr[keep]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    x = (torch.tensor(xtr).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    title = f"CIFAR-10 LeNet-5, {len(x):,} training images, SGD lr {lr} m 0.9 wd 1e-2, batch {batch}"
    return Task("cifar", x, torch.tensor(ytr), LeNet, lr, 1e-2, batch, 1000, title)


# --------------------------------------------------------------------------- part 1: training loss
def arm_name(sketch: Optional[int]) -> str:
    return "exact" if sketch is None else f"k{sketch}"


class Arm:
    """One training run: `rr`, or GraB fed by `watch(model, sketch=...)`."""

    def __init__(self, task: Task, name: str, seed: int, sketch: Optional[int] = None) -> None:
        self.task, self.name = task, name
        self.model = task.model(seed)
        self.opt = task.optimizer(self.model)
        self.sampler = GraBSampler(n=len(task.x), ordering="rr" if name == "rr" else "grab", seed=seed)
        self.handle = None if name == "rr" else self.sampler.watch(self.model, sketch=sketch, **watch_kw)
        self.width = 0 if self.handle is None else self.handle.width

    def epoch(self) -> float:
        t, model, opt = self.task, self.model, self.opt
        model.train()
        t0 = time.perf_counter()
        order = torch.as_tensor(np.fromiter(iter(self.sampler), dtype=np.int64, count=len(t.x)))
        for i in range(0, len(order), t.batch):
            idx = order[i : i + t.batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(t.x[idx]), t.y[idx]).backward()
            opt.step()
        self.sampler.synchronize()  # the last step's rows fed and balanced: part of the epoch
        return time.perf_counter() - t0


def part_train(task: Task, args, out: "Out", csv_rows: List[Dict]) -> Dict:
    arms = ["rr", "exact"] + [arm_name(k) for k in args.ks]
    sketches = {arm_name(k): k for k in args.ks}
    epochs = args.epochs[task.name]
    loss = {a: np.full((args.seeds, epochs + 1), np.nan) for a in arms}
    secs = {a: np.full((args.seeds, epochs + 1), np.nan) for a in arms}
    widths: Dict[str, int] = {}
    with tqdm(total=args.seeds * epochs * len(arms), desc=f"{task.name} train", unit="epoch", file=sys.stderr) as bar:
        for s in range(args.seeds):
            runs = {a: Arm(task, a, s, sketches.get(a)) for a in arms}
            widths = {a: r.width for a, r in runs.items()}
            for a, r in runs.items():
                loss[a][s, 0], secs[a][s, 0] = task.full_loss(r.model), 0.0
            for e in range(1, epochs + 1):
                rot = (e - 1) % len(arms)
                for a in arms[rot:] + arms[:rot]:
                    secs[a][s, e] = runs[a].epoch()
                    loss[a][s, e] = task.full_loss(runs[a].model)
                    bar.update(1)
                    bar.set_postfix(seed=s, arm=a, loss=f"{loss[a][s, e]:.4f}")
            for a in arms:
                for e in range(epochs + 1):
                    csv_rows.append(
                        dict(
                            part="train",
                            task=task.name,
                            arm=a,
                            sketch="" if a in ("rr", "exact") else sketches[a],
                            K=widths[a],
                            seed=s,
                            epoch=e,
                            train_loss=f"{loss[a][s, e]:.6f}",
                            epoch_seconds=f"{secs[a][s, e]:.3f}",
                        )
                    )
    d = sum(p.numel() for p in task.model(0).parameters())
    out.line(f"\n## Training-loss gain: {task.title}")
    out.line(
        f"n = {len(task.x):,}, d = {d:,}, {args.seeds} seeds (0..{args.seeds - 1}: initial weights and first-epoch "
        f"order shared by every arm of a seed), {epochs} epochs, {torch.get_num_threads()} torch thread(s)"
    )
    out.line("rows K per arm: " + ", ".join(f"{a} K={widths[a]:,}" for a in arms if a != "rr"))
    out.line("\nFull-pass training loss, mean over seeds:")
    out.line(f"{'epoch':>5} " + " ".join(f"{a:>9}" for a in arms))
    for e in range(epochs + 1):
        out.line(f"{e:>5} " + " ".join(f"{loss[a][:, e].mean():>9.5f}" for a in arms))
    out.line("\nGain of exact GraB over RR, rr - exact, per seed (the denominator of 'kept'):")
    out.line(f"{'epoch':>5} " + " ".join(f"{'seed ' + str(s):>9}" for s in range(args.seeds)) + f" {'mean':>9}")
    for e in range(1, epochs + 1):
        g = loss["rr"][:, e] - loss["exact"][:, e]
        out.line(f"{e:>5} " + " ".join(f"{v:>+9.5f}" for v in g) + f" {g.mean():>+9.5f}")
    kept = {}
    for a in arms[2:]:
        with np.errstate(divide="ignore", invalid="ignore"):  # epoch 0 and 1: every arm has the same loss
            kept[a] = (loss["rr"] - loss[a]) / (loss["rr"] - loss["exact"])
            pooled = (loss["rr"] - loss[a]).mean(0) / (loss["rr"] - loss["exact"]).mean(0)
        out.line(
            f"\nkept by {a} (K = {widths[a]:,}) = (rr - {a}) / (rr - exact), per seed paired; 'pooled' = mean gain "
            "over mean gain:"
        )
        out.line(
            f"{'epoch':>5} "
            + " ".join(f"{'seed ' + str(s):>8}" for s in range(args.seeds))
            + f" {'min':>8} {'pooled':>8}"
        )
        for e in range(2, epochs + 1):
            row = kept[a][:, e]
            out.line(f"{e:>5} " + " ".join(f"{v:>8.3f}" for v in row) + f" {row.min():>8.3f} {pooled[e]:>8.3f}")
    first = min(3, epochs)
    out.line(f"\nTarget: kept >= 0.80 at every epoch from the third on, every seed (epochs {first}..{epochs}):")
    for a in arms[2:]:
        block = kept[a][:, first:]
        pooled = (loss["rr"] - loss[a]).mean(0)[first:] / (loss["rr"] - loss["exact"]).mean(0)[first:]
        out.line(
            f"  {a:>5} (K = {widths[a]:>6,}): min over seeds and epochs {block.min():.3f}, median {np.median(block):.3f}, "
            f"min pooled {pooled.min():.3f}; {int((block >= 0.8).sum())}/{block.size} seed-epochs >= 0.80 -> "
            f"{'MEETS' if block.min() >= 0.8 else 'misses'} the target"
        )
    out.line("\nEpoch wall-clock seconds, median over seeds and epochs (recorded, not a paired cost measurement):")
    out.line("  " + ", ".join(f"{a} {np.median(secs[a][:, 1:]):.2f}" for a in arms))
    return dict(loss=loss, secs=secs, kept=kept, widths=widths, arms=arms)


# --------------------------------------------------------------------------- part 2: herding discrepancy
def per_example_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> np.ndarray:
    """[n, d] float64: each example's true gradient of its own loss (torch.func vmap of grad), parameters in
    `named_parameters()` order, flattened."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xb, yb):
        return loss_fn(functional_call(model, p, (xb.unsqueeze(0),)), yb.unsqueeze(0))

    g = vmap(grad(one), in_dims=(None, 0, 0))
    d = sum(v.numel() for v in params.values())
    out = np.empty((len(x), d), dtype=np.float64)
    for i in range(0, len(x), chunk):
        gr = g(params, x[i : i + chunk], y[i : i + chunk])
        out[i : i + chunk] = torch.cat([gr[k].reshape(gr[k].shape[0], -1) for k in params], 1).double().numpy()
    return out


def split(model: nn.Module, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
    """{name: [B, *shape]} from [B, d] rows in `named_parameters()` order."""
    out, o = {}, 0
    for k, p in model.named_parameters():
        out[k] = flat[:, o : o + p.numel()].reshape(flat.shape[0], *p.shape)
        o += p.numel()
    return out


def balance(rows: Callable[[np.ndarray], np.ndarray], n: int, batch: int, epochs: int, seed: int) -> List[np.ndarray]:
    """GraB over n fixed rows: the order built for epochs 1..E, each after one more epoch of balancing."""
    s = GraBSampler(n=n, ordering="grab", seed=seed)
    orders = []
    order = np.fromiter(iter(s), dtype=np.int64, count=n)
    for _ in range(epochs):
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            s.step(np.ascontiguousarray(rows(idx), dtype=np.float32))
        order = np.fromiter(iter(s), dtype=np.int64, count=n)
        orders.append(order)
    return orders


def project_all(
    model: nn.Module, G: np.ndarray, project: Callable[[Dict[str, torch.Tensor]], torch.Tensor]
) -> np.ndarray:
    """[n, K]: `project` ({parameter name: [b, *shape]} -> [b, K]) of the rows of G, 512 at a time."""
    with torch.no_grad():
        parts = [project(split(model, torch.from_numpy(G[i : i + 512]).float())).numpy() for i in range(0, len(G), 512)]
    return np.concatenate(parts)


def true_gradients(task: Task, model: nn.Module, n_sub: int) -> Tuple[float, np.ndarray, float]:
    """At the model's weights: the full training loss, the true per-example gradients of a seeded subset of
    n_sub training examples (the same subset for every script that scores orders on them), and the
    seconds they took."""
    fixed_loss = task.full_loss(model)
    sub = np.sort(np.random.default_rng(0).choice(len(task.x), size=n_sub, replace=False))
    t0 = time.perf_counter()
    G = per_example_gradients(model, task.x[sub], task.y[sub], chunk=256)
    return fixed_loss, G, time.perf_counter() - t0


def score_orders(
    G: np.ndarray, rows_by: Dict[str, np.ndarray], batch: int, epochs: int, random_orders: int, tick=lambda: None
) -> Tuple[Dict[str, List[float]], List[float]]:
    """GraB over each arm's rows at fixed weights; each order it builds scored on the true gradients G
    (herding discrepancy, l2); and the same score of seeded random orders. `tick` after each arm and
    each random order (a progress bar)."""
    n = len(G)
    disc: Dict[str, List[float]] = {}
    for a, src in rows_by.items():
        orders = balance(lambda idx: src[idx], n, batch, epochs, seed=0)
        disc[a] = [torchgrab.herding_discrepancy(G, o).l2 for o in orders]
        tick()
    rand = []
    for r in range(random_orders):
        rand.append(torchgrab.herding_discrepancy(G, np.random.default_rng(1000 + r).permutation(n)).l2)
        tick()
    return disc, rand


def disc_table(out: "Out", disc: Dict[str, List[float]], rnd: float, widths: Dict[str, int], name_width: int, csv_row):
    """The table of discrepancy, ratio to random orders and kept share per arm and balancing epoch
    (arm "exact" is the reference); `csv_row(arm, epoch, value, kept)` gives each cell's CSV row."""
    epochs = len(disc["exact"])
    hdr = " ".join(f"{'after ' + str(j + 1):>8} {'ratio':>6} {'kept':>6}" for j in range(epochs))
    out.line(f"{'rows':{name_width}} {'K':>7} {hdr}")
    rows = []
    for a, values in disc.items():
        cells = []
        for j, v in enumerate(values):
            kept = (rnd - v) / (rnd - disc["exact"][j])
            cells.append(f"{v:>8.4f} {v / rnd:>6.3f} {kept:>6.3f}")
            rows.append(csv_row(a, j + 1, v, kept))
        out.line(f"{a:{name_width}} {widths[a]:>7,} " + " ".join(cells))
    return rows


def part_disc(task: Task, args, out: "Out", csv_rows: List[Dict]) -> Dict:
    n_sub = min(args.disc_n[task.name], len(task.x))
    arm = Arm(task, "rr", 0)
    for _ in range(args.disc_after):
        arm.epoch()
    model = arm.model
    fixed_loss, G, t_grad = true_gradients(task, model, n_sub)
    n, d = G.shape
    rows_by: Dict[str, np.ndarray] = {"exact": G}
    widths: Dict[str, int] = {"exact": d}
    with tqdm(total=len(args.ks) + 1 + args.random_orders, desc=f"{task.name} disc", file=sys.stderr) as bar:
        for k in args.ks:
            h = GraBSampler(n=n, ordering="grab", seed=0).watch(model, sketch=k, **watch_kw)
            rows_by[arm_name(k)] = project_all(model, G, h.project)
            h.remove()
            widths[arm_name(k)] = rows_by[arm_name(k)].shape[1]
        disc, rand = score_orders(
            G, rows_by, task.batch, args.disc_epochs, args.random_orders, tick=lambda: bar.update(1)
        )
    arms = list(disc)
    rnd = float(np.mean(rand))
    out.line(f"\n## Herding discrepancy of the true per-example gradients: {task.title}")
    out.line(
        f"weights fixed after {args.disc_after} RR epoch(s) on the {len(task.x):,} training images (seed 0; full "
        f"training loss {fixed_loss:.5f}); true per-example gradients (torch.func vmap(grad), {t_grad:.1f} s) of a "
        f"seeded subset of n = {n:,} images, d = {d:,}; GraB (seed 0) balances rows of those {n:,} gradients in "
        f"batches of {task.batch}, {args.disc_epochs} epoch(s) at the fixed weights; each order it builds is scored "
        f"with herding_discrepancy(true gradients, order).l2"
    )
    out.line(
        f"random orders: mean {rnd:.4f} over {args.random_orders} (min {min(rand):.4f}, max {max(rand):.4f}); "
        "ratio = discrepancy / random; kept = (random - arm) / (random - exact)"
    )

    def csv_row(a, epoch, v, kept):
        return dict(
            part="disc",
            task=task.name,
            arm=a,
            sketch="" if a == "exact" else a[1:],
            K=widths[a],
            seed=0,
            epoch=epoch,
            disc_n=n,
            disc_after=args.disc_after,
            discrepancy_l2=f"{v:.6f}",
            random_l2=f"{rnd:.6f}",
            ratio_to_random=f"{v / rnd:.4f}",
            kept=f"{kept:.4f}",
        )

    csv_rows += disc_table(out, disc, rnd, widths, ">6", csv_row)
    out.line("('after j': the order built after j epoch(s) of balancing at the fixed weights, used in epoch j + 1)")
    return dict(disc=disc, random=rnd, widths=widths, arms=arms)


# --------------------------------------------------------------------------- output
def preamble(args) -> List[str]:
    return _common.provenance() + [
        f"# default sketch (torchgrab.capture.DEFAULT_SKETCH) = {DEFAULT_SKETCH}; extra watch() keywords {watch_kw}"
    ]


def read_results(path_dir: str) -> Dict[str, Dict]:
    """{task: {"train": ..., "disc": ...}} from the OUT/watch_quality_<task>.csv files present (tasks may have been
    run by separate commands; the figure shows every task found)."""
    results: Dict[str, Dict] = {}
    for task in TASKS:
        path = os.path.join(path_dir, f"watch_quality_{task}.csv")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows = list(csv.DictReader(f))
        r: Dict = {}
        train = [x for x in rows if x["part"] == "train"]
        if train:
            arms = list(dict.fromkeys(x["arm"] for x in train))
            seeds = sorted({int(x["seed"]) for x in train})
            epochs = max(int(x["epoch"]) for x in train)
            loss = {a: np.full((len(seeds), epochs + 1), np.nan) for a in arms}
            for x in train:
                loss[x["arm"]][seeds.index(int(x["seed"])), int(x["epoch"])] = float(x["train_loss"])
            widths = {x["arm"]: int(x["K"]) for x in train}
            r["train"] = dict(arms=arms, loss=loss, widths=widths, seeds=len(seeds))
        disc = [x for x in rows if x["part"] == "disc"]
        if disc:
            arms = list(dict.fromkeys(x["arm"] for x in disc))
            n_ep = max(int(x["epoch"]) for x in disc)
            d = {a: [float("nan")] * n_ep for a in arms}
            for x in disc:
                d[x["arm"]][int(x["epoch"]) - 1] = float(x["discrepancy_l2"])
            r["disc"] = dict(
                arms=arms,
                disc=d,
                random=float(disc[0]["random_l2"]),
                widths={x["arm"]: int(x["K"]) for x in disc},
                epochs=n_ep,
            )
        results[task] = r
    return results


def plot(path_dir: str) -> None:
    plt = _common.pyplot()
    results = read_results(path_dir)
    if plt is None or not results:
        return
    tasks = list(results)
    fig, axes = plt.subplots(len(tasks), 3, figsize=(16, 4.4 * len(tasks)), squeeze=False)
    for i, t in enumerate(tasks):
        r = results[t]
        ax_l, ax_k, ax_d = axes[i]
        if "train" in r:
            tr = r["train"]
            for c, a in enumerate(tr["arms"]):
                m = tr["loss"][a].mean(0)
                ep = np.arange(len(m))
                label = a if a in ("rr", "exact") else f"{a} (K={tr['widths'][a]:,})"
                ax_l.plot(ep[1:], m[1:], marker=".", label=label, color=f"C{c}")
                ax_k.plot(ep[1:], (m - tr["loss"]["rr"].mean(0))[1:], marker=".", label=label, color=f"C{c}")
            ax_l.set(title=f"{t}: full training loss (mean of {tr['seeds']} seeds)", xlabel="epoch", ylabel="loss")
            ax_l.set_yscale("log")
            ax_k.axhline(0, color="k", lw=0.8)
            ax_k.set(title=f"{t}: arm - rr, mean of paired seeds (< 0: gain)", xlabel="epoch", ylabel="loss - rr loss")
            ax_l.legend(fontsize=8)
            ax_k.legend(fontsize=8)
        if "disc" in r:
            dr = r["disc"]
            ks = [a for a in dr["arms"] if a != "exact"]
            xs = [dr["widths"][a] for a in ks]
            for j in range(dr["epochs"]):
                (line,) = ax_d.plot(
                    xs,
                    [dr["disc"][a][j] / dr["random"] for a in ks],
                    marker="o",
                    label=f"sketched, order after {j + 1}",
                )
                ax_d.axhline(dr["disc"]["exact"][j] / dr["random"], color=line.get_color(), ls="--", lw=1)
            for a, x in zip(ks, xs):
                ax_d.annotate(f"k={a[1:]}", (x, dr["disc"][a][-1] / dr["random"]), fontsize=8)
            ax_d.axhline(1.0, color="k", lw=0.8)
            ax_d.set_xscale("log")
            ax_d.set(
                title=f"{t}: herding discrepancy / random (dashed: exact)",
                xlabel="sketch width K (numbers per example)",
                ylabel="l2 discrepancy / random orders'",
            )
            ax_d.legend(fontsize=8)
    _common.save_plot(fig, path_dir, "watch_quality.png")


def main(argv=None) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help=f"data root in the layouts of ../shared/data ({EX.DEFAULT_DATA})")
    ap.add_argument("--part", choices=["train", "disc", "both"], default="both")
    ap.add_argument("--tasks", default="mnist,cifar", help="comma-separated: mnist, cifar")
    ap.add_argument("--ks", default="8,16,32,64", help="sketch sizes k of the sketched arms")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--mnist-epochs", type=int, default=10)
    ap.add_argument("--cifar-epochs", type=int, default=8)
    ap.add_argument("--mnist-n", type=int, default=0, help="first N MNIST training images (0 = all 60,000)")
    ap.add_argument("--cifar-n", type=int, default=10000, help="class-balanced CIFAR-10 subset (0 = all 50,000)")
    ap.add_argument("--mnist-batch", type=int, default=64)
    ap.add_argument("--cifar-batch", type=int, default=16)
    ap.add_argument("--mnist-lr", type=float, default=0.01)
    ap.add_argument("--cifar-lr", type=float, default=1e-3)
    ap.add_argument("--disc-after", type=int, default=1, help="RR epochs before the weights are fixed")
    ap.add_argument("--disc-epochs", type=int, default=3, help="balancing epochs at the fixed weights")
    ap.add_argument("--disc-mnist-n", type=int, default=60000, help="examples whose true gradients are scored")
    ap.add_argument("--disc-cifar-n", type=int, default=4096)
    ap.add_argument("--random-orders", type=int, default=5)
    ap.add_argument(
        "--budget",
        default=None,
        help="pass watch(budget=...) ('none' or a fraction), where this torchgrab has it (default: not passed)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out; with --quick a temp folder)")
    ap.add_argument("--quick", action="store_true", help="tiny subsets, 1 seed, 3 epochs: a smoke run")
    ap.add_argument("--plot-only", action="store_true", help="re-make OUT/watch_quality.png from the CSVs in OUT")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(args.out or os.path.join(here, "out"))
        return
    if args.quick:
        args.seeds, args.mnist_epochs, args.cifar_epochs = 1, 3, 3
        args.mnist_n, args.cifar_n, args.disc_mnist_n, args.disc_cifar_n = 2048, 500, 256, 256
        args.disc_epochs, args.random_orders, args.ks = 2, 2, "8,32"
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="watch_quality_") if args.quick else os.path.join(here, "out")
    os.makedirs(args.out, exist_ok=True)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.epochs = {"mnist": args.mnist_epochs, "cifar": args.cifar_epochs}
    args.disc_n = {"mnist": args.disc_mnist_n, "cifar": args.disc_cifar_n}
    if args.budget is not None:
        watch_kw["budget"] = None if args.budget.lower() == "none" else float(args.budget)
    torch.set_num_threads(args.threads)
    root = EX.data_root(args.data)
    pre = preamble(args)
    t_start = time.perf_counter()
    csv_rows: List[Dict] = []
    for name in args.tasks:
        t_task = time.perf_counter()
        out = _common.Out()
        for ln in pre + _common.header_lines(f"watch(): what the sketch keeps of GraB, task {name}"):
            out.line(ln)
        if name == "mnist":
            task = mnist_task(root, args.mnist_n, args.mnist_batch, args.mnist_lr)
        elif name == "cifar":
            task = cifar_task(root, args.cifar_n, args.cifar_batch, args.cifar_lr)
        else:
            ap.error(f"unknown task {name!r}")
        if args.part in ("train", "both"):
            part_train(task, args, out, csv_rows)
        if args.part in ("disc", "both"):
            part_disc(task, args, out, csv_rows)
        out.line(f"\n# {name}: {time.perf_counter() - t_task:.0f} s, load average now {_common.load_average()}")
        out.save(os.path.join(args.out, f"watch_quality_{name}.txt"))
        _common.write_csv(os.path.join(args.out, f"watch_quality_{name}.csv"), csv_rows)
        csv_rows = []
    plot(args.out)
    print(f"# total {time.perf_counter() - t_start:.0f} s; wrote {args.out}/watch_quality_<task>.txt and .csv")


if __name__ == "__main__":
    main()
