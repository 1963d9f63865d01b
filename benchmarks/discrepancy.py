"""Herding discrepancy of every ordering on fixed Gaussian vectors, with the memory each one holds.

n vectors (default 10,000) of dimension d (128) with a non-zero mean are fed to the sampler as fixed
"gradients" for 1..E epochs (5); after each epoch, the order the sampler has built for the next epoch
is scored by max_k || sum_{t<=k} (v_order(t) - mean) || in l_inf and l2. Random orders sit at the
sqrt(n) scale; balancing drives it down; offline herding and greedy go lowest, at O(n d) memory.

    python benchmarks/discrepancy.py                 # the README's table and docs/discrepancy.png
    python benchmarks/discrepancy.py --quick         # a small run (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List

import numpy as np
import torch
from torchgrab import GraBSampler, herding_discrepancy

# (label, constructor keywords)
ORDERINGS: List[tuple] = [
    ("rr", dict(ordering="rr")),
    ("so", dict(ordering="so")),
    ("flipflop", dict(ordering="flipflop")),
    ("grab", dict(ordering="grab")),
    ("pair", dict(ordering="pair")),
    ("recursive (D=5)", dict(ordering="recursive", depth=5)),
    ("recursive-pair (D=1)", dict(ordering="recursive-pair", depth=1)),
    ("grab + gaussian k=64", dict(ordering="grab", projection=("gaussian", 64))),
    ("grab + sparse k=64", dict(ordering="grab", projection=("sparse", 64))),
    ("herding", dict(ordering="herding")),
    ("herding (rounds=3)", dict(ordering="herding", rounds=3)),
    ("greedy", dict(ordering="greedy")),
]


def array_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict entry."""
    if isinstance(obj, dict):
        return sum(array_bytes(v) for v in obj.values())
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return 0


def run(label: str, kw: Dict[str, Any], v: np.ndarray, epochs: int, batch: int, seed: int) -> Dict[str, Any]:
    n = v.shape[0]
    s = GraBSampler(n=n, seed=seed, **kw)
    linf, l2 = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for epoch in range(epochs + 1):
        # The order this epoch visits = the order built from the previous epochs' gradients.
        order = np.fromiter(iter(s), dtype=np.int64, count=n)
        if epoch > 0:
            d = herding_discrepancy(v, order)
            linf.append(d.linf)
            l2.append(d.l2)
        if epoch < epochs:
            for lo in range(0, n, batch):
                s.step(v[order[lo : lo + batch]])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = s.state_dict()["native"]
    return {
        "label": label,
        "linf": linf,
        "l2": l2,
        "state_bytes": s.state_bytes,
        "sum_bytes": array_bytes(st.get("balance")),
        "seconds": seconds,
        "cpu": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="n = 1000, 3 epochs, no plot")
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "..", "docs", "discrepancy.png"))
    args = ap.parse_args()
    if args.quick:
        args.n, args.epochs, args.plot = 1000, 3, ""
    rng = np.random.default_rng(args.seed)
    # Non-zero mean: a shared offset per coordinate plus unit Gaussian noise.
    v = (rng.normal(size=(1, args.d)) + rng.normal(size=(args.n, args.d))).astype(np.float32)
    print(
        f"n = {args.n}, d = {args.d}, batch = {args.batch}, epochs 1..{args.epochs}, "
        f"torch threads = {torch.get_num_threads()}, cores = {os.cpu_count()}",
        flush=True,
    )
    results = []
    for label, kw in ORDERINGS:
        r = run(label, kw, v, args.epochs, args.batch, args.seed)
        results.append(r)
        print(f"  {label:<22} done in {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    e = args.epochs
    head = (
        "| ordering | "
        + " | ".join(f"l_inf e{k + 1}" for k in range(e))
        + f" | l2 e{e} | state bytes | sum/gradient bytes | wall (s) | cpu (s) |"
    )
    print(head)
    print("|" + "---|" * (e + 6))
    for r in results:
        cells = " | ".join(f"{x:.2f}" for x in r["linf"])
        print(
            f"| {r['label']} | {cells} | {r['l2'][-1]:.2f} | {r['state_bytes']:,} | {r['sum_bytes']:,} | {r['seconds']:.1f} | {r['cpu']:.1f} |"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
        xs = np.arange(1, e + 1)
        colors = plt.get_cmap("tab20").colors
        markers = "os^vD<>px*hH"
        for i, r in enumerate(results):
            style = dict(
                linestyle="--" if r["label"] in ("rr", "so", "flipflop") else "-",
                marker=markers[i % len(markers)],
                color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                label=r["label"],
            )
            axes[0].plot(xs, r["linf"], **style)
            axes[1].plot(xs, r["l2"], **style)
        for ax, name in zip(axes, ["l_inf", "l2"]):
            ax.set_yscale("log")
            ax.set_xlabel("epochs of fixed gradients fed")
            ax.set_ylabel(f"herding discrepancy ({name})")
            ax.set_xticks(xs)
            ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=9)
        fig.suptitle(f"Herding discrepancy of the next order, n = {args.n}, d = {args.d} (benchmarks/discrepancy.py)")
        fig.tight_layout(rect=(0, 0, 0.83, 1))
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {os.path.relpath(args.plot)}")


if __name__ == "__main__":
    main()
