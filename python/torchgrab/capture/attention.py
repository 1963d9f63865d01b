"""``nn.MultiheadAttention`` under ``watch()``: its projections made visible to the layer hooks.

``nn.MultiheadAttention`` applies its packed q, k, v projection (``in_proj_weight``, ``in_proj_bias``) and
its output projection (``out_proj``'s parameters) as functions inside ``F.multi_head_attention_forward``,
so no module hook sees their inputs or output gradients. While a model is watched, each supported
attention module runs :func:`attention_forward` instead (an instance attribute ``forward``, removed with
the handle): the same computation, op for op, as torch's training path, with the two projections'
inputs and outputs handed to the handle like any Linear layer's. Its parameters, state dict and
outputs are unchanged; when the handle would record nothing (eval mode, ``no_grad``, another handle's
step) torch's own forward runs.

The packed projection is one Linear layer of ``3 E`` outputs (:class:`InProjection`, a view sharing the
attention's parameters, not a child of the model). In self-attention it is one call; with a separate
key/value input (encoder-decoder attention) or three inputs, torch applies row blocks of the weight to
each input, and each such call's output gradient is zero-padded to the ``3 E`` rows before it reaches
the sketch, so the calls add up to the layer's whole gradient (a module called several times in a step
is summed). Separate q/k/v weights (``kdim``/``vdim``), ``add_bias_kv`` and ``add_zero_attn`` are not
supported: watch() refuses such a module's parameters unless they are left out.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from torchgrab.capture.forwards import Installed, class_forward, installed_by
from torchgrab.errors import UnsupportedModelError

# record(module, x_batch_first, out, grad_view): the handle's capture of one Linear call (see
# WatchHandle._record); grad_view maps out's gradient to batch-first rows of the module's outputs.
Record = Callable[[nn.Module, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], Any]


def supported(mha: nn.MultiheadAttention) -> bool:
    """Whether watch() can sketch this attention module's projections."""
    return bool(mha._qkv_same_embed_dim) and mha.bias_k is None and mha.bias_v is None and not mha.add_zero_attn


class InProjection(nn.Linear):
    """The packed q, k, v projection of an ``nn.MultiheadAttention`` as the Linear layer it is (weight
    ``[3 E, E]``). Its parameters are the attention's own objects; it is not registered in the model,
    so the model's parameters and state dict do not change (and model.eval() does not reach it: the
    attention's forward checks the attention's own mode)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        nn.Module.__init__(self)
        self.in_features = mha.embed_dim
        self.out_features = 3 * mha.embed_dim
        self.weight = mha.in_proj_weight
        self.bias = mha.in_proj_bias


def install(
    mha: nn.MultiheadAttention, owner: Any, active: Callable[[], bool], record: Record, in_proj: nn.Module
) -> Installed:
    """Have ``mha`` run :func:`attention_forward` while ``active()`` (``owner`` would record this forward)."""
    if installed_by(mha) is not None:
        raise UnsupportedModelError(
            "watch(): an nn.MultiheadAttention of this model already runs another forward (it is watched "
            "for another model, or patched); exclude= it"
        )
    forward = _WatchedForward(mha, owner, active, record, in_proj)
    mha.forward = forward
    return Installed(mha, forward)


class _WatchedForward:
    """The forward ``install`` gives an ``nn.MultiheadAttention``: its class forward, or while ``active()``
    :func:`attention_forward`. Pickled or deep-copied with the module (``torch.save(model)``,
    ``copy.deepcopy``), it becomes the class forward of the copy: the copy is not watched."""

    def __init__(
        self, mha: nn.MultiheadAttention, owner: Any, active: Callable[[], bool], record: Record, in_proj: nn.Module
    ) -> None:
        self.mha, self.active, self.record, self.in_proj = mha, active, record, in_proj
        self.original = mha.forward
        self._torchgrab_owner = owner

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.active():  # a recorded forward: grad enabled, the watched model training
            return self.original(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        return attention_forward(
            self.mha,
            self.record,
            self.in_proj,
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
        )

    def __reduce__(self) -> Any:
        return (class_forward, (self.mha,))


# (The name torch.save wrote for a watched attention's forward before capture/forwards.py: kept so that
# such a pickle still loads.)
_class_forward = class_forward


def _seq_to_batch(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1)  # [T, B, ...] -> [B, T, ...], a view


def attention_forward(
    mha: nn.MultiheadAttention,
    record: Record,
    in_proj: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    need_weights: bool,
    attn_mask: Optional[torch.Tensor],
    average_attn_weights: bool,
    is_causal: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``nn.MultiheadAttention.forward`` in training (its non-fast path: ``F.multi_head_attention_forward``
    for packed weights without bias_kv or zero attention), with the projections recorded."""
    if query.dim() != 3:
        raise UnsupportedModelError(
            f"watch(): nn.MultiheadAttention got an unbatched query of shape {tuple(query.shape)}; per-example "
            "rows need a batch dimension"
        )
    # nn.MultiheadAttention.forward: masks to the query's float type, then sequence-first.
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=query.dtype,
        check_other=False,
    )
    if mha.batch_first:  # keep the "is" relations, as torch does
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))

    # F.multi_head_attention_forward from here.
    tgt_len, bsz, embed_dim = query.shape
    num_heads = mha.num_heads
    # (torch canonicalizes both masks again here: a no-op on masks canonicalized above, so not repeated.)
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
            "`generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # the is_causal hint goes to scaled_dot_product_attention
    elif key_padding_mask is not None:
        is_causal = False  # the merged mask is no longer causal
    if embed_dim != mha.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {mha.embed_dim}, but got {embed_dim}")
    head_dim = embed_dim // num_heads
    if key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")

    q, k, v = _in_projection(query, key, value, mha.in_proj_weight, mha.in_proj_bias, record, in_proj)

    if attn_mask is not None:
        src_len = key.shape[0]
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
                )
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                    f"{(bsz * num_heads, tgt_len, src_len)}."
                )
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    src_len = k.size(1)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, src_len):
            raise AssertionError(
                f"expecting key_padding_mask shape of {(bsz, src_len)}, but got {key_padding_mask.shape}"
            )
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = mha.dropout if mha.training else 0.0

    if need_weights:
        _, _, e = q.shape
        q_scaled = q * math.sqrt(1.0 / float(e))
        if is_causal and attn_mask is None:
            raise AssertionError("FIXME: is_causal not implemented for need_weights")
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        attn_output = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        attn_output = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        attn_output = attn_output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        weights = None

    # The output projection on [T B, E] rows (position-major): per example, [B, T, E] views.
    out = F.linear(attn_output, mha.out_proj.weight, mha.out_proj.bias)
    record(
        mha.out_proj,
        _seq_to_batch(attn_output.view(tgt_len, bsz, embed_dim)),
        out,
        lambda g: _seq_to_batch(g.view(tgt_len, bsz, -1)),
    )
    out = out.view(tgt_len, bsz, out.size(1))
    if mha.batch_first:
        out = out.transpose(1, 0)
    return out, weights


def _in_projection(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    record: Record,
    in_proj: nn.Module,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch's ``_in_projection_packed``, each Linear call recorded as a call of ``in_proj`` whose output
    gradient is zero-padded to the packed weight's 3 E rows (the rows of the blocks it did not use)."""
    e = q.size(-1)

    def call(x: torch.Tensor, first: int, rows: int) -> torch.Tensor:
        lo, hi = first * e, (first + rows) * e
        wi = w if rows == 3 else w[lo:hi]
        bi = None if b is None else (b if rows == 3 else b[lo:hi])
        out = F.linear(x, wi, bi)
        pad = (lo, 3 * e - hi)

        def grad_view(g: torch.Tensor) -> torch.Tensor:
            g = _seq_to_batch(g)
            return g if rows == 3 else F.pad(g, pad)

        record(in_proj, _seq_to_batch(x), out, grad_view)
        return out

    if k is v:
        if q is k:  # self-attention
            proj = call(q, 0, 3)
            proj = proj.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return proj[0], proj[1], proj[2]
        q_proj = call(q, 0, 1)  # encoder-decoder attention
        kv_proj = call(k, 1, 2)
        kv_proj = kv_proj.unflatten(-1, (2, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return q_proj, kv_proj[0], kv_proj[1]
    return call(q, 0, 1), call(k, 1, 1), call(v, 2, 1)
