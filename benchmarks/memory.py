"""Memory: the resident memory a GraBSampler adds at d = 1e7 (float32 gradients, float32 sums), and that it
does not grow over 100 epochs; plus the O(n) part (orders and bitmaps) at n = 1e7.

    .venv/bin/python benchmarks/memory.py [--d 10000000] [--epochs 100]

Resident set size is read from /proc/self/status (VmRSS; VmHWM is the peak, reset through
/proc/self/clear_refs before each measurement). The gradient buffers are allocated before the baseline,
so they are not counted.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import torchgrab  # noqa: E402

MB = 1 << 20


def rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v, _ = line.split()
                out[k[:-1]] = int(v) * 1024
    return out


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=10_000_000)
    ap.add_argument("--n", type=int, default=16, help="units per epoch for the 100-epoch run")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--big-n", type=int, default=10_000_000)
    args = ap.parse_args()
    _common.header("Resident memory added by GraBSampler")
    d, n, b = args.d, args.n, args.batch
    grads = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)  # every unit's gradient, fixed
    print(f"# gradients: {n} x {d} float32 = {grads.nbytes / MB:.0f} MiB, allocated before the baseline (not counted)")
    print(
        f"{'ordering':>8} {'d-vector MiB':>12} {'sampler RSS MiB':>16} {'peak MiB':>9} {'= d-vectors':>11} "
        f"{'RSS after 2 ep':>15} {'after 10 ep':>12} {'after {0} ep'.format(args.epochs):>13} {'growth 10->{0} KiB'.format(args.epochs):>18}"
    )
    for ordering in ("grab", "pair"):
        base = rss()["VmRSS"]
        peak_ok = reset_peak()
        s = torchgrab.GraBSampler(n=n, ordering=ordering, seed=0)
        after = []
        for _ in range(args.epochs):
            order = list(s)
            for lo in range(0, n, b):
                s.step(grads[np.asarray(order[lo : lo + b])])
            after.append(rss()["VmRSS"])
        r = rss()
        added = r["VmRSS"] - base
        peak = (r["VmHWM"] - base) if peak_ok else float("nan")
        dvec = d * 4 / MB
        # The fancy-indexed batch copy (b x d) made by this script is inside the peak; subtract it.
        batch_copy = b * d * 4
        print(
            f"{ordering:>8} {dvec:>12.1f} {added / MB:>16.1f} {(peak - batch_copy) / MB:>9.1f} "
            f"{(peak - batch_copy) / (d * 4):>11.2f} {(after[min(1, len(after) - 1)] - base) / MB:>15.1f} {(after[min(9, len(after) - 1)] - base) / MB:>12.1f} "
            f"{(after[-1] - base) / MB:>13.1f} {(after[-1] - after[min(9, len(after) - 1)]) / 1024:>18.0f}"
        )
        print(
            f"         state_bytes reported by the sampler: {s.state_bytes / MB:.1f} MiB (zero-initialized buffers "
            "are only paged in once first written, so growth is counted from epoch 10)"
        )
        del s
    # The O(n) part: orders (u32) and the taken bitmap, at n = big_n with a tiny d.
    base = rss()["VmRSS"]
    reset_peak()
    s = torchgrab.GraBSampler(n=args.big_n, ordering="grab", seed=0)
    it = iter(s)
    g = np.ones((1024, 8), np.float32)
    chunk = [next(it) for _ in range(1024)]
    s.step(g)
    r = rss()
    print(
        f"\n# n = {args.big_n}, d = 8: sampler RSS {(r['VmRSS'] - base) / MB:.1f} MiB "
        f"({(r['VmRSS'] - base) / args.big_n:.1f} bytes per unit), peak {(r['VmHWM'] - base) / MB:.1f} MiB; "
        f"state_bytes {s.state_bytes / MB:.1f} MiB"
    )
    del chunk
    print(f"# load average at end (1/5/15 min): {_common.load_average()}")


if __name__ == "__main__":
    main()
