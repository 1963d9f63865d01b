"""What a checkpoint costs: GraBSampler.state_dict() right after a step (the state changed: the native
state is exported again) and with nothing changed (served from the cache), next to the step itself.
torchdata's StatefulDataLoader with workers calls state_dict() once per dispatched batch. The export
after a step is incremental (the epoch's order and the placed part of the next order are not copied
again), so it should not grow with n, only with d.

    python benchmarks/state_dict_cost.py            # the README table
    python benchmarks/state_dict_cost.py --quick
"""

import argparse
import statistics
import time

import numpy as np
from torchgrab import GraBSampler


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure(ordering, n, d, batch, repeats):
    s = GraBSampler(n=n, ordering=ordering, seed=0)
    it = iter(s)
    rows = np.random.default_rng(0).normal(size=(batch, d)).astype(np.float32)
    for _ in range(batch * (repeats + 2)):
        next(it)
    s.step(rows)

    def step_then_state():
        s.step(rows)
        t = time.perf_counter()
        s.state_dict()
        return (time.perf_counter() - t) * 1e3

    fresh = statistics.median(step_then_state() for _ in range(repeats))
    cached = median_ms(s.state_dict, repeats)
    s2 = GraBSampler(n=n, ordering=ordering, seed=0)
    it2 = iter(s2)
    for _ in range(batch * repeats):
        next(it2)
    step = median_ms(lambda: s2.step(rows), repeats)
    return fresh, cached, step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sizes = [(10_000, 1_000), (1_000_000, 1_000), (10_000_000, 100), (10_000, 1_000_000)]
    if args.quick:
        sizes = [(10_000, 1_000)]
    batch, repeats = 64, 5
    print(f"B = {batch}, float32 state, median of {repeats}")
    print(
        f"{'ordering':>9} {'n':>10} {'d':>10} | {'state_dict after a step':>24} {'state_dict, unchanged':>22} {'step':>10}"
    )
    for ordering in ["rr", "grab", "pair"]:
        for n, d in sizes:
            fresh, cached, step = measure(ordering, n, d, batch, repeats)
            print(f"{ordering:>9} {n:>10} {d:>10} | {fresh:>21.3f} ms {cached:>19.3f} ms {step:>7.2f} ms")


if __name__ == "__main__":
    main()
