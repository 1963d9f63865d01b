"""Per-example gradients of an ordinary ``nn.Module`` with ``torch.func`` (functional_call + vmap(grad)).

Only parameters with ``requires_grad`` are differentiated, so frozen layers cost nothing. Buffers are
passed through unchanged; dropout draws independent masks per example (``randomness="different"``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from torchgrab.errors import ShapeError, UnsupportedModelError


def check_model(model: nn.Module) -> None:
    """Refuse models whose per-example gradients are undefined, saying what to do instead."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise UnsupportedModelError(
                f"module {name or type(module).__name__!r} is BatchNorm in training mode: it mixes the examples of "
                "a batch, so per-example gradients are undefined. Use GroupNorm or LayerNorm, put the BatchNorm "
                "layers in eval mode, or convert them with torch.func.replace_all_batch_norm_modules_(model)."
            )


def _batch_size(inputs: Any) -> int:
    sizes = set()

    def visit(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            if t.dim() == 0:
                raise ShapeError("inputs must be batched along dimension 0; got a scalar tensor")
            sizes.add(t.shape[0])
        return t

    tree_map(visit, inputs)
    if len(sizes) != 1:
        raise ShapeError(f"all input tensors must share the batch dimension 0, got sizes {sorted(sizes)}")
    return sizes.pop()


def _call(model: nn.Module, state: Dict[str, torch.Tensor], inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return functional_call(model, state, args=(), kwargs=inputs)
    if isinstance(inputs, tuple):
        return functional_call(model, state, inputs)
    return functional_call(model, state, (inputs,))


def per_example_gradients(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
    chunk_size: Optional[int] = None,
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Return ({parameter name: [B, *shape] gradients}, [B] losses) for the trainable parameters.

    ``loss_fn(outputs, targets)`` is called on a batch of one example (as torch's per-sample-gradient
    recipe does), so any mean-reducing loss works unchanged.
    """
    check_model(model)
    b = _batch_size(inputs)
    if isinstance(targets, torch.Tensor) and targets.shape[:1] != (b,):
        raise ShapeError(f"targets have leading dimension {tuple(targets.shape[:1])}, inputs have batch size {b}")
    trainable = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise UnsupportedModelError("the model has no parameter with requires_grad=True; there is nothing to balance")
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    frozen.update(dict(model.named_buffers()))

    def loss_of_one(params: Dict[str, torch.Tensor], x: Any, y: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        x1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, x)
        y1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, y)
        out = _call(model, {**frozen, **params}, x1)
        loss = loss_fn(out, y1)
        return loss, loss.detach()

    per_example = vmap(
        grad(loss_of_one, has_aux=True), in_dims=(None, 0, 0), randomness="different", chunk_size=chunk_size
    )
    grads, losses = per_example(trainable, inputs, targets)
    return grads, losses
