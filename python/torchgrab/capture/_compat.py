"""What the capture needs from torch, and the oldest torch that has it.

``watch()`` reads the forward's shapes back from autograd's nodes (``Node._input_metadata``, torch 2.5)
to follow rows that a model flattens or combines with a parameter of no layer; with older torch those
models would be refused one by one, each with a message that does not say why, so ``watch()`` refuses
torch < 2.5 once, up front. The sampler itself (``step``, ``backward``, checkpoints, CD-GraB) runs on
torch 2.1 and newer. ``scripts/test_torch_floor.sh`` runs the tests on the oldest torch supported.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

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


__all__ = ["tree_leaves", "torch_version", "check_watch_torch", "WATCH_MIN_TORCH"]
