"""What `watch(budget=...)` costs on LeNet-5, where the budget decides whether the convolutions' weights are
sketched or left out (issue 14: cost <= 1.10x RR against the share of exact GraB's gain the sketch keeps,
which `benchmarks/watch_quality.py --tasks cifar --ks 32 --part train --budget B` measures).

Paired rounds of one training epoch each, plain RR against GraB with `sampler.watch(model, budget=B)` for
each B, in alternating order within a round; each round's ratio to RR, median and quartiles. LeNet-5 on a
seeded CIFAR-10 subset, batch 64, SGD, 1 torch thread, data in memory (index slices).

    .venv/bin/python benchmarks/watch_budget.py [--budgets 0.25,1.0] [--rounds 6] [--n 10000]
    .venv/bin/python benchmarks/watch_budget.py --quick      # 512 images, 1 round: a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import torchgrab  # noqa: E402
from end_to_end import LeNet, load_cifar10  # noqa: E402


def main(argv=None) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data"))
    ap.add_argument("--budgets", default="0.25,1.0", help="comma-separated fractions, or 'none'")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--n", type=int, default=10_000, help="CIFAR-10 training images (a seeded subset)")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.rounds = 512, 1
    torch.set_num_threads(1)
    x, y = load_cifar10(a.data, a.n)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    loss_fn = nn.CrossEntropyLoss()
    budgets = {f"budget={b}": (None if b.lower() == "none" else float(b)) for b in a.budgets.split(",")}

    def epoch(arm: str) -> float:
        torch.manual_seed(0)
        model = LeNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        sampler = None
        if arm == "rr":
            order = torch.randperm(len(x))
        else:
            sampler = torchgrab.GraBSampler(n=len(x), ordering="grab", seed=0)
            sampler.watch(model, budget=budgets[arm])
            order = torch.as_tensor(list(iter(sampler)))
        t = time.perf_counter()
        for k in range(0, len(order), 64):
            i = order[k : k + 64]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[i]), y[i]).backward()
            opt.step()
        if sampler is not None:
            sampler.synchronize()  # the last rows fed and balanced: part of the epoch
        return time.perf_counter() - t

    arms = ["rr", *budgets]
    secs = {arm: [] for arm in arms}
    for arm in arms:  # warm-up (allocator, projections)
        epoch(arm)
    for r in range(a.rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            secs[arm].append(epoch(arm))
    rr = np.array(secs["rr"])
    print(
        f"# LeNet-5, CIFAR-10 {len(x)} images, batch 64, 1 torch thread, {a.rounds} paired rounds; "
        f"rr epoch median {np.median(rr):.2f} s; load {_common.load_average()}"
    )
    for arm in arms[1:]:
        q = np.array(secs[arm]) / rr
        sampler = torchgrab.GraBSampler(n=8, ordering="grab")
        handle = sampler.watch(LeNet(), budget=budgets[arm])
        left_out = [name for name, kind, _ in handle.layers if "left out" in kind]
        handle.remove()
        print(
            f"watch({arm}): K = {handle.width}, weights left out: {', '.join(left_out) or 'none'}; x RR median "
            f"{np.median(q):.3f} (quartiles {np.quantile(q, 0.25):.3f}-{np.quantile(q, 0.75):.3f})"
        )


if __name__ == "__main__":
    main()
