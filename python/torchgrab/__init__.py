"""torchgrab: GraB example orderings for PyTorch, with Rust kernels.

from torchgrab import GraBSampler
sampler = GraBSampler(train_set, ordering="grab", seed=0)
"""

from __future__ import annotations

from typing import Any, List, NamedTuple

import numpy as np

from torchgrab import _native
from torchgrab.errors import (
    CallOrderError,
    GraBError,
    MemoryLimitError,
    NonFiniteGradientError,
    ShapeError,
    StateDictError,
    UnitIndexError,
    UnsupportedInputError,
    UnsupportedModelError,
)

__version__: str = _native.__version__


class Discrepancy(NamedTuple):
    """Herding discrepancy: the largest prefix sum of mean-centered vectors, in two norms."""

    linf: float
    l2: float


def orderings() -> List[str]:
    """Names accepted by ``GraBSampler(ordering=...)`` (``"mean"`` is an alias of ``"grab"``)."""
    return list(_native.orderings())


def herding_discrepancy(vectors: Any, order: Any) -> Discrepancy:
    """``max_k || sum_{t<=k} (v_order(t) - mean) ||`` in l_inf and l2 for an n x d array and an order."""
    try:
        import torch

        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().cpu().numpy()
        if isinstance(order, torch.Tensor):
            order = order.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    v = np.ascontiguousarray(vectors, dtype=np.float64)
    if v.ndim != 2:
        raise ShapeError(f"vectors must be 2-D (n x d), got shape {v.shape}")
    o = np.asarray(order)
    if o.ndim != 1 or (o.size and (o.dtype.kind not in "iu" or o.min() < 0)):
        raise UnitIndexError("order must be a 1-D sequence of non-negative integers")
    return Discrepancy(*_native.herding_discrepancy(v, np.ascontiguousarray(o, dtype=np.uint32)))


def __getattr__(name: str) -> Any:
    # GraBSampler needs torch; import it lazily so NumPy-only use of the kernels stays light.
    if name == "GraBSampler":
        from torchgrab.sampler import GraBSampler

        return GraBSampler
    if name == "WatchHandle":
        from torchgrab.capture.watch import WatchHandle

        return WatchHandle
    if name == "Factored":
        from torchgrab.ondevice import Factored

        return Factored
    if name in ("DistributedGraBSampler", "CollectiveError"):
        from torchgrab import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module 'torchgrab' has no attribute {name!r}")


__all__ = [
    "GraBSampler",
    "WatchHandle",
    "Factored",
    "DistributedGraBSampler",
    "CollectiveError",
    "Discrepancy",
    "orderings",
    "herding_discrepancy",
    "GraBError",
    "ShapeError",
    "NonFiniteGradientError",
    "UnitIndexError",
    "CallOrderError",
    "StateDictError",
    "MemoryLimitError",
    "UnsupportedInputError",
    "UnsupportedModelError",
]
