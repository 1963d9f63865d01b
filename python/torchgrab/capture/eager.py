"""Code of watch() that runs as it is when the model runs under ``torch.compile``, never traced."""

from __future__ import annotations

from typing import Any

import torch


def eager(fn: Any) -> Any:
    """``fn``, run as it is when the model runs under ``torch.compile``, not traced into the graph.

    Traced, the hooks' reads of the handle's state (the rows gathered so far, the step's counters) become
    guards that fail at the next step, so the model was compiled again at every step until dynamo's
    recompile limit. Left out of the graph, each watched layer's hook is one graph break instead, and the
    rows are those of the eager model (tests/test_watch.py, torch.compile). The same holds for the
    ``__torch_function__`` of the modes a hook enters (capture/direct.py): traced, dynamo failed building
    the guards of the frame that resumed under the mode (torch 2.15). Uncompiled, the wrapper adds one
    Python call per call."""
    compiler = getattr(torch, "compiler", None)
    disable = getattr(compiler, "disable", None)
    return fn if disable is None else disable(fn)
