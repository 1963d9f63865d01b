"""Layers whose weight is computed from other parameters: ``weight_norm`` (Wav2Vec2's, HuBERT's and
WavLM's positional convolution, HiFi-GAN's and WaveNet's convolutions), ``spectral_norm``, ``orthogonal``,
or a parametrization of one's own (``torch.nn.utils.parametrize``), and the older hook-based
``torch.nn.utils.weight_norm`` (``weight_g``, ``weight_v``).

The layer's hooks see its input and its output gradient, which give each example's gradient of the
weight the layer *used*, ``grad W_b``. The parameters that train are the originals theta, and
``W = f(theta)``, so each example's gradient of them is the vector-Jacobian product ``J_f^T grad W_b``,
linear in ``grad W_b`` but with no Kronecker form in general. So here ``grad W_b`` is formed exactly
(one convolution-backward or batched product for the whole batch, with the batch folded into the groups,
so no im2col of a wide kernel), pulled back through ``f`` by torch.func (vmapped over the examples), and
each original projected as a parameter of that shape is: a weight-shaped one (weight_norm's direction,
spectral_norm's matrix) by the layer's own Kronecker sketch, any other (weight_norm's magnitudes) by a
seeded projection that is exact up to k. The cost is about one more weight-gradient product of that
layer and B times its weight in memory, in chunks of examples (CHUNK_NUMBERS); the parametrization is
evaluated once more per step, in eval mode, so spectral_norm's power iteration does not advance twice.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchgrab.capture._compat import without_saved_tensor_hooks
from torchgrab.capture.layers import ConvSketch, LayerSketch, _f32, _trainable, sketch_class
from torchgrab.capture.projection import Factor

# The per-example weight gradients of one chunk of examples, in numbers (float32: 128 MiB). A larger
# batch is taken in chunks, so a wide layer (Wav2Vec2-base's positional convolution: 4.7 M weights)
# costs that much memory at most, whatever the batch.
CHUNK_NUMBERS = 1 << 25

# The layer kinds whose per-example weight gradient is formed here.
_KINDS: Tuple[type, ...] = (nn.Linear, nn.modules.conv._ConvNd)


def _legacy_weight_norm(module: nn.Module) -> Optional[Any]:
    """The hook of ``torch.nn.utils.weight_norm`` (deprecated, still in fairseq and older models) that
    computes ``module.weight`` from ``weight_g`` and ``weight_v`` before each forward, or None."""
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == "weight":
            return hook
    return None


def is_parametrized(module: nn.Module) -> bool:
    """Whether the layer computes its weight from other parameters (either API)."""
    return parametrize.is_parametrized(module) or _legacy_weight_norm(module) is not None


def layer_parameters(module: nn.Module) -> Dict[str, torch.Tensor]:
    """A layer's own parameters by their names within it, a parametrization's originals included
    (``parametrizations.weight.original0``: where ``named_parameters`` puts them)."""
    own = {n: t for n, t in module._parameters.items() if t is not None}
    if parametrize.is_parametrized(module):
        for pname, plist in module.parametrizations.items():
            own.update({f"parametrizations.{pname}.{n}": t for n, t in plist._parameters.items() if t is not None})
    return own


@contextlib.contextmanager
def _still(module: nn.Module) -> Iterator[None]:
    """The weight's parametrizations in eval mode for a while: evaluating them changes nothing then
    (spectral_norm's power iteration runs in training mode only, on its own buffers)."""
    plist = module.parametrizations["weight"] if parametrize.is_parametrized(module, "weight") else None
    modes = [(m, m.training) for m in plist.modules()] if plist is not None else []
    try:
        for m, _ in modes:
            m.training = False
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def supported(module: nn.Module) -> bool:
    """A Linear or (transposed) convolution layer whose weight alone is computed, from originals of
    which at least one trains."""
    if not isinstance(module, _KINDS):
        return False
    if parametrize.is_parametrized(module):
        if set(module.parametrizations.keys()) != {"weight"} or _legacy_weight_norm(module) is not None:
            return False  # (a parametrized bias, or both APIs at once)
    elif _legacy_weight_norm(module) is None:
        return False
    return any(t.requires_grad for n, t in layer_parameters(module).items() if n != "bias")


class ParametrizedSketch(LayerSketch):
    """The rows of a layer whose weight a parametrization computes (module docstring): each trainable
    original's block, in the parametrization's order, then the bias's as the layer's own sketch has it."""

    @staticmethod
    def fit(module: nn.Module, k: Optional[int], budget: float) -> Any:
        # The cost here is the exact weight gradient's, whatever the sketch size: k as it is.
        return k

    def __init__(self, name: str, module: nn.Module, k: Any, seed: int) -> None:
        super().__init__(name, module, k, seed)
        cls = sketch_class(module)  # the layer kind's own sketch (LinearSketch, ConvSketch, ConvTransposeSketch)
        assert cls is not None  # (supported() took Linear and convolution layers only)
        # (parametrize makes the layer's class a subclass, "ParametrizedLinear": the kind is its base's.)
        self.layer_class = (type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)).__name__
        legacy = _legacy_weight_norm(module)
        with _still(module), torch.no_grad():
            # The bias's block (the weight is no parameter of the layer: the sketch covers its bias alone)
            # and the projection of weight-shaped originals: the layer's own sketch, its weight trained.
            self._bias = cls(name, module, k, seed)
            self._weights = cls(name, module, k, seed)
            self._weights.train_w, self._weights.train_b = True, False
            shape = tuple(module.weight.shape)
        self.weight_shape = shape
        if legacy is not None:
            self.parametrizations = ["weight_norm"]
            self._wn_dim: Optional[int] = legacy.dim
            self._locals = ["weight_g", "weight_v"]
            self.names = [n for n in self._locals if _trainable(module, n)]
            self._holder: nn.Module = module
        else:
            plist = module.parametrizations["weight"]
            self.parametrizations = [_NAMES.get(type(p).__name__, type(p).__name__) for p in plist]
            originals = [n for n, t in plist._parameters.items() if t is not None]
            # weight_norm's pull-back is written out (_weight_norm_pullback); any other goes through torch.func.
            self._wn_dim = plist[0].dim if len(plist) == 1 and type(plist[0]).__name__ == "_WeightNorm" else None

            def weight(*values: torch.Tensor) -> torch.Tensor:
                return torch.func.functional_call(plist, dict(zip(originals, values)), ())

            self._fn = weight
            self._locals = originals
            self.names = [f"parametrizations.weight.{n}" for n in originals if plist._parameters[n].requires_grad]
            self._holder = plist
        self._prefix = "" if legacy is not None else "parametrizations.weight."
        self.train_w = bool(self.names)
        # Each trainable original's projection: None for a weight-shaped one (the layer's own Kronecker
        # sketch of a weight gradient), a seeded factor for any other (weight_norm's magnitudes), exact up to k.
        k1 = k[0] if isinstance(k, tuple) else k
        self._blocks: Dict[str, Optional[Factor]] = {}
        width = 0
        for local in self._locals:
            n, t = self._prefix + local, self._holder._parameters[local]
            if n not in self.names:
                continue
            if tuple(t.shape) == shape:
                self._blocks[n] = None
                width += self._project(n, torch.zeros(1, *shape)).shape[1]
            else:
                self._blocks[n] = Factor(t.numel(), k1, seed, name, n)
                width += self._blocks[n].k  # type: ignore[union-attr]
        self.width = width + self._bias.width

    def covered(self, module: nn.Module) -> List[str]:
        return list(self.names) + (["bias"] if self.train_b else [])

    def kind(self) -> str:
        return f"{self.layer_class} (weight from {', '.join(self.parametrizations)}: per example through it)"

    def save(self, module: nn.Module, x: torch.Tensor) -> Any:
        return x.detach()

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        g = g.detach()
        b = g.shape[0] if self._batched_call(g) else 1
        pieces: Dict[str, List[torch.Tensor]] = {n: [] for n in self.names}
        if self.names:
            per = max(1, CHUNK_NUMBERS // max(1, math.prod(self.weight_shape)))
            pull = self._pullback(module)
            for lo in range(0, b, per):
                grads = pull(self._weight_grads(module, saved, g, lo, min(b, lo + per)))
                for local, t in zip(self._locals, grads):
                    n = self._prefix + local
                    if n in pieces:
                        pieces[n].append(self._project(n, _f32(t)))
        out = [torch.cat(pieces[n]) for n in self._blocks]
        if self._bias.width:
            out += self._bias.rows(module, None, g)
        return out

    def _pullback(self, module: nn.Module) -> Callable[[torch.Tensor], Tuple[torch.Tensor, ...]]:
        """[B, *weight shape] weight gradients -> each original's [B, *its shape] gradients, at the
        originals' values now (the step's: the optimizer has not stepped since its forward)."""
        prims = [self._holder._parameters[n].detach() for n in self._locals]
        if self._wn_dim is not None:
            g, v = prims
            return lambda gw: _weight_norm_pullback(self._wn_dim, g, v, gw)
        with _still(module), without_saved_tensor_hooks(self.name):
            _, pull = torch.func.vjp(self._fn, *prims)

        def pulled(gw: torch.Tensor) -> Tuple[torch.Tensor, ...]:
            with _still(module), without_saved_tensor_hooks(self.name):
                return torch.func.vmap(pull)(gw.to(prims[0].dtype))

        return pulled

    def _batched_call(self, g: torch.Tensor) -> bool:
        if isinstance(module_kind := self._weights, ConvSketch):
            return g.dim() == len(module_kind.kernel) + 2
        return g.dim() >= 2

    def _weight_grads(self, module: nn.Module, x: torch.Tensor, g: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """[hi - lo, *weight shape] float32: examples lo..hi's gradients of the weight the layer used."""
        if not self._batched_call(g):  # an unbatched call: one example
            x, g = x.unsqueeze(0), g.unsqueeze(0)
        x, g = _f32(x[lo:hi]), _f32(g[lo:hi])
        n = hi - lo
        if isinstance(module, nn.Linear):
            if g.dim() == 2:
                return g.unsqueeze(2) * x.unsqueeze(1)
            return torch.bmm(g.reshape(n, -1, g.shape[-1]).transpose(1, 2), x.reshape(n, -1, x.shape[-1]))
        return _conv_weight_grads(module, x, g, self.weight_shape)

    def _project(self, name: str, t: torch.Tensor) -> torch.Tensor:
        f = self._blocks[name]
        if f is None:
            return self._weights.project(None, {"weight": t})[0]  # type: ignore[arg-type]
        return f(t.reshape(t.shape[0], -1))

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        out = [self._project(n, _f32(grads[n])) for n in self._blocks]
        if self.train_b:
            out += self._bias.project(module, {"bias": grads["bias"]})
        return out


_NAMES = {"_WeightNorm": "weight_norm", "_SpectralNorm": "spectral_norm", "_Orthogonal": "orthogonal"}


def _weight_norm_pullback(
    dim: Optional[int], g: torch.Tensor, v: torch.Tensor, gw: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """weight_norm's vector-Jacobian product for a batch of weight gradients ``gw`` [B, *W], W = g v / ||v||
    (the norm over every dimension of v but ``dim``, over all of them for None or -1, as torch._weight_norm
    takes it): with u = v / ||v|| and s = g / ||v||, each example's grad g = <gw_b, u> per slice along
    ``dim`` and grad v = s gw_b - s (grad g) u. Written out in three passes over ``gw`` (which it overwrites
    with grad v): vmap over torch._weight_norm's backward has no batching rule and loops over the examples,
    and its decomposed form costs about four times this."""
    g, v = g.float(), v.float()
    whole = dim is None or dim == -1
    others = list(range(v.dim())) if whole else [i for i in range(v.dim()) if i != dim % v.dim()]
    norm = torch.linalg.vector_norm(v, dim=others, keepdim=True)
    u, s = v / norm, g.reshape(norm.shape) / norm
    dg = (gw * u).sum([1 + i for i in others], keepdim=True)  # [B, *norm's shape]
    gw.mul_(s).addcmul_(dg * s, u, value=-1.0)
    return dg.reshape(gw.shape[0], *g.shape), gw


def _conv_weight_grads(
    module: nn.modules.conv._ConvNd, x: torch.Tensor, g: torch.Tensor, shape: Tuple[int, ...]
) -> torch.Tensor:
    """Each example's gradient of a (transposed) convolution's weight, [B, *shape]: the layer's own
    weight-gradient kernel run once with the batch folded into the groups (examples as groups of
    channels), so no patch matrix is formed, whatever the kernel's width."""
    n = x.shape[0]
    padding: Any = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        # ('same' or 'valid', or a padding mode other than zeros: pad as the layer does, then none.)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = torch.nn.functional.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = [0] * (x.dim() - 2)
    groups = module.groups * n
    x = x.reshape(1, n * x.shape[1], *x.shape[2:])
    g = g.reshape(1, n * g.shape[1], *g.shape[2:])
    weight = x.new_empty(1).expand(n * shape[0], *shape[1:])
    transposed = bool(module.transposed)
    output_padding = list(module.output_padding) if transposed else [0] * (x.dim() - 2)
    _, gw, _ = torch.ops.aten.convolution_backward(
        g,
        x,
        weight,
        None,
        list(module.stride),
        list(padding),
        list(module.dilation),
        transposed,
        output_padding,
        groups,
        [False, True, False],
    )
    return gw.reshape(n, *shape)
