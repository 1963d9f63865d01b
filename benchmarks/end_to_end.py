"""End to end, CPU, batch 64: epoch wall time of plain random-reshuffling training (mean gradient only)
against torchgrab `grab` (per-example gradients + balancing) and against the documented recipe of the
reference `grab-sampler` 0.1.3 (torch.func vmap(grad_and_value) per-example gradients + its sampler.step),
on logistic regression / MNIST and LeNet-5 / CIFAR-10 (a seeded subset of the training set, see --cifar-n).

    .venv/bin/python benchmarks/end_to_end.py [--data ../shared/data] [--cifar-n 10000] [--out benchmarks/out]

Every method trains the same model with SGD (lr 0.01) over the same in-memory data; only the order and the
gradient path differ. torchgrab is timed with both capture methods of per_example_gradients
(torch.func vmap, and method="hooks": one batched backward + the outer-product identity for Linear/Conv2d
layers), and through the one-call GraBSampler.backward; the hooks variants also with non_blocking=True
(balancing on a background thread while the next batch is computed; "balance s" is then the time the
training thread spends in sampler.step). The split reports where a GraB epoch goes: per-example gradient capture
(torch.func), balancing (sampler.step), and the rest (forward/backward or parameter update, data slicing).
The reference recipe uses torchopt for the update; plain torch SGD stands in for it here (same cost class).
Timing: --trials rounds, each running one epoch of every method (RR first); medians over the rounds,
and each method's ratio to the RR epoch of the same round (this shared machine's speed drifts).
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import sys
import tarfile
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import torchgrab  # noqa: E402
from torchgrab.gradients import per_example_gradients  # noqa: E402

BATCH = 64
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_mnist(root):
    def idx(path):
        b = gzip.open(path).read()
        if int.from_bytes(b[:4], "big") == 2051:
            n, r, c = (int.from_bytes(b[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
            return np.frombuffer(b, np.uint8, offset=16).reshape(n, r * c)
        return np.frombuffer(b, np.uint8, offset=8)

    x = idx(os.path.join(root, "mnist", "train-images-idx3-ubyte.gz")).astype(np.float32) / 255.0
    y = idx(os.path.join(root, "mnist", "train-labels-idx1-ubyte.gz")).astype(np.int64)
    return torch.from_numpy((x - 0.1307) / 0.3081), torch.from_numpy(y)


def load_cifar10(root, n, seed=0):
    from PIL import Image

    path = os.path.join(root, "cifar10", "cifar10_train_jpg.tar.xz")
    with tarfile.open(path, "r:xz") as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")]
    keep = set(np.random.default_rng(seed).choice(len(members), size=min(n, len(members)), replace=False).tolist())
    wanted = {members[i].name for i in keep}
    xs, ys = [], []
    with tarfile.open(path, "r:xz") as tf:
        for m in tf:
            if m.name in wanted:
                xs.append(np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")))
                ys.append(CLASSES.index(m.name.split("/")[-2]))
    x = np.stack(xs).astype(np.float32) / 255.0
    x = (x - np.array([0.4914, 0.4822, 0.4465], np.float32)) / np.array([0.2470, 0.2435, 0.2616], np.float32)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(np.array(ys, np.int64))


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))

    def forward(self, x):
        return self.head(self.features(x))


def make_model(task):
    torch.manual_seed(0)
    return nn.Linear(784, 10) if task == "mnist_logreg" else LeNet()


loss_fn = nn.CrossEntropyLoss()


def epoch_rr(task, x, y, steps):
    model = make_model(task)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    order = torch.randperm(len(x))
    t0 = time.perf_counter()
    for k in range(steps):
        idx = order[k * BATCH : (k + 1) * BATCH]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    return {"total": time.perf_counter() - t0}


def epoch_torchgrab(task, x, y, steps, method="vmap", non_blocking=False):
    """What GraBSampler.backward does, timed piece by piece. With non_blocking, "balance" is the time
    the training thread spends in sampler.step (handing over a step, waiting for the previous one)."""
    model = make_model(task)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sampler = torchgrab.GraBSampler(n=len(x), ordering="grab", seed=0)
    order = torch.as_tensor(list(iter(sampler)))
    cap = bal = 0.0
    t0 = time.perf_counter()
    for k in range(steps):
        idx = order[k * BATCH : (k + 1) * BATCH]
        opt.zero_grad(set_to_none=True)
        # What GraBSampler.backward does, timed piece by piece.
        t = time.perf_counter()
        grads, _ = per_example_gradients(model, loss_fn, x[idx], y[idx], method=method)
        t2 = time.perf_counter()
        sampler.step(grads, non_blocking=non_blocking)
        t3 = time.perf_counter()
        cap += t2 - t
        bal += t3 - t2
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.grad = grads[name].mean(0)
        opt.step()
    t = time.perf_counter()
    sampler.synchronize()
    bal += time.perf_counter() - t
    return {"total": time.perf_counter() - t0, "capture": cap, "balance": bal}


def epoch_torchgrab_backward(task, x, y, steps, method="hooks", non_blocking=False):
    """The one-call API (GraBSampler.backward), for the total only; non_blocking balances each batch on
    a background thread while the next one is computed (the epoch ends when the last step is done)."""
    model = make_model(task)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sampler = torchgrab.GraBSampler(n=len(x), ordering="grab", seed=0)
    order = torch.as_tensor(list(iter(sampler)))
    t0 = time.perf_counter()
    for k in range(steps):
        idx = order[k * BATCH : (k + 1) * BATCH]
        opt.zero_grad(set_to_none=True)
        sampler.backward(model, loss_fn, x[idx], y[idx], method=method, non_blocking=non_blocking)
        opt.step()
    sampler.synchronize()
    return {"total": time.perf_counter() - t0}


def epoch_reference(grabsampler, task, x, y, steps):
    from functools import partial

    from torch.func import functional_call, grad_and_value, vmap

    model = make_model(task)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    opt = torch.optim.SGD(params.values(), lr=0.01)
    sampler = grabsampler.GraBSampler(range(len(x)), params, device="cpu")

    def compute_loss(model, loss_fn, params, buffers, inputs, targets):
        prediction = functional_call(model, (params, buffers), (inputs.unsqueeze(0),))
        return loss_fn(prediction, targets.unsqueeze(0))

    per_sample = vmap(grad_and_value(partial(compute_loss, model, loss_fn)), in_dims=(None, None, 0, 0))
    order = torch.as_tensor(list(iter(sampler)))
    cap = bal = 0.0
    t0 = time.perf_counter()
    for k in range(steps):
        idx = order[k * BATCH : (k + 1) * BATCH]
        t = time.perf_counter()
        grads, _ = per_sample(params, buffers, x[idx], y[idx])
        t2 = time.perf_counter()
        sampler.step(grads)
        t3 = time.perf_counter()
        cap += t2 - t
        bal += t3 - t2
        for k2, p in params.items():
            p.grad = grads[k2].mean(0)
        opt.step()
    return {"total": time.perf_counter() - t0, "capture": cap, "balance": bal}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data",
        default=os.path.join(here, "..", "..", "shared", "data"),
        help="data root (default: ../shared/data relative to the repository)",
    )
    ap.add_argument("--cifar-n", type=int, default=10000, help="CIFAR-10 training images used (seeded subset)")
    ap.add_argument("--mnist-n", type=int, default=60000)
    ap.add_argument(
        "--trials", type=int, default=5, help="rounds: epochs timed per method, round-robin (medians are reported)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: stable timings on a shared machine)"
    )
    ap.add_argument("--out", default=os.path.join(here, "out"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _common.header(f"End-to-end epoch time on CPU, batch {BATCH}, SGD")
    grabsampler = None
    try:
        grabsampler, shims = _common.import_reference()
        print(
            "# reference: grab-sampler 0.1.3 recipe; shims used (its algorithm untouched): "
            + "; ".join(shims or ["none"])
        )
    except ImportError as e:
        print(f"# reference not importable: {e}")
    tasks = {}
    x, y = load_mnist(args.data)
    tasks["mnist_logreg"] = (x[: args.mnist_n], y[: args.mnist_n])
    tasks["lenet_cifar10"] = load_cifar10(args.data, args.cifar_n)
    print(
        f"# data: MNIST train {len(tasks['mnist_logreg'][0])} examples; CIFAR-10 train subset of "
        f"{len(tasks['lenet_cifar10'][0])} (seeded) of 50000"
    )
    results = {}
    for task, (x, y) in tasks.items():
        steps = len(x) // BATCH
        d = sum(p.numel() for p in make_model(task).parameters())
        methods = {
            "plain RR (mean gradient)": lambda: epoch_rr(task, x, y, steps),
            "torchgrab grab, vmap": lambda: epoch_torchgrab(task, x, y, steps),
            "torchgrab grab, hooks": lambda: epoch_torchgrab(task, x, y, steps, "hooks"),
            "torchgrab grab, hooks, non_blocking": lambda: epoch_torchgrab(
                task, x, y, steps, "hooks", non_blocking=True
            ),
            "torchgrab backward(hooks)": lambda: epoch_torchgrab_backward(task, x, y, steps),
            "backward(hooks, non_blocking)": lambda: epoch_torchgrab_backward(task, x, y, steps, non_blocking=True),
        }
        if grabsampler is not None:
            methods["grab-sampler 0.1.3 recipe"] = lambda: epoch_reference(grabsampler, task, x, y, steps)
        # Rounds: every method once per round, RR first. Each method's ratio to RR is taken within its
        # round (so a slow spell of this shared machine hits both sides of a ratio), and the median
        # over rounds is reported, with the median times.
        rounds = []
        # A progress bar on stderr (a run takes minutes); the tables go to stdout.
        with tqdm(total=args.trials * len(methods), desc=task, unit="epoch", leave=False) as bar:
            for _ in range(args.trials):
                one = {}
                for name, fn in methods.items():
                    bar.set_postfix_str(name)
                    one[name] = fn()
                    bar.update()
                rounds.append(one)
        rr_name = "plain RR (mean gradient)"
        med = lambda xs: float(np.median(xs))  # noqa: E731
        for name in methods:
            rs = [r[name] for r in rounds]
            results[(task, name)] = {
                "total": med([r["total"] for r in rs]),
                "ratio": med([r[name]["total"] / r[rr_name]["total"] for r in rounds]),
                "ratio_range": (
                    min(r[name]["total"] / r[rr_name]["total"] for r in rounds),
                    max(r[name]["total"] / r[rr_name]["total"] for r in rounds),
                ),
                **{k: med([r[k] for r in rs]) for k in ("capture", "balance") if k in rs[0]},
                "balance_share": med([r[name]["balance"] / r[rr_name]["total"] for r in rounds])
                if "balance" in rs[0]
                else None,
            }
        print(
            f"\n## {task}: d = {d}, {steps} steps of {BATCH}, {args.trials} rounds (medians), "
            f"load average now {_common.load_average()}"
        )
        print(
            f"{'method':<36} {'epoch s':>8} {'x RR':>6} {'x RR range':>12} {'capture s':>10} {'balance s':>10} "
            f"{'balance/RR':>11}"
        )
        for (t_, name), r in results.items():
            if t_ != task:
                continue
            cap = r.get("capture")
            bal = r.get("balance")
            share = r.get("balance_share")
            lo, hi = r["ratio_range"]
            print(
                f"{name:<36} {r['total']:>8.2f} {r['ratio']:>6.2f} {f'{lo:.2f}-{hi:.2f}':>12} "
                f"{cap if cap is not None else float('nan'):>10.2f} {bal if bal is not None else float('nan'):>10.3f} "
                f"{(100 * share) if share is not None else float('nan'):>10.1f}%"
            )
    print(f"\n# load average at end (1/5/15 min): {_common.load_average()}")
    os.makedirs(args.out, exist_ok=True)
    plt = _common.pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(tasks), figsize=(12, 3.8))
        for ax, task in zip(np.atleast_1d(axes), tasks):
            names = [n for (t, n) in results if t == task]
            caps = [results[(task, n)].get("capture", 0.0) for n in names]
            bals = [results[(task, n)].get("balance", 0.0) for n in names]
            rest = [results[(task, n)]["total"] - c - b for n, c, b in zip(names, caps, bals)]
            pos = np.arange(len(names))
            ax.barh(pos, rest, label="forward/backward/update")
            ax.barh(pos, caps, left=rest, label="per-example capture")
            ax.barh(pos, bals, left=np.array(rest) + np.array(caps), label="balancing")
            ax.set_yticks(pos, names, fontsize=8)
            ax.set_xlabel("epoch seconds")
            ax.set_title(task)
        np.atleast_1d(axes)[0].legend(fontsize=8)
        _common.save_plot(fig, args.out, "end_to_end.png")


if __name__ == "__main__":
    main()
