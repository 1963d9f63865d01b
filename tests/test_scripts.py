"""The helper scripts of the experiments: merging per-process result CSVs, packing the MiniLM model
losslessly for a machine without it, and checking which models watch() takes."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _run(ordering, seed, epochs, loss0=2.0, drop=0.1):
    return [
        {
            "experiment": "x",
            "ordering": ordering,
            "seed": seed,
            "epoch": e,
            "train_loss": loss0 - drop * e,
            "val_metric": 0.5 + 0.01 * e,
            "metric": "accuracy",
            "train_seconds": 1.5 * e,
            "wall_seconds": 2.0 * e,
        }
        for e in range(epochs + 1)
    ]


def test_merge_cuts_runs_to_a_common_epoch_drops_short_ones_and_the_later_file_wins(tmp_path):
    pytest.importorskip("matplotlib")
    _write(tmp_path / "a.csv", _run("rr", 0, 5) + _run("grab", 0, 3))
    _write(tmp_path / "b.csv", _run("grab", 1, 1))  # did not reach epoch 3: dropped
    _write(tmp_path / "c.csv", _run("rr", 0, 4, loss0=1.0))  # the same run again: replaces a.csv's
    out = tmp_path / "m"
    args = [sys.executable, str(ROOT / "scripts" / "merge_runs.py"), str(out), "--epochs", "3"]
    args += ["--metric", "accuracy", "--title", "t", "--no-times"]
    res = subprocess.run(
        args + [str(tmp_path / p) for p in ("a.csv", "b.csv", "c.csv")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert "dropped (fewer epochs): grab/seed 1 (1 epochs)" in res.stdout
    with open(str(out) + ".csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["ordering"], r["seed"], r["epoch"]) for r in rows] == [("rr", "0", str(e)) for e in range(4)] + [
        ("grab", "0", str(e)) for e in range(4)
    ]
    assert float(rows[0]["train_loss"]) == 1.0  # c.csv's run
    md = (tmp_path / "m.md").read_text()
    assert "train s/run" not in md and "Training time" not in md
    assert "grab - rr: train loss +1.0000" in md
    assert (tmp_path / "m.png").stat().st_size > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.float16])
def test_pack_format_is_lossless(tmp_path, dtype):
    pytest.importorskip("safetensors")
    import pack_minilm

    g = torch.Generator().manual_seed(0)
    t = (torch.randn(37, 11, generator=g) * 3).to(dtype) if dtype.is_floating_point else torch.randint(-9, 9**9, (5, 7))
    tensors = {"w": t, "scalar_shape": torch.tensor([30522, 384]), "empty": torch.zeros(0, 4, dtype=dtype)}
    pack_minilm._dump(tensors, tmp_path / "p.bin")
    back = pack_minilm._load(tmp_path / "p.bin")
    assert set(back) == set(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and back[k].shape == tensors[k].shape
        assert torch.equal(
            back[k].view(torch.uint8) if back[k].numel() else back[k],
            tensors[k].view(torch.uint8) if tensors[k].numel() else tensors[k],
        )


def test_pack_refuses_an_unknown_task_before_writing_anything(tmp_path):
    pytest.importorskip("safetensors")  # the script imports it first
    out = tmp_path / "packed"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "pack_minilm.py"), "pack", str(out), "--task", "MRPC,FOO"],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "unknown GLUE task(s) ['FOO']" in res.stderr
    assert not out.exists()


def test_watch_zoo_checks_each_model_named_and_prints_a_table():
    """scripts/watch_zoo.py: a BatchNorm network by the batch gradient, a Hugging Face encoder against
    torch.func, a sequence-first model refused with its layer's name; exit 0 (no crash, no wrong row)."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    out = subprocess.run(
        [sys.executable, "scripts/watch_zoo.py", "--timm", "resnet10t", "--hf", "bert", "xlnet"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[1]: line.split()[2] for line in out.stdout.splitlines()[1:]}
    assert rows == {"resnet10t": "sum", "bert": "exact", "xlnet": "refused"}
    assert "m.transformer.word_embedding' got an input of shape (7, 3)" in out.stdout
