"""watch() on the model families people fine-tune with Hugging Face ``transformers``: a tiny model of each
(built from a local config, nothing downloaded), one watched step, and the rows against torch.func's
per-example gradients of the whole model (``sketch=None``: exact). Each family brings layers of its own:
RMSNorm classes (Llama's, Gemma's 1 + w, T5's), scaled word embeddings (Gemma, XGLM, BART), learned
positions at shifted ids (BART, BioGPT), a Linear written as a matrix product (Falcon), one embedding
table shared by encoder, decoder and output layer (T5, BART)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_rows_follow_autocast, autocast_step
from test_watch import _lm_loss, _lm_step, _Logits, _own_gradients, assert_rows, flat, one_step, watched
from test_watch import ce as _ce
from torch import nn
from torchgrab import UnsupportedModelError
from torchgrab.gradients import per_example_gradients

transformers = pytest.importorskip("transformers")

_DECODER = dict(
    vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=16, attn_implementation="eager", bos_token_id=0,
    eos_token_id=0, pad_token_id=0,
)  # fmt: skip
_BART = dict(
    d_model=16, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=32, encoder_layers=2,
    encoder_attention_heads=2, encoder_ffn_dim=32, dropout=0.0,
)  # fmt: skip

# family: (config class, causal LM class, config fields beyond _DECODER)
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {}),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", {"num_layers": 2, "attention_types": [[["global"], 2]]}),
    "bart": ("BartConfig", "BartForCausalLM", _BART),
    "mbart": ("MBartConfig", "MBartForCausalLM", {**_BART, "scale_embedding": True}),
    "biogpt": ("BioGptConfig", "BioGptForCausalLM", {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}),
    # OPT reshapes [B, T, E] to [B * T, E] before its MLP (capture/flatten.py regroups the rows); OPT-350m's
    # layout normalizes after the MLP, so fc1 takes the reshaped tensor itself, and projects the embeddings.
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 32, "word_embed_proj_dim": 16, "dropout": 0.0}),
    "opt_350m": (
        "OPTConfig",
        "OPTForCausalLM",
        {"ffn_dim": 32, "word_embed_proj_dim": 8, "dropout": 0.0, "do_layer_norm_before": False},
    ),
    "xglm": (
        "XGLMConfig",
        "XGLMForCausalLM",
        {
            "d_model": 16,
            "num_layers": 2,
            "ffn_dim": 32,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
        },
    ),
}


def _off_one(model: nn.Module) -> nn.Module:
    # Norm weights moved off their initial values (1, or 0 for Gemma's 1 + w), so that their gradients and
    # the layers after them depend on them.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or ".ln" in n:
                p.uniform_(0.5, 1.5)
    return model


def _causal(family: str) -> nn.Module:
    cfg_class, model_class, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_class)(**{**_DECODER, **extra})
    return _off_one(_Logits(lambda: getattr(transformers, model_class)(cfg)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_of_causal_language_models_gives_exact_rows(family):
    rows, grads, handle = _lm_step(_causal(family), None)
    assert_rows(rows, flat(grads, 3))  # every parameter, by its exact per-example gradient
    assert handle.width == sum(g[0].numel() for g in grads.values())


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_encoder_decoder_models_share_one_table_between_encoder_decoder_and_output_layer(attention):
    # T5 and BART look up one `shared` table in the encoder, in the decoder and (tied) in the output layer:
    # its per-example gradient is the sum of the three uses, added up in the table's one block of rows.
    # T5's relative position bias is looked up with [query, key] ids that no example owns, shared by all,
    # and handed from the first layer to the others: its rows are taken where it meets each example's
    # scores (added to them by the eager attention, made sdpa's mask by torch.where with sdpa).
    t5 = transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=True,
        attn_implementation=attention,
    )  # fmt: skip
    bart = transformers.BartConfig(
        vocab_size=40, max_position_embeddings=16, pad_token_id=0, attn_implementation=attention, **_BART
    )
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(5))
    for make, shared in [
        (lambda: transformers.T5ForConditionalGeneration(t5), "m.shared"),
        (lambda: transformers.BartForConditionalGeneration(bart), "m.model.shared"),
    ]:
        model = _off_one(_Logits(make, decoder=True)).train()
        for sketch in (None, 4):
            rows, expected, grads, handle = one_step(model, ids[:, :-1], ids[:, 1:], _lm_loss, sketch)
            assert_rows(rows, expected)
            handle.remove()
        kinds = {n: kind for n, kind, _ in handle.layers}
        uses = [n for n, kind in kinds.items() if kind == f"Embedding (table of {shared!r}: added into its columns)"]
        assert len(uses) == 2  # the encoder's and the decoder's lookups
        assert sum("tied to" in kind for kind in kinds.values()) == 1
        bias = [n for n in kinds if n.endswith("relative_attention_bias")]
        assert len(bias) == (2 if shared == "m.shared" else 0)  # the encoder's and the decoder's
        for n in bias:
            assert float(grads[n + ".weight"].abs().max()) > 0  # (the rows above hold its columns)


def test_t5_with_gradient_checkpointing_follows_its_bias_unless_the_checkpoint_is_reentrant():
    # Non-reentrant checkpointing recomputes saved tensors in the backward, through the forward's own graph,
    # where the bias's meeting points are hooked. A reentrant checkpoint runs its block under no_grad and
    # again in the backward, outside the model's forward: refused there, with what to pass.
    t5 = transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation="eager",
    )  # fmt: skip
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(5))
    model = _off_one(_Logits(lambda: transformers.T5ForConditionalGeneration(t5), decoder=True)).train()
    reference = copy.deepcopy(model)  # (checkpointing's settings stay off torch.func's model)
    model.m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sampler, handle, spy = watched(model, sketch=4)
    for _ in range(2):
        model.zero_grad()
        _lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
        handle.flush()
    assert [r.shape[0] for r in spy.rows] == [3, 3] and torch._C._len_torch_function_stack() == 0
    grads, _ = per_example_gradients(reference, _lm_loss, ids[:, :-1], ids[:, 1:])
    assert_rows(spy.rows[-1], handle.project(grads))
    handle.remove()
    model.m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    sampler, handle, spy = watched(model, sketch=4)
    with pytest.raises(UnsupportedModelError, match=r"relative_attention_bias' got an input .*use_reentrant=False"):
        _lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
    assert spy.rows == [] and torch._C._len_torch_function_stack() == 0
    handle.remove()


def test_mpnet_relative_position_bias_expanded_over_the_batch_gives_exact_rows():
    # MPNet computes its bias once in the encoder and expands it over the batch before the layers take it.
    cfg = transformers.MPNetConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        pad_token_id=0,
    )  # fmt: skip
    ids = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(5))
    model = _off_one(_Logits(lambda: transformers.MPNetForSequenceClassification(cfg))).train()
    for sketch in (None, 4):
        rows, expected, grads, handle = one_step(model, ids, torch.tensor([0, 2, 1]), _ce, sketch)
        assert_rows(rows, expected)
        handle.remove()
    assert float(grads["m.mpnet.encoder.relative_attention_bias.weight"].abs().max()) > 0


_VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_labels=3,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, image_size=8, patch_size=4, num_channels=3,
    attn_implementation="eager",
)  # fmt: skip
VISION = {
    "vit": ("ViTConfig", "ViTForImageClassification", {}),
    "deit": ("DeiTConfig", "DeiTForImageClassification", {}),
    "beit": ("BeitConfig", "BeitForImageClassification", {"drop_path_rate": 0.0, "layer_scale_init_value": 0.5}),
    "dinov2": ("Dinov2Config", "Dinov2ForImageClassification", {"layerscale_value": 0.5}),
    "convnext": (
        "ConvNextConfig", "ConvNextForImageClassification",
        {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2, "patch_size": 2, "layer_scale_init_value": 0.5},
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(VISION))
def test_vision_transformers_class_tokens_position_embeddings_and_layer_scales_give_exact_rows(family):
    # Their class and distillation tokens, position embeddings (ViT, DeiT, BEiT, DINOv2) and layer scales
    # (BEiT's lambdas, ConvNeXt's) are parameters of modules with sublayers, broadcast over the batch.
    cfg_class, model_class, extra = VISION[family]
    cfg = getattr(transformers, cfg_class)(**{**_VISION, **extra})
    model = _Logits(lambda: getattr(transformers, model_class)(cfg), key="pixel_values").train()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    rows, expected, grads, handle = one_step(model, x, torch.tensor([0, 1, 2]), _ce, None)
    assert_rows(rows, expected)
    direct = [n for n, kind, _ in handle.layers if kind.startswith("parameter of no layer")]
    assert direct and all(n in grads for n in direct)
    assert handle.width == sum(g[0].numel() for g in grads.values())  # every parameter, exactly


def _swin():
    cfg = transformers.SwinConfig(
        image_size=16, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=4, num_labels=3,
        drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.SwinForImageClassification(cfg), 16


def _mobilevit():
    cfg = transformers.MobileViTConfig(
        image_size=32, num_labels=3, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.MobileViTForImageClassification(cfg), 32


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func's reference over attention
@pytest.mark.parametrize("sketch", [None, 8])
@pytest.mark.parametrize("family", ["swin", "mobilevit"])
def test_attention_over_windows_or_patches_of_every_example_stacked_gives_exact_rows(family, sketch):
    # Swin stacks every example's (shifted) windows into one batch for its attention, MobileViT every
    # example's patches: those layers get B * windows rows, regrouped by example from their history
    # (capture/flatten.py), and so are the parts of Swin's relative-position tables, indexed and broadcast
    # over the windows (capture/direct.py). MobileViT's BatchNorm layers are put in eval mode, for
    # per-example gradients to compare with.
    net, size = {"swin": _swin, "mobilevit": _mobilevit}[family]()
    model = _off_one(_Logits(lambda: net, key="pixel_values")).train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    rows, expected, grads, handle = one_step(model, x, torch.tensor([0, 1, 2]), _ce, sketch)
    assert_rows(rows, expected)
    if sketch is None:  # every parameter, exactly: the layers on windows and patches, the tables included
        assert handle.width == sum(g[0].numel() for g in grads.values())
        assert any("relative_position_bias_table" in n for n in grads) == (family == "swin")


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func's reference over attention
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_clip_and_siglip_image_towers_give_exact_rows(family):
    # CLIP's class embedding is one [E] vector expanded to [B, 1, E]; SigLIP's attention-pooling head
    # repeats its [1, 1, E] probe over the batch: both were refused at that call.
    tower = dict(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, attention_dropout=0.0)  # fmt: skip
    text = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config, model_class = {"clip": ("CLIPConfig", "CLIPForImageClassification"),
                           "siglip": ("SiglipConfig", "SiglipForImageClassification")}[family]  # fmt: skip
    cfg = getattr(transformers, config)(vision_config=tower, text_config=text, num_labels=3)
    model = _off_one(_Logits(lambda: getattr(transformers, model_class)(cfg), key="pixel_values")).train()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    rows, expected, grads, handle = one_step(model, x, torch.tensor([0, 1, 2]), _ce, None)
    assert_rows(rows, expected)
    direct = {n for n, kind, _ in handle.layers if kind.startswith("parameter of no layer")}
    assert {"clip": "m.vision_model.embeddings.class_embedding", "siglip": "m.vision_model.head.probe"}[
        family
    ] in direct


_SPEECH = dict(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
    conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
    num_labels=3, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
    layerdrop=0.0, mask_time_prob=0.0, final_dropout=0.0,
)  # fmt: skip


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func's reference over attention
@pytest.mark.parametrize(
    "config, model_class, extra",
    [
        ("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", {}),
        ("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", {"do_stable_layer_norm": True, "feat_extract_norm": "layer"}),
        ("Wav2Vec2Config", "Wav2Vec2ForCTC", {"vocab_size": 6}),
        ("HubertConfig", "HubertForSequenceClassification", {}),
        ("SEWConfig", "SEWForSequenceClassification", {"squeeze_factor": 2}),
        ("UniSpeechSatConfig", "UniSpeechSatForSequenceClassification", {}),
    ],
    ids=["wav2vec2", "wav2vec2_stable_layer_norm", "wav2vec2_ctc", "hubert", "sew", "unispeech_sat"],
)  # fmt: skip
def test_speech_encoders_with_a_weight_normed_positional_convolution_give_exact_rows(config, model_class, extra):
    # Their positional convolution (grouped, as wide as the model, normalized over its kernel taps: dim=2)
    # computes its weight by weight_norm: it was refused, so these models needed exclude= to be watched.
    cfg = getattr(transformers, config)(**_SPEECH, **extra)
    model = _Logits(lambda: getattr(transformers, model_class)(cfg), key="input_values").train()
    if model_class.endswith("CTC"):
        model.m.freeze_feature_encoder()  # (as fine-tuning for speech recognition does)
    x = torch.randn(3, 600, generator=torch.Generator().manual_seed(1))

    def loss_fn(out, y, reduction="mean"):  # a loss over every frame, or over the pooled classes
        return out.square().mean() if out.dim() == 3 else _ce(out, y, reduction=reduction)

    rows, expected, grads, handle = one_step(model, x, torch.tensor([0, 1, 2]), loss_fn, None)
    assert_rows(rows, expected)
    conv = [kind for n, kind, _ in handle.layers if n.endswith("pos_conv_embed.conv")]
    assert conv == ["Conv1d (weight from weight_norm: per example through it)"]
    assert any(n.endswith("pos_conv_embed.conv.parametrizations.weight.original0") for n in grads)


class _MaskedSpeech(nn.Module):
    """Wav2Vec2 pre-training's and fine-tuning's SpecAugment: the model writes its learned masked_spec_embed
    over the masked frames. The frames here come from each clip itself (Hugging Face draws them with NumPy),
    so that a clip's own pass masks the same frames as the batch's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        cfg = transformers.Wav2Vec2Config(**{**_SPEECH, "mask_time_prob": 0.05})
        self.m = transformers.Wav2Vec2Model(cfg)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        frames = int(self.m._get_feat_extract_output_lengths(x.shape[1]))
        t = torch.arange(frames)
        mask = (t + (x[:, :1] > 0).long()) % 3 == 0  # [B, frames]
        return self.head(self.m(x, mask_time_indices=mask).last_hidden_state.mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("sketch", [None, 4])
def test_wav2vec2s_masked_frames_give_each_example_its_own_part_of_the_mask_embedding(sketch):
    # It was refused at the first backward ("masked_spec_embed belongs to no layer, and its gradient is not
    # the sum of the per-example parts"): Wav2Vec2Config's default mask_time_prob is 0.05.
    model = _MaskedSpeech().train()
    x = torch.randn(3, 600, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    sampler, handle, spy = watched(model, sketch=sketch)
    _ce(model(x), y).backward()
    handle.flush()
    grads = _own_gradients(model, x, y, _ce)
    assert_rows(spy.rows[0], handle.project(grads))
    assert float(grads["m.masked_spec_embed"].abs().min(1).values.min()) > 0  # every clip masks some frames


_ENCODER = dict(
    vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=20, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    pad_token_id=0, attn_implementation="eager",
)  # fmt: skip


_DEBERTA = {
    # DeBERTa-v3's layout: the relative-embedding table normalized by the encoder's LayerNorm (a layer called
    # on a parameter), projected by the attention's own query and key layers (share_att_key), the heads'
    # projections tiled over the batch by repeat into batched products with the queries and keys.
    "v3": dict(pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm"),
    # DeBERTa-v2's: the table sliced and projected by layers of their own (pos_key_proj, pos_query_proj).
    "v2": dict(pos_att_type=["p2c", "c2p"]),
    "c2p_only": dict(pos_att_type=["c2p"], share_att_key=True, position_buckets=-1),
}


def _deberta(layout: str, dropout: float = 0.0) -> nn.Module:
    cfg = transformers.DebertaV2Config(
        **{**_ENCODER, "pad_token_id": None, "hidden_dropout_prob": dropout}, relative_attention=True,
        max_relative_positions=16, pooler_dropout=0.0, pooler_hidden_size=16,
        **{"position_buckets": 8, **_DEBERTA[layout]},
    )  # fmt: skip
    model = _off_one(_Logits(lambda: transformers.DebertaV2ForSequenceClassification(cfg))).train()
    with torch.no_grad():  # weights large enough that the relative table's gradient is far from zero
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    return model


@pytest.mark.parametrize("sketch", [None, 4])
@pytest.mark.parametrize("layout", sorted(_DEBERTA))
def test_deberta_relative_positions_give_exact_rows(layout, sketch):
    # The table is used by its weight, never looked up, and every layer projects it with Linear layers
    # called on a tensor the batch shares (capture/shared.py); each example's part is taken where the
    # projections are tiled over the batch, and pulled back through the projections, the slice and the
    # LayerNorm to the table.
    model = _deberta(layout)
    ids = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(5))
    rows, expected, grads, handle = one_step(model, ids, torch.tensor([0, 2, 1]), _ce, sketch)
    assert_rows(rows, expected)
    assert float(grads["m.deberta.encoder.rel_embeddings.weight"].abs().max()) > 0.01
    assert torch._C._len_torch_function_stack() == 0
    handle.remove()


def test_deberta_with_its_relative_table_left_out_follows_the_projections_alone():
    # The table and its LayerNorm left out (their per-example gradients are the dear part): the query and
    # key projections' calls on the normalized table, made from parameters alone, are still followed.
    model = _deberta("v3")
    ids = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(5))
    left = ["*.rel_embeddings", "*.encoder.LayerNorm"]
    rows, expected, grads, handle = one_step(model, ids, torch.tensor([0, 2, 1]), _ce, 4, exclude=left)
    assert_rows(rows, expected)
    names = [n for n, _, _ in handle.layers]
    assert (
        "m.deberta.encoder.rel_embeddings" not in names and "m.deberta.encoder.layer.1.attention.self.key_proj" in names
    )
    handle.remove()


@pytest.mark.parametrize("sketch", [None, 4])
def test_convbert_separable_convolutions_raw_bias_added_in_place_gives_exact_rows(sketch):
    # SeparableConv1D adds its raw [C, 1] bias in place (x += self.bias, which torch dispatches as add_):
    # followed as + is. torch.func cannot trace ConvBERT (data-dependent control flow), so the rows are
    # compared with each example's own backward.
    cfg = transformers.ConvBertConfig(**{**_ENCODER, "embedding_size": 16, "conv_kernel_size": 3})
    torch.manual_seed(0)
    model = _off_one(_Logits(lambda: transformers.ConvBertForSequenceClassification(cfg))).train()
    x, y = torch.randint(3, 40, (3, 7), generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1, 2])
    sampler, handle, spy = watched(model, sketch=sketch)
    _ce(model(x), y).backward()
    handle.flush()
    handle.remove()
    grads = _own_gradients(copy.deepcopy(model), x, y)
    bias = "m.convbert.encoder.layer.0.attention.self.key_conv_attn_layer.bias"
    assert float(grads[bias].abs().max()) > 0
    assert_rows(spy.rows[0], handle.project(grads))


def test_deberta_dropout_on_the_relative_embeddings_is_drawn_once_for_the_batch_and_the_rows_follow_it():
    # pos_dropout drops the shared table once for the whole batch: watch() draws that mask itself (as
    # dropout does) and replays the rows with it, so the rows add up to the batch's own gradient.
    torch.manual_seed(0)
    model = _deberta("v3", dropout=0.3)
    ids = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(5))
    sampler, handle, spy = watched(model, sketch=None, loss_reduction="sum")
    _ce(model(ids), torch.tensor([0, 2, 1]), reduction="sum").backward()
    handle.flush()
    whole = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    assert_rows(torch.as_tensor(spy.rows[0]).sum(0, keepdim=True), whole.unsqueeze(0))
    handle.remove()


@pytest.mark.parametrize(
    "make, pattern",
    [
        # WavLM's attention passes its projections' weights to F.multi_head_attention_forward, never calling
        # them (its relative position embedding, a lookup of [frames, frames] ids, is followed now).
        (
            lambda: _Logits(lambda: transformers.WavLMForSequenceClassification(transformers.WavLMConfig(
                **_SPEECH, num_buckets=8, max_bucket_distance=20,
            )), key="input_values"),
            r"attention.out_proj' is used, but the layer was never called",
        ),
    ],
    ids=["wavlm"],
)  # fmt: skip
def test_models_whose_layers_take_what_watch_does_not_follow_are_refused_by_name(make, pattern):
    model = _off_one(make()).train()
    ids = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(5))
    sampler, handle, _ = watched(model, sketch=None)
    with pytest.raises(UnsupportedModelError, match=pattern):
        model(torch.randn(3, 600) if "wavlm" in str(type(model.m)).lower() else ids[:, :6]).sum().backward()
    assert torch._C._len_torch_function_stack() == 0
    handle.remove()


@pytest.mark.parametrize("sketch", [None, 4])
def test_funnels_relative_position_kernel_multiplied_with_the_queries_gives_exact_rows(sketch):
    # Funnel's attention multiplies its position encodings (no example in them) by r_kernel, a parameter of
    # no layer, then takes einsum products of the result with the queries: followed to those products and
    # expanded over the batch's rows there (capture/direct.py). Refused before.
    cfg = transformers.FunnelConfig(
        vocab_size=40, d_model=16, n_head=2, d_head=8, d_inner=32, block_sizes=[1, 1], num_labels=3,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _off_one(_Logits(lambda: transformers.FunnelForSequenceClassification(cfg))).train()
    ids = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(5))
    rows, expected, grads, handle = one_step(model, ids, torch.tensor([0, 1, 2]), _ce, sketch)
    assert_rows(rows, expected)
    direct = [n for n, kind, _ in handle.layers if kind.startswith("parameter of no layer")]
    assert any(n.endswith("r_kernel") for n in direct) and any(n.endswith("r_w_bias") for n in direct)


@pytest.mark.parametrize("sketch", [None, 4])
def test_lora_adapters_of_peft_are_watched_as_the_linear_layers_they_are(sketch):
    # LoRA fine-tuning trains only the adapters: peft wraps each target Linear layer in a module whose
    # lora_A and lora_B are nn.Linear layers (the base layer frozen), so those are the watched layers and
    # the rows are the adapters' per-example gradients. init_lora_weights=False: lora_B starts nonzero, so
    # lora_A's gradients are not all zero.
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(**_DECODER)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0, init_lora_weights=False
    )
    model = _off_one(_Logits(lambda: peft.get_peft_model(transformers.LlamaForCausalLM(cfg), lora)))
    rows, grads, handle = _lm_step(model, sketch)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 12 and all(".lora_" in n for n in trainable)  # 3 targets x 2 layers x (A, B)
    assert len(handle.layers) == 12 and {kind for _, kind, _ in handle.layers} == {"Linear"}
    if sketch is None:
        assert_rows(rows, flat(grads, 3))


def _vision(family: str) -> nn.Module:
    cfg_class, model_class, extra = VISION[family]
    cfg = getattr(transformers, cfg_class)(**{**_VISION, **extra})
    return _Logits(lambda: getattr(transformers, model_class)(cfg), key="pixel_values")


@pytest.mark.parametrize("family", ["qwen2", "opt", "bart", "vit", "dinov2", "t5", "deberta"])
def test_under_bf16_autocast_the_rows_sum_to_the_gradient_in_float32(family):
    # Mixed-precision fine-tuning: the forward (and the forward hooks) under torch.autocast. The rows are
    # float32 sketches of autocast's half-precision inputs and output gradients, so their sum is the batch
    # gradient autocast made up to its own rounding, and no farther from the float32 model's gradient than
    # autocast's is (here as close or closer; the bounds leave room for another CPU's bfloat16 kernels).
    # (T5's relative bias and DeBERTa's relative table: calls on a tensor the batch shares, followed)
    if family in VISION:
        make, x, y, loss_fn = lambda: _vision(family), torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2]), _ce
    elif family == "deberta":
        ids = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(5))
        make, x, y, loss_fn = lambda: _deberta("v3"), ids, torch.tensor([0, 1, 2]), _ce
    elif family == "t5":
        t5 = transformers.T5Config(
            vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
        ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(5))
        make = lambda: _off_one(_Logits(lambda: transformers.T5ForConditionalGeneration(t5), decoder=True))  # noqa: E731
        x, y, loss_fn = ids[:, :-1], ids[:, 1:], _lm_loss
    else:
        ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(5))
        make, x, y, loss_fn = lambda: _causal(family), ids[:, :-1], ids[:, 1:], _lm_loss
    rows, mixed, full = autocast_step(make().train(), x, y, loss_fn, 8)
    assert_rows_follow_autocast(rows, mixed, full, within=0.15, farther=1.5, slack=1e-3)
