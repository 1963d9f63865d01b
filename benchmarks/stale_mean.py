"""Why GraB loses in fine-tuning: does an order built from one epoch's gradients still balance the next
epoch's? (Issue 17, the Adam study.)

The model trains with random reshuffling; at the start of every epoch a probe pass (weights fixed: no
optimizer step) records each example's watch() row (the default sketch), F_e at the weights w_e. GraB
uses the order it built from epoch e-1's gradients in epoch e; here both sides are taken at fixed
points, so only the change between epochs is measured, not the change within one. For each e >= 1, on
F_e centered by its own mean m_e:

- cos(m_e, m_{e-1}) and ||m_e - m_{e-1}|| / ||m_e||: how far the mean moved (GraB centers by the
  previous epoch's mean);
- herding discrepancy max_k ||sum_{i<=k} (F_e[pi(i)] - m_e)|| / sqrt(n), relative to random orders
  (median of 20), for orders built by `grab` and `pair` from F_{e-1} (`grab` centered by m_{e-1}, and
  as GraB itself centers, by the stale mean m_{e-2}, and by a running mean of the rows seen before in
  the same epoch), and the oracle: `grab`'s order built from F_e itself (centered by m_e).

If the order from F_{e-1} balances F_e like the oracle does, the order survives the epoch; if it
balances like a random order while the oracle is far below, it goes stale. Two settings through the
same machinery: MNIST logistic regression with SGD (where GraB wins) and all-MiniLM-L6-v2 fine-tuned on
SST-2 with AdamW (where it loses).

    python benchmarks/stale_mean.py                         # both settings
    python benchmarks/stale_mean.py --settings mnist --quick
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from _common import Out, load_module, provenance
from torch import nn
from torchgrab import GraBSampler

ROOT = Path(__file__).resolve().parents[1]
C = load_module("examples_common", ROOT / "examples" / "_common.py")  # data loading of the examples


def probe(model: nn.Module, n: int, loss_of, batch: int, exclude=()) -> np.ndarray:
    """[n, K]: every example's watch() row at the model's current weights (no optimizer step)."""
    s = GraBSampler(n=n, ordering="grab", first_epoch="identity")
    rows = None
    with s.watch(model, exclude=exclude, non_blocking=False) as handle:
        original = s.step

        def step(r, *a, **k):
            nonlocal rows
            if rows is None:
                rows = np.zeros((n, r.shape[1]), np.float32)
            rows[s._order[s._stepped : s._stepped + len(r)]] = r
            return original(r, *a, **k)

        s.step = step
        for idx in torch.utils.data.BatchSampler(s, batch, False):
            loss_of(idx).backward()
            model.zero_grad(set_to_none=True)
        handle.flush()
    return rows


def discrepancy(rows: np.ndarray, order: np.ndarray, mean: np.ndarray) -> float:
    prefix = np.cumsum(rows[order].astype(np.float64) - mean, axis=0)
    return float(np.linalg.norm(prefix, axis=1).max() / np.sqrt(len(order)))


def next_order(ordering: str, rows: np.ndarray, visit: np.ndarray, seed: int) -> np.ndarray:
    """The order `ordering` builds for its second epoch after seeing `rows` in the order `visit` in its
    first (where GraB's stale mean is zero: pass rows centered as wanted)."""
    s = GraBSampler(n=len(rows), ordering=ordering, seed=seed)
    list(s)  # begin the first epoch
    for lo in range(0, len(visit), 64):
        chunk = visit[lo : lo + 64]
        s.step(np.ascontiguousarray(rows[chunk]), indices=chunk)
    return np.array(list(s))


def running_mean_grab(rows: np.ndarray, visit: np.ndarray, start: np.ndarray) -> np.ndarray:
    """GraB's sign rule with a fresher center: each row centered by the mean of the rows visited before
    it in the same epoch (``start`` for the first), not by the previous epoch's mean. Sequential numpy,
    a candidate for the fine-tuning case (not an ordering of torchgrab)."""
    s = np.zeros(rows.shape[1])
    total = np.zeros(rows.shape[1])
    front, back = [], []
    for t, i in enumerate(visit):
        center = start if t == 0 else total / t
        z = rows[i].astype(np.float64) - center
        if s @ z <= 0:
            s += z
            front.append(i)
        else:
            s -= z
            back.append(i)
        total += rows[i]
    return np.array(front + back[::-1])


def analyse(probes, seed: int):
    out = []
    rng = np.random.default_rng(seed)
    for e in range(1, len(probes)):
        prev, rows = probes[e - 1], probes[e]
        n = len(rows)
        m, m_prev = rows.mean(0), prev.mean(0)
        rand = float(np.median([discrepancy(rows, rng.permutation(n), m) for _ in range(20)]))
        visit = rng.permutation(n)
        grab = next_order("grab", prev - m_prev, visit, seed)
        # What GraB itself does: epoch e-1's gradients centered by the mean of epoch e-2 (the stale mean).
        stale = next_order("grab", prev - probes[e - 2].mean(0), visit, seed) if e >= 2 else None
        pair = next_order("pair", prev, visit, seed)
        fresh = running_mean_grab(prev, visit, probes[e - 2].mean(0) if e >= 2 else np.zeros_like(m))
        oracle = next_order("grab", rows - m, visit, seed)
        out.append(
            {
                "epoch": e,
                "cos(m_e, m_e-1)": float(m @ m_prev / np.linalg.norm(m) / np.linalg.norm(m_prev)),
                "|m_e - m_e-1| / |m_e|": float(np.linalg.norm(m - m_prev) / np.linalg.norm(m)),
                "grab from F_e-1": discrepancy(rows, grab, m) / rand,
                "grab from F_e-1, stale mean m_e-2": float("nan")
                if stale is None
                else discrepancy(rows, stale, m) / rand,
                "grab from F_e-1, running mean": discrepancy(rows, fresh, m) / rand,
                "pair from F_e-1": discrepancy(rows, pair, m) / rand,
                "oracle grab from F_e": discrepancy(rows, oracle, m) / rand,
            }
        )
    return out


def train_and_probe(model, opt, n, loss_of, args, batch, probe_batch, label=None):
    """Train with random reshuffling for args.epochs epochs; probe every example's row before each epoch
    and after the last (F_0 .. F_E)."""
    probes = []
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs + 1):
        probes.append(probe(model, n, loss_of, probe_batch))
        if label is not None:
            print(f"  {label}: probe {epoch} done", flush=True)
        if epoch == args.epochs:
            break
        for idx in torch.randperm(n, generator=g).split(batch):
            opt.zero_grad()
            loss_of(idx).backward()
            opt.step()
    return probes


def run_mnist(args):
    (xtr, ytr), _ = C.load_mnist(C.data_root(None))
    n = 2000 if args.quick else 10000
    x = ((torch.tensor(xtr[:n], dtype=torch.float32) / 255.0 - 0.1307) / 0.3081).reshape(n, -1)
    y = torch.tensor(ytr[:n])
    torch.manual_seed(args.seed)
    model = nn.Linear(784, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_of = lambda idx: nn.functional.cross_entropy(model(x[idx]), y[idx])  # noqa: E731
    return train_and_probe(model, opt, n, loss_of, args, batch=64, probe_batch=256)


def run_minilm(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = C.minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    texts, labels = C.load_glue(C.data_root(None), "SST-2", "train")
    n = 32 if args.quick else args.train_size
    keep = np.random.default_rng(1234).permutation(len(labels))[:n]
    enc = tok([texts[i][0] for i in keep], padding="max_length", truncation=True, max_length=48, return_tensors="pt")
    y = torch.as_tensor(labels[keep])
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # as examples/glue_finetune.py
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=5e-5, weight_decay=0.01)
    model.train()

    def loss_of(idx):
        out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx])
        return nn.functional.cross_entropy(out.logits, y[idx])

    return train_and_probe(model, opt, n, loss_of, args, batch=16, probe_batch=32, label="minilm")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="mnist,minilm")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/out/stale_mean")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = 2
    torch.set_num_threads(args.threads)
    out = Out()
    for line in provenance():
        out.line(line)
    out.line(__doc__.split("\n\n")[0])
    runs = {"mnist": run_mnist, "minilm": run_minilm}
    for name in args.settings.split(","):
        probes = runs[name](args)
        rows = analyse(probes, args.seed)
        n, k = probes[0].shape
        out.line(
            f"\n{name}: n = {n}, K = {k}, {args.epochs} epochs, seed {args.seed}; discrepancies relative to random orders"
        )
        keys = list(rows[0])
        out.line("| " + " | ".join(keys) + " |")
        out.line("|" + "---|" * len(keys))
        for r in rows:
            out.line("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out + ".txt")
    print(f"wrote {args.out}.txt")


if __name__ == "__main__":
    main()
