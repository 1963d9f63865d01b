"""GraBSampler.watch(model): rows formed by layer hooks inside an ordinary loss.backward().

Every check compares the rows the sampler receives with exact per-example gradients from torch.func
(torchgrab.gradients.per_example_gradients) pushed through the same projection (handle.project), with
sketch=None (the rows are the per-example gradients themselves) and a small sketch (random Kronecker
factors, count sketches). Models are tiny: the whole file runs in seconds on two cores.
"""

import contextlib
import copy
import dataclasses
import io
import re
import socket
import types
import warnings
from collections import OrderedDict
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchgrab.capture.watch as watch_module
from conftest import assert_rows_follow_autocast, assert_same_state, save_load
from test_watch_cuda import _model as _cuda_model
from test_watch_cuda import _Tokens as _CudaTokens
from test_watch_cuda import autocast_rows_and_gradients
from torch import nn
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm
from torch.utils.checkpoint import checkpoint
from torchgrab import (
    GraBSampler,
    ShapeError,
    StateDictError,
    UnsupportedInputError,
    UnsupportedModelError,
)
from torchgrab._segments import OuterRows
from torchgrab.capture._compat import top_saved_tensor_hooks, torch_version
from torchgrab.capture.attention import _WatchedForward
from torchgrab.capture.audit import OutsideUses
from torchgrab.capture.eager import _nothing
from torchgrab.capture.layers import COUNT_OUT, FunctionalSketch, LinearSketch
from torchgrab.capture.projection import FoldSketch
from torchgrab.capture.recurrent import StackedDropoutForward, install_stacked
from torchgrab.gradients import per_example_gradients

SKETCHES = [None, 4]
# torch < 2.8 cannot say whether saved-tensor hooks (checkpointing, offloading) are active, so watch() then
# projects every Linear input at its layer's call: the rows are the same, but nothing is held to the
# backward or grouped at the forward's end (capture/watch.py, _saved_tensor_hooks_active).
HOOKS_QUERY = watch_module._TOP_SAVED_TENSOR_HOOKS is not None
needs_hooks_query = pytest.mark.skipif(
    not HOOKS_QUERY, reason="torch < 2.8: inputs are projected at the call, none held or grouped"
)


# ---------------------------------------------------------------------------------------------- helpers
class Spy:
    """Records what the handle hands to the sampler: the rows of every step() and the sizes of skip()."""

    def __init__(self, sampler):
        self.rows = []
        self.factored = []  # per step() call: the rows came as OuterRows
        self.skips = []
        self.kwargs = []
        step, skip = sampler.step, sampler._skip

        def spy_step(grads, *args, **kwargs):
            # Rows handed over by their factors (a lone Linear layer's) are recorded as the rows they are.
            self.factored.append(isinstance(grads, OuterRows))
            rows = grads.expand() if isinstance(grads, OuterRows) else grads
            self.rows.append(np.array(rows, dtype=np.float32, copy=True))
            self.kwargs.append(kwargs)
            return step(grads, *args, **kwargs)

        def spy_skip(rows):
            self.skips.append(int(rows))
            return skip(rows)

        sampler.step = spy_step  # instance attributes: the handle calls sampler.step(...) through them
        sampler._skip = spy_skip  # (sampler.skip goes through it too)

    def steps(self, sizes):
        """The rows split into consecutive steps of these sizes (the handle may feed several steps in
        one sampler.step call: the kernels take rows in order, so that changes no order)."""
        rows = np.concatenate(self.rows) if self.rows else np.zeros((0, 0), np.float32)
        assert rows.shape[0] == sum(sizes), (rows.shape, sizes)
        return np.split(rows, np.cumsum(sizes)[:-1])


def watched(model, n=64, sketch=None, ordering="grab", seed=0, **kwargs):
    """A sampler over n examples, iterated so that n indices are pending, watching `model`."""
    sampler = GraBSampler(n=n, ordering=ordering, seed=seed)
    it = iter(sampler)
    for _ in range(n):
        next(it)
    handle = sampler.watch(model, sketch=sketch, **kwargs)
    return sampler, handle, Spy(sampler)


def exact_rows(handle, model, loss_fn, x, y):
    grads, _ = per_example_gradients(model, loss_fn, x, y)
    return handle.project(grads), grads


def assert_rows(actual, expected, rtol=1e-4):
    actual = torch.as_tensor(np.asarray(actual), dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 0, "a test whose expected rows are all zero cannot fail"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)
    # Column by column too: a layer whose gradients are small beside another's (the attention projections
    # of a model at initialization) has columns the tolerance above lets be anything, zero included. Each
    # column is held to a tenth of a percent of its own scale (float32 rounding of sums that cancel stays
    # below that), columns below 1e-4 of the largest to that floor.
    if expected.dim() == 2:
        cols = expected.abs().amax(0).clamp_min(1e-4 * scale)
        err = (actual - expected).abs() - rtol * expected.abs()
        bad = (err > 1e-3 * cols).any(0)
        if bool(bad.any()):
            j = bad.nonzero().flatten()
            raise AssertionError(
                f"{len(j)} of {expected.shape[1]} columns (first {j[:8].tolist()}) differ by more than 0.1% of "
                f"their own scale ({float(cols[j].min()):.3g} to {float(cols[j].max()):.3g}; the largest column "
                f"{scale:.3g}): actual up to {float(actual[:, j].abs().max()):.3g}"
            )


def flat(grads, b):
    """The per-example gradients [B, d] in parameter order (what sketch=None rows must be)."""
    return torch.cat([g.reshape(b, -1) for g in grads.values()], dim=1)


def no_hooks(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, m
        assert not m._backward_hooks and not m._backward_pre_hooks, m
    for p in model.parameters():
        assert not p._backward_hooks, p.shape


def refused(model, error, match, sampler=None, **kwargs):
    """watch(model, **kwargs) raises ``error`` (its message matching ``match``), leaves no hook on the
    model and no new handle on the sampler; returns the message."""
    sampler = GraBSampler(n=8) if sampler is None else sampler
    before = list(sampler._watchers)
    with pytest.raises(error, match=match) as err:
        sampler.watch(model, **kwargs)
    no_hooks(model)
    assert sampler._watchers == before
    return str(err.value)


def one_step(model, x, y, loss_fn, sketch, reduction="mean", **kwargs):
    """One watched training step; returns (rows the sampler got, exact projected rows, grads, handle)."""
    sampler, handle, spy = watched(model, sketch=sketch, loss_reduction=reduction, **kwargs)
    loss_fn(model(x), y, reduction=reduction).backward()
    handle.flush()
    assert len(spy.rows) == 1 and spy.skips == []
    assert sampler.pending == 64 - x.shape[0]
    expected, grads = exact_rows(handle, model, loss_fn, x, y)
    return spy.rows[0], expected, grads, handle


def mse(out, y, reduction="mean"):
    return F.mse_loss(out, y, reduction=reduction)


def ce(out, y, reduction="mean"):
    return F.cross_entropy(out, y, reduction=reduction)


# ---------------------------------------------------------------------------------------------- layer kinds
class Mean(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.mean(self.dim)


def _frozen_weight_linear():
    lin = nn.Linear(6, 5)
    lin.weight.requires_grad_(False)
    return nn.Sequential(lin, nn.Tanh(), nn.Linear(5, 3))


def _conv2d(**kw):
    def make():
        return nn.Sequential(nn.Conv2d(4, 6, 3, **kw), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))

    return make


def _conv_transpose(dims, c_in=4, c_out=6, **kw):
    conv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]

    def make():
        return nn.Sequential(conv(c_in, c_out, 3, **kw), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))

    return make


class UpTo(nn.Module):
    """A transposed convolution called with output_size= (a U-Net's decoder matching its skip's size)."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.up(x, output_size=(8, 8))).flatten(1))


class InPlaceAfter(nn.Module):
    """Watched layers whose outputs are written in place afterwards (ReLU(inplace=True), an in-place scale):
    the hooks must see the gradient of each layer's output as the layer produced it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))).mul_(2.0)


LAYER_CASES = {
    # name: (model factory, input shape after the batch, target: "class" or an output shape)
    "linear": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), (6,), "class"),
    "linear_no_bias": (lambda: nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)), (6,), "class"),
    "linear_3d": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)), (4, 6), (4, 3)),
    "linear_frozen_weight": (_frozen_weight_linear, (6,), "class"),
    "linear_output_written_in_place": (InPlaceAfter, (6,), "class"),
    "conv1d": (
        lambda: nn.Sequential(nn.Conv1d(3, 5, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)),
        (3, 8),
        "class",
    ),
    "conv2d_geometry": (_conv2d(stride=2, padding=1, dilation=2, groups=2), (4, 7, 7), "class"),
    "conv2d_depthwise": (
        lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3)),
        (4, 4, 4),
        "class",
    ),
    "conv2d_reflect": (_conv2d(padding=1, padding_mode="reflect"), (4, 5, 5), "class"),
    "conv2d_same": (_conv2d(padding="same", dilation=2), (4, 5, 6), "class"),
    "conv3d": (
        lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(24, 3)),
        (2, 3, 3, 3),
        "class",
    ),
    "conv_transpose1d": (_conv_transpose(1, stride=2, output_padding=1), (4, 5), "class"),
    # groups, dilation, padding, an output_padding: the gradient side's patches at the input's positions
    "conv_transpose2d_geometry": (
        _conv_transpose(2, stride=2, padding=1, dilation=2, groups=2, output_padding=1),
        (4, 4, 5),
        "class",
    ),
    # an output_padding past the stride (allowed below the dilation): the adjoint reaches past the input
    "conv_transpose2d_padding_past_stride": (_conv_transpose(2, dilation=3, output_padding=2), (4, 3, 3), "class"),
    # many input channels: with sketch=4 the output gradient is projected by a convolution (sketch first)
    "conv_transpose2d_wide": (_conv_transpose(2, c_in=16, c_out=2, stride=2, bias=False), (16, 3, 3), "class"),
    "conv_transpose2d_output_size": (UpTo, (3, 4, 4), "class"),
    "conv_transpose3d": (_conv_transpose(3, c_in=2, c_out=3, stride=(1, 2, 1)), (2, 2, 3, 2), "class"),
    "prelu": (lambda: nn.Sequential(nn.Linear(6, 5), nn.PReLU(), nn.Linear(5, 3)), (6,), "class"),
    "prelu_channels": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 2), nn.PReLU(4), nn.Flatten(), nn.Linear(36, 3)),
        (2, 4, 4),
        "class",
    ),
    "layernorm": (lambda: nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)), (4, 6), (4, 3)),
    "rmsnorm": (lambda: nn.Sequential(nn.Linear(6, 5), nn.RMSNorm(5), nn.Linear(5, 3)), (6,), "class"),
    "groupnorm": (
        lambda: nn.Sequential(nn.Conv2d(2, 6, 2), nn.GroupNorm(3, 6), nn.Flatten(), nn.Linear(54, 3)),
        (2, 4, 4),
        "class",
    ),
    "instancenorm2d": (
        # (no bias in the convolution: the norm removes each channel's shift, so its gradient is zero, and
        # torch.func's float32 noise there fails the column check)
        lambda: nn.Sequential(
            nn.Conv2d(2, 6, 2, bias=False), nn.InstanceNorm2d(6, affine=True), nn.Flatten(), nn.Linear(54, 3)
        ),
        (2, 4, 4),
        "class",
    ),
    "instancenorm1d": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 6, 2, bias=False), nn.InstanceNorm1d(6, affine=True), nn.Flatten(), nn.Linear(30, 3)
        ),
        (2, 6),
        "class",
    ),
}


def _data(shape, target, b=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=g)
    y = torch.randint(0, 3, (b,), generator=g) if target == "class" else torch.randn(b, *target, generator=g)
    return x, y


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_rows_equal_projected_per_example_gradients(case, sketch):
    make, shape, target = LAYER_CASES[case]
    torch.manual_seed(0)
    model = make()
    x, y = _data(shape, target)
    model(x[:1])  # materializes lazy layers before watch() sees the parameters
    if any(p.requires_grad is False for p in model.parameters()):
        assert case == "linear_frozen_weight"
    loss_fn = ce if target == "class" else mse
    rows, expected, grads, handle = one_step(model, x, y, loss_fn, sketch)
    assert_rows(rows, expected)
    assert rows.shape == (5, handle.width)
    if sketch is None:
        # Exact: the rows are the per-example gradients (and project() is the identity).
        assert_rows(rows, flat(grads, 5))
        assert handle.width == sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        assert handle.width < sum(p.numel() for p in model.parameters() if p.requires_grad) or case == "linear_no_bias"


@pytest.mark.parametrize(
    "case,sketch,gradient_first",
    [
        ("conv_transpose2d_wide", None, True),
        ("conv_transpose2d_wide", 4, False),
        ("conv_transpose2d_geometry", 4, True),
        ("conv_transpose2d_padding_past_stride", 4, False),
        ("conv_transpose3d", 4, True),
    ],
)
def test_transposed_convolution_weights_sketched_both_ways(case, sketch, gradient_first):
    # Under the default budget these small layers' weights are left out at sketch=4 (as a convolution's
    # are); without it, both ways of forming the block: the output gradient's patches times the input,
    # then projected (narrow layers), or the output gradient's convolution with P_in (wide ones).
    make, shape, _ = LAYER_CASES[case]
    torch.manual_seed(0)
    model = make()
    x, y = _data(shape, "class")
    model(x[:1])
    rows, expected, _, handle = one_step(model, x, y, ce, sketch, budget=None)
    sk = handle._sketches[model[0]]
    assert sk.train_w and sk.gradient_first is gradient_first
    assert (sk.k_in < sk.m) is (sketch is not None)
    assert_rows(rows, expected)


def test_frozen_weight_gives_bias_columns_only():
    torch.manual_seed(0)
    model = _frozen_weight_linear()
    sampler, handle, _ = watched(model)
    kinds = {name: cols for name, _, cols in handle.layers}
    assert kinds == {"0": 5, "2": 5 * 3 + 3}


class Bag(nn.Module):
    def __init__(self, vocab=10, dim=6, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.out = nn.Linear(dim, 3)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)).mean(1))


def _embedding_path(monkeypatch, path):
    """An embedding's rows by its dense table of signed one-hot rows (the default at these sizes) or by the
    scatter-add it takes past ONEHOT_TABLE_MAX: both must be the same projection of the gradient."""
    from torchgrab.capture import layers

    if path == "scatter":
        monkeypatch.setattr(layers, "ONEHOT_TABLE_MAX", 0)


@pytest.mark.parametrize("path", ["table", "scatter"])
@pytest.mark.parametrize("sketch", SKETCHES)
def test_embedding_with_padding_idx(sketch, path, monkeypatch):
    _embedding_path(monkeypatch, path)
    torch.manual_seed(0)
    model = Bag()
    ids = torch.tensor([[0, 3, 3, 9], [1, 2, 0, 0], [5, 5, 5, 5], [8, 0, 7, 6]])
    y = torch.tensor([0, 1, 2, 1])
    rows, expected, grads, handle = one_step(model, ids, y, ce, sketch)
    assert_rows(rows, expected)
    assert bool(handle._sketches[model.emb]._onehots) == (path == "table")
    vocab_cols = dict((n, c) for n, _, c in handle.layers)["emb"]
    if sketch is None:
        assert_rows(rows, flat(grads, 4))
        assert vocab_cols == 10 * 6
        # padding_idx's row of the embedding gradient is zero in every example's row
        assert np.all(rows[:, :6] == 0)
    else:
        assert vocab_cols == 4 * 4  # count sketch of the vocabulary (10 > 4) x projected features


@pytest.mark.parametrize("path", ["table", "scatter"])
def test_embedding_count_sketch_is_not_the_identity(path, monkeypatch):
    # The count sketch sums buckets with signs: two examples that use different ids can collide, but the
    # rows must still be the same linear map as project(), and not the identity on the first k ids.
    _embedding_path(monkeypatch, path)
    torch.manual_seed(0)
    model = Bag(vocab=50, dim=3, padding_idx=None)
    ids = torch.randint(0, 50, (6, 5), generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (6,))
    rows, expected, grads, _ = one_step(model, ids, y, ce, sketch=4)
    assert_rows(rows, expected)
    emb = grads["emb.weight"]  # [B, 50, 3]
    assert not torch.allclose(torch.as_tensor(rows[:, :12]), emb[:, :4, :3].reshape(6, -1), atol=1e-3)


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batchnorm_contributions_add_up_to_the_batch_gradient(sketch, reduction):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(20, 3))
    model.train()
    x, y = _data((2, 4, 4), "class", b=6)
    sampler, handle, spy = watched(model, sketch=sketch, loss_reduction=reduction)
    ce(model(x), y, reduction=reduction).backward()
    handle.flush()
    rows = spy.rows[0]
    assert rows.shape == (6, handle.width)
    batch = {n: p.grad.unsqueeze(0) for n, p in model.named_parameters()}
    projected = handle.project(batch)[0]
    factor = 6 if reduction == "mean" else 1
    assert_rows(rows.sum(0, dtype=np.float64), projected * factor)
    # The contributions differ per example (not the batch gradient copied B times).
    assert not np.allclose(rows[0], rows[1], atol=1e-4)
    # BatchNorm's own columns are each example's g_b * x_hat_b: they too add up to BN's gradients.
    bn = next(i for i, (name, _, _) in enumerate(handle.layers) if name == "1")
    start = sum(c for _, _, c in handle.layers[:bn])
    cols = handle.layers[bn][2]
    assert cols == 2 * (5 if sketch is None else sketch)  # weight and bias: 5 channels, projected when 5 > k
    if sketch is None:
        bn_grads = torch.cat([batch["1.weight"][0], batch["1.bias"][0]])
        assert_rows(rows[:, start : start + cols].sum(0, dtype=np.float64), bn_grads * factor)
    else:
        assert_rows(rows[:, start : start + cols].sum(0, dtype=np.float64), projected[start : start + cols] * factor)


class _BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: BatchNorm's own F.batch_norm call and an activation, in one forward."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        bn_training = self.training or self.running_mean is None
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, bn_training, self.momentum, self.eps
        )
        return self.act(x)


def _conv_bn(act_class):
    torch.manual_seed(0)
    bn = [("bn", _BatchNormAct(5))] if act_class else [("bn", nn.BatchNorm2d(5)), ("act", nn.ReLU())]
    layers = [("conv", nn.Conv2d(2, 5, 3)), *bn, ("flat", nn.Flatten()), ("head", nn.Linear(20, 3))]
    model = nn.Sequential(OrderedDict(layers))  # the same names, so the same sketches
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("sketch", SKETCHES)
def test_a_batchnorm_class_with_an_activation_in_its_forward_gives_batchnorms_rows(sketch):
    # timm's BatchNormAct2d (EfficientNet, MobileNetV3, RegNet) was refused: its output is not BatchNorm's
    # forward. Its F.batch_norm call is recorded: in training mode the same contributions as BatchNorm2d
    # then ReLU, in eval mode each example's gradient; the running statistics are updated once.
    x, y = _data((2, 4, 4), "class", b=6)
    runs = {}
    for act_class in (False, True):
        model = _conv_bn(act_class).train()
        sampler, handle, spy = watched(model, sketch=sketch)
        ce(model(x), y).backward()
        handle.flush()
        runs[act_class] = (spy.rows[0], model.bn.running_mean.clone(), [k for _, k, _ in handle.layers])
    assert_rows(runs[True][0], runs[False][0])
    assert torch.equal(runs[True][1], runs[False][1])
    assert runs[True][2] == runs[False][2] and runs[True][2][1:] == ["BatchNorm", "Linear"]
    model = _conv_bn(True).train()
    model.bn.eval()
    rows, expected, grads, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)


class _GroupNormAct(nn.GroupNorm):
    """timm's GroupNormAct (BiT's ResNetV2): F.group_norm with its own weight, then an activation module."""

    def __init__(self, groups, c):
        super().__init__(groups, c)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class _LayerNormAct2d(nn.LayerNorm):
    """timm's LayerNormAct2d: channels moved last, F.layer_norm over them, moved back, then an activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.GELU()

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("sketch", SKETCHES)
def test_norm_classes_with_an_activation_in_their_forward_give_their_norms_rows(sketch):
    # With a sublayer, torch.func cannot take such a layer on its own, and its output is not its kind's
    # forward: it was refused. Its F.group_norm or F.layer_norm call is recorded.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), _GroupNormAct(2, 4), _LayerNormAct2d(4), nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        for m in (model[1], model[2]):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    x, y = _data((2, 4, 4), "class", b=5)
    rows, expected, grads, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    assert [kind for _, kind, _ in handle.layers][1:3] == ["GroupNorm", "LayerNorm"]


# ---------------------------------------------------------------------------------------------- reductions
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mean_and_sum_reduction_give_each_examples_own_gradient(sketch, reduction):
    model = _mlp()
    x, y = _data((6,), "class", b=7)
    rows, expected, _, _ = one_step(model, x, y, ce, sketch, reduction=reduction)
    assert_rows(rows, expected)


def test_wrong_reduction_is_off_by_the_batch_size():
    # Guards the comparison itself: a sum-reduced loss declared as "mean" is B times too large.
    model = _mlp()
    x, y = _data((6,), "class", b=7)
    sampler, handle, spy = watched(model, sketch=4, loss_reduction="mean")
    ce(model(x), y, reduction="sum").backward()
    handle.flush()
    expected, _ = exact_rows(handle, model, ce, x, y)
    assert_rows(spy.rows[0], expected * 7)


# ---------------------------------------------------------------------------------------------- loop features
@pytest.mark.parametrize("sketch", SKETCHES)
def test_gradient_accumulation_gives_each_micro_batchs_rows(sketch):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler, handle, spy = watched(model, sketch=sketch)
    (x1, y1), (x2, y2) = _data((6,), "class", b=4, seed=1), _data((6,), "class", b=3, seed=2)
    e1, _ = exact_rows(handle, model, ce, x1, y1)
    e2, _ = exact_rows(handle, model, ce, x2, y2)
    ce(model(x1), y1).backward()
    ce(model(x2), y2).backward()  # accumulates into .grad
    opt.step()
    opt.zero_grad()
    x3, y3 = _data((6,), "class", b=5, seed=3)
    e3, _ = exact_rows(handle, model, ce, x3, y3)
    ce(model(x3), y3).backward()
    handle.flush()
    for got, want in zip(spy.steps([4, 3, 5]), [e1, e2, e3]):
        assert_rows(got, want)
    assert sampler.pending == 64 - 12


def test_gradient_accumulation_with_a_divided_loss_scales_the_rows():
    # loss / accumulation_steps: each row is that fraction of its gradient (the sign rule is scale-free).
    model = _mlp()
    sampler, handle, spy = watched(model, sketch=4)
    x1, y1 = _data((6,), "class", b=4, seed=1)
    e1, _ = exact_rows(handle, model, ce, x1, y1)
    (ce(model(x1), y1) / 2).backward()
    (ce(model(x1), y1) / 2).backward()
    handle.flush()
    first, second = spy.steps([4, 4])
    assert_rows(first, e1 / 2)
    assert_rows(second, e1 / 2)


def _scaler(**kw):
    try:
        scaler = torch.amp.GradScaler("cpu", **kw)
        scaler.scale(torch.ones((), requires_grad=True))
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.amp.GradScaler('cpu') unavailable: {e}")
    return torch.amp.GradScaler("cpu", **kw)


@pytest.mark.parametrize("sketch", SKETCHES)
def test_grad_scaler_rows_are_unscaled_and_inf_steps_are_skipped(sketch):
    model = _mlp()
    twin = copy.deepcopy(model)
    # growth_interval=1: the scale doubles after every good step, so a step's rows, fed after the next
    # scaler.update(), must be divided by the scale of their own backward.
    scaler = _scaler(init_scale=2.0**12, growth_interval=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler, handle, spy = watched(model, sketch=sketch, scaler=scaler)
    batches = [_data((6,), "class", b=4, seed=s) for s in (1, 2, 3)]
    bad_x = batches[1][0].clone()
    bad_x[0, 0] = float("inf")  # this step's gradients are inf/NaN: GradScaler skips it
    batches[1] = (bad_x, batches[1][1])
    expected = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with scaler= given, a skipped step does not warn
        for k, (x, y) in enumerate(batches):
            if k != 1:
                expected.append(exact_rows(handle, model, ce, x, y)[0])
            scale_before = scaler.get_scale()
            scaler.scale(ce(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            if k == 1:
                assert scaler.get_scale() < scale_before  # the scaler saw the overflow
        handle.flush()
    for got, want in zip(spy.steps([4, 4]), expected):
        assert_rows(got, want)  # unscaled: a scale of 4096 would be far off
    assert spy.skips == [4]
    assert handle.skipped_steps == 1
    assert sampler.pending == 64 - 12
    # The unscaled loop on an identical model gives the same first rows.
    s2, h2, spy2 = watched(twin, sketch=sketch)
    x, y = batches[0]
    ce(twin(x), y).backward()
    h2.flush()
    assert_rows(spy.rows[0], torch.as_tensor(spy2.rows[0]))


def test_non_finite_step_without_scaler_warns_and_skips():
    model = _mlp()
    sampler, handle, spy = watched(model, sketch=4)
    x, y = _data((6,), "class", b=4)
    x[1, 2] = float("nan")
    ce(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="not finite"):
        handle.flush()
    assert spy.rows == [] and spy.skips == [4]
    assert handle.skipped_steps == 1 and sampler.pending == 60


class MaskedTokens(nn.Module):
    """Token embeddings, a per-token Linear and LayerNorm, a masked mean over the tokens, a classifier."""

    def __init__(self, vocab=12, dim=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)  # no padding_idx: only the mask keeps padding out
        self.tok = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, ids, mask):
        h = self.norm(torch.tanh(self.tok(self.emb(ids))))
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.out((h * m).sum(1) / m.sum(1))


@pytest.mark.parametrize("sketch", SKETCHES)
def test_padded_sequences_with_a_mask_match_unpadded_passes(sketch):
    torch.manual_seed(0)
    model = MaskedTokens()
    seqs = [[3, 4, 5, 6], [7, 1], [2, 2, 9], [11]]
    y = torch.tensor([0, 1, 2, 1])
    ids = torch.zeros(4, 4, dtype=torch.long)  # padding id 0 is a real, trainable embedding row
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    sampler, handle, spy = watched(model, sketch=sketch)
    ce(model(ids, mask), y).backward()
    for i, s in enumerate(seqs):  # one-example passes of the unpadded sequences
        ce(model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool)), y[i : i + 1]).backward()
    handle.flush()
    steps = spy.steps([4, 1, 1, 1, 1])
    assert_rows(steps[0], torch.as_tensor(np.concatenate(steps[1:])))
    # ... and both are the projected exact gradients of the unpadded examples.
    for i, s in enumerate(seqs):
        grads, _ = per_example_gradients(
            model, lambda o, t: ce(o, t), (torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool)), y[i : i + 1]
        )
        assert_rows(steps[1 + i], handle.project(grads))
    if sketch is None:  # the padding id's embedding row gets nothing from the padded positions
        assert np.all(steps[0][1, :5] == 0) and np.all(steps[0][3, :5] == 0)
        assert np.any(steps[0][:, :5] == 0)


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)
        self.use_checkpoint = True

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.use_checkpoint and self.reentrant is not None:
            h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        else:
            h = self.block(h)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_counts_each_layer_once(reentrant, sketch):
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    x, y = _data((6,), "class", b=5)
    sampler, handle, spy = watched(model, sketch=sketch)
    for use in (True, False, True):
        model.use_checkpoint = use
        ce(model(x), y).backward()
    handle.flush()
    assert sampler.pending == 64 - 15
    model.use_checkpoint = False
    expected, _ = exact_rows(handle, model, ce, x, y)
    steps = spy.steps([5, 5, 5])
    for got in steps:
        assert_rows(got, expected)  # a recomputed forward counted twice would double the block's columns
    np.testing.assert_allclose(steps[0], steps[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpoint_recompute_does_no_sketch_work_twice(reentrant, sketch):
    # The recomputed forward inside the backward must not project a layer's input again: under
    # non-reentrant checkpointing its outputs' hooks never fire, so the rows above stay right, but the
    # projection would cost a second forward's sketch work and hold its input until the step ends.
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    x, y = _data((6,), "class", b=5)
    _, handle, _ = watched(model, sketch=sketch)
    calls = {}
    save = handle._save  # projects the input now, or holds it for the backward's grouped projection

    def counted(step, sk, mod, inp, in_backward):
        calls[sk.name] = calls.get(sk.name, 0) + 1
        return save(step, sk, mod, inp, in_backward)

    handle._save = counted
    per_use = []
    for use in (False, True):
        calls.clear()
        model.use_checkpoint = use
        ce(model(x), y).backward()
        per_use.append(dict(calls))
    assert per_use[0] and per_use[1] == per_use[0]


@pytest.mark.parametrize("sketch", SKETCHES)
def test_no_grad_and_eval_forwards_are_ignored(sketch):
    model = _mlp()
    x, y = _data((6,), "class", b=4)
    xv, yv = _data((6,), "class", b=3, seed=9)
    sampler, handle, spy = watched(model, sketch=sketch)
    expected, _ = exact_rows(handle, model, ce, x, y)
    with torch.no_grad():
        model(xv)  # validation before any training step
    ce(model(x), y).backward()
    with torch.no_grad():
        model(xv)  # validation right after a step: the step's rows are still fed, once
    model.eval()
    ce(model(xv), yv).backward()  # eval mode, even with a backward: no rows
    model(xv)
    model.train()
    handle.flush()
    assert len(spy.rows) == 1 and spy.skips == []
    assert_rows(spy.rows[0], expected)
    assert sampler.pending == 64 - 4


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # the no_grad forward's checkpoint
@pytest.mark.parametrize("reentrant", [None, True])
def test_no_grad_forward_between_a_forward_and_its_backward_is_ignored(reentrant):
    # Pseudo-labels or a validation batch computed under no_grad after the training forward and before
    # its backward: the training step's rows are kept (not dropped, which would also shift every
    # later row onto the wrong indices), also when the backward recomputes a reentrant checkpoint.
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    (x, y), (x2, y2) = _data((6,), "class", b=4), _data((6,), "class", b=3, seed=5)
    sampler, handle, spy = watched(model, sketch=4)
    model.use_checkpoint = False
    e1, _ = exact_rows(handle, model, ce, x, y)
    model.use_checkpoint = True
    loss = ce(model(x), y)
    with torch.no_grad():
        model(x2)
    loss.backward()
    model.use_checkpoint = False
    e2, _ = exact_rows(handle, model, ce, x2, y2)
    model.use_checkpoint = True
    ce(model(x2), y2).backward()
    handle.flush()
    first, second = spy.steps([4, 3])
    assert_rows(first, e1)
    assert_rows(second, e2)
    assert sampler.pending == 57


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("reentrant", [None, True])
def test_eval_forward_with_grad_between_a_forward_and_its_backward_is_ignored(reentrant):
    # A validation batch in eval mode with grad enabled (no no_grad) between the training forward and
    # its backward: its layers are skipped and the training step's rows are kept.
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    (x, y), (xv, _) = _data((6,), "class", b=4), _data((6,), "class", b=3, seed=5)
    sampler, handle, spy = watched(model, sketch=4)
    model.use_checkpoint = False
    expected, _ = exact_rows(handle, model, ce, x, y)
    model.use_checkpoint = True
    loss = ce(model(x), y)
    model.eval()
    model(xv).sum()  # a graph is built, but never backpropagated
    model.train()
    loss.backward()
    handle.flush()
    assert len(spy.rows) == 1
    assert_rows(spy.rows[0], expected)
    assert sampler.pending == 60


@pytest.mark.parametrize("sketch", SKETCHES)
def test_two_forwards_before_one_backward_give_the_summed_rows(sketch):
    # A siamese or contrastive loss: two forwards of the same examples (two views), one backward. Each
    # example's row is the sketch of its gradient through both forwards.
    model = _mlp()
    x, y = _data((6,), "class", b=4)
    x2 = x.flip(1)
    sampler, handle, spy = watched(model, sketch=sketch)

    from torchgrab.gradients import per_example_gradients

    class Pair(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, both):
            a, b = both[:, 0], both[:, 1]
            return self.net(a) + self.net(b)

    grads, _ = per_example_gradients(Pair(model), ce, torch.stack([x, x2], 1), y)
    expected = handle.project({k.removeprefix("net."): v for k, v in grads.items()}).numpy()
    ce(model(x) + model(x2), y).backward()
    handle.flush()
    assert len(spy.rows) == 1 and spy.rows[0].shape[0] == 4
    assert_rows(spy.rows[0], expected)
    assert sampler.pending == 60


@pytest.mark.parametrize("sketch", SKETCHES)
def test_a_training_forward_left_for_one_of_another_batch_size_begins_the_next_step(sketch):
    # A training forward whose graph is dropped before any backward (a loss computed for logging with
    # grad on and the model in training mode): the next training forward of another batch size begins a
    # step of its own, whose rows are its examples' own. (Joined, its layers' inputs were refused as not
    # the step's batch.) It takes nothing from the sampler: it may be of other data.
    model = _mlp()
    x, y = _data((6,), "class", b=4)
    sampler, handle, spy = watched(model, sketch=sketch)
    ce(model(torch.randn(7, 6)), torch.zeros(7, dtype=torch.long)).item()
    for _ in range(2):  # and the step after it too
        ce(model(x), y).backward()
        handle.flush()
        assert_rows(spy.rows[-1], exact_rows(handle, model, ce, x, y)[0])
    assert len(spy.rows) == 2 and spy.skips == [] and sampler.pending == 56


class _Failing(nn.Module):
    """An MLP that raises in its forward, after its first layer, or in its backward, after its last
    layer's gradient, while ``fail`` says so (a batch that runs out of memory, caught by the loop). A
    ``fail`` of "loss" is for the loss (``_failing_loss``)."""

    def __init__(self):
        super().__init__()
        self.net, self.fail = _mlp(), None

    def forward(self, x):
        h = torch.tanh(self.net[0](x))
        if self.fail == "forward":
            raise RuntimeError("out of memory")
        if self.fail == "backward":
            h.register_hook(self._raise)
        return self.net[2](h)

    @staticmethod
    def _raise(g):
        raise RuntimeError("out of memory")


def _failing_loss(model, x, y):
    out = model(x)
    if model.fail == "loss":
        raise RuntimeError("out of memory")
    return ce(out, y)


@pytest.mark.parametrize("ordering", ["grab", "rr"])
@pytest.mark.parametrize(
    "where,tell",
    [("forward", False), ("backward", False), ("forward", True), ("backward", True), ("loss", True), ("before", True)],
)
@pytest.mark.parametrize("at", [1, 4])
@pytest.mark.parametrize("sketch", SKETCHES)
def test_a_batch_skipped_after_an_error_counts_as_unseen_and_the_next_keep_their_indices(
    sketch, at, where, tell, ordering
):
    # The loop catches an error in a batch's forward or backward (out of memory) and goes on with the
    # next batch. That batch gets no rows: its examples count as unseen (skip), and every later batch's
    # rows are its own examples' (before, after an error in the forward they were matched to the
    # skipped batch's indices, one batch off for the rest of the epoch; after one in the backward the
    # batch's partial rows were fed). A twin fed by hand with the exact rows and the skip agrees. An
    # error in the loss, between the forward and the backward, needs the loop to say so
    # (sampler.skip(len(y))); said after an error in the forward or the backward too, it drops that
    # step once; and a batch given up before its forward ("before") is skipped after the rows gathered
    # so far. At the epoch's last batch (at=4) the step is dropped in that epoch, when the next begins.
    torch.manual_seed(0)
    model = _Failing()
    data = torch.randn(20, 6)
    labels = torch.randint(0, 3, (20,))
    sampler = GraBSampler(n=20, ordering=ordering, seed=3)
    handle = sampler.watch(model, sketch=sketch)
    spy = Spy(sampler)
    twin = GraBSampler(n=20, ordering=ordering, seed=3)
    expected = []
    for epoch in range(2):
        order = list(iter(sampler))  # the epoch's order, then its batches of 4 through the model
        assert order == list(iter(twin)) and sorted(order) == list(range(20))
        for k in range(5):
            idx = order[4 * k : 4 * k + 4]
            x, y = data[idx], labels[idx]
            model.fail = where if (epoch, k) == (0, at) else None
            try:
                if model.fail == "before":
                    raise RuntimeError("out of memory")  # (collating the batch, say)
                _failing_loss(model, x, y).backward()
            except RuntimeError as e:
                assert "out of memory" in str(e) and model.fail
                if tell:
                    sampler.skip(len(y))
                twin.skip(4)
            else:
                rows = exact_rows(handle, model, ce, x, y)[0].numpy()
                twin.step(rows) if twin.balances else twin.skip(4)
                expected.append(rows)
            model.zero_grad()
        handle.flush()
    if sampler.balances:
        assert spy.skips == [4]
        assert_rows(np.concatenate(spy.rows), np.concatenate(expected))  # 9 batches' rows, in order
    else:
        assert spy.rows == [] and sum(spy.skips) == 40
    assert handle.dropped_steps == (0 if where == "before" else 1)
    assert list(iter(sampler)) == list(iter(twin))


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_checkpoint_taken_after_a_batch_raised_keeps_that_batch_to_train_on_resume(where):
    # Lightning's on-exception checkpoint, or a loop that saves before it exits: the batch whose forward
    # or backward raised is neither fed nor skipped in the saved state, so the resumed run trains it
    # again (the weights never had its update), as the uninterrupted run would have.
    torch.manual_seed(0)
    model = _Failing()
    data, labels = torch.randn(20, 6), torch.randint(0, 3, (20,))
    sampler = GraBSampler(n=20, seed=3)
    handle = sampler.watch(model, sketch=4)
    it = iter(sampler)
    batches = [[next(it) for _ in range(4)] for _ in range(2)]
    ce(model(data[batches[0]]), labels[batches[0]]).backward()
    model.fail = where
    with pytest.raises(RuntimeError, match="out of memory"):
        _failing_loss(model, data[batches[1]], labels[batches[1]]).backward()
    state = save_load(sampler.state_dict())
    assert sampler.pending == 4 and handle.dropped_steps == 0
    resumed = GraBSampler(n=20, seed=3)
    resumed.load_state_dict(state)
    assert list(iter(resumed))[:4] == batches[1]
    model.fail = None  # and the run that goes on instead drops the batch at its next forward
    _failing_loss(model, data[:4], labels[:4]).backward()
    assert handle.dropped_steps == 1


@pytest.mark.parametrize("sketch", SKETCHES)
def test_one_backward_through_forwards_of_two_batch_sizes_is_refused_and_nothing_is_fed(sketch):
    # A loss over forwards of two batch sizes has no per-example rows: the second forward begins a new
    # step (see above), and the backward that reaches the first one's calls after all is refused, with
    # no rows fed and the sampler as it was. The next step is its own.
    model = _mlp()
    x, y = _data((6,), "class", b=4)
    sampler, handle, spy = watched(model, sketch=sketch)
    state = sampler.state_dict()
    loss = ce(model(x), y) + ce(model(x[:2]), y[:2])
    with pytest.raises(UnsupportedModelError, match="one backward went through training forwards of 4 and 2 examples"):
        loss.backward()
    handle.flush()
    assert spy.rows == [] and sampler.pending == 64
    assert_same_state(sampler.state_dict(), state)
    model.zero_grad()
    ce(model(x), y).backward()
    handle.flush()
    assert len(spy.rows) == 1 and sampler.pending == 60
    assert_rows(spy.rows[0], exact_rows(handle, model, ce, x, y)[0])


@pytest.mark.parametrize("copy_how", ["torch.save", "deepcopy", "AveragedModel"])
def test_a_copy_of_a_watched_model_is_not_watched_and_the_watch_goes_on(copy_how):
    # torch.save(model) pickles the module whole (its hooks and a replaced forward too), copy.deepcopy
    # and AveragedModel (EMA, SWA) deep-copy it. The copy holds hooks that do nothing and the class
    # forward: it computes what the model computes, and its steps feed nothing. Before, torch.save of a
    # watched model raised a PicklingError and a deep copy shared the watch's hooks.
    torch.manual_seed(0)
    model = _Copied()
    x, y = torch.randn(4, 5, 6), torch.randint(0, 3, (4,))
    sampler, handle, spy = watched(model, sketch=4)
    ce(model(x), y).backward()
    if copy_how == "torch.save":
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no "backward hook ... will not be serialized" either)
            torch.save(model, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    elif copy_how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        twin = torch.optim.swa_utils.AveragedModel(model).module
    assert not isinstance(twin.attn.__dict__.get("forward"), _WatchedForward)
    hooks = [h for m in twin.modules() for d in (m._forward_pre_hooks, m._forward_hooks) for h in d.values()]
    assert hooks and all(h is _nothing for h in hooks)  # (the model's own: one per watched layer and more)
    with torch.no_grad():
        model.eval()
        assert torch.equal(twin.eval()(x), model(x))
        model.train()
    twin.train()
    ce(twin(x), y).backward()  # the copy's steps feed nothing
    ce(twin(x), y).backward()
    handle.flush()
    assert len(spy.rows) == 1 and sampler.pending == 60
    ce(model(x), y).backward()  # and the watch goes on
    handle.flush()
    assert len(spy.rows) == 2 and sampler.pending == 56
    assert_rows(spy.rows[-1], exact_rows(handle, model, ce, x, y)[0])


class _Copied(nn.Module):
    """A Linear layer, an nn.MultiheadAttention (whose forward watch() replaces) and a head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((h + a).mean(1))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.norm = nn.LayerNorm(5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = self.norm(torch.tanh(self.shared(x)))
        h = self.norm(torch.tanh(self.shared(h)))  # the same modules again
        return self.out(h)


@pytest.mark.parametrize("sketch", SKETCHES)
def test_module_called_twice_contributes_the_sum(sketch):
    torch.manual_seed(0)
    model = Twice()
    x, y = _data((5,), "class", b=4)
    rows, expected, grads, _ = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    if sketch is None:
        assert_rows(rows, flat(grads, 4))


def test_torch_func_on_a_watched_model_has_no_effect():
    model = _mlp()
    x, y = _data((6,), "class", b=4)
    sampler, handle, spy = watched(model, sketch=4)
    per_example_gradients(model, ce, x, y)  # before any step
    ce(model(x), y).backward()
    expected, _ = exact_rows(handle, model, ce, x, y)  # between a step's backward and its feeding
    per_example_gradients(model, ce, x[:2], y[:2])
    handle.flush()
    assert len(spy.rows) == 1 and spy.skips == []
    assert_rows(spy.rows[0], expected)
    assert sampler.pending == 60


# ---------------------------------------------------------------------------------------------- granularity="batch"
class LSTMModel(nn.Module):
    def __init__(self, num_layers=1, dropout=0.0):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.lstm = nn.LSTM(4, 5, num_layers, batch_first=True, dropout=dropout)
        self.out = nn.Linear(5, 11)

    def forward(self, ids):
        h, _ = self.lstm(self.emb(ids))
        return self.out(h)


def _lm_loss(out, y, reduction="mean"):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)


@pytest.mark.parametrize("sketch", SKETCHES)
def test_batch_granularity_with_a_batch_of_one_on_an_lstm(sketch):
    torch.manual_seed(0)
    model = LSTMModel()
    sampler, handle, spy = watched(model, sketch=sketch, granularity="batch")
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        ids = torch.randint(0, 11, (1, 6), generator=g)
        model.zero_grad()
        _lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
        handle.flush()
        whole = {n: p.grad.unsqueeze(0).clone() for n, p in model.named_parameters()}
        assert_rows(spy.rows[-1], handle.project(whole))
        if sketch is None:
            assert_rows(spy.rows[-1], flat(whole, 1))
        else:
            # Each parameter folded to sketch**2 numbers by its own seeded sparse JL transform.
            n, p = "lstm.weight_hh_l0", dict(model.named_parameters())["lstm.weight_hh_l0"]
            fs = FoldSketch(p.numel(), sketch**2, handle.seed, n)
            start = sum(c for name, _, c in handle.layers[: [x[0] for x in handle.layers].index(n)])
            assert_rows(spy.rows[-1][0, start : start + fs.k], fs(p.grad.reshape(-1)))
    assert len(spy.rows) == 3 and sampler.pending == 61
    assert handle.width == sum(min(p.numel(), (sketch or 10**9) ** 2) for p in model.parameters())


def test_batch_granularity_with_unit_size_equal_to_the_batch():
    torch.manual_seed(0)
    model = _mlp()
    data = torch.randn(12, 6, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(3))
    sampler = GraBSampler(n=12, unit_size=4, seed=5)
    twin = GraBSampler(n=12, unit_size=4, seed=5)
    handle = sampler.watch(model, sketch=3, granularity="batch")
    spy = Spy(sampler)
    orders = []
    for _epoch in range(3):
        order = list(sampler)  # a loader with batch_size == unit_size: each batch is one unit
        orders.append(order)
        tw = list(twin)
        assert tw == order
        for b in range(3):
            idx = order[4 * b : 4 * b + 4]
            assert len({i // 4 for i in idx}) == 1  # one unit per batch
            model.zero_grad()
            ce(model(data[idx]), labels[idx]).backward()
            handle.flush()
            whole = {n: p.grad.unsqueeze(0).clone() for n, p in model.named_parameters()}
            assert_rows(spy.rows[-1], handle.project(whole))
            assert spy.kwargs[-1].get("per_unit") is True
            twin.step(spy.rows[-1], per_unit=True)
        assert sampler.pending == 0
    assert all(sorted(o) == list(range(12)) for o in orders)
    assert list(sampler) == list(twin)


# ---------------------------------------------------------------------------------------------- refused models and arguments
class RawParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.lin(x) / self.temperature


def test_torch_older_than_watchs_floor_is_refused_up_front_and_nothing_is_attached(monkeypatch):
    # watch() reads shapes back from autograd's nodes (Node._input_metadata, torch 2.5); on older torch a
    # model would be refused layer by layer with messages that do not say why, so watch() refuses once.
    from torchgrab.capture import _compat

    assert _compat.torch_version("2.5.1+cu124") == (2, 5)
    assert _compat.torch_version("2.11.0a0+git1234") == (2, 11)
    assert _compat.torch_version("nightly") == (99, 0)  # a build that does not say: taken as new enough
    _compat.check_watch_torch("2.5.0")
    _compat.check_watch_torch("3.0.0")
    with pytest.raises(UnsupportedInputError, match=r"torch 2\.5 or newer \(this process has torch 2\.4\.1\+cu121\)"):
        _compat.check_watch_torch("2.4.1+cu121")
    # This torch made to fall below the floor by raising the floor, not by patching torch.__version__,
    # which other libraries read and cache (a later torch.compile test recompiled after it).
    monkeypatch.setattr(_compat, "WATCH_MIN_TORCH", (99, 0))
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    before = _hook_counts(model)
    sampler = GraBSampler(range(20), ordering="grab", seed=0)
    state = sampler.state_dict()
    mine = re.escape(str(torch.__version__))
    with pytest.raises(UnsupportedInputError, match=rf"torch 99\.0 or newer \(this process has torch {mine}\)"):
        sampler.watch(model)
    assert sampler._watchers == []
    assert _hook_counts(model) == before
    assert_same_state(sampler.state_dict(), state)
    monkeypatch.setattr(_compat, "WATCH_MIN_TORCH", torch_version())
    sampler.watch(model).remove()  # the floor itself is taken


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func over nn.LSTM
@pytest.mark.parametrize("sketch", SKETCHES)
def test_uncovered_parameters_are_refused_and_can_be_excluded(sketch):
    torch.manual_seed(0)
    model = RawParam()
    sampler = GraBSampler(n=8)
    with pytest.raises(UnsupportedModelError, match="temperature"):
        sampler.watch(model, sketch=sketch)
    no_hooks(model)
    assert sampler._watchers == []
    x, y = _data((4,), "class", b=4)
    rows, expected, grads, handle = one_step(model, x, y, ce, sketch, exclude=["temperature"])
    assert_rows(rows, expected)
    assert handle.width == (15 if sketch is None else 4 * 3 + 3)
    if sketch is None:
        assert_rows(rows, torch.cat([grads["lin.weight"].reshape(4, -1), grads["lin.bias"]], 1))

    # A recurrent layer left out keeps its class forward (one with dropout between its layers is run
    # layer by layer only while watched).
    lstm = LSTMModel(num_layers=2, dropout=0.1)
    lstm.lstm.dropout = 0.0  # (the rows of the layers left in are compared with torch.func's, which draws other masks)
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    rows, expected, grads, handle = one_step(lstm, ids, y, _lm_loss, sketch, exclude="lstm")
    assert_rows(rows, expected)
    assert [n for n, _, _ in handle.layers] == ["emb", "out"]


def test_exclude_takes_shell_patterns_of_parameter_and_module_names():
    # Swin has one relative-position table per block: one pattern, "*.relative_position_bias_table",
    # leaves them all out, as its refusal suggests, instead of one name per refusal.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)))
    layers = {}
    for pattern in ("*.1", "2.?", "[02].0"):
        handle = GraBSampler(n=8).watch(model, exclude=[pattern])
        layers[pattern] = [n for n, _, _ in handle.layers]
        handle.remove()
    assert layers == {"*.1": ["0", "2.0"], "2.?": ["0"], "[02].0": ["0", "2.1"]}  # a whole name: not "0"
    with pytest.raises(UnsupportedInputError, match=r"exclude names no trainable parameter .*\['\*.nothing'\]"):
        GraBSampler(n=8).watch(model, exclude=["*.nothing"])
    with pytest.raises(UnsupportedInputError, match="leaves out .* but not the rest of layer"):
        GraBSampler(n=8).watch(model, exclude=["*.bias"])
    no_hooks(model)


class Encoder(nn.Module):
    """Tokens -> a transformer encoder layer (nn.MultiheadAttention inside) -> mean -> classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, ids):
        return self.out(self.block(self.emb(ids)).mean(1))


class Attention(nn.Module):
    """Features -> nn.MultiheadAttention -> mean -> classes, in each way torch applies the packed projection:
    self-attention (one call), a separate key/value input (two calls), three distinct inputs (three)."""

    def __init__(self, mode="self", batch_first=True, mask=None, need_weights=False, dropout=0.0, bias=True):
        super().__init__()
        torch.manual_seed(0)
        self.mode, self.batch_first, self.mask, self.need_weights = mode, batch_first, mask, need_weights
        self.inp = nn.Linear(6, 8)
        self.mem = nn.Linear(8, 8)
        self.val = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, dropout=dropout, bias=bias)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))  # [B, T, 8]
        q = k = v = h
        if self.mode != "self":
            k = v = torch.tanh(self.mem(h[:, :3]))  # memory of another length (S = 3)
        if self.mode == "qkv":
            v = torch.tanh(self.val(h[:, :3]))
        b, t, s = h.shape[0], h.shape[1], k.shape[1]
        kpm = am = None
        # Masks from the data, not the batch position (torch.func's reference sees one example at a time).
        if self.mask == "padding":  # a bool mask: keys padded where x is large, never the first key
            kpm = torch.cat([torch.zeros(b, 1, dtype=torch.bool), x[:, 1:s, 0] > 0.5], dim=1)
        if self.mask == "float":  # an additive float mask, one per example and head ([B H, T, S])
            am = (-x[:, :t, :s].abs()).repeat_interleave(2, dim=0)
        if self.mask == "causal":
            am = nn.Transformer.generate_square_subsequent_mask(t)
        if not self.batch_first:
            q, k, v = (z.transpose(0, 1) for z in (q, k, v)) if self.mode == "qkv" else (q.transpose(0, 1), None, None)
            if self.mode == "self":
                k = v = q
            elif self.mode == "cross":
                k = v = torch.tanh(self.mem(h[:, :3])).transpose(0, 1)
        o, w = self.mha(
            q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=self.need_weights, is_causal=self.mask == "causal"
        )
        if not self.batch_first:
            o = o.transpose(0, 1)
        if self.need_weights:  # the weights take part in the loss: their gradient reaches q and k
            o = o * (1 + w.sum(-1, keepdim=True).reshape(b, -1, 1)[:, : o.shape[1]])
        return self.out(o.mean(1))


ATTENTION_CASES = [
    {},
    {"batch_first": False},
    {"mask": "padding"},
    {"mask": "causal"},
    {"mask": "causal", "need_weights": True},
    {"mask": "float", "need_weights": True},
    {"mode": "cross", "mask": "padding"},
    {"mode": "cross", "batch_first": False, "need_weights": True},
    {"mode": "qkv", "bias": False},
]


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func over attention
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "self")
@pytest.mark.parametrize("sketch", SKETCHES)
def test_multihead_attention_projections_are_sketched_and_its_outputs_unchanged(case, sketch):
    # nn.MultiheadAttention applies in_proj and out_proj as functions inside its forward: no hook sees
    # them, and out_proj's own hooks never run (its rows were zeros while its weight trained, before
    # such modules were refused). While watched it runs the same ops with the projections recorded: the
    # rows equal the exact per-example gradients through the same projection, and the outputs are
    # torch's own, bit for bit.
    model = Attention(**case)
    x, y = _data((5, 6), "class", b=4)
    before = model(x)
    rows, expected, grads, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    names = [n for n, _, _ in handle.layers]
    assert "mha.in_proj" in names and "mha.out_proj" in names
    assert torch.equal(model(x), before)  # the step's optimizer did not run: same weights, same outputs
    if sketch is None:  # the rows are the per-example gradients of every parameter
        assert_rows(rows, flat(grads, 4))
    handle.remove()
    assert "forward" not in model.mha.__dict__  # torch's forward again
    no_hooks(model)


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_with_dropout_draws_the_same_masks_as_torch(need_weights):
    model = Attention(dropout=0.5, need_weights=need_weights)
    x, _ = _data((5, 6), "class", b=4)
    torch.manual_seed(3)
    before = model(x)
    _, handle, _ = watched(model, sketch=4)
    torch.manual_seed(3)
    assert torch.equal(model(x), before)
    model.eval()  # eval mode runs torch's own forward (its fast path under no_grad): the same outputs
    with torch.no_grad():
        watched_eval = model(x)
        handle.remove()
        assert torch.equal(model(x), watched_eval)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func over attention
@pytest.mark.parametrize("sketch", SKETCHES)
def test_unsupported_attention_and_sequence_first_layers_are_refused_and_the_rest_is_exact(sketch):
    # Separate q/k/v weights (kdim, vdim), add_bias_kv and add_zero_attn are not recorded: such a module's
    # parameters, out_proj's too, are refused, with the advice to leave out the attention module.
    attn = "mha"
    for kwargs in ({"kdim": 5, "vdim": 5}, {"add_bias_kv": True}, {"add_zero_attn": True}):
        model = Attention()
        model.mha = nn.MultiheadAttention(8, 2, batch_first=True, **kwargs)
        for exclude in ([], [f"{attn}.out_proj"]):
            message = refused(model, UnsupportedModelError, "nn.MultiheadAttention", sketch=sketch, exclude=exclude)
            assert f"exclude=['{attn}']" in message
        if "kdim" not in kwargs:  # the rest of the model, exact (kdim's forward needs other inputs)
            x, y = _data((5, 6), "class", b=4)
            rows, expected, _, handle = one_step(model, x, y, ce, sketch, exclude=[attn])
            assert not any(n.startswith(attn) for n, _, _ in handle.layers)
            assert_rows(rows, expected)
    # The model itself an unsupported attention module: no exclude= is advised (it would leave nothing).
    message = refused(
        nn.MultiheadAttention(8, 2, batch_first=True, add_zero_attn=True), UnsupportedModelError, "out_proj"
    )
    assert "exclude=" not in message and "<the model itself>" in message
    # A supported one as the model itself: its layers are named without a prefix.
    handle = GraBSampler(n=8).watch(nn.MultiheadAttention(8, 2, batch_first=True), sketch=sketch)
    assert [n for n, _, _ in handle.layers] == ["in_proj", "out_proj"]
    # The ghost form needs [batch, in] inputs; attention projects tokens.
    refused(Attention(), UnsupportedInputError, "attention projects tokens", per_layer={attn: "ghost"})
    # torch's default layout, batch_first=False: the Linear and norm layers inside see [T, B, E], so
    # their rows would be per position; refused, whatever is excluded inside the layer.
    seq_first = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    for exclude in ([], ["self_attn"]):
        refused(seq_first, UnsupportedModelError, "batch_first=False", sketch=sketch, exclude=exclude)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func over attention
def test_a_transformer_encoder_layer_is_watched_whole_and_rewatching_it_replaces_the_forward():
    model = Encoder()
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 1, 2])
    sampler, first, _ = watched(model, sketch=4, per_layer={"block.self_attn": 3})
    assert dict((n, w) for n, _, w in first.layers)["block.self_attn.in_proj"] == 3 * 3 + 3  # per_layer applies
    second = sampler.watch(model, sketch=4)  # a notebook cell run again: the first handle leaves
    assert first.removed and model.block.self_attn.__dict__["forward"]._torchgrab_owner is second
    spy = Spy(sampler)
    ce(model(ids), y).backward()
    second.flush()
    expected, _ = exact_rows(second, model, ce, ids, y)
    assert_rows(spy.rows[0], expected)
    # Another sampler watching another model that shares this attention module is refused, and nothing
    # of either handle changes.
    other = nn.Sequential(model.block)
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in other.modules()]
    another = GraBSampler(n=8)
    with pytest.raises(UnsupportedModelError, match="already runs another forward"):
        another.watch(other, sketch=4)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in other.modules()] == hooks
    assert another._watchers == [] and sampler._watchers == [second]
    assert model.block.self_attn.__dict__["forward"]._torchgrab_owner is second
    second.remove()
    no_hooks(model)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func over attention
@pytest.mark.parametrize("frozen", ["mha.in_proj", "mha.out_proj", "mha"])
def test_attention_with_a_frozen_projection_records_the_other(frozen):
    # out_proj is a child Linear whose own hooks never run: with the in-projection frozen it must still
    # be recorded by the attention's forward (its rows were zeros); all frozen: torch's forward stays.
    model = Attention()
    for n, p in model.named_parameters():
        if n.startswith(frozen):
            p.requires_grad_(False)
    x, y = _data((5, 6), "class", b=4)
    rows, expected, grads, handle = one_step(model, x, y, ce, None)
    assert_rows(rows, expected)
    assert_rows(rows, flat(grads, 4))
    names = [n for n, _, _ in handle.layers]
    assert ("mha.in_proj" in names) == (frozen == "mha.out_proj")
    assert ("mha.out_proj" in names) == (frozen == "mha.in_proj")
    assert ("forward" in model.mha.__dict__) == (frozen != "mha")


def test_an_attention_module_with_its_own_forward_is_refused_unless_left_out():
    # A forward someone else put on the instance (a user's patch) is never replaced: watch() refuses the
    # module, and leaves it as it is when the module is left out.
    model = Attention()
    patched = model.mha.forward  # a bound method stored on the instance, as a patch would be
    model.mha.forward = patched
    refused(model, UnsupportedModelError, "'mha' already runs another forward", sketch=4)
    handle = GraBSampler(n=8).watch(model, sketch=4, exclude=["mha"])
    assert model.mha.__dict__["forward"] is patched
    handle.remove()
    assert model.mha.__dict__["forward"] is patched


class _Logits(nn.Module):
    """A Hugging Face model (built from a local config, nothing downloaded) returning its logits: its input
    goes in as ``key`` (and as the decoder's ids too, for an encoder-decoder: a test, not a task)."""

    def __init__(self, make, key="input_ids", decoder=False):
        super().__init__()
        torch.manual_seed(0)
        self.m = make()
        self.key, self.decoder = key, decoder

    def forward(self, x):
        return self.m(**{self.key: x}, **({"decoder_input_ids": x} if self.decoder else {})).logits


def _tiny_gpt2():
    """A 2-layer GPT-2: its attention and MLP projections are ``transformers``' Conv1D, its output layer is
    tied to the token embedding, and its position embedding takes ids of batch 1."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=40, n_positions=8, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    return _Logits(lambda: GPT2LMHeadModel(cfg))


def _lm_step(model, sketch):
    """One watched step of a tiny LM on 3 sequences of 6 tokens; its rows checked against torch.func's
    per-example gradients through the same projection. Returns (rows, grads, handle)."""
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(5))
    rows, expected, grads, handle = one_step(model.train(), ids[:, :-1], ids[:, 1:], _lm_loss, sketch)
    assert_rows(rows, expected)
    return rows, grads, handle


@pytest.mark.parametrize("sketch", SKETCHES)
def test_hugging_face_conv1d_layers_of_gpt2_are_sketched_as_linear_layers(sketch):
    # GPT-2's projections are transformers' Conv1D (x @ W + b, W stored [in, out]), no nn.Linear: watch()
    # refused every one of them. They are sketched as the Linear layers they are, matched here against
    # torch.func's per-example gradients of the whole model (the tied output layer and the embeddings too).
    pytest.importorskip("transformers")
    model = _tiny_gpt2()
    rows, grads, handle = _lm_step(model, sketch)
    if sketch is None:  # each Conv1D block in the Linear layout, [out, in]: its weight's gradient transposed
        conv1d = [n + ".weight" for n, kind, _ in handle.layers if kind == "HFConv1D"]
        assert len(conv1d) == 8
        want = {n: g.transpose(1, 2) if n in conv1d else g for n, g in grads.items()}
        assert_rows(rows, flat(want, 3))
    kinds = {n: kind for n, kind, _ in handle.layers}
    assert kinds["m.transformer.h.0.attn.c_attn"] == "HFConv1D" and kinds["m.transformer.h.1.mlp.c_proj"] == "HFConv1D"
    c_attn = model.m.transformer.h[0].attn.c_attn
    assert tuple(c_attn.weight.shape) == (16, 48)  # [in, out]: the layout the rows must not depend on
    widths = {n: w for n, _, w in handle.layers}
    assert widths["m.transformer.h.0.attn.c_attn"] == {None: 48 * 16 + 48, 4: 4 * 4 + 4}[sketch]  # 48 outputs


def _tiny_llama():
    """A 2-layer Llama: Linear projections, rotary positions, grouped key/value heads, and LlamaRMSNorm, a
    norm class of its own (not nn.RMSNorm), its weights moved off 1 so that their gradients depend on them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, attn_implementation="eager", bos_token_id=0,
        eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = _Logits(lambda: LlamaForCausalLM(cfg))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


class _ScaleShift(nn.Module):
    """A user's own layer: y = x * w + tanh(x) * s, two parameters of its own."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.s = nn.Parameter(torch.linspace(-1.0, 1.0, n))

    def forward(self, x, factor=1.0):
        return (x * self.w + torch.tanh(x) * self.s) * factor


class _WithScaleShift(nn.Module):
    def __init__(self, n=6, calls=lambda layer, h: layer(h)):
        super().__init__()
        self.lin, self.scale, self.head = nn.Linear(n, n), _ScaleShift(n), nn.Linear(n, 3)
        self.calls = calls

    def forward(self, x):
        return self.head(self.calls(self.scale, torch.tanh(self.lin(x))))


@pytest.mark.parametrize("sketch", SKETCHES)
def test_a_layer_class_of_its_own_is_sketched_by_torch_func_over_that_layer(sketch):
    # Llama's LlamaRMSNorm (and Mistral's, Qwen's, Gemma's, T5's) is no nn.RMSNorm: watch() refused every
    # Llama. A small leaf layer of a class outside torch now gets each example's gradient of its own
    # parameters by torch.func over that layer alone, projected like a norm's.
    pytest.importorskip("transformers")
    rows, grads, handle = _lm_step(_tiny_llama(), sketch)
    if sketch is None:
        assert_rows(rows, flat(grads, 3))
    kinds = {n: kind for n, kind, _ in handle.layers}
    assert kinds["m.model.norm"] == "LlamaRMSNorm (per example by torch.func)"
    assert sum("torch.func" in k for k in kinds.values()) == 5  # two per block and the final norm
    # A user's layer with two parameters, in a batch-first token model and in a plain one.
    for shape in [(6,), (4, 6)]:
        torch.manual_seed(0)
        model = _WithScaleShift()
        x, y = _data(shape, "class", b=5)
        loss = ce if len(shape) == 1 else (lambda out, y, reduction="mean": ce(out.mean(1), y, reduction=reduction))
        rows, expected, grads, handle = one_step(model, x, y, loss, sketch)
        assert_rows(rows, expected)
        widths = {n: w for n, _, w in handle.layers}
        assert widths["scale"] == 2 * min(6, sketch or 6)
        if sketch is None:
            assert_rows(rows, flat(grads, 5))


class _TorchFuncLayers(nn.Module):
    """Rows that torch.func forms: a user's own layer, a PReLU, and a parameter used through a function of
    it (its part pulled back by torch.func.vjp)."""

    def __init__(self, n=6):
        super().__init__()
        self.lin, self.scale, self.act, self.head = nn.Linear(n, n), _ScaleShift(n), nn.PReLU(n), nn.Linear(n, 3)
        self.shift = nn.Parameter(torch.linspace(-0.5, 0.5, n))

    def forward(self, x):
        return self.head(self.act(self.scale(self.lin(x))) + self.shift.tanh())


@needs_hooks_query  # (torch < 2.8 cannot say which hooks are on, so they cannot be taken off and put back)
@pytest.mark.parametrize("sketch", SKETCHES)
def test_torch_func_rows_from_a_backward_inside_saved_tensor_hooks(sketch):
    # `with save_on_cpu(): loss = ...; loss.backward()` runs watch()'s hooks under saved-tensor hooks, where
    # torch.func refuses to run ("don't yet support saved tensor hooks"): training stopped at the first
    # backward of a model with a layer of its own, a PReLU, or a parameter used through a function. The
    # hooks are taken off autograd's stack while torch.func runs, and put back.
    torch.manual_seed(0)
    model = _TorchFuncLayers()
    x, y = _data((6,), "class")
    _, handle, spy = watched(model, sketch=sketch)
    kinds = {n: kind for n, kind, _ in handle.layers}
    assert "torch.func" in kinds["scale"] and "torch.func" in kinds["act"]
    with torch.autograd.graph.save_on_cpu():
        ce(model(x), y).backward()
        assert top_saved_tensor_hooks() is not None  # still there for the rest of the block
    assert top_saved_tensor_hooks() is None
    handle.flush()
    expected, _ = exact_rows(handle, model, ce, x, y)
    assert_rows(spy.rows[0], expected)


@pytest.mark.parametrize("layer", ["act", "shift"])
def test_torch_func_inside_saved_tensor_hooks_without_the_hooks_query_is_refused_by_name(layer, monkeypatch):
    # torch < 2.8 cannot say which saved-tensor hooks are on, so they stay on while torch.func runs, which
    # then refuses: an UnsupportedModelError naming the layer (or the parameter of no layer) and the ways
    # around it, with the sampler as it was; a backward after the block still works. Run on any torch by
    # hiding the query, as such a torch has none.
    from torchgrab.capture import _compat

    monkeypatch.setattr(_compat, "_TOP_HOOKS", None)
    torch.manual_seed(0)
    model = _TorchFuncLayers()
    x, y = _data((6,), "class")
    sampler, handle, spy = watched(model, exclude=[n for n in ("act", "scale", "shift") if n != layer])
    before = sampler.state_dict()
    with pytest.raises(
        UnsupportedModelError, match=rf"'{layer}'.*torch.func.*saved-tensor hooks.*after the `with` block"
    ):
        with torch.autograd.graph.save_on_cpu():
            ce(model(x), y).backward()
    handle.flush()
    assert spy.rows == [] and spy.skips == []
    assert_same_state(sampler.state_dict(), before)
    model.zero_grad()
    with torch.autograd.graph.save_on_cpu():
        loss = ce(model(x), y)
    loss.backward()
    handle.flush()
    expected, _ = exact_rows(handle, model, ce, x, y)
    assert_rows(spy.rows[0], expected)


class _Squash(nn.Module):
    """y = tanh(x * w): a vector over the features, but not linear in it."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return torch.tanh(x * self.w)


@pytest.mark.parametrize("sketch", SKETCHES)
def test_a_feature_wise_linear_layer_of_its_own_takes_two_plain_forwards_once_torch_func_agrees(sketch):
    # A norm's weight (y = h(x) * w, Gemma's h(x) * (1 + w), a bias) enters its output linearly, feature by
    # feature: each example's gradient is sum_t g * (y(w = 1) - y(w = 0)). The first call computes it both
    # ways and keeps torch.func's; later calls take the plain forwards only where the two agreed.
    x, y = _data((4, 6), "class", b=5)
    loss = lambda out, y, reduction="mean": ce(out.mean(1), y, reduction=reduction)  # noqa: E731
    for layer, featurewise in [(_ScaleShift, True), (_Squash, False)]:
        torch.manual_seed(0)
        model = _WithScaleShift()
        model.scale = layer(6)
        sampler, handle, spy = watched(model, sketch=sketch)
        for part in (slice(0, 3), slice(3, 5)):
            loss(model(x[part]), y[part]).backward()
            handle.flush()
            assert_rows(spy.rows[-1], exact_rows(handle, model, loss, x[part], y[part])[0])
            assert handle._sketches[model.scale].featurewise is featurewise
        handle.remove()
    # A Llama's norms (LlamaRMSNorm, on [batch, tokens, features]) agree, and so do their later rows.
    pytest.importorskip("transformers")
    model = _tiny_llama().train()
    sampler, handle, spy = watched(model, sketch=sketch)
    ids = torch.randint(0, 40, (5, 7), generator=torch.Generator().manual_seed(5))
    for part in (slice(0, 3), slice(3, 5)):
        _lm_loss(model(ids[part, :-1]), ids[part, 1:]).backward()
        handle.flush()
        assert_rows(spy.rows[-1], exact_rows(handle, model, _lm_loss, ids[part, :-1], ids[part, 1:])[0])
    norms = [sk for sk in handle._sketches.values() if isinstance(sk, FunctionalSketch)]
    assert len(norms) == 5 and all(sk.featurewise for sk in norms)


def test_a_layer_of_its_own_called_with_more_than_one_tensor_is_refused_at_its_call():
    # Its forward is replayed on each example with one tensor: a call with more (or with keywords)
    # cannot be, and says so instead of giving rows of another function.
    x, y = _data((6,), "class", b=4)
    for calls in (lambda layer, h: layer(h, 2.0), lambda layer, h: layer(h, factor=2.0)):
        model = _WithScaleShift(calls=calls)
        sampler, handle, spy = watched(model, sketch=4)
        with pytest.raises(UnsupportedModelError, match=r"'scale' \(_ScaleShift\) is sketched by replaying"):
            ce(model(x), y).backward()
        # The refused forward leaves no open step: a corrected call, of another batch, is a step of its own.
        model.calls = lambda layer, h: layer(h)
        rows_before = len(spy.rows)
        ce(model(x[:3]), y[:3]).backward()
        handle.flush()
        assert len(spy.rows) == rows_before + 1 and spy.rows[-1].shape == (3, handle.width)
        assert sampler.pending == 64 - 3
        handle.remove()
    # Too large for per-example gradients of its own: refused at watch() as before, with the advice.
    refused(nn.Sequential(nn.Linear(3, 40_000), _ScaleShift(40_000)), UnsupportedModelError, r"exclude=\['1'\]")
    # Torch's own layers without a sketch (a Bilinear) are not taken by this route.
    refused(nn.Sequential(nn.Bilinear(3, 3, 4)), UnsupportedModelError, r"\['0.bias', '0.weight'\]")


class _ScaledLookup(nn.Embedding):
    """Gemma's, XGLM's and M2M100's scaled word embeddings: nn.Embedding's lookup times a constant."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


class _ShiftedPositions(nn.Embedding):
    """BART's and OPT's learned positions: rows looked up at ids computed from the ones given."""

    def forward(self, ids):
        return super().forward(ids + 2)


class _MatmulLinear(nn.Linear):
    """Falcon's FalconLinear: nn.Linear's function written as a matrix product."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class _OffsetNorm(nn.LayerNorm):
    """A LayerNorm subclass with a forward of its own (y = 2 LN(x) + 1)."""

    def forward(self, x):
        return super().forward(x) * 2.0 + 1.0


class _ReplacedForwards(nn.Module):
    def __init__(self, tok=_ScaledLookup, lin=_MatmulLinear):
        super().__init__()
        self.tok, self.pos = tok(20, 6, padding_idx=0), _ShiftedPositions(10, 6)
        self.norm, self.lin, self.head = _OffsetNorm(6), lin(6, 6), nn.Linear(6, 3)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]).expand_as(ids))
        return self.head(torch.tanh(self.lin(self.norm(h))).mean(1))


@pytest.mark.parametrize("sketch", SKETCHES)
def test_a_layer_class_that_replaces_its_kinds_forward_is_sketched_from_what_its_forward_does(sketch):
    # Gemma's and XGLM's word embeddings scale the lookup and BART's positions look up shifted ids: an
    # nn.Embedding's sketch from their input and output gave rows of another function (Gemma's silently).
    # Their own lookups are recorded; Falcon's x @ W.T + b is found to be nn.Linear's function; a small
    # norm subclass goes to torch.func.
    torch.manual_seed(0)
    model = _ReplacedForwards()
    ids = torch.randint(0, 20, (5, 4), generator=torch.Generator().manual_seed(2))
    rows, expected, grads, handle = one_step(model, ids, torch.tensor([0, 1, 2, 0, 1]), ce, sketch)
    assert_rows(rows, expected)
    if sketch is None:
        assert_rows(rows, flat(grads, 5))
    kinds = {n: kind for n, kind, _ in handle.layers}
    assert kinds == {
        "tok": "Embedding", "pos": "Embedding", "lin": "Linear", "head": "Linear",
        "norm": "_OffsetNorm (per example by torch.func)",
    }  # fmt: skip
    # Later steps record the same way (the first one decided how), in accumulation too.
    handle.remove()
    sampler, handle, spy = watched(model, sketch=sketch)
    for part in (ids[:2], ids[2:]):
        ce(model(part), torch.zeros(len(part), dtype=torch.long), reduction="sum").backward()
    handle.flush()
    want = torch.cat(
        [exact_rows(handle, model, ce, p, torch.zeros(len(p), dtype=torch.long))[0] for p in (ids[:2], ids[2:])]
    )
    assert_rows(spy.rows[0], want * torch.tensor([2.0] * 2 + [3.0] * 3)[:, None])


@pytest.mark.parametrize("sketch", SKETCHES)
def test_hugging_face_scaled_embeddings_and_learned_positions_give_their_own_gradients(sketch):
    # The tiny Gemma (scaled word embedding tied to the output layer, GemmaRMSNorm with weights 1 + w) and
    # BART's decoder (learned positions at ids + 2), against torch.func over the whole model.
    pytest.importorskip("transformers")
    from transformers import BartConfig, BartForCausalLM, GemmaConfig, GemmaForCausalLM

    gemma = GemmaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=16, attn_implementation="eager",
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    bart = BartConfig(
        vocab_size=40, d_model=16, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=32, encoder_layers=2,
        encoder_attention_heads=2, encoder_ffn_dim=32, max_position_embeddings=16, dropout=0.0,
        attn_implementation="eager", bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    for make in (lambda: GemmaForCausalLM(gemma), lambda: BartForCausalLM(bart)):
        model = _Logits(make)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.uniform_(0.5, 1.5)
        rows, grads, handle = _lm_step(model, sketch)
        if sketch is None:
            assert_rows(rows, flat(grads, 3))


class _TwoLookups(nn.Module):
    """An encoder and a decoder embedding over one table (T5's and BART's ``shared``), the second one
    scaling its lookup, and an output layer tied to it."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Embedding(20, 6, padding_idx=0), _ScaledLookup(20, 6)
        self.dec.weight = self.enc.weight
        self.out = nn.Linear(6, 20)
        self.out.weight = self.enc.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.enc(ids).mean(1, keepdim=True) + self.dec(ids.flip(1))))


@pytest.mark.parametrize("sketch", SKETCHES)
def test_embeddings_that_share_one_table_add_their_lookups_into_its_block(sketch):
    # A second Embedding module over the same table was refused ("belongs to both"), so every T5 and BART
    # was. Each lookup (with its own padding_idx and forward) adds into the table's one block of rows.
    torch.manual_seed(0)
    model = _TwoLookups()
    ids = torch.randint(0, 20, (5, 4), generator=torch.Generator().manual_seed(3))
    rows, expected, grads, handle = one_step(model, ids, ids, _lm_loss, sketch)
    assert_rows(rows, expected)
    if sketch is None:
        assert_rows(rows, flat(grads, 5))
    kinds = {n: kind for n, kind, _ in handle.layers}
    assert kinds["dec"] == "Embedding (table of 'enc': added into its columns)"
    handle.remove()
    # Leaving out either lookup leaves out the table, so the other uses with it.
    refused(model, UnsupportedModelError, "no trainable parameter left", exclude=["dec", "out.bias"])


def test_a_layer_class_that_uses_its_weight_otherwise_is_refused_at_its_first_call():
    # A forward that changes the weight before using it, or uses it beside its kind's function, is neither
    # its kind's function nor a set of its calls: refused at the call, naming what it found, and the step
    # the refused forward opened is dropped.
    class _DoubledWeight(nn.Linear):
        def forward(self, x):
            return F.linear(x, self.weight * 2.0, self.bias)

    class _PlusMean(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + self.weight.mean()

    ids = torch.randint(1, 20, (4, 3), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0])
    for model, match in [
        (_ReplacedForwards(lin=_DoubledWeight), r"'lin' is a _DoubledWeight, whose forward replaces Linear's, and it gives its parameters to"),
        (_ReplacedForwards(tok=_PlusMean), r"'tok' is a _PlusMean, whose forward replaces Embedding's, and it gives its parameters to"),
    ]:  # fmt: skip
        sampler, handle, spy = watched(model, sketch=4)
        with pytest.raises(UnsupportedModelError, match=match):
            ce(model(ids), y).backward()
        assert handle._step.forwards == {} and not handle._recording
        handle.remove()
        sampler, handle, spy = watched(model, sketch=4, exclude=[match.split("'")[1]])
        ce(model(ids[:3]), y[:3]).backward()
        handle.flush()
        assert spy.rows[-1].shape == (3, handle.width) and sampler.pending == 64 - 3


class _Tokens(nn.Module):
    """A ViT's embeddings: a class token expanded over the batch, position embeddings added, both
    parameters of this module (which has a sublayer), no layer of their own."""

    def __init__(self, pos="whole"):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.pos = nn.Parameter(torch.randn(1, 6, 6))
        self.how = pos

    def forward(self, x):
        # The class token twice (expand broadcasts its dimension 1 too): its gradient sums both copies.
        h = torch.cat([self.cls.expand(x.shape[0], 2, -1), self.proj(x)], 1)
        if self.how == "slice":  # as many positions as tokens: a slice of the parameter, then broadcast
            return h + self.pos[:, : h.shape[1]]
        if self.how == "sigmoid":  # a function of the parameter alone, then broadcast
            return h + 2.0 * self.pos.sigmoid()
        if self.how == "dropout":  # random: a replay of it from the parameter would draw another mask
            return h + F.dropout(self.pos, 0.5, training=True)
        if self.how == "written":  # a write into what a function of the parameter made: a replay misses it
            pos = self.pos * 2.0
            pos[:, 0] = 0.0
            return h + pos
        return h + self.pos


class _TokenModel(nn.Module):
    def __init__(self, pos="whole", peek=False, reentrant=None):
        super().__init__()
        self.emb, self.head = _Tokens(pos), nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))  # a layer scale, [features] times [B, T, features]
        self.peek = peek
        self.reentrant = reentrant  # None: no checkpointing

    def forward(self, x):
        h = self.emb(x) if self.reentrant is None else checkpoint(self.emb, x, use_reentrant=self.reentrant)
        h = torch.tanh(h) * self.scale
        if self.peek:  # the embeddings' parameter used outside the forward of the module holding it
            h = h + self.emb.pos.sum()
        return self.head(h).mean(1)


@pytest.mark.parametrize("sketch", SKETCHES)
def test_parameters_of_no_layer_broadcast_over_the_batch_give_per_example_rows(sketch):
    # A ViT's class token and position embeddings, a layer scale: parameters of modules with sublayers,
    # used by expand, + and *, were refused (every Hugging Face vision transformer was). Each example's
    # gradient is its slice of the broadcast.
    torch.manual_seed(0)
    model = _TokenModel()
    x, y = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1])
    rows, expected, grads, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    kinds = {n: kind for n, kind, _ in handle.layers}
    assert {kinds[n] for n in ("emb.cls", "emb.pos", "scale")} == {
        "parameter of no layer (per example where broadcast over the batch)"
    }
    if sketch is None:
        want = {n: grads[n] for n in ("emb.proj.weight", "emb.proj.bias", "head.weight", "head.bias")}
        want.update({n: grads[n] for n in ("scale", "emb.cls", "emb.pos")})
        assert_rows(rows, flat(want, 5))
    handle.remove()
    # Gradient accumulation over two micro-batches, and a second step (the check of the parts has run).
    sampler, handle, spy = watched(model, sketch=sketch)
    for part in (slice(0, 2), slice(2, 5), slice(0, 3)):
        ce(model(x[part]), y[part], reduction="sum").backward()
        if part.stop == 5:
            handle.flush()
    handle.flush()
    want = [exact_rows(handle, model, ce, x[p], y[p])[0] for p in (slice(0, 2), slice(2, 5), slice(0, 3))]
    assert_rows(spy.rows[0], torch.cat(want[:2]) * torch.tensor([2.0] * 2 + [3.0] * 3)[:, None])
    assert_rows(spy.rows[1], want[2] * 3.0)
    handle.remove()
    # The embeddings checkpointed: their forward runs again inside the backward (reentrant: the first run
    # without gradients), and each use is seen once.
    expected, _ = exact_rows(handle, model, ce, x, y)
    handle.remove()
    for reentrant in (False, True):
        model.reentrant = reentrant
        sampler, handle, spy = watched(model, sketch=sketch)
        ce(model(x.requires_grad_(reentrant)), y).backward()  # reentrant: an input that needs gradients
        handle.flush()
        assert_rows(spy.rows[0], expected)
        handle.remove()
    model.reentrant = None
    x = x.detach().requires_grad_(False)
    # An ordering without gradients only counts the examples.
    sampler, handle, spy = watched(model, sketch=sketch, ordering="rr")
    ce(model(x), y).backward()
    handle.flush()
    assert sampler.pending == 64 - 5


@pytest.mark.parametrize("how", ["slice", "sigmoid"])
def test_a_function_of_a_parameter_of_no_layer_broadcast_gives_per_example_rows(how):
    # A slice (3 tokens and the class token's 2: the first 5 of 6 positions), or a sigmoid scaled: a
    # function of the parameter alone, followed to the broadcast; each example's part is pulled back
    # through it (through the slice: zero at position 6).
    torch.manual_seed(0)
    model = _TokenModel(pos=how)
    t = 3 if how == "slice" else 4
    x, y = torch.randn(4, t, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    rows, expected, grads, handle = one_step(model, x, y, ce, None)
    assert_rows(rows, expected)
    if how == "slice":
        assert float(grads["emb.pos"][:, :, 5:].abs().max()) == 0.0 and float(grads["emb.pos"].abs().max()) > 0


def test_a_parameter_of_no_layer_used_otherwise_is_refused():
    # Taken by a random operation (dropout) in its module's forward: refused at that operation. Used by
    # another module's forward: the parts watch() saw do not add up to its gradient, refused at the first
    # backward.
    y = torch.tensor([0, 1, 2, 0])
    for model, x, match in [
        (
            _TokenModel(pos="dropout"),
            torch.randn(4, 4, 4),
            r"'emb.pos' belongs to no layer; .* and dropout takes it otherwise",
        ),
        (
            _TokenModel(pos="written"),
            torch.randn(4, 4, 4),
            r"'emb.pos' belongs to no layer; .*__setitem__ takes it otherwise",
        ),
        (
            _TokenModel(peek=True),
            torch.randn(4, 4, 4),
            r"'emb.pos' belongs to no layer, and its gradient is not the sum",
        ),
    ]:
        sampler, handle, spy = watched(model, sketch=4)
        with pytest.raises(UnsupportedModelError, match=match):
            ce(model(x), y).backward()
        assert handle._step.forwards == {} and not handle._recording
        handle.remove()
        sampler, handle, spy = watched(model, sketch=4, exclude=["emb.pos"])
        ce(model(x[:3]), y[:3]).backward()
        handle.flush()
        assert spy.rows[-1].shape == (3, handle.width) and sampler.pending == 64 - 3
        handle.remove()


class _FunctionalQKV(nn.Module):
    """timm's BEiT and EVA attention: the qkv layer's weight passed to F.linear with a bias assembled from
    other parameters; the qkv module itself is never called."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12, bias=False)
        self.q_bias = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        bias = torch.cat([self.q_bias, torch.zeros(8)])
        return self.head(torch.tanh(F.linear(x, self.qkv.weight, bias)))


@pytest.mark.parametrize("sketch", [None, 4])
@pytest.mark.parametrize("by", ["graph", "gradient"])
def test_a_layer_whose_weight_gets_a_gradient_without_being_called_is_refused(sketch, by):
    # Its weight's gradient reached no hook: the layer's rows were zero and nothing said so (timm's BEiT,
    # with q_bias left out, gave rows that matched torch.func's only within the tolerance of the largest
    # column). Refused at the end of the first forward, where the graph shows the use (capture/audit.py),
    # or, where no watched layer was called to walk the graph from (head left out too), at the first
    # backward, by the hook on the weight; watched once the layer is left out too.
    torch.manual_seed(0)
    model = _FunctionalQKV()
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    left_out = ["q_bias"] + (["head"] if by == "gradient" else [])
    sampler, handle, spy = watched(model, sketch=sketch, exclude=left_out)
    match = {
        "graph": r"the parameter 'qkv.weight' of 'qkv' is used, but the layer was never called",
        "gradient": r"a parameter of qkv got a gradient in a step where the layer was never called",
    }[by]
    with pytest.raises(UnsupportedModelError, match=match):
        ce(model(x), y).backward()
    assert handle._step.forwards == {} and not handle._recording
    model.zero_grad()
    handle.flush()
    assert spy.rows == [] and sampler.pending == 64
    handle.remove()
    if by == "graph":
        rows, expected, grads, handle = one_step(model, x, y, ce, sketch, exclude=["q_bias", "qkv"])
        assert_rows(rows, expected)
        assert [n for n, _, _ in handle.layers] == ["head"] and handle._audit == []


class _BeitAttention(nn.Module):
    """timm's BEiT attention in small: F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias)), the qkv
    layer never called, k_bias a buffer of zeros; ``own_bias``: the qkv layer's own bias passed instead, in
    a module that holds a layer scale (a holder: its forward is watched)."""

    def __init__(self, own_bias=False):
        super().__init__()
        self.qkv, self.proj = nn.Linear(6, 18, bias=own_bias), nn.Linear(6, 6)
        if own_bias:
            self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        else:
            self.q_bias, self.v_bias = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))
            self.register_buffer("k_bias", torch.zeros(6))
        self.own_bias = own_bias

    def forward(self, x):
        bias = self.qkv.bias if self.own_bias else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(*x.shape[:2], 3, 6).unbind(2)
        out = self.proj(F.scaled_dot_product_attention(q, k, v))
        return self.gamma * out if self.own_bias else out


class _Beit(nn.Module):
    """The blocks a ModuleList of the model, which holds a class token: its mode stays off inside them."""

    def __init__(self, own_bias=False):
        super().__init__()
        self.embed, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.blocks = nn.ModuleList([_BeitAttention(own_bias) for _ in range(2)])

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], 1)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h[:, 0])


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("own_bias", [False, True])
def test_a_layer_called_as_f_linear_with_its_weight_by_a_holder_gives_per_example_rows(own_bias, sketch, monkeypatch):
    # Refused before as never called (timm's BEiT and EVA). Inside the forward of a module holding
    # parameters of no layer, F.linear with a watched Linear layer's weight is a call of that layer, and the
    # bias concatenated from q_bias, zeros and v_bias is followed from both parameters to where it is added.
    torch.manual_seed(0)
    model = _Beit(own_bias)
    x, y = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1])
    rows, expected, grads, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    names = [n for n, _, _ in handle.layers]
    assert "blocks.0.qkv" in names and ("blocks.1.v_bias" in names) != own_bias
    handle.remove()
    # With the holders' modes left on inside their sublayers (a measuring switch), each Linear layer's own
    # forward calls F.linear under a mode: recorded once, not once by the mode and once by its hook.
    monkeypatch.setattr(watch_module, "_SUBLAYERS_WITHOUT_MODE", False)
    rows, expected, _, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)


class _TiedByFunction(nn.Module):
    """A language model whose output projection is the embedding's table passed to F.linear, with no
    module of its own (``tied=False``: an nn.Linear whose weight is the table, which watch() takes)."""

    def __init__(self, by_module=False):
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 6)
        self.lm_head = None
        if by_module:
            self.lm_head = nn.Linear(6, 11, bias=False)
            self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        h = torch.tanh(self.fc(self.wte(ids)))
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.wte.weight)


@pytest.mark.parametrize("sketch", [None, 4])
def test_a_weight_used_by_its_layer_and_outside_it_is_refused(sketch):
    # The table's gradient from F.linear(h, wte.weight) reached no row: the rows held the lookups' part
    # alone, silently. Refused at the end of the first forward, nothing fed; an nn.Linear tied to the
    # table is the way to write it, and gets the whole gradient.
    torch.manual_seed(0)
    model = _TiedByFunction()
    ids, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (4, 5))
    sampler, handle, spy = watched(model, sketch=sketch)
    with pytest.raises(UnsupportedModelError, match=r"'wte.weight' of 'wte' is also used outside the layer's calls"):
        model(ids)
    assert handle._step.forwards == {} and not handle._recording
    handle.flush()
    assert spy.rows == [] and sampler.pending == 64
    handle.remove()
    tied = _TiedByFunction(by_module=True)
    tied.load_state_dict(model.state_dict(), strict=False)
    rows, expected, _, handle = one_step(tied, ids, y, _lm_loss, sketch)
    assert_rows(rows, expected)
    assert handle._outside is None  # checked once, and found nothing


@dataclasses.dataclass
class _Out:
    logits: Any


def test_a_calls_nodes_begin_after_its_input_also_when_the_sketch_sees_a_view_made_later():
    # A sequence-first layer is recorded with x.transpose(0, 1), made after the call: its node is newer
    # than the call's own, and taken as the floor it would leave the call no nodes (every use of its
    # weight refused as outside it). The floor is the input the view is of.
    lin = nn.Linear(4, 3)
    x = torch.randn(5, 2, 4, requires_grad=True) * 1.0  # [T, B, in], made before the call
    out = lin(x)
    audit = OutsideUses({id(lin.weight): ("weight", [lin])})
    audit.add(lin, x.transpose(0, 1), out)
    audit.add(lin, torch.randn(2, 5, 4), out)  # an input with no graph: no floor
    assert [c[2] for c in audit.calls] == [x.grad_fn._sequence_nr(), -1]
    assert audit.find(out.sum()) is None
    used = out.sum() + F.linear(x, lin.weight).sum()  # the weight again, outside the call
    assert audit.find(used)[:2] == ("weight", [lin])
    # Found in what a forward returns: tuples, lists, dicts and dataclasses.
    assert audit.find({"a": [(1, _Out(logits=used))]})[:2] == ("weight", [lin])
    assert audit.find(_Out(logits=None)) is None  # no tensor: nothing to walk


def test_a_weight_used_in_the_loss_is_not_refused():
    # An L2 penalty added to the loss is outside the model's forward: its part of the gradient is the
    # same for every example of the step, and the rows are those of the data term.
    torch.manual_seed(0)
    model = _mlp()
    x, y = _data((6,), "class", b=5)

    def penalized(out, y):
        return ce(out, y) + 0.1 * sum((p**2).sum() for p in model.parameters())

    sampler, handle, spy = watched(model, sketch=None)
    penalized(model(x), y).backward()
    handle.flush()
    expected, _ = exact_rows(handle, model, ce, x, y)
    assert len(spy.rows) == 1 and handle._outside is None
    assert_rows(spy.rows[0], expected)


@pytest.mark.parametrize("sketch", SKETCHES)
def test_a_layer_in_eval_mode_inside_a_training_model_gets_rows(sketch):
    # BatchNorm frozen in eval mode (its running statistics), its affine parameters still trained: per-example
    # gradients are defined and the layer gets them. Its forward was skipped (the layer's own mode was
    # checked, not the model's), so its rows were zero.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    model.train()
    model[1].eval()
    x, y = _data((6,), "class", b=4)
    rows, expected, grads, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    if sketch is None:
        assert_rows(rows, flat(grads, 4))
    assert any(n == "1" and kind == "BatchNorm" for n, kind, _ in handle.layers)
    # nn.MultiheadAttention in eval mode (dropout off) in a training model: recorded by its forward as well.
    model = Attention(dropout=0.5).train()
    model.mha.eval()
    x, y = _data((5, 6), "class", b=4)
    rows, expected, grads, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)


class _OneTokenTwoWays(nn.Module):
    """CaiT's class attention: equally shaped Linear layers, one called on [B, 1, E], one on [B, E]."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x[:, None, :])[:, 0]) + torch.tanh(self.b(x)))


@pytest.mark.parametrize("sketch", SKETCHES)
def test_equally_shaped_layers_called_with_and_without_a_token_dimension_are_grouped(sketch):
    # Their group keys are equal (one token each); stacking their saved inputs crashed in the backward.
    torch.manual_seed(0)
    model = _OneTokenTwoWays()
    x, y = _data((6,), "class", b=4)
    rows, expected, _, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    assert not handle._alone[handle._sketches[model.a]]  # the two are grouped


class _Gamma(nn.Module):
    """ConvNeXt's layer scale as timm writes it: gamma reshaped (or indexed with None) to [1, C, 1, 1],
    then multiplied; a parameter of a module with a sublayer."""

    def __init__(self, how):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 3), nn.Linear(16, 3)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.how = how

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        if self.how == "reshape":
            h = h.mul(self.gamma.reshape(1, -1, 1, 1))
        elif self.how == "index":
            h = self.gamma[:, None, None] * h
        elif self.how == "reordered":  # a view that reorders the elements, followed as a rearrangement
            h = h * self.gamma.reshape(2, 2).t().reshape(1, 4, 1, 1)
        elif self.how == "einsum":  # an einsum with the batch, the parameter expanded over its rows
            h = torch.einsum("bchw,c->bchw", h, self.gamma)
        else:  # a convolution with the batch, the parameter its weight: refused
            h = F.conv2d(h, self.gamma.view(4, 1, 1, 1), groups=4)
        return self.head(h.flatten(1))


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("how", ["reshape", "index", "reordered", "einsum"])
def test_a_parameter_of_no_layer_reshaped_before_it_is_broadcast_gives_per_example_rows(how, sketch):
    torch.manual_seed(0)
    model = _Gamma(how)
    x, y = _data((2, 4, 4), "class", b=5)
    rows, expected, grads, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    assert ("gamma", "parameter of no layer (per example where broadcast over the batch)", 4) in handle.layers
    if how == "reshape":
        refused_model = _Gamma("conv")
        sampler, handle, spy = watched(refused_model, sketch=sketch)
        with pytest.raises(UnsupportedModelError, match=r"'gamma' belongs to no layer; .*conv2d takes it"):
            ce(refused_model(x), y).backward()
        handle.remove()


class _RelativeBias(nn.Module):
    """A module that makes the bias from its own table, called with no input (as Hugging Face's Swin
    writes it)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(7, 2))
        i = torch.arange(4)
        self.register_buffer("index", i[:, None] - i[None, :] + 3)

    def forward(self):
        return self.table[self.index.view(-1)].view(4, 4, 2).permute(2, 0, 1).contiguous().unsqueeze(0)


class _NoInputBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(3, 2))

    def forward(self):
        return self.table.t()


class _IndexedBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(7, 2))
        self.register_buffer("index", torch.arange(4))

    def forward(self, attn):
        return attn + self.table[self.index]


class _IdsEmbedding(nn.Embedding):
    def __init__(self):
        super().__init__(5, 3)
        self.register_buffer("ids", torch.arange(5))


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.register_buffer("eps", torch.tensor(1e-6))

    def forward(self, x):
        return x * self.w + self.eps


def test_which_leaf_modules_make_a_tensor_from_their_own_parameters():
    # Followed in their parent's forward: a module whose forward takes no input, or one that holds an
    # integer buffer indexing its parameters (timm's RelPosBias). Not: an nn.Embedding subclass holding
    # ids (a layer watch() sketches), nor a module of its own taking an input (replayed per example).
    from torchgrab.capture.plan import makes_from_own

    assert makes_from_own(_NoInputBias()) and makes_from_own(_IndexedBias()) and makes_from_own(_RelativeBias())
    assert not makes_from_own(_IdsEmbedding()) and not makes_from_own(_Scale())
    assert not makes_from_own(_WindowTable(False, False))  # sublayers: a holder itself, not a leaf


class _WindowTable(nn.Module):
    """Swin's window attention in small: each example's 8 tokens cut into 2 windows of 4, every example's
    windows stacked into one batch of 2B windows; a relative-position table of 7 offsets by 2 heads,
    gathered by an index into a [1, heads, 4, 4] bias broadcast over all windows. The attention written out
    (the bias added to the logits) or fused (the bias as scaled_dot_product_attention's mask), with or
    without a shift mask, a tensor of 2B windows with no history, added to the bias first. The table is
    the model's own, or that of a sublayer that makes the bias (``maker``)."""

    def __init__(self, fused, masked, maker=False, misuse=False):
        super().__init__()
        self.embed, self.qkv, self.head = nn.Linear(3, 4), nn.Linear(4, 12), nn.Linear(4, 3)
        self.rel = _RelativeBias() if maker else None
        self.table = nn.Parameter(torch.randn(7, 2)) if not maker else None
        i = torch.arange(4)
        self.register_buffer("index", i[:, None] - i[None, :] + 3)
        self.register_buffer("shift", torch.tensor([0.0, -1.0]).repeat_interleave(8).reshape(2, 1, 4, 2)[..., :1])
        self.fused, self.masked, self.misuse = fused, masked, misuse

    def forward(self, x):
        b = x.shape[0]
        w = self.embed(x).reshape(b * 2, 4, 4)  # [B, 8, 4] -> [2B windows, 4 tokens, 4]
        q, k, v = self.qkv(w).reshape(b * 2, 4, 3, 2, 2).permute(2, 0, 3, 1, 4).unbind(0)  # [2B, heads, 4, 2]
        if self.rel is not None:
            bias = self.rel()
        else:
            bias = self.table[self.index.view(-1)].view(4, 4, 2).permute(2, 0, 1).contiguous().unsqueeze(0)
        if self.masked:  # each window's mask, the same for every example: [2B, heads, 4, 4], no history
            mask = self.shift.expand(2, 2, 4, 4)[None].expand(b, -1, -1, -1, -1).reshape(b * 2, 2, 4, 4)
            bias = bias + mask
            if self.misuse:  # the bias with the mask taken by something that shows nothing of its rows
                bias = bias.softmax(-1)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            o = ((q @ k.transpose(-2, -1)) * 0.7 + bias).softmax(-1) @ v
        return self.head(o.transpose(1, 2).reshape(b, 8, 4).mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func's reference over attention
@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize(
    "fused, masked, maker",
    [(False, False, False), (False, True, False), (True, False, False), (True, True, False), (False, False, True),
     (True, True, True)],
)  # fmt: skip
def test_a_table_gathered_into_a_bias_over_every_examples_windows_gives_per_example_rows(fused, masked, maker, sketch):
    # Each example's gradient of the table: its windows' gradients of the bias, summed, pulled back
    # through the gather. The windows' rows are shown to be example after example by the logits' (or the
    # query's) history; a mask with no history leaves that to the attention that takes it. A sublayer that
    # makes the bias from its table runs under its parent's watch of the table.
    torch.manual_seed(0)
    model = _WindowTable(fused, masked, maker)
    x, y = torch.randn(5, 8, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1])
    rows, expected, grads, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    name = "rel.table" if maker else "table"
    assert (name, "parameter of no layer (per example where broadcast over the batch)", 14) in handle.layers
    if sketch is None:
        assert handle.width == sum(g[0].numel() for g in grads.values())  # the table's 14 numbers included
    handle.remove()
    if fused and masked:  # the masked bias taken by an operation that shows no rows: refused, and left out
        model.misuse = True
        sampler, handle, spy = watched(model, sketch=sketch)
        with pytest.raises(UnsupportedModelError, match=rf"'{name}' belongs to no layer; .*softmax takes it"):
            ce(model(x), y).backward()
        handle.remove()
        sampler, handle, spy = watched(model, sketch=sketch, exclude=[name])
        ce(model(x), y).backward()
        handle.flush()
        assert spy.rows[-1].shape == (5, handle.width) and sampler.pending == 64 - 5


class _RawWeight(nn.Module):
    """A layer written by hand with a raw parameter (a parameter of the model, no layer of its own): x @ W
    on [B, T, 4], [B, 4] or [B, 2, 2, 4], W @ x, an einsum, and an einsum over each example's 2 windows
    stacked."""

    def __init__(self, how):
        super().__init__()
        self.embed, self.head = nn.Linear(3, 4), nn.Linear(4, 3)
        self.w = nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(2)) * 0.5)
        self.how = how

    def forward(self, x):
        h = torch.tanh(self.embed(x))  # [B, 4 tokens, 4]
        b = h.shape[0]
        if self.how == "matmul":
            h = h @ self.w
        elif self.how == "rows":
            h = (h.mean(1) @ self.w)[:, None]
        elif self.how == "heads":  # [B, 2, 2, 4] @ W
            h = (h.reshape(b, 2, 2, 4) @ self.w).reshape(b, 4, 4)
        elif self.how == "left":
            h = torch.matmul(self.w, h.transpose(1, 2)).transpose(1, 2)
        elif self.how == "einsum":
            h = torch.einsum("btd,ed->bte", h, self.w)
        else:  # windows
            h = torch.einsum("bnd,de->bne", h.reshape(b * 2, 2, 4), self.w).reshape(b, 4, 4)
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("how", ["matmul", "rows", "heads", "left", "einsum", "windows"])
def test_a_raw_weight_multiplied_with_the_batch_gives_per_example_rows(how, sketch):
    # Refused before (matmul and einsum take it with the batch). The weight is expanded over the rows, one
    # copy per row (the same values and result), and each example's gradient is its rows' copies' summed.
    torch.manual_seed(0)
    model = _RawWeight(how)
    x, y = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1])
    rows, expected, grads, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    assert ("w", "parameter of no layer (per example where broadcast over the batch)", 16) in handle.layers


class _AddPositions(nn.Module):
    def forward(self, h, pos=None):
        return h + (self.kept if pos is None else pos)


class _HoldsForSublayers(nn.Module):
    """Position embeddings held by the model, used inside a sublayer: given to it as an argument, or (a
    reference the sublayer keeps, not registered) read by it."""

    def __init__(self, passed, listed=False):
        super().__init__()
        self.lin, self.add, self.head = nn.Linear(4, 6), _AddPositions(), nn.Linear(6, 3)
        tanh = [nn.Tanh() for _ in range(8)]
        # A ModuleList (BEiT's blocks) is never called itself: its layers are, one by one.
        self.deep = nn.ModuleList(tanh) if listed else nn.Sequential(*tanh)
        self.pos = nn.Parameter(torch.randn(1, 4, 6))
        self.passed = passed
        if not passed:
            object.__setattr__(self.add, "kept", self.pos)

    def forward(self, x):
        h = self.lin(x)
        h = self.add(h, self.pos) if self.passed else self.add(h)
        if isinstance(self.deep, nn.ModuleList):
            for layer in self.deep:
                h = layer(h)
            return self.head(h.mean(1))
        return self.head(self.deep(h).mean(1))


@pytest.mark.parametrize("listed", [False, True])
def test_sublayers_of_a_module_holding_parameters_of_no_layer_run_without_its_mode(monkeypatch, listed):
    # The mode that follows the holder's parameters costs a Python call per op; a timm ViT holds its class
    # token in the model itself, so every op of the model ran under it. A sublayer's forward now runs
    # without it, unless the sublayer is given one of the parameters; one that reads a parameter otherwise
    # is caught at the first backward.
    from torchgrab.capture.direct import BroadcastUses

    seen = []
    on_op = BroadcastUses.__torch_function__
    monkeypatch.setattr(
        BroadcastUses, "__torch_function__", lambda self, *a, **k: seen.append(1) or on_op(self, *a, **k)
    )
    x, y = torch.randn(5, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    torch.manual_seed(0)
    model = _HoldsForSublayers(passed=True, listed=listed)
    rows, expected, _, handle = one_step(model, x, y, ce, None)
    assert_rows(rows, expected)  # the sublayer given the parameter kept the mode: its + was followed
    # The holder's own ops (mean, and the calls of its sublayers); none of the 8 Tanh layers' ops.
    assert 0 < len(seen) < 8, len(seen)
    model = _HoldsForSublayers(passed=False)
    sampler, handle, spy = watched(model, sketch=None)
    with pytest.raises(UnsupportedModelError, match=r"'pos' belongs to no layer, and its gradient is not the sum"):
        ce(model(x), y).backward()
    handle.remove()
    assert torch._C._len_torch_function_stack() == 0


class _Probes(nn.Module):
    """CLIP's class embedding ([E] expanded to [B, 1, E]) and SigLIP's pooling probe ([1, 1, E] repeated
    over the batch), parameters of a module with a sublayer."""

    def __init__(self, how):
        super().__init__()
        self.proj, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.cls = nn.Parameter(torch.randn(6) if how == "expand" else torch.randn(1, 1, 6))
        self.how = how

    def forward(self, x):
        b = x.shape[0]
        if self.how == "expand":
            token = self.cls.expand(b, 1, -1)
        elif self.how == "repeat":
            token = self.cls.repeat(b, 1, 1)
        else:  # repeats a dimension of size 6: not a broadcast; followed, then refused where it meets the batch
            token = self.cls.repeat(b, 1, 2)[:, :, :6]
        return self.head(torch.tanh(torch.cat([token, self.proj(x)], 1)).mean(1))


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("how", ["expand", "repeat"])
def test_a_parameter_broadcast_over_a_new_batch_dimension_or_repeated_gives_per_example_rows(how, sketch):
    torch.manual_seed(0)
    model = _Probes(how)
    x, y = torch.randn(5, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    rows, expected, grads, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    if how == "repeat":
        refused_model = _Probes("tiled")
        sampler, handle, spy = watched(refused_model, sketch=sketch)
        with pytest.raises(
            UnsupportedModelError, match=r"'cls' belongs to no layer; .* and _VariableFunctionsClass.cat takes it"
        ):
            ce(refused_model(x), y).backward()
        handle.remove()


class _Masked(nn.Module):
    """Wav2Vec2's and HuBERT's masked_spec_embed: a learned vector written over some frames of each example
    (``hidden[mask] = embed``), the mask from the data here so that each example's own pass draws its own."""

    def __init__(self, how):
        super().__init__()
        self.proj, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.embed = nn.Parameter(torch.randn(6))
        self.how = how

    def forward(self, x):
        h = self.proj(x)  # [B, T, 6]
        if self.how == "mask":
            h[x[..., 0] > 0] = self.embed
        elif self.how == "mask_to":  # (Wav2Vec2 writes masked_spec_embed.to(hidden_states.dtype))
            h[x[..., 0] > 0] = self.embed.to(h.dtype)
        elif self.how == "examples":  # whole examples: a mask over the batch alone
            h[x[:, 0, 0] > 0] = self.embed
        elif self.how == "zeroed":  # no parameter written: the Linear layer's own output, overwritten in place
            h[x[..., 0] > 0] = 0.0
        else:  # "index": the first frame of every example, by an integer index: not followed
            h[:, 0] = self.embed
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("how", ["mask", "mask_to", "examples", "zeroed"])
def test_a_parameter_written_at_masked_positions_of_each_example_gives_its_own_rows(how, sketch):
    # "zeroed": torch before 2.6 or so makes a Linear layer's output on [B, T, in] a view of its 2-D product,
    # and a write into that view sent the gradient around the hooked node: proj's rows were zeros.
    torch.manual_seed(0)
    model = _Masked(how)
    x, y = torch.randn(5, 7, 4), torch.tensor([0, 1, 2, 0, 1])
    x[3, :, 0] = -1.0  # an example with nothing masked: no part of embed's gradient
    x[0, 0, 0] = 1.0  # and one with something masked in each case
    sampler, handle, spy = watched(model, sketch=sketch)
    ce(model(x), y).backward()
    handle.flush()
    grads = _own_gradients(model, x, y)
    assert_rows(spy.rows[0], handle.project(grads))
    if how == "zeroed":
        assert float(np.abs(spy.rows[0][:, :30]).max()) > 0  # proj's block
        return
    assert float(grads["embed"][3].abs().max()) == 0.0 and float(grads["embed"].abs().max()) > 0
    assert ("embed", "parameter of no layer (per example where broadcast over the batch)", 6) in handle.layers


def test_a_parameter_written_by_an_integer_index_is_refused_at_the_first_backward():
    model = _Masked("index")
    sampler, handle, spy = watched(model, sketch=4)
    with pytest.raises(UnsupportedModelError, match=r"'embed' belongs to no layer, and its gradient is not the sum"):
        ce(model(torch.randn(5, 7, 4)), torch.tensor([0, 1, 2, 0, 1])).backward()
    handle.remove()


class _SharedBias(nn.Module):
    """T5's relative position bias in small: an Embedding looked up with [T, T] bucket ids that no example
    owns, permuted to [1, heads, T, T] and added to every example's attention scores, in two layers."""

    def __init__(self, how):
        super().__init__()
        self.emb, self.bias = nn.Embedding(30, 8), nn.Embedding(7, 2)
        self.qkv, self.head = nn.ModuleList([nn.Linear(8, 24), nn.Linear(8, 24)]), nn.Linear(8, 3)
        self.how = how
        self.last = None

    def forward(self, x):
        b, t = x.shape
        h = self.emb(x)
        pos = torch.arange(t)
        bias = self.bias((pos[None, :] - pos[:, None]).clamp(-3, 3) + 3)  # [T, T, heads]
        bias = bias.permute(2, 0, 1).unsqueeze(0)  # [1, heads, T, T]
        keep = (x != 0)[:, None, None, :]  # [B, 1, 1, T]: padding (id 0) masked
        for layer in self.qkv:  # the one bias in every layer, as T5 hands it on
            q, k, v = layer(h).view(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
            if self.how in ("add", "kept"):  # T5's eager attention ("kept": the model keeps the bias)
                a = (q @ k.transpose(-1, -2) + bias).masked_fill(~keep, -1e4).softmax(-1) @ v
            elif self.how == "where":  # T5's sdpa path: the bias made the mask by torch.where
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(keep, bias, -1e4))
            elif self.how == "mask":  # the bias alone as an attention's mask
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            elif self.how == "expand":  # MPNet's: expanded over the batch and made contiguous
                a = (q @ k.transpose(-1, -2) + bias.expand(b, -1, t, t).contiguous()).softmax(-1) @ v
            else:  # "maximum": combined with the scores by a function watch() does not follow
                a = torch.maximum(q @ k.transpose(-1, -2), bias).softmax(-1) @ v
            h = h + a.transpose(1, 2).reshape(b, t, 8)
        self.last = bias.detach() if self.how != "kept" else bias
        return self.head(h.mean(1))


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("how", ["add", "where", "mask", "expand"])
def test_a_layer_called_on_ids_the_batch_shares_gives_each_example_its_own_rows(how, sketch):
    # The bias table's per-example gradient is taken where its lookup meets each example's scores; the
    # same watch then takes a step whose batch size equals the sequence's length (5 x 5 ids, 5 examples):
    # an Embedding seen looked up with shared ids stays so.
    torch.manual_seed(0)
    model = _SharedBias(how)
    sampler, handle, spy = watched(model, sketch=sketch)
    for b, t in [(3, 6), (5, 5)]:
        x = torch.randint(1, 30, (b, t), generator=torch.Generator().manual_seed(b))
        x[0, -2:] = 0  # padding in one example
        y = torch.arange(b) % 3
        model.zero_grad()
        ce(model(x), y).backward()
        handle.flush()
        grads = _own_gradients(copy.deepcopy(model), x, y)  # (a copy's forwards are not watched)
        assert float(grads["bias.weight"].abs().max()) > 0
        assert not torch.allclose(grads["bias.weight"][0], grads["bias.weight"][1])
        assert_rows(spy.rows[-1], handle.project(grads))
    assert torch._C._len_torch_function_stack() == 0  # the mode that followed the bias was left
    handle.remove()


def test_the_mode_following_a_shared_call_is_left_when_the_step_ends_outside_the_models_own_call():
    # A framework's training step may call the watched model's submodules, never the model itself (steps
    # begun by _begin_batch, as Lightning's callback does): the model's forward hook that leaves the mode
    # never runs, so the next step's beginning leaves it, and so does remove().
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _SharedBias("add")

        def forward(self, x):  # (the reference's per-example gradients only)
            return self.inner(x)

    torch.manual_seed(0)
    model = Outer()
    sampler, handle, spy = watched(model, sketch=4)
    x, y = torch.randint(1, 30, (3, 6)), torch.tensor([0, 1, 2])
    for _ in range(2):
        handle._begin_batch(model, x)
        assert torch._C._len_torch_function_stack() == 0
        model.zero_grad()
        ce(model.inner(x), y).backward()
        assert torch._C._len_torch_function_stack() == 1  # (until the next step begins)
    handle.remove()
    assert torch._C._len_torch_function_stack() == 0
    rows = np.concatenate(spy.rows)
    assert rows.shape[0] == 6  # both steps' (fed together or not)
    assert_rows(rows[-3:], handle.project(_own_gradients(copy.deepcopy(model), x, y)))


def test_what_counts_as_made_from_parameters_alone():
    # A layer's input with no batch dimension is followed as shared by the batch when parameters alone
    # make it (capture/shared.py); data that reaches it through ids or a product is not, and is refused
    # as a layout the rows cannot read.
    from torchgrab.capture.shared import made_from_parameters

    w, ln, lin, emb = nn.Parameter(torch.randn(8, 4)), nn.LayerNorm(4), nn.Linear(4, 4), nn.Embedding(8, 4)
    assert made_from_parameters(w) and made_from_parameters(w[0:6].unsqueeze(0))
    assert made_from_parameters(ln(w)) and made_from_parameters(F.dropout(ln(w), 0.5, training=True))
    assert made_from_parameters(lin(ln(w)) * 2.0)
    data = torch.randn(3, 4)
    assert not made_from_parameters(data) and not made_from_parameters(lin(data))
    assert not made_from_parameters(emb(torch.tensor([[1, 2]])))  # (the ids do not show in the graph)
    assert not made_from_parameters(w[:3] * 2 + lin(data))


def test_a_shared_call_whose_output_is_used_unseen_is_refused_and_the_sampler_kept():
    torch.manual_seed(0)
    x, y = torch.randint(1, 30, (3, 6)), torch.tensor([0, 1, 2])
    # A function of the scores and the bias that watch() does not follow: refused in the forward.
    model = _SharedBias("maximum")
    sampler, handle, spy = watched(model, sketch=4)
    before = sampler.state_dict()
    with pytest.raises(
        UnsupportedModelError, match=r"'bias' is called on a tensor shared by the whole batch .*maximum takes it"
    ):
        model(x)
    assert torch._C._len_torch_function_stack() == 0
    assert_same_state(sampler.state_dict(), before)
    handle.remove()
    # A use after the forward (the loss adds the bias the model kept): refused at the first backward.
    model = _SharedBias("kept")
    sampler, handle, spy = watched(model, sketch=4)
    before = sampler.state_dict()
    with pytest.raises(UnsupportedModelError, match=r"'bias' is called on a tensor shared .* not the sum"):
        (ce(model(x), y) + model.last.square().sum()).backward()
    assert spy.rows == [] and torch._C._len_torch_function_stack() == 0
    assert_same_state(sampler.state_dict(), before)
    # The next step, without that use, gives its rows.
    model.zero_grad()
    ce(model(x), y).backward()
    handle.flush()
    model.how, model.last = "add", None
    assert_rows(spy.rows[-1], handle.project(_own_gradients(copy.deepcopy(model), x, y)))
    handle.remove()


# Layers whose weight a parametrization computes: weight_norm (any dim; Wav2Vec2's positional convolution
# normalizes over its kernel taps, dim=2), spectral_norm, orthogonal, and the older hook-based weight_norm.
_PARAMETRIZED = {
    "linear_tokens": (lambda: weight_norm(nn.Linear(5, 6)), (3, 5)),
    "linear_whole_norm": (lambda: weight_norm(nn.Linear(5, 6), dim=None), (5,)),
    "linear_spectral": (lambda: spectral_norm(nn.Linear(5, 6)), (5,)),
    "linear_orthogonal": (lambda: orthogonal(nn.Linear(6, 6)), (6,)),
    "conv1d_groups_taps": (lambda: weight_norm(nn.Conv1d(4, 6, 5, padding=2, groups=2), dim=2), (4, 9)),
    "conv1d_same_reflect": (lambda: weight_norm(nn.Conv1d(4, 6, 4, padding="same", padding_mode="reflect")), (4, 9)),
    "conv2d_stride_dilation": (lambda: weight_norm(nn.Conv2d(3, 5, 3, stride=2, dilation=2, padding=1)), (3, 9, 9)),
    "conv2d_spectral": (lambda: spectral_norm(nn.Conv2d(3, 5, 3, padding=1)), (3, 6, 6)),
    "conv_transpose1d_groups": (
        lambda: weight_norm(nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1, groups=2)),
        (4, 7),
    ),
    "conv_transpose2d_output_padding": (
        lambda: weight_norm(nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1)),
        (3, 5, 5),
    ),
    "legacy_weight_norm": (lambda: legacy_weight_norm(nn.Conv1d(4, 6, 3), dim=None), (4, 9)),
    "frozen_magnitude": (lambda: _frozen_magnitude(weight_norm(nn.Linear(5, 6))), (5,)),
}


def legacy_weight_norm(module, dim=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (deprecated, still in older models)
        return torch.nn.utils.weight_norm(module, dim=dim)


def _frozen_magnitude(layer):
    layer.parametrizations.weight.original0.requires_grad_(False)
    return layer


class _Parametrized(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer, self.head = layer, nn.LazyLinear(3)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x)).flatten(1))


def _own_gradients(model, x, y, loss_fn=ce):
    """Each example's gradient of its own loss, one backward each, with spectral_norm's power iteration
    held where the batch's forward left it (the u and v that forward used; each example's forward would
    otherwise advance it)."""
    still = [(m, m.training) for m in model.modules() if type(m).__name__ == "_SpectralNorm"]
    for m, _ in still:
        m.eval()
    grads = {}
    try:
        for b in range(x.shape[0]):
            model.zero_grad()
            loss_fn(model(x[b : b + 1]), y[b : b + 1]).backward()
            for n, p in model.named_parameters():
                if p.requires_grad:  # (a parameter the forward did not use: zeros)
                    grads.setdefault(n, []).append(torch.zeros_like(p) if p.grad is None else p.grad.clone())
    finally:
        for m, mode in still:
            m.train(mode)
    return {n: torch.stack(g) for n, g in grads.items()}


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("case", sorted(_PARAMETRIZED))
def test_parametrized_weight_rows_are_each_examples_gradient_of_the_originals(case, sketch):
    make, shape = _PARAMETRIZED[case]
    torch.manual_seed(0)
    model = _Parametrized(make())
    x, y = _data(shape, "class")
    model(x[:1])
    sampler, handle, spy = watched(model, sketch=sketch)
    with warnings.catch_warnings():
        # (vmap falling back to a loop over the examples would warn: the weight_norm here is batched.)
        warnings.simplefilter("error", UserWarning)
        ce(model(x), y).backward()
    handle.flush()
    assert_rows(spy.rows[0], handle.project(_own_gradients(model, x, y)))
    name = {"linear_spectral": "spectral_norm", "conv2d_spectral": "spectral_norm"}.get(case, "weight_norm")
    if case == "linear_orthogonal":
        name = "orthogonal"
    kind = "Conv" if "conv" in case or case == "legacy_weight_norm" else "Linear"
    assert re.fullmatch(rf"{kind}\w* \(weight from {name}: per example through it\)", handle.layers[0][1])
    if case == "frozen_magnitude":
        assert "layer.parametrizations.weight.original0" not in _own_gradients(model, x, y)


def test_a_wide_parametrized_layer_is_taken_in_chunks_of_examples(monkeypatch):
    from torchgrab.capture import parametrized

    monkeypatch.setattr(parametrized, "CHUNK_NUMBERS", 2 * 6 * 2 * 5)  # two examples' weight gradients
    torch.manual_seed(0)
    model = _Parametrized(weight_norm(nn.Conv1d(4, 6, 5, padding=2, groups=2), dim=2))
    x, y = _data((4, 9), "class")
    model(x[:1])
    sampler, handle, spy = watched(model, sketch=4)
    ce(model(x), y).backward()
    handle.flush()
    assert_rows(spy.rows[0], handle.project(_own_gradients(model, x, y)))


def test_spectral_norm_advances_its_power_iteration_once_per_forward_when_watched():
    # The rows evaluate the parametrization once more, in the backward: in eval mode, so the buffers u and
    # v stay where the forward left them, and training is what it is without watch().
    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(5, 6)), nn.Tanh(), spectral_norm(nn.Linear(6, 3)))
    twin = copy.deepcopy(model)
    sampler, handle, spy = watched(model, sketch=4)
    x = torch.randn(4, 5)
    for _ in range(3):
        for m in (model, twin):
            m.zero_grad()
            m(x).square().mean().backward()
    handle.flush()
    assert len(spy.steps([4, 4, 4])) == 3
    for (n, b), (_, b2) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(b, b2), n
    for (n, p), (_, p2) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p.grad, p2.grad), n


@pytest.mark.parametrize("sketch", SKETCHES)
def test_a_parametrization_watch_cannot_follow_is_refused_by_the_layers_name(sketch):
    # An Embedding's weight_norm, and a parametrized bias: the layer is what to leave out.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), weight_norm(nn.Embedding(6, 6)), nn.Linear(6, 3))
    message = refused(model, UnsupportedModelError, r"exclude=\['2'\]", sketch=sketch)
    assert "['2'] computes its weight from a parametrization" in message
    assert "follows for the weight of a Linear or convolution layer only" in message
    biased = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    torch.nn.utils.parametrize.register_parametrization(biased[2], "bias", nn.Tanh())
    refused(biased, UnsupportedModelError, r"exclude=\['2'\]", sketch=sketch)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), weight_norm(nn.Linear(6, 6)), nn.Linear(6, 3))
    refused(
        model, UnsupportedInputError, r"per_layer\['2'\] = 'ghost': '2' computes its weight", per_layer={"2": "ghost"}
    )
    rows, expected, _, handle = one_step(model, *_data((4,), "class", b=5), ce, sketch, exclude=["2"])
    assert_rows(rows, expected)
    assert [n for n, _, _ in handle.layers] == ["0", "3"]


class _Slicing(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(4, 3)
        self.bad = True

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h[:1] if self.bad else h)  # bad: a layer sees one example of a batch of four


def test_a_layer_input_of_another_batch_is_refused_and_the_next_step_is_its_own():
    model = _Slicing()
    sampler, handle, spy = watched(model, sketch=4)
    x, y = _data((6,), "class", b=4)
    with pytest.raises(
        UnsupportedModelError, match=r"module 'b' got an input of shape \(1, 4\) in a step whose batch has 4"
    ):
        model(x)
    assert sampler.pending == 64 and spy.rows == []
    model.bad = False
    ce(model(x[:3]), y[:3]).backward()  # a batch of three: the refused forward left no open step
    handle.flush()
    assert len(spy.rows) == 1 and spy.rows[0].shape == (3, handle.width) and sampler.pending == 61


class _BitFit(nn.Module):
    """Token inputs through Linear layers whose weights are frozen (BitFit: only the biases train): two
    of one shape (sketched as a group) and one alone, then a trained head on the mean over tokens."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.up = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 9)
        self.head = nn.Linear(9, 3)
        for m in (self.a, self.b, self.up):
            m.weight.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.a(x)) + torch.tanh(self.b(x * 0.5))
        return self.head(torch.tanh(self.up(h)).mean(1))


@pytest.mark.parametrize("sketch", [None, 4])
def test_frozen_weights_on_token_inputs_give_bias_rows_summed_over_positions(sketch):
    # A bias alone is projected once per example from its positions' summed gradient, in a group of
    # equally shaped layers or alone; the rows are the projected per-example bias gradients.
    torch.manual_seed(0)
    model = _BitFit()
    x, y = _data((5, 6), "class", b=4)
    rows, expected, grads, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    widths = {n: w for n, _, w in handle.layers}
    k = sketch or 9
    assert widths["a"] == widths["b"] == min(6, k) and widths["up"] == min(9, k)
    assert not handle._alone[handle._sketches[model.a]]  # a and b go through the grouped path
    if sketch is None:
        assert_rows(rows, flat(grads, 4))


class _TwoOfAShape(nn.Module):
    def __init__(self, n=16):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(n, n), nn.Linear(n, n), nn.Linear(n, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))).mean(1))


@pytest.mark.parametrize("tokens", [4, 2100])
def test_on_a_cpu_equally_shaped_layers_are_grouped_only_while_their_gradients_are_small(tokens, monkeypatch):
    # Grouping stacks the layers' output gradients (a copy) to save ops: on a CPU, past CPU_GROUP_MAX
    # elements the copy costs more than the ops (a tenth of a small ViT's step), so each goes alone.
    from torchgrab.capture import layers

    calls = []
    grouped = LinearSketch.rows_grouped
    monkeypatch.setattr(LinearSketch, "rows_grouped", staticmethod(lambda m: calls.append(len(m)) or grouped(m)))
    torch.manual_seed(0)
    model = _TwoOfAShape()
    x, y = torch.randn(2, tokens, 16), torch.tensor([0, 2])
    rows, expected, _, handle = one_step(model, x, y, ce, 4)
    assert_rows(rows, expected)
    assert (2 * tokens * 16 > layers.CPU_GROUP_MAX) == (calls == [])
    assert calls in ([], [2])


class _Blocks(nn.Module):
    """Three post-norm blocks of one width over tokens: Linear layers of one input shape (q, k and v
    share their input) and norms of one shape, the layout a transformer's grouped sketches are for."""

    def __init__(self, n=8, norm=nn.LayerNorm):
        super().__init__()
        self.q, self.k, self.v = (nn.ModuleList(nn.Linear(n, n) for _ in range(3)) for _ in range(3))
        self.norms = nn.ModuleList(norm(n) for _ in range(3))
        self.head = nn.Linear(n, 3)

    def forward(self, x):
        for q, k, v, norm in zip(self.q, self.k, self.v, self.norms):
            x = norm(x + torch.tanh(q(x)) * torch.sigmoid(k(x)) + v(x))
        return self.head(x.mean(1))


def _count_projections(monkeypatch):
    """The number of held inputs at each grouped projection (WatchHandle._project_inputs)."""
    from torchgrab.capture.watch import WatchHandle

    calls = []
    project = WatchHandle._project_inputs
    monkeypatch.setattr(
        WatchHandle, "_project_inputs", lambda h, step: calls.append(len(step.pending)) or project(h, step)
    )
    return calls


@pytest.mark.parametrize("chunks", [False, True])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("sketch", [None, 4])
def test_equally_shaped_norms_and_linear_inputs_are_sketched_in_groups(norm, sketch, chunks, monkeypatch):
    # A transformer's norms go through one grouped sketch, and its Linear layers' inputs are projected in
    # one batched product at the end of the forward: on a GPU a step costs the ops it dispatches.
    # A group larger than GROUP_STACK_MAX elements is formed in chunks (here of two calls).
    from torchgrab.capture import layers
    from torchgrab.capture.layers import FeatureNormSketch
    from torchgrab.capture.watch import WatchHandle

    held = []  # elements of output gradients held for a group, after each deferred call
    defer = WatchHandle._defer
    monkeypatch.setattr(
        WatchHandle, "_defer", lambda h, st, key, item: held.append(defer(h, st, key, item) or st.held[key])
    )
    if chunks:
        monkeypatch.setattr(layers, "GROUP_STACK_MAX", 2 * 4 * 5 * 8)  # two calls' [4, 5, 8] tensors

    norms = []
    grouped = FeatureNormSketch.rows_grouped
    monkeypatch.setattr(FeatureNormSketch, "rows_grouped", staticmethod(lambda m: norms.append(len(m)) or grouped(m)))
    inputs = _count_projections(monkeypatch)
    torch.manual_seed(0)
    model = _Blocks(norm={"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}[norm])
    x, y = _data((5, 8), "class", b=4)
    rows, expected, _, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    assert norms == ([2] if chunks else [3])  # in chunks: two together, the third alone (rows())
    # Nine q, k, v calls and three norms held: a group is formed early rather than hold more than the limit.
    assert max(held) == (2 * 4 * 5 * 8 if chunks else 9 * 4 * 5 * 8)
    # With sketch=4 the nine Linear layers' inputs (width 8) wait for the forward's end, projected together;
    # exact (sketch=None) they are the identity and nothing waits. (torch < 2.8: each at its call.)
    assert inputs == ([9] if sketch and HOOKS_QUERY else [])


def test_calls_wait_for_their_group_only_while_small_and_groups_are_stacked_in_chunks(monkeypatch):
    # On a GPU a large model's calls go alone: their kernels dwarf a launch, and holding every layer's
    # output gradient to the backward's end, then stacking them, would cost gigabytes.
    from torchgrab.capture import layers

    cpu, gpu = layers.CPU_GROUP_MAX, layers.GPU_GROUP_MAX
    assert gpu > cpu
    assert layers.groupable(torch.empty(cpu)) and not layers.groupable(torch.empty(cpu + 1))
    meta = torch.empty(gpu, device="meta")  # not a CPU tensor: a GPU's limit
    assert layers.groupable(meta) and not layers.groupable(torch.empty(gpu + 1, device="meta"))
    monkeypatch.setattr(layers, "GROUP_STACK_MAX", 10)
    assert layers.chunked([4, 6, 3, 20, 1], lambda n: n) == [[4, 6], [3], [20], [1]]
    assert layers.chunked([], lambda n: n) == []


@needs_hooks_query
def test_inputs_are_projected_in_the_forward_under_checkpointing_and_saved_tensor_hooks(monkeypatch):
    # Holding a layer's input to the forward's end costs nothing where autograd holds it anyway; under
    # checkpointing or saved-tensor hooks (offloading) it does not, so the input is projected at once.
    calls = _count_projections(monkeypatch)
    torch.manual_seed(0)
    model = _Blocks()
    x, y = _data((5, 8), "class", b=4)
    sampler, handle, spy = watched(model, sketch=4)
    for ctx in (contextlib.nullcontext, lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)):
        with ctx():
            loss = ce(model(x), y)
        assert handle._step.pending == []  # nothing is held past the forward
        loss.backward()
    handle.flush()
    assert calls == [9]  # the plain forward's nine inputs, at its end; none under the hooks
    expected, _ = exact_rows(handle, model, ce, x, y)
    for got in spy.steps([4, 4]):
        assert_rows(got, expected)


@needs_hooks_query
def test_a_layer_called_after_the_models_forward_is_projected_at_the_first_gradient(monkeypatch):
    # Calls in the model's forward are projected at its end; a call after it, in the same step, waits for
    # the backward's first gradient. Either way the rows are those of projecting at each call.
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _Blocks()

        def forward(self, x):
            return self.inner(x) + self.inner.head(torch.tanh(self.inner.q[0](x)).mean(1))

    x, y = _data((5, 8), "class", b=4)

    def rows(hold):
        torch.manual_seed(0)
        outer = Outer()
        _, handle, spy = watched(outer.inner, sketch=4)
        if not hold:
            handle._grouped_inputs = set()  # every input projected at its call
        ce(outer(x), y).backward()
        handle.flush()
        return spy.steps([4])[0]

    calls = _count_projections(monkeypatch)
    held = rows(True)
    assert calls == [9, 1]
    calls.clear()
    at_call = rows(False)
    assert calls == []
    np.testing.assert_allclose(held, at_call, rtol=1e-5, atol=1e-6 * np.abs(at_call).max())


@needs_hooks_query
def test_a_linear_input_written_in_place_after_its_forward_is_refused_and_the_step_dropped():
    class WritesItsInput(_Blocks):
        def forward(self, x):
            x = x * 1.0
            h = self.q[0](x) + self.q[1](x)
            x.mul_(2.0)  # autograd refuses this backward too: q's weight gradients need x as it was
            return self.head((h + x).mean(1))

    torch.manual_seed(0)
    model = WritesItsInput()
    x, y = _data((5, 8), "class", b=4)
    sampler, handle, spy = watched(model, sketch=4)
    with pytest.raises(UnsupportedModelError, match="modified by an in-place operation"):
        ce(model(x), y).backward()
    handle.flush()
    assert spy.rows == [] and sampler.pending == 64
    model.forward = types.MethodType(_Blocks.forward, model)  # the next step goes as usual
    ce(model(x), y).backward()
    handle.flush()
    assert sampler.pending == 60
    assert_rows(spy.steps([4])[0], exact_rows(handle, model, ce, x, y)[0])


class SequenceFirst(nn.Module):
    """PyTorch's language-modeling tutorial layout: [T, B] ids in, torch's default transformer layers
    (batch_first=False), [T, B, V] logits out; or, as a classifier, mean over T, a norm and a head on [B, E]."""

    def __init__(self, kind="lm"):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.emb = nn.Embedding(11, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(8)
        self.dec = nn.Linear(8, 11 if kind == "lm" else 3)

    def forward(self, src):
        t = src.shape[0]
        h = self.enc(self.emb(src), mask=nn.Transformer.generate_square_subsequent_mask(t), is_causal=True)
        return self.dec(h if self.kind == "lm" else self.norm(h.mean(0)))


def _seq_loss(out, y, reduction="mean"):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)


@pytest.mark.parametrize("kind", ["lm", "classifier"])
@pytest.mark.parametrize("sketch", SKETCHES)
def test_a_sequence_first_model_is_watched_with_batch_first_false(kind, sketch):
    # torch's transformer layers default to batch_first=False, and its language-modeling tutorial feeds
    # [T, B] ids throughout. With watch(batch_first=False) every layer's input has the batch in dim 1
    # (2-D inputs, pooled, in dim 0); the rows equal each example's own gradient (one backward per
    # example, through the same projection).
    model = SequenceFirst(kind)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (6, 4), generator=g)
    y = torch.randint(0, 11, (6, 4), generator=g) if kind == "lm" else torch.tensor([0, 2, 1, 2])
    sampler, handle, spy = watched(model, sketch=sketch, batch_first=False)
    _seq_loss(model(x), y).backward()
    handle.flush()
    assert sampler.pending == 64 - 4
    grads: Dict[str, List[torch.Tensor]] = {n: [] for n, _ in model.named_parameters()}
    for b in range(4):
        model.zero_grad()
        _seq_loss(model(x[:, b : b + 1]), y[:, b : b + 1] if kind == "lm" else y[b : b + 1]).backward()
        for n, p in model.named_parameters():
            grads[n].append(torch.zeros_like(p) if p.grad is None else p.grad.clone())  # lm: norm unused
    per_example = {n: torch.stack(gs) for n, gs in grads.items()}
    assert_rows(spy.rows[0], handle.project(per_example))
    if sketch is None:
        assert_rows(spy.rows[0], flat(per_example, 4))


def test_batch_first_false_refusals():
    refused(SequenceFirst(), UnsupportedInputError, "batch_first must be True or False", batch_first=1)
    # The default, batch_first=True, on a sequence-first model: refused, with the way out named.
    message = refused(SequenceFirst(), UnsupportedModelError, "sequence-first transformer layers")
    assert "watch(model, batch_first=False)" in message
    assert "self_attn" not in message.split("inside")[1]  # attention is recorded batch first in either layout
    # Layers whose batch dimension is not 1 in a sequence model (a convolution), and transformer layers
    # built batch first, under batch_first=False.
    refused(_SmallConvNet(), UnsupportedModelError, r"\['conv', 'norm'\] are not such layers", batch_first=False)
    refused(Encoder(), UnsupportedModelError, "built with batch_first=True", batch_first=False)
    refused(Encoder(), UnsupportedModelError, "built with batch_first=True", batch_first=False, exclude=["out"])


class Seq2Seq(nn.Module):
    """nn.Transformer (batch first): encoder self-attention, causal decoder self-attention, cross-attention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.tr = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        mask = nn.Transformer.generate_square_subsequent_mask(3)
        return self.out(self.tr(h, h[:, :3], tgt_mask=mask, tgt_is_causal=True).mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func over attention
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # nn.Transformer's own notice
@pytest.mark.parametrize("sketch", SKETCHES)
def test_a_whole_nn_transformer_is_watched(sketch):
    model = Seq2Seq()
    x, y = _data((5, 6), "class", b=4)
    rows, expected, grads, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    attention = [n for n, _, _ in handle.layers if n.endswith("attn.in_proj")]
    assert len(attention) == 3  # encoder self, decoder self, decoder cross
    if sketch is None:
        assert_rows(rows, flat(grads, 4))


class TiedLM(nn.Module):
    """A language model whose output layer is its embedding (GPT-2's and BERT's masked-LM heads)."""

    def __init__(self, head_first=False, head_bias=False, padding_idx=None):
        super().__init__()
        torch.manual_seed(0)
        if head_first:  # the head registered first: the shared parameter is named after it
            self.head = nn.Linear(6, 13, bias=head_bias)
        self.emb = nn.Embedding(13, 6, padding_idx=padding_idx)
        self.mid = nn.Linear(6, 6)
        if not head_first:
            self.head = nn.Linear(6, 13, bias=head_bias)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids)))).mean(1)


@pytest.mark.parametrize("variant", [{}, {"head_first": True, "head_bias": True, "padding_idx": 0}])
@pytest.mark.parametrize("sketch", SKETCHES)
def test_a_tied_output_layer_adds_its_part_into_the_embeddings_columns(variant, sketch):
    # The tied weight's per-example gradient is the sum of its two uses. The output layer's use was not
    # watched at all (named_parameters names a shared parameter once, after its first module), so rows
    # held only the embedding's part. It now goes through the embedding's projection into its columns.
    model = TiedLM(**variant)
    ids = torch.randint(0, 13, (4, 5), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 12, 3, 7])
    rows, expected, grads, handle = one_step(model, ids, y, ce, sketch)
    assert_rows(rows, expected)
    kinds = dict((n, kind) for n, kind, _ in handle.layers)
    assert kinds["head"].startswith("Linear (weight tied to 'emb'")
    if sketch is None:  # the rows are the per-example gradients, both uses of the tied weight summed
        tied = "head.weight" if variant.get("head_first") else "emb.weight"  # the first module's name
        order = [tied, "mid.weight", "mid.bias"] + (["head.bias"] if variant.get("head_bias") else [])
        assert_rows(rows, flat({n: grads[n] for n in order}, 4))
    handle.remove()
    # Left out by either layer's name, the tied weight is left out of both; leaving out the embedding
    # while the head's own bias stays would split the head, which is refused.
    for name in ("emb", "head"):
        if variant.get("head_bias") and name == "emb":
            refused(model, UnsupportedInputError, "exclude=", sketch=sketch, exclude=[name])
        else:
            handle = GraBSampler(n=8).watch(model, sketch=sketch, exclude=[name])
            assert [n for n, _, _ in handle.layers] == ["mid"]
            handle.remove()


class SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # shared weight, own biases

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_weight_shared_by_two_linear_layers_or_an_unsketched_embedding_is_refused():
    refused(SharedLinear(), UnsupportedModelError, "belongs to both 'a' and 'b'")
    tied = TiedLM()
    tied.emb.max_norm = 1.0  # an embedding watch() cannot sketch (it rewrites its weight in the forward)
    refused(tied, UnsupportedModelError, "embedding is not sketched")


def test_data_parallel_over_several_devices_is_refused_and_on_one_is_the_model():
    # DataParallel's forward copies the model to each GPU and runs the copies in threads; the hooks would
    # meet copies they do not know (a KeyError inside the forward). On no or one device it runs the model.
    model = _mlp()
    dp = nn.DataParallel(model)  # no CUDA here: no devices, the module runs as it is
    x, y = _data((6,), "class", b=5)
    sampler, handle, spy = watched(dp, sketch=4)
    ce(dp(x), y).backward()
    handle.flush()
    expected, _ = exact_rows(handle, model, ce, x, y)  # torch.func on the module DataParallel holds
    assert_rows(spy.rows[0], expected)
    handle.remove()
    dp.device_ids = [0, 1]  # what DataParallel over two GPUs holds
    refused(dp, UnsupportedModelError, "DataParallel over 2 devices")


def test_watching_the_same_model_again_replaces_the_handle_and_another_model_is_refused():
    # A notebook cell run twice: two handles fed every step's rows twice (a ShapeError, or rows matched
    # to the wrong examples).
    model = _mlp()
    sampler, first, spy = watched(model, sketch=4)
    x, y = _data((6,), "class", b=5)
    ce(model(x), y).backward()  # gathered by the first handle, not yet fed
    second = sampler.watch(model, sketch=4)
    assert first.removed and not second.removed and sampler._watchers == [second]
    # The second handle's alone: one on each Linear layer, two on the model (capture/audit.py, and the one
    # that leaves the mode following shared calls, capture/shared.py).
    assert sum(len(m._forward_hooks) for m in model.modules()) == 4
    assert [r.shape[0] for r in spy.rows] == [5]  # the first handle fed its step as it left
    ce(model(x), y).backward()
    second.flush()
    assert [r.shape[0] for r in spy.rows] == [5, 5] and sampler.pending == 64 - 10
    refused(_mlp(seed=1), UnsupportedInputError, "another model", sampler=sampler)
    assert sampler._watchers == [second]
    # A refused second watch() of the same model leaves the first handle attached.
    with pytest.raises(UnsupportedInputError):
        sampler.watch(model, sketch=0)
    assert sampler._watchers == [second] and not second.removed
    # A new sampler (the cell that builds it run again) takes the model over: the old sampler's handle
    # is removed, with a warning, and its unfed rows are dropped instead of fed to a sampler left behind.
    ce(model(x), y).backward()
    fresh = GraBSampler(n=64, ordering="grab", seed=0)
    it = iter(fresh)
    for _ in range(64):
        next(it)
    fresh_spy = Spy(fresh)
    with pytest.warns(RuntimeWarning, match="another sampler"):
        third = fresh.watch(model, sketch=4)
    assert second.removed and sampler._watchers == [] and fresh._watchers == [third]
    assert [r.shape[0] for r in spy.rows] == [5, 5]  # the dropped step never reached the old sampler
    assert sum(len(m._forward_hooks) for m in model.modules()) == 4
    ce(model(x), y).backward()
    third.flush()
    assert [r.shape[0] for r in fresh_spy.rows] == [5]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sketch": 0},
        {"sketch": -3},
        {"sketch": 2.5},
        {"sketch": True},
        {"loss_reduction": "x"},
        {"granularity": "token"},
        {"exclude": ["nothing_here"]},
        {"exclude": ["0", "missing.weight"]},
        {"seed": -1},
        {"scaler": object()},
    ],
)
def test_bad_arguments_raise_and_leave_nothing_behind(kwargs):
    model = _mlp()
    sampler = GraBSampler(n=8)
    with pytest.raises(UnsupportedInputError):
        sampler.watch(model, **kwargs)
    no_hooks(model)
    assert sampler._watchers == []


def test_excluding_everything_is_refused():
    model = _mlp()
    sampler = GraBSampler(n=8)
    with pytest.raises(UnsupportedModelError):
        sampler.watch(model, exclude=["0", "2"])
    no_hooks(model)
    assert sampler._watchers == []


# ---------------------------------------------------------------------------------------------- end to end
class Indexed(torch.utils.data.Dataset):
    def __init__(self, n=20, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def _train(ordering, sketch, epochs=3, seed=7, check_exact=False):
    """3 epochs through a DataLoader (batches of 8, 8, 4) with a watched model; returns what happened."""
    ds = Indexed()
    model = _mlp(seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sampler = GraBSampler(ds, ordering=ordering, seed=seed)
    handle = sampler.watch(model, sketch=sketch, non_blocking=True)  # background steps: the twin checks them
    spy = Spy(sampler)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler, drop_last=False)
    orders, batches = [], []
    for _ in range(epochs):
        order = []
        for x, y, idx in loader:
            order += idx.tolist()
            batches.append(len(idx))
            if check_exact:
                expected, _ = exact_rows(handle, model, ce, x, y)
            ce(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if check_exact:
                handle.flush()
                assert_rows(spy.rows[-1], expected)
        handle.flush()
        assert sampler.pending == 0
        orders.append(order)
    return orders, batches, spy, sampler, handle, model


@pytest.mark.parametrize("ordering", ["grab", "pair", "rr", "so"])
@pytest.mark.parametrize("sketch", SKETCHES)
def test_dataloader_epochs_match_a_twin_fed_by_hand(ordering, sketch):
    orders, batches, spy, sampler, handle, _ = _train(
        ordering, sketch, check_exact=(sketch is None and ordering in ("grab", "pair"))
    )
    assert batches == [8, 8, 4] * 3
    for order in orders:
        assert sorted(order) == list(range(20))
    twin = GraBSampler(n=20, ordering=ordering, seed=7)
    feed = iter(spy.steps([8, 8, 4] * 3)) if sampler.balances else None
    for order in orders:
        it = iter(twin)
        got = []
        for b in (8, 8, 4):
            got += [next(it) for _ in range(b)]
            if sampler.balances:
                rows = next(feed)
                assert rows.shape == (b, handle.width)
                twin.step(rows)
            else:
                twin.skip(b)
        assert got == order
        assert list(it) == []
    if sampler.balances:
        assert spy.skips == []
        assert all(kw.get("non_blocking") is True for kw in spy.kwargs)
    else:
        assert spy.rows == [] and sum(spy.skips) == 60
    assert list(sampler) == list(twin)  # the fourth epoch too


def test_grab_orders_depend_on_the_rows():
    # Guards the twin comparison: a twin fed other rows ends up with another order.
    orders, _, spy, _, handle, _ = _train("grab", 4)
    twin = GraBSampler(n=20, ordering="grab", seed=7)
    rng = np.random.default_rng(0)
    other = []
    for _ in range(3):
        it = iter(twin)
        order = []
        for b in (8, 8, 4):
            order += [next(it) for _ in range(b)]
            twin.step(rng.standard_normal((b, handle.width)).astype(np.float32))
        other.append(order)
    assert other[0] == orders[0]  # the first epoch is random, from the seed
    assert other[1:] != orders[1:]


def test_remove_detaches_and_the_context_manager_form():
    model = _mlp()
    x, y = _data((6,), "class", b=4)
    sampler, handle, spy = watched(model, sketch=4)
    ce(model(x), y).backward()
    handle.remove()  # feeds what is gathered first
    assert len(spy.rows) == 1 and sampler.pending == 60
    no_hooks(model)
    assert sampler._watchers == []
    ce(model(x), y).backward()
    sampler.synchronize()
    handle.flush()
    assert len(spy.rows) == 1 and sampler.pending == 60
    handle.remove()  # twice is fine

    with sampler.watch(model, sketch=4) as h2:
        assert sampler._watchers == [h2]
        ce(model(x), y).backward()
        ce(model(x[:3]), y[:3]).backward()
    assert sum(r.shape[0] for r in spy.rows) == 11
    assert sampler.pending == 53
    no_hooks(model)
    assert sampler._watchers == []

    # An exception inside the block drops the unfed rows and still detaches.
    with pytest.raises(RuntimeError, match="boom"):
        with sampler.watch(model, sketch=4):
            ce(model(x), y).backward()
            raise RuntimeError("boom")
    assert sum(r.shape[0] for r in spy.rows) == 11 and sampler.pending == 53
    no_hooks(model)


def test_state_dict_synchronize_and_pending_feed_the_gathered_step():
    model = _mlp()
    x, y = _data((6,), "class", b=4)
    sampler, handle, spy = watched(model, sketch=4)
    expected, _ = exact_rows(handle, model, ce, x, y)
    ce(model(x), y).backward()
    assert spy.rows == []
    sampler.state_dict()
    assert len(spy.rows) == 1
    assert_rows(spy.rows[0], expected)
    assert sampler.pending == 60
    ce(model(x[:2]), y[:2]).backward()
    sampler.synchronize()
    assert len(spy.rows) == 2 and spy.rows[1].shape[0] == 2
    ce(model(x[:3]), y[:3]).backward()
    assert sampler.pending == 55 and len(spy.rows) == 3


@pytest.mark.parametrize("between", ["state_dict", "synchronize", "pending", "flush"])
def test_feeding_between_a_forward_and_its_backward_keeps_the_step(between):
    # A checkpoint (or a look at pending) after the forward and before the backward must not lose the
    # step: its rows would be missing and every later row matched to the wrong indices.
    model = _mlp()
    (x, y), (x2, y2) = _data((6,), "class", b=4), _data((6,), "class", b=3, seed=5)
    sampler, handle, spy = watched(model, sketch=4)
    e1, _ = exact_rows(handle, model, ce, x, y)
    loss = ce(model(x), y)
    {"state_dict": sampler.state_dict, "synchronize": sampler.synchronize, "flush": handle.flush}.get(
        between, lambda: sampler.pending
    )()
    loss.backward()
    e2, _ = exact_rows(handle, model, ce, x2, y2)
    ce(model(x2), y2).backward()
    handle.flush()
    first, second = spy.steps([4, 3])
    assert_rows(first, e1)
    assert_rows(second, e2)
    assert sampler.pending == 57


# ---------------------------------------------------------------------------------------------- checkpoint / resume
def _resume_run(stop_after=None, state=None):
    """Epochs of 3 batches (8, 8, 4); with stop_after=k, returns a checkpoint after the k-th batch of epoch 2."""
    ds = Indexed()
    model = _mlp(seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sampler = GraBSampler(ds, ordering="grab", seed=3)
    sampler.watch(model, sketch=4)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sampler.load_state_dict(state["sampler"])
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler)
    seen = []
    for epoch in range(2):
        order = []
        for k, (x, y, idx) in enumerate(loader):
            order += idx.tolist()
            ce(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if state is None and epoch == 1 and k + 1 == stop_after:
                ckpt = {
                    "model": copy.deepcopy(model.state_dict()),
                    "opt": copy.deepcopy(opt.state_dict()),
                    "sampler": copy.deepcopy(sampler.state_dict()),
                }
                seen.append(("ckpt", ckpt, list(order)))
        seen.append(order)
    return seen


def test_resume_mid_epoch_under_watch_continues_the_uninterrupted_orders():
    full = _resume_run(stop_after=1)
    epoch1, (_, ckpt, before), epoch2 = full
    assert before == epoch2[:8]
    # The uninterrupted run, with a third epoch.
    ds = Indexed()
    model = _mlp(seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sampler = GraBSampler(ds, ordering="grab", seed=3)
    sampler.watch(model, sketch=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler)
    straight = []
    for _ in range(3):
        order = []
        for x, y, idx in loader:
            order += idx.tolist()
            ce(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        straight.append(order)
    assert straight[0] == epoch1 and straight[1] == epoch2
    resumed = _resume_run(state=ckpt)
    assert resumed[0] == epoch2[8:]  # the rest of the interrupted epoch
    assert resumed[1] == straight[2]  # and the next epoch, balanced with the rows of both halves
    assert straight[2] != straight[1]


def test_same_seed_same_rows_other_seed_other_rows():
    x, y = _data((6,), "class", b=4)
    rows = {}
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        model = _mlp()
        sampler, handle, spy = watched(model, sketch=4, seed=seed)
        ce(model(x), y).backward()
        handle.flush()
        rows[name] = spy.rows[0]
    np.testing.assert_array_equal(rows["a"], rows["b"])
    assert not np.allclose(rows["a"], rows["c"], atol=1e-3)
    # The projection's default seed is the sampler's.
    model = _mlp()
    sampler, handle, spy = watched(model, sketch=4, seed=11)
    assert handle.seed == 11
    h2 = GraBSampler(n=4, seed=11).watch(_mlp(), sketch=4)
    assert h2.seed == 11


# ---------------------------------------------------------------------------------------------- DistributedDataParallel
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sketch", SKETCHES)
def test_ddp_wrapped_model_gives_the_unwrapped_rows(sketch):
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    model = _mlp()
    plain = copy.deepcopy(model)
    x, y = _data((6,), "class", b=5)
    s_plain, h_plain, spy_plain = watched(plain, sketch=sketch)
    ce(plain(x), y).backward()
    h_plain.flush()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        sampler, handle, spy = watched(ddp, sketch=sketch)
        for _ in range(2):
            ce(ddp(x), y).backward()
        handle.flush()
        first, second = spy.steps([5, 5])
        np.testing.assert_allclose(first, spy_plain.rows[0], rtol=1e-5, atol=1e-7)
        grads, _ = per_example_gradients(model, ce, x, y)
        assert_rows(second, handle.project(grads))
        handle.remove()
        no_hooks(ddp)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("core_free", [True, False])
def test_non_blocking_by_default_only_when_a_core_is_free(monkeypatch, core_free):
    # Training on the CPU with torch's threads on every core, a background step competes with them:
    # non_blocking=None balances on the training thread then, in the background otherwise.
    x, y = _data((6,), "class", b=5)
    model = _mlp()
    sampler, handle, spy = watched(model, sketch=4)
    assert handle.non_blocking is None
    monkeypatch.setattr(handle._feeder, "_cores", torch.get_num_threads() + (1 if core_free else 0))
    ce(model(x), y).backward()
    handle.flush()
    assert spy.kwargs == [{"non_blocking": core_free}]
    handle._feeder._cpu_rows = False  # rows formed on a GPU: the host's cores are free for the balancing
    assert handle._feeder._background()
    for asked in (True, False):  # as asked, whatever the threads
        model = _mlp()
        sampler, handle, spy = watched(model, sketch=4, non_blocking=asked)
        monkeypatch.setattr(handle._feeder, "_cores", torch.get_num_threads() + (1 if core_free else 0))
        ce(model(x), y).backward()
        handle.flush()
        assert spy.kwargs == [{"non_blocking": asked}]
    with pytest.raises(UnsupportedInputError, match="non_blocking must be True, False or None"):
        GraBSampler(n=4).watch(_mlp(), non_blocking="yes")


def _hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


@pytest.mark.parametrize("sketch", SKETCHES)
def test_fsdp2_sharded_model_gives_the_unsharded_rows(sketch):
    # FSDP2 (fully_shard) turns the parameters into DTensors and adds forward hooks of its own that
    # gather them around each layer's call; the layers' inputs and output gradients, which the sketch
    # reads, are the unsharded model's.
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (fully_shard)")
    if torch_version() < (2, 7):
        pytest.skip("torch < 2.7: FSDP2's fully_shard on CPU tensors fails in torch itself (Stream.record_event)")
    model = _mlp()
    plain = copy.deepcopy(model)
    x, y = _data((6,), "class", b=5)
    s_plain, h_plain, spy_plain = watched(plain, sketch=sketch)
    for _ in range(2):
        ce(plain(x), y).backward()
    h_plain.flush()
    grads, _ = per_example_gradients(plain, ce, x, y)  # no optimizer step: the weights are unchanged
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        for m in model:
            if isinstance(m, nn.Linear):
                fsdp.fully_shard(m)
        fsdp.fully_shard(model)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        before = _hook_counts(model)
        sampler, handle, spy = watched(model, sketch=sketch)
        for _ in range(2):
            ce(model(x), y).backward()
        handle.flush()
        for rows, plain_rows in zip(spy.steps([5, 5]), spy_plain.steps([5, 5])):
            np.testing.assert_allclose(rows, plain_rows, rtol=1e-5, atol=1e-7)
        assert_rows(spy.steps([5, 5])[1], h_plain.project(grads))
        handle.remove()
        assert _hook_counts(model) == before  # FSDP's own hooks stay, watch()'s are gone
    finally:
        dist.destroy_process_group()


def test_excluding_part_of_a_layer_is_refused_with_advice():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    sampler = GraBSampler(n=8)
    with pytest.raises(UnsupportedInputError, match=r"exclude the layer \('0'\)"):
        sampler.watch(model, exclude=["0.bias"])
    no_hooks(model)
    assert sampler._watchers == []
    handle = sampler.watch(model, exclude=["0"])
    assert [name for name, _, _ in handle.layers] == ["2"]


def test_bf16_autocast_rows_match_float32_rows():
    # torch.autocast on the CPU runs the Linear layers in bfloat16: the hooks see bfloat16 inputs and
    # output gradients and sketch them in float32, so the rows are float32 rows up to bfloat16 rounding.
    model = _mlp()
    x, y = _data((6,), "class", b=8)
    rows32, _, _, handle32 = one_step(model, x, y, ce, 4)
    handle32.remove()
    sampler, handle, spy = watched(model, sketch=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ce(model(x), y)
    loss.backward()
    handle.flush()
    got = spy.rows[0]
    assert got.dtype == np.float32 and got.shape == rows32.shape
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, rows32, rtol=0.05, atol=0.05 * np.abs(rows32).max())
    assert not np.array_equal(got, rows32)  # bfloat16 really ran


@pytest.mark.parametrize("where", ["forward", "forward and backward", "saved-tensor hooks"])
@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_rows_under_autocast_are_float32_sketches_of_its_gradients(case, sketch, where):
    # The hooks run inside the user's torch.autocast: a projection made in the forward hook ran in
    # bfloat16 there and met a float32 product at the backward (RuntimeError: a 3-d Linear's or a
    # LayerNorm's sketch; a Trainer(bf16=True) on MiniLM). Also a backward called inside the autocast
    # block (a common slip), and saved-tensor hooks on (every input then projected in the forward).
    make, shape, target = LAYER_CASES[case]
    if where == "saved-tensor hooks" and case.startswith("prelu") and not HOOKS_QUERY:
        pytest.skip("torch < 2.8: torch.func (PReLU's rows) cannot run in a backward inside saved-tensor hooks")
    torch.manual_seed(0)
    model = make()
    x, y = _data(shape, target)
    model(x[:1])
    loss_fn = ce if target == "class" else mse
    sampler, handle, spy = watched(model, sketch=sketch)
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with hooks if where == "saved-tensor hooks" else contextlib.nullcontext():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
            if where == "forward and backward":
                loss.backward()
        if where != "forward and backward":
            loss.backward()
    handle.flush()
    got = spy.rows[0]
    # The float32 gradients of the same model, projected: bfloat16's forward moves them by its rounding.
    expected, _ = exact_rows(handle, model, loss_fn, x, y)
    expected = np.asarray(expected)
    assert got.dtype == np.float32 and got.shape == expected.shape
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() > 0.99, cos
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(expected, axis=1), rtol=0.05)


@pytest.mark.parametrize("sketch", [None, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("make, side", [(_cuda_model, 8), (_CudaTokens, 4)], ids=["conv-mlp", "tokens"])
def test_rows_under_autocast_sum_to_its_batch_gradient_in_float32(make, side, dtype, sketch):
    # tests/test_watch_cuda.py's test on the CPU. With sketch=8 the tokens model's inputs are projected at
    # the end of the forward, inside the autocast block (a dtype error before, at the grouped product);
    # its rows' mean is ten times closer to the float32 model's gradient than autocast's own (whose
    # weight-gradient sums over 256 positions ran in bfloat16 on this CPU).
    rows, mixed, full = autocast_rows_and_gradients(make, side, "cpu", dtype, sketch)
    assert_rows_follow_autocast(rows, mixed, full, within=0.05, farther=1.1, slack=1e-4)


def test_full_precision_turns_autocast_off_only_where_it_is_on():
    from torchgrab._autocast import full_precision

    with full_precision():
        assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with full_precision():
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")  # back on after it
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_a_layer_left_without_columns_by_the_budget_is_not_hooked():
    # A bias-free convolution whose weight the budget leaves out has no columns at all: it must not
    # break a step (it used to raise IndexError when its empty block came first).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    sampler, handle, spy = watched(model, n=16, sketch=32, budget=0.25)
    assert ("0", "Conv (weight left out: budget)", 0) in handle.layers
    assert not model[0]._forward_hooks
    for idx in (slice(0, 8), slice(8, 16)):
        ce(model(x[idx]), y[idx]).backward()
    handle.flush()
    assert sum(r.shape[0] for r in spy.rows) == 16 and sampler.pending == 0


class _WideDecoderLM(nn.Module):
    """Token ids -> logits over a vocabulary wide enough that a Gaussian output side costs more than the
    default budget allows (out * 32 per token against a quarter of in * out, plus 2^17)."""

    def __init__(self, vocab=6000, dim=16):
        super().__init__()
        self.emb = nn.Embedding(50, dim)
        self.decoder = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.decoder(torch.tanh(self.emb(ids)))


def test_a_decoder_too_wide_for_a_gaussian_output_side_is_count_sketched_not_left_out():
    # A language model's decoder over its vocabulary holds half its parameters; under the budget its
    # Gaussian output side alone costs too much, so its weight used to be left out of the rows. Its output
    # side is count-sketched instead (out per token): the weight stays in, with the budget's k.
    torch.manual_seed(0)
    model = _WideDecoderLM()
    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 6000, (3, 5), generator=torch.Generator().manual_seed(2))
    rows, expected, _, handle = one_step(model, ids, y, _lm_loss, 32, budget=0.25)
    sk = handle._sketches[model.decoder]
    assert not sk.dropped and sk.p_out.count and not sk.p_in.count
    assert ("decoder", "Linear", 32 * 16 + 32) in handle.layers  # k_out 32, the 16 inputs exact, the bias
    assert_rows(rows, expected)
    # The decoder's block of the rows is the count sketch of each example's weight gradient, built here
    # from the tables alone: bucket h(i) of output i collects s(i) g_bi a_b^T.
    grads, _ = per_example_gradients(model, _lm_loss, ids, y)
    buckets, signs = sk.p_out._count_tables(torch.device("cpu"), torch.float32)
    w = grads["decoder.weight"] * signs[None, :, None]  # [B, vocab, 16]
    want = torch.zeros(3, 32, 16).index_add_(1, buckets, w).reshape(3, -1)
    start = sum(c for name, _, c in handle.layers[: [x[0] for x in handle.layers].index("decoder")])
    assert_rows(rows[:, start : start + 32 * 16], want)
    assert LinearSketch.fit(model.decoder, 32, 0.25) == (32, 16, COUNT_OUT)
    # A decoder whose Gaussian output side fits the budget keeps it (the rows of such models unchanged).
    assert LinearSketch.fit(nn.Linear(16, 3000), 32, 0.25) == (32, 16)


def test_resuming_with_other_sketch_settings_is_refused_before_anything_changes():
    model = _mlp()
    x, y = _data((6,), "class", b=8)
    sampler, handle, _ = watched(model, sketch=4)
    ce(model(x), y).backward()
    state = sampler.state_dict()
    handle.remove()
    # watch() first, then load: the load refuses and the fresh sampler stays as it was
    fresh = GraBSampler(n=64, ordering="grab", seed=0)
    other = fresh.watch(model, sketch=2)
    before = fresh.state_dict()
    with pytest.raises(StateDictError, match="watch the model with the settings"):
        fresh.load_state_dict(state)
    assert fresh.state_dict()["native"].keys() == before["native"].keys()
    assert fresh.state_dict()["yielded"] == before["yielded"] == 0
    other.remove()
    # load first, then watch(): watch() refuses and attaches nothing
    fresh.load_state_dict(state)
    with pytest.raises(ShapeError, match="watch\\(\\) with these settings gives K"):
        fresh.watch(model, sketch=2)
    no_hooks(model)
    assert fresh._watchers == []
    fresh.watch(model, sketch=4)  # the saved settings are accepted


def test_blocks_still_in_flight_are_fed_in_order(monkeypatch):
    # Rows from a GPU wait in flight until their copy is done; several blocks may wait at once. Feeding
    # one must not feed the later ones before it (a sampler call inside the step once did: the check of
    # the pending count fed the rest first, and their rows went to the wrong indices).
    import torchgrab.capture.feed as feed_module

    monkeypatch.setattr(feed_module, "FEED_EVERY", 1)  # every step shipped at once
    model = _mlp()
    sampler, handle, spy = watched(model, n=24, sketch=4)
    feed = handle._feeder.feed
    handle._feeder.feed = lambda block: feed(block) if block else None  # copies "not done" until a blocking wait
    for k, b in enumerate((4, 3, 5)):
        x, y = _data((6,), "class", b=b, seed=20 + k)
        ce(model(x), y).backward()
    handle._feeder.feed = feed
    handle.flush()
    assert [r.shape[0] for r in spy.rows] == [4, 3, 5]
    twin = GraBSampler(n=24, ordering="grab", seed=0)
    it = iter(twin)
    for _ in range(24):
        next(it)
    for rows in spy.rows:
        twin.step(rows)
    assert twin.state_dict()["stepped"] == sampler.state_dict()["stepped"] == 12
    assert list(sampler) == list(twin)


@pytest.mark.parametrize("ordering", ["grab", "pair", "recursive", "recursive-pair", "herding", "greedy", "mean"])
def test_reused_row_blocks_leave_every_ordering_as_fed_copies_would(monkeypatch, ordering):
    # On the CPU the handle writes each block of rows into a buffer it reuses once the sampler is done
    # with it (the background step of the block before the last one has always finished). An ordering
    # that kept reading a reused buffer (one storing the epoch's rows, a step still running) would build
    # another order than a twin fed copies of the same rows.
    import torchgrab.capture.feed as feed_module
    import torchgrab.sampler as sampler_module

    monkeypatch.setattr(feed_module, "FEED_EVERY", 2)
    monkeypatch.setattr(sampler_module, "_BACKGROUND_MIN_ELEMENTS", 0)  # every step in the background
    model = _mlp()
    sampler, handle, spy = watched(model, n=48, sketch=4, ordering=ordering)
    pointers = []
    new_block = handle._feeder._new_block
    handle._feeder._new_block = lambda n, device, width: (lambda t: (pointers.append(t.data_ptr()), t)[1])(
        new_block(n, device, width)
    )
    for k in range(12):
        x, y = _data((6,), "class", b=4, seed=40 + k)
        ce(model(x), y).backward()
    handle.flush()
    assert len(pointers) == 6 and len(set(pointers)) < len(pointers)  # blocks were reused
    twin = GraBSampler(n=48, ordering=ordering, seed=0)
    it = iter(twin)
    for _ in range(48):
        next(it)
    for rows in spy.rows:
        twin.step(rows)
    assert sum(r.shape[0] for r in spy.rows) == 48
    assert list(sampler) == list(twin)
    assert_same_state(sampler.state_dict()["native"], twin.state_dict()["native"])  # sums, stored rows: bit for bit


# ---------------------------------------------------------------------------------------------- CPU kernels
class _Twice(nn.Module):
    """A wide Linear (count-sketched input), one with a Gaussian output factor called twice, two
    same-shaped siblings (grouped, not direct) and a convolution (torch pieces), in one step."""

    def __init__(self, frozen=False):
        super().__init__()
        self.wide = nn.Linear(400, 5)
        self.mid = nn.Linear(5, 20)
        self.a, self.b = nn.Linear(20, 7), nn.Linear(20, 7)
        self.conv = nn.Conv1d(1, 2, 3)
        if frozen:
            self.wide.weight.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.wide(x))
        h = torch.tanh(self.mid(h)) + torch.tanh(self.mid(h * 0.5))  # mid called twice: its rows add up
        h = self.a(h) + self.b(h)
        return self.conv(h.unsqueeze(1)).flatten(1)[:, :3]


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_direct_cpu_kernels_give_the_torch_paths_rows(monkeypatch, frozen, reduction):
    # On the CPU a Linear layer's rows are written by one Rust pass straight into the step's row buffer
    # (LayerSketch.rows_into), with the loss's scaling folded in; the other layers' pieces are copied in
    # beside them. The rows must be those of the torch path (outer products, concatenation, scaling),
    # and both must be the projected exact per-example gradients.
    from torchgrab.capture.layers import LinearSketch

    per_layer = {"wide": (5, 64), "mid": (4, 4)}  # count sketch 400 -> 64; Gaussian 20 -> 4 outputs
    x, y = _data((400,), "class", b=6, seed=3)
    got = {}
    for path in ("direct", "torch"):
        if path == "torch":
            monkeypatch.setattr(LinearSketch, "rows_into", lambda self, *a: None)
        torch.manual_seed(0)
        model = _Twice(frozen)
        sampler, handle, spy = watched(model, sketch=4, per_layer=per_layer, loss_reduction=reduction)
        handle.loss_factor = lambda: 0.5  # an integration's loss divisor: rows are multiplied by it
        assert handle._alone[handle._sketches[model.wide]] and not handle._alone[handle._sketches[model.a]]
        for k in range(2):  # two steps: the second writes into the slot after the first's
            xk, yk = x[3 * k : 3 * k + 3], y[3 * k : 3 * k + 3]
            ce(model(xk), yk, reduction=reduction).backward()
        handle.flush()
        got[path] = spy.steps([3, 3])
        expected = exact_rows(handle, model, ce, x[3:], y[3:])[0] * 0.5
        assert_rows(got[path][1], expected)
    for d, t in zip(got["direct"], got["torch"]):
        np.testing.assert_allclose(d, t, rtol=1e-6, atol=1e-6 * np.abs(t).max())


class _BiasConvs(nn.Module):
    """Convolutions whose weights are frozen (their biases alone are sketched, exactly, as LeNet's under the
    budget), one grouped, one called twice in a forward, and a Linear head written by its Rust kernel."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, groups=2)
        self.head = nn.Linear(6 * 3 * 3, 3)
        for conv in (self.c1, self.c2):
            conv.weight.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c1(h[:, :2])) + h  # c1 called twice: its rows add up
        return self.head(torch.tanh(self.c2(h)).flatten(1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_conv_bias_rows_are_written_directly(monkeypatch, reduction):
    # A convolution whose bias alone is sketched (exact channel sums) writes its rows into the step's
    # slot of the row buffer, as a Linear layer's kernel does: with every block written so, the step's
    # rows are complete as they stand (no pieces copied in, no scan for non-finite values). The rows
    # must be the torch path's, and both the exact per-example gradients, scaled by the loss's factor.
    from torchgrab.capture.layers import ConvSketch
    from torchgrab.capture.watch import WatchHandle

    x, y = _data((2, 5, 5), "class", b=6, seed=4)
    all_direct = []
    real = WatchHandle._all_direct
    monkeypatch.setattr(
        WatchHandle, "_all_direct", lambda self, step: all_direct.append(real(self, step)) or all_direct[-1]
    )
    got = {}
    for path in ("direct", "torch"):
        if path == "torch":
            monkeypatch.setattr(ConvSketch, "rows_into", lambda self, *a: None)
        all_direct.clear()
        torch.manual_seed(0)
        model = _BiasConvs()
        sampler, handle, spy = watched(model, sketch=4, loss_reduction=reduction)
        assert handle.layers[:2] == [("c1", "Conv", 4), ("c2", "Conv", 6)]  # the biases' channels alone
        handle.loss_factor = lambda: 0.5
        for k in range(2):  # two steps: the second writes into the slot after the first's
            xk, yk = x[3 * k : 3 * k + 3], y[3 * k : 3 * k + 3]
            ce(model(xk), yk, reduction=reduction).backward()
        handle.flush()
        got[path] = spy.steps([3, 3])
        assert all_direct and all(all_direct) == (path == "direct")
        expected = exact_rows(handle, model, ce, x[3:], y[3:])[0] * 0.5
        assert_rows(got[path][1], expected)
    for d, t in zip(got["direct"], got["torch"]):
        np.testing.assert_allclose(d, t, rtol=1e-6, atol=1e-6 * np.abs(t).max())


def test_conv_bias_direct_rows_say_whether_they_are_finite():
    # What rows_into returns decides whether a step's rows are scanned for inf/NaN before balancing.
    model = _BiasConvs()
    _, handle, _ = watched(model, sketch=4)
    sk = handle._sketches[model.c1]
    out = np.zeros((2, 4), np.float32)
    g = torch.ones(2, 4, 5, 5)
    assert sk.rows_into(model.c1, None, g, out, 2.0, False) is True
    assert np.all(out == 50.0)  # 25 positions, times 2
    assert sk.rows_into(model.c1, None, g, out, 1.0, True) is True and np.all(out == 75.0)
    g[1, 3, 0, 0] = float("inf")
    assert sk.rows_into(model.c1, None, g, out, 2.0, False) is False
    assert sk.rows_into(model.c1, None, g.double(), out, 2.0, False) is None  # not a kernel input: torch path
    assert sk.rows_into(model.c1, None, g[0], out, 2.0, False) is None  # an unbatched call: torch path
    channels_last = torch.ones(2, 4, 5, 5).to(memory_format=torch.channels_last)
    assert sk.rows_into(model.c1, None, channels_last, out, 2.0, False) is None  # the torch path sums it


def test_channel_sums_kernel_refuses_bad_input_and_writes_nothing():
    # The Rust kernel behind a convolution's direct bias rows: each example's channel sums, scaled. What it
    # refuses it refuses before writing, with the library's errors (no panic reaches Python).
    from torchgrab import _native
    from torchgrab.errors import ShapeError, UnsupportedInputError

    g = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 2, 2)
    out = np.full((2, 5), 7.0, np.float32)
    assert _native.channel_sums(g, 0.5, False, out[:, 1:4]) is True  # a strided slot of the row buffer
    np.testing.assert_array_equal(out[:, 1:4], 0.5 * g.reshape(2, 3, 4).sum(2))
    assert np.all(out[:, [0, 4]] == 7.0)
    before = out.copy()
    with pytest.raises(ShapeError):
        _native.channel_sums(g[0, 0, 0], 1.0, False, out[:, 1:4])  # one dimension: no channels
    with pytest.raises(ShapeError):
        _native.channel_sums(g, 1.0, False, out[:, 1:3])  # 3 channels into 2 columns
    with pytest.raises(UnsupportedInputError):
        _native.channel_sums(g[..., ::-1], 1.0, False, out[:, 1:4])  # not C-contiguous
    with pytest.raises(TypeError):
        _native.channel_sums(g.astype(np.float64), 1.0, False, out[:, 1:4])
    np.testing.assert_array_equal(out, before)


def _norm_kernel_calls(monkeypatch, pick):
    """The calls of _native.norm_sums from now on, each recorded as ``pick(args)``."""
    from torchgrab import _native

    calls, kernel = [], _native.norm_sums
    monkeypatch.setattr(_native, "norm_sums", lambda *a: calls.append(pick(a)) or kernel(*a))
    return calls


class _BatchNorms(nn.Module):
    """A BatchNorm2d called twice in a step (its rows add up), then a BatchNorm1d on [B, C]."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.bn1 = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():  # statistics and affine parameters away from their defaults
            for bn in (self.bn, self.bn1):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = self.bn(torch.relu(self.bn(self.c(x)) + 3.0))  # a large mean: the kernel's sums must not cancel
        return self.head(torch.tanh(self.bn1(h.mean((2, 3)))))


@pytest.mark.parametrize("sketch", SKETCHES)  # exact: rows_into the slot; 4 < 6 channels: projected by rows()
@pytest.mark.parametrize("frozen", [False, True])
def test_batchnorm_rows_by_the_kernel_are_the_torch_paths(monkeypatch, sketch, frozen):
    # BatchNorm's contributions (g * x_hat and g summed per channel) come from one Rust pass over its input
    # and output gradient (_native.norm_sums) where torch's form normalizes the input again, multiplies
    # and sums. The rows must be the torch path's: with the batch's statistics (training), and with the
    # running ones (a BatchNorm frozen in eval mode inside a training model, where they are the exact
    # per-example gradients).
    from torchgrab.capture.layers import BatchNormSketch

    x, y = _data((2, 5, 5), "class", b=6, seed=5)
    calls = _norm_kernel_calls(monkeypatch, lambda a: a[5:7])
    got = {}
    for path in ("kernel", "torch"):
        if path == "torch":
            monkeypatch.setattr(BatchNormSketch, "_sums", lambda self, *a: None)
        calls.clear()
        torch.manual_seed(0)
        model = _BatchNorms().train()
        if frozen:
            model.bn.eval()
            model.bn1.eval()
        if frozen:
            rows, expected, _, handle = one_step(model, x, y, ce, sketch)
            assert_rows(rows, expected)
        else:  # (no exact per-example gradients to compare with: the batch's statistics couple the examples)
            _, handle, spy = watched(model, sketch=sketch)
            ce(model(x), y).backward()
            handle.flush()
            rows = spy.rows[0]
        kinds = {name: kind for name, kind, _ in handle.layers}
        assert kinds["bn"] == kinds["bn1"] == "BatchNorm"
        got[path] = rows
        assert len(calls) == (3 if path == "kernel" else 0)  # bn twice, bn1 once; weight and bias each time
        assert all(c == (True, True) for c in calls)
    np.testing.assert_allclose(got["kernel"], got["torch"], rtol=1e-5, atol=1e-5 * np.abs(got["torch"]).max())


def test_batchnorm_rows_by_the_kernel_for_a_weight_or_a_bias_alone(monkeypatch):
    # One trainable affine parameter: the kernel writes that part's columns alone.
    x, y = _data((2, 5, 5), "class", b=6, seed=5)
    calls = _norm_kernel_calls(monkeypatch, lambda a: a[5:7])
    for frozen in ("weight", "bias"):
        calls.clear()
        torch.manual_seed(0)
        model = _BatchNorms().train()
        for bn in (model.bn, model.bn1):
            bn.eval()  # the running statistics: exact per-example gradients to compare with
            getattr(bn, frozen).requires_grad_(False)
        rows, expected, grads, handle = one_step(model, x, y, ce, None)
        widths = {n: w for n, _, w in handle.layers}
        assert widths["bn"] == widths["bn1"] == 6
        assert_rows(rows, expected)
        assert calls == [(frozen == "bias", frozen == "weight")] * 3


def test_batchnorm_kernel_without_running_statistics_uses_the_batchs(monkeypatch):
    # track_running_stats=False: in eval mode too BatchNorm normalizes by the batch's statistics, and so
    # must the rows (the kernel's path and the torch path agree, and neither reads running statistics).
    from torchgrab.capture.layers import BatchNormSketch

    x, y = _data((2, 5, 5), "class", b=6, seed=5)
    got = {}
    for path in ("kernel", "torch"):
        if path == "torch":
            monkeypatch.setattr(BatchNormSketch, "_sums", lambda self, *a: None)
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(), nn.Linear(36, 3)
        )
        model.train()
        model[1].eval()
        _, handle, spy = watched(model, sketch=None)
        ce(model(x), y).backward()
        handle.flush()
        got[path] = spy.rows[0]
    np.testing.assert_allclose(got["kernel"], got["torch"], rtol=1e-5, atol=1e-5 * np.abs(got["torch"]).max())


class _GroupNorms(nn.Module):
    """A GroupNorm called twice in a step on a feature map with a large mean, then one on [B, C]."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 6, 3, bias=False)
        self.gn = nn.GroupNorm(2, 6)
        self.gn1 = nn.GroupNorm(3, 6)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():  # affine parameters away from their defaults
            for gn in (self.gn, self.gn1):
                gn.weight.uniform_(0.5, 1.5)
                gn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = self.gn(torch.relu(self.gn(self.c(x)) + 3.0))
        return self.head(torch.tanh(self.gn1(h.mean((2, 3)))))


@pytest.mark.parametrize("sketch", SKETCHES)  # exact: rows_into the slot; 4 < 6 channels: projected by rows()
@pytest.mark.parametrize("frozen", [None, "weight", "bias"])
@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_groupnorm_rows_are_the_exact_per_example_gradients(monkeypatch, sketch, frozen, path):
    # GroupNorm normalizes each example by its own statistics over a group of channels: its per-example
    # gradients are defined, and the kernel's rows (_native.norm_sums with groups) must be torch.func's
    # through the same projection, for the weight and the bias together or alone; so must the torch
    # path's (F.group_norm), where the kernel declines.
    from torchgrab.capture.layers import GroupNormSketch

    if path == "torch":
        monkeypatch.setattr(GroupNormSketch, "_sums", lambda self, *a: None)
    x, y = _data((2, 5, 5), "class", b=6, seed=5)
    calls = _norm_kernel_calls(monkeypatch, lambda a: a[5:7] + a[10:])
    torch.manual_seed(0)
    model = _GroupNorms().train()
    if frozen:
        for gn in (model.gn, model.gn1):
            getattr(gn, frozen).requires_grad_(False)
    rows, expected, _, handle = one_step(model, x, y, ce, sketch)
    assert_rows(rows, expected)
    kinds = {name: kind for name, kind, _ in handle.layers}
    assert kinds["gn"] == kinds["gn1"] == "GroupNorm"
    parts = (frozen != "weight", frozen != "bias")
    # in backward order: gn1, then gn twice
    assert calls == ([parts + (3,), parts + (2,), parts + (2,)] if path == "kernel" else [])


@pytest.mark.parametrize("kind", ["BatchNorm", "GroupNorm"])
def test_norm_kernel_falls_back_to_torch_where_it_does_not_apply(kind):
    model = (_BatchNorms() if kind == "BatchNorm" else _GroupNorms()).train()
    _, handle, _ = watched(model, sketch=None)
    layer = model.bn if kind == "BatchNorm" else model.gn
    sk = handle._sketches[layer]
    out = np.zeros((2, 12), np.float32)
    x, g = torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3)
    assert sk.rows_into(layer, x, g, out, 1.0, False) is True
    assert sk.rows_into(layer, x.double(), g.double(), out, 1.0, False) is None  # not float32
    last = x.to(memory_format=torch.channels_last)
    assert sk.rows_into(layer, last, g, out, 1.0, False) is None  # channels last: the torch path
    assert sk.rows_into(layer, x[0], g[0], out, 1.0, False) is None  # an unbatched call
    g[1, 2, 0, 0] = float("nan")
    assert sk.rows_into(layer, x, g, out, 1.0, False) is False  # says the rows are not finite


class _InstanceNorms(nn.Module):
    """An InstanceNorm2d with running statistics on a feature map with a large mean, then an InstanceNorm1d."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 6, 3, bias=False)
        self.norm = nn.InstanceNorm2d(6, affine=True, track_running_stats=True)
        self.norm1 = nn.InstanceNorm1d(6, affine=True)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():  # statistics and affine parameters away from their defaults
            self.norm.running_mean.uniform_(2.5, 3.5)
            self.norm.running_var.uniform_(0.5, 2.0)
            for m in (self.norm, self.norm1):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = self.norm(self.c(x) + 3.0).flatten(2)  # [B, 6, 9] for InstanceNorm1d
        return self.head(torch.tanh(self.norm1(h)).mean(2))


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_instancenorm_rows_are_the_per_example_gradients(monkeypatch, sketch, frozen, path):
    # InstanceNorm normalizes each example by its own statistics per channel in training (also with running
    # statistics, which it then only updates), by the running ones in eval mode: both give per-example
    # gradients, here each example's gradient from a batch of one, through the kernel (groups = channels,
    # or the running statistics) and through the torch path (F.instance_norm) where the kernel declines.
    from torchgrab.capture.layers import InstanceNormSketch

    if path == "torch":
        monkeypatch.setattr(InstanceNormSketch, "_sums", lambda self, *a: None)

    x, y = _data((2, 5, 5), "class", b=4, seed=5)
    calls = _norm_kernel_calls(monkeypatch, lambda a: (a[3] is not None,) + a[10:])
    torch.manual_seed(0)
    model = _InstanceNorms().train()
    if frozen:
        model.norm.eval()
    ref = copy.deepcopy(model)
    _, handle, spy = watched(model, sketch=sketch)
    ce(model(x), y).backward()
    handle.flush()
    kinds = {name: kind for name, kind, _ in handle.layers}
    assert kinds["norm"] == kinds["norm1"] == "InstanceNorm"
    # in backward order: norm1 by its input statistics, then norm by its input or running statistics
    assert calls == ([(False, 6), (True, 0) if frozen else (False, 6)] if path == "kernel" else [])
    state = copy.deepcopy(ref.state_dict())
    grads = {n: [] for n, _ in ref.named_parameters()}
    for b in range(len(x)):  # each example alone: the statistics it has in the batch
        ref.load_state_dict(state)
        ref.zero_grad()
        ce(ref(x[b : b + 1]), y[b : b + 1]).backward()
        for n, p in ref.named_parameters():
            grads[n].append(p.grad.clone())
    assert_rows(spy.rows[0], handle.project({n: torch.stack(g) for n, g in grads.items()}))


class _UnbatchedInstanceNorm(nn.Module):
    """A batch of one whose InstanceNorm1d is called on the example without its batch dimension."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(2, 4, 2, bias=False)
        self.norm = nn.InstanceNorm1d(4, affine=True)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = self.norm(self.c(x)[0])  # [4, L]: unbatched
        return self.head(torch.tanh(h).mean(1))[None]


def test_instancenorm_unbatched_call_is_refused_naming_the_layer():
    # InstanceNorm takes an input without its batch dimension; watch() needs batch-first inputs to every
    # watched layer (the rows are per example), so the call is refused when it is recorded.
    x, y = _data((2, 7), "class", b=1, seed=3)
    torch.manual_seed(0)
    model = _UnbatchedInstanceNorm()
    _, handle, spy = watched(model)
    with pytest.raises(UnsupportedModelError, match=r"module 'norm' got an input of shape \(4, 6\)"):
        model(x)
    assert spy.rows == []


def test_norm_sums_kernel_refuses_bad_input_and_writes_nothing():
    from torchgrab import _native
    from torchgrab.errors import ShapeError, UnsupportedInputError

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    g = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    out = np.full((3, 6), 7.0, np.float32)
    assert _native.norm_sums(x, g, 1e-5, None, None, True, True, 0.5, False, out[:, 1:5]) is True
    xt = torch.from_numpy(x).double()
    xh = torch.nn.functional.batch_norm(xt, None, None, training=True, eps=1e-5).numpy()
    np.testing.assert_allclose(out[:, 1:3], 0.5 * (g * xh).sum((2, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 3:5], 0.5 * g.sum((2, 3)), rtol=1e-6, atol=1e-6)
    assert np.all(out[:, [0, 5]] == 7.0)
    for groups in (1, 2):  # each example's own statistics over its group of channels
        assert _native.norm_sums(x, g, 1e-5, None, None, True, False, 1.0, False, out[:, 1:3], groups) is True
        xh = torch.nn.functional.group_norm(xt, groups, eps=1e-5).numpy()
        np.testing.assert_allclose(out[:, 1:3], (g * xh).sum((2, 3)), rtol=1e-5, atol=1e-5)
    before = out.copy()
    mean, var = np.zeros(2, np.float32), np.ones(2, np.float32)
    bad = [
        (ShapeError, (x, g[:2], 1e-5, None, None, True, True, 1.0, False, out[:, 1:5])),  # shapes differ
        (ShapeError, (x[0, 0, 0], g[0, 0, 0], 1e-5, None, None, True, True, 1.0, False, out[:, 1:5])),  # 1-d
        (ShapeError, (x, g, 1e-5, None, None, True, True, 1.0, False, out[:, 1:4])),  # 4 columns needed
        (ShapeError, (x, g, 1e-5, mean, None, True, True, 1.0, False, out[:, 1:5])),  # mean without var
        (ShapeError, (x, g, 1e-5, mean[:1], var[:1], True, True, 1.0, False, out[:, 1:5])),  # 1 of 2 channels
        (ShapeError, (x, g, float("nan"), None, None, True, True, 1.0, False, out[:, 1:5])),
        (ShapeError, (x, g, 1e-5, mean, var, True, True, 1.0, False, out[:, 1:5], 2)),  # running and groups
        (ShapeError, (x, g, 1e-5, None, None, True, True, 1.0, False, out[:, 1:5], 3)),  # 3 groups of 2 channels
        (OverflowError, (x, g, 1e-5, None, None, True, True, 1.0, False, out[:, 1:5], -1)),
        (UnsupportedInputError, (x[..., ::-1], g, 1e-5, None, None, True, True, 1.0, False, out[:, 1:5])),
        (TypeError, (x.astype(np.float64), g, 1e-5, None, None, True, True, 1.0, False, out[:, 1:5])),
    ]
    for error, args in bad:
        with pytest.raises(error):
            _native.norm_sums(*args)
    np.testing.assert_array_equal(out, before)


def test_on_output_grad_calls_the_hook_with_its_arguments_and_the_gradient():
    # The one way every watched call gets its output's gradient: on the node that made the output (also
    # when the output is later written in place: the gradient of the layer's output, not of the write),
    # or on a leaf's own tensor hook (a module returning a parameter).
    from torchgrab.capture.watch import _on_output_grad

    seen = []
    w = torch.randn(3, requires_grad=True)
    out = w * 2.0
    _on_output_grad(out, lambda *a: seen.append(a), "node", 1)
    out.mul_(5.0)  # in place after the call: the hook still sees d loss / d (w * 2)
    _on_output_grad(w, lambda *a: seen.append(a), "leaf", 2)
    (out * torch.arange(3.0)).sum().backward()
    by = {a[0]: a for a in seen}
    assert sorted(by) == ["leaf", "node"] and by["node"][1] == 1 and by["leaf"][1] == 2
    torch.testing.assert_close(by["node"][2], 5.0 * torch.arange(3.0))
    torch.testing.assert_close(by["leaf"][2], 10.0 * torch.arange(3.0))


def test_native_count_sketch_equals_index_add_bit_for_bit():
    from torchgrab.capture.projection import Factor

    f = Factor(300, 64, 7, "layer", "in", count=True)
    buckets, signs = f._count_tables(torch.device("cpu"), torch.float32)
    base = torch.randn(5, 4, 600, generator=torch.Generator().manual_seed(2))
    # 2-D, strided 3-D, contiguous, and a [T, B, n] seen batch first (projected without a copy)
    for x in (
        base[:, 0, :300],
        base[:, :, ::2],
        base[:, 1, 300:].contiguous(),
        base[..., :300].contiguous().transpose(0, 1),
    ):
        want = x.new_zeros(*x.shape[:-1], 64).index_add_(x.dim() - 1, buckets, x * signs)
        assert torch.equal(f(x), want)
    # Other dtypes and tensors that need a gradient take torch's index_add_ path, with the same tables.
    x64 = base[:, 0, :300].double()
    assert torch.allclose(f(x64), f(x64.float()).double(), atol=1e-5)
    xg = base[:, 0, :300].clone().requires_grad_(True)
    f(xg).sum().backward()
    assert torch.equal(xg.grad[0], signs)


class _SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


class _SmallDecoder(nn.Module):
    """A transposed convolution (called with output_size=) and a PReLU (rows by torch.func)."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1)
        self.act = nn.PReLU(3)
        self.head = nn.Linear(3 * 6 * 6, 3)

    def forward(self, x):
        return self.head(self.act(self.up(x, output_size=(6, 6))).flatten(1))


@pytest.mark.parametrize("net", ["conv", "attention", "tokens", "replaced", "beit", "blocks", "wide", "decoder", "bag"])
@pytest.mark.parametrize("form", ["torch.compile(model)", "model.compile()"])
@pytest.mark.parametrize("sketch", SKETCHES)
def test_under_torch_compile_rows_equal_the_eager_ones_and_nothing_recompiles(form, sketch, net):
    # torch.compile traced the hooks and guarded on the handle's state (the rows gathered so far), so the
    # model was compiled again at every step until dynamo's recompile limit. The hooks now run outside
    # the graph: a compiled model is compiled in its first steps, then never again, and gives the rows
    # of the eager model. "aot_eager" runs dynamo and AOTAutograd (what decides guards and graph breaks)
    # without generating code, so the test needs no C++ compiler.
    dynamo = pytest.importorskip("torch._dynamo")
    from torch._dynamo.utils import counters

    if net in ("tokens", "replaced", "beit") and torch_version() < (2, 6):
        # torch 2.5's dynamo does not hand those operations to the function mode a hook enters, and
        # watch()'s check refuses the parameters it saw no per-example part of (UnsupportedModelError).
        pytest.skip("torch < 2.6: under torch.compile, parameters of no layer and replaced forwards are refused")

    if form == "model.compile()" and not hasattr(nn.Module, "compile"):
        pytest.skip("this torch has no nn.Module.compile")
    dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    # "tokens": parameters of no layer (the TorchFunctionMode of capture/direct.py, entered by a hook that
    # runs outside the graph); "replaced": layers whose class replaces its kind's forward (capture/inner.py);
    # "beit": a layer called as F.linear in such a mode, with a bias followed from two parameters;
    # "blocks": Linear inputs held for the backward's grouped projection, and norms sketched as a group;
    # "wide": a count-sketched Linear input held to the backward and sketched there (layers.HeldInput).
    eager, x_all = {
        "conv": lambda: (_SmallConvNet(), torch.randn(64, 2, 5, 5)),
        "attention": lambda: (Attention(mask="padding"), torch.randn(64, 5, 6)),
        "tokens": lambda: (_TokenModel(), torch.randn(64, 4, 4)),
        "replaced": lambda: (_ReplacedForwards(), torch.randint(0, 20, (64, 4))),
        "beit": lambda: (_Beit(), torch.randn(64, 3, 4)),
        "blocks": lambda: (_Blocks(), torch.randn(64, 5, 8)),  # inputs projected together, norms grouped
        "wide": lambda: (_WideHead(), torch.randn(64, 400)),  # a count-sketched input held to the backward
        "decoder": lambda: (_SmallDecoder(), torch.randn(64, 4, 3, 3)),  # a transposed convolution, a PReLU
        "bag": lambda: (_TextClassifier("mean", padding_idx=0), torch.randint(0, 30, (64, 5))),  # an EmbeddingBag
    }[net]()
    compiled_model = copy.deepcopy(eager)
    y_all = torch.randint(0, 3, (64,))
    runs = []
    per_layer = {"wide": (5, 64)} if net == "wide" and sketch else None
    for model in (eager, compiled_model):
        sampler, handle, spy = watched(model, sketch=sketch, per_layer=per_layer)
        assert bool(handle._held_inputs) == (per_layer is not None)
        if model is eager:
            call = model
        elif form == "model.compile()":
            model.compile(backend="aot_eager")
            call = model
        else:
            call = torch.compile(model, backend="aot_eager")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        frames = []
        for step in range(8):
            i = slice(8 * step, 8 * step + 8)
            ce(call(x_all[i]), y_all[i]).backward()
            opt.step()
            opt.zero_grad()
            frames.append(counters["frames"]["total"])  # frames dynamo compiled (a recompile is one more)
        handle.flush()
        runs.append((spy.steps([8] * 8), frames))
    (eager_rows, _), (compiled_rows, frames) = runs
    assert frames[1] > 0, "nothing was compiled: the test would not see a recompile"
    assert frames[-1] == frames[1], f"compiled again after the first steps: {frames}"
    for got, want in zip(compiled_rows, eager_rows):
        assert_rows(got, want)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func over attention
@pytest.mark.parametrize("sketch", SKETCHES)
def test_bert_masked_lm_head_tied_to_the_word_embeddings(sketch):
    # Hugging Face's BertForMaskedLM: the decoder's weight is the word embeddings' (tied), and its bias
    # is a parameter of the head module as well (registered twice). Rows against torch.func.
    transformers = pytest.importorskip("transformers")
    from hf_cases import tiny_bert_config

    torch.manual_seed(0)
    cfg = tiny_bert_config(vocab_size=40, hidden_size=8, intermediate_size=16, max_position_embeddings=8)
    cfg._attn_implementation = "eager"  # as examples/glue_finetune.py loads it

    class MLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = transformers.BertForMaskedLM(cfg)

        def forward(self, ids):
            return self.m(input_ids=ids).logits

    def token_loss(out, y, reduction="mean"):
        per = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
        per = per.reshape(y.shape).mean(1)  # each sentence's mean over its tokens
        return per.mean() if reduction == "mean" else per.sum()

    model = MLM().train()
    ids = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(1))
    rows, expected, _, handle = one_step(model, ids, ids, token_loss, sketch)
    kinds = dict((n, kind) for n, kind, _ in handle.layers)
    assert kinds["m.cls.predictions.decoder"].startswith("Linear (weight tied to 'm.bert.embeddings.word_embeddings'")
    assert_rows(rows, expected)
    handle.remove()


class _WideHead(nn.Module):
    """A wide Linear whose input is count-sketched, held to the backward (layers.HeldInput), then a Linear
    head; ``write`` writes the wide layer's input in place after its forward; ``ckpt`` runs the wide
    layer under non-reentrant checkpointing (autograd keeps no input: it is projected at the call)."""

    def __init__(self, write=False, ckpt=False):
        super().__init__()
        self.wide = nn.Linear(400, 5)
        self.head = nn.Linear(5, 3)
        self.write, self.ckpt = write, ckpt

    def forward(self, x):
        x = x * 1.0
        h = checkpoint(self.wide, x, use_reentrant=False) if self.ckpt else self.wide(x)
        if self.write:
            x.mul_(2.0)  # autograd refuses this backward too: the wide weight's gradient needs x as it was
        return self.head(torch.tanh(h))


def _count_outer_calls(monkeypatch):
    from torchgrab import _native

    calls = []
    kernel = _native.count_outer_rows

    def counted(*args):
        calls.append(args[1].shape)
        return kernel(*args)

    monkeypatch.setattr(_native, "count_outer_rows", counted)
    return calls


@needs_hooks_query
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_held_wide_input_gives_the_rows_of_its_projection_at_the_call_bit_for_bit(monkeypatch, reduction):
    # A lone Linear layer's count-sketched input is kept to the backward, where one Rust call sketches
    # it and writes the rows (_native.count_outer_rows). The rows are the very bits of the projection at
    # the layer's call followed by the rows kernel, and the projected exact per-example gradients.
    x, y = _data((400,), "class", b=6, seed=3)
    calls = _count_outer_calls(monkeypatch)
    got = {}
    for held in (True, False):
        torch.manual_seed(0)
        model = _WideHead()
        sampler, handle, spy = watched(model, sketch=4, per_layer={"wide": (5, 64)}, loss_reduction=reduction)
        assert handle._held_inputs == {handle._sketches[model.wide]}
        if not held:
            handle._held_inputs = set()
        for k in range(2):  # the second step writes into the block after the first
            ce(model(x[3 * k : 3 * k + 3]), y[3 * k : 3 * k + 3], reduction=reduction).backward()
        handle.flush()
        got[held] = spy.steps([3, 3])
        assert_rows(got[held][1], exact_rows(handle, model, ce, x[3:], y[3:])[0])
        assert len(calls) == 2, calls  # two steps held, and none more without holding
    for a, b in zip(got[True], got[False]):
        np.testing.assert_array_equal(a, b)


@needs_hooks_query
def test_a_held_input_written_in_place_is_refused_at_the_backward_and_the_step_dropped():
    torch.manual_seed(0)
    model = _WideHead(write=True)
    x, y = _data((400,), "class", b=4, seed=2)
    sampler, handle, spy = watched(model, sketch=4, per_layer={"wide": (5, 64)})
    with pytest.raises(UnsupportedModelError, match="modified by an in-place operation"):
        ce(model(x), y).backward()  # the head's rows were written into the step's slot before the refusal
    handle.flush()
    assert spy.rows == [] and sampler.pending == 64
    model.write = False  # the next steps go as usual, into the slot given back
    for _ in range(2):
        ce(model(x), y).backward()
    handle.flush()
    assert sampler.pending == 56
    for rows in spy.steps([4, 4]):
        assert_rows(rows, exact_rows(handle, model, ce, x, y)[0])


def test_a_checkpointed_wide_layer_projects_its_input_at_the_call(monkeypatch):
    calls = _count_outer_calls(monkeypatch)
    torch.manual_seed(0)
    model = _WideHead(ckpt=True)
    x, y = _data((400,), "class", b=4, seed=2)
    sampler, handle, spy = watched(model, sketch=4, per_layer={"wide": (5, 64)})
    ce(model(x), y).backward()
    handle.flush()
    assert calls == []  # nothing held: under saved-tensor hooks autograd keeps no input to hold
    model.ckpt = False  # (torch.func takes no saved-tensor hooks; the same function without them)
    assert_rows(spy.steps([4])[0], exact_rows(handle, model, ce, x, y)[0])


def test_count_outer_rows_kernel_refuses_bad_input_and_writes_nothing():
    # The Rust call behind a held input: the count sketch of x and the rows, the bits of count_sketch
    # then outer_rows; what it refuses it refuses before writing, with the library's errors.
    from torchgrab import _native
    from torchgrab.errors import GraBError, ShapeError

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 9)).astype(np.float32)
    g = rng.standard_normal((5, 2)).astype(np.float32)
    b = np.array([2, 0, 1, 2, 0, 1, 1, 0, 2])  # bucket of each column
    order = np.argsort(b, kind="stable").astype(np.uint32)
    starts = np.array([0, 3, 6, 9], np.uint32)
    signs = np.where(np.arange(9) % 2 == 0, 1.0, -1.0).astype(np.float32)[order]
    out = np.full((5, 10), 7.0, np.float32)
    want = out.copy()
    a = _native.count_sketch(x, order, starts, signs)
    assert _native.outer_rows(g, a, 0.5, True, False, want[:, 1:9]) is True
    assert _native.count_outer_rows(g, x, order, starts, signs, 0.5, True, False, out[:, 1:9]) is True
    np.testing.assert_array_equal(out, want)  # a strided slot of the row buffer, columns outside untouched
    before = out.copy()
    with pytest.raises(ShapeError):
        _native.count_outer_rows(g[:4], x, order, starts, signs, 1.0, True, False, out[:4, 1:9])  # 4 rows of g, 5 of x
    with pytest.raises(GraBError):
        _native.count_outer_rows(g, x[:, :8], order, starts, signs, 1.0, True, False, out[:, 1:9])  # column 8 of 8
    with pytest.raises(ShapeError):
        _native.count_outer_rows(g, x, order, starts, signs, 1.0, False, False, out[:, 1:9])  # 8 columns, 6 wanted
    with pytest.raises(TypeError):
        _native.count_outer_rows(g, x.astype(np.float64), order, starts, signs, 1.0, True, False, out[:, 1:9])
    np.testing.assert_array_equal(out, before)


# ---------------------------------------------------------------------------------------------- rows by their factors
class _Probe(nn.Module):
    """One wide Linear layer and nothing else watched (logistic regression, a linear probe): its steps
    hand the sampler the rows' factors (layers.LinearSketch.factors_into, _segments.OuterRows).
    ``twice`` calls it twice in a step (its rows are then a sum of outer products)."""

    def __init__(self, bias=True, twice=False):
        super().__init__()
        self.wide = nn.Linear(400, 5, bias=bias)
        self.twice = twice

    def forward(self, x):
        x = x * 1.0
        out = self.wide(x)
        return out + self.wide(torch.tanh(x)) if self.twice else out


def _twins(make, steps, ordering="grab", **kwargs):
    """Run ``steps`` (a callable(model) per step) on two identical models and samplers, one handing rows
    by their factors, one forced to hand rows; returns both (sampler, handle, spy, pending before the
    next epoch). The wide layer's input is count-sketched unless ``kwargs`` say otherwise."""
    runs = []
    kwargs = {"sketch": 4, "per_layer": {"wide": (5, 64)}, **kwargs}
    for factored in (True, False):
        torch.manual_seed(0)
        model = make()
        sampler, handle, spy = watched(model, ordering=ordering, **kwargs)
        assert handle._outer is handle._sketches[model.wide]
        if not factored:
            handle._outer = None
        for step in steps:
            step(model)
        handle.flush()
        runs.append((sampler, handle, spy))
    (s1, h1, spy1), (s2, h2, spy2) = runs
    assert not any(spy2.factored)
    assert_same_state(s1.state_dict()["native"], s2.state_dict()["native"])  # bit for bit
    # (blocks may split otherwise: a step of rows ships a block of factors, and the other way round)
    np.testing.assert_array_equal(np.concatenate(spy1.rows), np.concatenate(spy2.rows))
    assert s1.pending == s2.pending
    runs = [(s, h, spy, s.pending) for s, h, spy in runs]
    assert list(s1) == list(s2)  # (begins the next epoch)
    return runs


def _plain_step(x, y, reduction="mean"):
    return lambda model: ce(model(x), y, reduction=reduction).backward()


@pytest.mark.parametrize("ordering", ["grab", "pair", "herding", "recursive"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_a_lone_linear_layer_hands_its_rows_by_their_factors_with_the_same_bits(monkeypatch, ordering, reduction, bias):
    # Four steps of odd and even sizes (a pair waits across steps), fed two steps a block, balanced in the
    # background, blocks reused: the same state, bit for bit, as the rows written out, and the rows are
    # the projected exact per-example gradients.
    import torchgrab.capture.feed as feed_module
    import torchgrab.sampler as sampler_module

    monkeypatch.setattr(feed_module, "FEED_EVERY", 2)
    monkeypatch.setattr(sampler_module, "_BACKGROUND_MIN_ELEMENTS", 0)
    batches = [_data((400,), "class", b=b, seed=10 + b) for b in (5, 6, 3, 7)]
    steps = [_plain_step(x, y, reduction) for x, y in batches]
    runs = _twins(lambda: _Probe(bias=bias), steps, ordering=ordering, loss_reduction=reduction, non_blocking=True)
    sampler, handle, spy, pending = runs[0]
    assert len(spy.factored) == 3 and all(spy.factored)  # blocks [5], [6, 3], [7], each by its factors
    assert pending == 64 - 21
    torch.manual_seed(0)
    model = _Probe(bias=bias)
    x, y = batches[-1]
    want = exact_rows(handle, model, lambda o, t: ce(o, t, reduction=reduction), x, y)[0]
    assert_rows(spy.steps([5, 6, 3, 7])[-1], want)


@pytest.mark.parametrize("sketch", [None, 4])
def test_a_lone_linear_layer_with_an_exact_or_gaussian_input_side_hands_factors_too(sketch):
    # Linear(30, 5): exact (sketch=None: the factors are the output gradient and the input itself) or its
    # input projected at the call by a Gaussian factor (sketch=4), the factors then that projection.
    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide = nn.Linear(30, 5)

        def forward(self, x):
            return self.wide(x)

    batches = [_data((30,), "class", b=b, seed=20 + b) for b in (4, 7, 5)]
    runs = _twins(Small, [_plain_step(x, y) for x, y in batches], sketch=sketch, per_layer={})
    sampler, handle, spy, _ = runs[0]
    (sk,) = handle._sketches.values()
    assert sk.p_in.identity == (sketch is None) and not sk.p_in.count
    assert spy.factored == [True]
    torch.manual_seed(0)
    model = Small()
    x, y = batches[0]
    assert_rows(spy.steps([4, 7, 5])[0], exact_rows(handle, model, ce, x, y)[0])


def test_a_lone_layer_called_twice_in_a_step_hands_that_step_as_rows():
    # The second call's rows are added to the first's: no longer one outer product. The step's factors
    # become rows (RowFeeder.densify), the steps around it keep their factors, each block of one kind.
    batches = [_data((400,), "class", b=4, seed=s) for s in (1, 2, 3, 4)]

    def step(k, x, y):
        def run(model):
            model.twice = k == 2
            ce(model(x), y).backward()

        return run

    runs = _twins(_Probe, [step(k, x, y) for k, (x, y) in enumerate(batches)])
    spy = runs[0][2]
    assert True in spy.factored and False in spy.factored
    torch.manual_seed(0)
    model = _Probe(twice=True)
    x, y = batches[2]
    assert_rows(spy.steps([4, 4, 4, 4])[2], exact_rows(runs[0][1], model, ce, x, y)[0])


def test_factored_steps_with_a_grad_scaler_and_a_non_finite_step_match_the_rows():
    # Under a GradScaler the rows are divided by the scale: the step hands rows. Without one, a step
    # whose rows are not finite is skipped, whether it came by its factors or not.
    scaler = _scaler(init_scale=2.0**10, growth_interval=1)
    batches = [_data((400,), "class", b=4, seed=s) for s in (5, 6, 7)]
    bad_x = batches[1][0].clone()
    bad_x[0, 3] = float("inf")

    def scaled(x, y):
        return lambda model: scaler.scale(ce(model(x), y)).backward()

    runs = _twins(_Probe, [scaled(x, y) for x, y in batches], scaler=scaler)
    assert not any(runs[0][2].factored)
    steps = [_plain_step(*batches[0]), _plain_step(bad_x, batches[1][1]), _plain_step(*batches[2])]
    with pytest.warns(RuntimeWarning, match="not finite"):
        runs = _twins(_Probe, steps)
    for _, handle, spy, pending in runs:
        assert handle.skipped_steps == 1 and spy.skips == [4] and pending == 64 - 12


def test_a_step_of_sequences_hands_rows_between_factored_ones():
    # A step whose input is [B, T, in] (rows summed over positions: not one outer product) writes rows,
    # which ships the block of factors before it; the next step, whose non-contiguous input is projected
    # at the call (LinearSketch.hold keeps no such input), hands the factors of that projection.
    batches = [_data((400,), "class", b=4, seed=s) for s in (8, 9, 10)]
    seq_x = torch.randn(4, 3, 400)
    odd_x = torch.randn(400, 4).t()  # not contiguous

    def sequence_step(model):
        ce(model(seq_x).mean(1), batches[1][1]).backward()

    steps = [_plain_step(*batches[0]), sequence_step, _plain_step(odd_x, batches[2][1])]
    runs = _twins(_Probe, steps)
    spy = runs[0][2]
    assert spy.factored == [True, False, True]
    torch.manual_seed(0)
    model = _Probe()
    handle = runs[0][1]
    assert_rows(spy.steps([4, 4, 4])[2], exact_rows(handle, model, ce, odd_x, batches[2][1])[0])


def test_step_outer_and_its_kernels_refuse_bad_input_and_change_nothing():
    from torchgrab import _native
    from torchgrab.errors import NonFiniteGradientError

    rng = np.random.default_rng(1)
    f = rng.standard_normal((40, 2 + 6)).astype(np.float32)  # p = 2 outputs, 6 sketched inputs
    for background in (False, True):
        sampler = GraBSampler(n=40, ordering="grab", seed=0)
        order = list(sampler)
        before = sampler.state_dict()
        with pytest.raises(ShapeError):
            sampler.step(OuterRows(f, 0, True))  # p = 0
        with pytest.raises(ShapeError):
            sampler.step(OuterRows(f, 9, True))  # p past the factors
        with pytest.raises(ShapeError, match="C-contiguous"):
            sampler.step(OuterRows(np.asfortranarray(f), 2, True))
        bad = f.copy()
        bad[37, 1] = np.nan  # the last chunk: earlier ones are balanced before the kernel meets it
        with pytest.raises(NonFiniteGradientError):
            sampler.step(OuterRows(bad, 2, True), non_blocking=background)
            sampler.synchronize()
        assert_same_state(sampler.state_dict(), before)
        sampler.step(OuterRows(f, 2, True), non_blocking=background)
        twin = GraBSampler(n=40, ordering="grab", seed=0)
        assert list(twin) == order
        twin.step(OuterRows(f, 2, True).expand())
        assert_same_state(sampler.state_dict()["native"], twin.state_dict()["native"])
    with pytest.raises(ShapeError):
        _native.expand_outer(f, 9, True)
    rows = _native.expand_outer(f[:3], 2, True)
    want = np.concatenate([(f[:3, :2, None] * f[:3, None, 2:]).reshape(3, -1), f[:3, :2]], axis=1)
    np.testing.assert_array_equal(rows, want)
    x = rng.standard_normal((3, 9)).astype(np.float32)
    order_t = np.arange(9, dtype=np.uint32)
    starts = np.array([0, 3, 6, 9], np.uint32)
    signs = np.ones(9, np.float32)
    out = np.full((3, 6), 7.0, np.float32)  # p + k = 2 + 3 = 5 columns wanted
    with pytest.raises(ShapeError):
        _native.count_factors(f[:3, :2].copy(), x, order_t, starts, signs, 1.0, out)
    assert (out == 7.0).all()


@pytest.mark.parametrize("device_path", ["always", "never"])
def test_outer_rows_take_the_path_their_rows_would(device_path):
    # A sampler on the on-device path (device_path="always", here on the CPU) balances rows by their
    # Gram products: factors are expanded for it, and later steps of rows find the path they expect.
    f = np.random.default_rng(3).standard_normal((6, 2 + 3)).astype(np.float32)
    a = GraBSampler(n=12, ordering="grab", seed=0, device_path=device_path)
    b = GraBSampler(n=12, ordering="grab", seed=0, device_path=device_path)
    list(a), list(b)
    a.step(OuterRows(f, 2, True))
    a.step(OuterRows(f, 2, True).expand())  # rows after factors: the same path
    rows = OuterRows(f, 2, True).expand()
    b.step(rows)
    b.step(rows.copy())
    assert (a._ondevice is not None) == (device_path == "always")
    assert_same_state(a.state_dict(), b.state_dict())


def test_outer_rows_reach_unit_samplers_as_rows():
    # A sampler of units of two examples takes rows per example and averages them: factors are expanded.
    f = np.random.default_rng(2).standard_normal((4, 2 + 3)).astype(np.float32)
    a, b = (
        GraBSampler(n=8, ordering="grab", seed=0, unit_size=2),
        GraBSampler(n=8, ordering="grab", seed=0, unit_size=2),
    )
    list(a), list(b)
    a.step(OuterRows(f, 2, False))
    b.step(OuterRows(f, 2, False).expand())
    assert_same_state(a.state_dict()["native"], b.state_dict()["native"])


# ---------------------------------------------------------------------------------------------- EmbeddingBag
class _TextClassifier(nn.Module):
    """The text classification tutorial's model: an EmbeddingBag over each text's tokens (end to end, cut by
    offsets, or a [B, L] batch), then a Linear layer."""

    def __init__(self, mode="mean", padding_idx=None, include_last_offset=False, vocab=30, dim=6):
        super().__init__()
        self.emb = nn.EmbeddingBag(
            vocab, dim, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset
        )
        self.fc = nn.Linear(dim, 3)

    def forward(self, text, offsets=None, per_sample_weights=None):
        return self.fc(torch.tanh(self.emb(text, offsets, per_sample_weights=per_sample_weights)))


def _bag_batch(form, include_last_offset=False, weights=False):
    """(model's positional arguments, the same per example, labels): 4 texts, one empty, token 0 twice."""
    texts = [[3, 0, 7, 7, 12], [29], [], [0, 5, 9, 21, 4, 4, 18]]
    g = torch.Generator().manual_seed(2)
    psw = [torch.rand(len(t), generator=g) + 0.5 for t in texts]
    y = torch.tensor([0, 2, 1, 1])
    if form == "2d":  # equal lengths: every text cut or padded with id 0 to 5
        texts = [(t + [0] * 5)[:5] for t in texts]
        psw = [torch.cat([p, torch.ones(5)])[:5] for p in psw]
        batch = [torch.tensor(texts), None, torch.stack(psw) if weights else None]
        each = [[torch.tensor([t]), None, p[None] if weights else None] for t, p in zip(texts, psw)]
        return batch, each, y
    lengths = torch.tensor([len(t) for t in texts])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    offsets = offsets if include_last_offset else offsets[:-1]
    batch = [torch.tensor([i for t in texts for i in t]), offsets, torch.cat(psw) if weights else None]
    each = []
    for t, p in zip(texts, psw):
        off = torch.tensor([0, len(t)] if include_last_offset else [0])
        each.append([torch.tensor(t, dtype=torch.long), off, p if weights else None])
    return batch, each, y


def _each_texts_gradients(model, each, y):
    """{name: [B, *shape]}: each text's gradient by its own forward and backward, alone (``each`` holds
    its arguments)."""
    grads = {n: [] for n, _ in model.named_parameters()}
    for args, label in zip(each, y):
        model.zero_grad()
        ce(model(*args), label[None]).backward()
        for n, p in model.named_parameters():
            grads[n].append(p.grad.clone())
    return {n: torch.stack(g) for n, g in grads.items()}


@pytest.mark.parametrize("path", ["table", "scatter"])
@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize(
    "mode,form,padding_idx,include_last_offset,weights",
    [
        ("mean", "offsets", None, False, False),
        ("mean", "offsets", 0, False, False),  # id 0 left out of its bag and of the bag's count
        ("sum", "offsets", None, True, True),  # per_sample_weights, offsets with the end appended
        ("sum", "offsets", 0, False, False),
        ("mean", "2d", 0, False, False),
        ("sum", "2d", None, False, True),
    ],
)
def test_embedding_bag_rows_are_each_texts_gradient(
    mode, form, padding_idx, include_last_offset, weights, sketch, path, monkeypatch
):
    # model(text, offsets): the model's first input is the batch's tokens end to end, so the step's batch
    # is read from the offsets. Each example's gradient by its own forward and backward, alone. The bags'
    # vocabulary side by F.embedding_bag over the table of signed one-hot rows, or by a scatter-add of
    # each token's weight past ONEHOT_TABLE_MAX.
    _embedding_path(monkeypatch, path)
    torch.manual_seed(0)
    model = _TextClassifier(mode, padding_idx, include_last_offset)
    batch, each, y = _bag_batch(form, include_last_offset, weights)
    sampler, handle, spy = watched(model, sketch=sketch)
    assert [n for n, _, _ in handle.layers] == ["emb", "fc"]
    ce(model(*batch), y).backward()
    assert bool(handle._sketches[model.emb]._onehots) == (path == "table")
    handle.flush()
    assert len(spy.rows) == 1 and sampler.pending == 64 - 4  # four examples, not the tokens' count
    grads = _each_texts_gradients(model, each, y)
    if form == "offsets":
        assert grads["emb.weight"][2].abs().max() == 0  # the empty text
    assert_rows(spy.rows[0], handle.project(grads))
    if sketch is None:
        assert_rows(spy.rows[0], flat(grads, 4))


@pytest.mark.parametrize("ordering", ["grab", "rr"])
def test_embedding_bag_in_a_dataloader_loop_feeds_one_row_per_text(ordering):
    # The tutorial's loop: a collate_fn that puts the texts end to end with their offsets. An ordering
    # without rows (rr) counts the texts too.
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(1, 30, (int(n),), generator=g) for n in torch.randint(1, 9, (40,), generator=g)]
    labels = torch.randint(0, 3, (40,), generator=g)
    data = list(zip(texts, labels))

    def collate(items):
        text = torch.cat([t for t, _ in items])
        offsets = torch.tensor([0] + [len(t) for t, _ in items[:-1]]).cumsum(0)
        return torch.stack([y for _, y in items]), text, offsets

    torch.manual_seed(0)
    model = _TextClassifier("mean")
    sampler = GraBSampler(data, ordering=ordering, seed=0)
    sampler.watch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler, collate_fn=collate)
    for _ in range(3):
        for y, text, offsets in loader:
            ce(model(text, offsets), y).backward()
            opt.step()
            opt.zero_grad()
        sampler.synchronize()
        assert sampler.state_dict()["stepped"] == 40
        assert sorted(sampler._order.tolist()) == list(range(40))


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_an_embedding_bag_left_out_still_gives_the_steps_batch(mode):
    # exclude= (to save its columns) or mode='max' (not sketched): the model's first input is still the
    # tokens end to end, and the Linear layer after the bag must see a batch of texts, not of tokens.
    torch.manual_seed(0)
    model = _TextClassifier(mode)
    batch, each, y = _bag_batch("offsets")
    sampler, handle, spy = watched(model, exclude=["emb"])
    assert [n for n, _, _ in handle.layers] == ["fc"]
    ce(model(*batch), y).backward()
    handle.flush()
    assert sampler.pending == 64 - 4
    assert_rows(spy.rows[0], handle.project(_each_texts_gradients(model, each, y)))


def test_embedding_bag_max_is_refused_by_name():
    model = nn.Sequential(nn.EmbeddingBag(30, 6, mode="max"), nn.Linear(6, 3))
    with pytest.raises(UnsupportedModelError, match=r"\['0.weight'\].*EmbeddingBag \(mode 'sum' or 'mean'\)"):
        watched(model)


# ---------------------------------------------------------------------------------------------- recurrent layers
class _RecurrentClassifier(nn.Module):
    """Token ids [B, T] (and their lengths, packed) -> Embedding -> LSTM, GRU or RNN -> Linear, read from the
    last layer's final states ("state"), the outputs' mean over each text's tokens ("output"), or both
    (with an LSTM's final cell states too): the loss reaches every output of the layer, or some. With
    ``initial``, the initial state is computed from the text (a Linear layer) and given as ``hx=``."""

    def __init__(self, kind, read="state", packed=False, initial=False, batch_first=True, **kw):
        super().__init__()
        self.kind, self.read, self.packed, self.initial, self.batch_first = kind, read, packed, initial, batch_first
        self.emb = nn.Embedding(20, 5, padding_idx=0)
        self.rnn = getattr(nn, kind)(5, 6, batch_first=batch_first, **kw)
        self.dirs = 2 if kw.get("bidirectional") else 1
        self.states = kw.get("num_layers", 1) * self.dirs
        self.h_out = kw.get("proj_size") or 6
        self.fc = nn.Linear(self.dirs * self.h_out, 3)
        if initial:
            self.init = nn.Linear(5, self.states * self.h_out)

    def forward(self, ids, lengths=None):
        b = ids.shape[0]
        e = self.emb(ids)
        x = e if self.batch_first else e.transpose(0, 1)
        if self.packed:
            x = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=self.batch_first, enforce_sorted=False)
        if self.initial:
            # (a sum over the tokens: padding ids embed to zero, so a text alone gets the same state)
            h0 = torch.tanh(self.init(e.sum(1))).view(b, self.states, self.h_out).transpose(0, 1).contiguous()
            c0 = h0.sum(-1, keepdim=True).expand(-1, -1, 6).contiguous()
            out, state = self.rnn(x, hx=(h0, c0) if self.kind == "LSTM" else h0)
        else:
            out, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state
        feats = h_n[-self.dirs :].transpose(0, 1).reshape(b, -1)
        if self.read != "state":
            if self.packed:
                o, n = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
                mean = o.sum(1) / n[:, None]
            else:
                mean = (out if self.batch_first else out.transpose(0, 1)).mean(1)
            feats = mean if self.read == "output" else feats + mean
        if self.read == "both" and isinstance(state, tuple):
            feats = feats + state[1][-self.dirs :].transpose(0, 1).reshape(b, -1).sum(-1, keepdim=True)
        return self.fc(feats)


def _texts(b=4, t=6, seed=0):
    """Padded ids [b, t] (id 0 after each text's end), their lengths (one text of full length), labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[1] = t
    ids = torch.randint(1, 20, (b, t), generator=g) * (torch.arange(t) < lengths[:, None])
    return ids, lengths, torch.randint(0, 3, (b,), generator=g)


_RECURRENT_CASES = {
    "lstm": ("LSTM", "state", {}),
    "gru-both": ("GRU", "both", {}),
    "rnn-relu-output": ("RNN", "output", {"nonlinearity": "relu"}),
    "lstm-packed-bidirectional-2": ("LSTM", "both", {"packed": True, "bidirectional": True, "num_layers": 2}),
    "gru-packed-seq-first-bidirectional": (
        "GRU",
        "both",
        {"packed": True, "batch_first": False, "bidirectional": True},
    ),
    "lstm-proj-2-initial": ("LSTM", "both", {"proj_size": 4, "num_layers": 2, "initial": True}),
    "lstm-proj-packed-bidirectional-initial": (
        "LSTM",
        "both",
        {"proj_size": 4, "packed": True, "bidirectional": True, "initial": True},
    ),
    "rnn-packed-2-initial-no-bias": ("RNN", "both", {"packed": True, "num_layers": 2, "initial": True, "bias": False}),
    "gru-seq-first-initial": ("GRU", "state", {"initial": True, "batch_first": False}),
}


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("case", sorted(_RECURRENT_CASES))
def test_recurrent_rows_are_each_examples_gradient(case, sketch):
    # Each text's gradient by its own forward and backward, alone (a packed text without its padding).
    kind, read, kw = _RECURRENT_CASES[case]
    torch.manual_seed(0)
    model = _RecurrentClassifier(kind, read, **kw)
    ids, lengths, y = _texts()
    sampler, handle, spy = watched(model, sketch=sketch)
    assert ("rnn", f"{kind} (replayed step by step in the backward)") in [(n, k) for n, k, _ in handle.layers]
    ce(model(ids, lengths), y).backward()
    handle.flush()
    assert len(spy.rows) == 1 and sampler.pending == 64 - 4
    if kw.get("packed"):
        each = [(ids[i : i + 1, : lengths[i]], lengths[i : i + 1]) for i in range(4)]
    else:
        each = [(ids[i : i + 1], lengths[i : i + 1]) for i in range(4)]
    grads = _each_texts_gradients(model, each, y)
    assert_rows(spy.rows[0], handle.project(grads))
    if sketch is None:
        assert_rows(spy.rows[0], flat(grads, 4))


_DROPOUT_CASES = {
    "lstm-3": ("LSTM", "both", {"num_layers": 3}),
    "lstm-packed-bidirectional": ("LSTM", "both", {"packed": True, "bidirectional": True, "num_layers": 2}),
    "gru-seq-first-initial": ("GRU", "both", {"num_layers": 2, "batch_first": False, "initial": True}),
    "rnn-packed-output": ("RNN", "output", {"packed": True, "num_layers": 2}),
    "lstm-proj-initial": ("LSTM", "both", {"proj_size": 4, "num_layers": 2, "initial": True}),
}


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("case", sorted(_DROPOUT_CASES))
def test_recurrent_layers_with_dropout_between_them_give_each_examples_rows(case, sketch):
    # nn.LSTM(..., num_layers=2, dropout=p) was refused: torch draws those masks inside its kernel. Watched,
    # its layers run one at a time with the dropout drawn between them. The reference: a copy of the model
    # running the same forward from the same random state (so the same masks), each text's loss
    # differentiated on that copy's batch graph (the examples do not meet in the forward).
    kind, read, kw = _DROPOUT_CASES[case]
    torch.manual_seed(0)
    model = _RecurrentClassifier(kind, read, dropout=0.5, **kw)
    twin = copy.deepcopy(model)
    ids, lengths, y = _texts()
    sampler, handle, spy = watched(model, sketch=sketch)
    assert "forward" in model.rnn.__dict__  # the watched forward, installed
    kind_text = f"{kind} (its layers run one at a time with dropout between; replayed step by step in the backward)"
    assert ("rnn", kind_text) in [(n, k) for n, k, _ in handle.layers]
    with torch.random.fork_rng():
        ce(model(ids, lengths), y).backward()
    handle.flush()
    install_stacked(twin.rnn, None, lambda: True)
    losses = ce(twin(ids, lengths), y, reduction="none")
    names = [n for n, _ in twin.named_parameters()]
    per = [torch.autograd.grad(losses[i], list(twin.parameters()), retain_graph=True) for i in range(4)]
    grads = {n: torch.stack([p[j] for p in per]) for j, n in enumerate(names)}
    assert_rows(spy.rows[0], handle.project(grads))
    # Each example got a mask between the layers, and it dropped something (p = 0.5).
    masks = twin.rnn.forward.take_masks()
    assert len(masks) == kw["num_layers"] - 1 and bool((masks[0] == 0).any())
    handle.remove()
    assert "forward" not in model.rnn.__dict__


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("LSTM", {"num_layers": 3, "bidirectional": True}),
        ("LSTM", {"num_layers": 2, "proj_size": 3, "batch_first": False}),
        ("GRU", {"num_layers": 2}),
        ("RNN", {"num_layers": 2, "nonlinearity": "relu", "bias": False}),
    ],
)
@pytest.mark.parametrize("form", ["tensor", "packed", "unbatched", "initial"])
def test_the_layer_by_layer_forward_is_the_layers_own_without_dropout(kind, kw, form):
    # The watched forward with nothing dropped (p set to 0 after it was installed) against the class
    # forward: outputs and final states equal, the initial state split by layer, a packed batch unsorted.
    torch.manual_seed(0)
    layer = getattr(nn, kind)(4, 5, dropout=0.3, **kw)
    dirs = 2 if kw.get("bidirectional") else 1
    h_out = kw.get("proj_size") or 5
    bf = kw.get("batch_first", False)
    x = torch.randn(3, 6, 4) if bf else torch.randn(6, 3, 4)
    hx = None
    if form == "packed":
        x = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([4, 6, 2]), batch_first=bf, enforce_sorted=False)
    elif form == "unbatched":
        x = x[:, 0] if not bf else x[0]
    elif form == "initial":
        h0 = torch.randn(kw["num_layers"] * dirs, 3, h_out)
        hx = (h0, torch.randn(kw["num_layers"] * dirs, 3, 5)) if kind == "LSTM" else h0
    install_stacked(layer, None, lambda: True)
    layer.dropout = 0.0
    out, state = layer(x, hx)
    assert layer.forward.take_masks() is not None  # (it ran layer by layer)
    ref_out, ref_state = type(layer).forward(layer, x, hx)
    data = (lambda o: o.data) if form == "packed" else (lambda o: o)
    torch.testing.assert_close(data(out), data(ref_out))
    for a, b in zip(
        state if isinstance(state, tuple) else (state,), ref_state if isinstance(ref_state, tuple) else (ref_state,)
    ):
        torch.testing.assert_close(a, b)
    layer.eval()  # in eval mode (or under no_grad) the class forward itself
    layer(x, hx)
    assert layer.forward.take_masks() is None


def test_a_watched_layer_with_dropout_follows_its_parameters_when_they_are_replaced():
    # load_state_dict(assign=True) (Hugging Face's loading of a model built on the meta device) puts new
    # parameter objects in the layer: the watched forward must run with them, not with the old ones.
    torch.manual_seed(0)
    model = _RecurrentClassifier("LSTM", "state", num_layers=2, dropout=0.5)
    sampler, handle, spy = watched(model, sketch=4)
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    # (The old objects kept alive: watch()'s checks know the parameters by id, and a freed id that Python
    # gives to a new tensor would be taken for the old parameter.)
    old = list(model.parameters())
    model.load_state_dict(new, assign=True)
    assert not any(p is q for p, q in zip(old, model.parameters()))
    ids, lengths, y = _texts()
    ce(model(ids, lengths), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    handle.flush()
    assert spy.rows[0].shape == (4, handle.width)


def test_a_watched_layer_with_dropout_copies_and_pickles_with_its_class_forward():
    torch.manual_seed(0)
    model = _RecurrentClassifier("LSTM", "state", num_layers=2, dropout=0.5)
    sampler, handle, spy = watched(model, sketch=4)
    clone = copy.deepcopy(model)
    assert not isinstance(clone.rnn.__dict__.get("forward"), StackedDropoutForward)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert not isinstance(loaded.rnn.__dict__.get("forward"), StackedDropoutForward)
    ids, lengths, y = _texts()
    ce(loaded(ids, lengths), y).backward()  # the copy trains with torch's own kernel, unwatched
    assert spy.rows == []


def test_recurrent_rows_with_sum_reduction_accumulation_and_checkpointing():
    # Two micro-batches of a step under loss_reduction="sum", the recurrent layer checkpointed (its forward
    # recomputed inside the backward is not a second call): each example's row is its own gradient's.
    torch.manual_seed(0)
    model = _RecurrentClassifier("LSTM", "both", packed=True)

    class Checkpointed(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, *args):
            return checkpoint(self.layer, *args, use_reentrant=False)

    model.rnn = Checkpointed(model.rnn)
    ids, lengths, y = _texts(b=6)
    sampler, handle, spy = watched(model, sketch=None, loss_reduction="sum")
    for part in (slice(0, 3), slice(3, 6)):
        ce(model(ids[part], lengths[part]), y[part], reduction="sum").backward()
    handle.flush()
    assert sum(r.shape[0] for r in spy.rows) == 6 and sampler.pending == 64 - 6
    each = [(ids[i : i + 1, : lengths[i]], lengths[i : i + 1]) for i in range(6)]
    grads = _each_texts_gradients(model, each, y)
    assert_rows(np.concatenate(spy.rows), flat(grads, 6))


@pytest.mark.parametrize("ordering", ["grab", "rr"])
def test_recurrent_classifier_in_a_dataloader_loop_feeds_one_row_per_text(ordering):
    # Texts of different lengths padded by a collate_fn and packed by the model; rr counts the texts.
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(1, 20, (int(n),), generator=g) for n in torch.randint(1, 9, (40,), generator=g)]
    data = list(zip(texts, torch.randint(0, 3, (40,), generator=g)))

    def collate(items):
        ids = nn.utils.rnn.pad_sequence([t for t, _ in items], batch_first=True)
        return ids, torch.tensor([len(t) for t, _ in items]), torch.stack([y for _, y in items])

    torch.manual_seed(0)
    model = _RecurrentClassifier("GRU", "both", packed=True, bidirectional=True)
    sampler = GraBSampler(data, ordering=ordering, seed=0)
    sampler.watch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler, collate_fn=collate)
    orders = []
    for _ in range(3):
        for ids, lengths, y in loader:
            ce(model(ids, lengths), y).backward()
            opt.step()
            opt.zero_grad()
        sampler.synchronize()
        assert sampler.state_dict()["stepped"] == 40
        orders.append(sampler._order.tolist())
        assert sorted(orders[-1]) == list(range(40))
    assert orders[1] != orders[2]


def test_a_recurrent_layer_fed_the_other_layout_is_refused_with_the_step_dropped():
    # A sequence-first LSTM given [B, T, E]: it reads T as the batch. Refused at its call, naming it; the
    # sampler is as it was and the next step is recorded.
    torch.manual_seed(0)
    model = _RecurrentClassifier("LSTM", batch_first=False)
    ids, lengths, y = _texts()
    sampler, handle, spy = watched(model)
    state = sampler.state_dict()
    model.batch_first = True  # the model's forward now hands the layer [B, T, E]
    with pytest.raises(
        UnsupportedModelError, match=r"'rnn' got an input of shape \(6, 4, 5\) in a step whose batch has 4"
    ):
        model(ids)
    assert_same_state(sampler.state_dict(), state)
    model.batch_first = False
    ce(model(ids, lengths), y).backward()
    handle.flush()
    assert len(spy.rows) == 1 and sampler.pending == 64 - 4


def test_watch_batch_first_false_takes_a_sequence_first_recurrent_model():
    # The WikiText-2 example's layout: [T, B] ids, every layer sequence first; one row per column.
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.out = nn.Embedding(20, 5), nn.LSTM(5, 6, 2), nn.Linear(6, 20)

        def forward(self, ids):
            return self.out(self.rnn(self.emb(ids))[0])

    model = LM()
    ids = torch.randint(0, 20, (7, 3), generator=torch.Generator().manual_seed(1))
    sampler, handle, spy = watched(model, sketch=None, batch_first=False)
    out = model(ids[:-1])
    F.cross_entropy(out.reshape(-1, 20), ids[1:].reshape(-1)).backward()
    handle.flush()
    grads = {n: [] for n, _ in model.named_parameters()}
    for j in range(3):
        model.zero_grad()
        o = model(ids[:-1, j : j + 1])
        F.cross_entropy(o.reshape(-1, 20), ids[1:, j]).backward()  # the column's own mean loss
        for n, p in model.named_parameters():
            grads[n].append(p.grad.clone())
    assert_rows(spy.rows[0], flat({n: torch.stack(g) for n, g in grads.items()}, 3))


def test_an_unbatched_recurrent_call_is_one_example():
    # A model that runs one text at a time hands the layer [T, E] (no batch dimension): one row, the text's
    # gradient, also for the final states' gradients given without a batch dimension.
    torch.manual_seed(0)

    class OneText(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.fc = nn.Embedding(20, 5), nn.GRU(5, 6, bidirectional=True), nn.Linear(12, 3)

        def forward(self, ids):
            out, h = self.rnn(self.emb(ids)[0])  # [T, 5] in, [T, 12] and [2, 6] out
            return self.fc((out.mean(0) + h.reshape(-1)).unsqueeze(0))

    model = OneText()
    ids, y = torch.randint(1, 20, (1, 6), generator=torch.Generator().manual_seed(0)), torch.tensor([2])
    sampler, handle, spy = watched(model, sketch=None)
    ce(model(ids), y).backward()
    handle.flush()
    assert sampler.pending == 63
    assert_rows(spy.rows[0], flat({n: p.grad.unsqueeze(0) for n, p in model.named_parameters()}, 1))


class _CellLoop(nn.Module):
    """A hand-written recurrence: Embedding, then an LSTMCell, GRUCell or RNNCell called once per time step by
    the model's own loop (from a state computed from the text, or none), a Linear layer on the last state
    (and an LSTM's last cell state)."""

    def __init__(self, kind, initial=False, **kw):
        super().__init__()
        self.kind, self.initial = kind, initial
        self.emb = nn.Embedding(20, 5)
        self.cell = getattr(nn, kind)(5, 6, **kw)
        self.fc = nn.Linear(6, 3)
        if initial:
            self.init = nn.Linear(5, 6)

    def forward(self, ids):
        e = self.emb(ids)
        state = None
        if self.initial:
            h = torch.tanh(self.init(e.sum(1)))
            state = (h, 0.5 * h) if self.kind == "LSTMCell" else h
        for t in range(ids.shape[1]):
            state = self.cell(e[:, t], state) if state is not None else self.cell(e[:, t])
        h = state[0] + state[1] if isinstance(state, tuple) else state
        return self.fc(h)


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize(
    "kind,initial,kw",
    [
        ("LSTMCell", False, {}),
        ("GRUCell", True, {}),
        ("RNNCell", True, {"nonlinearity": "relu"}),
        ("LSTMCell", True, {}),
    ],
)
def test_recurrent_cell_rows_are_each_examples_gradient(kind, initial, kw, sketch):
    # The cell's calls of a forward add up; each call's state gradient already holds the later steps'.
    torch.manual_seed(0)
    model = _CellLoop(kind, initial, **kw)
    ids, _, y = _texts()
    sampler, handle, spy = watched(model, sketch=sketch)
    assert ("cell", f"{kind} (each call replayed in the backward)") in [(n, k) for n, k, _ in handle.layers]
    ce(model(ids), y).backward()
    handle.flush()
    assert len(spy.rows) == 1 and sampler.pending == 64 - 4
    grads = _each_texts_gradients(model, [(ids[i : i + 1],) for i in range(4)], y)
    assert_rows(spy.rows[0], handle.project(grads))
    if sketch is None:
        assert_rows(spy.rows[0], flat(grads, 4))


def test_ddp_wrapped_recurrent_model_gives_the_unwrapped_rows():
    # DistributedDataParallel's own autograd function on the outputs and the recurrent layer's tap: the
    # rows of a DDP-wrapped packed bidirectional LSTM are those of the model unwrapped.
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    torch.manual_seed(0)
    model = _RecurrentClassifier("LSTM", "both", packed=True, bidirectional=True)
    plain = copy.deepcopy(model)
    ids, lengths, y = _texts()
    _, h_plain, spy_plain = watched(plain, sketch=4)
    ce(plain(ids, lengths), y).backward()
    h_plain.flush()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        sampler, handle, spy = watched(ddp, sketch=4)
        for _ in range(2):
            ce(ddp(ids, lengths), y).backward()
        handle.flush()
        first, _ = spy.steps([4, 4])
        np.testing.assert_allclose(first, spy_plain.rows[0], rtol=1e-5, atol=1e-7)
        assert sampler.pending == 64 - 8
        handle.remove()
        no_hooks(ddp)
    finally:
        dist.destroy_process_group()
