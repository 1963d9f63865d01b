"""One exception hierarchy for everything torchgrab refuses.

Every class derives from :class:`GraBError`, itself a ``ValueError``. A refused call leaves the sampler
exactly as it was before the call. (A ``non_blocking=True`` step that the kernel refuses in the
background raises at the next call on the sampler, which is then as it was before that step.)
"""

from torchgrab._native import (
    CallOrderError,
    GraBError,
    MemoryLimitError,
    NonFiniteGradientError,
    ShapeError,
    StateDictError,
    UnitIndexError,
    UnsupportedInputError,
)


class UnsupportedModelError(GraBError):
    """A model whose per-example gradients are undefined (e.g. BatchNorm in training mode)."""


__all__ = [
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
