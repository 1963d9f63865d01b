"""Forwards ``watch()`` installs on a module while it watches it (an instance attribute that shadows the
class's ``forward``): ``nn.MultiheadAttention``'s recording forward (capture/attention.py) and a stacked
recurrent layer's layer-by-layer forward (capture/recurrent.py). Each carries its owner, the watch handle,
as ``_torchgrab_owner``, and pickles or deep-copies as the class forward of the copy."""

from __future__ import annotations

import types
from typing import Any

from torch import nn


def installed_by(module: nn.Module) -> Any:
    """The owner (a watch handle) of the forward installed on ``module``; None when it runs its class's
    forward; ``module`` itself when someone else gave it an instance forward."""
    forward = module.__dict__.get("forward")
    return None if forward is None else getattr(forward, "_torchgrab_owner", module)


def class_forward(module: nn.Module) -> Any:
    """``module``'s class forward, bound to it (what an installed forward pickles as)."""
    return types.MethodType(type(module).forward, module)


class Installed:
    """A removable handle, like a hook's: puts the module's class forward back."""

    def __init__(self, module: nn.Module, forward: Any) -> None:
        self.module, self.forward = module, forward

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self.forward:
            del self.module.forward
