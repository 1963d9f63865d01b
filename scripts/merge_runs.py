"""Merge the per-process CSVs of an example (one seed or one ordering each, as scripts/gpu_fullscale.sh runs
them) into one CSV with its table and plot, cut to the epochs every kept run reached.

    python scripts/merge_runs.py docs/results/wikitext2_lstm_full --epochs 9 --metric "valid perplexity" \\
        --lower-is-better --title "..." out/gpu/runs/wikitext2_*.csv

A run (ordering, seed) that did not reach ``--epochs`` is dropped (and named); rows past it are cut, so
every ordering is compared at the same epoch. Where two files hold the same run, the later file wins.
``--no-times`` leaves the training seconds out where the runs were timed under different loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import _common as C  # noqa: E402


def merge(paths, epochs: int, orderings=None):
    runs = {}
    for p in paths:
        by_run = {}
        for r in C.read_csv(p):
            by_run.setdefault((r["ordering"], r["seed"]), []).append(r)
        runs.update(by_run)  # a later file's run replaces an earlier one
    rows, dropped = [], []
    for (o, s), rs in runs.items():
        if orderings and o not in orderings:
            continue
        if max(r["epoch"] for r in rs) < epochs:
            dropped.append(f"{o}/seed {s} ({max(r['epoch'] for r in rs)} epochs)")
            continue
        rows += sorted((r for r in rs if r["epoch"] <= epochs), key=lambda r: r["epoch"])
    order = {o: i for i, o in enumerate(orderings or C.PAPER_ORDERINGS)}
    rows.sort(key=lambda r: (order.get(r["ordering"], 99), r["seed"], r["epoch"]))
    return rows, dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output prefix: writes PREFIX.csv, PREFIX.md, PREFIX.png")
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--metric", required=True)
    ap.add_argument("--title", required=True)
    ap.add_argument("--orderings", default=None, help="comma-separated (default: all found)")
    ap.add_argument("--lower-is-better", action="store_true")
    ap.add_argument(
        "--no-times",
        action="store_true",
        help="leave the training seconds out of the table and plot (runs timed under different loads)",
    )
    a = ap.parse_args()
    rows, dropped = merge(a.csv, a.epochs, a.orderings.split(",") if a.orderings else None)
    if not rows:
        sys.exit("no run reached --epochs")
    if dropped:
        print("dropped (fewer epochs):", ", ".join(dropped))
    C.write_csv(rows, a.out + ".csv")
    C.report(rows, a.metric, a.title, a.out, higher_is_better=not a.lower_is_better, times=not a.no_times)


if __name__ == "__main__":
    main()
