"""Layers called on a tensor that the whole batch shares: T5's and MPNet's relative position bias (an
Embedding looked up with ``[query, key]`` bucket ids), WavLM's (``[frames, frames]``). No example owns the
call, so its output gradient holds no example's part until the output meets the batch.

Such a call's output is followed as a parameter of no layer is (capture/direct.py): from the call to the end
of the model's forward, one ``BroadcastUses`` mode watches the operations that take it, a function of it
alone is followed as made from it (``permute``, ``unsqueeze``, a slice), and where it is broadcast over the
batch's rows (``scores + bias``, ``bias.expand(B, ...)``, ``torch.where(mask, bias, -inf)``, an
attention's mask) the broadcast view is hooked. Each example's gradient of the output is the gradient of its
own slice there, pulled back through the function that made the broadcast tensor from the output
(``torch.func.vjp``). That per-example output gradient goes to the layer's own sketch with the shared input
expanded over the batch (a view), as if each example had made the call: the layer's rows, as for any call.

One output used by every layer of a stack (T5 computes its bias in the first layer and hands it to the
others) gives a part at each use, and the rows add up. At the layer's first backward, the parts seen must
add up to the gradient autograd gives the output (nothing used it where the mode did not look).

A shared input is told from a batch-first one by its leading dimension alone, which is not the batch's
size. An Embedding's ids seen shared once stay shared (its later calls with ids of as many dimensions are
taken so, whatever their shape), but a first call whose leading dimension equals the batch's size by
chance (T5's bias over 8 x 8 positions in a batch of 8, at the first step) is read as batch first.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

from torchgrab.capture.layers import EmbeddingSketch, LayerSketch

# An Embedding's per-example table gradient is formed in full (a scatter of each example's output gradient
# over the shared ids) when it has no more numbers than that gradient: T5's 32 buckets x heads against
# [query, key, heads].
_TABLE_MAX_RATIO = 1


class SharedCall:
    """One call of a watched layer on an input shared by the batch (``x``, without a batch dimension), its
    output ``out``. ``grad(part)`` turns each example's gradient of ``out`` ([B, *out.shape]) into what the
    layer's sketch takes, the input saved and the output gradient."""

    def __init__(self, sk: LayerSketch, module: nn.Module, x: torch.Tensor, out: torch.Tensor, b: int) -> None:
        self.sk = sk
        self.module = module
        self.name = sk.name
        self.x = x.detach()
        self.out = out.detach()  # the point the per-example gradient is pulled back from
        self.b = b
        # Each example's gradient of the output, summed over the output's uses until its own gradient
        # arrives (after every use's), then taken whole: one rows computation and one relay per step.
        self.acc: Optional[torch.Tensor] = None
        self.rough = False  # a part went through half precision (autocast)
        self.deferred = False  # parts summed until the output's gradient arrives (an output with a node)
        # Where the input is followed itself: the layer's forward as a function of its input, and what the
        # input is made from (each a SharedCall and the function that makes the input from its output).
        self.relay: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.sources: List[Tuple["SharedCall", Optional[Callable[[torch.Tensor], torch.Tensor]]]] = []
        self.table = (
            isinstance(sk, EmbeddingSketch)
            and type(sk) is EmbeddingSketch
            and module.weight.numel() <= _TABLE_MAX_RATIO * out.numel()  # type: ignore[operator]
        )
        self._saved: Any = None

    def saved(self) -> Any:
        """The layer's input as its sketch saves it, for every example: the shared input, once, expanded
        over the batch (a view). An Embedding with a small table: every id of the table, once each."""
        if self._saved is None:
            if self.table:
                v = self.module.weight.shape[0]  # type: ignore[index]
                self._saved = torch.arange(v, device=self.x.device).expand(self.b, v)
            else:
                with torch.no_grad():
                    one = self.sk.save(self.module, self.x.unsqueeze(0))
                if isinstance(one, torch.Tensor) and one.dim() > 0 and one.shape[0] == 1:
                    one = one.expand(self.b, *one.shape[1:])
                    # (the CPU kernels that read a 2-D input in place take it laid out: B x in numbers)
                    self._saved = one.contiguous() if one.dim() == 2 else one
                else:
                    self._saved = self.sk.save(self.module, self.x.expand(self.b, *self.x.shape))
        return self._saved

    def grad(self, part: torch.Tensor) -> Tuple[Any, torch.Tensor]:
        """(saved, g): the layer's sketch takes them as one call's input and output gradient. For a small
        table, g is each example's gradient of the table, [B, V, d], a lookup of each id once (saved)."""
        if not self.table:
            return self.saved(), part
        b, d = part.shape[0], part.shape[-1]
        v = self.module.weight.shape[0]  # type: ignore[index]
        ids = self.x.reshape(-1)
        table = torch.zeros(b, v, d, dtype=torch.float32, device=part.device)
        table.index_add_(1, ids, part.reshape(b, ids.numel(), d).float())
        return self.saved(), table

    def add(self, part: torch.Tensor, rough: bool) -> None:
        """Add one use's part ([B, *out.shape]); ``rough``: it went through half precision."""
        part = part.detach().float()
        self.acc = part.clone() if self.acc is None else self.acc.add_(part)
        self.rough = self.rough or rough

    def take(self) -> Optional[torch.Tensor]:
        acc, self.acc = self.acc, None
        return acc

    def unseen_use(self, acc: Optional[torch.Tensor], total: torch.Tensor) -> bool:
        """Whether the output's gradient is more than the parts' sum ``acc`` (a use the mode did not follow)."""
        # (to the rounding of the lowest precision on the way: autocast's bfloat16 projections round the
        # parts relayed to a LayerNorm computed in float32)
        tol = 2e-2 if self.rough or total.dtype not in (torch.float32, torch.float64) else 1e-3
        total = total.detach().double()
        seen = torch.zeros_like(total) if acc is None else acc.double().sum(0).to(total.device).reshape(total.shape)
        scale = float(total.abs().max())
        return not torch.allclose(seen, total, rtol=tol, atol=0.1 * tol * scale)


_SCALINGS = {"MulBackward0", "DivBackward0", "NativeDropoutBackward0"}
# Nodes of lookups by an index tensor, whose ids (the batch's tokens, say) do not show in the graph.
_LOOKUPS = {
    "EmbeddingBackward0", "EmbeddingBagBackward0", "IndexBackward0", "IndexSelectBackward0", "GatherBackward0",
    "TakeBackward0",
}  # fmt: skip


def made_from_parameters(x: torch.Tensor, limit: int = 64) -> bool:
    """Whether ``x`` is made by autograd-recorded operations from parameters alone (DeBERTa's relative
    embeddings, sliced, normalized and dropped out): every leaf its history reaches within ``limit`` nodes
    is an ``nn.Parameter``, and no operation on the way but an elementwise product or quotient (a dropout
    mask, a constant) took a tensor that needs no gradient (data: a Linear layer's output on the batch's
    inputs, whose node shows that input as None), nor looked rows up by ids (an Embedding's output on the
    batch's tokens, whose ids the graph does not show). A tensor with no history, or one that reaches
    anything else, is not."""
    if isinstance(x, nn.Parameter):
        return True
    node = x.grad_fn
    if node is None:
        return False
    seen, todo = {node}, [node]
    while todo:
        node = todo.pop()
        if type(node).__name__ in _LOOKUPS:
            return False  # rows picked by ids, which autograd does not show: the batch's tokens, perhaps
        if type(node).__name__ == "AccumulateGrad":
            if not isinstance(node.variable, nn.Parameter):
                return False
            continue
        for nxt, _ in node.next_functions:
            if nxt is None:
                if type(node).__name__ in _SCALINGS:
                    continue  # a factor that needs no gradient: a dropout mask drawn once, a constant
                return False
            if nxt not in seen:
                if len(seen) >= limit:
                    return False
                seen.add(nxt)
                todo.append(nxt)
    return True
