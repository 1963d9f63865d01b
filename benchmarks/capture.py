"""Per-example gradient capture, per step, on the CPU: where the time of one batch goes.

    .venv/bin/python benchmarks/capture.py [--threads 1] [--batch 64]

For logistic regression on MNIST-shaped input (784 -> 10) and LeNet-5 on CIFAR-shaped input, prints
milliseconds per step (best of 3 timed loops) of: an ordinary forward + backward (what a random-
reshuffling step pays), `per_example_gradients` with vmap and with hooks, and the two pieces of the hooks
path that were rewritten: forming convolution columns (`F.unfold` against `torchgrab.gradients.im2col`,
checked equal) and the per-example losses (a vmap over the batch against
`torchgrab.gradients.per_example_losses`, checked equal). Random inputs: the cost does not depend on
the values. The end-to-end epochs, with data, are in benchmarks/end_to_end.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from end_to_end import LeNet  # noqa: E402
from torchgrab.gradients import im2col, per_example_gradients, per_example_losses  # noqa: E402


def ms(f, n=20):
    """Best of 3 loops of n calls, after 2 warm-up calls."""
    f()
    f()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _common.header(f"Per-example gradient capture per step, CPU, batch {args.batch}")
    b = args.batch
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    models = {
        "logreg 784->10": (nn.Linear(784, 10), torch.randn(b, 784)),
        "LeNet-5 3x32x32": (LeNet(), torch.randn(b, 3, 32, 32)),
    }
    y = torch.randint(0, 10, (b,))
    print(f"\n{'model':<18} {'fwd+bwd (RR)':>13} {'vmap capture':>13} {'hooks capture':>14}   (ms per step)")
    for name, (model, x) in models.items():

        def rr(model=model, x=x):
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()

        vm = ms(lambda: per_example_gradients(model, loss_fn, x, y))
        hk = ms(lambda: per_example_gradients(model, loss_fn, x, y, method="hooks"))
        print(f"{name:<18} {ms(rr):>13.2f} {vm:>13.2f} {hk:>14.2f}")

    print(f"\n{'piece':<40} {'before':>8} {'now':>8}   (ms per step)")
    for c, h in [(3, 32), (6, 14)]:
        x = torch.randn(b, c, h, h)
        args_ = ((5, 5), (1, 1), (0, 0), (1, 1))
        assert torch.equal(F.unfold(x, *args_), im2col(x, *args_))
        print(
            f"{f'conv columns, {c}x{h}x{h}, 5x5':<40} {ms(lambda: F.unfold(x, *args_)):>8.2f} "
            f"{ms(lambda: im2col(x, *args_)):>8.2f}"
        )
    out = torch.randn(b, 10)
    one_by_one = vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))
    assert torch.allclose(one_by_one(out, y), per_example_losses(loss_fn, out, y), atol=1e-6)
    print(
        f"{'per-example cross-entropy, 10 classes':<40} {ms(lambda: one_by_one(out, y), 200):>8.3f} "
        f"{ms(lambda: per_example_losses(loss_fn, out, y), 200):>8.3f}"
    )
    print(f"\n# load average at end (1/5/15 min): {_common.load_average()}")


if __name__ == "__main__":
    main()
