"""The first recorded forward's check that a watched layer's parameters take part in nothing but its calls.

A layer's rows hold the gradient of its recorded calls. A model may also use the layer's weight in its own
forward, outside the layer: a language model whose output projection is ``F.linear(h, self.wte.weight)``
(a tied weight with no module of its own), a cosine classifier normalizing ``self.head.weight``. That part
of the gradient is in no row, and nothing would say so. (A layer never called in a step whose weight gets
a gradient is caught by the parameter hooks of ``WatchHandle._unrecorded_check``; this is the case where
the layer is called *and* its weight is used besides.)

So, once, when the first recorded forward of the watched model returns, its autograd graph is walked
from the outputs: every node that hands a gradient to a watched parameter's accumulator must be a node of
one of that parameter's layers' calls, i.e. reachable from the call's output through nodes made after
the call's input (autograd numbers its nodes in the order they are made, per thread). A node that makes
a view of the input for the sketch after the call (a sequence-first layer's transpose) is stepped over
to the input it views. Uses in the loss, outside the model's forward (an L2 penalty), are not seen: such
a part is the same for every example of the step, no difference between them.

Graphs this cannot read (a torch.compile'd region is one node) are not judged: nothing is refused there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn

from torchgrab.capture.graph import accumulates, sequence_nr


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in a forward's output: tuples, lists, dicts (Hugging Face's ModelOutput is one) and
    dataclasses."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))


class OutsideUses:
    """The calls recorded in the first recorded forward (their output's node and the sequence number of
    their input), and the check of the graph once that forward returns.

    ``owners`` maps id(parameter) to (its name in the model, the watched layers whose calls may use it).
    """

    def __init__(self, owners: Dict[int, Tuple[str, List[nn.Module]]]) -> None:
        self.owners = owners
        self.calls: List[Tuple[nn.Module, Any, int]] = []

    def add(self, module: nn.Module, x: Any, out: torch.Tensor) -> None:
        """Note one recorded call of ``module``: input ``x`` (or a view of it made after the call), ``out``."""
        node = out.grad_fn
        if node is None:
            return
        top = sequence_nr(node)
        inp = x.grad_fn if isinstance(x, torch.Tensor) else None
        while inp is not None and sequence_nr(inp) >= top and inp.next_functions:
            inp = inp.next_functions[0][0]  # a view of the input made after the call: the input itself
        self.calls.append((module, node, -1 if inp is None or sequence_nr(inp) >= top else sequence_nr(inp)))

    def _segments(self) -> Dict[nn.Module, Set[Any]]:
        """Each layer's nodes: those reachable from its calls' outputs, made after the call's input."""
        seen: Dict[nn.Module, Set[Any]] = {}
        for module, node, floor in self.calls:
            nodes = seen.setdefault(module, set())
            todo = [node]
            while todo:
                n = todo.pop()
                if n is None or n in nodes or accumulates(n) or sequence_nr(n) <= floor:
                    continue
                nodes.add(n)
                todo.extend(m for m, _ in n.next_functions)
        return seen

    def find(self, output: Any) -> Optional[Tuple[str, List[nn.Module], str, bool]]:
        """The first watched parameter that a node outside its layers' calls hands a gradient to, as (its
        name, its layers, that node's name, whether any of its layers was called); None when there is
        none, or the graph cannot be read."""
        roots = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        if not roots or not self.calls:
            return None
        segments = self._segments()
        found = None
        seen: Set[Any] = set()
        todo = list(roots)
        while todo:
            n = todo.pop()
            if n is None or n in seen:
                continue
            seen.add(n)
            if "CompiledFunction" in n.name():
                return None  # a compiled region: its uses of the weights are not visible
            for child, _ in n.next_functions:
                if child is None:
                    continue
                if accumulates(child):
                    owner = self.owners.get(id(child.variable))
                    if found is None and owner is not None and not any(n in segments.get(m, ()) for m in owner[1]):
                        called = any(m in segments for m in owner[1])
                        found = (owner[0], owner[1], n.name(), called)
                else:
                    todo.append(child)
        return found
