"""Per-layer sketches of per-example gradients, formed from what a layer's hooks see: its input in the
forward pass and its output's gradient in the backward pass. No per-example gradient is ever formed.

One class per layer kind, registered by module type (as Opacus registers its grad samplers). Each
turns (saved input, output gradient) into a [B, width] block of rows whose inner products estimate
the per-example gradients' inner products (exactly, where every factor is the identity).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from torchgrab import _native
from torchgrab.capture._compat import without_saved_tensor_hooks
from torchgrab.capture.projection import CountSketch, Factor, cpu_kernel_input, derived_seed, stacked_t
from torchgrab.errors import UnsupportedModelError
from torchgrab.gradients import im2col

_REGISTRY: Dict[Type[nn.Module], Type["LayerSketch"]] = {}
_REGISTRY_BY_NAME: Dict[str, Type["LayerSketch"]] = {}  # "module.QualName" of classes not imported here
# A Linear layer's input side is count-sketched (not Gaussian) when it is at least this many times wider
# than its sketch and the sketch has at least 64 columns (see LinearSketch).
COUNT_SKETCH_RATIO = 4
# On a CPU, a Linear layer's call whose output gradient has more elements than this is sketched alone, not
# with the equally shaped layers of its model (LinearSketch.group_key).
CPU_GROUP_MAX = 1 << 15
# The same on a GPU, where grouping saves kernel launches: past 4M elements a kernel's own time dwarfs its
# launch, and a large model's gradients, held to the backward's end and stacked, would cost gigabytes.
GPU_GROUP_MAX = 1 << 22
# At most this many elements are held or stacked for one group at once: a larger group is formed in chunks.
GROUP_STACK_MAX = 1 << 26


def groupable(t: torch.Tensor) -> bool:
    """Whether a call with this output gradient (or input) may wait to be sketched with its group."""
    return t.numel() <= (CPU_GROUP_MAX if t.is_cpu else GPU_GROUP_MAX)


def chunked(items: List[Any], numel: Callable[[Any], int]) -> List[List[Any]]:
    """``items`` in consecutive chunks of at most GROUP_STACK_MAX elements each (at least one item)."""
    out: List[List[Any]] = []
    total = 0
    for item in items:
        n = numel(item)
        if not out or total + n > GROUP_STACK_MAX:
            out.append([])
            total = 0
        out[-1].append(item)
        total += n
    return out


# An embedding's count sketch of its vocabulary is applied as a dense [V, k_v] table of signed one-hot rows
# (a lookup and one batched product per call) up to this many elements and k_v; beyond either, as a
# scatter-add of the signed rows. 2M elements, 8 MB in float32 on the rows' device: GPT-2's 50,257 words
# at k_v = 32 take 1.6M; a 128K vocabulary, or a recommender's many large tables, keep the scatter.
ONEHOT_TABLE_MAX = 1 << 21
ONEHOT_K_MAX = 128

# A third entry of a fitted (k_out, k_in): the output side is count-sketched (LinearSketch.fit).
COUNT_OUT = "count-out"


def register_sketch(*kinds: Type[nn.Module]) -> Callable[[Type["LayerSketch"]], Type["LayerSketch"]]:
    """Class decorator: the sketch for modules of these types (subclasses included)."""

    def deco(cls: Type["LayerSketch"]) -> Type["LayerSketch"]:
        for k in kinds:
            _REGISTRY[k] = cls
        return cls

    return deco


def register_sketch_by_name(*names: str) -> Callable[[Type["LayerSketch"]], Type["LayerSketch"]]:
    """Class decorator: the sketch for modules of the classes named ``module.QualName`` (subclasses
    included), for layers of libraries torchgrab does not import (Hugging Face's ``Conv1D``)."""

    def deco(cls: Type["LayerSketch"]) -> Type["LayerSketch"]:
        for n in names:
            _REGISTRY_BY_NAME[n] = cls
        return cls

    return deco


def _registered(kind: type) -> Optional[Type["LayerSketch"]]:
    return _REGISTRY.get(kind) or _REGISTRY_BY_NAME.get(f"{kind.__module__}.{kind.__qualname__}")


def registered_kind(module: nn.Module) -> Optional[type]:
    """The most derived type of ``module``'s classes that has a registered sketch, or None."""
    return next((kind for kind in type(module).__mro__ if _registered(kind) is not None), None)


def sketch_class(module: nn.Module) -> Optional[Type["LayerSketch"]]:
    """The registered sketch for ``module`` (most derived registered type), or None."""
    kind = registered_kind(module)
    if kind is None:
        return None
    cls = _registered(kind)
    return cls if cls is not None and cls.supports(module) else None


def split_k(k: Any, n_out: int) -> "tuple[Optional[int], Optional[int]]":
    """A layer's sketch size as (k_out, k_in). A pair is taken as it is; one k gives the layer k * k
    columns: k_out = k (the identity when the output side has at most k), and the input side the
    rest, so a layer with a narrow exact output side (a classifier's last layer) sketches its input
    side with more columns instead of fewer."""
    if isinstance(k, tuple):
        return k[0], k[1]
    if k is None:
        return None, None
    return k, (k * k) // min(k, n_out)


def _f32(t: torch.Tensor) -> torch.Tensor:
    # Sketches are accumulated in float32 whatever the training precision (fp16 output gradients,
    # multiplied by a GradScaler's scale, would overflow in a half-precision product).
    return t if t.dtype == torch.float32 or t.dtype == torch.float64 else t.float()


def _largest(k: Optional[int], n: int, ok: Callable[[int], bool], k_out: Optional[int]) -> Any:
    """(k_out, k_in) with the largest k_in <= min(k, n) that is ``ok`` (k None: exact), or (k_out, 0)
    when not even k_in = 1 is: the weight is then left out of the rows (its bias stays)."""
    if k is None:
        return None
    top = min(k, n)
    if ok(top):
        return (k_out, top)
    k_in = top - 1
    while k_in >= 1 and not ok(k_in):
        k_in -= 1
    return (k_out, k_in)


class LayerSketch:
    """Base class: ``width`` columns of the rows, for the module's trainable ``weight`` and ``bias``."""

    params = ("weight", "bias")
    ghost = False  # balanced from factors instead of rows (GhostLinearSketch)
    ghost_width = 0  # the coordinates it balances so (beyond its columns of the rows)

    @staticmethod
    def fit(module: nn.Module, k: Optional[int], budget: float) -> Any:
        """The sketch size to use under a cost budget (see ``watch(budget=)``); cheap layers keep k."""
        return k

    def __init__(self, name: str, module: nn.Module, k: Any, seed: int) -> None:
        self.name = name
        self.train_w = _trainable(module, "weight")
        self.train_b = _trainable(module, "bias")
        # k_in = 0 (from fit()): the weight's sketch would cost more than the budget; leave it out.
        self.dropped = self.train_w and isinstance(k, tuple) and k[1] == 0
        if self.dropped:
            self.train_w = False
            k = (k[0], 1)
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

    def group_key(self, saved: Any, g: torch.Tensor) -> Any:
        """Calls with equal keys are sketched together by ``rows_grouped`` (None: alone, by ``rows``)."""
        return None

    def static_key(self) -> Any:
        """What every ``group_key`` of this layer shares with a layer it can ever be grouped with (None:
        never grouped). watch() lets a layer with no such sibling skip the grouping machinery."""
        return None

    def add_rows(self, step: Any, pieces: List[torch.Tensor]) -> None:
        """Add one call's pieces (from ``rows``) to the step's blocks: this layer's own columns."""
        step.add(self.offset, pieces)

    def rows_into(
        self, module: nn.Module, saved: Any, g: torch.Tensor, out: np.ndarray, scale: float, accumulate: bool
    ) -> Optional[bool]:
        """Write (or add, with ``accumulate``) ``scale`` times this call's rows into ``out`` ([B, width]
        float32, a NumPy view of the step's rows in the CPU row buffer) when a direct kernel applies, and
        say whether every value written is finite; None (nothing written) when none applies."""
        return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to the rounding of the layer's precision (float32 and wider, or half precisions)."""
    tol = 1e-4 if b.dtype in (torch.float32, torch.float64) else 2e-2
    a, b = a.double(), b.double()
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max().clamp_min(1e-30))))


def _trainable(module: nn.Module, pname: str) -> bool:
    p = module._parameters.get(pname)
    return p is not None and p.requires_grad


class HeldInput:
    """A Linear layer's input kept from its forward for its backward, where one Rust call forms its count
    sketch together with the rows (``_native.count_outer_rows``): one call from Python per step instead
    of two, and no sketch array. Autograd holds the input until then anyway (the layer's weight gradient
    needs it), so holding it costs no memory; its version, taken now, tells whether it was written in
    place since (autograd refuses that backward too, after the layer's hook has run)."""

    __slots__ = ("x", "version")

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.version = x._version

    def changed(self) -> bool:
        return self.x._version != self.version


@register_sketch(nn.Linear)
class LinearSketch(LayerSketch):
    """grad W_b = sum_t g_bt a_bt^T, sketched as (G_b P_out^T)^T (A_b P_in^T), a k_out x k_in block
    (the Kronecker projection P_out (x) P_in); the bias part is sum_t P_out g_bt."""

    @staticmethod
    def shape(module: nn.Module) -> "tuple[int, int]":
        """(out features, in features)."""
        out_f, in_f = module.weight.shape
        return int(out_f), int(in_f)

    @classmethod
    def fit(cls, module: nn.Module, k: Optional[int], budget: float) -> Any:  # type: ignore[override]
        """The largest k_in <= k whose sketch costs at most ``budget`` times the layer's forward per
        position, plus a constant (2^17 multiply-adds: a small layer's sketch costs its Python calls)."""
        out_f, in_f = cls.shape(module)
        k_out, k_max = split_k(k, out_f)
        k_out = out_f if k_out is None or out_f <= k_out else k_out

        def cost(k_in: int, count_out: bool = False) -> int:
            out_side = 0 if k_out >= out_f else out_f if count_out else out_f * k_out
            return (in_f * k_in if k_in < in_f else 0) + out_side + k_out * k_in

        limit = budget * in_f * out_f + (1 << 17)
        fitted = _largest(k_max, in_f, lambda k_in: cost(k_in) <= limit, k_out)
        if fitted[1] == 0 and out_f >= COUNT_SKETCH_RATIO * k_out:
            # The Gaussian output side alone costs more than the budget (a language model's decoder over
            # its vocabulary: out_f * k_out per token against in_f * out_f for the layer). A count sketch
            # costs out_f per token: the weight, half of such a model's parameters, stays in the rows.
            k_out, k_in = _largest(k_max, in_f, lambda k_in: cost(k_in, True) <= limit, k_out)
            if k_in:
                return (k_out, k_in, COUNT_OUT)
        return fitted

    def __init__(self, name: str, module: nn.Linear, k: Optional[int], seed: int) -> None:
        super().__init__(name, module, k, seed)
        out_f, in_f = self.shape(module)
        k_out, k_in = split_k(k, out_f)
        self._stacks: Dict[Any, torch.Tensor] = {}  # stacked P_out^T of groups led by this layer
        self.p_out = Factor(out_f, k_out, seed, name, "out", count=isinstance(k, tuple) and COUNT_OUT in k[2:])
        # A wide input sketched to many columns (MNIST's 784 pixels to 102) is count-sketched: its
        # Gaussian product cost more than the layer itself, the index_add_ costs O(in).
        wide = k_in is not None and in_f >= COUNT_SKETCH_RATIO * k_in and k_in >= 64
        self.p_in = Factor(in_f, k_in, seed, name, "in", count=wide)
        self.width = self.p_out.k * self.p_in.k * self.train_w + self.p_out.k * self.train_b
        # Made once: group_key, which holds it, runs at every call of a grouped layer. Grouped layers share
        # one batched product with dense output factors, so a count-sketched output side is never grouped.
        self._static_key = (
            None
            if self.p_out.count
            else (LinearSketch, out_f, self.p_out.k, self.p_in.k, self.p_out.identity, self.train_w, self.train_b)
        )

    def save(self, module: nn.Module, x: torch.Tensor) -> Any:
        if not self.train_w:
            return None
        a = _f32(x.detach())
        if a.dim() == 2:
            return self.p_in(a)  # [B, k_in]: projected in the forward (a checkpointed layer keeps no A)
        return self.p_in(a.reshape(a.shape[0], -1, a.shape[-1]))  # [B, T, k_in]

    def hold(self, x: torch.Tensor) -> Optional["HeldInput"]:
        """The input of a call whose count sketch the backward kernel forms with the rows
        (``rows_into``), or None when that kernel cannot read it (watch() then projects it now). For
        layers with a trained weight and a count-sketched input (watch()'s ``_held_inputs``)."""
        a = x.detach()
        if not (a.dim() == 2 and a.is_contiguous() and cpu_kernel_input(a)):
            return None
        return HeldInput(a)

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        if type(saved) is HeldInput:  # the kernel did not apply to this gradient: the input projected now
            saved = self.p_in(saved.x)
        b = g.shape[0]
        g = _f32(g)
        out = []
        if g.dim() == 2:  # one position per example: outer products, no position sum
            gp = self.p_out(g)  # [B, k_out]
            if self.train_w:
                out.append((gp.unsqueeze(2) * saved.unsqueeze(1)).reshape(b, -1))
            if self.train_b:
                out.append(gp)
            return out
        if not self.train_w:
            # The bias alone (a frozen or left-out weight): P_out is linear, so sum the positions first,
            # one projection per example instead of one per position.
            return [self.p_out(g.reshape(b, -1, g.shape[-1]).sum(1))]
        gp = self.p_out(g.reshape(b, -1, g.shape[-1]))  # [B, T, k_out]
        out.append(torch.bmm(gp.transpose(1, 2), saved).reshape(b, -1))
        if self.train_b:
            out.append(gp.sum(1))
        return out

    def rows_into(
        self, module: nn.Module, saved: Any, g: torch.Tensor, out: np.ndarray, scale: float, accumulate: bool
    ) -> Optional[bool]:
        # One Rust pass writes the weight block vec(g_b a_b^T) and the bias block g_b, scaled, into the
        # step's rows: on a CPU the outer-product tensor, its copy into the rows and their scaling were
        # three ops of a small model's step (src/sketch_rows.rs). 2-D float32 CPU inputs only.
        g = g.detach()
        if g.dim() != 2 or not cpu_kernel_input(g):
            return None
        if type(saved) is HeldInput:
            # The input's count sketch and the rows in one call (a lone layer's wide input; hold()).
            x, (order, starts, signs) = saved.x.numpy(), self.p_in.count_tables()
            gp = self.p_out(g).numpy()
            return _native.count_outer_rows(gp, x, order, starts, signs, float(scale), self.train_b, accumulate, out)
        if self.train_w and (saved.dim() != 2 or not cpu_kernel_input(saved)):
            return None
        gp = self.p_out(g)
        a = saved if self.train_w else gp.new_empty(gp.shape[0], 0)
        return _native.outer_rows(gp.numpy(), a.numpy(), float(scale), self.train_b, accumulate, out)

    @property
    def factor_width(self) -> int:
        """The columns of this layer's factors (``factors_into``): k_out + k_in."""
        return self.p_out.k + self.p_in.k

    def factors_into(self, saved: Any, g: torch.Tensor, out: np.ndarray, scale: float) -> Optional[bool]:
        """Write this call's factors into ``out`` ([B, k_out + k_in] float32, a NumPy view of the step's
        slot): ``scale`` times the projected output gradient, then the projected input (a held input's
        count sketch formed now). The layer's rows (``rows_into``) are their outer products, followed by
        the first factor as the bias block; the sampler's kernel forms them where it balances them
        (``_segments.OuterRows``). Says whether those rows are finite; None (nothing written) where no
        kernel applies, as for ``rows_into``. For a lone Linear layer with a trained weight."""
        g = g.detach()
        if g.dim() != 2 or not cpu_kernel_input(g):
            return None
        if type(saved) is HeldInput:
            x, (order, starts, signs) = saved.x.numpy(), self.p_in.count_tables()
            return _native.count_factors(self.p_out(g).numpy(), x, order, starts, signs, float(scale), out)
        if saved.dim() != 2 or not cpu_kernel_input(saved):
            return None
        return _native.outer_factors(self.p_out(g).numpy(), saved.numpy(), float(scale), out)

    def group_key(self, saved: Any, g: torch.Tensor) -> Any:
        # Layers of one shape (a transformer's q, k, v, o of every block) are sketched by a few batched
        # products instead of a few small ones each: on a GPU the cost of a watched step is the number
        # of ops dispatched from Python, not their arithmetic.
        static = self._static_key
        if static is None or not groupable(g):
            # On a CPU a torch op's dispatch costs microseconds, and stacking a group's output gradients
            # copies each of them: past CPU_GROUP_MAX the copy costs more than the ops a group saves (a
            # ViT of width 192 on 64 images: a tenth of a plain step), so such a call is sketched alone.
            return None
        b = g.shape[0]
        return (static, b, g.numel() // (b * g.shape[-1]), g.dtype, g.device)

    def static_key(self) -> Any:
        return self._static_key

    @staticmethod
    def rows_grouped(members: List["tuple[LinearSketch, Any, torch.Tensor]"]) -> List[List[torch.Tensor]]:
        """``rows`` of several calls of equally shaped Linear layers, in one batched product each."""
        first = members[0][0]
        n, b = len(members), members[0][2].shape[0]
        out_f = members[0][2].shape[-1]
        gs = torch.stack([_f32(g).reshape(b, -1, out_f) for _, _, g in members])  # [L, B, T, out]
        if not first.train_w:
            gs = gs.sum(2, keepdim=True)  # biases alone: the positions summed before projecting (rows())
        t = gs.shape[2]
        if first.p_out.identity:
            gp = gs
        else:
            p = stacked_t(first._stacks, [sk.p_out for sk, _, _ in members], gs.device, gs.dtype)
            gp = torch.bmm(gs.view(n, b * t, out_f), p).view(n, b, t, -1)  # [L, B, T, k_out]
        k_out = gp.shape[-1]
        pieces: List[List[torch.Tensor]] = [[] for _ in members]
        if first.train_w:
            # Each call's saved input as [B, T, k_in]: calls with one token each may come as [B, k_in] and
            # [B, 1, k_in] (CaiT's class-attention layers), whose keys are equal.
            ap = torch.stack([saved.reshape(b, t, -1) for _, saved, _ in members]).reshape(n * b, t, -1)
            if t == 1:
                w = gp.reshape(n * b, k_out, 1) * ap
            else:
                w = torch.bmm(gp.reshape(n * b, t, k_out).transpose(1, 2), ap)
            # unbind: one op makes every member's view, where w[i] was one op each.
            for piece, w_i in zip(pieces, w.reshape(n, b, -1).unbind(0)):
                piece.append(w_i)
        if first.train_b:
            for piece, bias_i in zip(pieces, gp.sum(2).unbind(0)):
                piece.append(bias_i)
        return pieces

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        out = []
        if self.train_w:
            w = _f32(grads["weight"])  # [B, out, in]
            out.append(self.p_in(self.p_out(w.transpose(1, 2)).transpose(1, 2)).reshape(w.shape[0], -1))
        if self.train_b:
            out.append(self.p_out(_f32(grads["bias"])))
        return out


@register_sketch_by_name("transformers.pytorch_utils.Conv1D")
class HFConv1DSketch(LinearSketch):
    """Hugging Face's ``Conv1D`` (GPT-2's attention and MLP projections): a Linear layer whose weight is
    stored transposed, ``[in, out]``, applied as ``x @ W + b``. The rows are those of the Linear layer it
    is, with the same block layout (k_out x k_in); only the parameter's own layout differs."""

    @staticmethod
    def shape(module: nn.Module) -> "tuple[int, int]":
        in_f, out_f = module.weight.shape
        return int(out_f), int(in_f)

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        if self.train_w:
            grads = {**grads, "weight": grads["weight"].transpose(1, 2)}  # [B, in, out] -> [B, out, in]
        return super().project(module, grads)


@register_sketch(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvSketch(LayerSketch):
    """grad W_b = sum_p g_bp u_bp^T over output positions p (u: the input patch); the block is
    P_out grad W_b P_in^T, formed in whichever order costs less per position:

    - sketch first (wide layers): P_in u_p for every p is a convolution of the input with k_in channels
      of the layer's own geometry (stride, padding, dilation, padding mode; per group), so no im2col;
      the output side is a projection of the channels; the block sums their outer products.
    - gradient first (narrow layers, c_out/groups < about k_in: the first convolutions of a net, where
      projecting every patch costs more than the layer itself): the patches (im2col) times the output
      gradient give grad W_b, which is then projected once per example, not once per position.
    Both are the same numbers in exact arithmetic.
    """

    @staticmethod
    def fit(module: nn.Module, k: Optional[int], budget: float) -> Any:
        """The largest k_in <= k whose sketch costs at most ``budget`` times the layer's forward per
        output position (the first convolutions of a net, with few output channels and thousands of
        positions, get a small k_in: there the input side is the whole cost)."""
        w = module.weight
        c_out_g, m = w.shape[0] // module.groups, int(math.prod(w.shape[1:]))
        k_out, k_max = split_k(k, c_out_g)
        k_out = c_out_g if k_out is None or c_out_g <= k_out else k_out

        def cost(k_in: int) -> int:
            # A convolution with few output channels costs about what one with 8 does (measured with
            # mkldnn on this CPU: 1 to 8 channels within noise): reading the input is the floor.
            return m * max(k_in, 8) + (c_out_g * k_out if k_out < c_out_g else 0) + k_out * k_in

        return _largest(k_max, m, lambda k_in: cost(k_in) <= budget * c_out_g * m, k_out)

    def __init__(self, name: str, module: nn.modules.conv._ConvNd, k: Optional[int], seed: int) -> None:
        super().__init__(name, module, k, seed)
        w = module.weight
        self.groups = module.groups
        self.c_out_g = w.shape[0] // self.groups
        self.kernel = tuple(w.shape[2:])
        self.cin_g = w.shape[1]
        m = self.cin_g * math.prod(self.kernel)
        k_out, k_in = split_k(k, self.c_out_g)
        self.p_out = Factor(self.c_out_g, k_out, seed, name, "out")
        self.m = m
        self.k_in = m if (k_in is None or m <= k_in) else int(k_in)
        self._seed_in = derived_seed(seed, name, "in", m, self.k_in)
        self._kernels: Dict[Any, torch.Tensor] = {}
        g = self.groups
        self.width = g * self.p_out.k * self.k_in * self.train_w + g * self.p_out.k * self.train_b
        k_out = self.p_out.k
        sketch_first = self.k_in * m + (0 if self.p_out.identity else k_out * self.c_out_g) + k_out * self.k_in
        gradient_first = 2 * m + self.c_out_g * m
        self.gradient_first = gradient_first < sketch_first
        self.p_bias = self.p_out  # a convolution's bias is per output channel, as the weight's rows are

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return not getattr(module, "transposed", False)

    def _p_in(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """P_in as a convolution kernel [G k_in, c_in/G, *kernel] (one-hot taps when exact)."""
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

    def _batched(self, t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0) if t.dim() == len(self.kernel) + 1 else t

    def save(self, module: nn.Module, x: torch.Tensor) -> Any:
        if not self.train_w:
            return None
        a = self._batched(x.detach())
        if self.gradient_first:
            return a  # a reference (autograd keeps the input for the weight gradient anyway)
        a = _f32(a)
        ap = module._conv_forward(a, self._p_in(a.device, a.dtype), None)  # [B, G k_in, *out]
        return ap.reshape(ap.shape[0] * self.groups, self.k_in, -1).transpose(1, 2)  # [B G, P, k_in]

    def _patches(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """[B G, m, P]: every output position's input patch, per group (im2col)."""
        if isinstance(module, nn.Conv2d) and not isinstance(module.padding, str):
            if module.padding_mode != "zeros":
                x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
                padding = (0, 0)
            else:
                padding = module.padding
            cols = im2col(x, module.kernel_size, module.dilation, padding, module.stride)
        else:  # the layer's own geometry with one-hot taps
            eye = torch.eye(self.m, device=x.device, dtype=x.dtype).reshape(self.m, self.cin_g, *self.kernel)
            cols = module._conv_forward(x, eye.repeat(self.groups, *([1] * (eye.dim() - 1))), None)
        return cols.reshape(x.shape[0] * self.groups, self.m, -1)

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        g = self._batched(_f32(g))
        b = g.shape[0]
        gg = g.reshape(b * self.groups, self.c_out_g, -1)  # [B G, c_out/G, P]
        out = []
        if self.train_w and self.gradient_first:
            w = torch.bmm(gg, self._patches(module, _f32(saved)).transpose(1, 2))  # [B G, c_out/G, m]
            if self.k_in != self.m:
                w = torch.matmul(w, self._p_in(w.device, w.dtype)[: self.k_in].reshape(self.k_in, self.m).t())
            out.append(self.p_out(w.transpose(1, 2)).transpose(1, 2).reshape(b, -1))
        if self.train_b or (self.train_w and not self.gradient_first):
            gp = self.p_out(gg.transpose(1, 2)).transpose(1, 2)  # [B G, k_out, P]
            if self.train_w and not self.gradient_first:
                out.append(torch.bmm(gp, saved).reshape(b, -1))
            if self.train_b:
                out.append(gp.sum(2).reshape(b, -1))
        return out

    def rows_into(
        self, module: nn.Module, saved: Any, g: torch.Tensor, out: np.ndarray, scale: float, accumulate: bool
    ) -> Optional[bool]:
        # The bias alone, exact (a net's first convolutions, their weights left out under the budget: LeNet's
        # two): each example's channel sums, written into the step's rows scaled. With every block of a step
        # written so, the step needs neither the copy of its pieces nor a scan for non-finite values. One
        # Rust call (src/sketch_rows.rs): in a training step each torch or NumPy call here starts with cold
        # caches (the layer's backward ran just before) and costs several times what it costs in a loop of
        # its own, so the four calls of torch's form cost more than the sum (benchmarks/watch_breakdown.py
        # times them in the loop).
        g = g.detach()
        if self.train_w or not self.p_bias.identity or g.dim() != len(self.kernel) + 2 or not cpu_kernel_input(g):
            return None  # (an unbatched call takes the torch path: its rows are not [B, C] of this slot)
        if not g.is_contiguous():
            return None  # (channels last: the torch path sums it as it is)
        return _native.channel_sums(g.numpy(), float(scale), accumulate, out)

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        out = []
        if self.train_w:
            w = _f32(grads["weight"])
            b = w.shape[0]
            w = w.reshape(b, self.groups, self.c_out_g, self.m)
            p_in = self._p_in(w.device, w.dtype)[: self.k_in].reshape(self.k_in, self.m)
            wp = torch.matmul(w, p_in.t())  # [B, G, c_out/G, k_in]
            out.append(self.p_out(wp.transpose(2, 3)).transpose(2, 3).reshape(b, -1))
        if self.train_b:
            out.append(self._bias_rows(_f32(grads["bias"])))
        return out

    def _bias_rows(self, bias: torch.Tensor) -> torch.Tensor:
        """[B, c_out] bias gradients (or the output gradient's channel sums) -> their block."""
        return self.p_out(bias.reshape(bias.shape[0], self.groups, self.c_out_g)).reshape(bias.shape[0], -1)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@register_sketch(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeSketch(ConvSketch):
    """A transposed convolution is the adjoint of the convolution with the same weight and geometry
    (stride, padding, dilation, groups) that maps its output back to its input. So its weight's gradient
    is that convolution's, with the roles swapped: grad W_b = sum_p x_bp v_bp^T over the layer's *input*
    positions p, where v_bp is the patch of the output gradient that the kernel reaches from p. ConvSketch's
    block, then, with the output gradient as the convolution's input and the layer's input as its output
    gradient: the weight ``[c_in, c_out/G, *kernel]`` is laid out as that convolution's, so ``fit``, the
    sizes and ``project`` are ConvSketch's. Both sides are known only in the backward, where the sketch is
    formed (the input is held until then; autograd holds it anyway for the weight gradient). The bias is
    per output channel, ``[c_out]``: its own factor."""

    def __init__(self, name: str, module: nn.modules.conv._ConvNd, k: Optional[int], seed: int) -> None:
        super().__init__(name, module, k, seed)
        c_out = self.groups * self.cin_g
        self.p_bias = Factor(c_out, split_k(k, c_out)[0], seed, name, "bias")
        self.width = self.groups * self.p_out.k * self.k_in * self.train_w + self.p_bias.k * self.train_b

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return True

    def save(self, module: nn.Module, x: torch.Tensor) -> Any:
        return self._batched(x.detach()) if self.train_w else None

    def _adjoint(self, module: nn.Module, g: torch.Tensor, kernel: torch.Tensor, positions: Any) -> torch.Tensor:
        """The convolution of the output gradient with ``kernel`` in the layer's geometry, at the input's
        positions: [B, channels, P]. (With an ``output_padding`` past the stride, possible where the
        dilation is larger, it reaches positions past the input's; those meet no input and are cut.)"""
        conv = _CONV[len(self.kernel)]
        out = conv(g, kernel, None, module.stride, module.padding, module.dilation, self.groups)
        for d, n in enumerate(positions):
            out = out.narrow(2 + d, 0, n)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        g = self._batched(_f32(g))
        b = g.shape[0]
        out = []
        if self.train_w:
            x = _f32(saved)
            xx = x.reshape(b * self.groups, self.c_out_g, -1)  # [B G, c_in/G, P]: the adjoint's output side
            if self.gradient_first:
                eye = torch.eye(self.m, device=g.device, dtype=g.dtype).reshape(self.m, self.cin_g, *self.kernel)
                taps = eye.repeat(self.groups, *([1] * (eye.dim() - 1)))
                patches = self._adjoint(module, g, taps, x.shape[2:]).reshape(b * self.groups, self.m, -1)
                w = torch.bmm(xx, patches.transpose(1, 2))  # [B G, c_in/G, m]
                if self.k_in != self.m:
                    w = torch.matmul(w, self._p_in(w.device, w.dtype)[: self.k_in].reshape(self.k_in, self.m).t())
                out.append(self.p_out(w.transpose(1, 2)).transpose(1, 2).reshape(b, -1))
            else:
                gp = self._adjoint(module, g, self._p_in(g.device, g.dtype), x.shape[2:])  # [B, G k_in, P]
                gp = gp.reshape(b * self.groups, self.k_in, -1).transpose(1, 2)  # [B G, P, k_in]
                xp = self.p_out(xx.transpose(1, 2)).transpose(1, 2)  # [B G, k_out, P]
                out.append(torch.bmm(xp, gp).reshape(b, -1))
        if self.train_b:
            out.append(self._bias_rows(g.reshape(b, g.shape[1], -1).sum(2)))
        return out

    def _bias_rows(self, bias: torch.Tensor) -> torch.Tensor:
        return self.p_bias(bias.reshape(bias.shape[0], -1))


@register_sketch(nn.Embedding)
class EmbeddingSketch(LayerSketch):
    """grad W_b = sum_t e_{x_t} g_t^T, sparse: the vocabulary side is count-sketched (bucket, sign per id),
    the feature side projected; one scatter-add, no vocabulary x dim tensor. Padding ids add nothing."""

    params = ("weight",)

    def __init__(self, name: str, module: nn.Embedding, k: Optional[int], seed: int) -> None:
        super().__init__(name, module, k, seed)
        v, d = module.weight.shape
        k_d, k_v = split_k(k, d)
        self.vocab = CountSketch(v, k_v if k_v is not None else v, seed, name, "vocab")
        self.p_out = Factor(d, k_d, seed, name, "dim")
        self.width = self.vocab.k * self.p_out.k * self.train_w
        self._padded: Dict[Any, "tuple[torch.Tensor, torch.Tensor]"] = {}
        self._onehots: Dict[Any, torch.Tensor] = {}

    def _tables(self, module: nn.Module, device: torch.device) -> "tuple[torch.Tensor, torch.Tensor]":
        """The vocabulary's buckets and signs, the padding id's sign zero (it adds nothing): made once,
        so that a step looks up the signs alone, without masking the padding (two ops fewer)."""
        key = (device, module.padding_idx)  # a table shared by modules with other padding ids (T5)
        t = self._padded.get(key)
        if t is None:
            buckets, signs = self.vocab.tables(device)
            if module.padding_idx is not None:
                signs = signs.clone()
                signs[module.padding_idx] = 0.0
            t = self._padded[key] = (buckets, signs)
        return t

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        # max_norm rewrites the weight inside the forward; scale_grad_by_freq scales by counts over the
        # whole batch, which is not any one example's gradient.
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse

    def _signed_onehots(self, module: nn.Module, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """[V, k_v]: each id's row of the count sketch as a dense matrix, sign s(i) in column h(i) (zero for
        the padding id); None where that table would be large (ONEHOT_TABLE_MAX) or its product wasteful."""
        key = (device, dtype, module.padding_idx)
        t = self._onehots.get(key)
        if t is None:
            if self.vocab.n * self.vocab.k > ONEHOT_TABLE_MAX or self.vocab.k > ONEHOT_K_MAX:
                return None
            buckets, signs = self._tables(module, device)
            t = torch.zeros(self.vocab.n, self.vocab.k, device=device, dtype=dtype)
            t[torch.arange(self.vocab.n, device=device), buckets] = signs.to(dtype)
            self._onehots[key] = t
        return t

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        b = g.shape[0]
        ids = saved.reshape(b, -1)
        gp = self.p_out(_f32(g).reshape(b, ids.shape[1], -1))  # [B, T, k_d]
        table = self._signed_onehots(module, ids.device, gp.dtype)
        if table is not None:
            # Two ops, a lookup and a product, where the scatter below takes five: on a GPU a watched
            # transformer's step costs the ops it dispatches, and its embeddings were two fifths of them.
            return [torch.bmm(table[ids].transpose(1, 2), gp).reshape(b, -1)]
        buckets, signs = self._tables(module, ids.device)
        gp = gp * signs[ids].unsqueeze(-1).to(gp.dtype)
        out = torch.zeros(b, self.vocab.k, gp.shape[-1], dtype=gp.dtype, device=gp.device)
        out.scatter_add_(1, buckets[ids].unsqueeze(-1).expand(-1, -1, gp.shape[-1]), gp)
        return [out.reshape(b, -1)]

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        w = self.p_out(_f32(grads["weight"]))  # [B, V, k_d]
        buckets, signs = self.vocab.tables(w.device)
        out = torch.zeros(w.shape[0], self.vocab.k, w.shape[-1], dtype=w.dtype, device=w.device)
        out.index_add_(1, buckets, w * signs.view(1, -1, 1))
        return [out.reshape(w.shape[0], -1)]


@register_sketch(nn.EmbeddingBag)
class EmbeddingBagSketch(EmbeddingSketch):
    """An EmbeddingBag's output row b is a weighted sum of its bag's table rows, sum_t w_t W[x_t] (w_t = 1,
    the token's per_sample_weight, or 1 / the bag's size under mode='mean'), so grad W_b = sum_t w_t
    e_{x_t} g_b^T: Embedding's sketch with each token weighted and one output gradient per bag. The
    vocabulary side, sum_t w_t s(x_t) e_{h(x_t)}, is taken in the forward (``bags``) by the layer's own
    function over the table of signed one-hot rows, which weighs the tokens exactly as the layer does
    (offsets, include_last_offset, per_sample_weights, padding_idx, empty bags); the backward multiplies
    it by the projected output gradient."""

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        # mode='max' picks one row per feature, a gradient of another form; the rest as for Embedding. A
        # subclass whose forward is its own may not compute the bags so.
        return (
            module.mode in ("sum", "mean")
            and module.max_norm is None
            and not module.scale_grad_by_freq
            and not module.sparse
            and type(module).forward is nn.EmbeddingBag.forward
        )

    def bags(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> torch.Tensor:
        """[B, k_v]: each bag of this call through the vocabulary's count sketch, weighted as the layer
        weighs its tokens (B is the number of bags)."""
        names = ("input", "offsets", "per_sample_weights")
        call = dict(zip(names, args))
        call.update((k, v) for k, v in kwargs.items() if k in names)
        ids, offsets, psw = call["input"], call.get("offsets"), call.get("per_sample_weights")
        psw = None if psw is None else _f32(psw.detach())
        table = self._signed_onehots(module, ids.device, torch.float32)
        if table is not None:
            return F.embedding_bag(
                ids,
                table,
                offsets,
                mode=module.mode,
                per_sample_weights=psw,
                include_last_offset=module.include_last_offset,
                padding_idx=module.padding_idx,
            )
        ids, w = self._weighted(module, ids, offsets, psw)
        buckets, signs = self._tables(module, ids.device)
        v = torch.zeros(ids.shape[0], self.vocab.k, device=ids.device)
        return v.scatter_add_(1, buckets[ids], w * signs[ids])

    @staticmethod
    def _weighted(
        module: nn.Module, ids: torch.Tensor, offsets: Optional[torch.Tensor], psw: Optional[torch.Tensor]
    ) -> "tuple[torch.Tensor, torch.Tensor]":
        """[B, L] ids and float32 weights of each bag's tokens by nn.EmbeddingBag's rules (places past a
        bag's end weigh 0): for a vocabulary too large for the table of signed one-hot rows."""
        if ids.dim() == 2:
            valid = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
            w = torch.ones(ids.shape, device=ids.device) if psw is None else psw
        else:
            assert offsets is not None  # (nn.EmbeddingBag refuses a 1-D input without offsets)
            n = ids.shape[0]
            starts = offsets[:-1] if module.include_last_offset else offsets
            ends = offsets[1:] if module.include_last_offset else torch.cat([offsets[1:], offsets.new_tensor([n])])
            lengths = (ends - starts).clamp_min(0)
            b = starts.shape[0]
            bag = torch.repeat_interleave(torch.arange(b, device=ids.device), lengths)
            at = torch.arange(bag.shape[0], device=ids.device) - (torch.cumsum(lengths, 0) - lengths)[bag]
            token = starts[bag] + at
            width = int(lengths.max()) if b else 0
            valid = torch.zeros(b, width, dtype=torch.bool, device=ids.device)
            valid[bag, at] = True
            dense = torch.zeros(b, width, dtype=ids.dtype, device=ids.device)
            dense[bag, at] = ids[token]
            w = torch.zeros(b, width, device=ids.device)
            w[bag, at] = 1.0 if psw is None else psw[token]
            ids = dense
        if module.padding_idx is not None:
            valid = valid & (ids != module.padding_idx)  # left out of the bag, and of its mean's count
        w = w * valid
        if module.mode == "mean":
            w = w / valid.sum(1, keepdim=True).clamp_min(1)
        return ids, w

    def save(self, module: nn.Module, x: Any) -> Any:
        return x  # the bags' vocabulary side, from bags()

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        b = g.shape[0]
        gp = self.p_out(_f32(g).reshape(b, -1))  # [B, k_d]
        return [(saved.unsqueeze(2) * gp.unsqueeze(1)).reshape(b, -1)]


class SharedEmbeddingSketch(LayerSketch):
    """An Embedding whose table is another Embedding's (T5's encoder and decoder look up the model's one
    ``shared`` table; so do BART's). The table's per-example gradient is the sum over its uses, so this
    layer's lookups go through that embedding's own projection into its columns, where they add up."""

    params = ("weight",)

    def __init__(self, name: str, module: nn.Embedding, embedding: "EmbeddingSketch") -> None:
        super().__init__(name, module, None, 0)
        self.embedding = embedding

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        return self.embedding.rows(module, saved, g)  # this layer's padding_idx

    def add_rows(self, step: Any, pieces: List[torch.Tensor]) -> None:
        step.add(self.embedding.offset, pieces)

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        return []  # the whole gradient of the table (every use) is projected by the embedding's sketch


class TiedLinearSketch(LayerSketch):
    """A Linear layer whose weight is an Embedding's (a tied output layer, as BERT's masked-LM head and
    many language models have). The tied parameter's per-example gradient is the sum of both uses, so this layer's part,
    sum_t g_t a_t^T ([V, d], vocabulary by feature, as the table is), goes through the embedding's own
    projection (its vocabulary count sketch and feature factor) into the embedding's columns, where the
    two parts add up. Its own bias, if trainable, gets columns of its own, count-sketched the same way."""

    def __init__(self, name: str, module: nn.Linear, embedding: "EmbeddingSketch") -> None:
        super().__init__(name, module, None, 0)
        self.embedding = embedding
        self.train_w = True
        self.width = embedding.vocab.k * self.train_b

    def covered(self, module: nn.Module) -> List[str]:
        return ["weight"] + (["bias"] if self.train_b else [])

    def _vocab(self, g: torch.Tensor) -> torch.Tensor:
        """The embedding's vocabulary count sketch applied to the last dimension (V -> k_v)."""
        vocab = self.embedding.vocab
        if vocab.identity:
            return g
        buckets, signs = vocab.tables(g.device)
        out = g.new_zeros(*g.shape[:-1], vocab.k)
        return out.index_add_(g.dim() - 1, buckets, g * signs.to(g.dtype))

    def save(self, module: nn.Module, x: torch.Tensor) -> Any:
        a = _f32(x.detach())
        return self.embedding.p_out(a.reshape(a.shape[0], -1, a.shape[-1]))  # [B, T, k_d]

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        b = g.shape[0]
        gp = self._vocab(_f32(g).reshape(b, -1, g.shape[-1]))  # [B, T, k_v]
        out = [torch.bmm(gp.transpose(1, 2), saved).reshape(b, -1)]  # [B, k_v k_d], the table's layout
        if self.train_b:
            out.append(gp.sum(1))
        return out

    def add_rows(self, step: Any, pieces: List[torch.Tensor]) -> None:
        step.add(self.embedding.offset, pieces[:1])
        if self.train_b:
            step.add(self.offset, pieces[1:])

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        # The weight's whole per-example gradient (both uses) is projected by the embedding's sketch.
        return [self._vocab(_f32(grads["bias"]))] if self.train_b else []


class GhostLinearSketch(LayerSketch):
    """A Linear layer balanced exactly without forming its per-example weight gradients (``sketch="ghost"``,
    or ``per_layer={name: "ghost"}``): its weight part goes to the sampler as the factors (G, A) of
    g_b a_b^T, whose inner products are (g_b . g_c)(a_b . a_c), B x B numbers per step
    (:class:`torchgrab.ondevice.Factored`, ../shared/design/SKETCH.md's ghost form). Its bias gradient g_b is
    small and goes into the rows as it is. Inputs must be [B, in]: with tokens the Gram products cost
    O(B^2 T^2 (in + out)), where a sketch is the better buy."""

    ghost = True

    def __init__(self, name: str, module: nn.Linear, k: Any, seed: int) -> None:
        super().__init__(name, module, None, seed)
        self.out_f, self.in_f = (int(n) for n in module.weight.shape)
        self.width = self.out_f * self.train_b
        self.ghost_width = self.out_f * self.in_f * self.train_w

    def save(self, module: nn.Module, x: torch.Tensor) -> Any:
        if x.dim() != 2:
            raise UnsupportedModelError(
                f"watch(): the ghost form of {self.name!r} needs inputs [batch, {self.in_f}], got "
                f"{tuple(x.shape)}; with a sequence dimension sketch this layer instead (per_layer={{{self.name!r}: 32}})"
            )
        return x.detach()  # copied in the backward (WatchHandle._on_grad), where autograd holds it intact

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        return [_f32(g)] if self.train_b else []

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        # The rows hold the bias part only; the weight part is balanced from its factors.
        return [_f32(grads["bias"])] if self.train_b else []


class FunctionalSketch(LayerSketch):
    """A layer of a class torch does not ship and torchgrab has no sketch for (the custom RMSNorm
    classes of Llama, Mistral, Qwen, Gemma and T5 in Hugging Face's models; a user's own scale layer),
    when its trainable parameters are its own and few: each example's gradient of them by torch.func
    over this layer alone (the vector-Jacobian product of its forward on that example's input with that
    example's output gradient; Opacus computes such layers' per-sample gradients the same way), then
    each parameter projected to k numbers, exact up to k, as a norm's are. The layer must take one
    batch-first tensor and treat the examples independently; its cost is a second forward and backward
    of the layer, and B times its parameters of memory, hence the size limit."""

    MAX_PARAMS = 1 << 16
    # torch's own layers taken so too: one batch-first tensor in, each example on its own, and nothing
    # cheaper to write for them (PReLU's slope, one or one per channel).
    TORCH_KINDS: Tuple[Type[nn.Module], ...] = (nn.PReLU,)

    @classmethod
    def applies(cls, module: nn.Module) -> bool:
        """A leaf module of a class outside torch (or of TORCH_KINDS) with 1..MAX_PARAMS trainable
        parameters of its own."""
        own = [p for p in module._parameters.values() if p is not None and p.requires_grad]
        return (
            bool(own)
            and (not type(module).__module__.startswith("torch.") or isinstance(module, cls.TORCH_KINDS))
            and next(iter(module.children()), None) is None
            and sum(p.numel() for p in own) <= cls.MAX_PARAMS
        )

    def __init__(self, name: str, module: nn.Module, k: Any, seed: int) -> None:
        super().__init__(name, module, None, seed)
        k = k[0] if isinstance(k, tuple) else k
        self.layer_class = type(module).__name__
        self.names = [n for n, p in module._parameters.items() if p is not None and p.requires_grad]
        self.factors = {n: Factor(module._parameters[n].numel(), k, seed, name, n) for n in self.names}
        self.width = sum(f.k for f in self.factors.values())

        def loss(p: Dict[str, torch.Tensor], x: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
            out = torch.func.functional_call(module, p, (x.unsqueeze(0),))
            return (out * gb.unsqueeze(0).to(out.dtype)).sum()

        # Built once: {parameter: [B, *shape]} from (parameters, inputs [B, ...], output gradients [B, ...]).
        # torch.func.grad differentiates also under the no_grad the rows are formed in; the layer's own
        # forward hooks (watch()'s included) see a functorch transform and record nothing.
        self._per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))

        # Whether the layer is feature-wise linear in its parameters (see _featurewise): None until its
        # first call's gradients, computed both ways, say.
        self.featurewise: Optional[bool] = None

    def covered(self, module: nn.Module) -> List[str]:
        return list(self.names)

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        g = g.detach()
        # The layer is replayed in full precision, as every row is formed: an input that autocast made
        # narrower than the parameters is widened to theirs (PReLU refuses mixed dtypes outside autocast).
        wide = module._parameters[self.names[0]].dtype
        if (
            saved.is_floating_point()
            and wide.is_floating_point
            and torch.finfo(saved.dtype).bits < torch.finfo(wide).bits
        ):
            saved = saved.to(wide)
        grads = self._featurewise(module, saved, g) if self.featurewise is not False else None
        if grads is None or self.featurewise is None:
            params = {n: module._parameters[n].detach() for n in self.names}
            with without_saved_tensor_hooks(self.name):
                exact = self._per_example(params, saved, g)
            if self.featurewise is None:
                self.featurewise = grads is not None and all(_close(grads[n], exact[n]) for n in self.names)
            grads = exact
        return self.project(module, grads)

    def _featurewise(self, module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        """Each example's gradient of each parameter, when every parameter is a vector over the output's
        last dimension and the output is linear in it feature by feature: y = h(x) * w + b (an RMSNorm's
        or LayerNorm's weight and bias; Gemma's h(x) * (1 + w)). Then dy/dp = y(p = 1) - y(p = 0), two
        plain forwards of the layer per parameter instead of torch.func's vmap of its forward and backward
        (about a third of the time for Llama's norms). None when the parameters have other shapes."""
        n = g.shape[-1]
        if any(module._parameters[p].dim() != 1 or module._parameters[p].numel() != n for p in self.names):
            return None
        out = {}
        gf = _f32(g)
        for p in self.names:
            w = module._parameters[p]
            d = self._forward_with(module, x, p, torch.ones_like(w)) - self._forward_with(
                module, x, p, torch.zeros_like(w)
            )
            out[p] = (gf * _f32(d)).reshape(g.shape[0], -1, n).sum(1)
        return out

    @staticmethod
    def _forward_with(module: nn.Module, x: torch.Tensor, name: str, value: torch.Tensor) -> torch.Tensor:
        """The layer's forward with one parameter replaced by ``value``, its hooks not run (so watch()'s
        own do not see a call). Called under no_grad, in the backward, when the layer's forward is not
        running."""
        saved = module._parameters[name]
        module._parameters[name] = value  # type: ignore[assignment]
        try:
            return type(module).forward(module, x)
        finally:
            module._parameters[name] = saved

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        return [self.factors[n](_f32(grads[n]).reshape(grads[n].shape[0], -1)) for n in self.names]


class _AffineNormSketch(LayerSketch):
    """y = x_hat * weight + bias per feature: grad weight_b = sum g * x_hat, grad bias_b = sum g over the
    positions that share a feature; exact when there are at most k features, projected otherwise."""

    def __init__(self, name: str, module: nn.Module, k: Optional[int], seed: int) -> None:
        super().__init__(name, module, k, seed)
        n = self.features(module)
        self.p = Factor(n, split_k(k, n)[0], seed, name, "features")
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


class FeatureNormSketch(_AffineNormSketch):
    """Norms over trailing features (``normalized_shape``), affine when ``elementwise_affine``.

    A transformer's norms (two a block, all of one shape) are sketched together, as its Linear layers
    are: on a GPU a watched step costs the ops it dispatches, and one norm alone takes six."""

    def __init__(self, name: str, module: nn.Module, k: Optional[int], seed: int) -> None:
        super().__init__(name, module, k, seed)
        # What normalized() reads from the module, for the grouped rows (which see no module).
        self.norm_args = (tuple(module.normalized_shape), module.eps)
        self._stacks: Dict[Any, torch.Tensor] = {}  # stacked P^T of groups led by this layer

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return module.elementwise_affine

    def per_feature(self, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1, self.p.n).sum(1)

    def static_key(self) -> Any:
        return (type(self), self.p.n, self.p.k, self.p.identity, self.train_w, self.train_b, self.norm_args)

    def group_key(self, saved: Any, g: torch.Tensor) -> Any:
        if not groupable(g):
            return None  # stacking copies the inputs and gradients (LinearSketch.group_key)
        return (self.static_key(), tuple(g.shape), g.dtype, g.device, tuple(saved.shape), saved.dtype)

    @staticmethod
    def rows_grouped(members: List["tuple[FeatureNormSketch, Any, torch.Tensor]"]) -> List[List[torch.Tensor]]:
        """``rows`` of several calls of equally shaped norms: one normalization, one product, one
        projection for all of them."""
        first = members[0][0]
        n, b, f = len(members), members[0][2].shape[0], first.p.n
        gs = torch.stack([_f32(g) for _, _, g in members]).reshape(n, b, -1, f)
        sums = []
        if first.train_w:
            xs = torch.stack([_f32(x) for _, x, _ in members])
            sums.append((gs * first.normalize(xs).reshape(n, b, -1, f)).sum(2))
        if first.train_b:
            sums.append(gs.sum(2))
        s = torch.cat(sums, 1) if len(sums) > 1 else sums[0]  # [L, parts * B, features]
        if not first.p.identity:
            s = torch.bmm(s, stacked_t(first._stacks, [sk.p for sk, _, _ in members], s.device, s.dtype))
        return [list(s_i.split(b)) for s_i in s.unbind(0)]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The norm without its affine part, over the trailing ``normalized_shape``."""
        raise NotImplementedError

    def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x)


@register_sketch(nn.LayerNorm)
class LayerNormSketch(FeatureNormSketch):
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        shape, eps = self.norm_args
        return F.layer_norm(x, shape, None, None, eps)


if hasattr(nn, "RMSNorm"):

    @register_sketch(nn.RMSNorm)
    class RMSNormSketch(FeatureNormSketch):
        params = ("weight",)

        def normalize(self, x: torch.Tensor) -> torch.Tensor:
            shape, eps = self.norm_args
            return F.rms_norm(x, shape, None, eps)


class _ChannelNormSketch(_AffineNormSketch):
    """Norms with one weight per channel (dimension 1 of a [B, C, ...] input): BatchNorm, GroupNorm and
    InstanceNorm.

    Their rows (g * x_hat and g summed per channel) come from one Rust pass over the input and the output
    gradient (``_native.norm_sums``) for float32 CPU tensors: torch's form normalizes the feature map
    again, multiplies and sums, five passes in each norm layer's backward, most of what watch() added
    to a ResNet's step (``benchmarks/watch_batchnorm.py --part cost``). Other dtypes and devices, and
    channels-last inputs, take the torch path (``normalized``)."""

    def per_feature(self, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1).sum(2)

    def _stats(self, module: nn.Module) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], int]:
        """What normalizes the input, as ``_native.norm_sums`` takes it: (running mean, running var,
        groups), (None, None, 0) for the batch's statistics."""
        raise NotImplementedError

    @staticmethod
    def _running(module: nn.Module) -> Tuple[np.ndarray, np.ndarray, int]:
        """The module's running statistics, as ``_stats`` gives them."""
        mean = module.running_mean.detach().float().contiguous().numpy()
        var = module.running_var.detach().float().contiguous().numpy()
        return mean, var, 0

    def _sums(
        self, module: nn.Module, x: Any, g: torch.Tensor, out: np.ndarray, scale: float, accumulate: bool
    ) -> Optional[bool]:
        """The exact contributions of float32 CPU tensors written into ``out`` by the kernel; None where it
        does not apply."""
        if not (
            isinstance(x, torch.Tensor)
            and x.shape == g.shape
            and x.dim() >= 2
            and x.shape[1] == self.p.n
            and cpu_kernel_input(x)
            and cpu_kernel_input(g)
            and x.is_contiguous()
            and g.is_contiguous()
        ):
            return None
        mean, var, groups = self._stats(module)
        return _native.norm_sums(
            x.numpy(),
            g.numpy(),
            float(module.eps),
            mean,
            var,
            self.train_w,
            self.train_b,
            float(scale),
            accumulate,
            out,
            groups,
        )

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        g = g.detach()
        b, c, parts = int(g.shape[0]) if g.dim() else 0, self.p.n, self.train_w + self.train_b
        buf = np.empty((b, c * parts), dtype=np.float32)
        if b == 0 or self._sums(module, saved, g, buf, 1.0, False) is None:
            return super().rows(module, saved, g)
        sums = torch.from_numpy(buf)
        return [self.p(s) for s in sums.split(c, dim=1)] if parts > 1 else [self.p(sums)]

    def rows_into(
        self, module: nn.Module, saved: Any, g: torch.Tensor, out: np.ndarray, scale: float, accumulate: bool
    ) -> Optional[bool]:
        # Exact (no more channels than the sketch size): the sums are the rows, written into the step's slot.
        if not self.p.identity:
            return None
        return self._sums(module, saved, g.detach(), out, scale, accumulate)


@register_sketch(nn.GroupNorm)
class GroupNormSketch(_ChannelNormSketch):
    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return module.affine

    def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, module.num_groups, None, None, module.eps)

    def _stats(self, module: nn.Module) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], int]:
        return None, None, int(module.num_groups)


@register_sketch(nn.modules.batchnorm._BatchNorm)
class BatchNormSketch(_ChannelNormSketch):
    """BatchNorm couples the examples of a batch, so per-example gradients are not defined; what the
    hooks give is each example's *contribution* g_b * x_hat_b (BN's coupling inside g_b), and those
    contributions add up to the batch gradient exactly. An order needs no more than such a proxy."""

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return module.affine

    def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._batch_stats(module):
            return F.batch_norm(x, None, None, training=True, eps=module.eps)
        return F.batch_norm(x, module.running_mean.float(), module.running_var.float(), training=False, eps=module.eps)

    @staticmethod
    def _batch_stats(module: nn.Module) -> bool:
        return module.training or module.running_mean is None

    def _stats(self, module: nn.Module) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], int]:
        return (None, None, 0) if self._batch_stats(module) else self._running(module)


@register_sketch(nn.modules.instancenorm._InstanceNorm)
class InstanceNormSketch(_ChannelNormSketch):
    """InstanceNorm1d/2d/3d: each example normalized by its own statistics per channel (a GroupNorm with a
    group a channel), or, in eval mode with ``track_running_stats``, by the running ones; either way the
    rows are the exact per-example gradients. (An unbatched call is refused, as for every layer, when the
    step records it: its input is not batch-first.)"""

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return module.affine

    @staticmethod
    def _input_stats(module: nn.Module) -> bool:
        return module.training or not module.track_running_stats

    def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._input_stats(module):
            return F.instance_norm(x, use_input_stats=True, eps=module.eps)
        mean, var = module.running_mean.float(), module.running_var.float()
        return F.instance_norm(x, mean, var, use_input_stats=False, eps=module.eps)

    def _stats(self, module: nn.Module) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], int]:
        return (None, None, self.p.n) if self._input_stats(module) else self._running(module)
