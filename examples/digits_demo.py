"""The main job: logistic regression on scikit-learn's handwritten digits (1,797 real 8x8 images that
ship inside scikit-learn), trained with random reshuffling (`rr`: `shuffle=True`) and with GraB (`grab`:
`sampler=GraBSampler(...)` plus `sampler.watch(model)`), the same loop with a plain `loss.backward()`,
same model, initialization and optimizer. Prints a per-epoch table, the training seconds and the time
GraB needs to reach RR's final loss, and writes a plot of the loss against epochs and wall-clock time.

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
    if ordering == "rr":
        loader = DataLoader(
            train_set, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
    else:
        sampler = GraBSampler(train_set, ordering=ordering, seed=seed)
        sampler.watch(model)  # hooks sketch each example's gradient inside loss.backward()
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    full = (train_set.tensors[0], train_set.tensors[1])
    rows = [dict(epoch=0, train_loss=evaluate(model, full, loss_fn)[0], test_acc=float("nan"), seconds=0.0)]
    seconds = 0.0  # training time only: the full-data evaluations below are not timed
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        for x, y in loader:  # the ordinary loop: nothing GraB-specific in it
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        seconds += time.perf_counter() - t0
        train_loss, _ = evaluate(model, full, loss_fn)
        _, test_acc = evaluate(model, test, loss_fn)
        rows.append(dict(epoch=epoch + 1, train_loss=train_loss, test_acc=test_acc, seconds=seconds))
        bar.set_postfix(ordering=ordering, seed=seed, loss=f"{train_loss:.4f}")
        bar.update(1)
    return rows


def time_to(seconds: np.ndarray, losses: np.ndarray, target: float):
    """The first time the loss reaches ``target``, interpolating linearly between evaluations; or None."""
    for k in range(1, len(losses)):
        if losses[k] <= target:
            if losses[k - 1] <= target:
                return float(seconds[k - 1])
            f = (losses[k - 1] - target) / (losses[k - 1] - losses[k])
            return float(seconds[k - 1] + f * (seconds[k] - seconds[k - 1]))
    return None


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
    curves = {
        o: [(np.array([r["seconds"] for r in run]), np.array([r["train_loss"] for r in run])) for run in runs[o]]
        for o in orderings
    }
    # Epoch 0 (the initial loss) is only the start of the wall-clock curves.
    loss = {o: np.array([[r["train_loss"] for r in run[1:]] for run in runs[o]]) for o in orderings}
    acc = {o: np.array([[r["test_acc"] for r in run[1:]] for run in runs[o]]) for o in orderings}

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
            f"{secs:.2f} s of training per {args.epochs}-epoch run"
        )
    # One seed's RR loss jumps around at this step size, so the target is RR's final loss averaged over
    # the seeds, and GraB's curve is the seeds' mean (losses and seconds averaged epoch by epoch).
    mean = {o: (np.mean([t for t, _ in curves[o]], 0), np.mean([lo for _, lo in curves[o]], 0)) for o in orderings}
    reach = time_to(*mean["grab"], mean["rr"][1][-1])
    t_rr = mean["rr"][0][-1]
    print(
        f"GraB reaches RR's final training loss ({mean['rr'][1][-1]:.5f}, mean of seeds) after "
        + (f"{reach:.2f} s of training, {reach / t_rr:.2f} of RR's {t_rr:.2f} s" if reach is not None else "never")
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(14, 4))
    ep = np.arange(1, args.epochs + 1)
    for color, o in zip(("C0", "C1"), orderings):
        for k, (t, lo) in enumerate(curves[o]):
            ax0.plot(t, lo, color=color, alpha=0.8, label=o if k == 0 else None)
        ax1.plot(ep, loss[o].mean(0), color=color, label=o)
        ax1.fill_between(ep, loss[o].min(0), loss[o].max(0), color=color, alpha=0.2)
        ax2.plot(ep, acc[o].mean(0), color=color, label=o)
    ax0.set_yscale("log")
    ax0.set(
        xlabel="training seconds", ylabel="full training loss", title=f"train loss vs wall-clock ({args.seeds} seeds)"
    )
    ax1.set_yscale("log")
    ax1.set(xlabel="epoch", ylabel="full training loss", title=f"train loss (mean, min-max of {args.seeds} seeds)")
    ax2.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy (mean)")
    for ax in (ax0, ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("sklearn digits, logistic regression: random reshuffling vs GraB")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"plot written to {args.out}")


if __name__ == "__main__":
    main()
