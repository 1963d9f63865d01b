"""examples/_common.py: data loaders against the published counts of ../shared/data, the GLUE metrics on
hand-computed cases, and the ordering selection."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import _common as C  # noqa: E402

DATA = C.DEFAULT_DATA


def test_glue_metrics_hand_computed():
    y = np.array([1, 1, 1, 0, 0, 0])
    p = np.array([1, 1, 0, 0, 0, 1])  # tp 2, fn 1, tn 2, fp 1
    assert C.glue_metric("SST-2", p, y) == pytest.approx(4 / 6)
    assert C.glue_metric("MRPC", p, y) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # F1 = 2tp / (2tp + fp + fn)
    assert C.glue_metric("CoLA", p, y) == pytest.approx((2 * 2 - 1 * 1) / np.sqrt(3 * 3 * 3 * 3))  # MCC = 1/3
    assert C.glue_metric("CoLA", np.ones(6, int), y) == 0.0  # constant prediction: MCC defined as 0
    s = np.array([0.0, 1.0, 2.0, 4.0])
    assert C.glue_metric("STS-B", 2 * s + 1, s) == pytest.approx(1.0)
    assert C.glue_metric("STS-B", -s, s) == pytest.approx(-1.0)


def test_select_orderings_skips_unknown_and_oversized_greedy(capsys):
    import torchgrab

    chosen = C.select_orderings(["rr", "grab", "no-such-ordering"], n=100, d=10)
    assert chosen == ["rr", "grab"]
    assert "no-such-ordering" in capsys.readouterr().out
    if "greedy" in torchgrab.orderings():
        assert C.select_orderings(["greedy"], n=100, d=10) == ["greedy"]
    assert C.select_orderings(["greedy"], n=10**6, d=10**6) == []
    assert not C.greedy_fits(60000, 7850) and C.greedy_fits(8551, 770)


@pytest.mark.skipif(not (DATA / "glue").is_dir(), reason="no ../shared/data/glue")
@pytest.mark.parametrize(
    "task, n_train, n_dev, ones",
    [("CoLA", 8551, 1043, 6023), ("SST-2", 67349, 872, 37569), ("MRPC", 3668, 408, 2474), ("WNLI", 635, 71, 312)],
)
def test_glue_loader_matches_published_counts(task, n_train, n_dev, ones):
    texts, y = C.load_glue(DATA, task, "train")
    assert len(texts) == len(y) == n_train and int((y == 1).sum()) == ones
    assert len(C.load_glue(DATA, task, "dev")[1]) == n_dev
    assert all(len(t) == len(C.GLUE_TASKS[task]["text"]) and all(t) for t in texts)


@pytest.mark.skipif(not (DATA / "glue").is_dir(), reason="no ../shared/data/glue")
def test_stsb_scores_are_floats_in_range():
    texts, y = C.load_glue(DATA, "STS-B", "train")
    assert len(y) == 5749 and y.dtype == np.float32 and 0.0 <= y.min() and y.max() <= 5.0
    assert abs(float(y.mean()) - 2.70) < 0.01


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="no ../shared/data/mnist")
def test_mnist_loader_shapes_and_class_counts():
    (xtr, ytr), (xte, yte) = C.load_mnist(DATA)
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert np.bincount(ytr).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(yte).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.skipif(not (DATA / "wikitext-2").is_dir(), reason="no ../shared/data/wikitext-2")
def test_wikitext2_corpus_matches_word_language_model_counts():
    import wikitext2_lstm

    corpus = wikitext2_lstm.Corpus(DATA)
    assert len(corpus.word2idx) == 33278
    assert [len(corpus.splits[s]) for s in ("train", "valid", "test")] == [2088628, 217646, 245569]
    chunks = wikitext2_lstm.batchify(corpus.splits["valid"][:100], 10)
    assert chunks.shape == (10, 10) and chunks[0, 1] == corpus.splits["valid"][10]  # column-major streams
