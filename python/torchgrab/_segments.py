"""Turn what users pass to ``step`` into the native edge's input: a list of C-contiguous 2-D NumPy
views (B x d_k), one per parameter, sharing memory with the caller's buffers. Nothing is concatenated
and nothing is copied; anything that would need a copy is refused with a message saying so.
"""

from __future__ import annotations

import math
from typing import Any, List, Tuple

import numpy as np

from torchgrab.errors import ShapeError, UnsupportedInputError

try:  # torch is optional for NumPy-only users
    import torch
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None  # type: ignore[assignment]

_NUMPY_KINDS = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64", np.dtype(np.float16): "float16"}


def _torch_segment(t: "torch.Tensor", k: int) -> Tuple[np.ndarray, str]:
    if t.device.type != "cpu":
        raise UnsupportedInputError(
            f"gradient segment {k} is on {t.device}; the Rust kernel balances CPU buffers only, and this "
            "sampler does not use the on-device path (which covers 'grab' and 'pair' without projection or "
            "unit_size, with device_path='auto' or 'always'). Moving (B, d) to the host would defeat its "
            "purpose, so it is refused rather than copied."
        )
    if t.is_sparse or t.layout != torch.strided:
        raise UnsupportedInputError(f"gradient segment {k} has layout {t.layout}; expected a dense tensor")
    if t.dim() == 0:
        raise ShapeError(f"gradient segment {k} is a scalar; expected a leading batch dimension [B, ...]")
    if not t.is_contiguous():
        raise UnsupportedInputError(
            f"gradient segment {k} (shape {tuple(t.shape)}, strides {t.stride()}) is not contiguous; "
            "pass t.contiguous() (this copies)"
        )
    t = t.detach().reshape(t.shape[0], math.prod(t.shape[1:]))
    if t.dtype == torch.float32:
        return t.numpy(), "float32"
    if t.dtype == torch.float64:
        return t.numpy(), "float64"
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy().view(np.uint16), "float16"
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    raise UnsupportedInputError(
        f"gradient segment {k} has dtype {t.dtype}; expected float32, float64, float16 or bfloat16"
    )


def _numpy_segment(a: np.ndarray, k: int) -> Tuple[np.ndarray, str]:
    if a.ndim == 0:
        raise ShapeError(f"gradient segment {k} is a scalar; expected a leading batch dimension [B, ...]")
    kind = _NUMPY_KINDS.get(a.dtype)
    if kind is None:
        raise UnsupportedInputError(f"gradient segment {k} has dtype {a.dtype}; expected float32, float64 or float16")
    if not a.flags.c_contiguous:
        raise UnsupportedInputError(
            f"gradient segment {k} (shape {a.shape}, strides {a.strides}) is not C-contiguous "
            "(transposed, sliced or negatively strided); pass np.ascontiguousarray(a) (this copies)"
        )
    a = a.reshape(a.shape[0], math.prod(a.shape[1:]))
    if kind == "float16":
        a = a.view(np.uint16)
    return a, kind


class OuterRows:
    """A batch of rows given by their factors (watch()'s lone Linear layer, capture/feed.py): row r is
    vec(f[r, :p] f[r, p:]^T) followed, with ``bias``, by f[r, :p], where f is ``factors`` (float32,
    C-contiguous, rows x (p + q)): a Linear layer's scaled output gradient and projected input. The Rust
    kernel forms the rows a few at a time where it balances them, so the block of rows, p q + p numbers
    an example against p + q, is never written out."""

    __slots__ = ("factors", "p", "bias")

    def __init__(self, factors: np.ndarray, p: int, bias: bool) -> None:
        self.factors, self.p, self.bias = factors, p, bias

    @property
    def rows(self) -> int:
        return int(self.factors.shape[0])

    @property
    def width(self) -> int:
        """The rows' width: p q, plus p with the bias."""
        q = self.factors.shape[1] - self.p
        return self.p * q + (self.p if self.bias else 0)

    @property
    def shape(self) -> Tuple[int, int]:
        """The rows' shape, as an array of them would have it."""
        return (self.rows, self.width)

    def __len__(self) -> int:
        return self.rows

    def expand(self) -> np.ndarray:
        """The rows themselves (a new [rows, width] array), for the paths that take rows."""
        from torchgrab import _native

        return _native.expand_outer(self.factors, self.p, self.bias)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # np.asarray(rows) gives the rows: code that looks at what reaches sampler.step (a spy, a
        # benchmark's probe) sees the rows it would have seen, not their factors.
        rows = self.expand()
        return rows if dtype is None else rows.astype(dtype, copy=False)


def gradient_items(grads: Any) -> List[Any]:
    """The per-parameter pieces of what ``step`` received: a dict's values, a list/tuple, or one buffer."""
    if isinstance(grads, dict):
        return list(grads.values())
    if isinstance(grads, (list, tuple)):
        return list(grads)
    return [grads]


def as_segments(grads: Any) -> Tuple[List[np.ndarray], str, int]:
    """(segments, dtype name, B) for a tensor, an array, or a dict/list/tuple of them."""
    items = gradient_items(grads)
    if not items:
        raise ShapeError("step() got an empty collection of gradients")
    segments: List[np.ndarray] = []
    kinds = set()
    for k, g in enumerate(items):
        if torch is not None and isinstance(g, torch.Tensor):
            seg, kind = _torch_segment(g, k)
        elif isinstance(g, np.ndarray):
            seg, kind = _numpy_segment(g, k)
        else:
            raise UnsupportedInputError(
                f"gradient segment {k} is a {type(g).__name__}; expected a torch.Tensor or numpy.ndarray"
            )
        kinds.add(kind)
        segments.append(seg)
    if len(kinds) > 1:
        raise UnsupportedInputError(f"all gradient segments must share one dtype, got {sorted(kinds)}")
    rows = {s.shape[0] for s in segments}
    if len(rows) > 1:
        raise ShapeError(f"every gradient segment must have the same leading dimension B, got {sorted(rows)}")
    b = rows.pop()
    if b == 0:
        raise ShapeError("step() got a batch of 0 rows; a step needs at least one example")
    nonempty = [s for s in segments if s.shape[1] > 0]
    if not nonempty:
        raise ShapeError("the gradients have width d = 0; there is nothing to balance")
    return nonempty, kinds.pop(), b
