"""Which first epoch should the balancing orderings default to? (issue 17, item 3)

GraB's first epoch has no gradients to order by, so it is either a seeded random permutation
(``first_epoch="random"``, the default) or the dataset's own order (``"identity"``). This trains MNIST
logistic regression (the paper's setting: SGD lr 0.01, momentum 0.9, weight decay 1e-4, batch 64, fed
through ``sampler.watch``) with `grab` and `pair` under both, against `rr`, on two versions of the same
training images: as stored, and sorted by label (as many datasets on disk are: one folder per class).
Each cell is the full-pass training loss after the epoch, the median over seeds, and the paired
difference identity - random per seed.

    .venv/bin/python benchmarks/first_epoch.py              # out/first_epoch.txt and out/first_epoch.png
    .venv/bin/python benchmarks/first_epoch.py --quick      # a few seconds: 2,000 images, 2 epochs, 1 seed
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import _common as C  # noqa: E402
from torchgrab import GraBSampler  # noqa: E402

ARMS = [("rr", "random"), ("grab", "random"), ("grab", "identity"), ("pair", "random"), ("pair", "identity")]


def train(x, y, ordering, first_epoch, seed, epochs, batch=64):
    """Full-pass training loss after each epoch (index 0: the initial model)."""
    torch.manual_seed(seed)
    model = nn.Linear(784, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    kw = {} if ordering == "rr" else {"first_epoch": first_epoch}
    sampler = GraBSampler(n=len(y), ordering=ordering, seed=seed, **kw)
    if sampler.balances:
        sampler.watch(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, sampler=sampler)
    loss_fn = nn.CrossEntropyLoss()
    losses = [C.full_pass(model, x, y, loss_fn)[0]]
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
        losses.append(C.full_pass(model, x, y, loss_fn)[0])
    return losses


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subset", type=int, default=10_000, help="the first N training images (0 = all 60,000)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "first_epoch"))
    a = ap.parse_args(argv)
    if a.quick:
        a.subset, a.epochs, a.seeds = 2000, 2, 1
    torch.set_num_threads(1)
    (xtr, ytr), _ = C.load_mnist(C.data_root(None))
    if a.subset:
        xtr, ytr = xtr[: a.subset], ytr[: a.subset]
    x = ((torch.tensor(xtr, dtype=torch.float32) / 255.0 - 0.1307) / 0.3081).reshape(len(xtr), -1)
    y = torch.tensor(ytr)
    by_label = torch.argsort(y, stable=True)
    datasets = {"as stored": (x, y), "sorted by label": (x[by_label], y[by_label])}
    t0 = time.perf_counter()
    res = {}  # (dataset, ordering, first_epoch) -> [seeds, epochs + 1]
    for name, (xd, yd) in datasets.items():
        for ordering, first in ARMS:
            res[name, ordering, first] = np.array(
                [train(xd, yd, ordering, first, s, a.epochs) for s in range(a.seeds)], dtype=float
            )
            print(f"  {name:16s} {ordering:5s} {first:8s} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    lines = [
        f"MNIST logistic regression, {len(y)} images, SGD lr 0.01 m 0.9 wd 1e-4, batch 64, watch(), "
        f"{a.epochs} epochs, seeds 0..{a.seeds - 1}",
        "",
        "Full-pass training loss after each epoch, median over seeds:",
        "",
        "| images | ordering | first_epoch | " + " | ".join(f"e{e}" for e in range(1, a.epochs + 1)) + " |",
        "|---|---|---|" + "---|" * a.epochs,
    ]
    for (name, ordering, first), v in res.items():
        cells = " | ".join(f"{m:.4f}" for m in np.median(v[:, 1:], 0))
        lines.append(f"| {name} | {ordering} | {first} | {cells} |")
    lines += ["", "Paired by seed, identity - random (negative: identity lower), per epoch [per seed]:", ""]
    for name in datasets:
        for ordering in ("grab", "pair"):
            d = res[name, ordering, "identity"] - res[name, ordering, "random"]
            per = "; ".join(f"e{e}: " + " ".join(f"{x:+.4f}" for x in d[:, e]) for e in range(1, a.epochs + 1))
            lines.append(f"- {name}, {ordering}: {per}")
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(text + "\n")
    if a.quick:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, name in zip(axes, datasets):
        for (n, ordering, first), v in res.items():
            if n != name:
                continue
            ax.plot(
                range(1, a.epochs + 1),
                np.median(v[:, 1:], 0),
                marker=".",
                linestyle="-" if first == "random" else "--",
                label=f"{ordering}" + ("" if ordering == "rr" else f", {first}"),
            )
        ax.set(xlabel="epoch", ylabel="full-pass training loss (median of seeds)", title=f"MNIST, {name}")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out.with_suffix('.txt')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
