"""Which tree depth should `recursive` and `recursive-pair` default to? (issue 17, item 3)

Herding discrepancy (benchmarks/discrepancy.py's measure: vectors fed to the sampler as gradients in
steps of B; after each epoch the order built for the next epoch is scored by
max_k || sum_{t<=k} (v_order(t) - mean) ||, l_inf and l2) of `recursive` and `recursive-pair` at
depth 0..7, against `rr`, `grab` and `pair`, on three kinds of vectors:

  gaussian   n = 1,200 fixed vectors, d = 24, a shared N(0,1) offset per coordinate plus N(0,1) noise
             (discrepancy.py's generator); the seed draws the vectors and seeds the sampler.
  mnist      fixed per-example gradients (d = 7,850, weights and bias) of a softmax regression on the
             first 2,048 MNIST training images, at the weights after one epoch of plain SGD (lr 0.05,
             batch 32, random reshuffling) from a seeded initialization; the seed sets the
             initialization, the SGD orders and the sampler's seed.
  mnist-sgd  the same model, but the gradients move as training does: epoch k is fed the gradients at
             the weights after k + 1 SGD epochs, and the order it builds is scored on those after
             k + 2 epochs (the gradients that order will meet). The SGD trajectory is the same for
             every ordering, so only the orders differ. This is where a stale mean is really stale.

B = 32 rows per step, 4 epochs, seeds 0..2. Each cell is a discrepancy divided by rr's for the same
seed and vectors (lower is better; 1 = no better than random reshuffling): the median over the seeds
and [min, max], after the first epoch (e1) and after the last (e4). On fixed vectors this loop is
discrepancy.py's `run`.

    .venv/bin/python benchmarks/depth.py             # out/depth.txt and out/depth.png
    .venv/bin/python benchmarks/depth.py --quick     # a few seconds: 1 seed, depths 0..3, no plot
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from torchgrab import GraBSampler, herding_discrepancy  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DISC = _common.load_module("torchgrab_benchmarks_discrepancy", REPO / "benchmarks" / "discrepancy.py")
EX = _common.load_module("torchgrab_examples_common", REPO / "examples" / "_common.py")

BASELINES = ("rr", "grab", "pair")
FAMILY = ("recursive", "recursive-pair")
SETTINGS = ("gaussian", "mnist", "mnist-sgd")


def gaussian_vectors(n: int, d: int, seed: int) -> np.ndarray:
    # discrepancy.py's generator: a shared offset per coordinate plus unit Gaussian noise.
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(1, d)) + rng.normal(size=(n, d))).astype(np.float32)


def mnist_trajectory(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int, lr: float = 0.05, batch: int = 32):
    """Per-example gradients of a softmax regression (784 -> 10, bias) after 1, 2, ..., `epochs` epochs
    of plain SGD with random reshuffling, as float32 arrays [n, 7850] (weight gradients, then bias)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], 10)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for lo in range(0, len(x), batch):
            idx = order[lo : lo + batch]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            # d loss_i / d logits = softmax - onehot; weight gradient = its outer product with x_i.
            r = torch.softmax(model(x), dim=1) - torch.nn.functional.one_hot(y, 10).to(x.dtype)
            g = torch.cat([(r[:, :, None] * x[:, None, :]).reshape(len(x), -1), r], dim=1)
        out.append(np.ascontiguousarray(g.numpy(), dtype=np.float32))
    return out


def arms(depths: List[int]) -> List[Tuple[str, Dict]]:
    """(row label, constructor keywords)."""
    out = [(name, {"ordering": name}) for name in BASELINES]
    for name in FAMILY:
        out += [(f"{name} D={k}", {"ordering": name, "depth": k}) for k in depths]
    return out


def run(kw: Dict, fed: List[np.ndarray], scored: List[np.ndarray], batch: int, seed: int) -> Dict[str, List[float]]:
    """discrepancy.py's `run`, with vectors that may change per epoch: epoch k is fed fed[k] in the
    sampler's order, and the order it builds for epoch k + 1 is scored on scored[k]."""
    n = fed[0].shape[0]
    s = GraBSampler(n=n, seed=seed, **kw)
    linf, l2 = [], []
    for v, w in zip(fed, scored):
        order = np.fromiter(iter(s), dtype=np.int64, count=n)
        for lo in range(0, n, batch):
            s.step(v[order[lo : lo + batch]])
        d = herding_discrepancy(w, np.fromiter(iter(s), dtype=np.int64, count=n))
        linf.append(d.linf)
        l2.append(d.l2)
    return {"linf": linf, "l2": l2}


def cell(xs: List[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{float(np.median(xs)):.2f} [{min(xs):.2f}, {max(xs):.2f}]"


def main(argv: Optional[List[str]] = None) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated: {', '.join(SETTINGS)}")
    ap.add_argument("--depths", default="0,1,2,3,4,5,6,7")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gaussian-n", type=int, default=1200)
    ap.add_argument("--gaussian-d", type=int, default=24)
    ap.add_argument("--mnist-n", type=int, default=2048, help="the first N MNIST training images")
    ap.add_argument("--data", default=None, help=f"data root in the layout of ../shared/data ({EX.DEFAULT_DATA})")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out; with --quick a temp folder)")
    ap.add_argument("--quick", action="store_true", help="1 seed, depths 0..3, 2 epochs, 512 MNIST images")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.depths, args.epochs, args.mnist_n = 1, "0,1,2,3", 2, 512
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="depth_") if args.quick else os.path.join(here, "out")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    depths = [int(k) for k in args.depths.split(",") if k]
    settings = [s for s in args.settings.split(",") if s]
    for setting in settings:
        if setting not in SETTINGS:
            ap.error(f"unknown setting {setting!r}; expected some of {', '.join(SETTINGS)}")
    runs = arms(depths)
    e = args.epochs

    out = _common.begin_result(
        "Depth of recursive and recursive-pair: herding discrepancy against rr (issue 17, item 3)", bandwidth=False
    )
    out.line(
        f"# B = {args.batch} rows per step, {e} epochs, seeds 0..{args.seeds - 1}; cells: discrepancy of the order "
        f"built after epoch 1 (e1) and after epoch {e} (e{e}) / rr's (same seed), median [min, max]"
    )

    mnist_x = mnist_y = None
    if any(s.startswith("mnist") for s in settings):
        (xtr, ytr), _ = EX.load_mnist(EX.data_root(args.data))
        xtr, ytr = xtr[: args.mnist_n], ytr[: args.mnist_n]
        # examples/mnist_logreg.py's input scaling.
        mnist_x = ((torch.tensor(xtr, dtype=torch.float32) / 255.0 - 0.1307) / 0.3081).reshape(len(xtr), -1)
        mnist_y = torch.tensor(ytr, dtype=torch.int64)

    # results[setting][label][metric] = one number per seed; metric in linf1, l21, linfE, l2E (ratios to rr)
    results: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    titles = {}
    for setting in settings:
        t0 = time.perf_counter()
        table: Dict[str, Dict[str, List[float]]] = {label: {} for label, _ in runs}
        for seed in range(args.seeds):
            if setting == "gaussian":
                v = gaussian_vectors(args.gaussian_n, args.gaussian_d, seed)
                fed = scored = [v] * e
            elif setting == "mnist":
                v = mnist_trajectory(mnist_x, mnist_y, seed, 1, batch=args.batch)[0]
                fed = scored = [v] * e
            else:
                traj = mnist_trajectory(mnist_x, mnist_y, seed, e + 1, batch=args.batch)
                fed, scored = traj[:e], traj[1:]
            titles[setting] = f"{setting}: n = {fed[0].shape[0]:,}, d = {fed[0].shape[1]:,}"
            got = {label: run(kw, fed, scored, args.batch, seed) for label, kw in runs}
            rr = got["rr"]
            for label, r in got.items():
                t = table[label]
                for metric in ("linf", "l2"):
                    t.setdefault(f"{metric}1", []).append(r[metric][0] / rr[metric][0])
                    t.setdefault(f"{metric}E", []).append(r[metric][-1] / rr[metric][-1])
                    t.setdefault(f"abs_{metric}E", []).append(r[metric][-1])
            print(f"  {setting} seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        results[setting] = table
        out.line()
        out.line(f"## {titles[setting]} ({time.perf_counter() - t0:.0f} s)")
        out.line()
        out.line(
            f"| ordering | l_inf / rr e1 | l2 / rr e1 | l_inf / rr e{e} | l2 / rr e{e} | l_inf e{e} (abs.) | l2 e{e} (abs.) |"
        )
        out.line("|---|---|---|---|---|---:|---:|")
        for label, _ in runs:
            t = table[label]
            out.line(
                f"| {label} | {cell(t['linf1'])} | {cell(t['l21'])} | {cell(t['linfE'])} | {cell(t['l2E'])} | "
                f"{np.median(t['abs_linfE']):.3g} | {np.median(t['abs_l2E']):.3g} |"
            )

    out.line()
    out.line("## Summary: median l2 / rr, averaged over the settings, after epoch 1 and after the last epoch")
    out.line()
    out.line("| ordering | after | " + " | ".join(f"D={k}" for k in depths) + " | lowest at |")
    out.line("|---|---|" + "---:|" * (len(depths) + 1))
    for name in FAMILY:
        for metric, when in (("l21", "e1"), ("l2E", f"e{e}")):
            score = [float(np.mean([np.median(results[s][f"{name} D={k}"][metric]) for s in settings])) for k in depths]
            best = depths[int(np.argmin(score))]
            out.line(f"| {name} | {when} | " + " | ".join(f"{x:.3f}" for x in score) + f" | D={best} |")
    out.line("(D=0 is exactly grab for recursive and exactly pair for recursive-pair.)")

    out.save(os.path.join(args.out, "depth.txt"))
    print(f"# table: {os.path.join(args.out, 'depth.txt')}")
    plt = None if args.quick else _common.pyplot()
    if plt is not None:
        fig, axes = plt.subplots(2, len(settings), figsize=(5.5 * len(settings), 8), squeeze=False)
        for row, (metric, when) in enumerate((("l21", "after epoch 1"), ("l2E", f"after epoch {e}"))):
            for ax, setting in zip(axes[row], settings):
                table = results[setting]
                for name, color in zip(FAMILY, ("tab:blue", "tab:orange")):
                    xs = [table[f"{name} D={k}"][metric] for k in depths]
                    med = np.array([np.median(x) for x in xs])
                    err = [med - [min(x) for x in xs], [max(x) for x in xs] - med]
                    ax.errorbar(depths, med, yerr=err, marker="o", capsize=3, color=color, label=name)
                for name, color in zip(BASELINES[1:], ("tab:green", "tab:red")):
                    ax.axhline(np.median(table[name][metric]), linestyle="--", color=color, label=f"{name} (no depth)")
                ax.set_xlabel("depth D")
                ax.set_ylabel(f"l2 discrepancy / rr's, {when}")
                ax.set_xticks(depths)
                ax.set_title(titles[setting], fontsize=10)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle(
            f"B = {args.batch}, median and range over {args.seeds} seeds (benchmarks/depth.py)",
            fontsize=10,
        )
        _common.save_plot(fig, args.out, "depth.png")


if __name__ == "__main__":
    main()
