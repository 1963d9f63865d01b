"""Layers whose class replaces the forward of the kind watch() has a sketch for.

A sketch describes its kind's function: nn.Embedding's rows are those of ``F.embedding(ids, W)``,
nn.Linear's those of ``F.linear(x, W, b)``, and BatchNorm's, LayerNorm's and GroupNorm's those of
``F.batch_norm``, ``F.layer_norm`` and ``F.group_norm`` with the layer's weight and bias. A subclass from
outside torch may compute something else with the same weight: Gemma's scaled word embedding multiplies
the lookup by sqrt(d); BART's and OPT's learned positions look up shifted ids computed from what the
layer was given; timm's BatchNormAct2d and GroupNormAct apply an activation after the normalization.
Sketched from the layer's input and output, such a layer's rows would be wrong, and nothing would say so.

So, inside the forward of such a layer, watch() looks at the calls themselves (a
``TorchFunctionMode``, :class:`InnerCalls`): each call of the kind's function with the layer's own
weight is recorded as a call of the layer, with that call's input and output. A forward that uses the
layer's parameters in any other differentiable way either computes its kind's function in another form
(Falcon's ``x @ W.T + b``), which watch() checks once against the kind's forward, or is refused.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from torchgrab.capture._compat import tree_leaves
from torchgrab.capture.eager import eager
from torchgrab.capture.layers import registered_kind


def replaced_forward(module: nn.Module) -> Optional[type]:
    """The registered kind whose ``forward`` the module's class replaces with its own, for classes outside
    torch (torch's own subclasses, e.g. the BatchNorm classes, are what their kind's sketch describes);
    None when the class runs its kind's forward or has no registered kind."""
    cls = type(module)
    if cls.__module__.startswith("torch."):
        return None
    kind = registered_kind(module)
    if kind is None or cls.forward is kind.forward:
        return None
    return kind


_BatchNorm = nn.modules.batchnorm._BatchNorm


def has_inner_function(module: nn.Module) -> bool:
    """Whether the calls of the module's kind's function can be picked out of its forward."""
    return isinstance(module, (nn.Linear, nn.Embedding, _BatchNorm, nn.LayerNorm, nn.GroupNorm))


def prefers_inner(module: nn.Module) -> bool:
    """Whether a layer of this kind whose class replaces its forward is recorded from its calls even where
    torch.func could differentiate it (FunctionalSketch): a LayerNorm or GroupNorm class of no sublayers
    goes to torch.func, which takes whatever its forward does; with sublayers (timm's GroupNormAct adds an
    activation) torch.func cannot, and its calls are recorded."""
    return isinstance(module, (nn.Linear, nn.Embedding, _BatchNorm))


def _arg(args: Tuple[Any, ...], kwargs: Dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def inner_input(module: nn.Module, func: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """The input of ``func(*args, **kwargs)`` when it is the call the module's kind makes, with the module's
    own parameters and settings (what its sketch describes); None otherwise."""

    def arg(i: int, name: str, default: Any = None) -> Any:
        return _arg(args, kwargs, i, name, default)

    def affine(w: int, eps: Optional[int] = None) -> bool:
        """The layer's own weight and bias at positions w and w + 1 (and its eps at ``eps``)."""
        own = arg(w, "weight") is module.weight and arg(w + 1, "bias") is module.bias
        return own and (eps is None or float(arg(eps, "eps", 1e-5)) == float(module.eps))

    if isinstance(module, nn.Linear) and func is F.linear:
        same = affine(1)
    elif isinstance(module, nn.Embedding) and func is F.embedding:
        pad = arg(2, "padding_idx")
        if pad is not None and pad < 0:
            pad += int(module.weight.shape[0])
        same = (
            arg(1, "weight") is module.weight
            and pad == module.padding_idx
            and arg(3, "max_norm") is None
            and not arg(5, "scale_grad_by_freq", False)
            and not arg(6, "sparse", False)
        )
    elif isinstance(module, _BatchNorm) and func is F.batch_norm:
        # timm's BatchNormAct2d: _BatchNorm's own call, then an activation. The sketch normalizes as the
        # layer's mode says (batch statistics in training or without running ones, else the running ones).
        batch_stats = module.training or module.running_mean is None
        same = (
            affine(3, eps=7)
            and bool(arg(5, "training", False)) == batch_stats
            and (batch_stats or arg(1, "running_mean") is module.running_mean)
            and (batch_stats or arg(2, "running_var") is module.running_var)
        )
    elif isinstance(module, nn.LayerNorm) and func is F.layer_norm:
        shape = arg(1, "normalized_shape")
        same = shape is not None and tuple(shape) == tuple(module.normalized_shape) and affine(2, eps=4)
    elif isinstance(module, nn.GroupNorm) and func is F.group_norm:
        same = arg(1, "num_groups") == module.num_groups and affine(2, eps=4)
    else:
        same = False
    return arg(0, "input") if same else None


class InnerCalls(TorchFunctionMode):
    """Active inside one forward of a layer with a replaced forward: hands each call of the layer kind's
    function with the layer's own weight to ``record(module, input, output)`` (whose non-None result
    replaces that call's output, as a forward hook's does), counts them, and notes the first other call
    that takes one of the layer's parameters and gives a result that requires grad."""

    def __init__(self, module: nn.Module, record: Callable[[nn.Module, Any, Any], Any]) -> None:
        super().__init__()
        self.module = module
        self.record = record
        self.params = [p for p in module._parameters.values() if p is not None]
        self.calls = 0
        self.other: Optional[str] = None  # the name of the first other function given a parameter

    @eager  # it calls watch()'s record function, which reads and writes the handle's state
    def __torch_function__(self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        x = inner_input(self.module, func, args, kwargs)
        if x is not None:
            self.calls += 1
            replaced = self.record(self.module, x, out)
            return out if replaced is None else replaced
        if self.other is None and isinstance(out, torch.Tensor) and out.requires_grad:
            if any(a is p for a in tree_leaves((args, kwargs)) for p in self.params):
                self.other = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        return out


def same_as_kind(module: nn.Module, kind: type, x: Any, out: Any) -> bool:
    """Whether the layer's output is its kind's forward on the same input (Falcon's ``x @ W.T + b`` is
    nn.Linear's function in another form), to float32 rounding."""
    if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    if isinstance(module, _BatchNorm):
        return False  # its forward in training mode updates the running statistics: not run twice
    with torch.no_grad():
        ref = kind.forward(module, x)
    if not isinstance(ref, torch.Tensor) or ref.shape != out.shape:
        return False
    got, ref = out.detach().float(), ref.float()
    return bool(torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max().clamp_min(1.0))))
