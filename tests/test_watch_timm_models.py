"""watch() on timm's vision models: a small model of each family (built from its config, nothing downloaded),
one watched step, and the rows against torch.func's per-example gradients of the whole model, or, where
BatchNorm trains on batch statistics (per-example gradients undefined), the rows' sum against the batch
gradient. Each family brings something of its own: class, distillation and register tokens held by the
model itself (ViT, DeiT), layer scales as modules (DeiT III) or reshaped parameters (ConvNeXt), class
attention on one token (CaiT), BatchNorm with an activation in its forward (EfficientNet, MobileNetV3,
RegNet), affine layers and norms of timm's own (ResMLP, PoolFormer, EdgeNeXt), attention over windows of
every example stacked into one batch (Swin, DaViT, MaxViT), relative-position tables gathered into a
bias over those windows (Swin; MaxViT and CoAtNet, whose tables are held by a module of their own) or
over the batch (EfficientFormer), the last three with BatchNorm in eval mode; a qkv layer's weight passed
to F.linear with a bias concatenated from parameters of no layer (BEiT, EVA). What cannot have
per-example rows is refused with its name: a logit scale clamped and exponentiated, then multiplied with cosine attention logits whose rows' history
is not read (Swin v2)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from conftest import assert_rows_follow_autocast, autocast_step
from test_watch import assert_rows, ce, one_step, watched
from torch import nn
from torchgrab import UnsupportedModelError

timm = pytest.importorskip("timm")

_VIT = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)
_SWIN = dict(img_size=16, patch_size=2, window_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 2))
# family: (timm architecture, keyword arguments that make it small)
EXACT = {
    "vit": ("vit_tiny_patch16_224", _VIT),
    "vit_registers": ("vit_small_patch16_224", {**_VIT, "reg_tokens": 2, "init_values": 0.5}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", _VIT),
    "deit3": ("deit3_small_patch16_224", {**_VIT, "init_values": 0.5}),
    "convnext": ("convnext_atto", {"dims": (8, 16, 16, 16), "depths": (1, 1, 1, 1), "ls_init_value": 0.5}),
    "cait": ("cait_xxs24_224", {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}),
    "mixer": ("mixer", {}),
    "resmlp": ("resmlp", {}),
    "poolformer": ("poolformer", {}),
    "edgenext": ("edgenext_xx_small", {"depths": (1, 1, 1, 1), "dims": (8, 16, 16, 16), "heads": (2, 2, 2, 2)}),
    # F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias))) in the attention's
    # forward, the qkv layer never called; the biases are parameters of no layer, k_bias a buffer of zeros.
    # BEiT's blocks are a ModuleList of the model, which holds the class token. EVA-02 adds rotary positions.
    "beit": ("beit_base_patch16_224", {**_VIT, "init_values": 0.5}),
    "eva": ("eva02_tiny_patch14_224", _VIT),
    # Windows: every example's windows stacked into one batch of windows for the attention, shifted windows
    # with their mask in the second block (Swin), and DaViT's channel attention beside its windows. The
    # rows of the layers on windows are regrouped by example (capture/flatten.py); so are the parts of
    # Swin's relative-position tables, gathered into a bias over every window (capture/direct.py).
    "swin": ("swin_tiny_patch4_window7_224", {**_SWIN, "depths": (2, 2), "drop_path_rate": 0.0}),
    "davit": (
        "davit_tiny",
        {"embed_dims": (8, 16, 16, 16), "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "drop_path_rate": 0.0},
    ),
    # SAM's image encoder: windows padded and stacked, then a global block; its decomposed relative
    # positions multiply the queries (every example's windows and heads stacked) by tables (einsum).
    "sam": (
        "samvit_base_patch16",
        dict(img_size=64, patch_size=8, embed_dim=16, depth=2, num_heads=2, window_size=3, global_attn_indexes=(1,)),
    ),
}
BATCHNORM = {
    "resnet": ("resnet10t", {}),
    "efficientnet": ("efficientnet_b0", {}),
    "mobilenetv3": ("mobilenetv3_small_050", {}),
    "regnet": ("regnetx_002", {}),
    # MaxViT: block and grid attention, each over windows of every example stacked into one batch, with a
    # relative-position module whose forward adds its gathered table to the logits, and whose get_bias
    # the fused attention calls instead; CoAtNet's the same, over each example's whole image.
    "maxvit": ("maxvit_nano_rw_256", {"img_size": 64, "drop_path_rate": 0.0}),
    "coatnet": ("coatnet_nano_rw_224", {"img_size": 32, "drop_path_rate": 0.0}),
    # EfficientFormer: attention biases gathered from a table of offsets, added to each example's logits.
    "efficientformer": (
        "efficientformer_l1",
        {"img_size": 224, "depths": (1, 1, 1, 2), "embed_dims": (8, 8, 8, 16), "num_vit": 1, "drop_path_rate": 0.0},
    ),
}


def _create(arch: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    # Their registered sizes fix the depth and widths: built from the class with the registered layers.
    if arch in ("mixer", "resmlp"):
        from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

        small = dict(num_classes=3, img_size=32, patch_size=8, num_blocks=2, embed_dim=16)
        if arch == "resmlp":
            small.update(block_layer=partial(ResBlock, init_values=0.5), norm_layer=Affine, mlp_ratio=4)
        model = MlpMixer(**small)
    elif arch == "poolformer":  # poolformerv2_s12's layers
        from timm.models.metaformer import GroupNorm1NoBias, MetaFormer

        model = MetaFormer(
            num_classes=3, depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), norm_layers=GroupNorm1NoBias, use_mlp_head=False
        )
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=3, **kw)
    with torch.no_grad():  # norm weights and layer scales off their initial values
        for n, p in model.named_parameters():
            if p.dim() == 1 and any(s in n for s in ("norm", "bn", "gamma", "ls", "alpha", "beta")):
                p.uniform_(0.5, 1.5)
    return model.train()


def _images(size: int, b: int = 3) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func's reference over attention
@pytest.mark.parametrize("sketch", [None, 8])
@pytest.mark.parametrize("family", sorted(EXACT))
def test_each_family_gives_the_per_example_gradients_rows(family, sketch):
    arch, kw = EXACT[family]
    model = _create(arch, **kw)
    x = _images(kw.get("img_size", 32))
    rows, expected, grads, handle = one_step(model, x, torch.tensor([0, 1, 2]), ce, sketch)
    assert_rows(rows, expected)
    if sketch is None:  # every parameter, exactly
        assert handle.width == sum(g[0].numel() for g in grads.values())


@pytest.mark.parametrize("family", sorted(BATCHNORM))
def test_batchnorm_networks_give_contributions_that_add_up_to_the_batch_gradient(family):
    # In training mode each example's BatchNorm rows are its contribution; all rows add up to the batch
    # gradient (times B: a mean loss). With BatchNorm in eval mode they are each example's gradient.
    arch, kw = BATCHNORM[family]
    model = _create(arch, **kw)
    x, y = _images(kw.get("img_size", 32), b=4), torch.tensor([0, 1, 2, 0])
    sampler, handle, spy = watched(model, sketch=8)
    ce(model(x), y).backward()
    handle.flush()
    rows = np.asarray(spy.rows[0], dtype=np.float64)
    batch = {n: p.grad[None] for n, p in model.named_parameters() if p.grad is not None}
    assert_rows(rows.sum(0), handle.project(batch)[0] * 4)
    assert "BatchNorm" in {kind for _, kind, _ in handle.layers}
    handle.remove()
    if family in ("mobilenetv3", "maxvit", "coatnet", "efficientformer"):  # (the sum cannot tell their grouping)
        model = _create(arch, **kw)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        rows, expected, _, _ = one_step(model, x[:3], y[:3], ce, 8)
        assert_rows(rows, expected)


@pytest.mark.parametrize(
    "arch, kw, exclude, match",
    [
        # With q_bias and v_bias left out, the attention holds no parameter of no layer: nothing watches its
        # forward, and the qkv layer's weight gets a gradient from F.linear that no row holds.
        (
            "eva02_tiny_patch14_224",
            _VIT,
            ["q_bias", "v_bias"],
            r"blocks\.\d\.attn\.qkv.* the layer was never called",
        ),
        # Swin v2: the logit scale, clamped and exponentiated, multiplies cosine attention logits (F.normalize
        # of q and k, a norm whose history the reading of rows does not follow).
        (
            "swinv2_tiny_window8_256",
            {**_SWIN, "depths": (1, 1)},
            [],
            r"'layers.0.blocks.0.attn.logit_scale' belongs to no layer.*mul takes it",
        ),
    ],
    ids=["eva", "swinv2"],
)
def test_what_has_no_per_example_rows_is_refused_with_its_name(arch, kw, exclude, match):
    model = _create(arch, **kw)
    leave_out = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in exclude]
    sampler, handle, spy = watched(model, sketch=8, exclude=leave_out)
    with pytest.raises(UnsupportedModelError, match=match):
        ce(model(_images(kw.get("img_size", 32))), torch.tensor([0, 1, 2])).backward()
    handle.flush()
    assert spy.rows == [] and sampler.pending == 64


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("family", ["vit", "beit", "swin", "sam", "resnet"])
def test_under_bf16_autocast_the_rows_sum_to_the_gradient_in_float32(family):
    # Mixed precision (tests/test_watch_hf_models.py has the same test): float32 rows whose sum is the
    # batch gradient autocast made, up to its own rounding, and no farther from the float32 model's than
    # autocast's is. ResNet's BatchNorm in bfloat16 over 3 images moves autocast's gradient far from the
    # float32 model's; the rows follow autocast's.
    arch, kw = {**EXACT, **BATCHNORM}[family]
    model = _create(arch, **kw)
    x, y = _images(kw.get("img_size", 32)), torch.tensor([0, 1, 2])
    rows, mixed, full = autocast_step(model, x, y, ce, 8)
    assert_rows_follow_autocast(rows, mixed, full, within=0.15, farther=1.5, slack=1e-3)
