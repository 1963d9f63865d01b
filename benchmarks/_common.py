"""Shared helpers of the benchmark scripts: machine description, load average, memory read bandwidth,
and the shims that let the reference `grab-sampler` 0.1.3 import and construct under current torch."""

from __future__ import annotations

import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (and a line saying so): the tables need no plot."""
    try:
        import matplotlib
    except ImportError:
        print("# matplotlib missing: no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, out_dir: str, name: str) -> None:
    """Lay out `fig`, write it to out_dir/name and say where."""
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=120)
    print(f"# plot: {path}")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def cpu_description() -> str:
    """The CPU's model name and its L2 and L3 sizes (Linux; empty where unknown). The development machine
    has been more than one host type over time, and a small model's step ratios moved with it (docs:
    Performance), so every header names the host it ran on."""
    parts = []
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        if model:
            parts.append(model)
    except OSError:
        pass
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            with open(os.path.join(base, index, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(base, index, "size")) as f:
                caches.setdefault(f"L{level}", f.read().strip())
    except OSError:
        pass
    parts += [f"{name} {caches[name]}" for name in ("L2", "L3") if name in caches]
    return ", ".join(parts)


def header_lines(title: str) -> List[str]:
    """A result's opening: its title, the date, the machine and torch, the CPU, the load average now."""
    lines = [
        f"# {title}",
        f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads at start), numpy {np.__version__}",
    ]
    cpu = cpu_description()
    if cpu:
        lines.append(f"# cpu: {cpu}")
    lines.append(f"# load average at start (1/5/15 min): {load_average()}  (2-core machine shared with other jobs)")
    return lines


def header(title: str) -> None:
    print("\n".join(header_lines(title)))


def best_of(fn: Callable[[], None], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def memory_read_bandwidth(mb: int = 200, reps: int = 5) -> Dict[str, float]:
    """GB/s of reading `mb` MB of float32 once, several ways; the reference is the best of them.
    Two distinct arrays are used so nothing is read twice."""
    n = mb * (1 << 20) // 8  # two arrays of mb/2 MB each
    a = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    b = np.random.default_rng(1).standard_normal(n, dtype=np.float32)
    nbytes = a.nbytes + b.nbytes
    out = {"numpy dot": nbytes / best_of(lambda: a.dot(b), reps) / 1e9}
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    threads = torch.get_num_threads()
    for t in sorted({1, max(2, threads)}):
        torch.set_num_threads(t)
        out[f"torch dot, {t} thread{'s' if t > 1 else ''}"] = nbytes / best_of(lambda: torch.dot(ta, tb), reps) / 1e9
    torch.set_num_threads(threads)
    return out


def import_reference():
    """Import grab-sampler 0.1.3 with the shims it needs under current torch, saying which were used.
    Its algorithm is untouched: the shims only satisfy imports and a constructor signature."""
    import importlib.machinery

    import torch._dynamo  # noqa: F401  (imported before any stub: it scans installed modules once)

    shims = []
    if "torch_sparse" not in sys.modules:
        try:
            import torch_sparse  # noqa: F401
        except ImportError:
            stub = types.ModuleType("torch_sparse")
            stub.__spec__ = importlib.machinery.ModuleSpec("torch_sparse", None)
            stub.SparseTensor = object  # only its random-projection option (unused here) needs it
            sys.modules["torch_sparse"] = stub
            shims.append("torch_sparse stub module (import only; used by its unused random projection)")
    try:
        import pandas  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pandas")
        stub.__spec__ = importlib.machinery.ModuleSpec("pandas", None)
        stub.DataFrame = object  # only a return annotation of its (disabled) timer report
        sys.modules["pandas"] = stub
        shims.append("pandas stub module (import only; used by its disabled EventTimer report)")
    from torch.utils.data import Sampler

    try:
        Sampler.__init__(object.__new__(Sampler), range(2))  # type: ignore[call-arg]
    except TypeError:
        original = Sampler.__init__

        def init(self, data_source=None):  # type: ignore[no-untyped-def]
            original(self)

        Sampler.__init__ = init  # type: ignore[method-assign]
        shims.append("torch Sampler.__init__ accepting (and ignoring) data_source, as older torch did")
    import grabsampler

    return grabsampler, shims


def load_module(name: str, path) -> types.ModuleType:
    """Import a file as a module under its own name (examples/_common.py shares its file name with this
    module, so examples/ cannot simply go on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Out:
    """Prints a script's tables and keeps them for its .txt file."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def line(self, s: str = "") -> None:
        print(s, flush=True)
        self.lines.append(s)

    def save(self, path: str) -> None:
        """The lines printed so far, as a .txt result file."""
        with open(path, "w") as f:
            f.write("\n".join(self.lines) + "\n")


_EXAMPLES_COMMON: List[types.ModuleType] = []


def examples_common() -> types.ModuleType:
    """examples/_common.py (data loading, the MiniLM path, CSV writing), loaded once by path."""
    if not _EXAMPLES_COMMON:
        here = os.path.dirname(os.path.abspath(__file__))
        _EXAMPLES_COMMON.append(load_module("examples_common", os.path.join(here, "..", "examples", "_common.py")))
    return _EXAMPLES_COMMON[0]


def write_csv(path: str, rows: List[Dict[str, Any]]) -> None:
    """Rows as CSV (examples/_common.write_csv): the columns are every key of any row, in order of first
    appearance."""
    examples_common().write_csv(rows, path)


def paired_epochs(runs: Dict[str, Any], rounds: int) -> Dict[str, List[float]]:
    """Seconds of ``runs[a].epoch()`` for every arm, ``rounds`` paired rounds after one warm-up epoch each
    (allocator, projections, the first epoch's order): the arms alternate in order from round to round,
    so drift on this shared machine falls on all of them alike."""
    from tqdm import tqdm

    names = list(runs)
    for a in names:
        runs[a].epoch()
    secs: Dict[str, List[float]] = {a: [] for a in names}
    for r in tqdm(range(rounds), desc="rounds", leave=False, file=sys.stderr):
        for a in names if r % 2 == 0 else names[::-1]:
            secs[a].append(runs[a].epoch())
    return secs


def train_in_rotation(
    out: "Out",
    arms: List[str],
    seeds: int,
    epochs: int,
    make_runs: Callable[[int], Dict[str, Any]],
    train_epoch: Callable[[Any], float],
    full_loss: Callable[[Any], float],
) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray], List[Dict[str, Any]]]:
    """Train every arm of a seed side by side, epoch after epoch, the order of the arms rotating from epoch
    to epoch so that a slow spell of this shared machine falls on all of them. ``make_runs(seed)`` gives
    {arm: run} (a run's ``handle``, when not None, is its watch handle, whose columns are printed once),
    ``train_epoch(run)`` trains one epoch and returns its seconds, ``full_loss(run)`` is the untimed loss
    after it. Returns (loss, secs, csv rows); loss[a][s, e] and secs[a][s, e] for epochs 0..epochs (epoch 0:
    the initial loss, no seconds)."""
    from tqdm import tqdm

    loss = {a: np.full((seeds, epochs + 1), np.nan) for a in arms}
    secs = {a: np.zeros((seeds, epochs + 1)) for a in arms}
    rows: List[Dict[str, Any]] = []
    bar = tqdm(total=seeds * epochs * len(arms), desc="arm-epochs", file=sys.stderr, leave=False)
    for s in range(seeds):
        runs = make_runs(s)
        if s == 0:
            for a, r in runs.items():
                if r.handle is not None:
                    blocks = ", ".join(f"{nm} {kind} {w}" for nm, kind, w in r.handle.layers)
                    out.line(f"# {a}: K = {r.handle.width:,} columns per example: {blocks}")
        for a, r in runs.items():
            loss[a][s, 0] = full_loss(r)
        for e in range(1, epochs + 1):
            rot = (e - 1) % len(arms)
            for a in arms[rot:] + arms[:rot]:
                secs[a][s, e] = train_epoch(runs[a])
                loss[a][s, e] = full_loss(runs[a])
                bar.update()
        for a in arms:
            for e in range(epochs + 1):
                rows.append(
                    dict(
                        arm=a, seed=s, epoch=e, train_loss=f"{loss[a][s, e]:.6f}", epoch_seconds=f"{secs[a][s, e]:.3f}"
                    )
                )
    bar.close()
    return loss, secs, rows


def report_against_rr(
    out: "Out", arms: List[str], loss: Dict[str, np.ndarray], secs: Dict[str, np.ndarray], what: str, digits: int
) -> None:
    """The tables of a ``train_in_rotation`` study against its first arm, rr: the check that every arm of a
    seed starts alike, the full training loss per epoch (``what`` it is, ``digits`` after the point) and
    each arm's difference from RR's, what an epoch costs against RR's same epoch, and the time each arm
    takes to reach RR's final loss over RR's time."""
    others = arms[1:]
    seeds, last = loss["rr"].shape[0], loss["rr"].shape[1] - 1
    same = all(np.array_equal(loss[a][:, : min(1, last) + 1], loss["rr"][:, : min(1, last) + 1]) for a in others)
    out.line(
        f"\n# check: epoch 0 and epoch 1 losses equal in every arm of a seed (same init, same first order): {same}"
    )
    out.line(f"\nFull training loss ({what}), mean over seeds:")
    out.line(f"{'epoch':>5} " + " ".join(f"{a:>9}" for a in arms) + "".join(f" {a + '-rr':>10}" for a in others))
    for e in range(last + 1):
        diffs = "".join(f" {(loss[a][:, e] - loss['rr'][:, e]).mean():>+10.{digits}f}" for a in others)
        out.line(f"{e:>5} " + " ".join(f"{loss[a][:, e].mean():>9.{digits}f}" for a in arms) + diffs)
    for a in others:
        dd = loss[a][:, 2:] - loss["rr"][:, 2:]  # epochs 2..last: the first reordered epoch on
        out.line(f"{a} - rr from epoch 2 on: lower in {int((dd < 0).sum())} of {dd.size} seed-epochs")
    out.line("\nWhat an epoch costs, each epoch's seconds over RR's same epoch (seed and epoch paired):")
    out.line(f"{'arm':<6} {'median':>7} {'quartiles':>13}")
    for a in others:
        ratio = (secs[a][:, 1:] / secs["rr"][:, 1:]).ravel()
        q1, med, q3 = np.percentile(ratio, [25, 50, 75])
        out.line(f"{a:<6} {med:>7.3f} {q1:>6.3f}-{q3:.3f}")
    out.line("\nTime to RR's final loss (its seed's), over RR's time:")
    for a in others:
        got = []
        for s in range(seeds):
            t = time_to(list(zip(np.cumsum(secs[a][s]), loss[a][s])), loss["rr"][s, last])
            got.append(float("inf") if t is None else t / secs["rr"][s].sum())
        shown = ", ".join("never" if g == float("inf") else f"{g:.3f}" for g in got)
        out.line(f"{a:<6} median {np.median(got):.3f} (seeds: {shown})")


def plot_against_rr(out_dir: str, name: str, arms: List[str], loss: Dict, secs: Dict, title: str, ylabel: str) -> None:
    """The plot of a ``train_in_rotation`` study: loss against epochs and against seconds from epoch 1 on
    (epoch 0's loss, ten times higher, would flatten the rest), and each arm's loss minus RR's, per seed and
    their mean."""
    plt = pyplot()
    if plt is None:
        return
    fig, (ax_e, ax_t, ax_d) = plt.subplots(1, 3, figsize=(16, 4.6))
    for c, a in enumerate(arms):
        ep = np.arange(loss[a].shape[1])
        t = np.cumsum(secs[a], axis=1).mean(0)
        ax_e.plot(ep[1:], loss[a].mean(0)[1:], color=f"C{c}", marker="o", label=a)
        ax_t.plot(t[1:], loss[a].mean(0)[1:], color=f"C{c}", marker="o", label=a)
        if a != "rr":
            d = loss[a] - loss["rr"]
            for s in range(d.shape[0]):
                ax_d.plot(ep[1:], d[s, 1:], color=f"C{c}", alpha=0.3, lw=0.8)
            ax_d.plot(ep[1:], d.mean(0)[1:], color=f"C{c}", marker="o", label=f"{a} - rr (mean; seeds thin)")
    ax_d.axhline(0.0, color="k", lw=0.6)
    ax_e.set(title="full training loss per epoch (mean over seeds)", xlabel="epoch", ylabel=ylabel)
    ax_t.set(title="... against training seconds", xlabel="cumulative training seconds", ylabel=ylabel)
    ax_d.set(title="loss minus RR's, paired by seed (< 0: lower)", xlabel="epoch", ylabel="difference")
    for ax in (ax_e, ax_t, ax_d):
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_plot(fig, out_dir, f"{name}.png")


def out_folder(args: Any, prefix: str) -> str:
    """``args.out``, made: benchmarks/out by default, a temporary folder for a ``--quick`` smoke run."""
    if args.out is None:
        here = os.path.dirname(os.path.abspath(__file__))
        args.out = tempfile.mkdtemp(prefix=f"{prefix}_") if args.quick else os.path.join(here, "out")
    os.makedirs(args.out, exist_ok=True)
    return args.out


def rotation_setup(ap: Any, args: Any, prefix: str) -> List[str]:
    """What a ``train_in_rotation`` study's options set up: the output folder (``--out``; a temporary one
    with ``--quick``), the torch threads, and the arms of ``--arms`` (rr first, and at least one other)."""
    out_folder(args, prefix)
    arms = [a for a in args.arms.split(",") if a]
    if arms[0] != "rr" or len(arms) < 2:
        ap.error("--arms must start with rr (ratios and differences are taken against it) and name another")
    torch.set_num_threads(args.threads)
    return arms


def rotation_study(
    out: "Out",
    args: Any,
    arms: List[str],
    name: str,
    title: str,
    runs: Tuple[Callable[[int], Dict[str, Any]], Callable[[Any], float], Callable[[Any], float]],
    what: str,
    digits: int,
    ylabel: str,
) -> None:
    """A study against RR from its title line to its files: ``train_in_rotation`` with ``runs`` (make_runs,
    train_epoch, full_loss), ``report_against_rr`` (the loss as ``what``), then ARGS.OUT/NAME.txt, .csv
    and .png (``plot_against_rr``, the loss labelled ``ylabel``)."""
    out.line(f"# {title}")
    loss, secs, rows = train_in_rotation(out, arms, args.seeds, args.epochs, *runs)
    report_against_rr(out, arms, loss, secs, what, digits=digits)
    out.line(f"\n# load average now {load_average()}")
    out.save(os.path.join(args.out, f"{name}.txt"))
    write_csv(os.path.join(args.out, f"{name}.csv"), rows)
    plot_against_rr(args.out, name, arms, loss, secs, title, ylabel)
    print(f"# wrote {args.out}/{name}.txt, .csv, .png")


def watched_arms(
    out: "Out",
    model: Any,
    arms: Dict[str, Optional[List[str]]],
    batch: int,
    rounds: int,
    loss: Callable[[Any], Any],
    width: int = 24,
    digits: int = 3,
) -> Dict[str, Any]:
    """A model's step without ``watch()`` (the arm whose exclude is None, first) and under ``watch(exclude=...)``
    for each other arm, in alternating rounds after one warm-up step each; prints each arm's median seconds
    and its per-round ratios over the first arm, and returns the handles by arm. Each watched arm has its own
    copy of the model (the same weights) and its own handle for the whole run: a handle's first step also
    audits the model, which a run pays once. ``loss(model)`` is one step's loss."""
    import copy

    from torchgrab import GraBSampler

    models, iters = {}, {}
    for name, exclude in arms.items():
        models[name] = model if exclude is None else copy.deepcopy(model)
        if exclude is not None:
            sampler = GraBSampler(n=batch * (rounds + 2), ordering="grab", seed=0)
            iters[name] = (iter(sampler), sampler.watch(models[name], exclude=exclude))

    def step(name: str) -> float:
        m = models[name]
        it, h = iters.get(name, (None, None))
        for _ in range(batch if it is not None else 0):
            next(it)
        t0 = time.perf_counter()
        loss(m).backward()
        if h is not None:
            h.flush()
        t = time.perf_counter() - t0
        m.zero_grad(set_to_none=True)
        return t

    names = list(arms)
    for name in names:  # warm-up
        step(name)
    secs: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            secs[name].append(step(name))
    base = np.asarray(secs[names[0]])
    out.line(f"{'arm':<{width}} {'seconds':>8} {'over ' + names[0]:>22}")
    for name in names:
        s = np.asarray(secs[name])
        q = s / base
        out.line(
            f"{name:<{width}} {np.median(s):>8.{digits}f} {np.median(q):>9.{digits}f} "
            f"({q.min():.{digits}f}-{q.max():.{digits}f})"
        )
    return {name: h for name, (_, h) in iters.items()}


def cosine_to_zero(opt: Any, steps: int) -> Any:
    """A per-step learning-rate schedule along half a cosine from the optimizer's rate to 0 at ``steps``
    (held at 0 after), for every arm of a study alike."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps)))


def time_to(hist: List[Tuple[float, float]], target: float) -> Optional[float]:
    """First time a run's loss reaches ``target``, from its (seconds, loss) points after each epoch,
    interpolating linearly in time between epochs; None if it never does."""
    if hist and hist[0][1] <= target:
        return hist[0][0]
    for (t0, l0), (t1, l1) in zip(hist, hist[1:]):
        if l1 <= target:  # (l0 > target: the points before did not reach it)
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def begin_result(title: str, bandwidth: bool = True) -> "Out":
    """The opening of a benchmark's .txt result: its provenance lines, the printed header, and (with
    ``bandwidth``) this machine's memory read bandwidth (what exact rows are bound by), measured now."""
    out = Out()
    for line in provenance() + header_lines(title):
        out.line(line)
    if not bandwidth:
        return out
    bw = memory_read_bandwidth()
    out.line(f"# memory read bandwidth: {', '.join(f'{k} {v:.1f} GB/s' for k, v in bw.items())}")
    return out


def provenance() -> List[str]:
    """Header lines for a result file: the exact command, the commit (and any uncommitted change under
    python/), and where torchgrab was imported from."""
    import torchgrab

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = os.path.relpath(sys.executable, repo) if sys.executable.startswith(repo) else sys.executable
    script = os.path.relpath(os.path.abspath(sys.argv[0]), repo)
    env = [f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else []
    lines = [f"# command: {shlex.join([*env, exe, script, *sys.argv[1:]])}"]
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--", "python"], capture_output=True, text=True
        )
        changed = [ln[3:] for ln in dirty.stdout.splitlines()]
        state = f"uncommitted changes in {', '.join(changed)}" if changed else "python/ clean"
        lines.append(f"# repository at commit {head.stdout.strip()} ({state})")
    except OSError:  # pragma: no cover
        pass
    where = os.path.dirname(torchgrab.__file__)
    if not where.startswith(repo):
        # Another checkout (PYTHONPATH; a run of an earlier commit for comparison): say which commit.
        other = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        at = f", at commit {other.stdout.strip()}" if other.returncode == 0 else ""
        where += f" (not this checkout's python/{at})"
    lines.append(f"# torchgrab {torchgrab.__version__} imported from {where}")
    return lines
