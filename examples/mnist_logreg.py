"""Experiment 1 of the GraB paper: logistic regression on MNIST, every ordering, same training code.

    nice -n 19 python examples/mnist_logreg.py [--data ../shared/data] [--epochs 10] [--subset 10000] [--seeds 3]
    python examples/mnist_logreg.py --quick      # 2,000 images, 2 epochs: a smoke test

Paper setup: SGD lr 0.01, momentum 0.9, weight decay 1e-4; balancing per example (each example is a
unit). Writes out/mnist_logreg.{csv,png,md}: per epoch the full-pass training loss over all training
images, the test accuracy and the wall time.
"""

from __future__ import annotations

import _common as C
import torch
from torch import nn
from torch.utils.data import TensorDataset


def main(argv=None):
    p = C.base_parser(__doc__, epochs=10, out="out/mnist_logreg")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--subset", type=int, default=10000, help="use the first N training images (0 = all 60,000)")
    p.add_argument("--unit-size", type=int, default=0, help="micro-batch units (needs a torchgrab with unit_size=)")
    args = p.parse_args(argv)
    if args.quick:
        args.subset, args.epochs = 2000, min(args.epochs, 2)
    torch.set_num_threads(args.threads)

    (xtr, ytr), (xte, yte) = C.load_mnist(C.data_root(args.data))
    if args.subset:
        xtr, ytr = xtr[: args.subset], ytr[: args.subset]
    norm = lambda a: ((torch.tensor(a, dtype=torch.float32) / 255.0 - 0.1307) / 0.3081).reshape(len(a), -1)  # noqa: E731
    xtr_t, ytr_t, xte_t, yte_t = norm(xtr), torch.tensor(ytr), norm(xte), torch.tensor(yte)
    train_set = TensorDataset(xtr_t, ytr_t)
    loss_fn = nn.CrossEntropyLoss()

    def evaluate(model):
        train_loss, train_acc = C.full_pass(model, xtr_t, ytr_t, loss_fn)
        _, acc = C.full_pass(model, xte_t, yte_t, loss_fn)
        return {"train_loss": train_loss, "train_acc": train_acc, "val_metric": acc, "metric": "test accuracy"}

    make_model = lambda: nn.Linear(784, 10)  # noqa: E731
    orderings = C.select_orderings(args.orderings.split(","), len(train_set), C.n_params(make_model()))

    def train_one(ordering, seed):
        return C.train_supervised(
            ordering,
            seed,
            make_model=make_model,
            make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4),
            train_set=train_set,
            loss_fn=loss_fn,
            evaluate=evaluate,
            epochs=args.epochs,
            batch_size=args.batch_size,
            unit_size=args.unit_size or None,
            device=args.device,
            capture=args.capture,
        )

    rows = C.run_grid(train_one, orderings, C.seed_range(args), args.epochs, "mnist_logreg", args.out + ".csv")
    title = (
        f"MNIST logistic regression ({len(train_set)} train / {len(xte_t)} test), SGD lr {args.lr} m 0.9 "
        f"wd 1e-4, batch {args.batch_size}"
    )
    C.report(rows, "test accuracy", title, args.out)
    return rows


if __name__ == "__main__":
    main()
