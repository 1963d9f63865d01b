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

A parameter may first be made into the tensor that is broadcast by a function of the parameters alone:
Swin's relative-position table is gathered by an index, viewed, permuted and made contiguous into a
``[1, heads, N, N]`` bias; BEiT's q and v biases are concatenated around a buffer of zeros. Such a tensor
is followed with, for each parameter it is made from, the function that makes it from that parameter
(the call replayed, the other parameters held at their values); each example's gradient of it is pulled
back through that function (``torch.func.vjp``, vectorized over the batch). Random functions (a replay
would draw other numbers) and writes in place are not followed. The tensor may be broadcast against
``B * m`` rows, example after example (Swin's windows): then each example's part sums its m rows, where
the other operand's history proves that layout (capture/flatten.py), or, for an operand with no history
(Swin's shift mask), where the result becomes the ``attn_mask`` of an attention whose query proves it.
And the module's forward may call a watched Linear layer as ``F.linear(x, layer.weight, bias)`` (timm's
BEiT and EVA attention never call their qkv layer): that is recorded as a call of the layer, and a
followed bias is added as ``+`` adds it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from torchgrab.capture._compat import without_saved_tensor_hooks
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
    torch.Tensor.add_, torch.Tensor.mul_,  # (x += bias dispatches as add_: ConvBERT's separable convolution)
}  # fmt: skip
# Of those, the ones that write into their first operand: a followed tensor may be the second only.
_IN_PLACE_BINARY = {torch.Tensor.__iadd__, torch.Tensor.__imul__, torch.Tensor.add_, torch.Tensor.mul_}


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


def per_example(g: torch.Tensor, shape: Tuple[int, ...], m: int = 1) -> torch.Tensor:
    """The gradient of a batch-expanded view [B * m, ...] summed over each example's m rows and over the
    dimensions the expansion broadcast (where the tensor of ``shape``, right-aligned, has size 1), as
    [B, *shape]."""
    if m > 1:
        g = g.unflatten(0, (g.shape[0] // m, m)).sum(1)
    lead = g.dim() - len(shape)  # dims in front of the parameter's own (0: the parameter's dim 0 is 1)
    dims = [d for d in range(1, g.dim()) if d < lead or (shape[d - lead] == 1 and g.shape[d] != 1)]
    if dims:
        g = g.sum(dims, keepdim=True)
    return g.reshape(g.shape[0], *shape)


def pulled_back(
    make: Callable[[torch.Tensor], torch.Tensor], p: torch.Tensor, parts: torch.Tensor, name: str
) -> torch.Tensor:
    """Each example's gradient of the parameter ``p`` (called ``name``) from its gradient of ``make(p)``
    ([B, *make(p).shape]): the vector-Jacobian product of ``make`` at ``p`` (which the step does not change
    before its backward ends), one per example, vectorized over B."""
    with without_saved_tensor_hooks(name):
        out, vjp = torch.func.vjp(make, p.detach())
        return torch.func.vmap(lambda c: vjp(c)[0])(parts.to(out.dtype))


# Elementwise functions that broadcast their operands (beside + and *, which _binary takes): a followed
# tensor broadcast by one of them against the batch's rows is expanded to the result's shape first (a view:
# the same values, the same result). T5's bias becomes sdpa's mask by torch.where(mask, bias, min).
# (Not masked_fill: its result has its first operand's shape, and its value must be a single number.)
_ELEMENTWISE = {
    torch.where, torch.Tensor.where, torch.sub, torch.Tensor.sub, torch.Tensor.__sub__, torch.Tensor.__rsub__,
    torch.Tensor.__isub__, torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.__rtruediv__,
    torch.Tensor.__itruediv__,
}  # fmt: skip
_ATTENTION = {F.scaled_dot_product_attention}
# Products of a followed tensor with the batch's rows: the followed tensor expanded over the rows, one
# copy per row (a hand-written layer's weight, SAM's relative positions multiplied with the queries).
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__}
# Writes into a tensor: never followed (a followed tensor is replayed from the parameter).
_IN_PLACE = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ior__", "__iand__"}
# Functions that draw random numbers: a replay would draw others.
_RANDOM = ("dropout", "rand", "bernoulli", "normal", "multinomial", "poisson", "uniform", "exponential", "cauchy")

# A followed tensor's sources: for each parameter it is made from, that parameter's sketch and the function
# that makes the tensor from the parameter, the others held at their values (None: the tensor holds the
# parameter's elements in their order, a view of it).
_Source = Tuple[DirectParamSketch, Optional[Callable[[torch.Tensor], torch.Tensor]]]
_Followed = Tuple[torch.Tensor, List[_Source]]


def _replayable(func: Any) -> bool:
    name = getattr(func, "__name__", "") or ""
    if name in _IN_PLACE or (name.endswith("_") and not name.endswith("__")):
        return False
    return not any(r in name.lower() for r in _RANDOM)


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _arg(args: Tuple[Any, ...], kwargs: Dict[str, Any], i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


class BroadcastUses(TorchFunctionMode):
    """Active inside one forward of a module that holds watched parameters (``params``: id -> (its
    sketch, the parameter)). ``batch(b)`` gives the step's batch size (``b`` when the step has none yet);
    ``rows(x, b)`` gives m when the rows of ``x`` are b examples' runs of m rows by its history (None when
    that cannot be shown); ``record(sketch, t, shape, m, make)`` hooks ``t``, a [B * m, ...] tensor
    broadcast from a tensor of ``shape`` (the parameter, a view of it in another shape, or ``make(p)``),
    whose gradient, summed by ``per_example`` (and pulled back through ``make``), is each example's part;
    ``refuse(sketch, what)`` raises. ``layers`` maps the weight of each watched Linear layer inside the
    module to the layer, and ``call(layer, x, out)`` records a call of it (``F.linear(x, layer.weight,
    bias)``, timm's BEiT and EVA attention with a bias assembled from parameters of no layer)."""

    def __init__(
        self,
        params: Dict[int, Tuple[DirectParamSketch, nn.Parameter]],
        batch: Callable[[int], int],
        rows: Callable[[torch.Tensor, int], Optional[int]],
        record: Callable[..., None],
        refuse: Callable[[DirectParamSketch, str], Any],
        layers: Optional[Dict[int, nn.Module]] = None,
        call: Optional[Callable[[nn.Module, torch.Tensor, torch.Tensor], Any]] = None,
        held: Optional[Dict[int, torch.Tensor]] = None,
    ) -> None:
        super().__init__()
        # Parameters a function of followed tensors may take, held at their values in its replay: the
        # watched layers' own (capture/shared.py: a layer called on a followed tensor, whose own rows take
        # that call's part of their gradient). None: a function that takes any other tensor needing a
        # gradient is not followed.
        self.held = held or {}
        # This forward's followed tensors (each held here, so its id stays its own): the parameters first.
        self.params: Dict[int, _Followed] = {i: (p, [(sk, None)]) for i, (sk, p) in params.items()}
        # Results of broadcasting a followed tensor against an operand of B * m rows with no history (Swin's
        # shift mask), whose layout the attention taking them as its mask proves: id -> (the followed
        # tensor, the result, the expanded view hooked once proven).
        self.pending: Dict[int, Tuple[_Followed, torch.Tensor, torch.Tensor]] = {}
        self.batch = batch
        self.rows = rows
        self.record = record
        self.refuse = refuse
        self.layers = layers or {}
        self.call = call

    def takes(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
        """Whether a call's arguments hold one of the parameters (or a tensor made from one) directly."""
        return bool(self._watched(args, kwargs))

    def holds(self, module: nn.Module) -> bool:
        """Whether one of the module's own parameters is followed here (a sublayer that makes a tensor from
        its parameters: its forward runs under this mode)."""
        return any(id(t) in self.params for t in module._parameters.values())

    def _is(self, a: Any) -> bool:
        return id(a) in self.params or id(a) in self.pending

    def _watched(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[int]:
        hits = [i for i, a in enumerate(args) if self._is(a)]
        for a in args:
            if isinstance(a, (list, tuple)) and any(self._is(t) for t in a):
                hits.append(-1)
        if any(self._is(v) for v in kwargs.values()):
            hits.append(-1)
        return hits

    def _sketch_in(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> DirectParamSketch:
        for a in [*args, *kwargs.values()]:
            for t in a if isinstance(a, (list, tuple)) else [a]:
                if id(t) in self.params:
                    return self.params[id(t)][1][0][0]
                if id(t) in self.pending:
                    return self.pending[id(t)][0][1][0][0]
        return next(iter(self.params.values()))[1][0][0]

    def _rows_of(self, x: torch.Tensor, b: int) -> Optional[int]:
        """m when ``x``'s leading dimension holds the batch's b examples, m rows each (1: batch first)."""
        n = int(x.shape[0]) if x.dim() else 0
        return 1 if n == b else self.rows(x, b)

    def _hook(self, followed: _Followed, expanded: torch.Tensor, m: int) -> None:
        """Hook the [B * m, ...] broadcast of a followed tensor for each parameter it is made from."""
        t, sources = followed
        if expanded.requires_grad:
            for sk, make in sources:
                self.record(sk, expanded, tuple(t.shape), m, make)

    @eager  # traced by torch.compile, dynamo failed building its guards
    def __torch_function__(self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and self.layers:
            out = self._linear(args, kwargs)
            if out is not None:
                return out
        hits = self._watched(args, kwargs)
        if not hits:
            return func(*args, **kwargs)
        if func in _ATTENTION:
            out = self._attention(func, args, kwargs, hits)
        elif func in _EXPAND and hits == [0] and id(args[0]) in self.params:
            out = self._expand(func, args, kwargs)
        elif func in _BINARY and len(hits) == 1 and hits[0] in (0, 1) and len(args) >= 2:
            out = self._binary(func, args, kwargs, hits[0])
        elif func in _ELEMENTWISE:
            out = self._elementwise(func, args, kwargs)
        elif func is torch.einsum:
            out = self._einsum(args, kwargs)
        elif func in _MATMUL and len(hits) == 1 and hits[0] in (0, 1) and len(args) == 2 and not kwargs:
            out = self._matmul(func, args, hits[0])
        elif func is torch.Tensor.__setitem__ and hits == [2] and len(args) == 3 and not kwargs:
            if self._setitem(args):
                return None
            out = None
        else:
            out = None
        if out is None:
            out = self._made(func, args, kwargs)
        if out is not None:
            return out
        if getattr(func, "__name__", "") == "__setitem__" and hits[0] == 0:
            # A write into a followed tensor (bias[0] = 0): its remaking from the parameter would miss it.
            self.refuse(self._sketch_in(args, kwargs), _name(func))
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.requires_grad:  # a use that carries gradient, unseen
            self.refuse(self._sketch_in(args, kwargs), _name(func))
        return out

    def follow(self, t: torch.Tensor, sk: Any) -> None:
        """Follow ``t`` from here on as the tensor ``sk`` stands for (capture/shared.py: the output of a layer's
        call on a tensor shared by the batch), besides what it is made from already."""
        _, sources = self.params.get(id(t), (t, []))
        self.params[id(t)] = (t, [*sources, (sk, None)])

    def _made(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Any]:
        """A function of followed tensors and of nothing else that carries a gradient (Swin's table gathered
        by an index, permuted and made contiguous; BEiT's q and v biases concatenated with zeros between;
        Swin v2's clamped and exponentiated logit scale): its result is followed, made from each parameter
        by replaying the call. None where something else carries a gradient, or the call cannot be replayed."""
        leaves = _flat([*args, *kwargs.values()])
        if any(
            isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in self.params and id(t) not in self.held
            for t in leaves
        ):
            return None
        if func is F.dropout and self.held:
            return self._dropout(args, kwargs)
        if not _replayable(func):
            return None
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return None if any(isinstance(t, torch.Tensor) and t.requires_grad for t in _flat(out)) else out
        if not out.requires_grad:
            return out
        inputs = [self.params[id(t)] for t in leaves if isinstance(t, torch.Tensor) and id(t) in self.params]
        if len(inputs) == 1 and len(inputs[0][1]) == 1 and inputs[0][1][0][1] is None and func in _VIEWS:
            t, [(sk, _)] = inputs[0]
            if _same_elements(t, out):
                self.params[id(out)] = (out, [(sk, None)])
                return out
        sketches: List[DirectParamSketch] = []
        for _, sources in inputs:
            sketches += [sk for sk, _ in sources if sk not in sketches]
        self.params[id(out)] = (out, [(sk, _replay(func, args, kwargs, self.params, sk)) for sk in sketches])
        return out

    def _dropout(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Any]:
        """``F.dropout`` of a followed tensor (DeBERTa's relative embeddings, dropped once for the whole
        batch): the mask drawn here, as dropout draws it (kept with probability 1 - p, scaled by 1 / (1 - p);
        other random numbers than the kernel's), and the result followed as the product with that mask."""
        x = _arg(args, kwargs, 0, "input")
        p, training = _arg(args, kwargs, 1, "p"), _arg(args, kwargs, 2, "training")
        p = 0.5 if p is None else float(p)
        if _arg(args, kwargs, 3, "inplace") or id(x) not in self.params:
            return None
        if training is False or p == 0.0:
            return x
        with torch.no_grad():
            mask = torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p) if p < 1.0 else torch.zeros_like(x)
        return self._made(torch.mul, (x, mask), {})

    def _expand(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Any]:
        """``expand`` (or a size-one ``repeat``) of a followed tensor over the batch; or a ``repeat`` that tiles
        it whole along dimension 0 once per example (DeBERTa's heads' relative projections, ``[H, N, d]`` to
        ``[B * H, N, d]``), which is the followed tensor expanded over a new batch dimension, then flattened."""
        followed = self.params[id(args[0])]
        if func is torch.Tensor.repeat and not kwargs:
            tiled = self._tiled(followed, args)
            if tiled is not None:
                return tiled
        out = func(*args, **kwargs)
        if not (_broadcast(followed[0], out) and out.shape[0] == self.batch(out.shape[0])):
            return None  # another expand: followed as any function of the parameters
        self._hook(followed, out, 1)
        return out

    def _tiled(self, followed: _Followed, args: Tuple[Any, ...]) -> Optional[torch.Tensor]:
        p = followed[0]
        reps = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
        if p.dim() < 1 or len(reps) != p.dim() or any(r != 1 for r in reps[1:]) or p.shape[0] == 1:
            return None
        n = int(reps[0])
        if n < 2 or n != self.batch(n):
            return None
        expanded = p.unsqueeze(0).expand(n, *p.shape)
        out = expanded.reshape(n * p.shape[0], *p.shape[1:])  # (a copy, as repeat's)
        self._hook(followed, expanded, 1)
        return out

    def _binary(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], h: int) -> Optional[Any]:
        """``+`` or ``*`` of a followed tensor and the batch's rows: the followed tensor expanded over the
        rows (a view: same values, same result), hooked where the rows are shown to be examples' runs."""
        if h == 0 and func in _IN_PLACE_BINARY:
            return None  # a write into the followed tensor: refused below
        other = args[1 - h]
        if id(args[h]) in self.pending:  # added to (or multiplying) logits whose history proves the rows
            if isinstance(other, torch.Tensor) and other.requires_grad and self._prove(args[h], other):
                return func(*args, **kwargs)
            return None
        followed = self.params[id(args[h])]
        p = followed[0]
        if not isinstance(other, torch.Tensor) or other.dim() < max(p.dim(), 1):
            return None
        view = (1,) * (other.dim() - p.dim()) + tuple(p.shape)
        n = int(other.shape[0])
        b = self.batch(n)
        if view[0] != 1 or n % b:
            return None  # not over rows (with a constant: followed as any function of the parameters)
        m = self._rows_of(other, b)
        if m is None and other.requires_grad:
            return None  # rows of B * m that their history does not show to be example after example
        expanded = p.reshape(view).expand(n, *view[1:])
        swapped = list(args)
        swapped[h] = expanded
        out = func(*swapped, **kwargs)
        if m is not None:
            self._hook(followed, expanded, m)
        elif expanded.requires_grad:  # an operand with no history: what takes the result may prove its rows
            self.pending[id(out)] = (followed, out, expanded)
        return out

    def _elementwise(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Any]:
        """An elementwise function (``_ELEMENTWISE``) whose operands broadcast followed tensors over the batch's
        rows, held by another operand's leading dimension: each followed tensor expanded to the result's
        shape (a view) and hooked there. None where no operand shows the rows, or a followed tensor is
        written in place or has rows of its own."""
        leaves = [(i, a) for i, a in enumerate([*args, *kwargs.values()]) if isinstance(a, torch.Tensor)]
        mine = [(i, a) for i, a in leaves if self._is(a)]
        in_place = getattr(func, "__name__", "").startswith("__i")
        if not mine or any(id(a) in self.pending for _, a in mine) or (in_place and mine[0][0] == 0):
            return None
        try:
            shape = torch.broadcast_shapes(*(a.shape for _, a in leaves))
        except RuntimeError:
            return None
        found = None
        for _, a in leaves:
            if not self._is(a) and a.dim() == len(shape) and a.shape[0] == shape[0]:
                found = self._rows_for(a)
                if found is not None:
                    break
        if found is None or any(a.dim() == len(shape) and a.shape[0] != 1 for _, a in mine):
            return None
        expanded = {i: a.expand(shape) for i, a in mine}
        values = [expanded.get(i, a) for i, a in enumerate([*args, *kwargs.values()])]
        out = func(*values[: len(args)], **dict(zip(kwargs, values[len(args) :])))
        for i, a in mine:
            self._hook(self.params[id(a)], expanded[i], found[1])
        return out

    def _setitem(self, args: Tuple[Any, ...]) -> bool:
        """``x[mask] = followed`` with a boolean ``mask`` over the leading dimensions of ``x``, whose first holds
        the batch's rows (Wav2Vec2's and HuBERT's ``hidden_states[mask_time_indices] = masked_spec_embed``):
        written as ``x[mask] = expanded[mask]``, the followed tensor expanded over all of ``x`` (the same
        values at the same places), and hooked there, so each example's part is the gradient at its own
        masked positions. False (nothing written) for any other such write."""
        x, index, value = args
        if not isinstance(index, torch.Tensor) or index.dtype != torch.bool or id(value) not in self.params:
            return False
        rows = self._rows_for(x)
        k = index.dim()
        if rows is None or k < 1 or k > x.dim() or tuple(index.shape) != tuple(x.shape[:k]):
            return False
        followed = self.params[id(value)]
        p = followed[0]
        if p.dim() > x.dim() - k:
            return False  # (broadcast against the selected rows' own dimensions only)
        try:
            expanded = p.expand(x.shape)
        except RuntimeError:
            return False
        x[index] = expanded[index]
        self._hook(followed, expanded, rows[1])
        return True

    def _rows_for(self, x: Any) -> Optional[Tuple[int, int]]:
        """(rows, m) when ``x`` holds the batch's rows in its leading dimension, example after example."""
        if not isinstance(x, torch.Tensor) or self._is(x) or x.dim() < 2:
            return None
        n = int(x.shape[0])
        b = self.batch(n)
        m = self._rows_of(x, b) if n % b == 0 else None
        return None if m is None else (n, m)

    def _einsum(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Any]:
        """``torch.einsum`` of a followed tensor and a tensor whose first index runs over the batch's rows
        (SAM's ``einsum("bhwc,hkc->bhwk", r_q, Rh)``): the followed tensor given that index too, expanded
        over the rows (one copy each: the same values and result), and hooked there."""
        if kwargs or len(args) < 2 or not isinstance(args[0], str):
            return None
        ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        eq = args[0].replace(" ", "")
        if len(ops) != 2 or "..." in eq or "->" not in eq:
            return None
        ins, result = eq.split("->")
        subs = ins.split(",")
        mine = [i for i, t in enumerate(ops) if id(t) in self.params]
        if len(subs) != 2 or len(mine) != 1 or any(id(t) in self.pending for t in ops):
            return None
        i = mine[0]
        rows = self._rows_for(ops[1 - i])
        if rows is None or len(subs[1 - i]) != ops[1 - i].dim() or subs[1 - i][0] in subs[i]:
            return None
        followed = self.params[id(ops[i])]
        expanded = followed[0].unsqueeze(0).expand(rows[0], *followed[0].shape)
        subs[i] = subs[1 - i][0] + subs[i]
        ops[i] = expanded
        out = torch.einsum(",".join(subs) + "->" + result, *ops)
        self._hook(followed, expanded, rows[1])
        return out

    def _matmul(self, func: Any, args: Tuple[Any, ...], h: int) -> Optional[Any]:
        """``x @ w`` or ``w @ x`` of a followed matrix ``w`` and a tensor ``x`` whose leading dimension holds
        the batch's rows (a hand-written layer): ``w`` expanded over the rows, one copy each."""
        if func is torch.Tensor.__rmatmul__:  # w.__rmatmul__(x) is x @ w
            args, h = (args[1], args[0]), 1 - h
        followed = self.params[id(args[h])]
        w, x = followed[0], args[1 - h]
        rows = self._rows_for(x)
        if rows is None or w.dim() != 2 or (h == 0 and x.dim() < 3):
            return None
        n, m = rows
        expanded = w.unsqueeze(0).expand(n, *w.shape)
        if x.dim() == 2:  # [rows, d] @ [d, k]: one row per matrix
            out = (x.unsqueeze(1) @ expanded).squeeze(1)
        else:
            lead = (n, *(1,) * (x.dim() - 3))
            wide = expanded.reshape(*lead, *w.shape)
            out = x @ wide if h == 1 else wide @ x
        self._hook(followed, expanded, m)
        return out

    def _prove(self, result: torch.Tensor, rows: torch.Tensor) -> bool:
        """Hook a pending result's expanded view once ``rows``, a tensor with as many rows and a history,
        shows them to be the batch's examples' runs; False (still pending) when it does not."""
        followed, out, expanded = self.pending[id(result)]
        found = self._rows_for(rows)
        if found is None or found[0] != out.shape[0]:
            return False
        del self.pending[id(result)]
        self._hook(followed, expanded, found[1])
        return True

    def _attention(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], hits: List[int]) -> Optional[Any]:
        """``F.scaled_dot_product_attention(q, k, v, attn_mask=followed)``: the mask broadcast over the query's
        rows, which must be the batch's examples (or their runs of m rows, by the query's history)."""
        in_args = len(args) > 3 and self._is(args[3])
        mask = args[3] if in_args else kwargs.get("attn_mask")
        q = args[0] if args else kwargs.get("query")
        if hits != ([3] if in_args else [-1]) or not self._is(mask) or not isinstance(q, torch.Tensor) or q.dim() < 3:
            return None
        if id(mask) in self.pending:
            return func(*args, **kwargs) if self._prove(mask, q) else None
        found = self._rows_for(q)
        followed = self.params[id(mask)]
        p = followed[0]
        view = (1,) * (q.dim() - p.dim()) + tuple(p.shape)
        if found is None or p.dim() > q.dim() or view[0] != 1:
            return None
        expanded = p.reshape(view).expand(found[0], *view[1:])
        self._hook(followed, expanded, found[1])
        if in_args:
            args = (*args[:3], expanded, *args[4:])
        else:
            kwargs = {**kwargs, "attn_mask": expanded}
        return func(*args, **kwargs)

    def _linear(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Any]:
        """``F.linear(x, layer.weight, bias)`` with a watched Linear layer's weight, outside the layer's own
        forward: a call of the layer, recorded so (``call``), with its own bias or none; a followed bias
        (BEiT's cat of q_bias, zeros and v_bias) is then added as ``+`` adds it. None for any other call."""
        x, w, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        layer = self.layers.get(id(w))
        if layer is None or self.call is None or not isinstance(x, torch.Tensor) or self._is(x):
            return None
        if bias is not None and bias is not layer.bias and not (id(bias) in self.params and layer.bias is None):
            return None
        out = F.linear(x, w, bias if bias is layer.bias else None)
        replaced = self.call(layer, x, out)
        out = out if replaced is None else replaced
        if bias is None or bias is layer.bias:
            return out
        return self._binary(torch.Tensor.__add__, (out, bias), {}, 1)


def _flat(out: Any) -> List[Any]:
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    return [out]


def _replay(
    func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], followed: Dict[int, _Followed], sk: DirectParamSketch
) -> Callable[[torch.Tensor], Any]:
    """The call as a function of the parameter of ``sk``: each followed argument made from it is made again
    from the given tensor; every other (followed tensors made from other parameters included) is held at
    its value."""
    makes: Dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
    for a in _flat([*args, *kwargs.values()]):  # the followed arguments of this call made from sk's parameter
        t, sources = followed.get(id(a), (None, []))
        for s, make in sources:
            if s is sk and t is not None:
                shape = tuple(t.shape)
                makes[id(a)] = make if make is not None else (lambda w, shape=shape: w.reshape(shape))

    def held(a: Any, w: torch.Tensor) -> Any:
        if isinstance(a, torch.Tensor):
            make = makes.get(id(a))
            return make(w) if make is not None else a.detach()
        if isinstance(a, (list, tuple)):
            return type(a)(held(t, w) for t in a)
        return a

    return lambda w: func(*(held(a, w) for a in args), **{k: held(v, w) for k, v in kwargs.items()})


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
