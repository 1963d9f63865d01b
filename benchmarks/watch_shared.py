"""What `sampler.watch(model)` costs on T5 and MPNet, whose relative position bias is an Embedding looked up
with [query, key] ids that the whole batch shares, and on DeBERTa-v3, whose relative-embedding table is
normalized and projected once for the whole batch, against the same model without `watch()`, in one run.

    .venv/bin/python benchmarks/watch_shared.py            # out/watch_shared.txt
    .venv/bin/python benchmarks/watch_shared.py --quick    # a smoke run of a few seconds

No example owns such a lookup, so `watch()` follows its output from the call to where it meets each
example's attention scores (capture/shared.py): from that call to the end of the model's forward, one
TorchFunctionMode sees every torch function the forward calls. This script measures that price, and what
those layers' own rows cost, beside what a user had to leave out before ("exclude=before", `_EXCLUDE`: for
DeBERTa-v3 every query and key projection, which project the table besides the tokens), and for DeBERTa
what leaving out its relative-embedding table and that table's LayerNorm alone saves ("exclude=table").

Models (random weights from their configs: nothing is downloaded): T5-small's sizes
(`T5ForConditionalGeneration`, 6 + 6 layers, d_model 512, 60 M parameters, sdpa attention), `--batch`
pairs of `--tokens` source and target tokens, the LM loss; MPNet-base's sizes
(`MPNetForSequenceClassification`, 12 layers, hidden 768, 110 M parameters), `--batch` sentences of
`--tokens` tokens, 2 classes; DeBERTa-v3-base's (`DebertaV2ForSequenceClassification`, 12 layers, hidden
768, 256 position buckets, a 128,100-token vocabulary, 184 M parameters), the same inputs. Arms in
alternating rounds: no `watch()`, the `watch(exclude=...)` arms, and
`watch()` (the default sketch). Each arm over "no watch()" is one paired ratio per round; the table gives
their medians and ranges.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _t5(small: bool):
    import transformers

    cfg = transformers.T5Config(
        **({"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16} if small else {}),
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    return "T5 (T5-small sizes)" if not small else "T5 (tiny)", transformers.T5ForConditionalGeneration(cfg)


def _mpnet(small: bool):
    import transformers

    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = transformers.MPNetConfig(**(sizes if small else {}), num_labels=2)
    return "MPNet (MPNet-base sizes)" if not small else "MPNet (tiny)", transformers.MPNetForSequenceClassification(cfg)


def _deberta(small: bool):
    import transformers

    # DeBERTa-v3-base's configuration (microsoft/deberta-v3-base), or a tiny one of the same layout.
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    base = {
        "vocab_size": 128100, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12,
    }  # fmt: skip
    cfg = transformers.DebertaV2Config(
        **(sizes if small else base), relative_attention=True, position_buckets=256,
        norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
        max_position_embeddings=512, type_vocab_size=0, layer_norm_eps=1e-7, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    title = "DeBERTa-v3 (tiny)" if small else "DeBERTa-v3 (DeBERTa-v3-base sizes)"
    return title, transformers.DebertaV2ForSequenceClassification(cfg)


# What a user had to leave out before these calls were followed: the bias tables (T5, MPNet); DeBERTa's
# relative-embedding table, the LayerNorm over it, and (share_att_key) every query and key projection,
# which project the table besides the tokens. For DeBERTa also what leaves out the table and its LayerNorm
# alone (0.2% of DeBERTa-v3-base's parameters), whose per-example gradients are the dear part here.
_EXCLUDE = {
    "T5": {"watch(exclude=before)": ["*.relative_attention_bias"]},
    "MPNet": {"watch(exclude=before)": ["*.relative_attention_bias"]},
    "DeBERTa": {
        "watch(exclude=before)": ["*.rel_embeddings", "*.encoder.LayerNorm", "*.query_proj", "*.key_proj"],
        "watch(exclude=table)": ["*.rel_embeddings", "*.encoder.LayerNorm"],
    },
}


def model_costs(out: "_common.Out", make: Callable, batch: int, tokens: int, rounds: int, small: bool) -> None:
    torch.manual_seed(0)
    title, model = make(small)
    model.train()
    is_t5 = "T5" in title
    d = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 1000, (batch, tokens), generator=g)
    labels = torch.randint(2, 1000, (batch, max(tokens // 4, 2)), generator=g) if is_t5 else torch.arange(batch) % 2
    out.line(f"\n{title}: {d:,} parameters, batch {batch} x {tokens} tokens, {rounds} rounds")
    family = title.split(" ")[0].split("-")[0]
    for arm, names in _EXCLUDE[family].items():
        out.line(f"# {arm} leaves out {names}")
    arms = {"no watch()": None, **_EXCLUDE[family], "watch()": []}
    handles = _common.watched_arms(out, model, arms, batch, rounds, lambda m: m(input_ids=ids, labels=labels).loss)
    out.line("# K: " + ", ".join(f"{h.width:,} for {n}" for n, h in handles.items()))


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="examples per step")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per example")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out; with --quick a temp folder)")
    ap.add_argument("--quick", action="store_true", help="tiny models, batch 2, 2 rounds: a smoke run")
    ap.add_argument("--models", default="t5,mpnet,deberta", help="which of t5, mpnet, deberta (comma-separated)")
    args = ap.parse_args(argv)
    _common.out_folder(args, "watch_shared")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.rounds, args.tokens = 2, 2, 8
    warnings.filterwarnings("ignore", message="There is a performance drop")
    import transformers

    transformers.logging.set_verbosity_error()
    out = _common.begin_result("watch() on T5, MPNet and DeBERTa (relative positions shared by the batch): cost")
    out.line(f"# torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} torch thread(s)")
    makes = {"t5": _t5, "mpnet": _mpnet, "deberta": _deberta}
    unknown = [m for m in args.models.split(",") if m not in makes]
    if unknown:
        ap.error(f"unknown --models {unknown}; choose from {', '.join(makes)}")
    for make in (makes[m] for m in args.models.split(",")):
        model_costs(out, make, args.batch, args.tokens, args.rounds, args.quick)
    out.line(f"\n# load average now {_common.load_average()}")
    out.save(os.path.join(args.out, "watch_shared.txt"))
    print(f"# wrote {args.out}/watch_shared.txt")


if __name__ == "__main__":
    main()
