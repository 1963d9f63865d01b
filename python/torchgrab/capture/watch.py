"""``GraBSampler.watch(model)``: rows for the sampler from the hooks of an ordinary ``loss.backward()``.

Each watched layer keeps a small projection of its input from the forward pass and, when its output's
gradient arrives in the backward pass, adds its block of the step's [B, K] rows (see
:mod:`torchgrab.capture.layers`). The rows of a step are handed to the sampler when the next step
begins (the model's next forward), when the sampler starts an epoch or is checkpointed, or on
``flush()``: one point that sees every backward of a step whatever the loop does (gradient
accumulation, checkpointed segments recomputed inside the backward, layers whose output gets no
gradient). Rows on a GPU travel to the host asynchronously; they are fed once their copy is done.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections import Counter
from typing import Any, Callable, Dict, Iterable, Iterator, List, NoReturn, Optional, Set, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import unserializable_hook

from torchgrab._autocast import in_full_precision
from torchgrab.capture import attention as attn
from torchgrab.capture import layers
from torchgrab.capture._compat import _TOP_HOOKS, check_watch_torch, top_saved_tensor_hooks, tree_leaves
from torchgrab.capture.audit import OutsideUses
from torchgrab.capture.defaults import DEFAULT_BUDGET, DEFAULT_SKETCH
from torchgrab.capture.direct import BroadcastUses, DirectParamSketch, per_example, pulled_back
from torchgrab.capture.eager import eager, module_hook
from torchgrab.capture.feed import RowFeeder
from torchgrab.capture.flatten import flattened_batch
from torchgrab.capture.inner import InnerCalls, has_inner_function, replaced_forward, same_as_kind
from torchgrab.capture.layers import (
    EmbeddingBagSketch,
    EmbeddingSketch,
    FeatureNormSketch,
    FunctionalSketch,
    HeldInput,
    LayerSketch,
    LinearSketch,
    SharedEmbeddingSketch,
    TiedLinearSketch,
    chunked,
    groupable,
)
from torchgrab.capture.parametrized import ParametrizedSketch, is_parametrized, layer_parameters
from torchgrab.capture.plan import LayerPlan, leave_out
from torchgrab.capture.projection import stacked_t
from torchgrab.capture.recurrent import RecurrentSketch, install_stacked
from torchgrab.capture.shared import SharedCall, made_from_parameters
from torchgrab.errors import (
    NonFiniteGradientError,
    ShapeError,
    UnsupportedInputError,
    UnsupportedModelError,
)
from torchgrab.ondevice import Factored

# Whether the sublayers of a module holding parameters of no layer run without its TorchFunctionMode (see
# WatchHandle.__init__). False only to measure what that saves (benchmarks/watch_vit.py).
_SUBLAYERS_WITHOUT_MODE = True
# The sketches that take a layer's input [B, T, ...] as a sequence of T per example, as they take flattened
# rows once regrouped (capture/flatten.py).
_SEQUENCE_SKETCHES = (LinearSketch, FeatureNormSketch, EmbeddingSketch, SharedEmbeddingSketch, TiedLinearSketch)


# The handle watching each model (by the module its hooks are on): one at a time, see WatchHandle._replace.
_WATCHED: "weakref.WeakKeyDictionary[nn.Module, WatchHandle]" = weakref.WeakKeyDictionary()


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _in_compiled_autograd() -> bool:
    """Whether this backward is run by compiled autograd (never when its module was not imported)."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    region = getattr(ca, "in_compiled_autograd_region", False)  # a flag; a function in some releases
    return bool(region() if callable(region) else region)


def _when_backward_completes(step: _Step) -> None:
    """Mark the step finished when the backward running now completes: autograd runs a queued callback
    only when the whole backward succeeds, so a step left unfinished at the next forward had its
    backward raise (_Step.failed)."""
    if _in_backward() and not _in_compiled_autograd():
        torch.autograd.Variable._execution_engine.queue_callback(step.finish)
    else:  # (no callback to queue, or compiled autograd's own: a failed backward is not told apart)
        step.finished = True


_TOP_SAVED_TENSOR_HOOKS = _TOP_HOOKS  # (None where this torch cannot say which hooks are on; tests read it)


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (non-reentrant checkpointing, offloading) take what autograd saves; True
    where this torch cannot say."""
    return top_saved_tensor_hooks() is not None


def _in_transform() -> bool:
    # torch.func (vmap, grad) running the model: per-example gradients computed by other means.
    return torch._C._are_functorch_transforms_active()


class _PendingInput:
    """A Linear layer's input A, recorded in the forward, whose projection A P_in^T is made at the end of
    the model's forward (or, for a layer called outside it, at the step's first gradient), in one batched
    product with the other layers' of its shape: on a GPU a watched step costs the ops it dispatches, and
    a transformer has dozens of such layers. Autograd holds A until then anyway (the layer's weight
    gradient needs it), so holding it costs no memory; where autograd does not (checkpointing, saved-tensor
    hooks) the input is projected at the layer's call instead."""

    __slots__ = ("sk", "x", "version", "value")

    def __init__(self, sk: LinearSketch, x: torch.Tensor) -> None:
        self.sk = sk
        self.x: Optional[torch.Tensor] = x.detach()
        self.version = x._version
        self.value: Any = None


class _Step:
    """What one training step (a forward and its backward) has gathered so far."""

    __slots__ = (
        "blocks",
        "batch",
        "forwards",
        "scale",
        "factor",
        "grads",
        "noted",
        "deferred",
        "held",
        "pending",
        "slot",
        "outer",
        "written",
        "finite",
        "ghost",
        "direct",
        "recorded",
        "abandoned",
        "running",
        "finished",
    )

    def __init__(self) -> None:
        # Each layer's [B, w] pieces by column offset; concatenated once when the step ends (fewer
        # small ops than adding each into a zeroed [B, K] buffer: on a CPU the dispatch of a torch op
        # costs as much as a small layer's sketch).
        self.blocks: Dict[int, List[torch.Tensor]] = {}
        self.batch: Optional[int] = None
        self.forwards: Dict[nn.Module, int] = {}  # calls recorded outside the backward, per module
        self.scale: Optional[torch.Tensor] = None  # the GradScaler's scale during this backward
        # What the loss was multiplied by, over loss_reduction's rule, when this backward ran (set by an
        # integration whose framework rescales the loss from step to step; see WatchHandle.loss_factor).
        self.factor: Any = None  # a float, or a 0-dim tensor on the rows' device
        self.grads = 0  # hooks that have fired
        self.noted: Optional[int] = None  # rows of a step that needs no sketch (an ordering without gradients)
        # Hook calls whose sketch waits for the end of the backward, to be formed in groups of equally
        # shaped layers, by LayerSketch.group_key: (sketch, module, saved input, output gradient), and the
        # elements of the output gradients held so (at most GROUP_STACK_MAX a key: _defer).
        self.deferred: Dict[Any, List[Tuple[LayerSketch, nn.Module, Any, torch.Tensor]]] = {}
        self.held: Dict[Any, int] = {}
        # Linear layers' inputs recorded in the forward whose projections wait for the forward's end (or
        # the backward's first gradient), to be made in groups (WatchHandle._project_inputs).
        self.pending: List[_PendingInput] = []
        # The step's slot in the CPU block buffer once a layer has written its rows there directly
        # (LayerSketch.rows_into), as a NumPy view (the kernels' output, sliced cheaply), and the
        # offsets of the blocks written so (already scaled).
        self.slot: Optional[np.ndarray] = None
        self.outer = False  # the slot holds the factors of the rows (WatchHandle._outer), not the rows
        self.written: Set[int] = set()
        self.finite = True  # every direct write said its values were finite
        # A ghost layer's calls this step: (output gradient, a copy of the input).
        self.ghost: Dict[LayerSketch, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        # Parameters of no layer whose per-example parts are not checked yet (capture/direct.py): the sum
        # of the parts seen in this backward, per parameter, for the check at its gradient's hook.
        self.direct: Dict[LayerSketch, torch.Tensor] = {}
        # Layers with a call recorded this step, forward or recomputed (kept while WatchHandle._audit runs).
        self.recorded: Set[nn.Module] = set()
        # Left by a training forward of another batch size before any backward reached it (_on_step_begins):
        # a gradient that reaches its calls after all is refused (_on_grad).
        self.abandoned = False
        # A training forward of the model has begun and not ended: still so at the next forward, it raised.
        self.running = False
        # The backward that reached the step's first hook has completed (a callback queued there, which
        # autograd runs only when the whole backward succeeds): not so at the next forward, it raised.
        self.finished = False

    def finish(self) -> None:
        self.finished = True

    def reached(self) -> bool:
        """A backward has reached the step's hooks (rows, or the count of an ordering without gradients)."""
        return self.grads > 0 or self.noted is not None

    def complete(self) -> bool:
        """A backward reached the step and completed."""
        return self.finished and self.reached()

    def failed(self) -> bool:
        """Its forward or its backward raised, and the loop went on (WatchHandle._drop)."""
        return self.running or (self.reached() and not self.finished)

    def add(self, offset: int, pieces: List[torch.Tensor]) -> None:
        have = self.blocks.get(offset)
        # A layer called several times in one forward: its calls' gradients add up (out of place: a
        # piece may be a view of autograd's own gradient tensor).
        self.blocks[offset] = pieces if have is None else [a + b for a, b in zip(have, pieces)]


class WatchHandle:
    """The hooks of :meth:`torchgrab.GraBSampler.watch` on one model, feeding one sampler.

    Also a context manager: leaving the ``with`` block feeds what is gathered and detaches the hooks
    (after an exception, what is gathered is dropped instead).

    Attributes:
        width: K, the number of columns of each example's row.
        layers: ``(name, kind, columns)`` of every block of the rows, in column order.
        skipped_steps: steps whose rows were not finite (a ``GradScaler`` overflow); their examples got
            no row and count as unseen.
        dropped_steps: steps whose forward or backward raised and that the loop went past (a batch
            skipped after running out of memory); their examples got no row and count as unseen.
    """

    def __init__(
        self,
        sampler: Any,
        model: nn.Module,
        *,
        sketch: Any = DEFAULT_SKETCH,
        per_layer: Optional[Dict[str, Any]] = None,
        budget: Optional[float] = DEFAULT_BUDGET,
        loss_reduction: str = "mean",
        granularity: str = "example",
        exclude: Iterable[str] = (),
        scaler: Optional[Any] = None,
        seed: Optional[int] = None,
        non_blocking: Optional[bool] = None,
        all_ranks: bool = False,
        batch_first: bool = True,
    ) -> None:
        check_watch_torch()
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(f"watch() takes an nn.Module, got {type(model).__name__}")
        if not isinstance(batch_first, bool):
            raise UnsupportedInputError(f"batch_first must be True or False, got {batch_first!r}")
        self.batch_first = batch_first
        ghost_all = isinstance(sketch, str) and sketch == "ghost"
        if (
            sketch is not None
            and not ghost_all
            and (not isinstance(sketch, (int, np.integer)) or isinstance(sketch, bool) or sketch < 1)
        ):
            raise UnsupportedInputError(
                f"sketch must be a positive integer (the per-factor size k), None or 'ghost', got {sketch!r}"
            )
        if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget <= 0):
            raise UnsupportedInputError(f"budget must be a positive number or None, got {budget!r}")
        if loss_reduction not in ("mean", "sum"):
            raise UnsupportedInputError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if granularity not in ("example", "batch"):
            raise UnsupportedInputError(f"granularity must be 'example' or 'batch', got {granularity!r}")
        if isinstance(exclude, str):
            exclude = [exclude]
        exclude = list(exclude)
        if seed is None:
            seed = sampler.seed
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UnsupportedInputError(f"seed must be a non-negative integer, got {seed!r}")
        if scaler is not None and not hasattr(scaler, "_scale"):
            raise UnsupportedInputError("scaler must be a torch.amp.GradScaler")
        self.sampler = sampler
        self.model = model
        # sketch="ghost": Linear layers on [B, in] inputs exact from their factors, every other layer exact.
        self.k = None if sketch is None or ghost_all else int(sketch)
        self.seed = int(seed)
        self.loss_reduction = loss_reduction
        self.granularity = granularity
        self.scaler = scaler
        if non_blocking is not None and not isinstance(non_blocking, bool):
            raise UnsupportedInputError(f"non_blocking must be True, False or None, got {non_blocking!r}")
        if not isinstance(all_ranks, bool):
            raise UnsupportedInputError(f"all_ranks must be True or False, got {all_ranks!r}")
        if all_ranks and (granularity != "example" or sampler.unit_size != 1):
            raise UnsupportedInputError("all_ranks=True supports granularity='example' with unit_size=1")
        # Set by integrations (not public): a callable giving, while a backward runs, the number the
        # framework divided that step's loss by beyond loss_reduction's rule (gradient accumulation
        # steps, or the token count of num_items_in_batch), so rows stay each example's own gradient
        # when it changes from step to step.
        self.loss_factor: Optional[Any] = None
        exchange = None  # all_ranks=True: every rank's rows to every replica of the sampler (the feeder's)
        if all_ranks:
            from torchgrab.integrations._ranks import RowExchange

            exchange = RowExchange()
        inner = _unwrapped(model)
        plan = LayerPlan(
            inner,
            k=self.k,
            ghost_all=ghost_all,
            per_layer=dict(per_layer or {}),
            budget=budget,
            granularity=granularity,
            exclude=exclude,
            seed=self.seed,
            batch_first=batch_first,
        )
        self._sketches = plan.sketches
        # Modules holding watched parameters of no layer -> {id(parameter): (its sketch, the parameter)}.
        self._direct = plan.direct
        self._left_out = plan.left_out  # layers with no columns under the budget (not hooked)
        self._params = plan.params
        # Supported nn.MultiheadAttention -> its packed in-projection, recorded by the attention's forward.
        self._attention = plan.attention
        offset = 0
        for sk in self._sketches.values():
            sk.offset = offset
            offset += sk.width
        # A layer no other layer can be grouped with is sketched as its gradient arrives (no deferral).
        keys = {sk: sk.static_key() for sk in self._sketches.values()}
        siblings = Counter(k for k in keys.values() if k is not None)
        self._alone = {sk: k is None or siblings[k] == 1 for sk, k in keys.items()}
        # Linear layers whose inputs are projected together (_PendingInput): a dense Gaussian input side
        # shared in shape with another layer's.
        sides = {
            sk: (sk.p_in.n, sk.p_in.k)
            for sk in self._sketches.values()
            if isinstance(sk, LinearSketch)
            and sk.train_w
            and not sk.ghost
            and not sk.p_in.identity
            and not sk.p_in.count
            and type(sk).save is LinearSketch.save
        }
        shared = Counter(sides.values())
        self._grouped_inputs = {sk for sk, side in sides.items() if shared[side] > 1}
        self._input_stacks: Dict[Any, torch.Tensor] = {}  # stacked P_in^T of groups of inputs
        # Lone Linear layers with a count-sketched input (MNIST's 784 pixels): the input is held to the
        # backward, where one kernel sketches it and writes the rows (layers.HeldInput).
        self._held_inputs = {
            sk
            for sk in self._sketches.values()
            if type(sk) is LinearSketch and sk.train_w and sk.p_in.count and not sk.ghost and self._alone[sk]
        }
        # A model whose whole row is one Linear layer's (logistic regression, a linear probe): its steps
        # hand the sampler the rows' factors, [B, k_out + k_in] (MNIST: 112 numbers an example against
        # 1,030), and the sampler's kernel forms the rows a few at a time where it balances them
        # (LinearSketch.factors_into, _segments.OuterRows). Set below, once the row's columns are known.
        self._outer: Optional[LinearSketch] = None
        self._outer_kind: Tuple[int, bool] = (0, False)  # its factors' (p, bias) as OuterRows takes them
        self._param_offsets = []
        for _, _, fs in self._params:
            self._param_offsets.append(offset)
            offset += fs.k
        self._row_width = offset  # the columns of the rows; ghost layers' weights are balanced beside them
        self._ghosts = [sk for sk in self._sketches.values() if sk.ghost_width]
        self.width = offset + sum(sk.ghost_width for sk in self._ghosts)
        if self._ghosts:
            self._check_ghost_sampler(sampler, all_ranks)
        # (offset, width) of every block in column order: how a step's pieces are laid out.
        self._blocks = [(sk.offset, sk.width) for sk in self._sketches.values() if sk.width]
        self._blocks += [(o, fs.k) for o, (_, _, fs) in zip(self._param_offsets, self._params)]
        dim = sampler._native.dim
        if sampler.balances and dim is not None and dim != self.width:
            raise ShapeError(
                f"this sampler balances rows of dimension d = {dim} (stepped already, or loaded from a "
                f"checkpoint), but watch() with these settings gives K = {self.width}: use the sketch, "
                "per_layer, budget, exclude and granularity of the run that made that state"
            )
        for a in self._attention:
            if attn.installed_by(a) not in (None, _WATCHED.get(inner)):
                raise UnsupportedModelError(
                    f"watch(): the nn.MultiheadAttention {_module_name(inner, a)!r} already runs another forward "
                    "(it is watched for another model, or patched); exclude= it"
                )
        self._step = _Step()
        self._recording = False
        # (sketch, input shape, batch, input's node) -> rows per example, for layers given the batch
        # flattened into their rows (capture/flatten.py), as read at their first such call.
        self._flat: Dict[Tuple[Any, ...], int] = {}
        # Where the rows go: a block buffer of consecutive steps, fed to the sampler every few steps.
        self._feeder = RowFeeder(sampler, self._row_width, granularity, non_blocking, scaler)
        self._feeder.exchange = exchange
        only = list(self._sketches.values())
        if (
            len(only) == 1
            and type(only[0]) is LinearSketch
            and only[0].train_w
            and not only[0].ghost
            and only[0].width == self.width  # no parameters of no layer, no ghost columns beside it
            and not self._direct
            and not self._attention
            and exchange is None  # rows sent to other ranks are rows
        ):
            self._outer = only[0]  # type: ignore[assignment]
            self._outer_kind = (only[0].p_out.k, only[0].train_b)  # type: ignore[attr-defined]
        self._hooks: List[Any] = [model.register_forward_pre_hook(module_hook(self._on_step_begins), with_kwargs=True)]
        # A layer's call recorded from its (args, output), by the model's layout.
        self._record_call = self._on_forward if batch_first else self._on_forward_seq_first
        on_forward = module_hook(self._record_call)
        by_attention = {m for a, proj in self._attention.items() for m in (proj, a.out_proj)}
        on_functional = module_hook(self._on_forward_functional)
        # Layers whose class replaces its kind's forward -> that kind (capture/inner.py); how each turned out
        # to compute it, once its first recorded forward has run: "calls" (the kind's function, recorded call
        # by call) or "kind" (the kind's forward in another form, recorded as the layer's input and output).
        self._replaced: Dict[nn.Module, type] = {}
        self._verdict: Dict[nn.Module, str] = {}
        # The TorchFunctionModes entered by a module's forward pre-hook (None where it entered none), left by
        # its forward hook: InnerCalls for those layers, BroadcastUses for modules holding parameters of no layer.
        self._modes: Dict[nn.Module, List[Optional[Any]]] = {}
        for module, sk in self._sketches.items():
            kind = replaced_forward(module)
            if isinstance(sk, DirectParamSketch):  # recorded by the forward of the module holding it
                continue
            if isinstance(sk, FunctionalSketch):  # sees the call's keyword arguments too
                self._hooks.append(module.register_forward_hook(on_functional, with_kwargs=True))
            elif module in by_attention:  # the attention's own forward records these
                continue
            elif isinstance(sk, EmbeddingBagSketch):  # its bags may come as keyword arguments
                self._hooks.append(module.register_forward_hook(module_hook(self._on_bags), with_kwargs=True))
            elif isinstance(sk, RecurrentSketch):  # its initial state may come as a keyword argument
                self._hooks.append(module.register_forward_hook(module_hook(self._on_recurrent), with_kwargs=True))
            elif kind is not None:
                self._replaced[module] = kind
                self._hooks.append(module.register_forward_pre_hook(module_hook(self._on_replaced_begins)))
                self._hooks.append(module.register_forward_hook(module_hook(self._on_replaced), always_call=True))
            else:
                self._hooks.append(module.register_forward_hook(on_forward))
        for module in inner.modules():
            if isinstance(module, nn.EmbeddingBag) and module not in self._sketches:
                # Left out (exclude=, mode='max'), it still says how many examples its 1-D input holds.
                hook = module_hook(self._on_bags_left_out)
                self._hooks.append(module.register_forward_hook(hook, with_kwargs=True))
        for i, (_, p, _) in enumerate(self._params):
            self._hooks.append(p.register_hook(unserializable_hook(self._param_hook(i))))
        for holder, params in self._direct.items():
            self._hooks.append(holder.register_forward_pre_hook(module_hook(self._on_direct_begins)))
            self._hooks.append(holder.register_forward_hook(module_hook(self._on_direct_ends), always_call=True))
            for dsk, t in params.values():
                self._hooks.append(t.register_hook(unserializable_hook(self._direct_check(dsk))))
        self._unchecked = {dsk for params in self._direct.values() for dsk, _ in params.values()}
        # A holder's forward may call a watched Linear layer as F.linear(x, layer.weight, bias) (timm's BEiT
        # and EVA attention, with a bias assembled from parameters of no layer): recorded as the layer's call.
        self._linear_weights = {
            id(m.weight): m for m in self._sketches if isinstance(m, nn.Linear) and not is_parametrized(m)
        }
        self._linear_out: Optional[Callable[[], Optional[torch.Tensor]]] = None  # the last such call's output
        # A holder's mode sees every op of its forward, its sublayers' too: each op under a mode is a Python
        # call, and a timm ViT holds its class token in the model itself (benchmarks/watch_vit.py). The
        # forward of a sublayer not given one of the holder's parameters runs without the mode (a use it
        # makes of one otherwise is caught by _direct_check). Registered after every holder's own hooks, and
        # the pre-hook first: a sublayer that is itself a holder enters and leaves its mode inside.
        self._suspended: Dict[Tuple[nn.Module, nn.Module], List[Optional[Any]]] = {}
        for holder in self._direct if _SUBLAYERS_WITHOUT_MODE else ():
            for child in _called_children(holder):
                pre = module_hook(self._suspend(holder))
                self._hooks.append(child.register_forward_pre_hook(pre, prepend=True, with_kwargs=True))
                self._hooks.append(child.register_forward_hook(module_hook(self._resume(holder)), always_call=True))
        # Until a step has been recorded, a hook on each parameter of a sketched layer: a gradient that
        # reaches it in a step where no forward of its layer was recorded comes from a use of the weight
        # outside the layer (F.linear(x, self.qkv.weight, ...) in a module whose forward is not watched, as
        # timm's EVA attention with its q and v biases left out), which no row would hold. Removed once the
        # first step ends (_end_step).
        self._audit: List[Any] = []
        owners: Dict[int, Tuple[torch.Tensor, List[nn.Module]]] = {}
        for module, sk in self._sketches.items():
            if isinstance(sk, DirectParamSketch):  # checked by _direct_check
                continue
            params = layer_parameters(module)
            for pname in sk.covered(module):
                t = params[pname]
                owners.setdefault(id(t), (t, []))[1].append(module)
        for t, mods in owners.values():
            self._audit.append(t.register_hook(unserializable_hook(self._unrecorded_check(mods))))
        self._hooks += self._audit
        # And at the end of the first recorded forward, a walk of its graph: a layer that is called and
        # whose weight is used besides, in the model's own forward (capture/audit.py). The hook stays (a
        # hook removed after one step would make torch.compile recompile the model); it returns at once.
        canon = {id(t): n for n, t in inner.named_parameters()}
        self._outside: Optional[OutsideUses] = OutsideUses(
            {key: (canon.get(key, "?"), mods) for key, (_, mods) in owners.items()}
        )
        self._hooks.append(model.register_forward_hook(module_hook(self._on_model_output)))
        # Layers called on a tensor the batch shares (capture/shared.py): one mode follows their outputs from
        # the first such call to the end of the model's forward, left first of the model's forward hooks (any
        # mode entered after it inside the forward has been left by then), also when the forward raises.
        self._shared_mode: Optional[BroadcastUses] = None
        self._shared_ids: Dict[nn.Module, int] = {}  # an Embedding seen looked up with shared ids: their dims
        self._checked_shared: set = set()  # layers whose outputs' uses were checked (at a first backward)
        # What a function of a followed output may take besides (held at its value in the replay): the watched
        # layers' parameters, whose calls on a followed tensor are shared calls of their own (DeBERTa's
        # relative embeddings through query_proj and key_proj). And an Embedding's table that a shared call
        # takes as its input, never looked up (DeBERTa's relative embeddings, normalized by a LayerNorm).
        self._held = {id(t): t for m in self._sketches for t in layer_parameters(m).values()}
        self._tables = {id(m.weight): m for m, sk in self._sketches.items() if type(sk) is layers.EmbeddingSketch}
        self._hooks.append(model.register_forward_hook(module_hook(self._leave_shared), always_call=True, prepend=True))
        self.removed = False
        sampler._watchers.append(self)
        self._inner = inner
        self._replace(_WATCHED.get(inner))
        _WATCHED[inner] = self
        # After _replace: a handle watching this model before takes its attention forwards with it.
        record = eager(self._record)
        try:
            for a, proj in self._attention.items():
                self._hooks.append(attn.install(a, self, self._records, record, proj))
            for module, sk in self._sketches.items():
                if isinstance(sk, RecurrentSketch) and getattr(sk, "own_forward", False):
                    self._hooks.append(install_stacked(module, self, self._records))
        except BaseException:
            self.remove()
            raise

    @staticmethod
    def _check_ghost_sampler(sampler: Any, all_ranks: bool) -> None:
        """Ghost layers are balanced by their Gram products on the sampler's on-device path (any device,
        the CPU included), which balances ``grab`` and ``pair`` one step at a time."""
        if not sampler.balances:
            return  # rr, so, ...: nothing is balanced; the hooks only count examples
        why = None
        if not sampler._device_capable:
            why = f"ordering 'grab' or 'pair' without projection or unit_size (this sampler: {sampler.ordering!r})"
        elif sampler.device_path == "never":
            why = "a sampler whose device_path is not 'never'"
        elif sampler._dense_used:
            why = "a sampler that has not balanced dense rows with the Rust kernel this run"
        elif all_ranks:
            why = "one process (all_ranks=True exchanges rows, and ghost layers have none)"
        if why:
            raise UnsupportedInputError(f"watch(): the ghost form (sketch='ghost' or per_layer 'ghost') needs {why}")

    def _replace(self, previous: Optional["WatchHandle"]) -> None:
        """Detach the handle that watched this model before (a notebook cell run again): two handles
        would each feed their sampler every step. Its rows go to its sampler when that is this one;
        another sampler's are dropped, with a warning, since that sampler has been left behind."""
        if previous is None or previous.removed or previous is self:
            return
        if previous.sampler is not self.sampler:
            warnings.warn(
                "watch(): this model was watched for another sampler; that handle is removed and the rows it "
                "had not fed yet are dropped (one handle per model)",
                RuntimeWarning,
                stacklevel=4,
            )
            previous.discard()
        previous.remove()

    # ------------------------------------------------------------------ public
    @property
    def layers(self) -> List[Tuple[str, str, int]]:
        """(module or parameter name, kind, columns) for every block of the rows."""
        out = [(sk.name, _kind(sk), sk.width) for sk in self._sketches.values()]
        out += [
            (sk.name, type(sk).__name__.replace("Sketch", "") + " (weight left out: budget)", 0)
            for sk in self._left_out
        ]
        out += [(n, "batch gradient", fs.k) for n, _, fs in self._params]
        return out

    @property
    def non_blocking(self) -> Optional[bool]:
        """Whether steps are balanced in the background: as asked to watch(), None for when a core is free."""
        return self._feeder.non_blocking

    @property
    def skipped_steps(self) -> int:
        """Steps whose rows were not finite (a ``GradScaler`` overflow): their examples got no row."""
        return self._feeder.skipped_steps

    @property
    def dropped_steps(self) -> int:
        """Steps whose forward or backward raised and that the loop went past: their examples got no row."""
        return self._feeder.dropped_steps

    def project(self, grads: Dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, columns of the rows] (K less the ghost layers' weights, which have no columns): this handle's
        projection applied to given per-example gradients ({parameter name:
        [B, *shape]}, as :func:`torchgrab.gradients.per_example_gradients` returns them). The rows the
        hooks form equal it (in exact arithmetic; BatchNorm's are contributions, not gradients); for
        tests and for measuring what a sketch keeps."""
        inner = _unwrapped(self.model)
        canon = {id(t): n for n, t in inner.named_parameters()}  # a shared parameter's one name
        pieces: List[torch.Tensor] = []
        for module, sk in self._sketches.items():
            own = {p: grads[canon[id(t)]] for p, t in layer_parameters(module).items() if canon[id(t)] in grads}
            pieces += sk.project(module, own)
        for n, _, fs in self._params:
            g = grads[n]
            pieces.append(torch.stack([fs(r.reshape(-1).float()) for r in g]))
        return torch.cat(pieces, dim=1)

    @in_full_precision
    def flush(self) -> None:
        """Hand the rows of the steps so far to the sampler now (waits for rows still on their way from a
        GPU). A step whose backward has not completed stays open: one whose forward or backward raised
        is not fed (a checkpoint taken after the error, Lightning's on exception, keeps its batch to
        train again on resume), and is dropped at the next forward or when the epoch ends."""
        step = self._step
        if step.failed() and not _in_backward():
            self._release_slot(step)  # its partial rows leave the block shipped now: they are never fed
        elif step.reached():
            self._end_step()
        self._feeder.flush()

    def _drop_failed(self) -> None:
        """At an epoch's end: a step whose forward or backward raised is dropped in that epoch (see flush)."""
        if self._step.failed() and not _in_backward():
            self._drop(self._step)

    def _gives_up(self, n: int) -> bool:
        """``sampler.skip(n)`` called by the loop for a batch it gives up on: where the open step is a
        batch of ``n`` examples whose backward has not completed (its forward, its loss or its backward
        raised), that step is dropped instead (True), so the batch is skipped once. Otherwise (False)
        the skip is of a batch never given to the model, after the steps gathered so far."""
        step = self._step
        if step.batch is None or step.complete() or _in_backward():
            return False
        if self._feeder.units_of(1 if self.granularity == "batch" else step.batch) != n:
            return False
        self._drop(step)
        return True

    def remove(self) -> None:
        """Feed what is gathered, then detach every hook; the sampler is then fed by hand again."""
        if self.removed:
            return
        try:
            self.flush()
        finally:
            if self._shared_mode is not None:
                self._leave_shared(self._inner, (), None)
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self.removed = True
            if self in self.sampler._watchers:
                self.sampler._watchers.remove(self)
            if _WATCHED.get(self._inner) is self:
                del _WATCHED[self._inner]

    def discard(self) -> None:
        """Drop what is gathered and not yet fed (the sampler's state was replaced by a load)."""
        self._step = _Step()
        self._feeder.discard()

    def __enter__(self) -> "WatchHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            self.discard()
        self.remove()

    def __repr__(self) -> str:
        return (
            f"WatchHandle(K={self.width}, layers={len(self._sketches)}, params={len(self._params)}, "
            f"sketch={self.k}, granularity={self.granularity!r})"
        )

    # ------------------------------------------------------------------ hooks
    @in_full_precision
    def _on_step_begins(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        if _in_backward() or _in_transform():
            return  # a checkpointed model recomputing its forward; a torch.func transform
        if self._shared_mode is not None:
            # The last forward did not end through the model's own call (a framework's training step that
            # calls its submodules; _begin_batch): the mode following shared calls' outputs is left here.
            self._leave_shared(module, args, None)
        if self._outside is not None:
            self._outside.calls = []  # those of a forward that raised before its end
        if self._step.failed():
            self._drop(self._step)  # a batch the loop skipped after an error (out of memory): no rows
        elif self._step.reached():
            self._end_step()  # the open step's backward has run: this forward begins the next step
        elif self._step.forwards and not self._abandons(args, kwargs, module):
            # The open step has had a forward but no backward yet. A forward in eval mode or under
            # no_grad (validation, pseudo-labels) leaves it alone: its layers are skipped (_record
            # checks grad mode and the model's training mode), and _recording stays on for a reentrant
            # checkpoint's recompute inside the coming backward. A second training forward of the same
            # batch size joins it (siamese and contrastive losses: one backward through two forwards).
            if module.training and torch.is_grad_enabled():
                self._recording = self._step.running = True
            return
        else:
            # Nothing reached the previous step's hooks (an evaluation forward), or its forward was left
            # for one of another batch size (_abandons).
            self._step = _Step()
        if self._feeder.inflight:
            self._feeder.feed(block=False)
        self._recording = module.training and torch.is_grad_enabled()
        if self._recording:
            self._step.batch = _batch_of(args, kwargs, self.batch_first)
            self._step.running = True

    def _begin_batch(self, module: nn.Module, batch: Any) -> None:
        """Begin a step at a batch's start for a framework whose training step may not call the watched
        model itself (Lightning's ``on_train_batch_start``): as the model's forward pre-hook does, with
        no forward running (one that begins joins the step)."""
        self._on_step_begins(module, (batch,), {})
        self._step.running = False

    def _retract_open_step(self) -> None:
        """For a framework whose loop will train the open step's batch again (Lightning resumes a batch that
        failed before its optimizer step, even one whose backward completed): its rows are dropped unfed
        and its examples not counted, so the sampler's state, saved now, hands them out again."""
        self._release_slot(self._step)
        self._step = _Step()

    def _abandons(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], module: nn.Module) -> bool:
        """Whether a forward of the model leaves the open step, which has had a training forward and no
        backward: it is a training forward of another batch size. Joined, its layers' inputs would not
        be the step's examples, and no backward can take per-example rows through both. So the open
        forward's graph was dropped (a loss computed for logging with grad on and the model in training
        mode), and this forward begins the next step; a gradient that reaches the left step's calls after
        all is refused (_on_grad). (A forward that raised is dropped before: _Step.failed.)"""
        if not (module.training and torch.is_grad_enabled()) or self._step.batch is None:
            return False
        b = _batch_of(args, kwargs, self.batch_first)
        if b is None or b == self._step.batch:
            return False
        self._step.abandoned = True
        return True

    def _on_model_output(self, module: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
        """Forward hook of the watched model: at its first recorded forward, refuse a watched layer's
        parameter that the forward also uses outside that layer's calls (capture/audit.py). And the end
        of the forward that held Linear inputs for a grouped projection: they are projected now."""
        self._step.running = False
        if self._step.pending and not _in_backward():
            self._project_inputs(self._step)
        audit = self._outside
        if audit is None or not audit.calls or not self._records():
            return
        found = audit.find(out)
        audit.calls = []
        if found is None:
            self._outside = None  # checked: no other forward is walked
            return
        pname, mods, node, called = found
        layers = " and ".join(repr(self._sketches[m].name) for m in mods)
        how = "is also used outside the layer's calls" if called else "is used, but the layer was never called"
        self._step, self._recording = _Step(), False  # this forward will have no backward
        raise UnsupportedModelError(
            f"watch(): the parameter {pname!r} of {layers} {how} in the model's forward (autograd node {node}), "
            "so per-example rows would miss that part of its gradient. A tied output projection written as "
            "F.linear(h, embedding.weight) is such a use (an nn.Linear whose weight is the embedding's is taken "
            "whole), and so is F.linear(x, self.qkv.weight, ...) in a module that holds no parameter of no layer "
            f"(timm's EVA attention with its q and v biases left out). {leave_out(self._sketches[mods[0]].name)}"
        )

    def _records(self) -> bool:
        """Whether a layer's call now is recorded: a step is open, grad is enabled and the watched model is
        in training mode. The model's mode, not the layer's: a layer put in eval mode in a training model
        (BatchNorm with frozen statistics and trainable affine parameters) gets gradients, and rows, like
        any other; a forward of the whole model in eval mode (validation, also with grad) is no step."""
        return self._recording and self.model.training and torch.is_grad_enabled() and not _in_transform()

    def _on_forward(self, module: nn.Module, args: Tuple[Any, ...], out: Any) -> Any:
        if not args or (self._linear_out is not None and out is self._linear_out()):
            # (the output of the F.linear call a holder's mode recorded inside this layer's own forward: a
            # mode left on there, under a mode of the user's, records it once)
            return None
        return self._record(module, args[0], out)

    def _linear_call(self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> Any:
        """Record ``F.linear(x, layer.weight, ...)`` made by a holder's forward as a call of the layer."""
        replaced = self._record_call(layer, (x,), out)
        self._linear_out = weakref.ref(out if replaced is None else replaced)
        return replaced

    def _on_forward_functional(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], out: Any) -> Any:
        """``_on_forward`` for a layer sketched by torch.func (FunctionalSketch), which replays the call
        on each example: only a call with one tensor and nothing else can be replayed so."""
        if self._records():
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
                name = self._sketches[module].name
                self._step, self._recording = _Step(), False  # this forward will have no backward
                raise UnsupportedModelError(
                    f"watch(): {name!r} ({type(module).__name__}) is sketched by replaying its forward on each "
                    f"example, which needs one tensor argument; it got {len(args)} positional argument(s) and "
                    f"keywords {sorted(kwargs)}. exclude= it"
                )
        return self._on_forward(module, args, out)

    @in_full_precision
    def _on_bags(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], out: Any) -> Any:
        """Forward hook of an nn.EmbeddingBag: the vocabulary side of its bags' rows, [B, k_v], from a [B, L]
        input or a 1-D one with offsets. With offsets the model's first input is the bags' tokens end to end
        (the text classification tutorials' ``model(text, offsets)``), so a step whose batch was read from
        it and that no layer has recorded yet takes its batch from the offsets instead."""
        if not self._records() or not isinstance(out, torch.Tensor) or not out.requires_grad:
            return None
        if self.sampler.balances:
            with torch.no_grad():
                bags = self._sketches[module].bags(module, args, kwargs)  # type: ignore[attr-defined]
        else:
            bags = out.detach()  # (an ordering without rows counts the examples: the number of bags)
        self._batch_of_bags(args, kwargs, out)
        return self._record(module, bags, out, saved=bags)

    def _on_recurrent(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], out: Any) -> Any:
        """Forward hook of an nn.LSTM, nn.GRU or nn.RNN, or of their cells (capture/recurrent.py): its input and state
        are kept, and its outputs are returned through a tap whose backward has all their gradients at once
        (a loss may use the output, the final states, or both)."""
        if not self._records():
            return None
        inp = args[0] if args else kwargs.get("input")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        output = out[0] if isinstance(out, tuple) else out  # a layer's (output, state), a cell's h' or (h', c')
        data = output.data if isinstance(output, PackedSequence) else output
        if not isinstance(data, torch.Tensor) or not data.requires_grad:
            return None
        sk = self._sketches[module]
        saved = sk.save(module, (inp, hx))
        hooks: List[Tuple[Callable[..., None], Tuple[Any, ...]]] = []

        def on_grads(grads: Tuple[Optional[torch.Tensor], ...]) -> None:
            # The sketch reads the layer's gradients from what it saved; the hook's own argument only
            # carries the batch ([B, 0]), as a layer's output gradient does.
            saved.grads = grads
            for fn, fn_args in hooks:
                fn(*fn_args, batch)

        new_out, b, tapped = sk.tap(module, out, on_grads)
        batch = tapped.new_zeros(b, 0)
        # The input batch first where it is a tensor (the graph audit reads its history); packed, its data.
        x = sk.batch_first(module, inp)
        self._record(module, x, tapped, saved=saved, on_grad=lambda fn, *a: hooks.append((fn, a)), lead=b)
        return new_out

    def _on_bags_left_out(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], out: Any) -> None:
        """Forward hook of an nn.EmbeddingBag that is not sketched: its bags are the step's examples too."""
        if self._records() and isinstance(out, torch.Tensor):
            self._batch_of_bags(args, kwargs, out)

    def _batch_of_bags(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], out: torch.Tensor) -> None:
        """An EmbeddingBag called with its bags' tokens end to end (a 1-D input), where the step's batch was
        read from those tokens and no layer has recorded a call yet: the batch is its number of bags."""
        step = self._step
        tokens = args[0] if args else kwargs.get("input")
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 1 and not step.forwards:
            if step.batch == tokens.shape[0] and out.dim() > 0:
                step.batch = int(out.shape[0])

    def _on_direct_begins(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        """Forward pre-hook of a module holding watched parameters of no layer: watch the operations
        that take them (capture/direct.py) while its forward runs."""
        mode = None
        step = self._step
        if self._records():
            recompute = _in_backward() and step.forwards.get(module, 0)  # a checkpointed call, seen already
            if self.sampler.balances and not recompute:
                if not _in_backward():
                    step.forwards[module] = step.forwards.get(module, 0) + 1
                for dsk, _ in self._direct[module].values():
                    if dsk in self._unchecked and dsk not in step.direct:
                        step.direct[dsk] = torch.zeros(dsk.shape)
                mode = BroadcastUses(
                    self._direct[module],
                    self._direct_batch,
                    self._direct_rows,
                    lambda sk, t, shape, m, make: self._direct_record(step, sk, t, shape, m, make),
                    self._direct_refuse,
                    self._linear_weights,
                    self._linear_call,
                )
                mode.__enter__()
        self._modes.setdefault(module, []).append(mode)

    def _on_direct_ends(self, module: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
        self._leave_mode(module)

    def _leave_mode(self, module: nn.Module) -> Optional[Any]:
        """Leave the TorchFunctionMode the module's forward pre-hook entered (if it entered one); return it."""
        stack = self._modes.get(module)
        mode = stack.pop() if stack else None
        if mode is not None:
            mode.__exit__(None, None, None)
        return mode

    def _suspend(self, holder: nn.Module) -> Callable[..., None]:
        def pre(child: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
            stack = self._modes.get(holder)
            mode = stack[-1] if stack else None
            if mode is not None and (_top_mode() is not mode or mode.takes(args, kwargs) or mode.holds(child)):
                # another mode above it, or the sublayer is given a parameter or makes a tensor from its own
                # (plan.makes_from_own): left as it is
                mode = None
            if mode is not None:
                mode.__exit__(None, None, None)
            self._suspended.setdefault((holder, child), []).append(mode)

        return pre

    def _resume(self, holder: nn.Module) -> Callable[..., None]:
        def post(child: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
            stack = self._suspended.get((holder, child))
            mode = stack.pop() if stack else None
            if mode is not None:
                mode.__enter__()

        return post

    def _direct_batch(self, b: int) -> int:
        if self._step.batch is None:
            self._step.batch = b
        return self._step.batch

    def _direct_rows(self, x: torch.Tensor, b: int) -> Optional[int]:
        """m when the rows of ``x``, an operand a parameter of no layer is broadcast against, are b runs of m
        rows, one per example (capture/flatten.py); remembered per shape, batch and making node, as for a
        layer's input."""
        if not self.batch_first or x.grad_fn is None:
            return None
        return self._read_rows("direct", x, b)

    def _read_rows(self, owner: Any, x: torch.Tensor, b: int) -> Optional[int]:
        """flattened_batch(x, b), read at the first call of each owner (a layer's sketch, or "direct"), input
        shape, batch and making node, then remembered (the reading walks the history in Python; a forward
        does not change its layout from one step to the next). A failed reading is read again next time."""
        key = (owner, tuple(x.shape), b, x.grad_fn.name())
        m = self._flat.get(key)
        if m is None:
            m = flattened_batch(x, b)
            if m is not None:
                self._flat[key] = m
        return m

    def _direct_record(
        self,
        step: _Step,
        sk: DirectParamSketch,
        t: torch.Tensor,
        shape: Tuple[int, ...],
        m: int,
        make: Optional[Callable[[torch.Tensor], torch.Tensor]],
    ) -> None:
        def on_grad(g: torch.Tensor) -> None:
            part = per_example(g, shape, m)
            if make is None:
                part = part.reshape(part.shape[0], *sk.shape)
            else:  # made from the parameter by a function of it (a gather, a cat): pulled back through it
                try:
                    part = pulled_back(make, sk.slot.weight, part, sk.name)
                except UnsupportedModelError as e:  # torch.func inside saved-tensor hooks (torch < 2.8)
                    self._refuse(step, str(e))
            if step is self._step and sk in step.direct:
                step.direct[sk] = step.direct[sk].to(part.device, part.dtype) + part.detach().sum(0)
            self._on_grad(step, sk, sk.slot, None, part)

        _on_output_grad(t, on_grad)

    def _direct_refuse(self, sk: DirectParamSketch, what: str) -> None:
        self._step, self._recording = _Step(), False  # this forward will have no backward
        raise UnsupportedModelError(
            f"watch(): {sk.name!r} belongs to no layer; its per-example gradient is taken where the forward "
            "combines it, or what a function of the parameters alone makes of it, with the batch's rows "
            f"(expand, +, *, @, einsum, an attention's mask), and {what} takes it otherwise. "
            f"{leave_out(sk.name, 'parameter', 'it')}"
        )

    def _direct_check(self, sk: DirectParamSketch) -> Callable[[torch.Tensor], None]:
        """A hook on a parameter of no layer: at its first recorded backward, the per-example parts seen
        must add up to the gradient autograd gives it (nothing used it where watch() did not look)."""

        def hook(total: torch.Tensor) -> None:
            seen = self._step.direct.pop(sk, None)
            if seen is None or sk not in self._unchecked:
                return
            total = total.detach().double()
            seen = seen.to(total.device, total.dtype).reshape(total.shape)
            scale = float(total.abs().max())
            if not torch.allclose(seen, total, rtol=1e-3, atol=1e-4 * scale):
                self._step, self._recording = _Step(), False
                raise UnsupportedModelError(
                    f"watch(): {sk.name!r} belongs to no layer, and its gradient is not the sum of the per-example "
                    "parts watch() saw where the forward of the module holding it combines it with the batch: "
                    "something else uses it (another module's forward, or an operation watch() does not follow). "
                    "exclude= it"
                )
            self._unchecked.discard(sk)

        return hook

    def _unrecorded_check(self, modules: List[nn.Module]) -> Callable[[torch.Tensor], None]:
        """A hook on a parameter of the layers ``modules`` (two for a tied weight) for the first recorded
        step: refuse its gradient when none of them had a forward recorded in that step."""

        def hook(g: torch.Tensor) -> None:
            step = self._step
            if not self._recording or _in_transform() or any(m in step.recorded for m in modules):
                return
            names = [self._sketches[m].name for m in modules]
            self._step, self._recording = _Step(), False  # this backward's rows are not fed
            raise UnsupportedModelError(
                f"watch(): a parameter of {names[0] if len(names) == 1 else names} got a gradient in a step where "
                "the layer was never called: the model uses its weight outside the layer's forward (as timm's "
                "EVA attention, its q and v biases left out, passes self.qkv.weight to F.linear), so "
                f"per-example rows would miss that gradient. {leave_out(names[0])}"
            )

        return hook

    def _on_replaced_begins(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        """Forward pre-hook of a layer whose class replaces its kind's forward: watch the calls its forward
        makes (capture/inner.py), unless it is known to compute its kind's function in another form."""
        mode = None
        looks = self._verdict.get(module) != "kind" and has_inner_function(module)
        if looks and self._records():
            mode = InnerCalls(module, lambda m, x, out: self._record_call(m, (x,), out))
            mode.__enter__()
        self._modes.setdefault(module, []).append(mode)

    def _on_replaced(self, module: nn.Module, args: Tuple[Any, ...], out: Any) -> Any:
        """Forward hook (always called) of a layer whose class replaces its kind's forward: end the watch of
        its calls; at its first recorded forward, find how it computes its kind's function, or refuse it."""
        mode = self._leave_mode(module)
        if out is None or not self._records():
            return None  # the forward raised (this hook runs anyway), or it is not recorded
        verdict = self._verdict.get(module)
        if verdict == "kind":
            return self._record_call(module, args, out)
        if mode is not None and mode.calls and mode.other is None:
            self._verdict[module] = "calls"  # recorded call by call, as they ran
            return None
        kind = self._replaced[module]
        if verdict is None and (mode is None or not mode.calls) and len(args) == 1:
            if same_as_kind(module, kind, args[0], out):
                self._verdict[module] = "kind"
                return self._record_call(module, args, out)
        name = self._sketches[module].name
        self._step, self._recording = _Step(), False  # this forward will have no backward
        fn = {
            nn.Linear: "F.linear",
            nn.Embedding: "F.embedding",
            nn.modules.batchnorm._BatchNorm: "F.batch_norm",
            nn.LayerNorm: "F.layer_norm",
            nn.GroupNorm: "F.group_norm",
        }.get(kind, f"{kind.__name__}'s function")
        if mode is not None and mode.other is not None:
            found = f"it gives its parameters to {mode.other}"
        elif mode is not None and not mode.calls:
            found = f"it makes no {fn} call with its own {'table' if kind is nn.Embedding else 'weight'}"
        else:
            found = f"its output is not {kind.__name__}'s forward on its input"
        raise UnsupportedModelError(
            f"watch(): {name!r} is a {type(module).__name__}, whose forward replaces {kind.__name__}'s, and {found}: "
            f"the rows of a {kind.__name__} would not be its gradient's. exclude= it"
        )

    def _on_forward_seq_first(self, module: nn.Module, args: Tuple[Any, ...], out: Any) -> Any:
        """``_on_forward`` for a model whose sequences are [T, B, ...] (``watch(batch_first=False)``): a
        Linear or norm layer's input of 3 or more dimensions, and an embedding's ids of 2 or more, have the
        batch in dimension 1 (fewer dimensions: pooled, batch first)."""
        if not args:
            return None
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() < (2 if isinstance(module, nn.Embedding) else 3):
            return self._record(module, x, out)
        return self._record(module, x.transpose(0, 1), out, _swap01)

    def _record(
        self,
        module: nn.Module,
        x: Any,
        out: Any,
        grad_view: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        saved: Any = None,
        on_grad: Optional[Callable[..., None]] = None,
        lead: Optional[int] = None,
    ) -> Any:
        """Record one call of a watched layer: its input ``x`` (batch first) and its output ``out``, whose
        gradient reaches the sketch batch first through ``grad_view`` (None: as it is); ``saved``, when
        given, is what the sketch keeps of the call in place of ``x`` (an EmbeddingBag's bags). A layer
        whose output gradient arrives otherwise than through ``out``'s node (a recurrent layer's tap)
        gives ``on_grad(hook, *args)``, which has ``hook(*args, g)`` called with it, and its batch ``lead``
        when ``x``'s leading dimension is not that (a packed sequence's data)."""
        if not self._records():
            return None
        if not isinstance(out, torch.Tensor) or not out.requires_grad or module not in self._sketches:
            return None
        step = self._step
        in_backward = _in_backward()
        if in_backward:
            if step.forwards.get(module, 0):
                return None  # non-reentrant checkpointing recomputes a call whose output is hooked already
        else:
            step.forwards[module] = step.forwards.get(module, 0) + 1
        if self._audit:
            step.recorded.add(module)
        if self._outside is not None:
            self._outside.add(module, x, out)
        sk = self._sketches[module]
        view = _as_is if grad_view is None else grad_view
        if not self.sampler.balances:
            # rr, so, ...: no sketch, only the number of examples, so that the sampler's cursor moves: the
            # model's batch where its input shows one (a layer's leading dimension may be B * T rows, or 1),
            # counted at the first gradient, so that a forward with no backward counts nothing.
            if step.noted is None and x.dim() > 0:
                n = step.batch
                note = lambda g: self._note(step, view(g).shape[0] if n is None else n)  # noqa: E731
                if on_grad is None:
                    _on_output_grad(out, note)
                else:
                    on_grad(note)
            return None
        b = step.batch
        if lead is None:
            lead = int(x.shape[0]) if x.dim() > 0 else 0
        replaced = None
        if b is None:
            b = step.batch = lead
        if self._shared_ids and self._shared_ids.get(module) == x.dim() and not in_backward:
            return self._shared_call(step, sk, module, x, out, b)  # an Embedding's ids known to be shared
        if lead != b:
            if lead == 1 and isinstance(module, nn.Embedding) and out.shape[0] == 1:
                # One lookup shared by the whole batch (BERT's position embeddings: ids of batch 1,
                # broadcast when added): each example gets an expanded, no-copy view of the output, so
                # its gradient stays per example; values and broadcast are unchanged.
                x = x.expand(b, *x.shape[1:])
                out = replaced = out.expand(b, *out.shape[1:])
            elif (m := self._flattened(sk, x, b)) is not None:
                # Rows made example after example from a [B, ...] tensor (OPT's [B * T, E] MLP inputs;
                # capture/flatten.py): the layer on [B, m, ...], as on a sequence.
                x, by_rows = x.unflatten(0, (b, m)), view
                view = lambda g: by_rows(g).unflatten(0, (b, m))  # noqa: E731
            elif self._takes_shared(sk, x, b, in_backward, grad_view, on_grad):
                return self._shared_call(step, sk, module, x, out, b)
            else:
                self._refuse_layout(sk, x, b, in_backward)
        if saved is None:
            saved = self._save(step, sk, module, x, in_backward)
        if view is _as_is:
            hook, args = self._on_grad, (step, sk, module, saved)
        else:
            hook, args = (lambda g: self._on_grad(step, sk, module, saved, view(g))), ()
        if on_grad is None:
            # (on ``out`` as it is now: a lookup shared by the batch was replaced by its expanded view above)
            _on_output_grad(out, hook, *args)
        else:
            on_grad(hook, *args)
        return replaced

    def _takes_shared(
        self, sk: LayerSketch, x: torch.Tensor, b: int, in_backward: bool, grad_view: Any, on_grad: Any
    ) -> bool:
        """Whether a layer's call on an input with no batch dimension is followed as shared by the batch
        (capture/shared.py): an input of ids with no dimension of the batch's size, or one made from
        parameters alone, to a layer whose sketch takes sequences, called in the forward (a reentrant
        checkpoint's recompute runs outside the model's forward, where no mode follows the output). Data
        in other rows than the batch's (rows that flatten it, unproven) is refused as before, with what
        would make it readable."""
        return (
            self.batch_first
            and not in_backward
            and grad_view is None
            and on_grad is None
            and not sk.ghost
            and isinstance(sk, _SEQUENCE_SKETCHES)
            and x.dim() > 0
            and (
                # ids with a dimension of the batch's size are the batch's (a sequence-first model's [T, B])
                b not in x.shape
                if not (x.is_floating_point() or x.is_complex())
                # (or a tensor followed already: a layer on another shared call's output)
                else made_from_parameters(x) or (self._shared_mode is not None and self._shared_mode.takes((x,), {}))
            )
        )

    def _shared_call(
        self, step: _Step, sk: LayerSketch, module: nn.Module, x: torch.Tensor, out: torch.Tensor, b: int
    ) -> None:
        """A layer's call on a tensor the batch shares: its output followed to where it meets the batch's
        rows, by the model-wide mode (entered at the forward's first such call)."""
        mode = self._shared_mode
        if mode is None:
            if _top_mode() is not None:
                self._step, self._recording = _Step(), False  # this forward will have no backward
                raise UnsupportedModelError(
                    f"watch(): layer {sk.name!r} is called on a tensor shared by the whole batch (shape "
                    f"{tuple(x.shape)}, in a step of {b} examples) inside a TorchFunctionMode "
                    f"({type(_top_mode()).__name__}); its output is followed to the batch's rows by a mode of "
                    f"watch()'s own, which cannot begin there. {leave_out(sk.name)}"
                )
            mode = self._shared_mode = BroadcastUses(
                {},
                self._direct_batch,
                self._direct_rows,
                lambda call, t, shape, m, make: self._shared_record(step, call, t, shape, m, make),
                self._shared_refuse,
                held=self._held,
            )
            mode.__enter__()
        if not x.is_floating_point() and not x.is_complex():
            self._shared_ids[module] = x.dim()
        call = SharedCall(sk, module, x, out, b)
        made = mode.params.get(id(x))
        if made is not None:
            # The input is followed already (DeBERTa's query_proj on the normalized relative table): the
            # output is followed as this call's alone, and each example's part, pulled back through the layer
            # to its input once (not once for each thing the input is made from), goes on to those sources.
            call.sources, forward = made[1], type(module).forward
            call.relay = lambda t, module=module, forward=forward: forward(module, t)
            mode.params.pop(id(out), None)
        found = self._table_of(x)
        if found is not None and found[0] is not module:
            # The input is an Embedding's table, or a view of it, never looked up (DeBERTa's relative
            # embeddings: normalized by a LayerNorm, or sliced into pos_key_proj): each example's gradient of
            # the input, relayed through this layer, is pulled back through the view to the table, and is
            # that table's rows, as a lookup of every id once. Its use here is that Embedding's call.
            table, w, view = found
            use = SharedCall(self._sketches[table], table, torch.arange(int(w.shape[0]), device=w.device), w, b)
            forward = type(module).forward
            call.sources = [(use, view)]
            call.relay = lambda t, module=module, forward=forward: forward(module, t)
            if self._audit:
                step.recorded.add(table)
            if self._outside is not None:
                self._outside.add(table, w, out)  # (the view's nodes, made before the call, are the use's too)
        mode.follow(out, call)
        # The parts are summed until the output's own gradient arrives, after every use's; then taken whole
        # (and, at the layer's first backward, checked against that gradient).
        call.deferred = True
        _on_output_grad(out, self._shared_done, step, call)

    def _table_of(self, x: torch.Tensor) -> Optional[Tuple[nn.Module, torch.Tensor, Callable[..., torch.Tensor]]]:
        """(the Embedding, its table, the view as a function of the table) when ``x`` is a watched Embedding's
        table or a view of it (a slice, an unsqueeze): the view is a gather of the table's elements by the
        offsets ``x`` reads, which torch.func can take per example. None otherwise."""
        table = self._tables.get(id(x))
        if table is not None:
            return table, x, lambda t: t
        base = x._base
        table = self._tables.get(id(base)) if base is not None else None
        if table is None or not base.is_contiguous():
            return None
        offsets = torch.arange(base.numel(), device=base.device).as_strided(
            x.size(), x.stride(), x.storage_offset() - base.storage_offset()
        )
        return table, base, lambda t: t.reshape(-1)[offsets]

    def _leave_shared(self, module: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
        """Forward hook of the model (always called, first): leave the mode following shared calls' outputs."""
        mode, self._shared_mode = self._shared_mode, None
        if mode is None:
            return
        if _top_mode() is mode:
            mode.__exit__(None, None, None)
            return
        # A mode entered after it was not left (a forward that raised inside another's scope): take this one
        # out of the stack, the others kept in their order.
        above = []
        while _top_mode() is not None and _top_mode() is not mode:
            above.append(torch._C._pop_torch_function_stack())
        if _top_mode() is mode:
            mode.__exit__(None, None, None)
        for m in reversed(above):
            torch._C._push_on_torch_function_stack(m)

    def _shared_record(
        self,
        step: _Step,
        call: SharedCall,
        t: torch.Tensor,
        shape: Tuple[int, ...],
        m: int,
        make: Optional[Callable[[torch.Tensor], torch.Tensor]],
    ) -> None:
        """Hook ``t``, the followed output (or a tensor made from it) broadcast over the batch's rows: each
        example's gradient of the output, pulled back from there, is one call's output gradient for the
        layer's sketch."""

        def on_grad(g: torch.Tensor) -> None:
            self._shared_part(step, call, make, per_example(g, shape, m), False)

        _on_output_grad(t, on_grad)

    def _shared_part(
        self,
        step: _Step,
        call: SharedCall,
        make: Optional[Callable[[torch.Tensor], torch.Tensor]],
        part: torch.Tensor,
        rough: bool,
    ) -> None:
        """Each example's gradient of ``make(call.out)`` ([B, ...]), pulled back to the call's output: added to
        the call's sum of parts (taken at ``_shared_done``), or, for a table taken by a call, its rows now."""
        rough = rough or part.dtype in (torch.float16, torch.bfloat16)
        try:
            if make is None:
                part = part.reshape(part.shape[0], *call.out.shape)
            else:
                part = pulled_back(make, call.out, part, call.name)
        except UnsupportedModelError as e:  # torch.func inside saved-tensor hooks (torch < 2.8)
            self._refuse(step, str(e))
        if step is not self._step:
            self._on_grad(step, call.sk, call.module, None, part)  # (refuses or ignores, as for a layer)
            return
        if call.deferred:
            call.add(part, rough)
        else:  # (an Embedding's table, whose one part per step comes from the call that took it)
            self._shared_rows(step, call, part, rough)

    def _shared_rows(self, step: _Step, call: SharedCall, part: torch.Tensor, rough: bool) -> None:
        """One step's per-example gradient of a shared call's output: the layer's rows, and where its input is
        followed itself, that input's gradient relayed through the layer to what made it."""
        saved, g_layer = call.grad(part)
        self._on_grad(step, call.sk, call.module, saved, g_layer)
        if call.relay is None:
            return
        try:
            relayed = self._relayed(call, part)
        except UnsupportedModelError as e:  # torch.func inside saved-tensor hooks (torch < 2.8)
            self._refuse(step, str(e))
        for source, source_make in call.sources:
            self._shared_part(step, source, source_make, relayed, rough)

    def _shared_done(self, step: _Step, call: SharedCall, total: torch.Tensor) -> None:
        """The gradient of a shared call's output, after every use's: the parts summed are taken whole; at the
        layer's first recorded backward, they must add up to that gradient (nothing used it unseen)."""
        if step is not self._step:
            return
        acc = call.take()
        if call.module not in self._checked_shared:
            if call.unseen_use(acc, total):
                self._refuse(
                    step,
                    f"watch(): layer {call.name!r} is called on a tensor shared by the whole batch, and its "
                    "output's gradient is not the sum of the per-example parts watch() saw where the output meets "
                    "the batch's rows: something uses it where watch() does not look (after the model's forward, "
                    f"or through an operation it does not follow). {leave_out(call.name)}",
                )
            self._checked_shared.add(call.module)
        if acc is not None:
            self._shared_rows(step, call, acc, call.rough)

    def _relayed(self, call: SharedCall, part: torch.Tensor) -> torch.Tensor:
        """Each example's gradient of the call's input, from its gradient of the output (``part``). A Linear
        or LayerNorm acts on each row of its input alone, so on the CPU the rows no example's gradient
        reaches are skipped (DeBERTa's relative table has 2 x 256 rows; a batch of 64 tokens reaches 127 of
        them): a pass over the part, against B x rows x in x out multiply-adds. (On a GPU, finding them
        would wait for the device at every step.)"""
        x = call.x
        if not (part.is_cpu and type(call.module) in (nn.Linear, nn.LayerNorm) and x.dim() >= 2):
            return pulled_back(call.relay, x, part, call.name)  # type: ignore[arg-type]
        b = part.shape[0]
        rows = part.reshape(b, -1, part.shape[-1])
        live = (rows != 0).any(2).any(0).nonzero().squeeze(1)
        if live.numel() == rows.shape[1]:
            return pulled_back(call.relay, x, part, call.name)  # type: ignore[arg-type]
        flat = x.reshape(-1, x.shape[-1])
        got = pulled_back(call.relay, flat[live], rows[:, live], call.name)  # type: ignore[arg-type]
        out = got.new_zeros(b, flat.shape[0], flat.shape[1])
        out[:, live] = got
        return out.reshape(b, *x.shape)

    def _shared_refuse(self, call: SharedCall, what: str) -> None:
        self._step, self._recording = _Step(), False  # this forward will have no backward
        raise UnsupportedModelError(
            f"watch(): layer {call.name!r} is called on a tensor shared by the whole batch (shape "
            f"{tuple(call.x.shape)}), so no example owns its output until it meets the batch's rows; watch() "
            "follows it through functions of it alone to where it does (expand, +, *, torch.where, @, einsum, "
            f"an attention's mask), and {what} takes it otherwise. {leave_out(call.name)}"
        )

    @in_full_precision
    def _save(self, step: _Step, sk: LayerSketch, module: nn.Module, x: torch.Tensor, in_backward: bool) -> Any:
        """What the layer's sketch keeps of its input: its projection now, a _PendingInput, or a HeldInput."""
        if sk in self._held_inputs and not in_backward and not _saved_tensor_hooks_active():
            # (a checkpointed layer keeps no input: it is projected now, as below)
            held = sk.hold(x)  # type: ignore[attr-defined]
            if held is not None:
                return held
        if (
            sk not in self._grouped_inputs
            or in_backward  # a reentrant checkpoint's recompute: its gradient comes right after
            or not groupable(x)  # stacking the inputs would cost more than it saves (LinearSketch.group_key)
            # Autograd's saved input is then a view of x itself, so a write into x after the forward is
            # one that autograd refuses too (a non-contiguous input is saved as a copy).
            or not x.is_contiguous()
            or _saved_tensor_hooks_active()
        ):
            return sk.save(module, x)
        pending = _PendingInput(sk, x)  # type: ignore[arg-type]
        step.pending.append(pending)
        return pending

    @in_full_precision
    def _project_inputs(self, step: _Step) -> None:
        """Project the step's pending inputs, those of equally shaped layers and inputs in one product."""
        items, step.pending = step.pending, []
        groups: Dict[Any, List[_PendingInput]] = {}
        for item in items:
            x = item.x
            assert x is not None
            if x._version != item.version:
                self._refuse_modified_input(step, item.sk.name)
            groups.setdefault((item.sk.p_in.n, item.sk.p_in.k, x.shape, x.dtype, x.device), []).append(item)
        with torch.no_grad():
            for members in (c for group in groups.values() for c in chunked(group, lambda m: m.x.numel())):
                if len(members) == 1:
                    item = members[0]
                    item.value, item.x = item.sk.save(None, item.x), None  # type: ignore[arg-type]
                    continue
                x = members[0].x
                assert x is not None
                p = stacked_t(self._input_stacks, [m.sk.p_in for m in members], x.device, torch.float32)
                a = torch.stack([m.x.float() for m in members])  # type: ignore[union-attr]
                ap = torch.bmm(a.reshape(len(members), -1, x.shape[-1]), p)  # [L, B * T, k_in]
                lead = (x.shape[0],) if x.dim() == 2 else (x.shape[0], -1)
                for m, v in zip(members, ap.view(len(members), *lead, ap.shape[-1]).unbind(0)):
                    m.value, m.x = v, None

    def _refuse_layout(self, sk: LayerSketch, x: torch.Tensor, b: int, in_backward: bool = False) -> None:
        """Refuse a layer's input whose leading dimension is not the step's batch."""
        self._step, self._recording = _Step(), False  # this forward will have no backward
        lead = int(x.shape[0])
        flat = (
            " Rows that flatten the batch are taken where the input's history shows each example's rows "
            "consecutive (a reshape of a batch-first tensor, then operations that keep rows apart; not through "
            "a torch.compile'd region)."
            if lead > b and lead % b == 0
            else ""
        )
        shared = (
            "a layer called on ids or on a tensor made from parameters alone, shared by the whole batch (T5's "
            "relative position bias), is followed to where its output meets the batch's rows, but not in a "
            "reentrant checkpoint's recompute, which runs in the backward (use_reentrant=False)"
            if in_backward
            else "a layer called on ids or on a tensor made from parameters alone, shared by the whole batch "
            "(T5's relative position bias), is followed to where its output meets the batch's rows, and this "
            "input is neither"
        )
        raise UnsupportedModelError(
            f"watch(): module {sk.name!r} got an input of shape {tuple(x.shape)} in a step whose batch "
            f"has {b} examples; per-example rows need batch-first inputs to every watched layer; {shared} "
            f"({leave_out(sk.name)}, or granularity='batch' when a step is one unit).{flat}"
        )

    def _refuse_abandoned(self, left: _Step) -> None:
        """A backward reached the calls of a forward that a forward of another batch size left
        (_abandons): one loss through forwards of two batch sizes has no per-example rows. The step
        open now is dropped with the refusal (no rows, none fed)."""
        step = self._step
        self._refuse(
            step,
            f"watch(): one backward went through training forwards of {left.batch} and {step.batch} examples; "
            "per-example rows need every forward of a step to take the step's batch. Compute what is not "
            "trained on (a loss for logging, another batch) under torch.no_grad() or in eval mode, or use "
            "granularity='batch' when a step is one unit",
        )

    def _refuse_modified_input(self, step: _Step, name: str) -> NoReturn:
        """A watched layer's input was written in place after the layer's call (held, or pending for a
        grouped projection): its weight gradient, and so its rows, need the input as it was."""
        self._refuse(
            step,
            f"watch(): the input of layer {name!r} was modified by an in-place operation after the layer's "
            "forward; the layer's weight gradient needs that input as it was (autograd refuses such a "
            "backward as well)",
        )

    def _refuse(self, step: _Step, message: str) -> NoReturn:
        """Refuse the open step inside its backward: its rows are dropped (the slot given back, none fed),
        the next forward begins a new step, and the sampler is as it was."""
        self._release_slot(step)
        self._step, self._recording = _Step(), False
        raise UnsupportedModelError(message)

    def _flattened(self, sk: LayerSketch, x: torch.Tensor, b: int) -> Optional[int]:
        """m when the layer's input holds the batch's examples as b runs of m rows (capture/flatten.py) and
        its sketch takes a sequence of m; None otherwise (``_read_rows``)."""
        if not self.batch_first or sk.ghost or not isinstance(sk, _SEQUENCE_SKETCHES) or x.grad_fn is None:
            return None
        return self._read_rows(sk, x, b)

    @in_full_precision
    def _on_grad(self, step: _Step, sk: LayerSketch, module: nn.Module, saved: Any, g: torch.Tensor) -> None:
        if step is not self._step:
            if step.abandoned:
                self._refuse_abandoned(step)
            return  # a backward through a step already handed over (retain_graph): not this step's
        if step.grads == 0:
            self._first_grad(step)
        step.grads += 1
        if step.pending:
            self._project_inputs(step)
        if type(saved) is _PendingInput:
            saved = saved.value
        elif type(saved) is HeldInput and saved.changed():
            self._refuse_modified_input(step, sk.name)
        if sk.ghost:
            if sk.ghost_width:
                # The input is copied now, while autograd still holds it intact for this layer's weight
                # gradient: the loop may write it (a reused input buffer) after the backward, before the
                # step is balanced at the next forward. B x in numbers, against the B x out x in of the
                # layer's products; and the copy, not the input, is what the step keeps.
                step.ghost.setdefault(sk, []).append((g.detach(), saved.clone()))
            if sk.width:
                with torch.no_grad():
                    sk.add_rows(step, sk.rows(module, saved, g))
            return
        key = None if self._alone[sk] else sk.group_key(saved, g)
        if key is None:
            if not self._write_direct(step, sk, module, saved, g):
                with torch.no_grad():
                    try:
                        rows = sk.rows(module, saved, g)
                    except UnsupportedModelError as e:  # torch.func inside saved-tensor hooks (torch < 2.8)
                        self._refuse(step, str(e))
                    sk.add_rows(step, rows)
        else:
            self._defer(step, key, (sk, module, saved, g))

    def _write_direct(self, step: _Step, sk: LayerSketch, module: nn.Module, saved: Any, g: torch.Tensor) -> bool:
        """Let the layer write its rows straight into the step's slot of the block buffer, scaled as
        _end_step would scale them (False: the layer has no direct kernel for this call)."""
        if not g.is_cpu or isinstance(step.factor, torch.Tensor) or g.dim() == 0 or self._ghosts:
            return False  # (with ghost layers every step is balanced on its own, from its pieces)
        b = int(g.shape[0])
        slot = step.slot
        if slot is None and sk is self._outer and self.sampler.balances:
            # The rows' factors, not the rows (see _outer); a second call of the layer in this step
            # makes them rows again (below), and a layer the kernel does not apply to writes rows.
            out = self._outer
            slot = self._feeder.slot_out(b, self._outer_kind, out.factor_width)
            finite = out.factors_into(saved, g, slot, self._multiplier(step, b))
            if finite is not None:
                step.slot, step.outer, step.finite = slot, True, finite
                step.written.add(sk.offset)
                return True
            self._feeder.give_back(b)
            slot = None
        if slot is None:
            slot = self._feeder.slot_out(b)
        else:
            if step.outer:  # the layer called again in this step: its rows are a sum of outer products
                slot = step.slot = self._feeder.densify(slot)
                step.outer = False
            if slot.shape[0] != b:
                return False
        # NumPy slicing: a torch slice costs about a microsecond, a tenth of a small model's kernel.
        finite = sk.rows_into(
            module,
            saved,
            g,
            slot[:, sk.offset : sk.offset + sk.width],
            self._multiplier(step, b),
            sk.offset in step.written,
        )
        if finite is None:
            if step.slot is None:
                self._feeder.give_back(b)  # the slot just taken goes back (nothing was written to it)
            return False
        step.slot = slot
        step.written.add(sk.offset)
        step.finite = step.finite and finite
        return True

    def _defer(self, step: _Step, key: Any, item: Tuple[LayerSketch, nn.Module, Any, torch.Tensor]) -> None:
        """Hold a call for its group, formed when the backward ends, or now, for the calls held so far,
        when this one would hold more than GROUP_STACK_MAX elements of that key's output gradients (which
        autograd would have freed): what a backward holds so is bounded whatever the model's depth."""
        if not step.deferred:
            try:  # runs when this backward (graph task) ends; a nested (reentrant) one queues its own
                torch.autograd.Variable._execution_engine.queue_callback(lambda: self._run_deferred(step))
            except RuntimeError:
                pass  # not inside an engine run: _end_step forms them
        members = step.deferred.setdefault(key, [])
        held = step.held.get(key, 0) + item[3].numel()
        if members and held > layers.GROUP_STACK_MAX:
            self._form(step, members)
            members.clear()
            held = item[3].numel()
        members.append(item)
        step.held[key] = held

    @in_full_precision
    def _run_deferred(self, step: _Step) -> None:
        """Form the deferred sketches of a step, equally shaped layers together."""
        groups, step.deferred, step.held = step.deferred, {}, {}
        for members in groups.values():
            if members:
                self._form(step, members)

    @staticmethod
    def _form(step: _Step, members: List[Tuple[LayerSketch, nn.Module, Any, torch.Tensor]]) -> None:
        """The rows of one group's calls, added to the step."""
        with torch.no_grad():
            if len(members) == 1:
                sk, module, saved, g = members[0]
                sk.add_rows(step, sk.rows(module, saved, g))
                return
            results = type(members[0][0]).rows_grouped([(sk, saved, g) for sk, _, saved, g in members])
            for (sk, _, _, _), pieces in zip(members, results):
                sk.add_rows(step, pieces)

    def _param_hook(self, i: int) -> Any:
        _, _, fs = self._params[i]
        offset = self._param_offsets[i]

        def hook(g: torch.Tensor) -> None:
            step = self._step
            if not self.sampler.balances:
                self._note(step, 1)
                return
            with torch.no_grad():
                step.add(offset, [fs(g.detach().reshape(-1).float()).unsqueeze(0)])
            if step.grads == 0:
                self._first_grad(step)
            step.grads += 1

        return hook

    def _note(self, step: _Step, b: int) -> None:
        if step is self._step and step.noted is None:
            step.noted = b
            _when_backward_completes(step)

    def _first_grad(self, step: _Step) -> None:
        _when_backward_completes(step)
        if self.loss_factor is not None:
            step.factor = self.loss_factor()
        if self.scaler is not None and self.scaler.is_enabled() and self.scaler._scale is not None:
            # The scale of this backward (scaler.update() may change it before the rows are fed).
            step.scale = self.scaler._scale.detach().clone()

    # ------------------------------------------------------------------ feeding the sampler
    def _release_slot(self, step: _Step) -> None:
        """The step's rows are dropped: its slot in the block buffer (the last one taken) goes back."""
        if step.slot is not None:
            self._feeder.give_back(step.slot.shape[0])
            step.slot, step.written, step.outer = None, set(), False

    def _drop(self, step: _Step) -> None:
        """A step whose forward or backward raised and that the loop went past (an out-of-memory batch
        skipped, a bad batch caught): no rows, and its examples count as unseen, in their place among the
        steps, so that the next steps' rows still meet their own indices. A step that watch() refused
        itself is no such step: a refusal leaves no open step and the sampler as it was."""
        self._release_slot(step)
        self._step = _Step()
        b = 1 if self.granularity == "batch" else step.batch  # (a step is one row at batch granularity)
        if b:
            self._feeder.drop(b)

    @in_full_precision
    def _end_step(self) -> None:
        step, self._step = self._step, _Step()
        if self._audit and (step.grads or step.noted is not None):
            for h in self._audit:  # a step was recorded and nothing was refused: the audit is done
                h.remove()
            self._audit = []
        if step.deferred:
            self._run_deferred(step)
        if self._ghosts and self.sampler.balances:
            self._feed_ghost(step)
            return
        if step.slot is not None:
            if step.outer and not self._all_direct(step):  # rows to scale, or pieces to add: rows, then
                step.slot, step.outer = self._feeder.densify(step.slot), False
            # Known finite when every block was written by a kernel that said so, and nothing divides them.
            known = step.finite and self._all_direct(step)
            self._finish_direct(step)
            self._feeder.add(True, step.slot.shape[0], known)
        elif not step.blocks:
            if step.noted is not None:
                self._feeder.add(None, step.noted, False)
        else:
            first = next(p for pieces in step.blocks.values() for p in pieces)
            b = first.shape[0]
            rows = self._feeder.rows_out(b, first.device)
            # One op into the block: a copy, so no piece (some are views of autograd's gradients) is written.
            torch.cat(self._pieces(step, b, first.device), dim=1, out=rows)
            # Scaled here, on rows just written, with the loss factor in the same op.
            mult = self._multiplier(step, b)
            if step.scale is not None:
                rows.div_(step.scale.to(rows.device))
            if isinstance(step.factor, torch.Tensor):  # measured on the device: multiplied there, no sync
                rows.mul_(step.factor.to(rows.device, rows.dtype) * mult)
            elif mult != 1.0:
                rows.mul_(mult)
            self._feeder.add(rows, b, False)

    def _feed_ghost(self, step: _Step) -> None:
        """Balance one step with ghost layers now: its rows (the other layers' columns) and each ghost
        layer's factors, scaled as rows are, go to the sampler's on-device path together, one sign scan."""
        first = next((calls[0][0] for calls in step.ghost.values()), None)
        if first is None:
            first = next((p for pieces in step.blocks.values() for p in pieces), None)
        if first is None:
            return  # no hook saw a gradient: nothing to balance
        b = int(first.shape[0])
        mult = self._multiplier(step, b)
        scale = step.scale.to(first.device) if step.scale is not None else None
        factor = step.factor.to(first.device) if isinstance(step.factor, torch.Tensor) else None

        def scaled(t: torch.Tensor) -> torch.Tensor:
            t = t.float() * mult
            if scale is not None:
                t = t / scale
            return t * factor if factor is not None else t

        segments: List[Any] = []
        if self._row_width:
            segments.append(scaled(torch.cat(self._pieces(step, b, first.device), dim=1)))
        for sk in self._ghosts:
            calls = step.ghost.get(sk)
            if not calls:  # not called this step: a zero gradient
                z = first.new_zeros(b, 1, dtype=torch.float32)
                segments.append(Factored([(z.expand(b, sk.out_f), z.expand(b, sk.in_f))]))
            else:
                segments.append(Factored([(scaled(g), a) for g, a in calls]))
        try:
            # The sign scan refuses non-finite inner products before changing anything, and any NaN or
            # Inf in a row or a factor makes its Gram diagonal non-finite: no separate scan here.
            self.sampler.step(segments)
        except NonFiniteGradientError:
            self._feeder.skip_non_finite(b)

    def _pieces(self, step: _Step, b: int, device: torch.device) -> List[torch.Tensor]:
        """The step's [b, w] pieces in column order, zeros for a layer whose output got no gradient (its
        gradient is zero)."""
        pieces: List[torch.Tensor] = []
        for offset, width in self._blocks:
            have = step.blocks.get(offset)
            if have is None:
                pieces.append(torch.zeros(b, width, dtype=torch.float32, device=device))
            else:
                pieces += have
        return pieces

    def _multiplier(self, step: _Step, b: int) -> float:
        """What a step's rows are multiplied by, but for a loss factor held as a tensor: with a mean loss
        the hooks saw (1/B) d loss_b / d y, so times B each row is its own gradient whatever B; times the
        loss factor an integration reported as a number."""
        mult = float(b) if self.granularity == "example" and self.loss_reduction == "mean" else 1.0
        if step.factor is not None and not isinstance(step.factor, torch.Tensor):
            mult *= float(step.factor)
        return mult

    def _all_direct(self, step: _Step) -> bool:
        """Every block of the step was written by a kernel, scaled already, with nothing to add or divide."""
        return not step.blocks and step.scale is None and len(step.written) == len(self._blocks)

    def _finish_direct(self, step: _Step) -> None:
        """Complete the rows of a step some of whose layers wrote into its slot directly (scaled
        already): the other layers' pieces are copied into their columns and scaled, blocks without any
        are zeroed."""
        assert step.slot is not None
        if self._all_direct(step):
            return  # a small model's every step
        rows = torch.from_numpy(step.slot)
        b = rows.shape[0]
        mult = self._multiplier(step, b)  # a tensor factor never writes directly
        # Adjacent blocks that no kernel wrote are copied as one run, one concatenation and one scaling
        # each: a transformer's fifty blocks beside its classifier's direct one were a hundred ops a step.
        run: List[torch.Tensor] = []
        start = end = 0

        def close_run() -> None:
            if run:
                torch.mul(torch.cat(run, dim=1) if len(run) > 1 else run[0], mult, out=rows[:, start:end])
                run.clear()

        for offset, width in self._blocks:
            have = step.blocks.get(offset)
            if offset in step.written:
                close_run()
                if have is not None:  # a second call of a layer that wrote its first call's rows
                    add = torch.cat(have, dim=1) if len(have) > 1 else have[0]
                    rows[:, offset : offset + width].add_(add, alpha=mult)
                continue
            if not run or offset != end:
                close_run()
                start = offset
            # A layer whose output got no gradient: its gradient is zero.
            run += have if have is not None else [torch.zeros(b, width, dtype=rows.dtype)]
            end = offset + width
        close_run()
        if step.scale is not None:
            rows.div_(step.scale.to(rows.device))


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module whose layers are hooked: DistributedDataParallel's, or DataParallel's on one device."""
    if isinstance(model, nn.DataParallel):
        if len(model.device_ids) > 1:
            # Each forward copies the model to every GPU and runs the copies in threads: the layers that
            # run are copies made at that forward, which no hook registered here can tell apart.
            raise UnsupportedModelError(
                f"watch() does not follow nn.DataParallel over {len(model.device_ids)} devices (it runs fresh "
                "copies of the model in threads at every forward); use DistributedDataParallel, which watch() "
                "supports, or watch the model on one device"
            )
        return model.module
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _kind(sk: LayerSketch) -> str:
    """A layer's kind as ``WatchHandle.layers`` shows it."""
    if isinstance(sk, TiedLinearSketch):
        return f"Linear (weight tied to {sk.embedding.name!r}: added into its columns)"
    if isinstance(sk, SharedEmbeddingSketch):
        return f"Embedding (table of {sk.embedding.name!r}: added into its columns)"
    if isinstance(sk, FunctionalSketch):
        return f"{sk.layer_class} (per example by torch.func)"
    if isinstance(sk, DirectParamSketch):
        return "parameter of no layer (per example where broadcast over the batch)"
    if isinstance(sk, RecurrentSketch):
        return f"{sk.layer_class} ({sk.replayed} in the backward)"
    if isinstance(sk, ParametrizedSketch):
        return sk.kind()
    if sk.ghost and sk.ghost_width:
        return f"Linear (ghost: the weight's {sk.ghost_width} coordinates exact from its factors, not in the rows)"
    return type(sk).__name__.replace("Sketch", "") + (" (weight left out: budget)" if sk.dropped else "")


def _top_mode() -> Optional[Any]:
    """The innermost TorchFunctionMode now active (None: none)."""
    n = torch._C._len_torch_function_stack()
    return torch._C._get_function_stack_at(n - 1) if n else None


def _swap01(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1)


def _on_output_grad(out: torch.Tensor, hook: Callable[..., None], *args: Any) -> None:
    """Have ``hook(*args, g)`` called with the gradient ``g`` of ``out`` during the backward: a pre-hook on
    the node that made ``out``, given that node's output gradients, which is where ``out.register_hook``
    puts its hook too (and so the same gradient, also when ``out`` is later written in place). Registered
    directly it costs less: ``Tensor.register_hook``'s Python bookkeeping (a hooks dict and a removable
    handle per tensor) is a visible part of a small model's step. The arguments are bound here, not in a
    closure of the caller's, so a layer's call makes one Python function and its gradient calls two."""
    node = out.grad_fn
    if node is None:  # a leaf (a module that returns a parameter): no node to hook
        out.register_hook(lambda g: hook(*args, g))
        return
    base = out._base
    if base is not None and base.grad_fn is not None and _whole_view(out, base):
        # The output is a view of all of a tensor the layer made (torch before 2.6 or so returns F.linear's
        # output for [B, T, in] inputs as a view of its [B T, out] product). A later write in place into the
        # view (Wav2Vec2's masked frames) sends the gradient around the view's node, through the base's,
        # so a hook on the view's node never runs, nor its tensor hook, and the layer's rows were zeros.
        # The base's node gets the gradient in either case, the view's values in the base's layout.
        shape, node, i = out.shape, base.grad_fn, base.output_nr

        def pre_base(grads: Tuple[Optional[torch.Tensor], ...]) -> None:
            g = grads[i]
            if g is not None:
                hook(*args, g.reshape(shape))

        node.register_prehook(pre_base)
        return
    i = out.output_nr

    def pre(grads: Tuple[Optional[torch.Tensor], ...]) -> None:
        g = grads[i]
        if g is not None:  # this output got no gradient: its tensor hook would not run either
            hook(*args, g)

    node.register_prehook(pre)


def _whole_view(out: torch.Tensor, base: torch.Tensor) -> bool:
    """``out`` holds every element of ``base`` in its order: a reshape of it."""
    return (
        out.numel() == base.numel()
        and out.storage_offset() == base.storage_offset()
        and out.is_contiguous()
        and base.is_contiguous()
    )


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), "?")


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def _called_children(module: nn.Module) -> Iterator[nn.Module]:
    """The sublayers a module's forward calls: its children, and for a container that is never called
    itself (nn.ModuleList, nn.ModuleDict: BEiT's blocks, called one by one from the model's forward) the
    children of that container, recursively."""
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from _called_children(child)
        else:
            yield child


def _batch_of(args: Tuple[Any, ...], kwargs: Dict[str, Any], batch_first: bool = True) -> Optional[int]:
    """The batch size from the model's first tensor input: its leading dimension, or its second for a
    sequence-first model (a [T, B, ...] input)."""
    first = args[0] if args else None
    if not isinstance(first, torch.Tensor):
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        first = leaves[0] if leaves else None
    if first is None or first.dim() == 0:
        return None
    return int(first.shape[1] if not batch_first and first.dim() > 1 else first.shape[0])
