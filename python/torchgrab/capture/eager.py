"""Code of watch() that runs as it is when the model runs under ``torch.compile``, never traced."""

from __future__ import annotations

import functools
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


class _ModuleHook(functools.partial):  # type: ignore[type-arg]
    """A hook on one of the user's modules. Pickled (``torch.save(model)``) or deep-copied with its module
    (``copy.deepcopy``, ``AveragedModel``), it becomes a hook that does nothing: the copy is not watched,
    and neither the handle nor its sampler is copied (they hold locks and buffers: before, saving a
    watched model whole raised a PicklingError). A ``partial``: called as it is, by C, with no Python
    frame of its own."""

    def __reduce__(self) -> Any:
        return (_unwatched, ())


def _unwatched() -> Any:
    return _nothing


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def module_hook(fn: Any) -> Any:
    """``eager(fn)`` to register on a module: a copy of the module holds a hook that does nothing."""
    return _ModuleHook(eager(fn))
