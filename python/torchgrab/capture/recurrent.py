"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) under ``watch()``: rows without per-example
gradients, from the layer's input and the gradients of its outputs.

Each weight of a recurrent layer is used as a Linear layer applied at every time step: ``W_ih`` to the
step's input and ``W_hh`` to the previous hidden state (``W_hr`` of an LSTM with ``proj_size`` to the
state before its projection). So each example's gradient of it is ``sum_t g_t a_t^T`` and is sketched
as a Linear layer over a sequence is, ``(G_b P_out^T)^T (A_b P_in^T)``, where ``g_t`` is the gradient of
the weight's product at step t (a gate pre-activation's part) and ``a_t`` what it multiplied.

torch's fused kernels (cuDNN, oneDNN, ATen's own) keep neither: only the layer's output and final states
come out of them, and torch.func has no batching rule for them (per-example gradients by vmap fell back
to a loop, 500 times slower than the step). So when the layer's output gradients arrive, the layer's
forward is replayed step by step from its saved input and initial state, in float32 with the weights
held fixed, and differentiated with those output gradients (one ``torch.autograd.grad`` inside the
backward): that gives every ``g_t``, example by example, and the ``a_t`` along with them. The training
step's own gradients still come from torch's kernel, untouched. The cost is about one more forward and
backward of the layer, run one time step at a time.

Padded sequences packed with ``pack_padded_sequence`` are replayed padded, each example's state held
past its length and its outputs there zero: padding contributes nothing. Dropout between stacked
layers is drawn inside torch's kernel, so its masks cannot be replayed: such a layer is refused while
it trains (single-layer LSTMs with an ``nn.Dropout`` between them are watched).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from torchgrab.capture.layers import LayerSketch, _f32, _trainable, register_sketch, split_k
from torchgrab.capture.projection import Factor
from torchgrab.errors import UnsupportedModelError


class RecurrentCall:
    """What a recurrent layer's call keeps for its rows: its input (time first and padded, float32, or
    the PackedSequence), its initial state, and, once the backward has reached the layer, the
    gradients of its final states (the output's gradient is the hook's own argument)."""

    __slots__ = ("x", "hx", "state_grads")

    def __init__(self, x: Any, hx: Any) -> None:
        self.x = x
        self.hx = hx
        self.state_grads: Tuple[Optional[torch.Tensor], ...] = ()


class _Tap(torch.autograd.Function):
    """The identity on a recurrent layer's outputs (output, h_n[, c_n]), whose backward hands their
    gradients, all at once, to ``hook`` (None for an output the loss did not use) before passing them on
    unchanged to the layer's own backward."""

    @staticmethod
    def forward(ctx: Any, hook: Any, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.hook = hook
        ctx.set_materialize_grads(False)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        ctx.hook(grads)
        return (None, *grads)


def tap(module: nn.Module, out: Any, hook: Any) -> Tuple[Any, int, torch.Tensor]:
    """The layer's output ``out`` ((output, h_n) or (output, (h_n, c_n))) passed through the tap, with the
    same structure; the batch size of the call; and the tapped output tensor (the data of a packed one).
    ``hook(output_grad [B, T, D * H] batch first, state_grads)`` runs in the backward."""
    output, state = out
    packed = isinstance(output, PackedSequence)
    data = output.data if packed else output
    states = list(state) if isinstance(state, tuple) else [state]
    unbatched = not packed and data.dim() == 2
    if packed:
        b = int(output.batch_sizes[0])
    elif unbatched:
        b = 1
    else:
        b = int(data.shape[0] if module.batch_first else data.shape[1])

    def on_grads(grads: Tuple[Optional[torch.Tensor], ...]) -> None:
        g = grads[0]
        if g is None:
            g = torch.zeros_like(data)
        if packed:
            g = pad_packed_sequence(output._replace(data=g))[0].transpose(0, 1)
        elif unbatched:
            g = g.unsqueeze(0)
        elif not module.batch_first:
            g = g.transpose(0, 1)
        hook(g, tuple(s if s is None or not unbatched else s.unsqueeze(1) for s in grads[1:]))

    tapped = _Tap.apply(on_grads, data, *states)
    new_out = output._replace(data=tapped[0]) if packed else tapped[0]
    new_state = tuple(tapped[1:]) if isinstance(state, tuple) else tapped[1]
    return (new_out, new_state), b, tapped[0]


def _blocks(module: nn.Module) -> List[Tuple[str, Optional[str]]]:
    """(weight, bias or None) of each Linear product of the layer, in column order: per layer and
    direction, the input side, the hidden side, and an LSTM's projection."""
    out: List[Tuple[str, Optional[str]]] = []
    for layer in range(module.num_layers):
        for sfx in ("", "_reverse")[: 2 if module.bidirectional else 1]:
            for side in ("ih", "hh"):
                out.append((f"weight_{side}_l{layer}{sfx}", f"bias_{side}_l{layer}{sfx}"))
            if getattr(module, "proj_size", 0):
                out.append((f"weight_hr_l{layer}{sfx}", None))
    return out


@register_sketch(nn.RNN, nn.LSTM, nn.GRU)
class RecurrentSketch(LayerSketch):
    """Rows of an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (any number of layers, either direction,
    ``batch_first`` either way, ``proj_size``, packed sequences): each weight of each layer and direction
    as a Linear layer over the sequence (a k_out x k_in block, exact where a side is no wider than k),
    each bias as that layer's bias part. See the module's docstring for how its gradients are had."""

    def __init__(self, name: str, module: nn.Module, k: Any, seed: int) -> None:
        super().__init__(name, module, None, seed)
        if module.dropout and module.num_layers > 1:
            raise UnsupportedModelError(
                f"watch(): {name!r} is an {type(module).__name__} with dropout={module.dropout} between its "
                f"{module.num_layers} layers. torch draws those masks inside its kernel, so no row could "
                "replay them. Stack single-layer recurrent layers with an nn.Dropout between them (each is "
                f"watched), build it with dropout=0, or exclude={name!r}"
            )
        self.mode = module.mode  # "LSTM", "GRU", "RNN_TANH" or "RNN_RELU"
        self.layer_class = type(module).__name__
        # (weight name, bias name or None, P_out, P_in, weight trained, bias trained) per product.
        self.products: List[Tuple[str, Optional[str], Factor, Factor, bool, bool]] = []
        width = 0
        for w, bname in _blocks(module):
            out_f, in_f = getattr(module, w).shape
            k_out, k_in = split_k(k, int(out_f))
            p_out = Factor(out_f, k_out, seed, name, w, "out")
            p_in = Factor(in_f, k_in, seed, name, w, "in")
            tw = _trainable(module, w)
            tb = bname is not None and _trainable(module, bname)
            self.products.append((w, bname, p_out, p_in, tw, tb))
            width += p_out.k * p_in.k * tw + p_out.k * tb
        self.width = width
        # The columns in the layer's parameter order (weight_ih_l0, weight_hh_l0, bias_ih_l0, ...), so
        # that with sketch=None a row is the example's gradient laid out as model.parameters() are.
        self.columns = [n for n in module._parameters if _trainable(module, n)]

    def covered(self, module: nn.Module) -> List[str]:
        return list(self.columns)

    def save(self, module: nn.Module, x: Any) -> Any:  # x: (input, hx)
        inp, hx = x
        if isinstance(inp, PackedSequence):
            inp = inp._replace(data=inp.data.detach())
        else:
            inp = inp.detach()
        if hx is not None:
            hx = tuple(h.detach() for h in hx) if isinstance(hx, tuple) else hx.detach()
        return RecurrentCall(inp, hx)

    # ------------------------------------------------------------------ rows
    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        pieces: Dict[str, torch.Tensor] = {}
        for (w, bname, p_out, p_in, tw, tb), (a, gy) in zip(self.products, self._replay(module, saved, g)):
            gp = p_out(gy)  # [B, T, k_out]
            if tw:
                pieces[w] = torch.bmm(gp.transpose(1, 2), p_in(a)).reshape(gy.shape[0], -1)
            if tb:
                pieces[bname] = gp.sum(1)  # type: ignore[index]
        return [pieces[n] for n in self.columns]

    def project(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        pieces: Dict[str, torch.Tensor] = {}
        for w, bname, p_out, p_in, tw, tb in self.products:
            if tw:
                gw = _f32(grads[w])  # [B, out, in]
                pieces[w] = p_in(p_out(gw.transpose(1, 2)).transpose(1, 2)).reshape(gw.shape[0], -1)
            if tb:
                pieces[bname] = p_out(_f32(grads[bname]))  # type: ignore[index]
        return [pieces[n] for n in self.columns]

    def _replay(
        self, module: nn.Module, saved: RecurrentCall, g: torch.Tensor
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(A [B, T, in], G [B, T, out]) of every product in ``products`` order: what each weight multiplied
        at each time step, and the gradient of that product, from a step-by-step replay of the call."""
        x, lengths = self._inputs(module, saved.x)  # [T, B, I]
        t_len, b = x.shape[0], x.shape[1]
        dirs = 2 if module.bidirectional else 1
        lstm = self.mode == "LSTM"
        gru = self.mode == "GRU"
        proj = getattr(module, "proj_size", 0)
        h_size = module.hidden_size
        h_out = proj or h_size
        h0, c0 = self._initial(module, saved.hx, b, dirs, h_out, h_size, x)
        mask = None if lengths is None else (torch.arange(t_len, device=x.device)[:, None] < lengths[None, :])
        wts = {n: _f32(p.detach()) for n, p in module._parameters.items() if p is not None}
        # Per product: the tensors it multiplied (one per time step, or the whole sequence) and the
        # products whose gradients are wanted, in the same order as those.
        # (None: the same gradients as the product before).
        recorded: List[Tuple[List[torch.Tensor], Optional[List[torch.Tensor]]]] = []
        finals_h: List[torch.Tensor] = []
        finals_c: List[torch.Tensor] = []
        with torch.enable_grad():
            inp = x
            for layer in range(module.num_layers):
                outs = []
                for d in range(dirs):
                    sfx = f"_l{layer}" + ("_reverse" if d else "")
                    # The input side for the whole sequence at once; a leaf where nothing before it is
                    # differentiated (the first layer), so that its gradient can be asked for.
                    w_hh, b_ih, b_hh = wts["weight_hh" + sfx], wts.get("bias_ih" + sfx), wts.get("bias_hh" + sfx)
                    if not gru and b_hh is not None:  # both biases add to the gates: one sum, added once
                        b_ih = b_hh if b_ih is None else b_ih + b_hh
                    gi = torch.nn.functional.linear(inp, wts["weight_ih" + sfx], b_ih)
                    if not gi.requires_grad:
                        gi.requires_grad_()
                    recorded.append(([inp], [gi]))
                    # Taken apart once: indexing gi[t] at each step would make autograd add T gradients of
                    # gi's full size (a zeroed tensor each) instead of stacking T slices.
                    gis = gi.unbind(0)
                    hh_in: List[torch.Tensor] = []
                    hh_out: List[torch.Tensor] = []
                    hr_in: List[torch.Tensor] = []
                    hr_out: List[torch.Tensor] = []
                    h, c = h0[layer * dirs + d], c0[layer * dirs + d] if lstm else None
                    ys: List[Optional[torch.Tensor]] = [None] * t_len
                    steps = range(t_len - 1, -1, -1) if d else range(t_len)
                    for t in steps:
                        hh_in.append(h)
                        if gru:
                            gh = torch.nn.functional.linear(h, w_hh, b_hh)
                            if not gh.requires_grad:
                                gh.requires_grad_()
                            hh_out.append(gh)
                            h_new, c_new = self._cell(gis[t], gh, h, c)
                        else:  # the gates in one product; the hidden side has their gradient, as the input side
                            h_new, c_new = self._cell(torch.addmm(gis[t], h, w_hh.t()), None, h, c)
                        if proj:
                            hr_in.append(h_new)
                            h_new = torch.nn.functional.linear(h_new, wts["weight_hr" + sfx])
                            hr_out.append(h_new)
                        # Past a packed text's end its state is held (and its final state is the one at its
                        # end); its outputs there get zero gradients, so need no zeroing.
                        ys[t] = h_new
                        if mask is not None:
                            m = mask[t][:, None]
                            h = torch.where(m, h_new, h)
                            c = torch.where(m, c_new, c) if lstm else None
                        else:
                            h, c = h_new, c_new
                    if d:  # recorded in the order run: back to time order
                        for lst in (hh_in, hh_out, hr_in, hr_out):
                            lst.reverse()
                    recorded.append((hh_in, hh_out if gru else None))
                    if proj:
                        recorded.append((hr_in, hr_out))
                    outs.append(torch.stack(ys))  # type: ignore[arg-type]
                    finals_h.append(h)
                    if lstm:
                        finals_c.append(c)  # type: ignore[arg-type]
                inp = outs[0] if dirs == 1 else torch.cat(outs, -1)
            outputs = [inp, torch.stack(finals_h)] + ([torch.stack(finals_c)] if lstm else [])
            given = [_f32(g.detach()).transpose(0, 1)] + [
                torch.zeros_like(o) if s is None else _f32(s.detach()) for o, s in zip(outputs[1:], saved.state_grads)
            ]
            wanted = [t for _, ys_ in recorded for t in ys_ or ()]
            got = torch.autograd.grad(outputs, wanted, given, allow_unused=True)
        pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []
        i = 0
        for xs, ys_ in recorded:
            a = xs[0] if len(xs) == 1 and xs[0].dim() == 3 else torch.stack(xs)
            if ys_ is None:  # the gradients of the product before (the same layer and direction's input side)
                gy = pairs[-1][1]
            else:
                grads = [torch.zeros_like(y) if gr is None else gr for y, gr in zip(ys_, got[i : i + len(ys_)])]
                i += len(ys_)
                gy = (grads[0] if len(grads) == 1 and grads[0].dim() == 3 else torch.stack(grads)).transpose(0, 1)
            pairs.append((a.detach().transpose(0, 1), gy))  # batch first
        return pairs

    def _cell(
        self, gi: torch.Tensor, gh: Optional[torch.Tensor], h: torch.Tensor, c: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One time step of the layer's cell from the previous state and its two products, a GRU's apart,
        an LSTM's or RNN's summed in ``gi``: the new (h, c) (c None but for an LSTM), as torch's
        documentation of each layer defines them."""
        if self.mode == "LSTM":
            i, f, gg, o = gi.chunk(4, 1)  # (gi: the gates, both products summed)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            return torch.sigmoid(o) * torch.tanh(c), c
        if self.mode == "GRU":
            ir, iz, i_n = gi.chunk(3, 1)
            hr, hz, h_n = gh.chunk(3, 1)
            r = torch.sigmoid(ir + hr)
            z = torch.sigmoid(iz + hz)
            n = torch.tanh(i_n + r * h_n)
            return (1 - z) * n + z * h, None
        return (torch.tanh(gi) if self.mode == "RNN_TANH" else torch.relu(gi)), None

    @staticmethod
    def _inputs(module: nn.Module, x: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The call's input as [T, B, I] float32 (padded), and each example's length when it was packed."""
        if isinstance(x, PackedSequence):
            padded, lengths = pad_packed_sequence(x)
            return _f32(padded), lengths.to(padded.device)
        if x.dim() == 2:  # unbatched: one example
            return _f32(x).unsqueeze(1), None
        return _f32(x.transpose(0, 1) if module.batch_first else x), None

    @staticmethod
    def _initial(
        module: nn.Module, hx: Any, b: int, dirs: int, h_out: int, h_size: int, x: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(h0 [L * D, B, H_out], c0 [L * D, B, H]) as float32, zeros where the call was given none."""
        n = module.num_layers * dirs
        h0 = c0 = None
        if hx is not None:
            h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
            if h0.dim() == 2:  # unbatched
                h0 = h0.unsqueeze(1)
                c0 = None if c0 is None else c0.unsqueeze(1)
        h0 = x.new_zeros(n, b, h_out) if h0 is None else _f32(h0)
        c0 = x.new_zeros(n, b, h_size) if c0 is None else _f32(c0)
        return h0, c0
