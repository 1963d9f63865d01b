"""Layer inputs whose examples were flattened into the leading dimension, found from the autograd graph.

OPT's decoder layers reshape their ``[B, T, E]`` hidden states to ``[B * T, E]`` before the MLP, and
many hand-written heads do the same (``self.fc(h.view(-1, E))``). Such a layer gets ``B * T`` rows, not
``B``. Reshaping keeps the logical (row-major) order, so example b is rows ``b * T ... (b + 1) * T - 1``,
and the layer can be sketched as a sequence layer on ``[B, T, E]`` — provided the rows really came so.
A leading dimension that is a multiple of B proves nothing (Swin stacks windows; a sequence-first
tensor flattened ``[T, B, E] -> [T * B, E]`` interleaves examples).

So the input's history is read back through operations that keep each row apart (elementwise ones,
LayerNorm, Linear layers, dropout) to the reshape that made the rows, which must have taken a tensor of
leading dimension B, as every layer's input is taken to be batch first, whose own history, read back the
same way, moved no dimension 0 by a transpose or permutation (``_moves_batch``). Anything else (an input
with no history, an operation that mixes rows) proves nothing: the caller refuses. What the reading
cannot see past (a sequence-first tensor with T equal to B, made by operations it does not follow) it
cannot tell, as for any layer's input.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from torchgrab.capture.graph import accumulates

# One gradient input, each output row from the same row of it.
_ROWWISE = {
    "ReluBackward0",
    "GeluBackward0",
    "TanhBackward0",
    "SigmoidBackward0",
    "SiluBackward0",
    "EluBackward0",
    "LeakyReluBackward0",
    "HardtanhBackward0",
    "HardswishBackward0",
    "SoftplusBackward0",
    "MishBackward0",
    "NativeDropoutBackward0",
    "CloneBackward0",
    "ToCopyBackward0",
    "NegBackward0",
    "ExpBackward0",
    "PowBackward0",
    "AddBackward0",
    "AddBackward1",
    "SubBackward0",
    "SubBackward1",
    "MulBackward0",
    "MulBackward1",
    "DivBackward0",
    "DivBackward1",
    "NativeLayerNormBackward0",  # over trailing dimensions, not the rows (checked)
}
# Elementwise with two inputs: each path that carries the rows must carry them the same way.
_ELEMENTWISE2 = {"AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0"}
_VIEWS = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"}
_REORDERS = {"TransposeBackward0", "TransposeBackward1", "PermuteBackward0"}
_DEPTH = 64


def _constant(node: Any) -> bool:
    """A path with no example in it: nothing (a tensor that needs no gradient) or a parameter, seen
    through a transpose (a Linear layer's weight)."""
    while node is not None and node.name() in ("TBackward0", "ToCopyBackward0"):
        node = node.next_functions[0][0]
    return node is None or accumulates(node)


def _moves_batch(node: Any, depth: int) -> bool:
    """Whether the history of the tensor ``node`` made, read back through the operations that keep rows
    apart, has a transpose or permutation that moved dimension 0 (or one whose dimensions are counted
    from the end, which may have). A sequence-first tensor [T, B, E] made batch-first-looking by one, with
    T equal to B, would otherwise pass for the batch; where the history leaves those operations, nothing
    more is known, as for any layer's input."""
    if node is None or depth > _DEPTH:
        return False
    name = node.name()
    if name in _REORDERS:
        if name == "PermuteBackward0":
            moved = node._saved_dims[0] != 0
        else:
            dims = (node._saved_dim0, node._saved_dim1)
            moved = any(d == 0 or d >= 1 << 63 for d in dims)  # a dimension from the end: maybe 0
        return moved or _moves_batch(node.next_functions[0][0], depth + 1)
    if name in _VIEWS or name == "AddmmBackward0" or name == "MmBackward0" or name in _ROWWISE:
        follow = [n for n, _ in node.next_functions if not _constant(n)]
        return any(_moves_batch(n, depth + 1) for n in follow)
    return False


def _from_batch(node: Any, rows: int, b: int, depth: int) -> bool:
    """Whether the tensor ``node`` made, of ``rows`` leading rows, has example i in rows
    ``i * rows / b ...`` by its history."""
    if node is None or depth > _DEPTH:
        return False
    name = node.name()
    nxt = [n for n, _ in node.next_functions]
    if name in _VIEWS:
        sizes = tuple(int(s) for s in node._saved_self_sym_sizes)
        if sizes and sizes[0] == rows:
            return _from_batch(nxt[0], rows, b, depth + 1)  # the rows kept as they were
        if not sizes or sizes[0] != b or math.prod(sizes) % rows:
            return False
        return not _moves_batch(nxt[0], 0)
    if name == "AddmmBackward0":  # bias + x @ W.T
        return _constant(nxt[0]) and _constant(nxt[2]) and _from_batch(nxt[1], rows, b, depth + 1)
    if name == "MmBackward0":  # x @ W.T
        return _constant(nxt[1]) and _from_batch(nxt[0], rows, b, depth + 1)
    if name == "NativeLayerNormBackward0" and len(node._saved_normalized_shape) >= node._saved_input.dim():
        return False  # normalized over the rows too
    if name in _ROWWISE:
        carried = [n for n in nxt if not _constant(n)]
        if len(carried) > 1 and name not in _ELEMENTWISE2:
            return False  # (LayerNorm's weight and bias are parameters: _constant)
        return bool(carried) and all(_from_batch(n, rows, b, depth + 1) for n in carried)
    return False


def flattened_batch(x: torch.Tensor, b: int) -> Optional[int]:
    """m when the rows of ``x`` (leading dimension b * m, m > 1) are example after example, m each, by
    the history of ``x``; None when that cannot be shown."""
    if x.dim() < 2 or x.shape[0] <= b or x.shape[0] % b or x.grad_fn is None:
        return None
    rows = int(x.shape[0])
    return rows // b if _from_batch(x.grad_fn, rows, b, 0) else None
