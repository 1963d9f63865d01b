"""Layer inputs whose examples were flattened into the leading dimension, found from the autograd graph.

OPT's decoder layers reshape their ``[B, T, E]`` hidden states to ``[B * T, E]`` before the MLP, many
hand-written heads do the same (``self.fc(h.view(-1, E))``), and Swin cuts each image into windows and
stacks all the batch's windows into one ``[B * W, N, E]`` batch for its attention. Such a layer gets
``B * m`` rows, not ``B``. Reshaping keeps the logical (row-major) order, so when the rows were made by
merging a batch-first tensor's leading dimension with others, example b is rows ``b * m ... (b + 1) * m - 1``
and the layer can be sketched as a sequence layer on ``[B, m, ...]``. A leading dimension that is a
multiple of B proves nothing by itself (a sequence-first tensor flattened ``[T, B, E] -> [T * B, E]``
interleaves the examples).

So the input's history is read back, following the dimension that holds the rows through each operation
(shapes from autograd's metadata), through operations that keep rows apart along it: elementwise ones
(a broadcast operand carries no rows), LayerNorm and softmax over other dimensions, Linear layers,
batched matrix products and attention, transposes and permutations (the rows move to another
dimension), reshapes that keep the rows' dimension whole, select, unbind, split, slice, roll and pad
along other dimensions. It must reach the reshape that made the rows from a tensor whose leading
dimension is the batch, as every layer's input is taken to be batch first, and whose own history moved
no dimension 0 by a transpose or permutation (``_moves_batch``). Anything else (an input with no
history, an operation that mixes rows) proves nothing: the caller refuses. What the reading cannot see
past (a sequence-first tensor with T equal to B, made by operations it does not follow) it cannot tell,
as for any layer's input.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from torchgrab.capture.graph import accumulates

# Each output element from the elements at the same position of its operands (broadcast aligned).
_ELEMENTWISE = {
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
    "SqrtBackward0",
    "RsqrtBackward0",
    "PowBackward0",
    "AddBackward0",
    "AddBackward1",
    "SubBackward0",
    "SubBackward1",
    "MulBackward0",
    "MulBackward1",
    "DivBackward0",
    "DivBackward1",
}
_VIEWS = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"}
_REORDERS = {"TransposeBackward0", "TransposeBackward1", "PermuteBackward0"}
_BIG = 1 << 63  # dimensions counted from the end are saved as unsigned: 2^64 - k
_MAX_STEPS = 512  # operations read back per input, at most (then nothing is shown)
_MAX_SOURCE = 64  # operations read back from the reshape's source, at most


def _dim(d: int, n: int) -> int:
    """A saved dimension (2^64 - k for -k) as a position among n."""
    return d - (1 << 64) + n if d >= _BIG else d


def _shape(node: Any, k: int) -> Optional[List[int]]:
    """The shape of output k of the node (the forward tensor it made); None where torch does not say
    (``Node._input_metadata`` came with torch 2.5): nothing is read back through it then."""
    meta = getattr(node, "_input_metadata", None)
    return list(meta[k].shape) if meta is not None and k < len(meta) else None


def _whole_slice(node: Any) -> bool:
    """A SliceBackward0 node whose slice keeps its dimension whole, in order (``x[:]``)."""
    sizes = [int(v) for v in node._saved_self_sym_sizes]
    start, end, step = node._saved_start, node._saved_end, node._saved_step
    if start is None:
        start = 0
    size = sizes[_dim(node._saved_dim, len(sizes))]
    return start == 0 and step == 1 and (end is None or end >= size)


# Operations that only rearrange, select or combine elementwise what they are given: a tensor made by
# them from parameters and constants alone holds no example (a relative-position table indexed by a
# buffer of positions and added to a mask).
_REARRANGE = (
    _VIEWS
    | _REORDERS
    | {
        "TBackward0",
        "UnsqueezeBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "ExpandBackward0",
        "RepeatBackward0",
        "IndexBackward0",
        "SliceBackward0",
        "SelectBackward0",
        "CatBackward0",
        "StackBackward0",
    }
)


def _constant(node: Any, seen: Optional[Dict[Any, bool]] = None) -> bool:
    """A path taken to hold no example: nothing (a tensor that needs no gradient), a parameter, or what
    rearranging and elementwise operations make of those alone. (An embedding's lookup is not one of
    those operations: its output holds the examples' tokens, though its only input is the table.) A tensor
    that needs no gradient may still be data (a mask, or an input the model scales): combined elementwise
    with the rows it is taken as given, as a BatchNorm's statistics are, which reading the graph cannot
    tell apart."""
    if node is None or accumulates(node):
        return True
    seen = {} if seen is None else seen
    if node not in seen:
        seen[node] = False
        name = node.name()
        if (name in _REARRANGE or name in _ELEMENTWISE) and len(seen) <= _MAX_SOURCE:
            seen[node] = all(_constant(n, seen) for n, _ in node.next_functions)
    return seen[node]


class _Reading:
    """One input's history read back for batch b: ``rows(node, k, d, inner)`` says whether output k of
    ``node`` holds the batch's examples as runs of consecutive rows along dimension d, each row ``inner``
    consecutive entries of it (more than one where a reshape split the rows' dimension: a Linear layer
    on [B * W, N, E] works on [B * W * N, E])."""

    def __init__(self, b: int) -> None:
        self.b = b
        self.steps = 0
        self.seen: Dict[Tuple[Any, int, int, int], bool] = {}

    def rows(self, node: Any, k: int, d: int, inner: int) -> bool:
        key = (node, k, d, inner)
        if key in self.seen:
            return self.seen[key]
        self.steps += 1
        ok = self.steps <= _MAX_STEPS and self._rows(node, k, d, inner)
        self.seen[key] = ok
        return ok

    def _along(self, child: Any, ci: int, d: int, inner: int) -> bool:
        """The rows along dimension d of the child's output."""
        return child is not None and not accumulates(child) and self.rows(child, ci, d, inner)

    def _rows(self, node: Any, k: int, d: int, inner: int) -> bool:
        name = node.name()
        out = _shape(node, k)
        if out is None or d >= len(out):
            return False
        nxt = list(node.next_functions)
        if d == 0 and inner == 1 and out[0] == self.b and not _moves_batch(node, set()):
            # A batch-first tensor's own dimension 0, one example per row (SAM's [3, B, heads, N, C], after
            # a permutation moved the batch to dimension 1, merged with the heads: read back to here).
            return True
        if name in _VIEWS:
            return self._view(node, out, d, inner)
        if name in _ELEMENTWISE:
            carried = False
            for child, ci in nxt:
                if _constant(child):
                    continue  # nothing, or a parameter: no example in it
                shape = _shape(child, ci)
                cd = d - (len(out) - len(shape)) if shape is not None else -1
                if shape is None or cd < 0 or shape[cd] != out[d]:
                    if shape is not None and (cd < 0 or shape[cd] == 1):
                        continue  # broadcast along the rows: shared by all of them
                    return False
                if not self._along(child, ci, cd, inner):
                    return False
                carried = True
            return carried
        if name == "NativeLayerNormBackward0":
            return d < len(out) - len(node._saved_normalized_shape) and self._along(*nxt[0], d, inner)
        if name in ("SoftmaxBackward0", "LogSoftmaxBackward0", "SafeSoftmaxBackward0"):
            return _dim(node._saved_dim, len(out)) != d and self._along(*nxt[0], d, inner)
        if name == "AddmmBackward0":  # bias + x @ W.T
            return d == 0 and _constant(nxt[0][0]) and _constant(nxt[2][0]) and self._along(*nxt[1], 0, inner)
        if name == "MmBackward0":  # x @ W.T
            return d == 0 and _constant(nxt[1][0]) and self._along(*nxt[0], 0, inner)
        if name == "BmmBackward0":  # batched over dimension 0; with a constant right factor, rows of the left
            carry = [c for c in nxt if not _constant(c[0])]
            if d == 1:
                return len(carry) == 1 and carry[0] is nxt[0] and self._along(*nxt[0], 1, inner)
            return d == 0 and bool(carry) and all(self._along(c, ci, 0, inner) for c, ci in carry)
        if name.startswith("ScaledDotProduct"):  # q, k, v batched over all but their last two dimensions
            carry = [c for c in nxt[:3] if not _constant(c[0])]
            return d < len(out) - 2 and bool(carry) and all(self._along(c, ci, d, inner) for c, ci in carry)
        if name == "PermuteBackward0":
            return self._along(*nxt[0], _dim(node._saved_dims[d], len(out)), inner)
        if name in ("TransposeBackward0", "TransposeBackward1"):
            a, b = _dim(node._saved_dim0, len(out)), _dim(node._saved_dim1, len(out))
            return self._along(*nxt[0], b if d == a else a if d == b else d, inner)
        if name == "UnsqueezeBackward0":
            u = _dim(node._saved_dim, len(out))
            return d != u and self._along(*nxt[0], d - (d > u), inner)
        if name in ("SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2"):
            sizes = [int(v) for v in node._saved_self_sym_sizes]
            saved = getattr(node, "_saved_dim", None)
            gone = range(len(sizes)) if saved is None else saved if isinstance(saved, tuple) else (saved,)
            gone = {_dim(g, len(sizes)) for g in gone if sizes[_dim(g, len(sizes))] == 1}
            kept = [i for i in range(len(sizes)) if i not in gone]
            return len(kept) == len(out) and self._along(*nxt[0], kept[d], inner)
        if name in ("UnbindBackward0", "SelectBackward0"):
            u = _dim(node._saved_dim, len(out) + 1)
            return self._along(*nxt[0], d + (d >= u), inner)
        if name == "SliceBackward0" and _whole_slice(node):
            return self._along(*nxt[0], d, inner)  # older torch records x[:, :8] as x[:] then [:, :8]: no cut
        if name in ("SplitBackward0", "SplitWithSizesBackward0", "SliceBackward0", "CatBackward0"):
            if _dim(node._saved_dim, len(out)) == d:
                return False  # cut or joined along the rows
            carry = [c for c in nxt if not _constant(c[0])]
            return bool(carry) and all(self._along(c, ci, d, inner) for c, ci in carry)
        if name == "RollBackward0":
            return all(_dim(r, len(out)) != d for r in node._saved_dims) and self._along(*nxt[0], d, inner)
        if name == "ConstantPadNdBackward0":
            padded = {len(out) - 1 - i // 2 for i, p in enumerate(node._saved_pad) if p}
            return d not in padded and self._along(*nxt[0], d, inner)
        if name == "ExpandBackward0":
            shape = _shape(*nxt[0]) if nxt[0][0] is not None else None
            cd = d - (len(out) - len(shape)) if shape is not None else -1
            return shape is not None and cd >= 0 and shape[cd] == out[d] and self._along(*nxt[0], cd, inner)
        return False

    def _view(self, node: Any, out: List[int], d: int, inner: int) -> bool:
        """A reshape (row-major: the same elements in the same order). The rows' dimension d of the output
        is one input dimension, part of one (the rows get longer: the rest of it is in each), or several
        merged: led by the batch's own dimension 0, the rows were made from the batch there, example
        after example."""
        sizes = [int(s) for s in node._saved_self_sym_sizes]
        before = math.prod(out[:d])
        i0 = next((i for i in range(len(sizes)) if math.prod(sizes[:i]) == before and sizes[i] != 1), None)
        if i0 is None:
            return False
        child, ci = node.next_functions[0]
        if sizes[i0] >= out[d]:  # dimension i0 is output dimensions d ... j
            j = next((j for j in range(d, len(out)) if math.prod(out[d : j + 1]) == sizes[i0]), None)
            return j is not None and self._along(child, ci, i0, inner * math.prod(out[d + 1 : j + 1]))
        # Merged: dimension i0 and what follows it (whole dimensions, or the leading part of one, as a
        # [B, 8, E] -> [2B, 4, E] reshape cuts 8 tokens into 2 windows). Row-major, each entry of dimension
        # i0 is q consecutive entries of dimension d, whatever the cut.
        if out[d] % sizes[i0]:
            return False
        q = out[d] // sizes[i0]  # entries of the merged dimension per entry of dimension i0
        if inner % q == 0:
            return self._along(child, ci, i0, inner // q)  # each row whole entries of dimension i0
        if q % inner:
            return False  # rows that straddle entries of dimension i0
        if i0 == 0 and sizes[0] == self.b:
            return not _moves_batch(child, set())  # made from the batch's own dimension
        # Each row inside one entry of dimension i0 (SAM's [3, B, heads, N, C] -> [3, B * heads, N, C]):
        # the rows are the examples' where those entries are, each entry whole.
        return self._along(child, ci, i0, 1)


def _moves_batch(node: Any, seen: set) -> bool:
    """Whether the history of the tensor ``node`` made, read back through reshapes, elementwise
    operations and Linear layers, has a transpose or permutation that moved dimension 0 (or one whose
    dimensions are counted from the end, which may have). A sequence-first tensor [T, B, E] made
    batch-first-looking by one, with T equal to B, would otherwise pass for the batch; where the history
    leaves those operations, or after _MAX_SOURCE of them, nothing more is known."""
    if node is None or node in seen or len(seen) >= _MAX_SOURCE:
        return False
    seen.add(node)
    name = node.name()
    if name in _REORDERS:
        if name == "PermuteBackward0":
            moved = node._saved_dims[0] != 0
        else:
            moved = any(d == 0 or d >= _BIG for d in (node._saved_dim0, node._saved_dim1))
        return moved or _moves_batch(node.next_functions[0][0], seen)
    if name in _VIEWS or name in _ELEMENTWISE or name in ("AddmmBackward0", "MmBackward0", "NativeLayerNormBackward0"):
        return any(_moves_batch(n, seen) for n, _ in node.next_functions if n is not None and not accumulates(n))
    return False


def flattened_batch(x: torch.Tensor, b: int) -> Optional[int]:
    """m when the rows of ``x`` (leading dimension b * m, m > 1) are example after example, m each, by
    the history of ``x``; None when that cannot be shown."""
    if x.dim() < 2 or x.shape[0] <= b or x.shape[0] % b or x.grad_fn is None:
        return None
    rows = int(x.shape[0])
    if b == 1:
        return rows  # a batch of one (an epoch's last): every row is that example's, whatever made them
    return rows // b if _Reading(b).rows(x.grad_fn, x.output_nr, 0, 1) else None
