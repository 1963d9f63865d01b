"""What `sampler.watch(model)` costs on a vision transformer, on this CPU: Hugging Face's ViT (or BEiT, or
ConvNeXt), timm's ViT (`--model timm-vit`, whose class token and position embeddings are parameters of
the model itself) or timm's Swin (`--model timm-swin`: every image's 16 windows of 4 x 4 patches stacked
for the attention, relative-position tables gathered into a bias over all windows), built from a local
config, trained from scratch on CIFAR-10 images from ../shared/data.

    .venv/bin/python benchmarks/watch_vit.py [--model vit] [--n 2000] [--rounds 6] [--threads 1]
        [--arms watch,watch-no-direct,exact] [--width 64] [--layers 4] [--quick]

Paired rounds of one epoch each over --n images (batch 64, AdamW, in-memory slices): plain random
reshuffling (`randperm`, nothing watched) against the same loop with a `GraBSampler` watching the model,
in alternating order within a round; each arm's epoch time over RR's in the same round, median and
quartiles over rounds. Arms:

- watch: `grab` with the default sketch;
- watch-no-direct: the same with the parameters of no layer left out (`exclude=`): a ViT's class token and
  position embeddings, BEiT's and ConvNeXt's layer scales, Swin's relative-position tables (each example's
  part pulled back through the gather that makes the bias), which `watch()` takes where the forward of the
  module holding them broadcasts them over the batch, watching that module's operations while it runs
  (python/torchgrab/capture/direct.py). The difference is what they cost;
- watch-mode-everywhere: `watch` with the sublayers of the modules holding those parameters run under the
  same operation watch as the module's own forward (what `watch()` did before it left them out of it);
- exact: `grab` with `watch(sketch=None)`, exact per-example rows (d numbers per image).

The layers `watch()` hooks are printed with how each is captured (`handle.layers`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402
import torchgrab  # noqa: E402
from end_to_end import load_cifar10  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ARMS = {
    "watch": "default",
    "watch-no-direct": "default",  # parameters of no layer left out (exclude=)
    "watch-mode-everywhere": "default",  # their modules' sublayers under the operation watch too
    "exact": None,
}


class _Images(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m(pixel_values=x).logits


def make_model(args):
    """A Hugging Face (or timm) image classifier for 32 x 32 images and 10 classes, dropout and drop-path off."""
    if args.model == "timm-swin":
        import timm

        return timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=32, patch_size=2,
            window_size=4, embed_dim=args.width // 2, depths=(args.layers // 2, args.layers - args.layers // 2),
            num_heads=(args.heads // 2, args.heads), drop_path_rate=0.0,
        )  # fmt: skip
    if args.model == "timm-vit":
        import timm

        return timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4,
            embed_dim=args.width, depth=args.layers, num_heads=args.heads,
        )  # fmt: skip
    import transformers as tf

    common = dict(num_labels=10, image_size=32, num_channels=3)
    if args.model == "convnext":
        cfg = tf.ConvNextConfig(
            hidden_sizes=[args.width, 2 * args.width], depths=[args.layers // 2, args.layers - args.layers // 2],
            num_stages=2, patch_size=2, layer_scale_init_value=1e-6, drop_path_rate=0.0, **common,
        )  # fmt: skip
        return _Images(tf.ConvNextForImageClassification(cfg))
    fields = dict(
        hidden_size=args.width, intermediate_size=2 * args.width, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, patch_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        **common,
    )  # fmt: skip
    if args.model == "beit":
        cfg = tf.BeitConfig(**fields, drop_path_rate=0.0, layer_scale_init_value=0.1, use_mean_pooling=True)
        return _Images(tf.BeitForImageClassification(cfg))
    return _Images(tf.ViTForImageClassification(tf.ViTConfig(**fields)))


def direct_params(handle):
    return [n for n, kind, _ in handle.layers if kind.startswith("parameter of no layer")]


class Arm:
    """One training run; `epoch()` trains one epoch over in-memory slices and returns its seconds."""

    def __init__(self, name, x, y, args, seed=0):
        self.name, self.x, self.y, self.batch = name, x, y, args.batch_size
        torch.manual_seed(seed)
        self.model = make_model(args).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr)
        self.gen = torch.Generator().manual_seed(seed)
        self.handle = self.sampler = None
        if name != "rr":
            self.sampler = torchgrab.GraBSampler(n=len(x), ordering="grab", seed=seed)
            extra = {} if ARMS[name] == "default" else {"sketch": ARMS[name]}
            if name == "watch-no-direct":
                probe = torchgrab.GraBSampler(n=len(x)).watch(self.model)
                extra["exclude"] = direct_params(probe)
                probe.remove()
            from torchgrab.capture import watch as watch_module

            watch_module._SUBLAYERS_WITHOUT_MODE = name != "watch-mode-everywhere"
            self.handle = self.sampler.watch(self.model, **extra)
            watch_module._SUBLAYERS_WITHOUT_MODE = True
        self.crit = nn.CrossEntropyLoss()

    def epoch(self):
        if self.sampler is None:
            order = torch.randperm(len(self.x), generator=self.gen)
        else:
            order = torch.from_numpy(np.fromiter(iter(self.sampler), dtype=np.int64, count=len(self.x)))
        t0 = time.perf_counter()
        for i in range(0, len(order), self.batch):
            idx = order[i : i + self.batch]
            self.opt.zero_grad(set_to_none=True)
            self.crit(self.model(self.x[idx]), self.y[idx]).backward()
            self.opt.step()
        if self.sampler is not None:
            self.sampler.synchronize()  # the last step's rows balanced: part of the epoch
        return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="data root (../shared/data)")
    ap.add_argument("--model", choices=["vit", "beit", "convnext", "timm-vit", "timm-swin"], default="vit")
    ap.add_argument("--n", type=int, default=2000, help="CIFAR-10 training images per epoch")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arms", default="watch,watch-no-direct,exact", help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--quick", action="store_true", help="256 images, 2 rounds, 2 layers: a smoke run")
    ap.add_argument("--out", default=None, help="default benchmarks/out/watch_<model>.txt")
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    if args.quick:
        args.n, args.rounds, args.layers = 256, 2, 2
    out_path = args.out or str(REPO / "benchmarks" / "out" / f"watch_{args.model}.txt")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    out = _common.begin_result(f"watch() on a vision transformer ({args.model}): one epoch's time over RR's")
    x, y = load_cifar10(args.data, args.n)
    names = ["rr", *arms]
    runs = {a: Arm(a, x, y, args) for a in names}
    secs = _common.paired_epochs(runs, args.rounds)

    d = sum(p.numel() for p in runs["rr"].model.parameters())
    out.line(
        f"\n## {args.model}: {args.layers} layers, width {args.width} (d = {d:,}); {len(x):,} CIFAR-10 images, "
        f"batch {args.batch_size}, AdamW; {args.threads} torch thread(s), {args.rounds} paired rounds, load "
        f"{_common.load_average()}"
    )
    out.line(f"{'arm':<36} {'K or d':>10} {'epoch s':>9} {'x RR median':>12} {'x RR quartiles':>15}")
    rr = np.array(secs["rr"])
    out.line(f"{'rr (randperm, nothing watched)':<36} {'':>10} {np.median(rr):>9.3f} {1.0:>12.3f} {'':>15}")
    labels = {
        "watch": "grab, watch()",
        "watch-no-direct": "grab, watch(), no-layer params out",
        "watch-mode-everywhere": "grab, watch(), mode in sublayers",
        "exact": "grab, watch(sketch=None)",
    }
    for a in arms:
        t = np.array(secs[a])
        q1, q2, q3 = np.percentile(t / rr, [25, 50, 75])
        out.line(
            f"{labels[a]:<36} {runs[a].handle.width:>10,} {np.median(t):>9.3f} {q2:>12.3f} {f'{q1:.3f}-{q3:.3f}':>15}"
        )
    handle = next((runs[a].handle for a in arms if a == "watch"), None) or next(iter(runs.values())).handle
    if handle is not None:
        out.line("\nlayers under the arm's sketch (handle.layers):")
        for name, kind, width in handle.layers:
            out.line(f"  {name:<48} {kind:<68} {width:>6}")
    if not args.quick:
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        out.save(out_path)
        print(f"# written: {out_path}")


if __name__ == "__main__":
    main()
