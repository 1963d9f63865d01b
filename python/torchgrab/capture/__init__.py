"""Gradient capture for the samplers: sketches of per-example gradients from layer hooks (``watch``).

The exact per-example paths (``torch.func`` and the batched hooks of ``sampler.backward``) live in
:mod:`torchgrab.gradients`.
"""

from torchgrab.capture.layers import LayerSketch, register_sketch
from torchgrab.capture.watch import DEFAULT_SKETCH, WatchHandle

__all__ = ["WatchHandle", "LayerSketch", "register_sketch", "DEFAULT_SKETCH"]
