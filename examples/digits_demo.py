"""The main job: logistic regression on scikit-learn's handwritten digits (1,797 real 8x8 images that
ship inside scikit-learn), trained with random reshuffling (`rr`) and with GraB (`grab`), same model,
same initialization, same optimizer. Prints a per-epoch table and writes a plot.

    python examples/digits_demo.py [--epochs 20] [--seeds 3] [--out out/digits_demo.png]

Each ordering is trained from the same initialization for every seed; the table reports the mean over
seeds (the train loss is the full-data loss measured after each epoch).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchgrab import GraBSampler
from tqdm import tqdm


def load(seed: int):
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    to_t = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    return TensorDataset(to_t(x_tr), torch.tensor(y_tr)), (to_t(x_te), torch.tensor(y_te))


def evaluate(model, data, loss_fn):
    model.eval()
    with torch.no_grad():
        x, y = data
        out = model(x)
        loss = loss_fn(out, y).item()
        acc = (out.argmax(1) == y).float().mean().item()
    model.train()
    return loss, acc


def train(ordering: str, seed: int, args, bar) -> list[dict]:
    train_set, test = load(seed)
    torch.manual_seed(seed)
    model = nn.Linear(64, 10)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sampler = GraBSampler(train_set, ordering=ordering, seed=seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    full = (train_set.tensors[0], train_set.tensors[1])
    rows = []
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            sampler.backward(model, loss_fn, x, y)
            opt.step()
        train_loss, _ = evaluate(model, full, loss_fn)
        _, test_acc = evaluate(model, test, loss_fn)
        rows.append(dict(epoch=epoch + 1, train_loss=train_loss, test_acc=test_acc, seconds=time.perf_counter() - t0))
        bar.set_postfix(ordering=ordering, seed=seed, loss=f"{train_loss:.4f}")
        bar.update(1)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="out/digits_demo.png")
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny model: threads only add overhead

    orderings = ["rr", "grab"]
    runs = {o: [] for o in orderings}
    with tqdm(total=args.epochs * len(orderings) * args.seeds, desc="training", unit="epoch") as bar:
        for seed in range(args.seeds):
            for ordering in orderings:
                runs[ordering].append(train(ordering, seed, args, bar))
    loss = {o: np.array([[r["train_loss"] for r in run] for run in runs[o]]) for o in orderings}
    acc = {o: np.array([[r["test_acc"] for r in run] for run in runs[o]]) for o in orderings}

    n_train = len(load(0)[0])
    print(
        f"\nLogistic regression on sklearn digits ({n_train} train / {1797 - n_train} test images), "
        f"SGD lr {args.lr}, momentum 0.9, weight decay 1e-4, batch {args.batch_size}; mean of {args.seeds} seeds"
    )
    print(
        f"{'epoch':>5} | {'rr train loss':>13} {'test acc':>8} | {'grab train loss':>15} {'test acc':>8} | {'grab/rr loss':>12}"
    )
    for e in range(args.epochs):
        lr_, lg = loss["rr"][:, e].mean(), loss["grab"][:, e].mean()
        print(
            f"{e + 1:>5} | {lr_:>13.5f} {acc['rr'][:, e].mean():>8.2%} | {lg:>15.5f} {acc['grab'][:, e].mean():>8.2%} | {lg / lr_:>12.3f}"
        )
    for o in orderings:
        secs = np.mean([run[-1]["seconds"] for run in runs[o]])
        print(
            f"{o:>5}: final train loss {loss[o][:, -1].mean():.5f} +/- {loss[o][:, -1].std():.5f}, "
            f"{secs:.1f} s per {args.epochs}-epoch run"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ep = np.arange(1, args.epochs + 1)
    for o in orderings:
        ax1.plot(ep, loss[o].mean(0), label=o)
        ax1.fill_between(ep, loss[o].min(0), loss[o].max(0), alpha=0.2)
        ax2.plot(ep, acc[o].mean(0), label=o)
    ax1.set_yscale("log")
    ax1.set(xlabel="epoch", ylabel="full training loss", title=f"train loss (mean, min-max of {args.seeds} seeds)")
    ax2.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy (mean)")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("sklearn digits, logistic regression: random reshuffling vs GraB")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"plot written to {args.out}")


if __name__ == "__main__":
    main()
