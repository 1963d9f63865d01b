"""What the capture needs from torch, and the oldest torch that has it.

``watch()`` reads the forward's shapes back from autograd's nodes (``Node._input_metadata``, torch 2.5)
to follow rows that a model flattens or combines with a parameter of no layer; with older torch those
models would be refused one by one, each with a message that does not say why, so ``watch()`` refuses
torch < 2.5 once, up front. The sampler itself (``step``, ``backward``, checkpoints, CD-GraB) runs on
torch 2.1 and newer. ``scripts/test_torch_floor.sh`` runs the tests on the oldest torch supported.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, ContextManager, List, Optional, Tuple, TypeVar

import torch

from torchgrab._versions import major_minor
from torchgrab.errors import UnsupportedInputError

try:
    from torch.utils._pytree import tree_leaves
except ImportError:  # torch < 2.3: only tree_flatten
    from torch.utils._pytree import tree_flatten

    def tree_leaves(tree: Any) -> List[Any]:  # type: ignore[misc]
        """The leaves of a nest of tuples, lists and dicts, in order (torch.utils._pytree.tree_leaves)."""
        return tree_flatten(tree)[0]


WATCH_MIN_TORCH = (2, 5)
F = TypeVar("F", bound=Callable[..., Any])

# Device types torch.autocast may be on for (the check below skips any this torch does not know).
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")
_NOTHING = contextlib.nullcontext()
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def full_precision() -> ContextManager[Any]:
    """A context with torch.autocast off wherever it is on now. The sketches are formed in the hooks, and a
    forward hook runs inside the user's ``with torch.autocast(...)`` (as does a backward called in it): there
    a projection's matmul ran in bfloat16 or float16 and handed its half-precision result to a float32
    product at the backward (a dtype error), or rounded the rows. Off everywhere, the rows are the float32
    sketch of the gradients autocast's forward made. Where autocast is on nowhere (the usual case) this is
    one C call and a shared no-op context."""
    if _any_autocast is not None and not _any_autocast():
        return _NOTHING
    stack = contextlib.ExitStack()
    for device_type in _AUTOCAST_DEVICES:
        try:
            on = torch.is_autocast_enabled(device_type)
        except RuntimeError:  # a device type this build does not know
            continue
        if on:
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def in_full_precision(fn: F) -> F:
    """``fn`` run under ``full_precision()``: for the hooks' entry points that form or balance rows."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with full_precision():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def torch_version(version: Optional[str] = None) -> Tuple[int, int]:
    """(major, minor) of a torch version string; this process's torch by default."""
    return major_minor(str(torch.__version__ if version is None else version))


def check_watch_torch(version: Optional[str] = None) -> None:
    """Refuse ``watch()`` on a torch older than WATCH_MIN_TORCH (this process's by default), naming both
    versions and what still works."""
    version = str(torch.__version__ if version is None else version)
    if major_minor(version) < WATCH_MIN_TORCH:
        need = ".".join(map(str, WATCH_MIN_TORCH))
        raise UnsupportedInputError(
            f"watch() needs torch {need} or newer (this process has torch {version}): it reads the forward's "
            f"shapes back from autograd's graph, which older torch does not expose. pip install 'torch>={need}'; "
            "with this torch, feed the sampler by sampler.backward(model, loss_fn, inputs, targets) or "
            "sampler.step(per_example_grads) instead"
        )


__all__ = [
    "tree_leaves",
    "torch_version",
    "check_watch_torch",
    "full_precision",
    "in_full_precision",
    "WATCH_MIN_TORCH",
]
