"""What `sampler.watch(model)` costs on a transformer, on this CPU: the WikiText-2 language model of
`examples/wikitext2_transformer.py` (PyTorch's tutorial model: embedding, `nn.TransformerEncoder` with
sequence-first attention, a Linear decoder over the vocabulary), trained by the example's loop.

    .venv/bin/python benchmarks/watch_transformer.py [--tokens 14000] [--rounds 6] [--threads 1]
        [--arms watch,pair,exact] [--vocab 0] [--emsize 64] [--quick]

Paired rounds of one epoch each over the first --tokens training tokens (chunks of 35, batch 20, SGD with
gradient clipping, as the example): plain random reshuffling (`shuffle=True`, nothing watched) against the
same loop with a `GraBSampler` watching the model (`watch(model, batch_first=False)`), in alternating order
within a round; each arm's epoch time over RR's in the same round, median and quartiles over rounds. Arms:

- watch: `grab` with the default sketch;
- pair: `pair` with the default sketch;
- exact: `grab` with `watch(sketch=None)`, exact per-example rows (d numbers per chunk) from the same hooks;
- watch-no-own: `grab` with the default sketch and the layers of classes outside torch (Llama's RMSNorm,
  sketched by torch.func per example) left out with `exclude=`: what those layers cost.

Where the time goes: the layers `watch()` hooks, with how each is captured (`handle.layers`), and the
model's parameters by layer, so a reader can see which layer dominates (at the tutorial's vocabulary of
33,278 words the decoder and the embedding hold almost all of d). `--vocab V` keeps the V most frequent
words of the training tokens and maps the rest to one id: a model whose encoder, with its attention, holds
a larger share of the work. Memory read bandwidth is printed, since exact rows are bound by it.

`--model llama`: Hugging Face's `LlamaForCausalLM` instead, built from a local config of the same sizes
(--emsize hidden, --nhid intermediate, --nlayers, --nhead heads; untied output layer), batch first, so
`watch(model)`: its Linear projections, its embedding and decoder, and its `LlamaRMSNorm` layers, a class
of its own whose rows come from torch.func over each norm (`FunctionalSketch`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402
import torchgrab  # noqa: E402
from torchgrab.capture.layers import FunctionalSketch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ARMS = {
    "watch": ("grab", "default"),
    "pair": ("pair", "default"),
    "exact": ("grab", None),
    "watch-no-own": ("grab", "default"),  # layers of a class outside torch left out (exclude=)
}


@contextmanager
def _examples_on_path():
    """examples/ importable for the length of the block, with its own `_common` (this folder has one too)."""
    saved = sys.modules.get("_common")
    sys.modules["_common"] = _common.examples_common()
    sys.path.insert(0, str(REPO / "examples"))
    try:
        yield
    finally:
        sys.path.remove(str(REPO / "examples"))
        if saved is not None:
            sys.modules["_common"] = saved


with _examples_on_path():
    import wikitext2_lstm  # noqa: E402
    import wikitext2_transformer as EX  # noqa: E402


def load_ids(data, tokens, vocab):
    """The first `tokens` training ids (+1 for the last target) and the vocabulary size; with `vocab`, the
    `vocab - 1` most frequent words of those tokens keep their own ids (renumbered) and the rest share one."""
    corpus = wikitext2_lstm.Corpus(_common.examples_common().data_root(data))
    ids = corpus.splits["train"][: tokens + 1]
    ntokens = len(corpus.word2idx)
    if vocab:
        counts = torch.bincount(ids, minlength=ntokens)
        keep = torch.argsort(counts, descending=True, stable=True)[: vocab - 1]
        remap = torch.full((ntokens,), vocab - 1, dtype=torch.long)
        remap[keep] = torch.arange(vocab - 1)
        ids, ntokens = remap[ids], vocab
    return ids, ntokens


class Arm:
    """One training run of the example's loop; `epoch()` trains one epoch and returns its seconds."""

    def __init__(self, name, chunks, ntokens, args, seed=0):
        self.name, self.ntokens, self.clip = name, ntokens, args.clip
        torch.manual_seed(seed)
        llama = args.model == "llama"
        self.model = (
            make_llama(ntokens, args)
            if llama
            else EX.TransformerModel(ntokens, args.emsize, args.nhead, args.nhid, args.nlayers)
        )
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr)
        self.handle = self.sampler = None
        kw = {"batch_size": args.batch_size, "collate_fn": None if llama else EX.sequence_first}
        if name == "rr":
            gen = torch.Generator().manual_seed(seed)
            self.loader = torch.utils.data.DataLoader(chunks, shuffle=True, generator=gen, **kw)
        else:
            ordering, sketch = ARMS[name]
            self.sampler = torchgrab.GraBSampler(n=len(chunks), ordering=ordering, seed=seed)
            extra = {} if sketch == "default" else {"sketch": sketch}
            if name == "watch-no-own":
                extra["exclude"] = [n for n, m in self.model.named_modules() if FunctionalSketch.applies(m)]
            self.handle = self.sampler.watch(self.model, batch_first=llama, **extra)
            self.loader = torch.utils.data.DataLoader(chunks, sampler=self.sampler, **kw)
        self.crit = nn.CrossEntropyLoss()

    def epoch(self):
        model, opt = self.model, self.opt
        model.train()
        t0 = time.perf_counter()
        for x, y in self.loader:
            opt.zero_grad(set_to_none=True)
            loss = self.crit(model(x).reshape(-1, self.ntokens), y.reshape(-1))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), self.clip)
            opt.step()
        if self.sampler is not None:
            self.sampler.synchronize()  # the last step's rows balanced: part of the epoch
        return time.perf_counter() - t0


class _Logits(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits


def make_llama(ntokens, args):
    """Hugging Face's Llama at the tutorial model's sizes, returning [B, T, V] logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=ntokens, hidden_size=args.emsize, intermediate_size=args.nhid, num_hidden_layers=args.nlayers,
        num_attention_heads=args.nhead, num_key_value_heads=args.nhead, max_position_embeddings=args.bptt,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return _Logits(LlamaForCausalLM(cfg))


def params_by_layer(model):
    """Trainable parameters per block (a numbered transformer layer, else the module owning them): where d
    lives."""
    sizes = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        top = ".".join(parts[: parts.index("layers") + 2] if "layers" in parts else parts[:-1])
        sizes[top] = sizes.get(top, 0) + p.numel()
    return sizes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="data root in the layouts of ../shared/data")
    ap.add_argument("--tokens", type=int, default=14_000, help="training tokens per epoch (chunks of --bptt)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arms", default="watch,pair,exact", help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--vocab", type=int, default=0, help="0: the full vocabulary (33,278 words)")
    ap.add_argument("--model", choices=["tutorial", "llama"], default="tutorial")
    ap.add_argument("--emsize", type=int, default=64)
    ap.add_argument("--nhead", type=int, default=2)
    ap.add_argument("--nhid", type=int, default=128)
    ap.add_argument("--nlayers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--bptt", type=int, default=35)
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true", help="1,400 tokens, 2 rounds: a smoke run")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "watch_transformer.txt"))
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    if args.quick:
        args.tokens, args.rounds = 1_400, 2
    torch.set_num_threads(args.threads)

    out = _common.begin_result("watch() on a transformer language model: one epoch's time over RR's")
    ids, ntokens = load_ids(args.data, args.tokens, args.vocab)
    chunks = EX.Chunks(ids, args.bptt)

    names = ["rr", *arms]
    runs = {a: Arm(a, chunks, ntokens, args) for a in names}
    secs = _common.paired_epochs(runs, args.rounds)

    model = runs["rr"].model
    d = sum(p.numel() for p in model.parameters())
    out.line(
        f"\n## {args.nlayers}-layer {'Llama (Hugging Face)' if args.model == 'llama' else 'transformer'} LM, d_model {args.emsize}, {args.nhead} heads, feed-forward "
        f"{args.nhid}, vocabulary {ntokens:,} (d = {d:,}); {len(chunks)} chunks of {args.bptt} tokens, batch "
        f"{args.batch_size}; {args.threads} torch thread(s), {args.rounds} paired rounds, load {_common.load_average()}"
    )
    out.line("parameters by layer: " + ", ".join(f"{k} {v:,}" for k, v in params_by_layer(model).items()))
    out.line(f"{'arm':<34} {'K or d':>10} {'epoch s':>9} {'x RR median':>12} {'x RR quartiles':>15}")
    rr = np.array(secs["rr"])
    out.line(f"{'rr (plain, shuffle=True)':<34} {'':>10} {np.median(rr):>9.3f} {1.0:>12.3f} {'':>15}")
    for a in arms:
        t = np.array(secs[a])
        q1, q2, q3 = np.percentile(t / rr, [25, 50, 75])
        ordering, sketch = ARMS[a]
        label = f"{ordering}, watch({'' if sketch == 'default' else 'sketch=None'})"
        label += ", own classes out" if a == "watch-no-own" else ""
        out.line(f"{label:<34} {runs[a].handle.width:>10,} {np.median(t):>9.3f} {q2:>12.3f} {f'{q1:.3f}-{q3:.3f}':>15}")
    handle = next((runs[a].handle for a in arms if ARMS[a][1] == "default"), None)
    if handle is not None:
        out.line("\nlayers under the default sketch (handle.layers):")
        for name, kind, width in handle.layers:
            out.line(f"  {name:<40} {kind:<40} {width:>8}")
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        out.save(args.out)
        print(f"# written: {args.out}")


if __name__ == "__main__":
    main()
