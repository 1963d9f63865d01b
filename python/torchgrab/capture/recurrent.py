"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) under ``watch()``: rows without per-example
gradients, from the layer's input and the gradients of its outputs.

Each weight of a recurrent layer is used as a Linear layer applied at every time step: ``W_ih`` to the
step's input and ``W_hh`` to the previous hidden state (``W_hr`` of an LSTM with ``proj_size`` to the
state before its projection). So each example's gradient of it is ``sum_t g_t a_t^T`` and is sketched
as a Linear layer over a sequence is, ``(G_b P_out^T)^T (A_b P_in^T)``, where ``g_t`` is the gradient of
the weight's product at step t (a gate pre-activation's part) and ``a_t`` what it multiplied.

torch's fused kernels (cuDNN, oneDNN, ATen's own) keep neither: only the layer's output and final states
come out of them, and torch.func has no batching rule for them (per-example gradients by vmap fell back
to a loop, 500 times slower than the step). So when the layer's output gradients arrive, the layer is
replayed from its saved input and initial state, in float32 with the weights held fixed: its forward
step by step, keeping what each step's gradient needs, then back-propagation through time written out
for each cell (no autograd graph), which gives every ``g_t`` example by example. The training step's
own gradients still come from torch's kernel, untouched. The cost is about one more forward and backward
of the layer.

The replay runs in the layout of a packed sequence (time major, each step's examples those still inside
their text, longest first), as torch's kernels do: a batch of padded texts packed with
``pack_padded_sequence`` is replayed over its tokens only, and padding contributes nothing. A tensor
input is the case where every text has every step.

Dropout between stacked layers (``nn.LSTM(..., num_layers=2, dropout=0.5)``, PyTorch's word-language-model
example) is drawn inside torch's kernel, where no replay can see its masks. So while such a layer is
watched and training, it runs its layers one at a time (:class:`StackedDropoutForward`: torch's kernel for
each, through one-layer twins that share the layer's parameters) and draws the dropout between them
itself, as torch's kernel does (each layer's output but the last, elementwise, kept with probability
1 - p and scaled by 1 / (1 - p)), keeping the masks for the replay. Training is the same in distribution;
the random numbers drawn are not the kernel's.

The cells (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``), called by a model's own loop once per time
step, are replayed call by call as a layer of one step: autograd has already summed the later steps'
part into the gradient of each call's new state.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from torchgrab.capture.forwards import Installed, class_forward, installed_by
from torchgrab.capture.layers import LayerSketch, _f32, _trainable, register_sketch, split_k
from torchgrab.capture.projection import Factor
from torchgrab.errors import UnsupportedModelError


class RecurrentCall:
    """What a recurrent layer's call keeps for its rows: its input (a tensor or a PackedSequence,
    detached) and initial state, and, once the backward has reached the layer, the gradients of its
    outputs (output or its packed data, h_n, c_n; None for one the loss did not use)."""

    __slots__ = ("x", "hx", "grads", "masks")

    def __init__(self, x: Any, hx: Any, masks: Optional[List[torch.Tensor]] = None) -> None:
        self.x = x
        self.hx = hx
        self.grads: Tuple[Optional[torch.Tensor], ...] = ()
        self.masks = masks  # the dropout between stacked layers (StackedDropoutForward), in the output's layout


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


def _tapped(hook: Any, tensors: List[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """``tensors`` through the tap (see _Tap)."""
    return _Tap.apply(hook, *tensors)


def _blocks(module: nn.Module) -> List[Tuple[str, Optional[str]]]:
    """(weight, bias or None) of each Linear product of the layer: per layer and direction, the input
    side, the hidden side, and an LSTM's projection."""
    out: List[Tuple[str, Optional[str]]] = []
    for layer in range(module.num_layers):
        for sfx in ("", "_reverse")[: 2 if module.bidirectional else 1]:
            for side in ("ih", "hh"):
                out.append((f"weight_{side}_l{layer}{sfx}", f"bias_{side}_l{layer}{sfx}"))
            if getattr(module, "proj_size", 0):
                out.append((f"weight_hr_l{layer}{sfx}", None))
    return out


class _Layout:
    """A call's time steps in the packed layout: ``data`` rows [N, ...] step after step, step t holding
    ``sizes[t]`` examples (longest texts first) from row ``starts[t]``; ``order`` the examples' original
    indices in that order (None: as given)."""

    def __init__(self, x: Any, batch_first: bool) -> None:
        if isinstance(x, PackedSequence):
            self.data = _f32(x.data)
            self.sizes = [int(s) for s in x.batch_sizes]
            self.order = x.sorted_indices
            self.packed: Optional[PackedSequence] = x
        else:
            if x.dim() == 2:  # unbatched: one example
                x = x.unsqueeze(1)
            elif batch_first:
                x = x.transpose(0, 1)
            t_len, b = int(x.shape[0]), int(x.shape[1])
            self.data = _f32(x).reshape(t_len * b, -1)
            self.sizes = [b] * t_len
            self.order = None
            self.packed = None
        self.b = self.sizes[0]
        self.starts = [0] * len(self.sizes)
        for t in range(1, len(self.sizes)):
            self.starts[t] = self.starts[t - 1] + self.sizes[t - 1]

    def sorted(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """``t`` (examples along ``dim``, in the caller's order) in the layout's order."""
        return t if self.order is None else t.index_select(dim, self.order)

    def batch_first(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows [N, w] in this layout as [B, T, w], the examples in the caller's order, zeros past an end."""
        if self.packed is None:
            return rows.reshape(len(self.sizes), self.b, -1).transpose(0, 1)
        return pad_packed_sequence(self.packed._replace(data=rows), batch_first=True)[0]


@register_sketch(nn.RNN, nn.LSTM, nn.GRU)
class RecurrentSketch(LayerSketch):
    """Rows of an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (any number of layers, either direction,
    ``batch_first`` either way, ``proj_size``, packed sequences): each weight of each layer and direction
    as a Linear layer over the sequence (a k_out x k_in block, exact where a side is no wider than k),
    each bias as that layer's bias part. See the module's docstring for how its gradients are had."""

    replayed = "replayed step by step"  # how WatchHandle.layers describes it

    def __init__(self, name: str, module: nn.Module, k: Any, seed: int) -> None:
        super().__init__(name, module, None, seed)
        # Dropout between stacked layers: watch() runs the layers itself (StackedDropoutForward).
        self.own_forward = bool(module.dropout) and module.num_layers > 1
        if self.own_forward:
            self.replayed = "its layers run one at a time with dropout between; replayed step by step"
        self.mode = module.mode  # "LSTM", "GRU", "RNN_TANH" or "RNN_RELU"
        self._take_products(name, module, k, seed, _blocks(module))

    def _take_products(
        self, name: str, module: nn.Module, k: Any, seed: int, blocks: List[Tuple[str, Optional[str]]]
    ) -> None:
        self.layer_class = type(module).__name__
        # (weight name, bias name or None, P_out, P_in, weight trained, bias trained) per product.
        self.products: List[Tuple[str, Optional[str], Factor, Factor, bool, bool]] = []
        width = 0
        for w, bname in blocks:
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

    def tap(self, module: nn.Module, out: Any, hook: Any) -> Tuple[Any, int, torch.Tensor]:
        """The call's output ``out`` ((output, h_n) or (output, (h_n, c_n))) passed through the tap, with the
        same structure; the batch size of the call; and the tapped output tensor (the data of a packed one).
        ``hook(grads)`` runs in the backward with the gradients of (output or its data, h_n[, c_n])."""
        output, state = out
        packed = isinstance(output, PackedSequence)
        data = output.data if packed else output
        states = list(state) if isinstance(state, tuple) else [state]
        if packed:
            b = int(output.batch_sizes[0])
        elif data.dim() == 2:  # unbatched: one example
            b = 1
        else:
            b = int(data.shape[0] if module.batch_first else data.shape[1])
        tapped = _tapped(hook, [data, *states])
        new_out = output._replace(data=tapped[0]) if packed else tapped[0]
        new_state = tuple(tapped[1:]) if isinstance(state, tuple) else tapped[1]
        return (new_out, new_state), b, tapped[0]

    def batch_first(self, module: nn.Module, inp: Any) -> torch.Tensor:
        """The call's input with the batch first (a view), or a packed one's data: what watch() records."""
        if isinstance(inp, PackedSequence):
            return inp.data
        if inp.dim() == 2:  # unbatched
            return inp.unsqueeze(0)
        return inp if module.batch_first else inp.transpose(0, 1)

    def layout(self, module: nn.Module, x: Any) -> "_Layout":
        return _Layout(x, module.batch_first)

    def save(self, module: nn.Module, x: Any) -> Any:  # x: (input, hx)
        inp, hx = x
        if isinstance(inp, PackedSequence):
            inp = inp._replace(data=inp.data.detach())
        else:
            inp = inp.detach()
        if hx is not None:
            hx = tuple(h.detach() for h in hx) if isinstance(hx, tuple) else hx.detach()
        forward = module.__dict__.get("forward")
        masks = forward.take_masks() if isinstance(forward, StackedDropoutForward) else None
        return RecurrentCall(inp, hx, masks)

    # ------------------------------------------------------------------ rows
    def rows(self, module: nn.Module, saved: Any, g: torch.Tensor) -> List[torch.Tensor]:
        """The rows of a call whose gradients ``saved.grads`` holds (``g`` is not read: a recurrent layer's
        output gradient is one of three, and comes in its packed layout)."""
        lay = self.layout(module, saved.x)
        pieces: Dict[str, torch.Tensor] = {}
        for (w, bname, p_out, p_in, tw, tb), (a, gy) in zip(self.products, self._replay(module, saved, lay)):
            gp = lay.batch_first(p_out(gy))  # [B, T, k_out], zeros past each text's end
            if tw:
                pieces[w] = torch.bmm(gp.transpose(1, 2), lay.batch_first(p_in(a))).reshape(gp.shape[0], -1)
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

    def _replay(self, module: nn.Module, saved: RecurrentCall, lay: _Layout) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(A [N, in], G [N, out]) in ``lay``'s layout for every product in ``products`` order: what each
        weight multiplied at each time step, and the gradient of that product."""
        dirs = 2 if module.bidirectional else 1
        h_out = getattr(module, "proj_size", 0) or module.hidden_size
        n_states = module.num_layers * dirs
        x = lay.data
        h0, c0 = x.new_zeros(n_states, lay.b, h_out), x.new_zeros(n_states, lay.b, module.hidden_size)
        if saved.hx is not None:
            h, c = saved.hx if isinstance(saved.hx, tuple) else (saved.hx, None)
            h0 = lay.sorted(_f32(h if h.dim() == 3 else h.unsqueeze(1)), 1)
            c0 = c0 if c is None else lay.sorted(_f32(c if c.dim() == 3 else c.unsqueeze(1)), 1)
        wts = {n: _f32(p.detach()) for n, p in module._parameters.items() if p is not None}
        cell = _CELLS[self.mode]
        # Forward, layer by layer: each direction's run keeps what its backward needs.
        runs: List[Tuple[torch.Tensor, List[_Run]]] = []
        for layer in range(module.num_layers):
            got = []
            for d in range(dirs):
                run = _Run(wts, f"_l{layer}" + ("_reverse" if d else ""), self.mode, bool(d), lay)
                cell.forward(run, x, h0[layer * dirs + d], c0[layer * dirs + d])
                got.append(run)
            runs.append((x, got))
            x = got[0].y if dirs == 1 else torch.cat([r.y for r in got], -1)
            if saved.masks and layer < module.num_layers - 1:
                x = x * self._output_grad(module, saved.masks[layer], lay)  # the next layer's input
        # Backward, from the top layer down.
        grads = list(saved.grads) + [None] * (3 - len(saved.grads))
        d_out = torch.zeros_like(x) if grads[0] is None else self._output_grad(module, grads[0], lay)
        d_state = [
            torch.zeros_like(z)
            if gz is None
            else lay.sorted(_f32(gz.detach() if gz.dim() == 3 else gz.unsqueeze(1)), 1)
            for z, gz in ((h0, grads[1]), (c0, grads[2]))
        ]
        by_run: Dict[Tuple[int, int], List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        for layer in range(module.num_layers - 1, -1, -1):
            inp, got = runs[layer]
            parts = d_out.split(h_out, -1) if dirs == 2 else (d_out,)
            d_inp: Optional[torch.Tensor] = None
            for d, run in enumerate(got):
                i = layer * dirs + d
                by_run[(layer, d)] = cell.backward(run, inp, parts[d], d_state[0][i].clone(), d_state[1][i].clone())
                if layer:
                    dx = run.d_in @ run.w("weight_ih")  # this layer's input is the layer below's output
                    d_inp = dx if d_inp is None else d_inp + dx
            if layer:
                d_out = d_inp  # type: ignore[assignment]
                if saved.masks:  # through the dropout between the two layers
                    d_out = d_out * self._output_grad(module, saved.masks[layer - 1], lay)
        return [pair for layer in range(module.num_layers) for d in range(dirs) for pair in by_run[(layer, d)]]

    @staticmethod
    def _output_grad(module: nn.Module, g: torch.Tensor, lay: _Layout) -> torch.Tensor:
        """The output's gradient [N, D * H_out] in the layout (a packed output's data gradient is already)."""
        g = _f32(g.detach())
        if lay.packed is not None:
            return g
        if g.dim() == 2:  # unbatched
            return g
        if module.batch_first:
            g = g.transpose(0, 1)
        return g.reshape(-1, g.shape[-1])


class StackedDropoutForward:
    """The forward ``watch()`` gives a multi-layer ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` with dropout between
    its layers (see the module docstring): while ``active()`` and the layer trains, its layers run one at a
    time, each through torch's kernel on a one-layer twin whose parameters are the layer's own objects, with
    dropout drawn here between them and the masks kept for the call's replay (``take_masks``); otherwise the
    class forward. Pickled or deep-copied with the module, it becomes the class forward of the copy."""

    def __init__(self, module: nn.Module, owner: Any, active: Any) -> None:
        self.module, self.active = module, active
        self.original = class_forward(module)
        self.twins = [_twin(module, layer) for layer in range(module.num_layers)]
        self.masks: Optional[List[torch.Tensor]] = None
        self._torchgrab_owner = owner

    def take_masks(self) -> Optional[List[torch.Tensor]]:
        """The last call's masks (None when it ran the class forward), handed over once."""
        masks, self.masks = self.masks, None
        return masks

    def __call__(self, input: Any, hx: Any = None) -> Any:
        m = self.module
        self.masks = None
        if not (m.training and torch.is_grad_enabled() and self.active()):
            return self.original(input, hx)
        lstm = isinstance(m, nn.LSTM)
        dirs = 2 if m.bidirectional else 1
        p = float(m.dropout)
        x, hs, cs, masks = input, [], [], []
        for layer, twin in enumerate(self.twins):
            _bind(twin, m, layer)  # the layer's parameters now (load_state_dict(assign=True), FSDP swap them)
            state = None
            if hx is not None:  # each layer's slice of the initial state ([L D, (B,) H]: along dimension 0)
                part = slice(layer * dirs, (layer + 1) * dirs)
                state = (hx[0][part], hx[1][part]) if lstm else hx[part]
            y, s = twin(x, state)
            hs.append(s[0] if lstm else s)
            if lstm:
                cs.append(s[1])
            if layer == len(self.twins) - 1:
                x = y
                break
            data = y.data if isinstance(y, PackedSequence) else y
            # F.dropout's mask, as torch's kernel draws it for each layer's output but the last.
            keep = torch.empty_like(data).bernoulli_(1.0 - p)
            mask = keep.div_(1.0 - p) if p < 1.0 else keep
            masks.append(mask)
            x = y._replace(data=data * mask) if isinstance(y, PackedSequence) else data * mask
        self.masks = masks
        h_n = torch.cat(hs, 0)
        return x, ((h_n, torch.cat(cs, 0)) if lstm else h_n)

    def __reduce__(self) -> Any:
        return (class_forward, (self.module,))


def install_stacked(module: nn.Module, owner: Any, active: Any) -> Installed:
    """Have ``module`` run :class:`StackedDropoutForward` (``owner``: the watch handle)."""
    if installed_by(module) is module:
        raise UnsupportedModelError(
            f"watch(): this nn.{type(module).__name__} with dropout between its layers already runs another "
            "forward (patched), and watch() must run its layers one at a time; exclude= it"
        )
    new = StackedDropoutForward(module, owner, active)
    module.forward = new
    return Installed(module, new)


def _twin(module: nn.Module, layer: int) -> nn.Module:
    """A one-layer twin of ``module``'s layer ``layer``: torch's class of that kind, built on the meta device
    (no memory), whose parameters are that layer's own objects (bound again at every call, so it follows
    the model's parameters also where they are replaced, not updated in place)."""
    kind = nn.LSTM if isinstance(module, nn.LSTM) else nn.GRU if isinstance(module, nn.GRU) else nn.RNN
    dirs = 2 if module.bidirectional else 1
    h_out = getattr(module, "proj_size", 0) or module.hidden_size
    kwargs: Dict[str, Any] = dict(bias=module.bias, batch_first=module.batch_first, bidirectional=module.bidirectional)
    if kind is nn.LSTM:
        kwargs["proj_size"] = module.proj_size
    if kind is nn.RNN:
        kwargs["nonlinearity"] = module.nonlinearity
    with torch.device("meta"):
        twin = kind(module.input_size if layer == 0 else h_out * dirs, module.hidden_size, 1, **kwargs)
    _bind(twin, module, layer)
    return twin


def _bind(twin: nn.Module, module: nn.Module, layer: int) -> None:
    """Give ``twin`` the current parameter objects of ``module``'s layer ``layer``."""
    for sfx in ("", "_reverse")[: 2 if module.bidirectional else 1]:
        for base in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
            p = module._parameters.get(f"{base}_l{layer}{sfx}")
            if p is not None and twin._parameters.get(f"{base}_l0{sfx}") is not p:
                setattr(twin, f"{base}_l0{sfx}", p)


@register_sketch(nn.LSTMCell, nn.GRUCell, nn.RNNCell)
class RecurrentCellSketch(RecurrentSketch):
    """Rows of an ``nn.LSTMCell``, ``nn.GRUCell`` or ``nn.RNNCell``, called once per time step by the model's
    own loop: each call is one step of the layer's cell, replayed as a one-step layer from the call's input
    and state with the gradients of its new state (which autograd has already summed over the later
    steps), and the calls of a forward add up."""

    replayed = "each call replayed"

    def __init__(self, name: str, module: nn.Module, k: Any, seed: int) -> None:
        LayerSketch.__init__(self, name, module, None, seed)
        if isinstance(module, nn.RNNCell):
            self.mode = "RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU"
        else:
            self.mode = "LSTM" if isinstance(module, nn.LSTMCell) else "GRU"
        self._take_products(name, module, k, seed, [("weight_ih", "bias_ih"), ("weight_hh", "bias_hh")])

    def tap(self, module: nn.Module, out: Any, hook: Any) -> Tuple[Any, int, torch.Tensor]:
        outs = list(out) if isinstance(out, tuple) else [out]  # (h', c') or h'
        tapped = _tapped(hook, outs)
        b = int(outs[0].shape[0]) if outs[0].dim() == 2 else 1
        return (tuple(tapped) if isinstance(out, tuple) else tapped[0]), b, tapped[0]

    def batch_first(self, module: nn.Module, inp: Any) -> torch.Tensor:
        return inp if inp.dim() == 2 else inp.unsqueeze(0)

    def layout(self, module: nn.Module, x: Any) -> "_Layout":
        return _Layout(x.unsqueeze(0), False)  # one time step ([I] unbatched: one example)

    def _replay(self, module: nn.Module, saved: RecurrentCall, lay: _Layout) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        x = lay.data
        hx = saved.hx
        h, c = hx if isinstance(hx, tuple) else (hx, None)
        states = [
            x.new_zeros(lay.b, module.hidden_size) if t is None else _f32(t if t.dim() == 2 else t.unsqueeze(0))
            for t in (h, c)
        ]
        grads = list(saved.grads) + [None] * (2 - len(saved.grads))
        d_state = [
            torch.zeros_like(z) if gz is None else _f32(gz.detach() if gz.dim() == 2 else gz.unsqueeze(0))
            for z, gz in zip(states, grads)
        ]
        wts = {n: _f32(p.detach()) for n, p in module._parameters.items() if p is not None}
        run = _Run(wts, "", self.mode, False, lay)
        cell = _CELLS[self.mode]
        cell.forward(run, x, states[0], states[1])
        # The new state is the call's only output: its gradient arrives as the final state's.
        return cell.backward(run, x, torch.zeros_like(run.y), d_state[0].clone(), d_state[1].clone())


class _Run:
    """One direction of one layer of a replayed call: its weights, the layout, and what its forward keeps
    for its backward (rows in the layout, [N, ...])."""

    def __init__(self, wts: Dict[str, torch.Tensor], sfx: str, mode: str, reverse: bool, lay: _Layout) -> None:
        self.wts, self.sfx, self.mode, self.reverse, self.lay = wts, sfx, mode, reverse, lay
        self.y: torch.Tensor  # the outputs [N, H_out]
        self.d_in: torch.Tensor  # the input side's gradients [N, G], once the backward has run
        self.saved: Dict[str, torch.Tensor] = {}

    def w(self, name: str) -> torch.Tensor:
        return self.wts[name + self.sfx]

    def b(self, name: str) -> Optional[torch.Tensor]:
        return self.wts.get(name + self.sfx)

    def steps(self, backward: bool = False) -> List[Tuple[int, int]]:
        """(first row, examples) of each time step, in the order the forward (or the backward) takes them."""
        lay = self.lay
        out = list(zip(lay.starts, lay.sizes))
        return out[::-1] if self.reverse != backward else out

    @staticmethod
    def state(h: torch.Tensor, h0: torch.Tensor, n: int) -> torch.Tensor:
        """The state of the step's n examples: a prefix of the last step's (texts that ended dropped, going
        forward) or that with the initial state of the texts that begin here (going backward in time)."""
        if h.shape[0] >= n:
            return h[:n]
        return torch.cat((h, h0[h.shape[0] : n]))

    def keep(self, ys: List[torch.Tensor], **per_step: List[torch.Tensor]) -> None:
        """The outputs ``ys`` (as ``y``) and what the backward needs, per step in the order run: stacked as
        rows of the layout (time order)."""
        self.y = self._stacked(ys)
        self.saved = {k: self._stacked(v) for k, v in per_step.items()}

    def _stacked(self, per_step: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat(per_step[::-1] if self.reverse else per_step)


def _biases(run: _Run) -> Optional[torch.Tensor]:
    """b_ih + b_hh of a cell whose two products are summed (an LSTM's, an RNN's): added once."""
    b_ih, b_hh = run.b("bias_ih"), run.b("bias_hh")
    return b_hh if b_ih is None else b_ih if b_hh is None else b_ih + b_hh


# Back-propagation through time, per cell. ``d_h`` and ``d_c`` hold the gradients reaching each example's
# state (the final states' at first) for all B examples; a step updates the rows of its examples in place.
class _LSTM:
    """i, f, g, o = sigma, sigma, tanh, sigma of W_ih x + b_ih + W_hh h + b_hh; c' = f c + i g;
    h' = o tanh(c') (times W_hr^T with proj_size)."""

    @staticmethod
    def forward(run: _Run, inp: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> None:
        gi = torch.nn.functional.linear(inp, run.w("weight_ih"), _biases(run))
        w_hh_t = run.w("weight_hh").t()
        w_hr = run.wts.get("weight_hr" + run.sfx)
        hsz = w_hh_t.shape[1] // 4
        h, c = h0, c0
        hs, cs, acts, tcs, raws, ys = [], [], [], [], [], []
        for start, n in run.steps():
            h, c = run.state(h, h0, n), run.state(c, c0, n)
            gates = torch.addmm(gi[start : start + n], h, w_hh_t)
            act = torch.sigmoid(gates)
            act[:, 2 * hsz : 3 * hsz] = torch.tanh(gates[:, 2 * hsz : 3 * hsz])
            i, f, gg, o = act.chunk(4, 1)
            hs.append(h)
            cs.append(c)
            c = torch.addcmul(f * c, i, gg)
            tc = torch.tanh(c)
            raw = o * tc
            h = raw if w_hr is None else raw @ w_hr.t()
            acts.append(act)
            tcs.append(tc)
            raws.append(raw)
            ys.append(h)
        run.keep(ys, h=hs, c=cs, act=acts, tc=tcs, **({} if w_hr is None else {"raw": raws}))

    @staticmethod
    def backward(
        run: _Run, inp: torch.Tensor, d_y: torch.Tensor, d_h: torch.Tensor, d_c: torch.Tensor
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        s = run.saved
        i, f, gg, o = s["act"].chunk(4, -1)
        tc = s["tc"]
        # d gates = [dc, dc, dc, d raw] * mult, where dc is the cell state's whole gradient at that step.
        mult = torch.cat((gg * i * (1 - i), s["c"] * f * (1 - f), i * (1 - gg * gg), tc * o * (1 - o)), -1)
        to_c = o * (1 - tc * tc)  # d c += d raw * to_c
        w_hh = run.w("weight_hh")
        w_hr = run.wts.get("weight_hr" + run.sfx)
        d_gates = torch.empty_like(mult)
        d_proj = torch.empty_like(d_y) if w_hr is not None else None
        for start, n in run.steps(backward=True):
            rows = slice(start, start + n)
            dh = d_h[:n] + d_y[rows]
            if d_proj is not None:
                d_proj[rows] = dh
                dh = dh @ w_hr
            dc = torch.addcmul(d_c[:n], dh, to_c[rows])
            dg = torch.cat((dc, dc, dc, dh), 1).mul_(mult[rows])
            d_gates[rows] = dg
            torch.mm(dg, w_hh, out=d_h[:n])
            torch.mul(dc, f[rows], out=d_c[:n])
        run.d_in = d_gates
        out = [(inp, d_gates), (s["h"], d_gates)]  # the hidden side's product is summed into the same gates
        if d_proj is not None:
            out.append((s["raw"], d_proj))
        return out


class _GRU:
    """r, z = sigma(W_ir x + b_ir + W_hr h + b_hr), sigma(...); n = tanh(W_in x + b_in + r (W_hn h + b_hn));
    h' = (1 - z) n + z h."""

    @staticmethod
    def forward(run: _Run, inp: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> None:
        gi = torch.nn.functional.linear(inp, run.w("weight_ih"), run.b("bias_ih"))
        w_hh, b_hh = run.w("weight_hh"), run.b("bias_hh")
        hsz = w_hh.shape[0] // 3
        h = h0
        hs, rs, zs, ns, ghs, ys = [], [], [], [], [], []
        for start, n in run.steps():
            h = run.state(h, h0, n)
            gh = torch.nn.functional.linear(h, w_hh, b_hh)
            g_in = gi[start : start + n]
            r, z = torch.sigmoid(g_in[:, : 2 * hsz] + gh[:, : 2 * hsz]).chunk(2, 1)
            gh_n = gh[:, 2 * hsz :]
            new = torch.tanh(torch.addcmul(g_in[:, 2 * hsz :], r, gh_n))
            hs.append(h)
            h = torch.lerp(new, h, z)  # (1 - z) n + z h
            rs.append(r)
            zs.append(z)
            ns.append(new)
            ghs.append(gh_n)
            ys.append(h)
        run.keep(ys, h=hs, r=rs, z=zs, n=ns, gh_n=ghs)

    @staticmethod
    def backward(
        run: _Run, inp: torch.Tensor, d_y: torch.Tensor, d_h: torch.Tensor, d_c: torch.Tensor
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        s = run.saved
        r, z, new = s["r"], s["z"], s["n"]
        to_n = (1 - z) * (1 - new * new)  # d pre_n = dh' * to_n
        to_z = (s["h"] - new) * z * (1 - z)  # d pre_z = dh' * to_z
        to_r = s["gh_n"] * r * (1 - r)  # d pre_r = d pre_n * to_r
        w_hh = run.w("weight_hh")
        d_in = inp.new_empty(inp.shape[0], w_hh.shape[0])
        d_hid = torch.empty_like(d_in)
        for start, n in run.steps(backward=True):
            rows = slice(start, start + n)
            dh = d_h[:n] + d_y[rows]
            dpn = dh * to_n[rows]
            dpr = dpn * to_r[rows]
            dpz = dh * to_z[rows]
            d_in[rows] = torch.cat((dpr, dpz, dpn), 1)
            d_hid[rows] = dg = torch.cat((dpr, dpz, dpn * r[rows]), 1)
            torch.addmm(dh * z[rows], dg, w_hh, out=d_h[:n])
        run.d_in = d_in
        return [(inp, d_in), (s["h"], d_hid)]


class _RNN:
    """h' = tanh (or relu) of W_ih x + b_ih + W_hh h + b_hh."""

    @staticmethod
    def forward(run: _Run, inp: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> None:
        gi = torch.nn.functional.linear(inp, run.w("weight_ih"), _biases(run))
        w_hh_t = run.w("weight_hh").t()
        act = torch.tanh if run.mode == "RNN_TANH" else torch.relu
        h = h0
        hs, ys = [], []
        for start, n in run.steps():
            h = run.state(h, h0, n)
            hs.append(h)
            h = act(torch.addmm(gi[start : start + n], h, w_hh_t))
            ys.append(h)
        run.keep(ys, h=hs)

    @staticmethod
    def backward(
        run: _Run, inp: torch.Tensor, d_y: torch.Tensor, d_h: torch.Tensor, d_c: torch.Tensor
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        y = run.y
        slope = 1 - y * y if run.mode == "RNN_TANH" else (y > 0).to(y.dtype)
        w_hh = run.w("weight_hh")
        d_pre = torch.empty_like(y)
        for start, n in run.steps(backward=True):
            rows = slice(start, start + n)
            dp = torch.mul(d_h[:n] + d_y[rows], slope[rows], out=d_pre[rows])
            torch.mm(dp, w_hh, out=d_h[:n])
        run.d_in = d_pre
        return [(inp, d_pre), (run.saved["h"], d_pre)]


_CELLS: Dict[str, Any] = {"LSTM": _LSTM, "GRU": _GRU, "RNN_TANH": _RNN, "RNN_RELU": _RNN}
