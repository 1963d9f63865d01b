"""Parameters that belong to no layer: a ViT's class token and position embeddings, BEiT's and
ConvNeXt's layer scales, each a parameter of a module with sublayers, used in its forward by plain tensor
operations. No layer hook sees them.

Such a parameter is almost always broadcast over the batch: ``cls_token.expand(B, -1, -1)``,
``embeddings + position_embeddings``, ``layer_scale * x``. Each example's gradient of it is then the
gradient of its own slice of the broadcast: inside the forward of the module that holds it, watch()
looks at the operations that take it (:class:`BroadcastUses`, a ``TorchFunctionMode``), runs ``+`` and
``*`` with the parameter expanded over the batch (a view: same values, same result) and takes the
gradient of that view, or of ``expand``'s (or a size-one ``repeat``'s) output, per example. A reshape or
view that keeps the parameter's elements in order (``gamma.reshape(1, -1, 1, 1)``) is followed as the
parameter. The module's sublayers run without the mode (watch.py), unless given one of the parameters.
Any other operation that takes the parameter is refused, naming both. At a parameter's first backward,
watch() also checks that the example parts it saw add up to the gradient autograd gives the parameter
(nothing used it unseen).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from torchgrab.capture.eager import eager
from torchgrab.capture.layers import COUNT_SKETCH_RATIO, LayerSketch, _f32
from torchgrab.capture.projection import Factor

# Broadcasts over the batch: expand (a view), and repeat (a copy) where it repeats only dimensions of size
# one, which is expand's result in new memory (SigLIP's probe.repeat(B, 1, 1)).
_EXPAND = {torch.Tensor.expand, torch.Tensor.expand_as, torch.Tensor.repeat}
# Views that keep every element in its order (ConvNeXt's gamma.reshape(1, -1, 1, 1), gamma[:, None, None]):
# their result is followed as the parameter itself, in its own shape.
_VIEWS = {
    torch.Tensor.reshape, torch.reshape, torch.Tensor.view, torch.Tensor.view_as, torch.Tensor.unsqueeze,
    torch.unsqueeze, torch.Tensor.__getitem__,
}  # fmt: skip
_BINARY = {
    torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__,
    torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__imul__,
}  # fmt: skip


class ParamSlot(nn.Module):
    """Stands for one such parameter in watch()'s table of layers; never called, never registered in the
    model. Its ``weight`` is the model's own parameter object."""

    def __init__(self, param: nn.Parameter) -> None:
        super().__init__()
        self.weight = param


class DirectParamSketch(LayerSketch):
    """Each example's gradient of one parameter, exact up to k * k coordinates, projected beyond (a
    count sketch when it is at least four times wider: a ViT's position embeddings)."""

    params = ("weight",)

    def __init__(self, name: str, module: ParamSlot, k: Optional[int], seed: int) -> None:
        super().__init__(name, module, None, seed)
        self.slot = module
        cols = None if k is None else int(k) ** 2
        n = module.weight.numel()
        self.shape = tuple(module.weight.shape)
        self.p = Factor(n, cols, seed, name, "param", count=cols is not None and n >= COUNT_SKETCH_RATIO * cols)
        self.width = self.p.k

    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        return [self.p(_f32(g).reshape(g.shape[0], -1))]

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        g = grads["weight"]
        return [self.p(_f32(g).reshape(g.shape[0], -1))]


def per_example(g: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """The gradient of a batch-expanded view [B, ...] summed over the dimensions the expansion broadcast
    (where the parameter, right-aligned, has size 1), as [B, *shape]."""
    lead = g.dim() - len(shape)  # dims in front of the parameter's own (0: the parameter's dim 0 is 1)
    dims = [d for d in range(1, g.dim()) if d < lead or (shape[d - lead] == 1 and g.shape[d] != 1)]
    if dims:
        g = g.sum(dims, keepdim=True)
    return g.reshape(g.shape[0], *shape)


class BroadcastUses(TorchFunctionMode):
    """Active inside one forward of a module that holds watched parameters (``params``: id -> (its
    sketch, the parameter)). ``batch(b)`` gives the step's batch size (``b`` when the step has none yet);
    ``record(sketch, t, shape)`` hooks ``t``, a [B, ...] tensor broadcast from a tensor of ``shape`` (the
    parameter, or a view of it in another shape), whose gradient, summed by ``per_example``, is each
    example's part; ``refuse(sketch, what)`` raises."""

    def __init__(
        self,
        params: Dict[int, Tuple[DirectParamSketch, nn.Parameter]],
        batch: Callable[[Optional[int]], int],
        record: Callable[[DirectParamSketch, torch.Tensor, Tuple[int, ...]], None],
        refuse: Callable[[DirectParamSketch, str], Any],
    ) -> None:
        super().__init__()
        # A copy: this forward's views of the parameters join it (each held there, so its id stays its own).
        self.params = dict(params)
        self.batch = batch
        self.record = record
        self.refuse = refuse

    def takes(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
        """Whether a call's arguments hold one of the parameters (or a view of one) directly."""
        return bool(self._watched(args, kwargs))

    def _watched(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[int]:
        hits = [i for i, a in enumerate(args) if id(a) in self.params]
        for a in args:
            if isinstance(a, (list, tuple)) and any(id(t) in self.params for t in a):
                hits.append(-1)
        if any(id(v) in self.params for v in kwargs.values()):
            hits.append(-1)
        return hits

    @eager  # traced by torch.compile, dynamo failed building its guards
    def __torch_function__(self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        hits = self._watched(args, kwargs)
        if not hits:
            return func(*args, **kwargs)
        sk, p = self.params[id(args[hits[0]])] if hits[0] >= 0 else next(iter(self.params.values()))
        out = None
        if hits == [0] and func in _VIEWS:
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and _same_elements(p, out):
                self.params[id(out)] = (sk, out)
                return out
        elif hits == [0] and func in _EXPAND:
            out = func(*args, **kwargs)
            if _broadcast(p, out) and out.shape[0] == self.batch(out.shape[0]):
                if out.requires_grad:
                    self.record(sk, out, tuple(p.shape))
                return out
        elif len(hits) == 1 and hits[0] in (0, 1) and func in _BINARY and len(args) >= 2:
            other = args[1 - hits[0]]
            if isinstance(other, torch.Tensor) and other.dim() >= p.dim() and other.dim() >= 1:
                view = (1,) * (other.dim() - p.dim()) + tuple(p.shape)
                b = self.batch(other.shape[0])
                if view[0] == 1 and other.shape[0] == b:
                    expanded = p.view(view).expand(b, *view[1:])
                    if expanded.requires_grad:
                        self.record(sk, expanded, tuple(p.shape))
                    swapped = list(args)
                    swapped[hits[0]] = expanded
                    return func(*swapped, **kwargs)
        if out is None:
            out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.requires_grad:  # a use that carries gradient, unseen
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            self.refuse(sk, name)
        return out


def _broadcast(p: torch.Tensor, out: torch.Tensor) -> bool:
    """``out`` is ``p`` broadcast over a new or size-one dimension 0 (the batch), and perhaps over other
    dimensions of size one: right-aligned, every dimension of ``p`` is ``out``'s or is one. A class token of
    [1, 1, E] expanded to [B, 1, E], and CLIP's of [E] expanded to [B, 1, E]."""
    lead = out.dim() - p.dim()
    if p.dim() < 1 or lead < 0 or (lead == 0 and p.shape[0] != 1):
        return False
    return all(n == 1 or n == out.shape[lead + i] for i, n in enumerate(p.shape))


def _same_elements(p: torch.Tensor, view: torch.Tensor) -> bool:
    """``view`` holds every element of ``p`` in the same order (a reshape of a contiguous tensor)."""
    return (
        view.numel() == p.numel()
        and view.dtype == p.dtype
        and p.is_contiguous()
        and view.is_contiguous()
        and view.data_ptr() == p.data_ptr()
    )
