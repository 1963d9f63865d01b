"""A very large data set: n = 10^8 by default. Prints the time to the first index, the rate of
yielding, the resident memory and the state the sampler holds, for a gradient-free and a balancing
ordering. Orders are u32 in Rust; Python only ever holds one chunk of 8192 ints.

    python benchmarks/large_n.py                 # n = 10^8 (needs ~3 GB)
    python benchmarks/large_n.py --n 10000000
"""

import argparse
import time

from torchgrab import GraBSampler


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10**8)
    args = ap.parse_args()
    n = args.n
    if n < 2:
        ap.error("--n must be at least 2")
    # The indices timed after the first: a million, or all the rest when n is smaller.
    more = min(1_000_000, n - 1)
    label = "next 1e6 indices" if more == 1_000_000 else f"next {more:,} indices"
    print(f"n = {n:,}")
    print(
        f"{'ordering':>9} | {'construct':>10} {'first index':>12} {label:>17} {'state_dict':>11} | {'RSS':>9} {'state_bytes':>12}"
    )
    for ordering in ["rr", "grab"]:
        base = rss_mb()
        t0 = time.perf_counter()
        s = GraBSampler(n=n, ordering=ordering, seed=0)
        t1 = time.perf_counter()
        it = iter(s)
        next(it)
        t2 = time.perf_counter()
        for _ in range(more):
            next(it)
        t3 = time.perf_counter()
        s.state_dict()
        t4 = time.perf_counter()
        print(
            f"{ordering:>9} | {t1 - t0:>8.3f} s {t2 - t1:>10.3f} s {t3 - t2:>15.3f} s {t4 - t3:>9.3f} s | "
            f"{rss_mb() - base:>6.0f} MB {s.state_bytes / 2**20:>9.0f} MB"
        )
        del s, it


if __name__ == "__main__":
    main()
