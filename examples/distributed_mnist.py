"""Distributed random reshuffling vs CD-GraB: logistic regression on MNIST with DDP (gloo, CPU).

    torchrun --nproc_per_node 2 examples/distributed_mnist.py --data /work/shared/data/mnist --out out/distributed_mnist

Every method trains the same DDP-wrapped model from the same initialization:
  rr                 torch's DistributedSampler, loss.backward() (DDP all-reduces the gradient)
  cd-grab exact      DistributedGraBSampler(mode="exact"), sampler.backward(...)
  cd-grab efficient  DistributedGraBSampler(mode="efficient"), sampler.backward(...)
Rank 0 writes per-epoch full-training-set loss and test accuracy to OUT/curves.csv and OUT/curves.png.
Without torchrun it runs as a single rank.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import socket
from datetime import timedelta
from typing import Tuple

import numpy as np
import torch
import torch.distributed as dist
import torchgrab
from torch import nn


def _idx(path: str) -> np.ndarray:
    with gzip.open(path) as f:
        b = f.read()
    if int.from_bytes(b[:4], "big") == 2051:  # images
        n, r, c = (int.from_bytes(b[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
        return np.frombuffer(b, np.uint8, offset=16).reshape(n, r * c)
    return np.frombuffer(b, np.uint8, offset=8)  # labels


def load_mnist(data: str, split: str = "train", n: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x [n, 784] float32 normalized, y [n] int64): the first n images of the split (all if n = 0)."""
    prefix = "train" if split == "train" else "t10k"
    x = _idx(os.path.join(data, f"{prefix}-images-idx3-ubyte.gz"))
    y = _idx(os.path.join(data, f"{prefix}-labels-idx1-ubyte.gz"))
    if n:
        x, y = x[:n], y[:n]
    x = (torch.from_numpy(x.astype(np.float32)) / 255.0 - 0.1307) / 0.3081
    return x, torch.from_numpy(y.astype(np.int64))


def init_distributed() -> None:
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def train(method: str, args, x, y, xt, yt):
    torch.manual_seed(args.seed)
    model = nn.parallel.DistributedDataParallel(nn.Linear(784, 10))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    n = len(x)
    if method == "rr":
        sampler = torch.utils.data.DistributedSampler(range(n), seed=args.seed)
    else:
        sampler = torchgrab.DistributedGraBSampler(range(n), seed=args.seed, mode=method.split()[1])
    rows = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        for lo in range(0, len(order), args.batch_size):
            idx = order[lo : lo + args.batch_size]
            opt.zero_grad()
            if method == "rr":
                loss_fn(model(x[idx]), y[idx]).backward()
            else:
                sampler.backward(model, loss_fn, x[idx], y[idx])
            opt.step()
        with torch.no_grad():
            train_loss = loss_fn(model.module(x), y).item()
            test_acc = (model.module(xt).argmax(1) == yt).float().mean().item()
        rows.append((method, epoch + 1, train_loss, test_acc))
        if dist.get_rank() == 0:
            print(
                f"{method:18s} epoch {epoch + 1:3d}  train loss {train_loss:.5f}  test acc {test_acc:.4f}", flush=True
            )
    return rows, getattr(sampler, "bytes_sent", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("MNIST_DIR", "/work/shared/data/mnist"))
    ap.add_argument("--out", default="out/distributed_mnist")
    ap.add_argument("--train-size", type=int, default=16384, help="training images used (the first n; 0 = all 60,000)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16, help="per rank")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="rr,cd-grab exact,cd-grab efficient")
    args = ap.parse_args()
    torch.set_num_threads(1)
    init_distributed()
    x, y = load_mnist(args.data, "train", args.train_size)
    xt, yt = load_mnist(args.data, "test")
    rows = []
    sent = {}
    for method in args.methods.split(","):
        r, b = train(method, args, x, y, xt, yt)
        rows += r
        sent[method] = b
    if dist.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "curves.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["method", "epoch", "train_loss", "test_acc"])
            w.writerows(rows)
        for m, b in sent.items():
            if b:
                print(f"{m}: the sampler's collectives carried {b:,} payload bytes from rank 0 over the run")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(1, 2, figsize=(10, 4))
            for m in args.methods.split(","):
                e = [r[1] for r in rows if r[0] == m]
                ax[0].plot(e, [r[2] for r in rows if r[0] == m], marker="o", label=m)
                ax[1].plot(e, [r[3] for r in rows if r[0] == m], marker="o", label=m)
            ax[0].set(
                xlabel="epoch",
                ylabel="full training loss",
                yscale="log",
                title=f"MNIST logistic regression, {dist.get_world_size()} ranks",
            )
            ax[1].set(xlabel="epoch", ylabel="test accuracy")
            ax[0].legend()
            fig.tight_layout()
            fig.savefig(os.path.join(args.out, "curves.png"), dpi=120)
        except ImportError:
            print("matplotlib is not installed; wrote the CSV only")
        print(f"wrote {args.out}/curves.csv and curves.png")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
