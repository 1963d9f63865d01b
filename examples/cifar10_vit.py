"""A small vision transformer (Hugging Face's ViT, from a local config) trained from scratch on CIFAR-10 with
AdamW, its order from `sampler.watch(model)`: the class token and position embeddings are parameters of
no layer, taken per example where the embeddings broadcast them over the batch.

    nice -n 19 python examples/cifar10_vit.py [--data ../shared/data] [--epochs 10] [--subset 5000]
    python examples/cifar10_vit.py --quick      # 500 images (1,000 test), 2 epochs, 2 layers: a smoke test

Patches of 4 x 4 (64 tokens and the class token), width 64, 4 layers of 4 heads, MLP 128, dropout off;
AdamW lr 1e-3, weight decay 0.05, batch 64, no augmentation (as experiment 2: an example's gradient must
not change from epoch to epoch by a random crop). Writes out/cifar10_vit.{csv,png,md}: full-pass training
loss, test accuracy, training seconds per epoch.
"""

from __future__ import annotations

import os
from pathlib import Path

import _common as C
import torch
from torch import nn
from torch.utils.data import TensorDataset


class ViT(nn.Module):
    """Hugging Face's ViTForImageClassification for 32 x 32 images, returning its logits."""

    def __init__(self, width: int = 64, layers: int = 4, heads: int = 4, n_classes: int = 10):
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
            image_size=32, patch_size=4, num_channels=3, num_labels=n_classes, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        self.m = ViTForImageClassification(cfg)

    def forward(self, x):
        return self.m(pixel_values=x).logits


def main(argv=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = C.base_parser(__doc__, epochs=10, out="out/cifar10_vit")
    p.set_defaults(orderings="rr,grab,pair", capture="watch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--subset", type=int, default=5000, help="first N training images, class-balanced (0 = all 50,000)")
    p.add_argument("--cache", default="out/cifar10.npz")
    args = p.parse_args(argv)
    if args.quick:
        args.subset, args.epochs, args.layers = 500, min(args.epochs, 2), 2
    torch.set_num_threads(args.threads)

    test_size = 1000 if args.quick else 0
    xtr_t, ytr_t, xte_t, yte_t = C.cifar10_tensors(C.data_root(args.data), Path(args.cache), args.subset, test_size)
    train_set = TensorDataset(xtr_t, ytr_t)
    loss_fn = nn.CrossEntropyLoss()

    def evaluate(model):
        train_loss, train_acc = C.full_pass(model, xtr_t, ytr_t, loss_fn, batch=500)
        _, acc = C.full_pass(model, xte_t, yte_t, loss_fn, batch=500)
        return {"train_loss": train_loss, "train_acc": train_acc, "val_metric": acc, "metric": "test accuracy"}

    def make_model():
        return ViT(args.width, args.layers)

    orderings = C.select_orderings(args.orderings.split(","), len(train_set), C.n_params(make_model()))

    def train_one(ordering, seed):
        return C.train_supervised(
            ordering,
            seed,
            make_model=make_model,
            make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=args.weight_decay),
            train_set=train_set,
            loss_fn=loss_fn,
            evaluate=evaluate,
            epochs=args.epochs,
            batch_size=args.batch_size,
            device=args.device,
            capture=args.capture,
        )

    rows = C.run_grid(train_one, orderings, C.seed_range(args), args.epochs, "cifar10_vit", args.out + ".csv")
    title = (
        f"CIFAR-10 ViT ({len(train_set)} train / {len(xte_t)} test; width {args.width}, {args.layers} layers), "
        f"AdamW lr {args.lr} wd {args.weight_decay}, batch {args.batch_size}, capture {args.capture}"
    )
    C.report(rows, "test accuracy", title, args.out)
    return rows


if __name__ == "__main__":
    main()
