"""Which models `sampler.watch(model)` takes: one watched training step of each model named, its rows
checked, a table printed.

    .venv/bin/python scripts/watch_zoo.py [--timm ARCH ...] [--hf NAME ...] [--sketch 8]

Each timm architecture is built by `timm.create_model(ARCH, pretrained=False, num_classes=3)` at its
default size (SAM's encoder at 256 pixels: `_TIMM_SIZE`; nothing downloaded), dropout and stochastic depth off,
and fed 2 random images of 64 x 64 pixels (of its default size where it
needs that: vision transformers with fixed positions, Inception); each Hugging Face name is one of the tiny configs below, fed 3 random sequences of 7 tokens.
The check, printed per model:

- "exact": without BatchNorm in training mode, rows at `sketch=None` equal torch.func's per-example
  gradients of the whole model (through `handle.project`, column by column), and so do the rows at
  `--sketch`, through that handle's projections (the sketched paths: grouped layers and inputs);
- "sum": otherwise, or where torch.func cannot trace the model, the rows at `--sketch` add up to the
  batch gradient (times the batch size: a mean loss), which also holds for BatchNorm's contributions;
- "refused": `watch()` or the step raised UnsupportedModelError; its message says what and why.

Without arguments it runs the lists recorded in docs/capturing-gradients.md (Which models).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn

TIMM = [
    "convnextv2_atto", "convnext_atto_ols", "efficientnetv2_rw_t", "tf_efficientnetv2_b0", "tf_efficientnet_b0",
    "mobilenetv4_conv_small", "repvit_m0_9", "fastvit_t8", "hgnetv2_b0", "efficientvit_b0", "pvt_v2_b0",
    "twins_pcpvt_small", "dla34", "inception_v3", "rexnet_100", "mixnet_s", "lcnet_050", "res2net50_14w_8s",
    "seresnext26d_32x4d", "ese_vovnet19b_dw", "cspresnet50", "vit_small_patch16_rope_224", "flexivit_small",
    "vit_base_patch16_siglip_224", "maxvit_nano_rw_256", "davit_tiny", "samvit_base_patch16", "xcit_nano_12_p16_224",
    "efficientformer_l1", "resnetv2_50x1_bit", "nfnet_l0", "swin_tiny_patch4_window7_224", "coatnet_nano_rw_224",
    "beit_base_patch16_224", "eva02_tiny_patch14_224", "swinv2_tiny_window8_256",
]  # fmt: skip

# Built smaller than registered: SAM's image encoder at 1024 pixels, with torch.func's per-example
# gradients of its 90 M parameters beside it, did not fit this machine's 24 GiB (killed for memory).
_TIMM_SIZE = {"samvit_base_patch16": {"img_size": 256}}

_ENC = dict(
    vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=20, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    pad_token_id=0, attn_implementation="eager",
)  # fmt: skip


# (Masked frames off: Hugging Face draws them with NumPy, so torch.func's replay of each example would
# mask others; tests/test_watch_hf_models.py checks them with masks given.)
_SPEECH = dict(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
    conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
    num_labels=3, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
    layerdrop=0.0, mask_time_prob=0.0, final_dropout=0.0,
)  # fmt: skip


def _hf_models():
    import transformers as tf

    tf.logging.set_verbosity_error()  # tiny vocabularies: warnings about the default special token ids

    return {
        "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**_ENC)),
        "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**{**_ENC, "pad_token_id": 1})),
        "distilbert": lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=40, dim=16, hidden_dim=32, n_layers=2, n_heads=2, max_position_embeddings=20, num_labels=3,
            dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, pad_token_id=0)),
        "albert": lambda: tf.AlbertForSequenceClassification(tf.AlbertConfig(
            **{**_ENC, "embedding_size": 8, "classifier_dropout_prob": 0.0})),
        "electra": lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(**{**_ENC, "embedding_size": 8})),
        "xlm_roberta": lambda: tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(**{**_ENC, "pad_token_id": 1})),
        "camembert": lambda: tf.CamembertForSequenceClassification(tf.CamembertConfig(**{**_ENC, "pad_token_id": 1})),
        "modernbert": lambda: tf.ModernBertForSequenceClassification(tf.ModernBertConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=20, num_labels=3, pad_token_id=0, attn_implementation="eager",
            classifier_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0,
            global_attn_every_n_layers=1, local_attention=4)),
        "mobilebert": lambda: tf.MobileBertForSequenceClassification(tf.MobileBertConfig(
            **{**_ENC, "embedding_size": 8, "intra_bottleneck_size": 8, "true_hidden_size": 8,
               "num_feedforward_networks": 1})),
        "gpt2": lambda: tf.GPT2ForSequenceClassification(tf.GPT2Config(
            vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=20, num_labels=3, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)),
        "llama": lambda: tf.LlamaForSequenceClassification(tf.LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=20, num_labels=3, pad_token_id=0)),
        "xlnet": lambda: tf.XLNetForSequenceClassification(tf.XLNetConfig(
            vocab_size=40, d_model=16, n_layer=2, n_head=2, d_inner=32, num_labels=3, dropout=0.0)),
        "funnel": lambda: tf.FunnelForSequenceClassification(tf.FunnelConfig(
            vocab_size=40, d_model=16, n_head=2, d_head=8, d_inner=32, block_sizes=[1, 1], num_labels=3,
            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)),
        "whisper_encoder": lambda: tf.WhisperForAudioClassification(tf.WhisperConfig(
            d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=8,
            max_source_positions=10, num_labels=3, dropout=0.0)),
        "segformer": lambda: tf.SegformerForImageClassification(tf.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[3, 3],
            strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], num_labels=3, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, drop_path_rate=0.0, classifier_dropout_prob=0.0)),
        "wav2vec2": lambda: tf.Wav2Vec2ForSequenceClassification(tf.Wav2Vec2Config(
            vocab_size=10, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2, num_labels=3, classifier_proj_size=8, hidden_dropout=0.0,
            activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
            mask_time_prob=0.0, do_stable_layer_norm=True, feat_extract_norm="layer")),
        "hubert": lambda: tf.HubertForSequenceClassification(tf.HubertConfig(**_SPEECH)),
        "data2vec_audio": lambda: tf.Data2VecAudioForSequenceClassification(tf.Data2VecAudioConfig(
            **{**_SPEECH, "num_conv_pos_embeddings": 3, "conv_pos_kernel_size": 3})),
        "wavlm": lambda: tf.WavLMForSequenceClassification(tf.WavLMConfig(
            **_SPEECH, num_buckets=8, max_bucket_distance=20)),
        "ast": lambda: tf.ASTForAudioClassification(tf.ASTConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_mel_bins=16,
            max_length=24, patch_size=8, frequency_stride=8, time_stride=8, num_labels=3, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)),
        "esm": lambda: tf.EsmForSequenceClassification(tf.EsmConfig(
            **{**_ENC, "position_embedding_type": "rotary", "mask_token_id": 1})),
        "gptj": lambda: tf.GPTJForSequenceClassification(tf.GPTJConfig(
            vocab_size=40, n_embd=16, n_layer=2, n_head=2, rotary_dim=4, n_positions=20, num_labels=3,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)),
        "bloom": lambda: tf.BloomForSequenceClassification(tf.BloomConfig(
            vocab_size=40, hidden_size=16, n_layer=2, n_head=2, num_labels=3, hidden_dropout=0.0,
            attention_dropout=0.0, pad_token_id=0)),
        "deberta_v3": lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
            **{**_ENC, "relative_attention": True, "position_buckets": 8, "max_relative_positions": 16,
               "pos_att_type": ["p2c", "c2p"], "share_att_key": True, "norm_rel_ebd": "layer_norm",
               "pooler_dropout": 0.0, "pooler_hidden_size": 16, "pad_token_id": None})),
        "deberta_v2": lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
            **{**_ENC, "relative_attention": True, "position_buckets": 8, "max_relative_positions": 16,
               "pos_att_type": ["p2c", "c2p"], "pooler_dropout": 0.0, "pooler_hidden_size": 16,
               "pad_token_id": None})),
        "mpnet": lambda: tf.MPNetForSequenceClassification(tf.MPNetConfig(**{**_ENC, "pad_token_id": 1})),
        "convbert": lambda: tf.ConvBertForSequenceClassification(tf.ConvBertConfig(
            **{**_ENC, "embedding_size": 16, "conv_kernel_size": 3})),
        "longformer": lambda: tf.LongformerForSequenceClassification(tf.LongformerConfig(
            **{**_ENC, "attention_window": 4, "pad_token_id": 1})),
        "mixtral": lambda: tf.MixtralForSequenceClassification(tf.MixtralConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, num_labels=3, pad_token_id=0,
            attn_implementation="eager")),
        "qwen2_moe": lambda: tf.Qwen2MoeForSequenceClassification(tf.Qwen2MoeConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
            shared_expert_intermediate_size=8, num_labels=3, pad_token_id=0, attn_implementation="eager")),
    }  # fmt: skip


# The input of the Hugging Face models that take no token ids: (keyword, a batch of 3).
_HF_INPUTS = {
    "whisper_encoder": ("input_features", lambda g: torch.randn(3, 8, 20, generator=g)),
    "segformer": ("pixel_values", lambda g: torch.randn(3, 3, 16, 16, generator=g)),
    "wav2vec2": ("input_values", lambda g: torch.randn(3, 400, generator=g)),
    "hubert": ("input_values", lambda g: torch.randn(3, 600, generator=g)),
    "data2vec_audio": ("input_values", lambda g: torch.randn(3, 600, generator=g)),
    "wavlm": ("input_values", lambda g: torch.randn(3, 600, generator=g)),
    "ast": ("input_values", lambda g: torch.randn(3, 24, 16, generator=g)),
}


class _Logits(nn.Module):
    def __init__(self, model, key="input_ids"):
        super().__init__()
        self.m, self.key = model, key

    def forward(self, x):
        return self.m(**{self.key: x}).logits


def _watched_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sketch: Optional[int]) -> tuple:
    """One training step of `model` under `watch(sketch=...)`: (the rows it fed, in order, as [B, K] float64;
    the handle, removed). The model keeps the step's gradients in `.grad`."""
    import torchgrab

    sampler = torchgrab.GraBSampler(n=x.shape[0])
    list(iter(sampler))  # the indices the rows are matched to
    handle = sampler.watch(model, sketch=sketch)
    rows = []
    sampler.step = lambda g, *a, **k: rows.append(np.asarray(g, dtype=np.float64).copy())  # type: ignore
    try:
        nn.functional.cross_entropy(model(x), y).backward()
        handle.flush()
    finally:
        handle.remove()
    return np.concatenate(rows), handle


def _check(model: nn.Module, x: torch.Tensor, sketch: int) -> tuple:
    """(check, K) for one watched step of `model` on `x`, or raises."""
    from torchgrab.gradients import per_example_gradients

    y = torch.arange(x.shape[0]) % 3
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
        rows, handle = _watched_step(model, x, y, None)
        model.zero_grad(set_to_none=True)
        try:
            grads, _ = per_example_gradients(model, nn.functional.cross_entropy, x, y)
        except Exception:  # torch.func cannot trace it (data-dependent pooling): the sum check below
            grads = None
        if grads is not None:
            width = handle.width  # K of the exact rows, the one printed
            for sk in (None, sketch):
                if sk is not None:
                    rows, handle = _watched_step(model, x, y, sk)
                    model.zero_grad(set_to_none=True)
                want = handle.project(grads).double().numpy()
                cols = np.maximum(np.abs(want).max(0), 1e-4 * np.abs(want).max())
                if not np.all(np.abs(rows - want) <= 1e-3 * cols + 1e-4 * np.abs(want)):
                    raise AssertionError(f"rows at sketch={sk} differ from torch.func's per-example gradients")
            return "exact", width
    rows, handle = _watched_step(model, x, y, sketch)
    batch = {n: p.grad[None] for n, p in model.named_parameters() if p.grad is not None}
    want = handle.project(batch)[0].double().numpy() * x.shape[0]
    if not np.allclose(rows.sum(0), want, rtol=1e-3, atol=1e-4 * np.abs(want).max()):
        raise AssertionError("rows do not add up to the batch gradient")
    return "sum", handle.width


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timm", nargs="*", default=None, help="timm architectures (default: the recorded list)")
    ap.add_argument("--hf", nargs="*", default=None, help="Hugging Face tiny configs by name (default: all)")
    ap.add_argument("--sketch", type=int, default=8)
    args = ap.parse_args()
    from torchgrab import UnsupportedModelError

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    both_default = args.timm is None and args.hf is None
    jobs = []
    if args.timm is not None or both_default:
        import timm

        for arch in TIMM if args.timm is None or not args.timm else args.timm:
            kw = _TIMM_SIZE.get(arch, {})
            jobs.append(("timm", arch, lambda a=arch, k=kw: timm.create_model(a, pretrained=False, num_classes=3, **k)))
    if args.hf is not None or both_default:
        hf = _hf_models()
        unknown = [n for n in (args.hf or []) if n not in hf]
        if unknown:
            ap.error(f"unknown --hf names {unknown}; choose from {', '.join(hf)}")
        for name in args.hf or list(hf):
            key = _HF_INPUTS.get(name, ("input_ids", None))[0]
            jobs.append(("huggingface", name, lambda n=name, k=key: _Logits(hf[n](), k)))
    print(f"{'library':<12} {'model':<32} {'check':<8} {'K':>10}  note")
    failed = 0
    for lib, name, make in jobs:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = make().train()
        for m in model.modules():
            # Dropout and stochastic depth (Swin's DropPath, on by default) draw new masks in torch.func's
            # replay of the step: the two would be different functions. Off, as the tests build them.
            if "Drop" in type(m).__name__:
                m.eval()
        if lib == "timm":
            size = _TIMM_SIZE.get(name, {}).get("img_size", model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
            fixed = any(
                k in name
                for k in (
                    "vit",
                    "xcit",
                    "efficientformer",
                    "pvt",
                    "twins",
                    "davit",
                    "maxvit",
                    "sam",
                    "inception",
                    "swin",
                    "coatnet",
                    "beit",
                    "eva",
                )
            )
            size = size if fixed else 64
            x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        elif name in _HF_INPUTS:
            x = _HF_INPUTS[name][1](torch.Generator().manual_seed(5))
        else:
            x = torch.randint(3, 40, (3, 7), generator=torch.Generator().manual_seed(5))
        try:
            check, k = _check(model, x, args.sketch)
            note = f"{time.perf_counter() - t0:.1f} s"
        except UnsupportedModelError as e:
            check, k, note = "refused", "", str(e).split(": ", 1)[-1][:150]
        except Exception as e:  # a crash or a wrong row: what this script is for
            check, k, note = "FAILED", "", f"{type(e).__name__}: {str(e)[:150]}"
            failed += 1
        print(f"{lib:<12} {name:<32} {check:<8} {k:>10}  {note}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
