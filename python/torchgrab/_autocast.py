"""Sketches, rows and the balancing's products in float32 (or the sampler's dtype), whatever autocast does.

A forward hook runs inside the user's ``with torch.autocast(...)``, and so may a backward, a flush or a
``sampler.step`` called there: a matmul made there runs in bfloat16 or float16. A projection made in a
forward hook then met a float32 product at the backward (a dtype error: ``Trainer(bf16=True)`` on a BERT),
and the rows or the on-device balancing's products were rounded to half precision. Every entry point that
forms rows or balances them runs under ``full_precision()``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, ContextManager, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

# Device types torch.autocast may be on for (the check below skips any this torch does not know).
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")
_NOTHING = contextlib.nullcontext()
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_on() -> bool:
    """Whether torch.autocast is on now for any device type."""
    if _any_autocast is not None:
        return bool(_any_autocast())
    return any(_enabled(d) for d in _AUTOCAST_DEVICES)


def _enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except RuntimeError:  # a device type this build does not know
        return False


def full_precision() -> ContextManager[Any]:
    """A context with torch.autocast off wherever it is on now: the rows are then the float32 sketch of the
    gradients autocast's forward made. Where autocast is on nowhere (the usual case) this is one C call
    and a shared no-op context."""
    if not autocast_on():
        return _NOTHING
    stack = contextlib.ExitStack()
    for device_type in _AUTOCAST_DEVICES:
        if _enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def in_full_precision(fn: F) -> F:
    """``fn`` run under ``full_precision()``: for the hooks' entry points that form or balance rows."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if _any_autocast is not None and not _any_autocast():
            return fn(*args, **kwargs)  # the usual case, without entering a context (half the cost per call)
        with full_precision():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


__all__ = ["autocast_on", "full_precision", "in_full_precision"]
