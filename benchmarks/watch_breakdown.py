"""Where a watched step's time goes: each of `watch()`'s hooks, kernels and feeding steps timed inside a real
training loop, per step.

    .venv/bin/python benchmarks/watch_breakdown.py [--task lenet|mnist] [--threads 1] [--epochs 2]
        [--feed-every 8] [--quick]

The loop of `benchmarks/watch_speed.py` (LeNet-5 on 10,000 CIFAR-10 images or logistic regression on all
60,000 MNIST images, batch 64, SGD, data in memory): one `watch()` arm and one RR arm, a warm-up epoch each,
then --epochs epochs of each, alternating. Each function below is wrapped with `perf_counter` for the timed
epochs; the table has its total time per step (a function's time includes the functions it calls, so
the rows overlap) and its calls per step. The wrappers cost about half a microsecond a call.

Why this script exists: in a training step every call a hook makes starts with cold caches (the layer's
backward, or forward, ran just before), so a torch or NumPy call in a hook costs several times what the
same call costs in a loop of its own (`--part kernels` of `watch_speed.py` measures such loops). Only
timing in the loop says what a step pays.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from typing import Any, Callable, Dict

import numpy as np
import torch
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402
import watch_speed as ws  # noqa: E402
from end_to_end import load_cifar10, load_mnist  # noqa: E402
from torchgrab import _native  # noqa: E402
from torchgrab.capture import feed, layers, watch  # noqa: E402

# (owner, attribute, label): what is timed. Methods of the handle, of the layer sketches, of the row
# feeder, and the Rust kernels as the sketches call them.
TIMED = [
    (watch.WatchHandle, "_on_step_begins", "handle: forward pre-hook (step begins; may feed)"),
    (watch.WatchHandle, "_record", "handle: a layer's call recorded (forward)"),
    (watch.WatchHandle, "_save", "  input kept or projected (forward)"),
    (watch.WatchHandle, "_on_grad", "handle: a layer's output gradient (backward)"),
    (watch.WatchHandle, "_write_direct", "  rows written into the step's slot"),
    (watch.WatchHandle, "_end_step", "handle: step ends"),
    (feed.RowFeeder, "slot_out", "feeder: slot of the row buffer"),
    (feed.RowFeeder, "feed", "feeder: rows handed to the sampler"),
    (layers.LinearSketch, "save", "Linear: input projected"),
    (layers.LinearSketch, "rows_into", "Linear: rows_into"),
    (layers.LinearSketch, "factors_into", "Linear: factors_into"),
    (layers.ConvSketch, "save", "Conv: input kept"),
    (layers.ConvSketch, "rows_into", "Conv: rows_into"),
    (_native, "outer_rows", "  Rust outer_rows"),
    (_native, "channel_sums", "  Rust channel_sums"),
    (_native, "count_sketch", "  Rust count_sketch"),
    (_native, "count_outer_rows", "  Rust count_outer_rows"),
    (_native, "count_factors", "  Rust count_factors"),
    (_native, "outer_factors", "  Rust outer_factors"),
]


class Timers:
    """perf_counter wrappers around TIMED, switched on and off together."""

    def __init__(self) -> None:
        self.on = False
        self.seconds: Dict[str, float] = collections.defaultdict(float)
        self.calls: Dict[str, int] = collections.defaultdict(int)
        for owner, name, label in TIMED:
            if hasattr(owner, name):
                setattr(owner, name, self._wrap(getattr(owner, name), label))

    def _wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--task", choices=["lenet", "mnist"], default="lenet")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cifar-n", type=int, default=10000)
    ap.add_argument(
        "--feed-every", type=int, default=feed.FEED_EVERY, help="steps whose rows the sampler gets together"
    )
    ap.add_argument("--quick", action="store_true", help="256 images, 1 epoch: a smoke run")
    args = ap.parse_args()
    for name in ("threads", "epochs", "cifar_n", "feed_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.quick:
        args.epochs, args.cifar_n = 1, 256
    torch.set_num_threads(args.threads)
    feed.FEED_EVERY = args.feed_every
    _common.header(f"watch(): where a step's time goes, {args.task}, batch {ws.BATCH}")
    if args.task == "lenet":
        x, y = load_cifar10(args.data, args.cifar_n)
    else:
        x, y = load_mnist(args.data)
        x, y = (x[:256], y[:256]) if args.quick else (x, y)
    timers = Timers()
    runs = {"watch": ws.Arm(args.task, x, y, "watch"), "rr": ws.Arm(args.task, x, y, "rr")}
    for run in runs.values():
        run.epoch()  # warm-up (allocator, projections, first-epoch checks)
    secs: Dict[str, list] = {"watch": [], "rr": []}
    for e in tqdm(range(args.epochs), desc=f"{args.task}, watch() and RR epochs", leave=False, file=sys.stderr):
        for name in ("watch", "rr") if e % 2 == 0 else ("rr", "watch"):
            timers.on = name == "watch"
            secs[name].append(runs[name].epoch())
            timers.on = False
    per_epoch = -(-len(x) // ws.BATCH)
    steps = args.epochs * per_epoch  # the timed watch() steps, over which the table's totals are spread
    extra = (np.median(secs["watch"]) - np.median(secs["rr"])) / per_epoch * 1e6
    print(
        f"\n{len(x)} examples, {args.threads} torch thread(s), K = {runs['watch'].handle.width}, rows fed every "
        f"{feed.FEED_EVERY} steps, load "
        f"{_common.load_average()}: epoch watch() {np.median(secs['watch']):.3f} s, RR {np.median(secs['rr']):.3f} s "
        f"(x RR {np.median(secs['watch']) / np.median(secs['rr']):.3f}): watch() adds {extra:.0f} us a step"
    )
    print(f"\n{'timed in the loop':<52} {'us/step':>8} {'calls/step':>11}")
    for _, _, label in TIMED:
        if timers.calls.get(label):
            print(f"{label:<52} {timers.seconds[label] / steps * 1e6:>8.1f} {timers.calls[label] / steps:>11.2f}")


if __name__ == "__main__":
    main()
