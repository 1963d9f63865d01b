"""What non_blocking=True saves: GraB epochs through GraBSampler.backward(method="hooks"), blocking
against non_blocking (the kernel balances each batch on a background thread while the training thread
computes the next), as paired rounds, on MNIST logistic regression and LeNet-5 / CIFAR-10 (a seeded
subset), CPU, batch 64, 1 torch thread (the machine's other core is the one the background step uses).

    .venv/bin/python benchmarks/non_blocking.py [--data ../shared/data] [--rounds 16]

Each round times one epoch of each, in alternating order, and reports non_blocking / blocking; the
median and quartiles over rounds are robust to this shared machine's drift, unlike separate runs.
A second table measures what a memory-streaming thread on the other core does to a plain RR epoch:
a background step streams the batch's gradients (16 MB a step for LeNet), so where the two cores
share memory bandwidth it slows the training thread, and what it hides can be lost again. The last
table is the worst case, back-to-back steps with nothing to overlap: what handing a step to the
background thread and back costs, per step size (why steps under 2^16 elements stay blocking).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import end_to_end  # noqa: E402
import torchgrab  # noqa: E402
import torchgrab.sampler  # noqa: E402

BATCH = end_to_end.BATCH


def paired(fn_a, fn_b, rounds, desc):
    """Ratios b / a of `rounds` rounds, alternating which runs first; and the median times."""
    ratios, ta, tb = [], [], []
    for r in tqdm(range(rounds), desc=desc, leave=False):
        if r % 2:
            b, a = fn_b(), fn_a()
        else:
            a, b = fn_a(), fn_b()
        ta.append(a)
        tb.append(b)
        ratios.append(b / a)
    return np.array(ratios), float(np.median(ta)), float(np.median(tb))


class MemoryStream:
    """A thread that streams two 100 MB float32 arrays (a += b, the GIL released by NumPy) until stopped."""

    def __init__(self) -> None:
        self.a = np.ones(25_000_000, np.float32)
        self.b = np.ones(25_000_000, np.float32)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            np.add(self.a, self.b, out=self.a)

    def __enter__(self) -> "MemoryStream":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def rr_with_stream(task, x, y, steps):
    with MemoryStream():
        return end_to_end.epoch_rr(task, x, y, steps)["total"]


def back_to_back(d, b, non_blocking, steps=300):
    """us per step of `steps` steps in a row on [b, d] float32 gradients, nothing between them."""
    sampler = torchgrab.GraBSampler(n=b * steps, seed=0)
    list(sampler)
    grads = [torch.randn(b, d) for _ in range(4)]
    t = time.perf_counter()
    for k in range(steps):
        sampler.step(grads[k % 4], non_blocking=non_blocking)
    sampler.synchronize()
    return (time.perf_counter() - t) / steps * 1e6


def row(name, ratios, ta, tb):
    q1, med, q3 = np.percentile(ratios, [25, 50, 75])
    print(
        f"{name:<34} {ta:>9.3f} {tb:>9.3f} {med:>8.3f} {f'{q1:.3f}-{q3:.3f}':>13} "
        f"{f'{ratios.min():.3f}-{ratios.max():.3f}':>13}"
    )
    return med


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data"))
    ap.add_argument("--mnist-n", type=int, default=12800, help="MNIST training images per epoch")
    ap.add_argument("--cifar-n", type=int, default=1920, help="CIFAR-10 training images (seeded subset)")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", default=os.path.join(here, "out"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _common.header(f"non_blocking=True against blocking steps, CPU, batch {BATCH}, {args.rounds} paired rounds")
    x, y = end_to_end.load_mnist(args.data)
    tasks = {
        "mnist_logreg": (x[: args.mnist_n], y[: args.mnist_n]),
        "lenet_cifar10": end_to_end.load_cifar10(args.data, args.cifar_n),
    }
    head = f"{'epoch':<34} {'a: s':>9} {'b: s':>9} {'b / a':>8} {'quartiles':>13} {'range':>13}   (medians over rounds)"
    print("\n## GraB epoch, backward(method='hooks'): a = blocking, b = non_blocking=True")
    print(head)
    results = {}
    for task, (x, y) in tasks.items():
        steps = len(x) // BATCH
        d = sum(p.numel() for p in end_to_end.make_model(task).parameters())
        ratios, ta, tb = paired(
            lambda: end_to_end.epoch_torchgrab_backward(task, x, y, steps)["total"],
            lambda: end_to_end.epoch_torchgrab_backward(task, x, y, steps, non_blocking=True)["total"],
            args.rounds,
            task,
        )
        results[task] = ratios
        row(f"{task} (d = {d}, {steps} steps)", ratios, ta, tb)
    print("\n## plain RR epoch: a = alone, b = with a thread streaming 2 x 100 MB on the other core")
    print(head)
    for task, (x, y) in tasks.items():
        steps = len(x) // BATCH
        ratios, ta, tb = paired(
            lambda: end_to_end.epoch_rr(task, x, y, steps)["total"],
            lambda: rr_with_stream(task, x, y, steps),
            args.rounds,
            f"{task} + stream",
        )
        results[f"{task}, RR + stream"] = ratios
        row(task, ratios, ta, tb)
    print("\n## back-to-back steps, nothing to overlap (worst case): us per step, median of 5 runs")
    print(f"{'d':>8} {'B':>4} {'elements':>10} {'blocking':>9} {'non_blocking':>13} {'difference':>11}")
    saved = torchgrab.sampler._BACKGROUND_MIN_ELEMENTS
    torchgrab.sampler._BACKGROUND_MIN_ELEMENTS = 0  # hand over even the smallest steps, to measure it
    try:
        for d, b in [(650, 8), (7850, 8), (8192, 8), (7850, 64), (62006, 64)]:
            t = {nb: float(np.median([back_to_back(d, b, nb) for _ in range(5)])) for nb in (False, True)}
            print(f"{d:>8} {b:>4} {d * b:>10} {t[False]:>9.1f} {t[True]:>13.1f} {t[True] - t[False]:>11.1f}")
    finally:
        torchgrab.sampler._BACKGROUND_MIN_ELEMENTS = saved
    print("(non_blocking steps run their kernel on one thread; blocking ones use both cores from d = 32,768)")
    print(f"\n# load average at end (1/5/15 min): {_common.load_average()}")
    os.makedirs(args.out, exist_ok=True)
    plt = _common.pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        names = list(results)
        ax.boxplot([results[k] for k in names], vert=False)
        ax.set_yticks(range(1, len(names) + 1), names, fontsize=8)
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("epoch time ratio b / a per round (below 1: b faster)")
        _common.save_plot(fig, args.out, "non_blocking.png")


if __name__ == "__main__":
    main()
