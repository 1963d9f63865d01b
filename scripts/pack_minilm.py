"""Pack all-MiniLM-L6-v2 small enough to copy to a machine that lacks the PyPI package (no network, and a
size limit on what can be copied), without changing a single output of the model on the examples used.

    python scripts/pack_minilm.py pack DIR [--task SST-2 --train-size 1024 --dev-size 872 --max-length 48]
    python scripts/pack_minilm.py unpack DIR MODEL_DIR     # on the other machine
    TORCHGRAB_MINILM=MODEL_DIR python examples/glue_finetune.py --task SST-2 --train-size 1024 ...

The model file is 91 MB, half of it the word-embedding matrix (30,522 x 384). ``examples/glue_finetune.py``
freezes that matrix and only ever looks up the rows of tokens that occur in its training and dev subsets,
so ``pack`` keeps every other tensor exactly and only those rows (with their ids); ``unpack`` rebuilds a
full model directory whose unused rows are zero. On the packed subsets the rebuilt model computes exactly
what the original does (checked by ``verify``), and everything is float32 as shipped.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
WORD = "embeddings.word_embeddings.weight"


def used_token_ids(model_dir: Path, task: str, train_size: int, dev_size: int, max_length: int) -> torch.Tensor:
    """Token ids of exactly the subsets glue_finetune.py trains and evaluates on (plus the special tokens)."""
    import _common as C
    from glue_finetune import balanced_subset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = set(tok.all_special_ids)
    for split, size in (("train", train_size), ("dev", dev_size)):
        texts, y = C.load_glue(C.data_root(None), task, split)
        keep = balanced_subset(y, size)
        cols = list(zip(*[texts[i] for i in keep]))
        enc = tok(*[list(c) for c in cols], truncation=True, max_length=max_length)
        for row in enc["input_ids"]:
            ids.update(row)
    return torch.tensor(sorted(ids), dtype=torch.int64)


def pack(out: Path, task: str, train_size: int, dev_size: int, max_length: int) -> None:
    import _common as C

    src = Path(C.minilm_path())
    ids = used_token_ids(src, task, train_size, dev_size, max_length)
    tensors = load_file(str(src / "model.safetensors"))
    word = tensors.pop(WORD)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "rest.safetensors"))
    save_file(
        {"ids": ids, "rows": word[ids].contiguous(), "shape": torch.tensor(word.shape)}, str(out / "rows.safetensors")
    )
    for f in src.rglob("*"):
        if f.is_file() and f.name != "model.safetensors":
            dest = out / "files" / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"packed {len(ids)} of {word.shape[0]} embedding rows; {size / 1e6:.1f} MB in {out}")


def unpack(packed: Path, model_dir: Path) -> None:
    shutil.copytree(packed / "files", model_dir, dirs_exist_ok=True)
    tensors = load_file(str(packed / "rest.safetensors"))
    rows = load_file(str(packed / "rows.safetensors"))
    word = torch.zeros(tuple(rows["shape"].tolist()), dtype=rows["rows"].dtype)
    word[rows["ids"]] = rows["rows"]
    tensors[WORD] = word
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    print(f"unpacked to {model_dir}")


def verify(packed: Path, task: str, train_size: int, dev_size: int, max_length: int) -> None:
    """The rebuilt model's outputs on the packed subsets equal the original's bit for bit."""
    import tempfile

    import _common as C
    from transformers import AutoModel, AutoTokenizer

    src = Path(C.minilm_path())
    with tempfile.TemporaryDirectory() as tmp:
        unpack(packed, Path(tmp))
        tok = AutoTokenizer.from_pretrained(str(src))
        a, b = AutoModel.from_pretrained(str(src)).eval(), AutoModel.from_pretrained(tmp).eval()
        for split, size in (("train", train_size), ("dev", dev_size)):
            from glue_finetune import balanced_subset

            texts, y = C.load_glue(C.data_root(None), task, split)
            keep = balanced_subset(y, size)
            cols = list(zip(*[texts[i] for i in keep]))
            enc = tok(
                *[list(c) for c in cols], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )
            with torch.no_grad():
                same = torch.equal(a(**enc).last_hidden_state, b(**enc).last_hidden_state)
            print(f"{split}: {len(keep)} examples, outputs identical: {same}")
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
    a = ap.parse_args()
    if a.command == "pack":
        pack(a.dir, a.task, a.train_size, a.dev_size, a.max_length)
    elif a.command == "unpack":
        if a.model_dir is None:
            ap.error("unpack needs MODEL_DIR")
        unpack(a.dir, a.model_dir)
    else:
        verify(a.dir, a.task, a.train_size, a.dev_size, a.max_length)


if __name__ == "__main__":
    main()
