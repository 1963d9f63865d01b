"""Pack all-MiniLM-L6-v2 small enough to copy to a machine that lacks the PyPI package (no network, and a
size limit on what can be copied), without changing a single output of the model on the examples used.

    python scripts/pack_minilm.py pack DIR [--task SST-2 --train-size 1024 --dev-size 872 --max-length 48]
    python scripts/pack_minilm.py pack DIR --task MRPC,CoLA,STS-B --train-size 0 --max-length 128 --rows bfloat16
    python scripts/pack_minilm.py unpack DIR MODEL_DIR     # on the other machine
    TORCHGRAB_MINILM=MODEL_DIR python examples/glue_finetune.py --task SST-2 --train-size 1024 ...

The model file is 91 MB, half of it the word-embedding matrix (30,522 x 384). ``examples/glue_finetune.py``
freezes that matrix and only ever looks up the rows of tokens that occur in its training and dev subsets,
so ``pack`` keeps every other tensor exactly and only those rows (with their ids); ``unpack`` rebuilds a
full model directory whose unused rows are zero. Every tensor is stored losslessly compressed (its bytes
split into planes, then zlib: the exponent bytes of trained float32 weights compress well), about 84%
of the raw size. On the packed subsets the rebuilt model computes exactly what the original does (checked
by ``verify``), and everything is float32 as shipped. Where even that is too large (the full training sets
of several tasks), ``--rows bfloat16`` keeps the used word-embedding rows rounded to bfloat16 (the
other 11 M weights stay exact); ``verify`` then checks the rebuilt model against the original with those
rows rounded the same way.
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
WORD = "embeddings.word_embeddings.weight"


def _dump(tensors: dict, path: Path) -> None:
    """Losslessly compressed tensors: each tensor's bytes split into byte planes (byte j of every element
    together), each plane zlib-compressed."""
    packed = {}
    for name, t in tensors.items():
        t = t.contiguous()
        raw = t.view(torch.uint8).numpy() if t.dtype != torch.bool else t.numpy().view(np.uint8)
        width = t.element_size()
        planes = raw.reshape(-1, width).T if width > 1 else raw.reshape(1, -1)
        packed[name] = (str(t.dtype), tuple(t.shape), [zlib.compress(p.tobytes(), 9) for p in planes])
    with open(path, "wb") as f:
        pickle.dump(packed, f, protocol=4)


def _load(path: Path) -> dict:
    with open(path, "rb") as f:
        packed = pickle.load(f)
    out = {}
    for name, (dtype, shape, planes) in packed.items():
        dt = getattr(torch, dtype.split(".")[1])
        cols = [np.frombuffer(zlib.decompress(p), dtype=np.uint8) for p in planes]
        raw = np.ascontiguousarray(np.stack(cols, axis=1)).reshape(-1)
        if raw.size == 0:  # torch cannot reinterpret an empty byte tensor
            out[name] = torch.empty(shape, dtype=dt)
            continue
        out[name] = torch.from_numpy(raw.copy()).view(dt).reshape(shape)
    return out


def _tasks(task: str) -> list:
    import _common as C

    tasks = [t for t in task.split(",") if t]
    unknown = [t for t in tasks if t not in C.GLUE_TASKS]
    if unknown or not tasks:
        sys.exit(f"--task: unknown GLUE task(s) {unknown or [task]}; choose from {', '.join(C.GLUE_TASKS)}")
    return tasks


def subsets(task: str, train_size: int, dev_size: int):
    """(task, split, text columns) of exactly the subsets glue_finetune.py trains and evaluates on, over
    the comma-separated tasks."""
    import _common as C
    from glue_finetune import balanced_subset

    for t in _tasks(task):
        for split, size in (("train", train_size), ("dev", dev_size)):
            texts, y = C.load_glue(C.data_root(None), t, split)
            keep = balanced_subset(y, size)
            yield t, split, [list(c) for c in zip(*[texts[i] for i in keep])]


def used_token_ids(model_dir: Path, task: str, train_size: int, dev_size: int, max_length: int) -> torch.Tensor:
    """Token ids of those subsets (plus the special tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = set(tok.all_special_ids)
    for _, _, cols in subsets(task, train_size, dev_size):
        for row in tok(*cols, truncation=True, max_length=max_length)["input_ids"]:
            ids.update(row)
    return torch.tensor(sorted(ids), dtype=torch.int64)


def pack(out: Path, task: str, train_size: int, dev_size: int, max_length: int, rows: str = "float32") -> None:
    import _common as C

    _tasks(task)  # an unknown task stops here, before anything is written
    src = Path(C.minilm_path())
    ids = used_token_ids(src, task, train_size, dev_size, max_length)
    tensors = load_file(str(src / "model.safetensors"))
    word = tensors.pop(WORD)
    out.mkdir(parents=True, exist_ok=True)
    for old in ("rest.safetensors", "rows.safetensors"):  # an earlier layout of this folder
        (out / old).unlink(missing_ok=True)
    _dump(tensors, out / "rest.bin")
    kept = word[ids].to(getattr(torch, rows)).contiguous()
    _dump({"ids": ids, "rows": kept, "shape": torch.tensor(word.shape)}, out / "rows.bin")
    for f in src.rglob("*"):
        if f.is_file() and f.name != "model.safetensors":
            dest = out / "files" / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"packed {len(ids)} of {word.shape[0]} embedding rows ({rows}); {size / 1e6:.1f} MB in {out}")


def unpack(packed: Path, model_dir: Path) -> None:
    shutil.copytree(packed / "files", model_dir, dirs_exist_ok=True)
    tensors = _load(packed / "rest.bin")
    rows = _load(packed / "rows.bin")
    word = torch.zeros(tuple(rows["shape"].tolist()), dtype=torch.float32)
    word[rows["ids"]] = rows["rows"].float()
    tensors[WORD] = word
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    print(f"unpacked to {model_dir}")


def verify(packed: Path, task: str, train_size: int, dev_size: int, max_length: int) -> None:
    """The rebuilt model's outputs on the packed subsets equal the original's bit for bit (with the
    word-embedding rows rounded as stored, for ``--rows bfloat16``)."""
    import tempfile

    import _common as C
    from transformers import AutoModel, AutoTokenizer

    src = Path(C.minilm_path())
    with tempfile.TemporaryDirectory() as tmp:
        unpack(packed, Path(tmp))
        tok = AutoTokenizer.from_pretrained(str(src))
        a, b = AutoModel.from_pretrained(str(src)).eval(), AutoModel.from_pretrained(tmp).eval()
        stored = _load(packed / "rows.bin")["rows"].dtype
        if stored != torch.float32:
            w = a.embeddings.word_embeddings.weight
            with torch.no_grad():
                w.copy_(w.to(stored).float())
            print(f"word-embedding rows stored as {stored}: comparing with the original so rounded")
        for t, split, cols in subsets(task, train_size, dev_size):
            same = True
            for i in range(0, len(cols[0]), 256):  # in batches: a whole training set at once would not fit
                enc = tok(
                    *[c[i : i + 256] for c in cols],
                    truncation=True,
                    max_length=max_length,
                    padding=True,
                    return_tensors="pt",
                )
                with torch.no_grad():
                    same &= torch.equal(a(**enc).last_hidden_state, b(**enc).last_hidden_state)
            print(f"{t} {split}: {len(cols[0])} examples, outputs identical: {same}")
            if not same:
                sys.exit("packed model differs from the original")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["pack", "unpack", "verify"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("model_dir", type=Path, nargs="?")
    ap.add_argument("--task", default="SST-2")
    ap.add_argument("--train-size", type=int, default=1024)
    ap.add_argument("--dev-size", type=int, default=872)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--rows", choices=["float32", "bfloat16"], default="float32", help="dtype of the kept rows")
    a = ap.parse_args()
    if a.command == "pack":
        pack(a.dir, a.task, a.train_size, a.dev_size, a.max_length, a.rows)
    elif a.command == "unpack":
        if a.model_dir is None:
            ap.error("unpack needs MODEL_DIR")
        unpack(a.dir, a.model_dir)
    else:
        verify(a.dir, a.task, a.train_size, a.dev_size, a.max_length)


if __name__ == "__main__":
    main()
