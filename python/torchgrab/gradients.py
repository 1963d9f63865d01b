"""Per-example gradients of an ordinary ``nn.Module`` with ``torch.func`` (functional_call + vmap(grad)).

Only parameters with ``requires_grad`` are differentiated, so frozen layers cost nothing. Buffers are
passed through unchanged; dropout draws independent masks per example (``randomness="different"``).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from torchgrab._autocast import autocast_on, full_precision
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


def batch_size(inputs: Any) -> int:
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


def _checked_batch(model: nn.Module, inputs: Any, targets: Any) -> int:
    """The batch size, after the checks both capture methods make (model, inputs, targets)."""
    check_model(model)
    b = batch_size(inputs)
    if isinstance(targets, torch.Tensor) and targets.shape[:1] != (b,):
        raise ShapeError(f"targets have leading dimension {tuple(targets.shape[:1])}, inputs have batch size {b}")
    return b


def capture(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
    chunk_size: Optional[int] = None,
    method: str = "vmap",
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Dict[str, torch.Tensor]]:
    """What both samplers' ``backward`` need: (contiguous per-example gradients, [B] losses, the batch
    mean gradient of each parameter). The hooks capture forms the means from its layer products
    (see ``hooks_capture``); otherwise they are the rows' mean."""
    if method == "hooks":
        grads, losses, means = hooks_capture(model, loss_fn, inputs, targets)
    else:
        grads, losses = per_example_gradients(model, loss_fn, inputs, targets, chunk_size=chunk_size, method=method)
        means = {k: g.mean(dim=0) for k, g in grads.items()}
    grads = {k: g if g.is_contiguous() else g.contiguous() for k, g in grads.items()}
    return grads, losses, means


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model`` on a batch given as a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


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
    method: str = "vmap",
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Return ({parameter name: [B, *shape] gradients}, [B] losses) for the trainable parameters.

    ``loss_fn(outputs, targets)`` is called on a batch of one example (as torch's per-sample-gradient
    recipe does), so any mean-reducing loss works unchanged.

    ``method="vmap"`` (default) works for any model torch.func can trace; ``chunk_size`` bounds its
    memory by vmapping that many examples at a time. ``method="hooks"`` runs one ordinary batched
    forward and backward and forms the per-example gradients of ``nn.Linear``, ``nn.Conv2d``,
    ``nn.LayerNorm`` and ``nn.Embedding`` layers from their inputs and output gradients (the
    outer-product identity and its relatives). It also takes padded batches of models whose masking
    keeps the padding out of every example's loss (BERT's attention mask does: tested against
    unpadded one-example passes). It is the cheaper capture for such models (benchmarks/capture.py: 2.8-3.6x cheaper than vmap for MNIST logistic regression, 1.1-1.6x
    for LeNet-5). Only for models made of those trainable layers, called as modules (a weight used through
    a functional call, such as a tied output layer, is not seen by the hooks), whose forward treats the
    examples independently (anything mixing examples, like batch statistics, is wrong for both
    methods; see ``check_model``).
    """
    if method == "hooks":
        return per_example_gradients_hooks(model, loss_fn, inputs, targets)
    if method != "vmap":
        raise UnsupportedModelError(f"method must be 'vmap' or 'hooks', got {method!r}")
    _checked_batch(model, inputs, targets)
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
    # torch.func.functional_call on a model that uses one module (or parameter) at several places leaves
    # plain tensors in place of the nn.Parameters afterwards (torch 2.x), which would silently cut the
    # optimizer off from the model. Put the original parameter objects back whatever happens.
    saved = [(m, k, p) for m in model.modules() for k, p in m._parameters.items()]
    # Gradients of the parameters only: inputs that require grad (adversarial training, input-gradient
    # penalties) would tie every returned gradient to a graph through them, alive as long as the gradients
    # are (the hooks path returns plain tensors).
    inputs, targets = (
        tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, a) for a in (inputs, targets)
    )
    try:
        grads, losses = per_example(trainable, inputs, targets)
    except RuntimeError as e:
        if not autocast_on():
            raise
        # torch.func's grad of some layers under autocast fails inside torch (LayerNorm: "expected scalar
        # type BFloat16 but found Float"): say where, and what works.
        raise UnsupportedModelError(
            f"method='vmap' failed under torch.autocast ({e}): torch.func could not differentiate this model "
            "in mixed precision. Use method='hooks', call sampler.backward outside the autocast block, or "
            "sampler.watch(model) with an ordinary loss.backward()"
        ) from e
    finally:
        for m, k, p in saved:
            m._parameters[k] = p
    return grads, losses


def _hook_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    layers = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        ok = (
            isinstance(module, (nn.Linear, nn.LayerNorm))
            or (
                isinstance(module, nn.Conv2d)
                and module.groups == 1
                and module.padding_mode == "zeros"
                and not isinstance(module.padding, str)
            )
            # max_norm rewrites the weight inside the forward; scale_grad_by_freq scales by counts over
            # the whole batch, which is not the batch-of-one gradient.
            or (isinstance(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq)
        )
        if not ok:
            raise UnsupportedModelError(
                "method='hooks' forms per-example gradients of nn.Linear, nn.Conv2d (groups=1, zero padding), "
                "nn.LayerNorm and nn.Embedding (no max_norm, no scale_grad_by_freq) layers only; module "
                f"{name!r} ({type(module).__name__}) has trainable parameters. Use method='vmap'."
            )
        layers.append((name, module))
    return layers


def per_example_losses(loss_fn: Callable[[Any, Any], torch.Tensor], out: torch.Tensor, targets: Any) -> torch.Tensor:
    """[B] losses: ``loss_fn`` on each example as a batch of one, exactly as the vmap path defines them.

    The common torch losses with ``reduction="mean"`` (``nn.CrossEntropyLoss`` with class-index targets
    and no class weights, ``nn.MSELoss`` with same-shape targets) are computed in their
    ``reduction="none"`` form, the same per-example values in one kernel: vmapping them over the batch
    cost about 10x more, a fifth of the whole hooks capture for a small model (MNIST logistic
    regression, benchmarks/end_to_end.py). Anything else, and cross-entropy targets equal to
    ``ignore_index`` (whose batch of one is a 0/0 mean), goes through vmap.
    """
    fn = torch.nn.functional
    if isinstance(targets, torch.Tensor) and isinstance(out, torch.Tensor) and out.dim() >= 1:
        if (
            type(loss_fn) is nn.CrossEntropyLoss
            and loss_fn.reduction == "mean"
            and loss_fn.weight is None
            and out.dim() == 2
            and targets.dim() == 1
            and not targets.is_floating_point()
            and not bool((targets == loss_fn.ignore_index).any())
        ):
            return fn.cross_entropy(out, targets, reduction="none", label_smoothing=loss_fn.label_smoothing)
        if type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean" and out.shape == targets.shape:
            return fn.mse_loss(out, targets, reduction="none").reshape(out.shape[0], -1).mean(1)
    one = lambda v: v.unsqueeze(0) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return vmap(lambda o, t: loss_fn(tree_map(one, o), tree_map(one, t)))(out, targets)


def im2col(
    x: torch.Tensor,
    kernel_size: Tuple[int, int],
    dilation: Tuple[int, int],
    padding: Tuple[int, int],
    stride: Tuple[int, int],
) -> torch.Tensor:
    """``torch.nn.functional.unfold`` for a 4-D input, the same values in the same (B, C kh kw, L) layout.

    Formed as one copy of a strided view, with output columns innermost (contiguous runs of the input's
    rows). On the CPU that is several times faster than ``unfold``'s own im2col at LeNet-5's shapes
    (benchmarks/capture.py), and ``unfold`` was the largest single cost of the hooks capture.
    """
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel_size, dilation, padding, stride
    if ph or pw:
        x = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    # (B, C, oh, ow, span_h, span_w), then every dilation-th tap: (B, C, oh, ow, kh, kw).
    v = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    b, c, oh, ow = v.shape[:4]
    return v.permute(0, 1, 4, 5, 2, 3).reshape(b, c * kh * kw, oh * ow)


def per_example_gradients_hooks(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """``per_example_gradients(..., method="hooks")``: one batched forward and backward; see there."""
    grads, losses, _ = hooks_capture(model, loss_fn, inputs, targets, means=False)
    return grads, losses


def hooks_capture(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
    means: bool = True,
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Dict[str, torch.Tensor]]:
    """``per_example_gradients_hooks``, plus (``means``) the batch mean gradient of each parameter.

    For a Linear layer applied once per example (2-D input) the mean is one matrix product of the
    layer's output gradients and inputs, cheaper than reducing the [B, out, in] per-example tensor
    (a read of all of it); with positions (3-D input, T per example) that product costs T times
    more, so there, and for every other layer, the per-example rows are averaged. For
    ``GraBSampler.backward`` to put in ``.grad``.
    """
    b = _checked_batch(model, inputs, targets)
    layers = _hook_layers(model)
    if not layers:
        raise UnsupportedModelError("the model has no parameter with requires_grad=True; there is nothing to balance")
    seen: Dict[nn.Module, List[Tuple[torch.Tensor, torch.Tensor]]] = {m: [] for _, m in layers}

    names = {m: name for name, m in layers}

    def record(module: nn.Module, args: Tuple[Any, ...], out: torch.Tensor) -> Optional[torch.Tensor]:
        x = args[0].detach()
        if b > 1 and x.dim() >= 1 and x.shape[0] == 1 and out.shape[0] == 1:
            # One call shared by the whole batch: the gradient of its output would be summed over the
            # examples. For an embedding lookup of ids (BERT's position embeddings: ids of batch 1,
            # broadcast when added), each example gets its own expanded, no-copy view of the output,
            # so the gradient stays per example; the values and the broadcast are unchanged. Other
            # layers are refused: their batch-1 output may feed code that relies on its shape.
            if not isinstance(module, nn.Embedding):
                raise UnsupportedModelError(
                    f"method='hooks': module {names[module]!r} was called on a batch of 1 inside a batch of {b} "
                    "(a computation shared by all examples), whose per-example gradients the hooks cannot "
                    "separate. Use method='vmap'."
                )
            x, out = x.expand(b, *x.shape[1:]), out.expand(b, *out.shape[1:])
            seen[module].append((x, out))
            return out
        seen[module].append((x, out))
        return None

    handles = [m.register_forward_hook(record) for _, m in layers]
    try:
        with torch.enable_grad():
            out = call_model(model, inputs)
            losses = per_example_losses(loss_fn, out, targets)
            outs = [o for m in seen for _, o in seen[m]]
            # The first call for a model also asks autograd for the parameters' batch gradients, to
            # check the identity against them below (one extra weight-gradient pass, once).
            check = model not in _HOOKS_CHECKED
            named = [(k, p) for k, p in model.named_parameters() if p.requires_grad] if check else []
            grads_all = torch.autograd.grad(losses.sum(), outs + [p for _, p in named], allow_unused=True)
            grads_out, batch_grads = grads_all[: len(outs)], grads_all[len(outs) :]
    finally:
        for h in handles:
            h.remove()
    go = iter(grads_out)
    result: Dict[str, torch.Tensor] = {}
    mean_of: Dict[str, torch.Tensor] = {}
    mixed = autocast_on()  # the batch gradients below were then made by half-precision products
    # With autocast off: the products below take half-precision inputs and output gradients (autocast's
    # forward) in the parameters' precision, as autograd's weight gradients are.
    with torch.no_grad(), full_precision():
        for name, module in layers:
            w_sum: Optional[torch.Tensor] = None
            b_sum: Optional[torch.Tensor] = None
            w_mean: Optional[torch.Tensor] = None
            linear_rows = False  # a Linear use whose mean must come from the rows
            for x, o in seen[module]:  # a layer used several times: its per-example gradients add up
                g = next(go)
                if g is None:
                    g = torch.zeros_like(o)
                x, g = _widened(x, module), _widened(g, module)
                if x.shape[:1] != (b,) or g.shape[:1] != (b,):
                    # A layer fed sequence-first (T, B, ...) tensors: its rows are not examples.
                    raise UnsupportedModelError(
                        f"method='hooks' needs batch-first inputs, but module {name!r} got an input of shape "
                        f"{tuple(x.shape)} for a batch of {b}. Use method='vmap'."
                    )
                w, bias = _layer_rows(module, name, x, g, b)
                if isinstance(module, nn.Linear):
                    if means and x.dim() == 2:
                        wm = torch.mm(g.t(), x) / b
                        w_mean = wm if w_mean is None else w_mean + wm
                    else:
                        linear_rows = True
                w_sum = w if w_sum is None else w_sum + w
                if bias is not None:
                    b_sum = bias if b_sum is None else b_sum + bias
            prefix = f"{name}." if name else ""
            for pname, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                val = w_sum if pname == "weight" else b_sum
                if val is None:
                    val = torch.zeros(b, *p.shape, dtype=p.dtype, device=p.device)
                result[prefix + pname] = val.reshape(b, *p.shape)
                if means:
                    direct = pname == "weight" and w_mean is not None and not linear_rows
                    mean_of[prefix + pname] = w_mean.reshape(p.shape) if direct else val.mean(0).reshape(p.shape)
    # The order of model.named_parameters(), as the vmap path returns it.
    order = [k for k, p in model.named_parameters() if p.requires_grad]
    if check:
        _check_hooks_identity(result, dict(zip([k for k, _ in named], batch_grads)), mixed)
        _HOOKS_CHECKED.add(model)
    return {k: result[k] for k in order}, losses.detach(), {k: mean_of[k] for k in order} if means else {}


def _widened(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A layer's input or output gradient in at least its weight's precision (under torch.autocast they
    are bfloat16 or float16 beside a float32 weight); integer ids (an Embedding's input) as they are."""
    weight = getattr(module, "weight", None)
    if not t.is_floating_point() or weight is None:
        return t
    return t.to(torch.promote_types(t.dtype, weight.dtype))


def _layer_rows(
    module: nn.Module, name: str, x: torch.Tensor, g: torch.Tensor, b: int
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-example gradients [B, ...] of one call of a hooked layer: (weight, bias or None), from the
    call's input x and its output gradient g (both batch-first)."""
    if isinstance(module, nn.Linear):
        # The outer-product identity, summed over any positions between batch and features.
        x2, g2 = x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1])
        return torch.bmm(g2.transpose(1, 2), x2), g2.sum(1)
    if isinstance(module, nn.LayerNorm):
        # y = x_hat * weight + bias, x_hat normalized over the trailing normalized_shape.
        shape = tuple(module.normalized_shape)
        x_hat = torch.nn.functional.layer_norm(x, shape, None, None, module.eps)
        return (g * x_hat).reshape(b, -1, *shape).sum(1), g.reshape(b, -1, *shape).sum(1)
    if isinstance(module, nn.Embedding):
        # Row ids[b, t] of example b's gradient gets g[b, t]; padding_idx rows get none.
        ids = x.reshape(b, -1)
        gd = g.reshape(b, -1, g.shape[-1])
        if module.padding_idx is not None:
            gd = gd.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0.0)
        w = torch.zeros(b, module.num_embeddings, gd.shape[-1], dtype=gd.dtype, device=gd.device)
        return w.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, gd.shape[-1]), gd), None
    # nn.Conv2d (groups=1, zero padding: see _hook_layers): the products over unfolded columns.
    if x.dim() != 4:
        raise UnsupportedModelError(f"method='hooks' needs batched 4-D input to Conv2d {name!r}, got {tuple(x.shape)}")
    cols = im2col(x, module.kernel_size, module.dilation, module.padding, module.stride)
    w = torch.bmm(g.reshape(b, g.shape[1], -1), cols.transpose(1, 2)).reshape(b, *module.weight.shape)
    return w, g.sum((2, 3))


# Models whose hooks capture has been checked against autograd's batch gradient.
_HOOKS_CHECKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _check_hooks_identity(
    per_example: Dict[str, torch.Tensor], batch: Dict[str, Optional[torch.Tensor]], mixed: bool = False
) -> None:
    """Refuse a model whose per-example gradients from the hooks do not add up to autograd's gradient.

    That happens when a trainable weight is also used outside its module's own call (a tied output
    layer through ``F.linear(x, self.fc.weight)``, say): the hooks see only the module calls, and the
    missed use would silently drop out of every example's gradient.

    ``mixed``: the batch ran under torch.autocast, whose weight gradients are half-precision products
    (off by a few percent of the largest entry from the float32 sums here where a bfloat16 product sums
    over a sequence's positions): compared by their relative distance instead, within 10%, which a
    missed use (a whole term of the gradient) still exceeds.
    """
    for name, rows in per_example.items():
        want = batch.get(name)
        if want is None:
            want = torch.zeros_like(rows[0])
        got = rows.sum(0)
        want = want.to(got.dtype)
        if mixed:
            finite = torch.isfinite(got) & torch.isfinite(want)
            gap = float(torch.linalg.vector_norm((got - want)[finite]))
            if gap <= 0.1 * float(torch.linalg.vector_norm(want[finite])) + 1e-6:
                continue
        # Non-finite gradients are the sampler's to refuse, with their own message: compare the rest.
        tol = 1e-4 * float(torch.nan_to_num(want.abs(), nan=0.0, posinf=0.0).max()) + 1e-6
        if mixed or not torch.allclose(got, want, rtol=1e-3, atol=tol, equal_nan=True):
            raise UnsupportedModelError(
                f"method='hooks' cannot capture parameter {name!r}: its per-example gradients do not add up to "
                "the batch gradient, so it is used somewhere other than its own module call (a tied or "
                "functionally applied weight?). Use method='vmap'."
            )
