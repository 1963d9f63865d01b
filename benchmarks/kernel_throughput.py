"""Kernel throughput: GraBSampler.step (float32 gradients) against the machine's memory read bandwidth
and against the reference implementation (`grab-sampler` 0.1.3, PyPI), all measured in the same run.

    .venv/bin/python benchmarks/kernel_throughput.py [--quick] [--out benchmarks/out]

Gradients are taken from a pool larger than the last-level cache, so every step reads its (B, d) block
from main memory, as the bandwidth reference does. Wall-clock time, best of several trials.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import torchgrab  # noqa: E402

SHAPES = [(1_000, 64), (10_000, 64), (100_000, 64), (1_000_000, 16), (10_000_000, 4)]
POOL_BYTES = 640 << 20  # > the 300 MiB L3 of the machine this was written on


def timed_steps(step, batches, budget_s, max_steps):
    """Run step(batch) over cycling batches; return seconds per step (best of 3 trials)."""
    step(next(batches))  # warm-up (first-step allocation)
    t = time.perf_counter()
    step(next(batches))
    one = max(time.perf_counter() - t, 1e-6)
    steps = int(min(max(budget_s / one, 3), max_steps))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(steps):
            step(next(batches))
        best = min(best, (time.perf_counter() - t) / steps)
    return best, 2 + 3 * steps


def pool_batches(pool, d, b, as_torch):
    per = d * b
    count = max(1, (pool.size - per) // per + 1)
    views = [pool[k * per : (k + 1) * per].reshape(b, d) for k in range(count)]
    if as_torch:
        views = [torch.from_numpy(v) for v in views]
    return itertools.cycle(views)


def ours(ordering, d, b, pool, as_torch, budget):
    max_steps = 2000
    n = b * (2 + 3 * max_steps) + 2
    s = torchgrab.GraBSampler(n=n, ordering=ordering, seed=0)
    it = iter(s)
    for _ in itertools.islice(it, n):  # hand out every index up front; step() then consumes them FIFO
        pass
    per_step, _ = timed_steps(s.step, pool_batches(pool, d, b, as_torch), budget, max_steps)
    return per_step


def reference(grabsampler, ordering, d, b, pool, budget):
    """The reference's best time over 1 and 2 torch threads (its small torch ops can suffer from
    intra-op threads on a loaded machine; it gets whichever is faster)."""
    max_steps = 2000
    n = b * (2 + 3 * max_steps) + 2
    threads = torch.get_num_threads()
    best = float("inf")
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        r = grabsampler.GraBSampler(
            range(n), {"w": torch.empty(d)}, balance_type=ordering if ordering == "pair" else "mean", device="cpu"
        )
        iter(r)
        per_step, _ = timed_steps(lambda g: r.step({"w": g}), pool_batches(pool, d, b, True), budget, max_steps)
        best = min(best, per_step)
    torch.set_num_threads(threads)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter timing budget (0.3 s per cell)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    budget = 0.3 if args.quick else 1.0
    _common.header("GraBSampler.step kernel throughput (float32 gradients, float32 running sums)")
    grabsampler = None
    if not args.no_reference:
        try:
            grabsampler, shims = _common.import_reference()
            print(
                "# reference: grab-sampler 0.1.3; shims used (its algorithm untouched): " + "; ".join(shims or ["none"])
            )
        except ImportError as e:
            print(
                f"# reference not importable ({e}); install it with: pip install --no-deps grab-sampler==0.1.3 absl-py overrides"
            )
    bw = _common.memory_read_bandwidth()
    ref_bw = max(bw.values())
    print(
        "# memory read bandwidth: "
        + ", ".join(f"{k} {v:.2f} GB/s" for k, v in bw.items())
        + f"  -> reference {ref_bw:.2f} GB/s"
    )
    pool = np.random.default_rng(0).standard_normal(POOL_BYTES // 4, dtype=np.float32)
    cols = ["ordering", "d", "B", "input", "us/example", "GB/s", "% of bw", "ref us/ex", "ref GB/s", "speed-up"]
    print(("{:>8} {:>9} {:>3} {:>6} {:>11} {:>7} {:>8} {:>10} {:>9} {:>9}").format(*cols))
    rows = []
    for ordering in ("grab", "pair"):
        for d, b in SHAPES:
            ref_step = reference(grabsampler, ordering, d, b, pool, budget) if grabsampler else None
            for kind in ("torch", "numpy"):
                t = ours(ordering, d, b, pool, kind == "torch", budget)
                gbs = b * d * 4 / t / 1e9
                row = dict(ordering=ordering, d=d, B=b, input=kind, us=t / b * 1e6, gbs=gbs, frac=gbs / ref_bw)
                if ref_step:
                    row.update(ref_us=ref_step / b * 1e6, ref_gbs=b * d * 4 / ref_step / 1e9, speedup=ref_step / t)
                rows.append(row)
                print(
                    "{:>8} {:>9} {:>3} {:>6} {:>11.3f} {:>7.2f} {:>7.0f}% {:>10} {:>9} {:>9}".format(
                        ordering,
                        d,
                        b,
                        kind,
                        row["us"],
                        gbs,
                        100 * row["frac"],
                        f"{row['ref_us']:.2f}" if ref_step else "-",
                        f"{row['ref_gbs']:.2f}" if ref_step else "-",
                        f"{row['speedup']:.1f}x" if ref_step else "-",
                    ),
                    flush=True,
                )
    print(f"# load average at end (1/5/15 min): {_common.load_average()}")
    os.makedirs(args.out, exist_ok=True)
    plt = _common.pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, ordering in zip(axes, ("grab", "pair")):
            for kind, style in (("torch", "o-"), ("numpy", "s--")):
                rs = [r for r in rows if r["ordering"] == ordering and r["input"] == kind]
                ax.plot([r["d"] for r in rs], [r["gbs"] for r in rs], style, label=f"torchgrab ({kind})")
            rs = [r for r in rows if r["ordering"] == ordering and r["input"] == "torch" and "ref_gbs" in r]
            if rs:
                ax.plot([r["d"] for r in rs], [r["ref_gbs"] for r in rs], "x:", label="grab-sampler 0.1.3")
            ax.axhline(ref_bw, color="gray", lw=1, label=f"memory read {ref_bw:.1f} GB/s")
            ax.axhline(ref_bw / 2, color="gray", lw=1, ls=":", label="50% of it")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("d")
            ax.set_title(f"ordering={ordering}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("GB/s of float32 gradient balanced")
        axes[1].legend(fontsize=8)
        _common.save_plot(fig, args.out, "kernels.png")


if __name__ == "__main__":
    main()
