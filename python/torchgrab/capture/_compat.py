"""What the capture needs from torch, and the oldest torch that has it.

``watch()`` reads the forward's shapes back from autograd's nodes (``Node._input_metadata``, torch 2.5)
to follow rows that a model flattens or combines with a parameter of no layer; with older torch those
models would be refused one by one, each with a message that does not say why, so ``watch()`` refuses
torch < 2.5 once, up front. The sampler itself (``step``, ``backward``, checkpoints, CD-GraB) runs on
torch 2.1 and newer. ``scripts/test_torch_floor.sh`` runs the tests on the oldest torch supported.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Tuple

import torch

from torchgrab._versions import major_minor
from torchgrab.errors import UnsupportedInputError, UnsupportedModelError

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


_AUTOGRAD = torch._C._autograd
_TOP_HOOKS = getattr(_AUTOGRAD, "_top_saved_tensors_default_hooks", None)


def top_saved_tensor_hooks() -> Any:
    """The innermost saved-tensor hooks on this thread (``(pack, unpack)``), or None; ``...`` where this
    torch cannot say."""
    if _TOP_HOOKS is None:
        return ...
    try:
        return _TOP_HOOKS(False)
    except TypeError:  # a torch whose function takes no argument
        return _TOP_HOOKS()


@contextlib.contextmanager
def without_saved_tensor_hooks(name: str) -> Iterator[None]:
    """Saved-tensor hooks (``save_on_cpu``, a checkpoint's) taken off this thread's stack while torch.func
    runs, and put back as they were: torch.func refuses to run under any ("don't yet support saved tensor
    hooks"), and what it saves is its own, freed when it returns, nothing of the model's to offload or
    recompute. A backward called inside ``with save_on_cpu():`` runs watch()'s hooks under them.

    A torch that cannot say which hooks are on (before 2.8) leaves them, and torch.func's refusal becomes
    an UnsupportedModelError naming ``name`` (the layer or parameter whose rows torch.func forms) and the
    ways around it."""
    taken = []
    try:
        while top_saved_tensor_hooks() not in (None, ...):
            taken.append(top_saved_tensor_hooks())
            _AUTOGRAD._pop_saved_tensors_default_hooks()
        yield
    except RuntimeError as e:
        if _TOP_HOOKS is not None or "saved tensor hooks" not in str(e):
            raise
        raise UnsupportedModelError(
            f"watch(): the rows of {name!r} are formed by torch.func, which does not run inside saved-tensor "
            f"hooks (save_on_cpu, a checkpoint's), and torch {torch.__version__} cannot take them off while it "
            "runs: call loss.backward() after the `with` block (the hooks act on the forward), use torch 2.8 or "
            "newer, or exclude= it"
        ) from None
    finally:
        for pack, unpack in reversed(taken):
            _AUTOGRAD._push_saved_tensors_default_hooks(pack, unpack)


__all__ = [
    "tree_leaves",
    "torch_version",
    "check_watch_torch",
    "WATCH_MIN_TORCH",
    "top_saved_tensor_hooks",
    "without_saved_tensor_hooks",
]
