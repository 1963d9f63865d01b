"""Experiment 2 of the GraB paper: LeNet on CIFAR-10, every ordering, same training code.

    nice -n 19 python examples/cifar10_lenet.py [--data ../shared/data] [--epochs 5] [--subset 10000]
    python examples/cifar10_lenet.py --quick      # 1,000 images, 2 epochs: a smoke test

Paper setup: SGD lr 1e-3, momentum 0.9, weight decay 1e-2; each image is a unit. No data augmentation
(a random crop/flip would change an example's gradient from epoch to epoch, which is not what is
compared here). Images are normalized with the CIFAR-10 channel mean/std. ../shared/data holds a JPEG
(quality 75) copy of CIFAR-10; it is decoded once and cached as out/cifar10.npz. Writes
out/cifar10_lenet.{csv,png,md}: full-pass training loss, test accuracy, wall time per epoch.
"""

from __future__ import annotations

from pathlib import Path

import _common as C
import torch
from torch import nn
from torch.utils.data import TensorDataset


class LeNet(nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, n_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def main(argv=None):
    p = C.base_parser(__doc__, epochs=5, out="out/cifar10_lenet")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--subset", type=int, default=10000, help="first N training images, class-balanced (0 = all 50,000)")
    p.add_argument("--unit-size", type=int, default=0, help="micro-batch units (needs a torchgrab with unit_size=)")
    p.add_argument("--cache", default="out/cifar10.npz")
    args = p.parse_args(argv)
    if args.quick:
        args.subset, args.epochs = 1000, min(args.epochs, 2)
    torch.set_num_threads(args.threads)

    xtr_t, ytr_t, xte_t, yte_t = C.cifar10_tensors(C.data_root(args.data), Path(args.cache), args.subset)
    train_set = TensorDataset(xtr_t, ytr_t)
    loss_fn = nn.CrossEntropyLoss()

    def evaluate(model):
        train_loss, train_acc = C.full_pass(model, xtr_t, ytr_t, loss_fn, batch=1000)
        _, acc = C.full_pass(model, xte_t, yte_t, loss_fn, batch=1000)
        return {"train_loss": train_loss, "train_acc": train_acc, "val_metric": acc, "metric": "test accuracy"}

    orderings = C.select_orderings(args.orderings.split(","), len(train_set), C.n_params(LeNet()))

    def train_one(ordering, seed):
        return C.train_supervised(
            ordering,
            seed,
            make_model=LeNet,
            make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-2),
            train_set=train_set,
            loss_fn=loss_fn,
            evaluate=evaluate,
            epochs=args.epochs,
            batch_size=args.batch_size,
            unit_size=args.unit_size or None,
            device=args.device,
            capture=args.capture,
        )

    rows = C.run_grid(train_one, orderings, C.seed_range(args), args.epochs, "cifar10_lenet", args.out + ".csv")
    title = (
        f"CIFAR-10 LeNet ({len(train_set)} train / {len(xte_t)} test), SGD lr {args.lr} m 0.9 wd 1e-2, "
        f"batch {args.batch_size}"
    )
    C.report(rows, "test accuracy", title, args.out)
    return rows


if __name__ == "__main__":
    main()
