"""Which sketch covers each trainable parameter of a watched model: the plan ``watch()`` hooks.

:class:`LayerPlan` walks the model once, before any hook is registered, and either covers every
trainable parameter that is not left out (by a layer's sketch, a tied or shared table's, attention's
recording forward, or a parameter of no layer broadcast over the batch) or refuses the model with the
parameters it cannot cover and what to pass instead. Nothing here touches the model or the sampler, so
a refused ``watch()`` leaves both as they were.
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from torchgrab.capture import attention as attn
from torchgrab.capture import recurrent  # noqa: F401  (registers the sketch of LSTM, GRU and RNN layers)
from torchgrab.capture.direct import DirectParamSketch, ParamSlot
from torchgrab.capture.inner import prefers_inner, replaced_forward
from torchgrab.capture.layers import (
    EmbeddingSketch,
    FunctionalSketch,
    GhostLinearSketch,
    LayerSketch,
    LinearSketch,
    SharedEmbeddingSketch,
    TiedLinearSketch,
    sketch_class,
)
from torchgrab.capture.parametrized import ParametrizedSketch, is_parametrized, layer_parameters
from torchgrab.capture.parametrized import supported as parametrization_supported
from torchgrab.capture.projection import FoldSketch
from torchgrab.errors import UnsupportedInputError, UnsupportedModelError

# The layers watch(batch_first=False) can read [T, B, ...] inputs of (and attention, which hands its
# projections batch first itself).
# A recurrent layer reads its own batch_first.
SEQUENCE_LAYERS: Tuple[type, ...] = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RNNBase) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


class LayerPlan:
    """The sketches of one model's trainable parameters, in column order.

    Attributes:
        sketches: module -> its sketch, for every block of the rows (tied and shared layers too).
        direct: module holding parameters of no layer -> {id(parameter): (its sketch, the parameter)}.
        attention: supported ``nn.MultiheadAttention`` with a sketched projection -> its packed
            in-projection as a Linear layer (recorded by the attention's own forward).
        left_out: sketches with no columns under the budget (not hooked; shown by ``layers``).
        params: granularity='batch': (name, parameter, its fold) for each parameter.
    """

    def __init__(
        self,
        inner: nn.Module,
        *,
        k: Optional[int],
        ghost_all: bool,
        per_layer: Dict[str, Any],
        budget: Optional[float],
        granularity: str,
        exclude: List[str],
        seed: int,
        batch_first: bool,
    ) -> None:
        self.inner = inner
        self.k = k
        self.ghost_all = ghost_all
        self.per_layer = per_layer
        self.budget = budget
        self.seed = seed
        self.sketches: Dict[nn.Module, LayerSketch] = {}
        self.direct: Dict[nn.Module, Dict[int, Tuple[DirectParamSketch, torch.Tensor]]] = {}
        self.attention: Dict[nn.Module, nn.Module] = {}
        self.left_out: List[LayerSketch] = []
        self.params: List[Tuple[str, torch.Tensor, FoldSketch]] = []
        self._owner: Dict[str, str] = {}  # parameter name -> the layer whose sketch covers it
        named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
        self.kept = _kept(inner, named, exclude)
        _check_per_layer(inner, per_layer)
        if granularity == "batch":
            if ghost_all or "ghost" in per_layer.values():
                raise UnsupportedInputError("the ghost form is per example: granularity='batch' has no layers")
            fold = max(1, k**2) if k is not None else None
            for n, p in named:
                if n in self.kept:
                    self.params.append((n, p, FoldSketch(p.numel(), fold or p.numel(), seed, n)))
            return
        # A parameter shared by several modules has one name (named_parameters' first); a module's own
        # parameters go by that name, so a second use is seen as one (a tied output layer).
        self._canon = {id(t): n for n, t in inner.named_parameters(remove_duplicate=True)}
        # nn.MultiheadAttention applies its projections as functions inside its forward, out_proj's weight
        # included: out_proj's own hooks never run. A supported one is recorded by its own forward; no layer
        # inside any other is sketched, and their parameters are refused below unless left out.
        self._unsupported_attention = [
            n for n, m in inner.named_modules() if isinstance(m, nn.MultiheadAttention) and not attn.supported(m)
        ]
        uncovered = set(self.kept)
        uncovered -= self._plan_layers()
        uncovered -= self._plan_direct(uncovered)
        # Only attention with a sketched projection runs the recording forward (a frozen or left-out one
        # keeps torch's).
        self.attention = {a: p for a, p in self.attention.items() if p in self.sketches or a.out_proj in self.sketches}
        self._check_layout(batch_first)
        if uncovered:
            self._refuse(sorted(uncovered))

    # ------------------------------------------------------------------ layers
    def _own(self, module: nn.Module) -> Dict[str, str]:
        """A module's trainable parameters: attribute name -> the parameter's (canonical) name (a parametrized
        weight's originals by their names within the layer, ``parametrizations.weight.original0``)."""
        return {p: self._canon[id(t)] for p, t in layer_parameters(module).items() if t.requires_grad}

    def _plan_layers(self) -> Set[str]:
        """Sketch every layer with trainable parameters kept; the names of the parameters covered."""
        covered: Set[str] = set()
        # The first Embedding module holding each table (named_modules order): the one that sketches it.
        embeddings: Dict[int, nn.Module] = {}
        for m in self.inner.modules():
            if isinstance(m, nn.Embedding) and not is_parametrized(m):  # (its weight is made at each read)
                embeddings.setdefault(id(m.weight), m)
        tied: List[Tuple[str, nn.Module]] = []  # sketched after the loop, once the table's sketch exists
        for name, module in self.inner.named_modules():
            if isinstance(module, nn.MultiheadAttention) and name not in self._unsupported_attention:
                # Its out_proj is sketched below as the Linear layer it is; both projections are recorded
                # by the attention's forward, also when only one of them trains.
                proj, by_proj = self._attention_in_proj(name, module)
                self.attention[module] = proj
                covered |= set(by_proj)
                continue
            if isinstance(module, ParametrizationList):
                continue  # its originals are its layer's (ParametrizedSketch)
            own = self._own(module)
            if not any(n in self.kept for n in own.values()):
                continue
            if makes_from_own(module):
                continue  # its output is followed by its parent's forward (_plan_direct)
            if any(name != a and _within(name, a) for a in self._unsupported_attention):
                continue
            wants_ghost = self.per_layer[name] == "ghost" if name in self.per_layer else self.ghost_all
            if "weight" in own and isinstance(module, nn.Linear) and id(module.weight) in embeddings:
                if name in self.per_layer and wants_ghost:
                    raise UnsupportedInputError(
                        f"per_layer[{name!r}] = 'ghost': its weight is an embedding's (tied), which is "
                        "sketched with the embedding; give it no per_layer entry"
                    )
                tied.append((name, module))
                continue
            if "weight" in own and isinstance(module, nn.Embedding) and embeddings[id(module.weight)] is not module:
                tied.append((name, module))  # another lookup of a table an earlier Embedding holds
                continue
            sk = self._layer_sketch(name, module, wants_ghost)
            if sk is not None:
                covered |= set(self._admit(sk, module, own))
        for name, module in tied:
            sk = self._tied_sketch(name, module, self.sketches.get(embeddings[id(module.weight)]))
            if sk is not None:
                covered |= set(self._admit(sk, module, self._own(module)))
        return covered

    def _layer_sketch(self, name: str, module: nn.Module, wants_ghost: bool) -> Optional[LayerSketch]:
        """The sketch of one layer (None: a module no sketch describes, refused later if it trains)."""
        if is_parametrized(module):
            # (Read before anything reads module.weight: evaluating spectral_norm in training mode advances it.)
            if name in self.per_layer and wants_ghost:
                raise UnsupportedInputError(
                    f"per_layer[{name!r}] = 'ghost': {name!r} computes its weight from a parametrization, "
                    "whose originals have no ghost form; give it a sketch size"
                )
            if not parametrization_supported(module):
                return None  # refused by name (_refuse)
            return ParametrizedSketch(name, module, self.per_layer.get(name, self.k), self.seed)
        if wants_ghost and isinstance(module, nn.Linear):
            return GhostLinearSketch(name, module, None, self.seed)
        if name in self.per_layer and wants_ghost:
            raise UnsupportedInputError(
                f"per_layer[{name!r}] = 'ghost' is for nn.Linear layers; {name!r} is a {type(module).__name__}"
            )
        cls = sketch_class(module)
        if FunctionalSketch.applies(module) and (
            cls is None or (replaced_forward(module) is not None and not prefers_inner(module))
        ):
            # A small layer of its own class, or one whose class replaces the forward of a convolution, or of a
            # LayerNorm or GroupNorm with no sublayers (capture/inner.py, prefers_inner): torch.func
            # differentiates whatever its forward does.
            cls = FunctionalSketch
        if cls is None:
            return None
        if name in self.per_layer:
            lk = self.per_layer[name]
        elif self.budget is not None and self.k is not None:
            lk = cls.fit(module, self.k, self.budget)
        else:
            lk = self.k
        return cls(name, module, lk, self.seed)

    def _tied_sketch(self, name: str, module: nn.Module, table: Optional[LayerSketch]) -> Optional[LayerSketch]:
        """A Linear layer whose weight is an embedding's, or a second lookup of an embedding's table: both
        add into that embedding's columns (None: left out)."""
        own = self._own(module)
        if _excluded(name, list(own.values()), self.kept):  # the tied weight too, by either layer's name
            return None
        if table is None or not isinstance(table, EmbeddingSketch) or table.dropped:
            raise UnsupportedModelError(
                f"watch(): the weight of {name!r} is an embedding's ({own['weight']!r}, tied), and that "
                "embedding is not sketched, so this layer's part of the shared gradient has nowhere to "
                "go; exclude= both layers, or neither"
            )
        if isinstance(module, nn.Embedding):
            if not EmbeddingSketch.supports(module):
                raise UnsupportedModelError(
                    f"watch(): {name!r} looks up the table of {table.name!r} with max_norm, "
                    "scale_grad_by_freq or sparse, which no per-example sketch describes; exclude= both"
                )
            return SharedEmbeddingSketch(name, module, table)
        return TiedLinearSketch(name, module, table)

    def _attention_in_proj(self, name: str, module: nn.MultiheadAttention) -> Tuple[nn.Module, List[str]]:
        """The packed in-projection of a supported attention module as a Linear layer, sketched (admitted
        into the rows) when its parameters train and are not left out; and the names of those it covers."""
        if self.per_layer.get(name) == "ghost":
            raise UnsupportedInputError(
                f"per_layer[{name!r}] = 'ghost': the ghost form needs [batch, in] inputs, and attention "
                "projects tokens; give it a sketch size"
            )
        proj = attn.InProjection(module)
        own = self._own(proj)
        if not any(n in self.kept for n in own.values()):
            return proj, []
        lk = self.per_layer.get(name, self.k)
        if name not in self.per_layer and self.budget is not None and self.k is not None:
            lk = LinearSketch.fit(proj, self.k, self.budget)
        sk = LinearSketch(f"{name}.in_proj" if name else "in_proj", proj, lk, self.seed)
        return proj, self._admit(sk, proj, own)

    def _admit(self, sk: LayerSketch, module: nn.Module, own: Dict[str, str]) -> List[str]:
        """Take a layer's sketch; the names of the parameters it covers (none: the layer is excluded).
        ``own``: its parameters' names."""
        covered = [own[p] for p in sk.covered(module)]
        if _excluded(sk.name, covered, self.kept):
            return []
        tied = isinstance(sk, (TiedLinearSketch, SharedEmbeddingSketch))
        shared = [n for n in covered if n in self._owner and not (tied and n == own["weight"])]
        if shared:
            raise UnsupportedModelError(
                f"watch(): {shared} belong{'s' if len(shared) == 1 else ''} to both {self._owner[shared[0]]!r} "
                f"and {sk.name!r}. A parameter shared by two layers is sketched only as an embedding tied to a "
                "Linear output layer; exclude= one of these layers and the other, or untie them"
            )
        for n in covered:
            self._owner.setdefault(n, sk.name)
        if sk.width or sk.ghost_width or tied:  # a bias-free tied output layer adds to its embedding's columns only
            self.sketches[module] = sk
        else:  # a bias-free convolution whose weight the budget leaves out has no columns
            self.left_out.append(sk)
        return covered

    # ------------------------------------------------------------------ parameters of no layer
    def _plan_direct(self, uncovered: Set[str]) -> Set[str]:
        """Parameters of a module with sublayers, used by plain tensor operations in its forward (a ViT's
        class token and position embeddings, layer scales), and those of its sublayers that make a tensor
        from their own parameters alone (``makes_from_own``): per example where the forward broadcasts them
        over the batch (capture/direct.py). Other leaf modules' (an nn.Bilinear's) stay uncovered, and refused."""
        covered: Set[str] = set()
        for mname, m in self.inner.named_modules():
            if next(m.children(), None) is None or isinstance(m, (nn.MultiheadAttention, ParametrizationList)):
                continue  # (a parametrized weight's originals, weight_norm's: refused below, by their layer)
            if any(_within(mname, a) for a in self._unsupported_attention):
                continue
            makers = [c for c in m.children() if makes_from_own(c)]
            for t in [*m._parameters.values(), *(t for c in makers for t in c._parameters.values())]:
                if t is None or not t.requires_grad or t.dim() == 0:
                    continue
                name = self._canon[id(t)]
                if name not in uncovered or name in covered:
                    continue
                slot = ParamSlot(t)
                sk = DirectParamSketch(name, slot, self.k, self.seed)
                if self._admit(sk, slot, {"weight": name}):
                    covered.add(name)
                    self.direct.setdefault(m, {})[id(t)] = (sk, t)
        return covered

    # ------------------------------------------------------------------ refusals
    def _check_layout(self, batch_first: bool) -> None:
        """A transformer layer built with the other layout than watch()'s hands its Linear and norm layers
        [T, B, E] (batch_first=False, torch's default) or [B, T, E]: their rows would be one per position,
        not per example, and nothing at a step would tell (every layer inside agrees on T)."""
        other = [n for n, m in self.inner.named_modules() if _layer_batch_first(m) is (not batch_first)]
        # (Attention hands its projections over batch first in either layout: not counted.)
        recorded = {id(m) for a, p in self.attention.items() for m in (a.out_proj, p)}
        inside = [
            sk.name
            for m, sk in self.sketches.items()
            if id(m) not in recorded and any(_within(sk.name, n) for n in other)
        ]
        if inside and batch_first:
            raise UnsupportedModelError(
                f"watch(): {_shown(other[:8])} {'is a' if len(other) == 1 else 'are'} sequence-first "
                f"transformer layer{'' if len(other) == 1 else 's'} (batch_first=False): the layers inside "
                f"({inside[:4]}{' ...' if len(inside) > 4 else ''}) see [sequence, batch, ...] "
                "inputs, so their rows would be one per position, not per example. Build the layers with "
                "batch_first=True (and feed [batch, sequence, ...] inputs), watch(model, batch_first=False) "
                "when the whole model takes [sequence, batch, ...] inputs, or exclude= them."
            )
        if inside:
            raise UnsupportedModelError(
                f"watch(batch_first=False): {_shown(other[:8])} {'is a' if len(other) == 1 else 'are'} "
                f"transformer layer{'' if len(other) == 1 else 's'} built with batch_first=True: the layers "
                f"inside ({inside[:4]}{' ...' if len(inside) > 4 else ''}) see [batch, sequence, ...] inputs. "
                "Watch such a model with batch_first=True, or exclude= them."
            )
        if not batch_first:
            kinds = [sk.name for m, sk in self.sketches.items() if not isinstance(m, SEQUENCE_LAYERS)]
            if kinds:
                raise UnsupportedModelError(
                    f"watch(batch_first=False) is for sequence models (Linear, Embedding, LayerNorm, RMSNorm "
                    f"and attention layers, with the batch in dimension 1 of their inputs, and recurrent "
                    f"layers); {kinds[:8]} "
                    f"{'is' if len(kinds) == 1 else 'are'} not such layers. exclude= them, or watch a "
                    "batch-first model"
                )

    def _refuse(self, names: List[str]) -> None:
        """Refuse the trainable parameters no sketch covers, saying what to pass instead."""
        attention = self._unsupported_attention
        inside = sorted({a for a in attention for n in names if _within(n, a)})
        why = (
            f" {_shown(inside[:8])} {'is an' if len(inside) == 1 else 'are'} nn.MultiheadAttention, which runs "
            "its projections (out_proj too) as functions no layer hook sees."
            if inside
            else ""
        )
        # A parametrized weight (weight_norm, spectral_norm: the layer computes its weight from originals
        # under layer.parametrizations) is followed for Linear and convolution layers only: other layers
        # are what to leave out.
        layers = sorted({n.split(".parametrizations.")[0] for n in names if ".parametrizations." in n})
        if layers:
            why += (
                f" {_shown(layers[:8])} {'computes its' if len(layers) == 1 else 'compute their'} weight from a "
                "parametrization (weight_norm, spectral_norm), which watch() follows for the weight of a Linear "
                "or convolution layer only."
            )
        names_left = [n for n in names if ".parametrizations." not in n]
        # The attention modules whole (the layers inside them are never sketched), the rest by module;
        # none when the model itself is one (excluding it would leave nothing).
        advice = [a for a in inside if a] + layers
        advice += _short([n for n in names_left if not any(_within(n, a) for a in inside)])
        remedy = f" Leave them out of the balancing with exclude={advice!r}, or, if" if advice else " If"
        raise UnsupportedModelError(
            f"watch() cannot sketch these trainable parameters per example: {names[:8]}"
            f"{' ...' if len(names) > 8 else ''} (they belong to no nn.Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, "
            "Embedding, EmbeddingBag (mode 'sum' or 'mean'), LayerNorm, RMSNorm, GroupNorm, BatchNorm, InstanceNorm, "
            "PReLU, LSTM, GRU, RNN, their cells or Hugging Face Conv1D layer, "
            "nor to a layer "
            f"of a class outside torch with at most {FunctionalSketch.MAX_PARAMS:,} parameters of its own and no "
            f"sublayers).{why}{remedy} each backward holds one "
            "unit (a batch of one, or unit_size equal to the batch size), pass granularity='batch' to "
            "balance the whole batch gradient of every parameter."
        )


def _kept(inner: nn.Module, named: List[Tuple[str, torch.Tensor]], exclude: List[str]) -> Set[str]:
    """The names of the trainable parameters that exclude= leaves in."""
    # Every name of a shared parameter (a tied output layer's weight is also the embedding's): leaving out
    # either layer leaves out the parameter.
    aliases = [(n, p) for n, p in inner.named_parameters(remove_duplicate=False) if p.requires_grad]
    unknown = [e for e in exclude if not any(_named_by(n, e) for n, _ in aliases)]
    if unknown:
        raise UnsupportedInputError(f"exclude names no trainable parameter or module of the model: {unknown}")
    excluded = {id(p) for n, p in aliases if any(_named_by(n, e) for e in exclude)}
    kept = {n for n, p in named if id(p) not in excluded}
    if not kept:
        raise UnsupportedModelError(
            "the model has no trainable parameter left to watch (requires_grad=True, not excluded)"
        )
    return kept


def _check_per_layer(inner: nn.Module, per_layer: Dict[str, Any]) -> None:
    for name, v in per_layer.items():
        parts = v if isinstance(v, tuple) else (v,)
        if isinstance(v, str) and v == "ghost":
            continue
        if len(parts) not in (1, 2) or not all(p is None or (isinstance(p, int) and p >= 1) for p in parts):
            raise UnsupportedInputError(
                f"per_layer[{name!r}] must be a positive int, None, 'ghost', or a (k_out, k_in) pair of "
                f"ints or None; got {v!r}"
            )
    modules = dict(inner.named_modules())
    unknown = [n for n in per_layer if n not in modules]
    if unknown:
        raise UnsupportedInputError(f"per_layer names no module of the model: {unknown}")


def _excluded(layer: str, covered: List[str], kept: Set[str]) -> bool:
    """Whether exclude= leaves out the whole layer (its parameters ``covered``); a part of it is refused."""
    left_out = [n for n in covered if n not in kept]
    if left_out and len(left_out) < len(covered):
        raise UnsupportedInputError(
            f"exclude= leaves out {left_out} but not the rest of layer {layer!r}: a layer's sketch covers all "
            f"its parameters; exclude the layer ({layer!r}) or freeze the parameter (requires_grad=False)"
        )
    return bool(left_out)


def _layer_batch_first(module: nn.Module) -> Optional[bool]:
    """A transformer encoder or decoder layer's layout (False: its inputs are [T, B, E]); None for
    other modules."""
    if not isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return None
    return bool(getattr(getattr(module, "self_attn", None), "batch_first", True))


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _named_by(name: str, entry: str) -> bool:
    """Whether an exclude= entry names the parameter ``name``: the parameter or a module holding it, by
    name, or by a shell-style pattern (``"*.relative_position_bias_table"``: every block's table) that
    matches the parameter's name or a module's."""
    if not any(c in entry for c in "*?["):
        return _under(name, entry)
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), entry) for i in range(1, len(parts) + 1))


def every_like(name: str) -> str:
    """The exclude= pattern for every parameter or module named as the last part of ``name``."""
    return "*." + name.rsplit(".", 1)[-1] if "." in name else name


def leave_out(name: str, what: str = "layer", it: str = "the layer") -> str:
    """What a refusal suggests: leave out ``it``, or every ``what`` of that name by one pattern."""
    return f"exclude= {it}, or {every_like(name)!r} for every {what} of that name"


def _within(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or inside it; everything is inside the model itself (prefix "")."""
    return prefix == "" or _under(name, prefix)


def _shown(names: Sequence[str]) -> List[str]:
    return [n or "<the model itself>" for n in names]


def _short(names: Sequence[str]) -> List[str]:
    """Module names that cover ``names`` (what a user would pass to exclude=)."""
    mods = sorted({n.rsplit(".", 1)[0] if "." in n else n for n in names})
    return mods[:8]


def makes_from_own(module: nn.Module) -> bool:
    """A leaf module of a class outside torch, with trainable parameters, that makes a tensor from its own
    parameters, no example passing through them: its forward takes no input (Hugging Face Swin's
    SwinRelativePositionBias gathers its table into the attention's bias), or it holds an integer buffer,
    an index into its parameters (timm's RelPosBias, whose forward adds the gathered table to the logits it
    is given, and whose get_bias method MaxViT's fused attention calls instead of the module). Its
    parameters are followed as parameters of its parent's forward, where that tensor meets the batch
    (capture/direct.py); a layer replayed per example (FunctionalSketch) would get the logits of B * m
    windows, or no call at all."""
    if next(module.children(), None) is not None or type(module).__module__.startswith("torch."):
        return False
    if sketch_class(module) is not None:
        return False  # a layer of a kind watch() sketches (an nn.Embedding subclass with a buffer of ids)
    if not any(p is not None and p.requires_grad for p in module._parameters.values()):
        return False
    if any(b is not None and not (b.is_floating_point() or b.is_complex()) for b in module._buffers.values()):
        return True
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return not any(p.kind in kinds and p.default is inspect.Parameter.empty for p in sig.parameters.values())
