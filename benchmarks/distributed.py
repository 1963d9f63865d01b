"""CD-GraB on torch.distributed: what each protocol sends, how well it balances, and epoch times.

    python benchmarks/distributed.py                 # all three tables
    python benchmarks/distributed.py --quick         # smaller sizes (CI)

1. Bytes per step and rank, by formula and as counted by the sampler in a real gloo run
   (DistributedGraBSampler.bytes_sent), against DDP's gradient all-reduce and the reference
   CD-GraB code's all-gather of full per-example gradients.
2. Balancing quality: herding discrepancy of the global (step-major, rank-minor) visit order on fixed
   Gaussian vectors after some epochs: random reshuffling, independent per-rank pair balance,
   CD-GraB exact, CD-GraB efficient. W replicas are run in one process here (the protocol is
   deterministic; the gloo tests check that real ranks compute the same).
3. Epoch time of MNIST logistic regression with 1, 2 and 4 gloo ranks on this machine's CPUs:
   DistributedSampler + DDP (loss.backward), and DistributedGraBSampler.backward in both modes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchgrab
from torch import nn
from torchgrab import _native

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))


# ---------------------------------------------------------------- 1. bytes
HEADER = 8 * 8  # the step header every mode all-gathers (8 int64)


def formula_bytes(w: int, b: int, d: int) -> dict:
    """{protocol: (payload, received)} per rank and step, float32 gradients, P = B/2 pairs.
    payload = bytes this rank puts into collectives; received = bytes it receives with ring algorithms
    (all_gather of S: (W-1) S; all_reduce of S: 2 (W-1)/W S; W broadcast rounds of S: (W-1) S)."""
    p = b // 2
    ring = 2 * (w - 1) / w
    return {
        "DDP: all_reduce of the gradient (d f32)": (4 * d, ring * 4 * d),
        "reference CD-GraB: all_gather B x d f32": (4 * b * d, (w - 1) * 4 * b * d),
        "exact: all_gather P x d f64": (HEADER + 8 * p * d, (w - 1) * (HEADER + 8 * p * d)),
        "pipelined: W broadcast rounds of P + d f64": (HEADER + 8 * (p + d), (w - 1) * (HEADER + 8 * (p + d))),
        "efficient: all_gather P + P^2 f64, + d f32 in the gradient all_reduce": (
            HEADER + 8 * (p + p * p) + 4 * d,
            (w - 1) * (HEADER + 8 * (p + p * p)) + ring * 4 * d,
        ),
    }


def table_bytes(quick: bool) -> None:
    print("\n## 1. Bytes per step and rank (float32 gradients; the sampler's modes beyond DDP's own all-reduce)\n")
    print("payload = bytes this rank puts into collectives; received = bytes it receives with ring algorithms;")
    print("x DDP = received / received by DDP's gradient all-reduce\n")
    print("| W | B | d | protocol | payload | received | x DDP |")
    print("|---|---|---|---|---:|---:|---:|")
    for w, b, d in [(2, 64, 7850), (4, 64, 7850), (4, 32, 1_000_000), (8, 32, 25_000_000)]:
        f = formula_bytes(w, b, d)
        ddp = f["DDP: all_reduce of the gradient (d f32)"][1]
        for kind, (payload, recv) in f.items():
            print(f"| {w} | {b} | {d:,} | {kind} | {payload:,.0f} | {recv:,.0f} | {recv / ddp:.2f} |")


def measured_bytes(world: int, b: int, d: int) -> dict:
    """Run one step of each mode on real gloo ranks and read the sampler's byte counter."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _bytes_worker, args=(world, _free_port(), out, b, d), nprocs=world, join=True, start_method="forkserver"
        )
        return dict(np.load(os.path.join(out, "bytes.npz")))


def _bytes_worker(rank: int, world: int, port: int, out: str, b: int, d: int) -> None:
    _init(rank, world, port)
    res = {}
    for mode in ("exact", "pipelined", "efficient"):
        s = torchgrab.DistributedGraBSampler(range(world * 4 * b), mode=mode)
        it = iter(s)
        [next(it) for _ in range(b)]
        s.bytes_sent = 0
        g = torch.randn(b, d)
        if mode == "efficient":
            s._step(g, torch.zeros(d))  # the gradient rides along; count only the sampler's extra
            res[mode] = s.bytes_sent - 4 * d
        else:
            s.step(g)
            res[mode] = s.bytes_sent
    if rank == 0:
        np.savez(os.path.join(out, "bytes.npz"), **res)
    dist.destroy_process_group()


# ---------------------------------------------------------------- 2. quality
def run_replicas(vectors: np.ndarray, world: int, b: int, epochs: int, mode: str, seed: int = 0):
    """W replicas of the order server in one process; returns the global visit order of the last epoch."""
    n = len(vectors)
    m = n // world
    perm = np.random.default_rng(seed).permutation(n)[: m * world]
    shards = perm.reshape(m, world).T
    rng = np.random.default_rng(seed + 1)
    if mode in ("rr", "independent"):
        reps = [_native.NativeCoordinated(1, 0, m) for _ in range(world)]
    else:
        reps = [_native.NativeCoordinated(world, r, m) for r in range(world)]
    for _ in range(epochs + 1):
        if mode == "rr":
            orders = [rng.permutation(m) for _ in range(world)]
        else:
            orders = [rep.begin_epoch() for rep in reps]
        glob = np.concatenate([shards[w][orders[w][lo : lo + b]] for lo in range(0, m, b) for w in range(world)])
        if _ == epochs:
            return glob
        if mode == "rr":
            continue
        for lo in range(0, m, b):
            batches = [np.ascontiguousarray(vectors[shards[w][orders[w][lo : lo + b]]]) for w in range(world)]
            if mode == "independent":
                for w in range(world):
                    v = reps[w].decide([batches[w]], "float64", reps[w].local_stats([batches[w]], "float64"))
                    reps[w].add_sum(v)
            elif mode == "exact":
                gathered = np.concatenate([reps[w].local_diffs([batches[w]], "float64") for w in range(world)])
                for w in range(world):
                    reps[w].step_exact([batches[w]], "float64", gathered)
            else:
                gathered = np.concatenate([reps[w].local_stats([batches[w]], "float64") for w in range(world)])
                total = sum(reps[w].decide([batches[w]], "float64", gathered) for w in range(world))
                for w in range(world):
                    reps[w].add_sum(total)
    raise AssertionError


def table_quality(quick: bool) -> None:
    n, d = (2048, 32) if quick else (8192, 64)
    epochs = 5
    vectors = np.random.default_rng(0).standard_normal((n, d))
    print(
        f"\n## 2. Balancing quality: herding discrepancy (l_inf / l2) of the global order, n = {n}, d = {d} Gaussian, after {epochs} epochs\n"
    )
    print("| W | B per rank | random reshuffling | independent pair balance | CD-GraB exact | CD-GraB efficient |")
    print("|---|---|---:|---:|---:|---:|")
    for w, b in [(2, 16), (4, 16), (4, 64), (8, 32)]:
        cells = []
        for mode in ("rr", "independent", "exact", "efficient"):
            disc = torchgrab.herding_discrepancy(vectors, run_replicas(vectors, w, b, epochs, mode))
            cells.append(f"{disc.linf:.1f} / {disc.l2:.1f}")
        print(f"| {w} | {b} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------- 3. epoch time
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )


def _time_worker(rank: int, world: int, port: int, out: str, n: int, b: int, data: str) -> None:
    from distributed_mnist import load_mnist

    _init(rank, world, port)
    x, y = load_mnist(data, "train", n)
    loss_fn = nn.CrossEntropyLoss()
    res = {}
    for method in ("rr", "cd-grab exact", "cd-grab pipelined", "cd-grab efficient"):
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Linear(784, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        if method == "rr":
            sampler = torch.utils.data.DistributedSampler(range(n), seed=0)
        else:
            sampler = torchgrab.DistributedGraBSampler(range(n), mode=method.split()[1])
        times = []
        for epoch in range(2):  # epoch 0 warms up
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
            dist.barrier()
            t0 = time.perf_counter()
            for lo in range(0, len(order), b):
                idx = order[lo : lo + b]
                opt.zero_grad()
                if method == "rr":
                    loss_fn(model(x[idx]), y[idx]).backward()
                else:
                    sampler.backward(model, loss_fn, x[idx], y[idx])
                opt.step()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        res[method] = times[-1]
    if rank == 0:
        np.savez(os.path.join(out, "t.npz"), **{k.replace(" ", "_"): v for k, v in res.items()})
    dist.destroy_process_group()


def table_time(quick: bool, data: str) -> None:
    n, b = (4096, 32) if quick else (16384, 32)
    print(
        f"\n## 3. Epoch time, MNIST logistic regression (d = 7,850), {n} training images, B = {b} per rank, gloo on CPU"
    )
    print(
        f"(this machine: {os.cpu_count()} CPU cores, shared; one torch thread per rank, so 4 ranks oversubscribe 2 cores)\n"
    )
    print("| ranks | DistributedSampler + DDP | CD-GraB exact | CD-GraB pipelined | CD-GraB efficient |")
    print("|---|---:|---:|---:|---:|")
    for world in (1, 2, 4):
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(
                _time_worker,
                args=(world, _free_port(), out, n, b, data),
                nprocs=world,
                join=True,
                start_method="forkserver",
            )
            t = dict(np.load(os.path.join(out, "t.npz")))
        print(
            f"| {world} | {float(t['rr']):.2f} s | {float(t['cd-grab_exact']):.2f} s | {float(t['cd-grab_pipelined']):.2f} s | {float(t['cd-grab_efficient']):.2f} s |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data", default=os.environ.get("MNIST_DIR", "/work/shared/data/mnist"))
    ap.add_argument("--only", choices=["bytes", "quality", "time"], default=None)
    args = ap.parse_args()
    multiprocessing.set_forkserver_preload(["torch", "torchgrab.distributed"])
    if args.only in (None, "bytes"):
        table_bytes(args.quick)
        print(
            "\nMeasured by the sampler's counter on real gloo ranks (payload bytes per rank for one step, B = 64, d = 7,850):\n"
        )
        print("| W | mode | counted | formula |")
        print("|---|---|---:|---:|")
        for w in (2, 4):
            m = measured_bytes(w, 64, 7850)
            f = formula_bytes(w, 64, 7850)
            for mode in ("exact", "pipelined", "efficient"):
                want = next(v[0] for k, v in f.items() if k.startswith(mode))
                print(f"| {w} | {mode} | {int(m[mode]):,} | {want:,.0f} |")
    if args.only in (None, "quality"):
        table_quality(args.quick)
    if args.only in (None, "time"):
        table_time(args.quick, args.data)


if __name__ == "__main__":
    main()
