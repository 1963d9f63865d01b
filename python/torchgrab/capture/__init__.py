"""Gradient capture for the samplers: sketches of per-example gradients from layer hooks (``watch``).

The exact per-example paths (``torch.func`` and the batched hooks of ``sampler.backward``) live in
:mod:`torchgrab.gradients`.

The names below are loaded at their first use, not when the package is imported: the capture code marks
its hooks for ``torch.compile`` with ``torch.compiler.disable``, which imports ``torch._dynamo``, about a
second, as long as ``import torch`` itself. ``from torchgrab import GraBSampler`` (a DataLoader worker
started by spawn imports it too) does not pay that; ``sampler.watch()`` does, once.
"""

from typing import Any

from torchgrab.capture.defaults import DEFAULT_BUDGET, DEFAULT_SKETCH

__all__ = ["WatchHandle", "LayerSketch", "register_sketch", "DEFAULT_SKETCH", "DEFAULT_BUDGET"]

_LAZY = {"WatchHandle": "watch", "LayerSketch": "layers", "register_sketch": "layers"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found directly from now on
    return value
