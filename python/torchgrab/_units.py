"""Micro-batch units (``unit_size=u``): the ordering ranks fixed groups of u consecutive dataset indices
(unit j = examples j*u .. min((j+1)*u, n) - 1; the last unit may be shorter) while the sampler still
yields example indices. Per-example gradients are averaged per unit here, on the caller's device, and
only the per-unit rows reach the native sampler.

A unit whose examples arrive over two steps is carried: the sum of its rows so far waits (one row per
parameter) until the rest comes. A unit that is cut (an early break, ``drop_last``, a ``skip`` over part
of it) gets no gradient, so it goes in the middle of the next order like any unit not seen.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from torchgrab.errors import ShapeError, StateDictError, UnitIndexError


def _leaves(grads: Any) -> List[Any]:
    if isinstance(grads, dict):
        return list(grads.values())
    if isinstance(grads, (list, tuple)):
        return list(grads)
    return [grads]


def _rebuild(grads: Any, leaves: List[Any]) -> Any:
    if isinstance(grads, dict):
        return dict(zip(grads.keys(), leaves))
    if isinstance(grads, (list, tuple)):
        return list(leaves)
    return leaves[0]


def _group_sums(leaf: Any, groups: np.ndarray, count: int) -> Any:
    """Sum the rows of `leaf` into `count` rows by group id, on the leaf's device, in float32 or wider."""
    if isinstance(leaf, torch.Tensor):
        acc_dtype = leaf.dtype if leaf.dtype in (torch.float32, torch.float64) else torch.float32
        out = torch.zeros((count,) + tuple(leaf.shape[1:]), dtype=acc_dtype, device=leaf.device)
        out.index_add_(0, torch.as_tensor(groups, dtype=torch.long, device=leaf.device), leaf.detach().to(acc_dtype))
        return out
    if isinstance(leaf, np.ndarray):
        acc_dtype = leaf.dtype if leaf.dtype in (np.float32, np.float64) else np.float32
        out = np.zeros((count,) + leaf.shape[1:], dtype=acc_dtype)
        np.add.at(out, groups, leaf.astype(acc_dtype, copy=False))
        return out
    raise ShapeError(f"unit averaging needs torch tensors or numpy arrays, got {type(leaf).__name__}")


def _add_to_first_row(s: Any, c: Any) -> None:
    if isinstance(s, torch.Tensor):
        s[0] += torch.as_tensor(c, device=s.device).reshape(s.shape[1:]).to(s.dtype)
    else:
        c = c.detach().cpu().numpy() if isinstance(c, torch.Tensor) else np.asarray(c)
        s[0] += c.reshape(s.shape[1:]).astype(s.dtype)


def _cast_like(x: Any, like: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(like.dtype).contiguous()
    return np.ascontiguousarray(x.astype(like.dtype, copy=False))


class UnitMap:
    """Maps unit orders to example orders and per-example gradients to per-unit means."""

    def __init__(self, n: int, unit_size: int) -> None:
        self.n = n
        self.u = unit_size
        self.units = -(-n // unit_size)
        self.last_size = n - (self.units - 1) * unit_size
        self.carry: Optional[Dict[str, Any]] = None  # {"unit", "count", "sums" (None if the unit was cut)}

    def size(self, units: np.ndarray) -> np.ndarray:
        return np.where(units == self.units - 1, self.last_size, self.u)

    def expand(self, unit_order: np.ndarray) -> np.ndarray:
        """The example order (uint32, length n) of a unit order."""
        unit_order = np.asarray(unit_order, dtype=np.int64)
        sizes = self.size(unit_order)
        ends = np.cumsum(sizes)
        offsets = np.arange(self.n, dtype=np.int64) - np.repeat(ends - sizes, sizes)
        return (np.repeat(unit_order * self.u, sizes) + offsets).astype(np.uint32)

    def reset(self) -> None:
        self.carry = None

    def cut(self, examples: np.ndarray) -> None:
        """`examples` (in order) are consumed without gradients: any unit among them is cut."""
        if examples.size == 0:
            return
        last = int(examples[-1]) // self.u
        done = int(examples[-1]) == min((last + 1) * self.u, self.n) - 1
        prior = self.carry["count"] if self.carry is not None and self.carry["unit"] == last else 0
        self.carry = None
        if not done:
            count = int(np.sum(np.asarray(examples) // self.u == last))
            self.carry = {"unit": last, "count": prior + count, "sums": None}

    def average(self, grads: Any, examples: np.ndarray, explicit: bool) -> Tuple[Any, np.ndarray]:
        """(per-unit mean gradients, unit ids) for rows belonging to `examples`.

        In FIFO mode (explicit=False) rows continue the running example order, so a unit may start in
        the carry and the last one may stay open. With explicit indices every unit must be complete.
        """
        unit_of = (np.asarray(examples, dtype=np.int64) // self.u).astype(np.int64)
        if explicit:
            sorted_units, first, inverse, counts = np.unique(
                unit_of, return_index=True, return_inverse=True, return_counts=True
            )
            if np.any(counts != self.size(sorted_units)) or len(np.unique(examples)) != len(examples):
                bad = sorted_units[counts != self.size(sorted_units)]
                raise UnitIndexError(
                    f"with unit_size={self.u} and explicit indices, each unit's examples must all come in the "
                    f"same step, once; incomplete or repeated units: {bad[:8].tolist() or 'repeated examples'}"
                )
            # Units in order of first appearance, so the rows are balanced in the order they came.
            by_appearance = np.argsort(first, kind="stable")
            rank = np.empty_like(by_appearance)
            rank[by_appearance] = np.arange(len(by_appearance))
            units, groups, counts = sorted_units[by_appearance], rank[inverse.reshape(-1)], counts[by_appearance]
            carry_in = None
            cut_first = False
        else:
            starts = np.flatnonzero(np.r_[True, unit_of[1:] != unit_of[:-1]])
            units = unit_of[starts]
            groups = np.repeat(np.arange(len(units)), np.diff(np.r_[starts, len(unit_of)]))
            counts = np.diff(np.r_[starts, len(unit_of)])
            carry_in = self.carry if self.carry is not None and self.carry["unit"] == units[0] else None
            if carry_in is not None:
                counts = counts.copy()
                counts[0] += carry_in["count"]
            # A unit entered mid-way with nothing carried (or carried as cut) cannot get a full mean.
            cut_first = (carry_in is None and int(examples[0]) != units[0] * self.u) or (
                carry_in is not None and carry_in["sums"] is None
            )
        leaves = _leaves(grads)
        sums = [_group_sums(leaf, groups, len(units)) for leaf in leaves]
        keep = np.ones(len(units), dtype=bool)
        keep[0] = not cut_first
        if carry_in is not None and carry_in["sums"] is not None:
            if len(carry_in["sums"]) != len(sums):
                raise ShapeError(
                    f"the open unit {carry_in['unit']} was started with {len(carry_in['sums'])} gradient "
                    f"segments, this step has {len(sums)}"
                )
            for s, c in zip(sums, carry_in["sums"]):
                _add_to_first_row(s, c)
        sizes = self.size(units)
        self.carry = None
        if not explicit and counts[-1] < sizes[-1]:
            # The last unit stays open: its partial sum waits for the rest of its examples.
            self.carry = {
                "unit": int(units[-1]),
                "count": int(counts[-1]),
                "sums": None
                if not keep[-1]
                else [s[-1:].clone() if isinstance(s, torch.Tensor) else s[-1:].copy() for s in sums],
            }
            keep[-1] = False
        idx = np.flatnonzero(keep)
        means = []
        for s, leaf in zip(sums, leaves):
            if isinstance(s, torch.Tensor):
                sel = s[torch.as_tensor(idx, device=s.device)]
                sel = sel / torch.as_tensor(sizes[idx], dtype=s.dtype, device=s.device).reshape(
                    (-1,) + (1,) * (s.dim() - 1)
                )
            else:
                sel = s[idx] / sizes[idx].reshape((-1,) + (1,) * (s.ndim - 1)).astype(s.dtype)
            means.append(_cast_like(sel, leaf))
        return _rebuild(grads, means), units[idx].astype(np.uint32)

    def state(self) -> Optional[Dict[str, Any]]:
        if self.carry is None:
            return None
        sums = self.carry["sums"]
        return {
            "unit": self.carry["unit"],
            "count": self.carry["count"],
            "sums": None if sums is None else [torch.as_tensor(s) for s in sums],
        }

    def load(self, state: Optional[Dict[str, Any]]) -> None:
        if state is None:
            self.carry = None
            return
        try:
            unit, count = int(state["unit"]), int(state["count"])
            sums = state["sums"]
        except (KeyError, TypeError, ValueError) as e:
            raise StateDictError(f"malformed unit carry in the state dict: {e}") from None
        if not (0 <= unit < self.units and 0 < count < self.size(np.array([unit]))[0]):
            raise StateDictError(f"unit carry for unit {unit} with {count} examples does not fit unit_size={self.u}")
        self.carry = {"unit": unit, "count": count, "sums": None if sums is None else list(sums)}
