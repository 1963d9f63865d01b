"""What `sampler.watch(model)` costs on a layer whose weight a parametrization computes (weight_norm,
spectral_norm), against the same layer without one, in one run.

    .venv/bin/python benchmarks/watch_parametrized.py            # out/watch_parametrized.txt
    .venv/bin/python benchmarks/watch_parametrized.py --model    # a whole Wav2Vec2: out/watch_parametrized_model.txt
    .venv/bin/python benchmarks/watch_parametrized.py --quick    # a smoke run of a few seconds

A plain layer's rows are a Kronecker sketch formed from its input and output gradient, never the
per-example gradient. A parametrized layer trains originals theta with W = f(theta), and each example's
gradient of them, J_f^T grad W_b, has no such form: `watch()` forms each example's weight gradient grad W_b
exactly (the layer's own weight-gradient kernel with the batch folded into the groups) and pulls it back
through f with torch.func (capture/parametrized.py). This script measures that price per layer.

Each layer alone is the model (no sampler work beyond what `watch()` does for it, a GraBSampler with the
default sketch): a forward, the loss (the mean square of the output) and its backward. Arms, in alternating
rounds: the plain layer without and with `watch()`, and the parametrized layer without and with `watch()`.
Each "with" over its own "without" is one paired ratio per round; the table gives their medians.

The shapes: Wav2Vec2-base's positional convolution (Conv1d 768 -> 768, kernel 128, 16 groups, weight_norm
over the kernel taps, dim=2) on 1 s and 5 s of audio (50 and 250 frames); a HiFi-GAN upsampling layer
(ConvTranspose1d 512 -> 256, kernel 16, stride 8, weight_norm); a weight-normed Linear(512, 512) on 64
tokens; a GAN discriminator's spectral_norm Conv2d(64, 128, 4, stride 2). Inputs are random: the cost does
not depend on the values. Weights per layer in the table's `weights` column.

`--model`: what that layer costs in the model it comes from: Wav2Vec2-base (`Wav2Vec2Config()`'s sizes,
95 M parameters, random weights: nothing is downloaded) with a 2-class head, its convolutional feature
encoder frozen (`freeze_feature_encoder()`, as fine-tuning does), `--batch` clips of `--seconds` of random
audio at 16 kHz, cross-entropy. Arms in alternating rounds: no `watch()`, `watch(exclude=[the positional
convolution])` (what a user had to pass before), and `watch()` with it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from torchgrab import GraBSampler  # noqa: E402

# name -> (make the plain layer, parametrize it, input shape without the batch)
SHAPES: List[Tuple[str, Callable[[], nn.Module], Callable[[nn.Module], nn.Module], Tuple[int, ...]]] = [
    (
        "Wav2Vec2 pos. conv, 50 frames",
        lambda: nn.Conv1d(768, 768, 128, padding=64, groups=16),
        lambda m: weight_norm(m, dim=2),
        (768, 50),
    ),
    (
        "Wav2Vec2 pos. conv, 250 frames",
        lambda: nn.Conv1d(768, 768, 128, padding=64, groups=16),
        lambda m: weight_norm(m, dim=2),
        (768, 250),
    ),
    (
        "HiFi-GAN ConvTranspose1d",
        lambda: nn.ConvTranspose1d(512, 256, 16, stride=8, padding=4),
        weight_norm,
        (512, 32),
    ),
    ("Linear(512, 512), 64 tokens", lambda: nn.Linear(512, 512), weight_norm, (64, 512)),
    (
        "spectral_norm Conv2d(64, 128, 4, s2)",
        lambda: nn.Conv2d(64, 128, 4, stride=2, padding=1),
        spectral_norm,
        (64, 16, 16),
    ),
]


class Arm:
    """One layer, watched or not, stepped on one fixed batch."""

    def __init__(self, layer: nn.Module, x: torch.Tensor, watched: bool, steps: int) -> None:
        self.layer, self.x = layer, x
        self.sampler = self.handle = self.it = None
        if watched:
            b = x.shape[0]
            self.sampler = GraBSampler(n=b * (steps + 1), ordering="grab", seed=0)
            self.it = iter(self.sampler)
            self.handle = self.sampler.watch(layer)

    def step(self) -> None:
        if self.it is not None:
            for _ in range(self.x.shape[0]):  # the indices this batch's rows are matched to
                next(self.it)
        self.layer(self.x).square().mean().backward()
        self.layer.zero_grad(set_to_none=True)
        if self.handle is not None:
            self.handle.flush()


def layer_costs(out: "_common.Out", batch: int, rounds: int, shapes: List) -> None:
    out.line(
        f"\nForward + backward of the layer alone, batch {batch}, {rounds} rounds; ratios: with watch() over "
        "without, per round, median (min-max)"
    )
    out.line(f"{'layer':<38} {'weights':>9} {'plain ms':>9} {'watched':>16} {'param. ms':>10} {'watched':>16}")
    g = torch.Generator().manual_seed(0)
    for name, make, param, shape in shapes:
        x = torch.randn(batch, *shape, generator=g)
        torch.manual_seed(0)
        plain, plain_w = make(), make()
        paramd, paramd_w = param(make()), param(make())
        arms = [
            Arm(plain, x, False, rounds + 1),
            Arm(plain_w, x, True, rounds + 1),
            Arm(paramd, x, False, rounds + 1),
            Arm(paramd_w, x, True, rounds + 1),
        ]
        for a in arms:  # warm-up (and the first step's checks)
            a.step()
        secs: List[List[float]] = [[] for _ in arms]
        for r in range(rounds):
            order = list(range(len(arms)))
            order = order[r % len(order) :] + order[: r % len(order)]
            for i in order:
                t0 = time.perf_counter()
                arms[i].step()
                secs[i].append(time.perf_counter() - t0)
        s = [np.asarray(v) for v in secs]

        def ratio(i: int, j: int) -> str:
            q = s[i] / s[j]
            return f"{np.median(q):.2f} ({q.min():.2f}-{q.max():.2f})"

        weights = plain.weight.numel()
        out.line(
            f"{name:<38} {weights:>9,} {1e3 * np.median(s[0]):>9.1f} {ratio(1, 0):>16} "
            f"{1e3 * np.median(s[2]):>10.1f} {ratio(3, 2):>16}"
        )


def model_costs(out: "_common.Out", batch: int, seconds: float, rounds: int, layers: Optional[int]) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.Wav2Vec2Config(num_labels=2, **({"num_hidden_layers": layers} if layers else {}))
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForSequenceClassification(cfg)
    model.freeze_feature_encoder()
    conv = "wav2vec2.encoder.pos_conv_embed.conv"
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x = torch.randn(batch, int(16000 * seconds), generator=torch.Generator().manual_seed(0))
    y = torch.arange(batch) % 2
    out.line(
        f"\nWav2Vec2ForSequenceClassification ({cfg.num_hidden_layers} layers, {d:,} trained parameters, of which "
        f"the positional convolution {sum(p.numel() for p in model.get_submodule(conv).parameters()):,}), "
        f"batch {batch} x {seconds:g} s, {rounds} rounds; the step over the step without watch()"
    )
    arms = {"no watch()": None, "watch(exclude=[pos. conv])": [conv], "watch()": []}
    loss = lambda m: nn.functional.cross_entropy(m(x).logits, y)  # noqa: E731
    _common.watched_arms(out, model, arms, batch, rounds, loss, width=28, digits=2)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None, help="examples per step (layers: 8, --model: 4)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out; with --quick a temp folder)")
    ap.add_argument("--model", action="store_true", help="a whole Wav2Vec2-base instead of layers alone")
    ap.add_argument("--seconds", type=float, default=2.0, help="--model: audio per example")
    ap.add_argument("--quick", action="store_true", help="batch 2, 2 rounds, the small shapes: a smoke run")
    args = ap.parse_args(argv)
    _common.out_folder(args, "watch_parametrized")
    torch.set_num_threads(args.threads)
    shapes = SHAPES
    if args.batch is None:
        args.batch = 4 if args.model else 8
    if args.quick:
        args.batch, args.rounds = 2, 2
        shapes = [s for s in SHAPES if "250" not in s[0]]
    warnings.filterwarnings("ignore", message="There is a performance drop")
    if args.model:
        out = _common.begin_result("watch() on Wav2Vec2 (weight_norm positional convolution): cost against no watch()")
        out.line(f"# torch {torch.__version__}, {args.threads} torch thread(s)")
        model_costs(out, args.batch, 0.5 if args.quick else args.seconds, args.rounds, 2 if args.quick else None)
        out.line(f"\n# load average now {_common.load_average()}")
        out.save(os.path.join(args.out, "watch_parametrized_model.txt"))
        print(f"# wrote {args.out}/watch_parametrized_model.txt")
        return
    out = _common.begin_result(
        "watch() on parametrized layers (weight_norm, spectral_norm): cost against the plain layer"
    )
    out.line(f"# torch {torch.__version__}, {args.threads} torch thread(s)")
    layer_costs(out, args.batch, args.rounds, shapes)
    out.line(f"\n# load average now {_common.load_average()}")
    out.save(os.path.join(args.out, "watch_parametrized.txt"))
    print(f"# wrote {args.out}/watch_parametrized.txt")


if __name__ == "__main__":
    main()
