"""Reading the autograd graph of a forward (capture/audit.py, capture/flatten.py)."""

from __future__ import annotations

from typing import Any


def accumulates(node: Any) -> bool:
    """Whether the node adds a gradient into a leaf tensor's ``.grad`` (a parameter's, where it trains):
    the one kind of node with a ``variable``, which is matched by that rather than by a name."""
    return hasattr(node, "variable")


def sequence_nr(node: Any) -> int:
    """The order in which the node was made, per thread (accumulators are numbered above all others)."""
    return int(node._sequence_nr())
