"""Per-layer sketches of per-example gradients, formed from what a layer's hooks see: its input in the
forward pass and its output's gradient in the backward pass. No per-example gradient is ever formed.

One class per layer kind, registered by module type (as Opacus registers its grad samplers). Each
turns (saved input, output gradient) into a [B, width] block of rows whose inner products estimate
the per-example gradients' inner products (exactly, where every factor is the identity).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Type

import torch
from torch import nn
from torch.nn import functional as F

from torchgrab.capture.projection import CountSketch, Factor, derived_seed

_REGISTRY: Dict[Type[nn.Module], Type["LayerSketch"]] = {}


def register_sketch(*kinds: Type[nn.Module]) -> Callable[[Type["LayerSketch"]], Type["LayerSketch"]]:
    """Class decorator: the sketch for modules of these types (subclasses included)."""

    def deco(cls: Type["LayerSketch"]) -> Type["LayerSketch"]:
        for k in kinds:
            _REGISTRY[k] = cls
        return cls

    return deco


def sketch_class(module: nn.Module) -> Optional[Type["LayerSketch"]]:
    """The registered sketch for ``module`` (most derived registered type), or None."""
    for kind in type(module).__mro__:
        if kind in _REGISTRY:
            cls = _REGISTRY[kind]
            return cls if cls.supports(module) else None
    return None


def _f32(t: torch.Tensor) -> torch.Tensor:
    # Sketches are accumulated in float32 whatever the training precision (fp16 output gradients,
    # multiplied by a GradScaler's scale, would overflow in a half-precision product).
    return t if t.dtype == torch.float32 or t.dtype == torch.float64 else t.float()


class LayerSketch:
    """Base class: ``width`` columns of the rows, for the module's trainable ``weight`` and ``bias``."""

    params = ("weight", "bias")

    def __init__(self, name: str, module: nn.Module, k: Optional[int], seed: int) -> None:
        self.name = name
        self.train_w = _trainable(module, "weight")
        self.train_b = _trainable(module, "bias")
        self.width = 0
        self.offset = 0

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return True

    def covered(self, module: nn.Module) -> List[str]:
        """The names (within the module) of the trainable parameters this sketch accounts for."""
        return [p for p in self.params if _trainable(module, p)]

    def save(self, module: nn.Module, x: torch.Tensor) -> Any:
        """What the backward part needs from the forward input (called in the forward hook)."""
        return x.detach()

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        """[B, w] float32 pieces whose widths add up to ``width``."""
        raise NotImplementedError

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """The same projection applied to given per-example gradients ({"weight": [B, *shape], ...}):
        the definition the hooks must match (tests compare them with torch.func's gradients)."""
        raise NotImplementedError


def _trainable(module: nn.Module, pname: str) -> bool:
    p = module._parameters.get(pname)
    return p is not None and p.requires_grad


@register_sketch(nn.Linear)
class LinearSketch(LayerSketch):
    """grad W_b = sum_t g_bt a_bt^T, sketched as (G_b P_out^T)^T (A_b P_in^T), a k_out x k_in block
    (the Kronecker projection P_out (x) P_in); the bias part is sum_t P_out g_bt."""

    def __init__(self, name: str, module: nn.Linear, k: Optional[int], seed: int) -> None:
        super().__init__(name, module, k, seed)
        out_f, in_f = module.weight.shape
        self.p_out = Factor(out_f, k, seed, name, "out")
        self.p_in = Factor(in_f, k, seed, name, "in")
        self.width = self.p_out.k * self.p_in.k * self.train_w + self.p_out.k * self.train_b

    def save(self, module: nn.Module, x: torch.Tensor) -> Any:
        if not self.train_w:
            return None
        a = _f32(x.detach())
        return self.p_in(a.reshape(a.shape[0], -1, a.shape[-1]))  # [B, T, k_in]: projected in the forward

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        b = g.shape[0]
        gp = self.p_out(_f32(g).reshape(b, -1, g.shape[-1]))  # [B, T, k_out]
        out = []
        if self.train_w:
            if gp.shape[1] == 1:
                out.append((gp.transpose(1, 2) * saved).reshape(b, -1))  # outer products, no bmm call
            else:
                out.append(torch.bmm(gp.transpose(1, 2), saved).reshape(b, -1))
        if self.train_b:
            out.append(gp.sum(1))
        return out

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        out = []
        if self.train_w:
            w = _f32(grads["weight"])  # [B, out, in]
            out.append(self.p_in(self.p_out(w.transpose(1, 2)).transpose(1, 2)).reshape(w.shape[0], -1))
        if self.train_b:
            out.append(self.p_out(_f32(grads["bias"])))
        return out


@register_sketch(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvSketch(LayerSketch):
    """grad W_b = sum_p g_bp u_bp^T over output positions p (u: the input patch). The input side P_in u_p
    for every p is a convolution of the input with k_in channels of the layer's own geometry (stride,
    padding, dilation, padding mode; per group), so no im2col of the patch matrix; the output side is a
    projection of the channels; the block is the sum over positions of their outer products."""

    def __init__(self, name: str, module: nn.modules.conv._ConvNd, k: Optional[int], seed: int) -> None:
        super().__init__(name, module, k, seed)
        w = module.weight
        self.groups = module.groups
        self.c_out_g = w.shape[0] // self.groups
        self.kernel = tuple(w.shape[2:])
        self.cin_g = w.shape[1]
        m = self.cin_g * math.prod(self.kernel)
        self.p_out = Factor(self.c_out_g, k, seed, name, "out")
        self.m = m
        self.k_in = m if (k is None or m <= k) else int(k)
        self._seed_in = derived_seed(seed, name, "in", m, self.k_in)
        self._kernels: Dict[Any, torch.Tensor] = {}
        g = self.groups
        self.width = g * self.p_out.k * self.k_in * self.train_w + g * self.p_out.k * self.train_b

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return not getattr(module, "transposed", False)

    def _kernel(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        kern = self._kernels.get(key)
        if kern is None:
            if self.k_in == self.m:  # one-hot taps: the convolution is im2col, exactly
                p = torch.eye(self.m)
            else:
                gen = torch.Generator().manual_seed(self._seed_in)
                p = torch.randn(self.k_in, self.m, generator=gen) / math.sqrt(self.k_in)
            p = p.reshape(self.k_in, self.cin_g, *self.kernel)
            kern = self._kernels[key] = p.repeat(self.groups, *([1] * (p.dim() - 1))).to(device=device, dtype=dtype)
        return kern

    def save(self, module: nn.Module, x: torch.Tensor) -> Any:
        if not self.train_w:
            return None
        a = _f32(x.detach())
        unbatched = a.dim() == len(self.kernel) + 1
        if unbatched:
            a = a.unsqueeze(0)
        ap = module._conv_forward(a, self._kernel(a.device, a.dtype), None)  # [B, G k_in, *out]
        return ap.reshape(ap.shape[0] * self.groups, self.k_in, -1).transpose(1, 2)  # [B G, P, k_in]

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        g = _f32(g)
        if g.dim() == len(self.kernel) + 1:
            g = g.unsqueeze(0)
        b = g.shape[0]
        gg = g.reshape(b, self.groups, self.c_out_g, -1).transpose(2, 3)  # [B, G, P, c_out/G]
        gp = self.p_out(gg).transpose(2, 3).reshape(b * self.groups, self.p_out.k, -1)  # [B G, k_out, P]
        out = []
        if self.train_w:
            out.append(torch.bmm(gp, saved).reshape(b, -1))
        if self.train_b:
            out.append(gp.sum(2).reshape(b, -1))
        return out

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        out = []
        if self.train_w:
            w = _f32(grads["weight"])
            b = w.shape[0]
            w = w.reshape(b, self.groups, self.c_out_g, self.m)
            p_in = self._kernel(w.device, w.dtype)[: self.k_in].reshape(self.k_in, self.m)
            wp = torch.matmul(w, p_in.t())  # [B, G, c_out/G, k_in]
            out.append(self.p_out(wp.transpose(2, 3)).transpose(2, 3).reshape(b, -1))
        if self.train_b:
            bias = _f32(grads["bias"])
            out.append(self.p_out(bias.reshape(bias.shape[0], self.groups, self.c_out_g)).reshape(bias.shape[0], -1))
        return out


@register_sketch(nn.Embedding)
class EmbeddingSketch(LayerSketch):
    """grad W_b = sum_t e_{x_t} g_t^T, sparse: the vocabulary side is count-sketched (bucket, sign per id),
    the feature side projected; one scatter-add, no vocabulary x dim tensor. Padding ids add nothing."""

    params = ("weight",)

    def __init__(self, name: str, module: nn.Embedding, k: Optional[int], seed: int) -> None:
        super().__init__(name, module, k, seed)
        v, d = module.weight.shape
        self.vocab = CountSketch(v, k if k is not None else v, seed, name, "vocab")
        self.p_out = Factor(d, k, seed, name, "dim")
        self.width = self.vocab.k * self.p_out.k * self.train_w

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        # max_norm rewrites the weight inside the forward; scale_grad_by_freq scales by counts over the
        # whole batch, which is not any one example's gradient.
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        b = g.shape[0]
        ids = saved.reshape(b, -1)
        gp = self.p_out(_f32(g).reshape(b, ids.shape[1], -1))  # [B, T, k_d]
        buckets, signs = self.vocab.tables(ids.device)
        w = signs[ids]
        if module.padding_idx is not None:
            w = w.masked_fill(ids == module.padding_idx, 0.0)
        gp = gp * w.unsqueeze(-1).to(gp.dtype)
        out = torch.zeros(b, self.vocab.k, gp.shape[-1], dtype=gp.dtype, device=gp.device)
        out.scatter_add_(1, buckets[ids].unsqueeze(-1).expand(-1, -1, gp.shape[-1]), gp)
        return [out.reshape(b, -1)]

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        w = self.p_out(_f32(grads["weight"]))  # [B, V, k_d]
        buckets, signs = self.vocab.tables(w.device)
        out = torch.zeros(w.shape[0], self.vocab.k, w.shape[-1], dtype=w.dtype, device=w.device)
        out.index_add_(1, buckets, w * signs.view(1, -1, 1))
        return [out.reshape(w.shape[0], -1)]


class _AffineNormSketch(LayerSketch):
    """y = x_hat * weight + bias per feature: grad weight_b = sum g * x_hat, grad bias_b = sum g over the
    positions that share a feature; exact when there are at most k features, projected otherwise."""

    def __init__(self, name: str, module: nn.Module, k: Optional[int], seed: int) -> None:
        super().__init__(name, module, k, seed)
        n = self.features(module)
        self.p = Factor(n, k, seed, name, "features")
        self.width = self.p.k * (self.train_w + self.train_b)

    def features(self, module: nn.Module) -> int:
        w = module.weight if module.weight is not None else module.bias
        return int(w.numel())

    def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_feature(self, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """[B, ..., features] or [B, C, ...] -> [B, features] summed over the shared positions."""
        raise NotImplementedError

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        g = _f32(g)
        out = []
        if self.train_w:
            out.append(self.p(self.per_feature(module, g * self.normalized(module, _f32(saved)))))
        if self.train_b:
            out.append(self.p(self.per_feature(module, g)))
        return out

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        return [self.p(_f32(grads[p]).reshape(grads[p].shape[0], -1)) for p in self.params if _trainable(module, p)]


@register_sketch(nn.LayerNorm)
class LayerNormSketch(_AffineNormSketch):
    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return module.elementwise_affine

    def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, tuple(module.normalized_shape), None, None, module.eps)

    def per_feature(self, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1, self.p.n).sum(1)


if hasattr(nn, "RMSNorm"):

    @register_sketch(nn.RMSNorm)
    class RMSNormSketch(_AffineNormSketch):
        params = ("weight",)

        @classmethod
        def supports(cls, module: nn.Module) -> bool:
            return module.elementwise_affine

        def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return F.rms_norm(x, tuple(module.normalized_shape), None, module.eps)

        def per_feature(self, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], -1, self.p.n).sum(1)


class _ChannelNormSketch(_AffineNormSketch):
    """Norms with one weight per channel (dimension 1 of a [B, C, ...] input)."""

    def per_feature(self, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1).sum(2)


@register_sketch(nn.GroupNorm)
class GroupNormSketch(_ChannelNormSketch):
    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return module.affine

    def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, module.num_groups, None, None, module.eps)


@register_sketch(nn.modules.batchnorm._BatchNorm)
class BatchNormSketch(_ChannelNormSketch):
    """BatchNorm couples the examples of a batch, so per-example gradients are not defined; what the
    hooks give is each example's *contribution* g_b * x_hat_b (BN's coupling inside g_b), and those
    contributions add up to the batch gradient exactly. An order needs no more than such a proxy."""

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return module.affine

    def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        batch_stats = module.training or module.running_mean is None
        if batch_stats:
            return F.batch_norm(x, None, None, training=True, eps=module.eps)
        return F.batch_norm(x, module.running_mean.float(), module.running_var.float(), training=False, eps=module.eps)
