"""What a watched step dispatches: the ops `sampler.watch(model)` adds to a step of a BERT of MiniLM's
layout, counted one by one, and what they cost on this CPU at a width where dispatch, not arithmetic, is
the step (as it is for MiniLM on a GPU: `benchmarks/watch_gpu.py` found the GPU idle and the watched
step's cost in the ops dispatched from Python).

    .venv/bin/python benchmarks/watch_dispatch.py [--width 64] [--batch-size 8] [--max-length 16]
        [--steps 40] [--rounds 8] [--threads 1]

The model is all-MiniLM-L6-v2's configuration (6 layers, post-LayerNorm, GELU MLP, pooler) at hidden
width --width (heads of 16, MLP 4x the width), random weights, a 2-way classifier, fine-tuned on GLUE
SST-2 sentences (tokenized by MiniLM's tokenizer, padded to --max-length; the vocabulary is the ids that
occur, renumbered) with AdamW (foreach, as on a GPU), as a Hugging Face loop does it. Two parts:

1. Ops per step: every aten op that is not a view, counted by a TorchDispatchMode over 4 steps, for RR
   and for `grab` under `watch()`, and the watched step's extra ops by the torchgrab function that
   dispatched them. The count does not depend on the device, so it is what a GPU launches too, but for
   the grouping that a CPU skips for large tensors (`CPU_GROUP_MAX` in capture/layers.py; at the default
   sizes every group forms here, as on a GPU).
2. Time: paired rounds of --steps steps, RR and `grab` alternating, each round's ratio; median and
   quartiles.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import traceback

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as B  # noqa: E402
import torchgrab  # noqa: E402

# Ops that launch no kernel: views and metadata.
VIEWS = {
    "view",
    "_unsafe_view",
    "_reshape_alias",
    "alias",
    "as_strided",
    "detach",
    "expand",
    "lift_fresh",
    "permute",
    "select",
    "slice",
    "squeeze",
    "t",
    "transpose",
    "unflatten",
    "split",
    "split_with_sizes",
    "unbind",
    "chunk",
    "unsqueeze",
}


class CountOps(TorchDispatchMode):
    """Counts the non-view aten ops dispatched under it, each by the innermost torchgrab frame that
    called it (None: the user's loop or torch itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_where: "collections.Counter[tuple]" = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            frames = [f for f in traceback.extract_stack() if f"{os.sep}torchgrab{os.sep}" in f.filename]
            where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].name}" if frames else None
            self.by_where[(where, name)] += 1
        return func(*args, **(kwargs or {}))


def load(args):
    C = B.examples_common()
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = C.minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    texts, y = C.load_glue(C.data_root(args.data), "SST-2", "train")
    n = args.batch_size * args.steps
    enc = tok(
        [t[0] for t in texts[:n]],
        padding="max_length",
        truncation=True,
        max_length=args.max_length,
        return_tensors="pt",
    )
    # The ids that occur, renumbered: the embedding of MiniLM's 30,522 words would make the optimizer's
    # update over it most of a step at this width, which on a GPU it is not.
    used, ids = torch.unique(enc["input_ids"], return_inverse=True)
    enc["input_ids"] = ids
    config = AutoConfig.from_pretrained(path)
    config.update(
        {
            "vocab_size": len(used),
            "hidden_size": args.width,
            "num_attention_heads": max(1, args.width // 16),
            "intermediate_size": 4 * args.width,
            "num_labels": 2,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        }
    )

    def make_model(seed):
        torch.manual_seed(seed)
        return BertForSequenceClassification(config)

    return dict(enc), torch.as_tensor(np.asarray(y[:n])), make_model, config


class Run:
    def __init__(self, make_model, x, y, ordering, args, seed=0):
        self.x, self.y = x, y
        self.model = make_model(seed)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-5, weight_decay=0.01, foreach=True)
        self.bs = args.batch_size
        self.n = len(y)
        self.gen = torch.Generator().manual_seed(seed)
        self.sampler = None if ordering == "rr" else torchgrab.GraBSampler(n=self.n, ordering=ordering, seed=seed)
        self.handle = self.sampler.watch(self.model) if self.sampler is not None else None
        self.ce = nn.CrossEntropyLoss()

    def order(self):
        if self.sampler is None:
            return torch.randperm(self.n, generator=self.gen)
        return torch.from_numpy(np.fromiter(iter(self.sampler), dtype=np.int64, count=self.n))

    def step(self, i):
        loss = self.ce(self.model(**{key: v[i] for key, v in self.x.items()}).logits, self.y[i])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def epoch(self, counter=None, counted=0):
        """One epoch, timed; its first ``counted`` steps run under ``counter`` (a CountOps)."""
        order = self.order()
        t = time.perf_counter()
        for k, s in enumerate(range(0, self.n, self.bs)):
            i = order[s : s + self.bs]
            if k < counted:
                with counter:
                    self.step(i)
            else:
                self.step(i)
        if self.sampler is not None:
            self.sampler.synchronize()
        return time.perf_counter() - t


def count(run, steps=4):
    """Non-view ops per step over the first ``steps`` steps of an epoch (the rest of it runs uncounted, so
    the sampler's next epoch starts clean)."""
    counter = CountOps()
    run.epoch(counter, steps)
    return {k: v / steps for k, v in counter.by_where.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="data root in the layouts of ../shared/data")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40, help="steps per timed run (one epoch over that many batches)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="4 steps, 2 rounds: a smoke run")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "watch_dispatch.txt"))
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds = 4, 2
    torch.set_num_threads(args.threads)
    out = B.begin_result("watch(): the ops a watched step dispatches, BERT of MiniLM's layout")
    x, y, make_model, config = load(args)
    out.line(
        f"# width {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
        f"MLP {config.intermediate_size}, vocabulary {config.vocab_size}; batch {args.batch_size}, "
        f"length {args.max_length}, AdamW; {args.threads} torch thread(s)"
    )
    runs = {"rr": Run(make_model, x, y, "rr", args), "grab, watch()": Run(make_model, x, y, "grab", args)}
    out.line(f"# watch() rows K = {runs['grab, watch()'].handle.width}")
    for r in runs.values():
        r.epoch()  # a first epoch: the projections are made and cached, the sampler's order is GraB's
    counts = {a: count(r) for a, r in runs.items()}
    totals = {a: sum(c.values()) for a, c in counts.items()}
    out.line("\n## ops per step (not views)")
    out.line(f"{'arm':16s} {'ops':>8s} {'from torchgrab':>15s}")
    for a, c in counts.items():
        mine = sum(v for (w, _), v in c.items() if w is not None)
        out.line(f"{a:16s} {totals[a]:8.1f} {mine:15.1f}")
    out.line("\n## the watched step's ops dispatched by torchgrab, by function and op")
    by = collections.Counter()
    for (w, op), v in counts["grab, watch()"].items():
        if w is not None:
            by[(w, op)] += v
    for (w, op), v in sorted(by.items(), key=lambda kv: -kv[1]):
        out.line(f"{v:7.1f}  {op:22s} {w}")
    secs = B.paired_epochs(runs, args.rounds)
    rr = np.asarray(secs["rr"])
    out.line(f"\n## time: {args.rounds} paired rounds of {args.steps} steps")
    out.line(f"{'arm':16s} {'ms/step':>8s} {'x RR median':>12s} {'quartiles':>12s}")
    for a, s in secs.items():
        r = np.asarray(s) / rr
        q1, med, q3 = np.percentile(r, [25, 50, 75])
        out.line(f"{a:16s} {1e3 * np.median(s) / args.steps:8.2f} {med:12.3f} {q1:6.3f}-{q3:.3f}")
    out.line(f"# load average at end: {B.load_average()}")
    out.save(args.out)


if __name__ == "__main__":
    main()
