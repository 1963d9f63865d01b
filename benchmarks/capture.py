"""Per-example gradient capture, per step, on the CPU: where the time of one batch goes.

    .venv/bin/python benchmarks/capture.py [--threads 1] [--batch 64]

For logistic regression on MNIST-shaped input (784 -> 10), LeNet-5 on CIFAR-shaped input and the
BERT-family encoder of examples/glue_finetune.py (batch 16; vmap cannot trace it, so its vmap column
is the one-sentence-at-a-time loop the example used before), prints milliseconds per step (best of 3
timed loops) of: an ordinary forward + backward (what a random-reshuffling step pays),
`per_example_gradients` with vmap and with hooks, and the two pieces of the hooks
path that were rewritten: forming convolution columns (`F.unfold` against `torchgrab.gradients.im2col`,
checked equal) and the per-example losses (a vmap over the batch against
`torchgrab.gradients.per_example_losses`, checked equal). Random inputs: the cost does not depend on
the values. The end-to-end epochs, with data, are in benchmarks/end_to_end.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from end_to_end import LeNet  # noqa: E402
from torchgrab.gradients import im2col, per_example_gradients, per_example_losses  # noqa: E402

REPS = {"n": 20}


def ms(f, n=None):
    """Best of 3 loops of n calls (default REPS["n"]), after 2 warm-up calls."""
    n = n or REPS["n"]
    f()
    f()
    return _common.best_of(lambda: [f() for _ in range(n)], 3) / n * 1e3


def bert_row(data, batch=16, max_len=48):
    """all-MiniLM-L6-v2 (examples/glue_finetune.py's model and setup, word embeddings frozen) on a batch
    of 16 SST-2 training sentences (seeded draw; random token ids of lengths 8-48 without the data): the
    one-sentence-at-a-time loop the example used against the hooks capture of the batch, padded to its
    longest sentence (vmap cannot trace Hugging Face's BERT)."""
    try:
        # examples/_common.py (this directory has its own _common): where the encoder's package keeps it.
        examples_common = _common.examples_common()
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        path = examples_common.minilm_path()
    except Exception as e:  # the package or transformers missing: no row
        print(f"{'MiniLM-L6 (BERT)':<18} skipped: {e}")
        return
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="eager")
    m.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    root = examples_common.data_root(data)
    if examples_common.has_glue_task(root, "SST-2", "train"):
        # What the example trains on: SST-2 sentences (a seeded draw), tokenized as it does.
        texts, labels = examples_common.load_glue(root, "SST-2", "train")
        pick = np.random.default_rng(0).choice(len(texts), batch, replace=False)
        enc = AutoTokenizer.from_pretrained(path)(
            [texts[i][0] for i in pick], padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        )
        x, y, what = dict(enc), torch.as_tensor(labels[pick]), "SST-2 sentences"
    else:
        lengths = torch.randint(8, max_len + 1, (batch,))
        ids = torch.randint(1000, 20000, (batch, max_len)) * (torch.arange(max_len) < lengths[:, None])
        mask = (ids != 0).long()
        x, y, what = {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 2, (batch,)), "random ids"
    lengths = x["attention_mask"].sum(1)
    print(f"# MiniLM-L6 batch: {what}, lengths {lengths.tolist()}")
    ce = nn.CrossEntropyLoss()

    def loss_fn(out, t):
        return ce(out.logits, t)

    params = [q for q in m.parameters() if q.requires_grad]

    n_max = int(lengths.max())
    xb = {k: v[:, :n_max] for k, v in x.items()}

    def rr():
        m.zero_grad(set_to_none=True)
        loss_fn(m(**xb), y).backward()

    def loop():
        for i, n in enumerate(lengths.tolist()):
            xi = {k: v[i : i + 1, :n] for k, v in x.items() if k != "attention_mask"}
            torch.autograd.grad(loss_fn(m(**xi), y[i : i + 1]), params)

    def hooks():
        per_example_gradients(m, loss_fn, xb, y, method="hooks")

    print(
        f"{f'MiniLM-L6, B={batch}':<18} {ms(rr, 3):>13.2f} {'(loop) ' + format(ms(loop, 3), '.2f'):>13} {ms(hooks, 3):>14.2f}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--data", default=None, help="data root for the SST-2 sentences (default: ../shared/data)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: few repetitions, no MiniLM row")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        REPS["n"] = 2
    _common.header(f"Per-example gradient capture per step, CPU, batch {args.batch}")
    b = args.batch
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    models = {
        "logreg 784->10": (nn.Linear(784, 10), torch.randn(b, 784)),
        "LeNet-5 3x32x32": (LeNet(), torch.randn(b, 3, 32, 32)),
    }
    y = torch.randint(0, 10, (b,))
    print(f"\n{'model':<18} {'fwd+bwd (RR)':>13} {'vmap capture':>13} {'hooks capture':>14}   (ms per step)")
    for name, (model, x) in models.items():

        def rr(model=model, x=x):
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()

        vm = ms(lambda: per_example_gradients(model, loss_fn, x, y))
        hk = ms(lambda: per_example_gradients(model, loss_fn, x, y, method="hooks"))
        print(f"{name:<18} {ms(rr):>13.2f} {vm:>13.2f} {hk:>14.2f}")

    if not args.quick:
        bert_row(args.data)

    print(f"\n{'piece':<40} {'before':>8} {'now':>8}   (ms per step)")
    for c, h in [(3, 32), (6, 14)]:
        x = torch.randn(b, c, h, h)
        args_ = ((5, 5), (1, 1), (0, 0), (1, 1))
        assert torch.equal(F.unfold(x, *args_), im2col(x, *args_))
        print(
            f"{f'conv columns, {c}x{h}x{h}, 5x5':<40} {ms(lambda: F.unfold(x, *args_)):>8.2f} "
            f"{ms(lambda: im2col(x, *args_)):>8.2f}"
        )
    out = torch.randn(b, 10)
    one_by_one = vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))
    assert torch.allclose(one_by_one(out, y), per_example_losses(loss_fn, out, y), atol=1e-6)
    print(
        f"{'per-example cross-entropy, 10 classes':<40} {ms(lambda: one_by_one(out, y), 10 * REPS['n']):>8.3f} "
        f"{ms(lambda: per_example_losses(loss_fn, out, y), 10 * REPS['n']):>8.3f}"
    )
    print(f"\n# load average at end (1/5/15 min): {_common.load_average()}")


if __name__ == "__main__":
    main()
