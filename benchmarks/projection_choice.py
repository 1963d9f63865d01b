"""Random sketch factors against factors aligned with each layer's covariances (LoGra's "pca"), at equal K.

    .venv/bin/python benchmarks/projection_choice.py [--tasks mnist,cifar] [--ks 8,32] [--quick]

`watch()` sketches a Linear layer's per-example weight gradient g_b a_b^T as (P_out g_b)(P_in a_b)^T with
seeded random factors (a count sketch for a wide input, Gaussian otherwise; a side no wider than its sketch
stays exact). LoGra takes P_in and P_out instead from the top eigenvectors of the layer's input second
moment sum a a^T and output-gradient second moment sum g g^T, gathered over the epoch before ("pca"). Which
balances the true gradients better at the same K decides the default (issue 14, point 6).

Setting (that of watch_quality.py's part "disc"): the model trains with RR for --disc-after epochs; during
the last of them hooks on every Linear layer gather sum a a^T and sum g g^T over the training set (g as each
example's own loss sees it: the mean loss's gradient times the batch size), with the weights moving as they
do in training. Then the weights are fixed, and the true per-example gradients G of a seeded subset are
computed (torch.func). Rows of each arm, for each sketch size k:
  exact   G itself;
  random  the rows watch(sketch=k) forms (its handle's `project`, equal to what its hooks compute);
  pca     the same blocks, with each Linear layer's sketched factor (P_in, P_out; exact sides stay exact)
          replaced by the top eigenvectors of that layer's second moment, as many as watch() gives it
          columns; the blocks of other layers as watch() forms them.
GraB balances each arm's rows for --disc-epochs epochs at the fixed weights; each order it builds is scored
on the true gradients, herding_discrepancy(G, order).l2, against random orders; kept = (random - arm) /
(random - exact). Writes OUT/projection_choice.txt (the tables, the command at the top) and .csv.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import watch_quality as WQ  # noqa: E402
from torchgrab import GraBSampler  # noqa: E402


def second_moments(task: WQ.Task, arm: WQ.Arm) -> Dict[nn.Module, List[torch.Tensor]]:
    """One more RR epoch of `arm`, gathering [sum a a^T, sum g g^T] (float64) of every Linear layer."""
    sums: Dict[nn.Module, List[torch.Tensor]] = {}
    hooks = []

    def on_forward(m, args, out):
        a = args[0].detach().reshape(-1, m.in_features).double()
        s = sums.setdefault(
            m,
            [
                torch.zeros(m.in_features, m.in_features, dtype=torch.float64),
                torch.zeros(m.out_features, m.out_features, dtype=torch.float64),
            ],
        )
        s[0] += a.T @ a
        b = out.shape[0]

        def on_grad(g):
            gb = g.detach().reshape(-1, m.out_features).double() * b  # each example's own loss (mean over b)
            s[1].add_(gb.T @ gb)

        out.register_hook(on_grad)

    for m in arm.model.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(on_forward))
    arm.epoch()
    for h in hooks:
        h.remove()
    return sums


def top_eigenvectors(moment: torch.Tensor, k: int) -> torch.Tensor:
    """[n, k]: orthonormal eigenvectors of the k largest eigenvalues (columns)."""
    vals, vecs = torch.linalg.eigh(moment)
    return vecs[:, torch.argsort(vals, descending=True)[:k]].float()


def pca_rows(model: nn.Module, handle, sums, grads: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The rows of `handle` with each Linear layer's sketched factors replaced by top eigenvectors."""
    names = {m: n for n, m in model.named_modules()}
    pieces: List[torch.Tensor] = []
    for module, sk in handle._sketches.items():
        prefix = f"{names[module]}." if names[module] else ""
        own = {p: grads[prefix + p] for p in sk.params if prefix + p in grads}
        if not isinstance(module, nn.Linear) or module not in sums:
            pieces += sk.project(module, own)
            continue
        a_moment, g_moment = sums[module]
        u_out = None if sk.p_out.identity else top_eigenvectors(g_moment, sk.p_out.k)
        u_in = None if sk.p_in.identity else top_eigenvectors(a_moment, sk.p_in.k)
        if sk.train_w:
            w = own["weight"].float()  # [B, out, in]
            if u_out is not None:
                w = torch.einsum("bon,ok->bkn", w, u_out)
            if u_in is not None:
                w = w @ u_in
            pieces.append(w.reshape(w.shape[0], -1))
        if sk.train_b:
            bias = own["bias"].float()
            pieces.append(bias if u_out is None else bias @ u_out)
    assert not handle._params, "parameters outside the hooked layers: not in this comparison"
    return torch.cat(pieces, dim=1)


def run(task: WQ.Task, args, out: _common.Out, csv_rows: List[Dict]) -> None:
    n_sub = min(args.n[task.name], len(task.x))
    arm = WQ.Arm(task, "rr", 0)
    for _ in range(args.disc_after - 1):
        arm.epoch()
    t0 = time.perf_counter()
    sums = second_moments(task, arm)
    t_moments = time.perf_counter() - t0
    model = arm.model
    fixed_loss, G, t_grad = WQ.true_gradients(task, model, n_sub)
    n, d = G.shape
    rows: Dict[str, np.ndarray] = {"exact": G}
    widths: Dict[str, int] = {"exact": d}
    for k in args.ks:
        h = GraBSampler(n=n, ordering="grab", seed=0).watch(model, sketch=k)
        rows[f"random k{k}"] = WQ.project_all(model, G, h.project)
        rows[f"pca k{k}"] = WQ.project_all(model, G, lambda grads: pca_rows(model, h, sums, grads))
        for kind in ("random", "pca"):
            widths[f"{kind} k{k}"] = rows[f"{kind} k{k}"].shape[1]
        layout = ", ".join(f"{name} {kind} {cols}" for name, kind, cols in h.layers)
        h.remove()
        out.line(f"# k = {k}: K = {widths[f'random k{k}']} ({layout})")
    with tqdm(total=len(rows) + args.random_orders, desc=f"{task.name} balance", file=sys.stderr) as bar:
        disc, rand = WQ.score_orders(
            G, rows, task.batch, args.disc_epochs, args.random_orders, tick=lambda: bar.update(1)
        )
    rnd = float(np.mean(rand))
    out.line(f"\n## {task.title}")
    out.line(
        f"RR for {args.disc_after} epoch(s) from seed 0; second moments gathered over the last of them "
        f"({t_moments:.1f} s); then weights fixed (full training loss {fixed_loss:.5f}); true per-example "
        f"gradients of a seeded subset of n = {n:,} ({t_grad:.1f} s), d = {d:,}; GraB balances each arm's rows "
        f"in batches of {task.batch} for {args.disc_epochs} epoch(s) at the fixed weights"
    )
    out.line(
        f"random orders: mean l2 discrepancy {rnd:.4f} over {args.random_orders} (min {min(rand):.4f}, max "
        f"{max(rand):.4f}); ratio = arm / random; kept = (random - arm) / (random - exact)"
    )

    def csv_row(a, epoch, v, kept):
        return dict(
            task=task.name,
            arm=a,
            K=widths[a],
            n=n,
            epoch=epoch,
            discrepancy_l2=f"{v:.6f}",
            random_l2=f"{rnd:.6f}",
            ratio_to_random=f"{v / rnd:.4f}",
            kept=f"{kept:.4f}",
        )

    csv_rows += WQ.disc_table(out, disc, rnd, widths, "<11", csv_row)
    out.line("('after j': the order built after j epoch(s) of balancing, used in epoch j + 1)")


def main(argv=None) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help=f"data root in the layouts of ../shared/data ({WQ.EX.DEFAULT_DATA})")
    ap.add_argument("--tasks", default="mnist,cifar", help="comma-separated: mnist, cifar")
    ap.add_argument("--ks", default="8,32", help="sketch sizes k (32 is watch()'s default)")
    ap.add_argument("--disc-after", type=int, default=1, help="RR epochs before the weights are fixed (>= 1)")
    ap.add_argument("--disc-epochs", type=int, default=3, help="balancing epochs at the fixed weights")
    ap.add_argument("--mnist-n", type=int, default=60000, help="examples whose true gradients are scored")
    ap.add_argument("--cifar-n", type=int, default=4096)
    ap.add_argument("--cifar-train-n", type=int, default=10000, help="class-balanced CIFAR-10 training subset")
    ap.add_argument("--random-orders", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(here, "out"))
    ap.add_argument("--quick", action="store_true", help="small subsets, 2 epochs: a smoke run")
    args = ap.parse_args(argv)
    if args.disc_after < 1:
        ap.error("--disc-after must be at least 1 (the second moments come from the last RR epoch)")
    args.ks = [int(k) for k in args.ks.split(",") if k]
    train_n = {"mnist": 0, "cifar": args.cifar_train_n}
    if args.quick:
        args.mnist_n, args.cifar_n, args.disc_epochs, args.random_orders, args.ks = 1024, 256, 2, 2, [8]
        train_n = {"mnist": 2048, "cifar": 500}
    args.n = {"mnist": args.mnist_n, "cifar": args.cifar_n}
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    root = WQ.EX.data_root(args.data)
    out = _common.Out()
    for ln in _common.provenance():
        out.line(ln)
    _common.header("watch(): random sketch factors against covariance-aligned (pca) ones")
    csv_rows: List[Dict] = []
    for name in [t for t in args.tasks.split(",") if t]:
        if name == "mnist":
            task = WQ.mnist_task(root, train_n["mnist"], 64, 0.01)
        elif name == "cifar":
            task = WQ.cifar_task(root, train_n["cifar"], 16, 1e-3)
        else:
            ap.error(f"unknown task {name!r}")
        run(task, args, out, csv_rows)
    out.line(f"\n# load average now {_common.load_average()}")
    out.save(os.path.join(args.out, "projection_choice.txt"))
    _common.write_csv(os.path.join(args.out, "projection_choice.csv"), csv_rows)


if __name__ == "__main__":
    main()
