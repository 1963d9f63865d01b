"""On-device path on a CUDA GPU: GraBSampler.step with CUDA gradients (u = Z s0 and Z Z^T on the device,
B + B^2 numbers to the host, Rust sign scan, running sums updated on the device), against the reference
`grab-sampler` 0.1.3 on the same device (a Python loop with one device-to-host sync per example), and
against the device-to-device copy bandwidth measured in the same run.

    python benchmarks/gpu.py [--quick]

Run on an NVIDIA H100 by scripts/gpu_session.sh (output: benchmarks/out/gpu_h100.txt, about a minute).
It checks first that the on-device orders equal the CPU dense kernel's on well-separated
(integer-valued) data, then times. ``--profile`` also prints torch.profiler's table of the CUDA kernels
of one ``grab`` step at d = 1e7, B = 64 (where the path is slowest), to see where its time goes.
Last, it compares the two ways of forming u and Z Z^T at the large-d shapes (one product per column
block, the default, or a batch of column-chunk products: ``torchgrab.ondevice.DEFAULT_SPLIT_COLS``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import torchgrab  # noqa: E402

SHAPES = [(1_000, 64), (10_000, 64), (100_000, 64), (1_000_000, 16), (10_000_000, 4), (10_000_000, 64)]


def check_orders(dev):
    rng = np.random.default_rng(0)
    v = rng.integers(-8, 9, size=(256, 64)).astype(np.float32)
    for ordering in ("grab", "pair"):
        res = []
        for where in ("cpu", dev):
            s = torchgrab.GraBSampler(
                n=256, ordering=ordering, seed=1, dtype=torch.float64, device_path="never" if where == "cpu" else "auto"
            )
            orders = []
            for _ in range(3):
                order = list(s)
                for lo in range(0, 256, 32):
                    s.step(torch.from_numpy(v[order[lo : lo + 32]]).to(where))
                orders.append(order)
            orders.append(list(s))
            res.append(orders)
        print(f"# on-device orders == CPU dense kernel orders ({ordering}): {res[0] == res[1]}")


def profile_step(dev, d=10_000_000, b=64):
    """torch.profiler's kernel table for one on-device grab step (after two warm-up steps)."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.randn(b, d, device=dev)
    s = torchgrab.GraBSampler(n=b * 8, ordering="grab", seed=0)
    it = iter(s)
    for _ in range(b * 8):
        next(it)
    s.step(g)
    s.step(g)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        s.step(g)
        torch.cuda.synchronize()
    print(f"# profile of one grab step, d = {d}, B = {b}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    del g
    torch.cuda.empty_cache()


def sync_time(fn, reps):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def time_ours(ordering, pool, budget):
    """Seconds per GraBSampler.step on the pool's (B, d) CUDA batches, in rotation."""
    b = pool[0].shape[0]
    n = b * 20000
    s = torchgrab.GraBSampler(n=n, ordering=ordering, seed=0)
    it = iter(s)
    for _ in range(n):
        next(it)
    k = [0]

    def ours():
        s.step(pool[k[0] % len(pool)])
        k[0] += 1

    ours()
    t1 = sync_time(ours, 1)
    return sync_time(ours, int(min(max(budget / max(t1, 1e-6), 3), 5000)))


def compare_split(dev, budget, shapes=((1_000_000, 16), (10_000_000, 4), (10_000_000, 64))):
    """u and Z Z^T as one product per column block (the default) against a batch of chunk products
    (torchgrab.ondevice._products), at the large-d shapes where the path is slow."""
    from torchgrab import ondevice

    print("\n# Gram products per column block: one product (split_cols = none) or chunks of split_cols")
    print(f"{'ordering':>8} {'d':>9} {'B':>3} {'split_cols':>10} {'us/example':>11} {'GB/s':>8}")
    for ordering in ("grab", "pair"):
        for d, b in shapes:
            pool = [torch.randn(b, d, device=dev) for _ in range(2)]
            for split in (None, 1 << 16, 1 << 18):
                ondevice.DEFAULT_SPLIT_COLS = split
                t = time_ours(ordering, pool, budget)
                print(
                    f"{ordering:>8} {d:>9} {b:>3} {str(split or 'none'):>10} {t / b * 1e6:>11.2f} "
                    f"{b * d * 4 / t / 1e9:>8.1f}",
                    flush=True,
                )
            ondevice.DEFAULT_SPLIT_COLS = None
            del pool
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile one grab step at d = 1e7, B = 64 first")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark needs a GPU")
    dev = "cuda"
    _common.header(f"On-device path, {torch.cuda.get_device_name()}")
    check_orders(dev)
    grabsampler = None
    try:
        grabsampler, shims = _common.import_reference()
        print("# reference: grab-sampler 0.1.3; shims used (its algorithm untouched): " + "; ".join(shims))
    except ImportError as e:
        print(f"# reference not importable: {e}")
    x = torch.empty(1 << 28, dtype=torch.float32, device=dev)  # 1 GiB
    y = torch.empty_like(x)
    copy = sync_time(lambda: y.copy_(x), 5)
    bw = 2 * x.numel() * 4 / copy / 1e9
    print(f"# device copy bandwidth (read + write): {bw:.0f} GB/s")
    del x, y
    if args.profile:
        profile_step(dev)
    budget = 0.3 if args.quick else 1.0
    print(f"{'ordering':>8} {'d':>9} {'B':>3} {'us/example':>11} {'GB/s':>8} {'ref us/ex':>10} {'speed-up':>9}")
    for ordering in ("grab", "pair"):
        for d, b in SHAPES:
            pool = [torch.randn(b, d, device=dev) for _ in range(4)]
            n = b * 20000
            t = time_ours(ordering, pool, budget)
            ref = None
            if grabsampler is not None:
                r = grabsampler.GraBSampler(
                    range(n), {"w": torch.empty(d)}, balance_type="pair" if ordering == "pair" else "mean", device=dev
                )
                iter(r)
                j = [0]

                def theirs():
                    r.step({"w": pool[j[0] % 4]})
                    j[0] += 1

                theirs()
                t1 = sync_time(theirs, 1)
                ref = sync_time(theirs, int(min(max(budget / max(t1, 1e-6), 2), 2000)))
            print(
                f"{ordering:>8} {d:>9} {b:>3} {t / b * 1e6:>11.2f} {b * d * 4 / t / 1e9:>8.1f} "
                f"{(ref / b * 1e6) if ref else float('nan'):>10.2f} {(ref / t) if ref else float('nan'):>8.1f}x",
                flush=True,
            )
            del pool
            torch.cuda.empty_cache()
    if not args.quick:
        compare_split(dev, budget / 2)


if __name__ == "__main__":
    main()
