"""``GraBSampler``: a ``torch.utils.data.Sampler`` whose next epoch's order comes from balancing this
epoch's per-example gradients (GraB). The ordering itself runs in Rust (``torchgrab._native``).

Indices are matched to gradients first in first out: the sampler remembers how far it has yielded and
how far it has been stepped, so DataLoader prefetching (``num_workers > 0``) needs nothing special.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Sized, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler

from torchgrab import _native
from torchgrab._segments import as_segments
from torchgrab.errors import CallOrderError, ShapeError, StateDictError, UnitIndexError, UnsupportedInputError
from torchgrab.gradients import per_example_gradients
from torchgrab._units import UnitMap

_BALANCING = {"grab", "mean", "pair", "recursive", "recursive-pair", "herding", "greedy"}
_STATE_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
# How state-dict arrays are stored as torch tensors (torch.load(weights_only=True) reads tensors, not
# NumPy arrays): unsigned buffers travel as same-width signed tensors, bit for bit.
_UNSIGNED_KEYS = {"current": np.uint32, "next": np.uint32, "fixed_order": np.uint32, "taken": np.uint64}
_UNSIGNED_KEYS.update({"codes": np.uint32, "pending_units": np.uint32, "pending_lens": np.uint32})
_YIELD_CHUNK = 1 << 13


def _to_torch(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        if obj.dtype == np.uint32:
            obj = obj.view(np.int32)
        elif obj.dtype == np.uint64:
            obj = obj.view(np.int64)
        return torch.from_numpy(obj)
    return obj


def _to_numpy(obj: Any, key: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: _to_numpy(v, k) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        a = obj.detach().cpu().contiguous().numpy()
        want = _UNSIGNED_KEYS.get(key)
        if want is not None:
            if a.dtype.itemsize != np.dtype(want).itemsize or a.dtype.kind not in "iu":
                raise StateDictError(f"state dict entry {key!r} has dtype {obj.dtype}; expected a {np.dtype(want).itemsize * 8}-bit integer tensor")
            a = a.view(want)
        return a
    return obj


class GraBSampler(Sampler[int]):
    """Drop-in sampler: ``DataLoader(ds, batch_size=B, sampler=GraBSampler(ds))``.

    Args:
        data_source: the data set (only its ``len`` is used); or give ``n``.
        n: number of units to order.
        ordering: one of :func:`torchgrab.orderings` (``"grab"`` by default).
        seed: seeds every random choice (first-epoch order, ``rr``/``so``/``wr``/``flipflop``, random signs).
        first_epoch: ``"random"`` (seeded permutation) or ``"identity"``, for balancing orderings.
        balance: ``"deterministic"`` sign rule (default) or ``"random"`` (self-balancing walk).
        dtype: ``torch.float32`` or ``torch.float64``, the precision of the running sums (products are
            always accumulated in float64).
        order: for ``ordering="fixed"``, the order to use (identity if omitted).
        delta: failure probability of the self-balancing walk (``balance="random"``).
        depth: tree depth D of ``"recursive"`` and ``"recursive-pair"`` (``depth=0`` is ``"grab"`` and
            ``"pair"`` exactly).
        rounds: herding passes per epoch for ``"herding"``.
        projection: ``(kind, k)`` with kind ``"gaussian"`` or ``"sparse"`` (or ``"identity"`` with k = d,
            for tests): balance a seeded k-dimensional random projection of each gradient instead of the
            gradient; the balancing state and per-unit cost drop from d to k.
        unit_size: order fixed groups of ``unit_size`` consecutive dataset indices as one unit (the paper's
            micro-batches); the sampler still yields example indices, and ``step`` takes one gradient per
            example (averaged per unit) or, with ``per_unit=True``, one per unit.
        max_memory: refuse balancing state over this many bytes (default: the machine's available
            memory, checked for the O(n d) orderings ``"herding"`` and ``"greedy"``).
    """

    def __init__(
        self,
        data_source: Optional[Sized] = None,
        *,
        n: Optional[int] = None,
        ordering: str = "grab",
        seed: int = 0,
        first_epoch: str = "random",
        balance: str = "deterministic",
        dtype: torch.dtype = torch.float32,
        order: Optional[Sequence[int]] = None,
        delta: float = 0.1,
        depth: int = 5,
        rounds: int = 1,
        projection: Optional[Tuple[str, int]] = None,
        unit_size: int = 1,
        max_memory: Optional[int] = None,
    ) -> None:
        if data_source is not None:
            size = len(data_source)
            if n is not None and n != size:
                raise ShapeError(f"n = {n} was given but len(data_source) = {size}")
            n = size
        if n is None:
            raise ShapeError("give the data set (GraBSampler(dataset)) or its size (GraBSampler(n=...))")
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ShapeError(f"n must be a positive integer, got {n!r}")
        if ordering not in _native.orderings():
            raise UnsupportedInputError(f"unknown ordering {ordering!r}; expected one of {', '.join(_native.orderings())}")
        if first_epoch not in ("random", "identity"):
            raise UnsupportedInputError(f"first_epoch must be 'random' or 'identity', got {first_epoch!r}")
        if balance not in ("deterministic", "random"):
            raise UnsupportedInputError(f"balance must be 'deterministic' or 'random', got {balance!r}")
        if dtype not in _STATE_DTYPES:
            raise UnsupportedInputError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if order is not None and ordering != "fixed":
            raise UnsupportedInputError("order= is only meaningful with ordering='fixed'")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UnsupportedInputError(f"seed must be a non-negative integer, got {seed!r}")
        for name, value, low in (("depth", depth, 0), ("rounds", rounds, 1), ("unit_size", unit_size, 1)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise UnsupportedInputError(f"{name} must be an integer >= {low}, got {value!r}")
        if projection is not None:
            if (
                not isinstance(projection, (tuple, list))
                or len(projection) != 2
                or projection[0] not in ("gaussian", "sparse", "identity")
                or not isinstance(projection[1], (int, np.integer))
                or projection[1] < 1
            ):
                raise UnsupportedInputError(
                    f"projection must be ('gaussian' | 'sparse' | 'identity', k) with k >= 1, got {projection!r}"
                )
            if ordering not in _BALANCING:
                raise UnsupportedInputError(f"projection= only applies to orderings that use gradients, not {ordering!r}")
            projection = (str(projection[0]), int(projection[1]))
        if max_memory is not None and (not isinstance(max_memory, (int, np.integer)) or max_memory < 0):
            raise UnsupportedInputError(f"max_memory must be a non-negative number of bytes, got {max_memory!r}")
        if unit_size > 1 and order is not None:
            raise UnsupportedInputError("order= gives an order of examples; it cannot be combined with unit_size > 1")
        self._units = UnitMap(int(n), int(unit_size)) if unit_size > 1 else None
        fixed = None
        if order is not None:
            fixed = np.asarray(order)
            if fixed.ndim != 1 or fixed.dtype.kind not in "iu" or (fixed.size and fixed.min() < 0):
                raise UnsupportedInputError("order must be a 1-D sequence of non-negative integers")
            fixed = np.ascontiguousarray(fixed, dtype=np.uint32)
        self._native = _native.NativeSampler(
            "grab" if ordering == "mean" else ordering,
            self._units.units if self._units is not None else int(n),
            int(seed),
            first_epoch == "random",
            balance == "random",
            float(delta),
            _STATE_DTYPES[dtype],
            fixed,
            depth=int(depth),
            rounds=int(rounds),
            projection=projection,
            max_memory=None if max_memory is None else int(max_memory),
        )
        self.unit_size = int(unit_size)
        self.ordering = ordering
        self.n = int(n)
        self.dtype = dtype
        self._lock = threading.RLock()
        self._epoch = 0
        self._reset_cursor(None)
        self._resume = False

    # ---------------------------------------------------------------- Sampler contract
    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        """Number the next epoch (torch's convention). Without it, each ``__iter__`` advances by one."""
        if epoch < 0:
            raise UnsupportedInputError(f"epoch must be non-negative, got {epoch}")
        self._epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        with self._lock:
            if self._resume:
                # Resuming a checkpoint taken mid-epoch: continue after the last stepped index.
                self._resume = False
                self._yielded = self._stepped
            else:
                self._reset_cursor(self._examples(self._native.begin_epoch(self._epoch)))
                self._epoch += 1
            self._generation += 1
            return self._yield_from(self._generation)

    def _yield_from(self, generation: int) -> Iterator[int]:
        order = self._order
        start = self._yielded
        for lo in range(start, len(order), _YIELD_CHUNK):
            for i in order[lo : lo + _YIELD_CHUNK].tolist():
                if generation != self._generation:
                    return  # a newer epoch began; this iterator is stale
                self._yielded += 1
                yield i

    def _examples(self, order: np.ndarray) -> np.ndarray:
        """The example order of a native (unit) order."""
        return order if self._units is None else self._units.expand(order)

    def _reset_cursor(self, order: Optional[np.ndarray]) -> None:
        if getattr(self, "_units", None) is not None:
            self._units.reset()
        self._order = order
        self._yielded = 0  # indices handed out this epoch
        self._stepped = 0  # of those, how many have received their gradient
        self._generation = getattr(self, "_generation", 0)

    # ---------------------------------------------------------------- gradients in
    @property
    def balances(self) -> bool:
        """Whether this ordering uses gradients (otherwise ``step`` only advances the queue)."""
        return self.ordering in _BALANCING

    @property
    def pending(self) -> int:
        """Indices yielded this epoch that have not been stepped yet."""
        return self._yielded - self._stepped

    def _take(self, rows: int, indices: Optional[Any]) -> np.ndarray:
        if indices is not None:
            idx = np.asarray(indices.detach().cpu() if isinstance(indices, torch.Tensor) else indices)
            if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
                raise UnitIndexError(f"indices must be a 1-D sequence of integers, got shape {idx.shape} dtype {idx.dtype}")
            if idx.size != rows:
                raise ShapeError(f"the gradients have {rows} rows but {idx.size} indices were given")
            if idx.size and (idx.min() < 0 or idx.max() >= self.n):
                raise UnitIndexError(f"indices must lie in [0, {self.n}), got range [{idx.min()}, {idx.max()}]")
            return np.ascontiguousarray(idx, dtype=np.uint32)
        if self._order is None:
            raise CallOrderError("step() was called before the sampler was iterated; iterate it (or the DataLoader) first")
        if rows > self.pending:
            raise ShapeError(
                f"got {rows} gradient rows but only {self.pending} indices are pending "
                f"(yielded {self._yielded}, stepped {self._stepped} this epoch)"
            )
        return self._order[self._stepped : self._stepped + rows]

    def step(self, grads: Any, indices: Optional[Any] = None, *, per_unit: bool = False) -> None:
        """Feed per-example gradients: a tensor/array [B, ...] or a dict/list of per-parameter [B, ...].

        Row r belongs to the r-th pending index (first in, first out), unless ``indices`` says otherwise.
        With ``unit_size > 1``, rows are per example and averaged per unit (``indices``, if given, are
        example indices and must cover whole units), or with ``per_unit=True`` one row per unit
        (``indices``, if given, are unit indices). Refused input raises a :class:`torchgrab.GraBError`
        and changes nothing.
        """
        if self._units is not None:
            with self._lock:
                return self._step_units(grads, indices, per_unit)
        if per_unit:
            raise UnsupportedInputError("per_unit=True needs unit_size > 1")
        with self._lock:
            segments, kind, rows = as_segments(grads)
            idx = self._take(rows, indices)
            self._native.step(segments, kind, idx)
            if indices is None:
                self._stepped += rows

    def _step_units(self, grads: Any, indices: Optional[Any], per_unit: bool) -> None:
        units = self._units
        assert units is not None
        rows = as_segments(grads)[2]
        if per_unit:
            if indices is not None:
                idx = np.asarray(indices.detach().cpu() if isinstance(indices, torch.Tensor) else indices)
                if idx.ndim != 1 or idx.dtype.kind not in "iu" or idx.size != rows:
                    raise UnitIndexError(f"per_unit indices must be {rows} unit ids, got shape {idx.shape} dtype {idx.dtype}")
                self._native.step(*as_segments(grads)[:2], np.ascontiguousarray(idx, dtype=np.uint32))
                return
            if units.carry is not None:
                raise CallOrderError(
                    f"per_unit=True steps whole units, but unit {units.carry['unit']} is half stepped per example"
                )
            if self._order is None:
                raise CallOrderError("step() was called before the sampler was iterated; iterate it first")
            unit_order = self._order[self._stepped :].astype(np.int64) // units.u
            starts = np.flatnonzero(np.r_[True, unit_order[1:] != unit_order[:-1]])
            if rows > len(starts):
                raise ShapeError(f"got {rows} unit gradients but only {len(starts)} units remain this epoch")
            end = starts[rows] if rows < len(starts) else len(unit_order)
            if end > self.pending:
                raise ShapeError(
                    f"got {rows} unit gradients, but their {end} examples are not all yielded yet "
                    f"({self.pending} pending)"
                )
            self._native.step(*as_segments(grads)[:2], np.ascontiguousarray(unit_order[starts[:rows]], dtype=np.uint32))
            self._stepped += int(end)
            return
        examples = self._take(rows, indices)
        saved = units.carry
        try:
            means, unit_ids = units.average(grads, examples, explicit=indices is not None)
            if unit_ids.size:
                segments, kind, _ = as_segments(means)
                self._native.step(segments, kind, unit_ids)
        except BaseException:
            units.carry = saved  # a refused step changes nothing
            raise
        if indices is None:
            self._stepped += rows

    def skip(self, rows: int) -> None:
        """Mark ``rows`` pending indices as consumed without gradients (they go to the middle of the next order)."""
        with self._lock:
            examples = self._take(rows, None)
            if self._units is not None:
                self._units.cut(examples)
            self._stepped += rows

    def backward(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        inputs: Any,
        targets: Any,
        *,
        indices: Optional[Any] = None,
        chunk_size: Optional[int] = None,
    ) -> torch.Tensor:
        """Per-example gradients -> the sampler; their mean -> each parameter's ``.grad``; returns the mean loss.

        Replaces ``loss.backward()`` in a training loop. For orderings that do not use gradients
        (``rr``, ``so``, ...), it runs an ordinary backward pass and only advances the queue.
        """
        if not self.balances:
            loss = loss_fn(model(**inputs) if isinstance(inputs, dict) else model(*inputs) if isinstance(inputs, tuple) else model(inputs), targets)
            loss.backward()
            b = next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else (inputs[0] if isinstance(inputs, tuple) else inputs).shape[0]
            if indices is None:
                self.skip(b)
            return loss.detach()
        grads, losses = per_example_gradients(model, loss_fn, inputs, targets, chunk_size=chunk_size)
        grads = {k: g if g.is_contiguous() else g.contiguous() for k, g in grads.items()}
        self.step(grads, indices=indices)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, g in grads.items():
                p = params[name]
                mean = g.mean(dim=0)
                if p.grad is None:
                    p.grad = mean
                else:
                    p.grad += mean
        return losses.mean()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly: plain ints, strings, lists and tensors
        (``torch.load(weights_only=True)`` reads it)."""
        with self._lock:
            return {
                "native": _to_torch(self._native.state()),
                "epoch": self._epoch,
                "in_epoch": self._order is not None,
                "yielded": self._yielded,
                "stepped": self._stepped,
                "unit_carry": None if self._units is None else self._units.state(),
            }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`. A state of another ordering, n or dtype, or a corrupted one,
        raises :class:`torchgrab.StateDictError` and leaves this sampler as it was."""
        if not isinstance(state, dict) or "native" not in state:
            raise StateDictError("expected a dict produced by GraBSampler.state_dict()")
        native_state = _to_numpy(state["native"])
        try:
            native = _native.NativeSampler.from_state(native_state)
        except StateDictError:
            raise
        ordering = "grab" if self.ordering == "mean" else self.ordering
        native_n = self.n if self._units is None else self._units.units
        if native.ordering != ordering or native.n != native_n:
            raise StateDictError(
                f"the state dict is for ordering={native.ordering!r}, n={native.n} units; "
                f"this sampler has ordering={ordering!r}, n={native_n} units"
            )
        if native_state.get("state_dtype") != _STATE_DTYPES[self.dtype]:
            raise StateDictError(f"the state dict holds {native_state.get('state_dtype')} sums; this sampler uses {self.dtype}")
        try:
            epoch, yielded, stepped = int(state["epoch"]), int(state["yielded"]), int(state["stepped"])
            in_epoch = bool(state["in_epoch"])
        except (KeyError, TypeError, ValueError) as e:
            raise StateDictError(f"the state dict is missing or has a malformed cursor entry: {e}") from None
        order = self._examples(native.current_order()) if in_epoch else None
        if order is not None and not (0 <= stepped <= yielded <= len(order)):
            raise StateDictError(f"inconsistent cursors: stepped={stepped}, yielded={yielded}, n={len(order)}")
        carry = None
        if self._units is not None:
            carry = UnitMap(self._units.n, self._units.u)
            carry.load(state.get("unit_carry") if order is not None else None)
        with self._lock:
            self._native = native
            self._epoch = epoch
            self._reset_cursor(order)
            self._generation += 1
            self._yielded, self._stepped = (yielded, stepped) if order is not None else (0, 0)
            if self._units is not None:
                self._units.carry = carry.carry
            self._resume = order is not None and stepped < len(order)

    def __getstate__(self) -> Dict[str, Any]:
        config = {k: getattr(self, k) for k in ("ordering", "n", "dtype", "unit_size")}
        return {"config": config, "state": self.state_dict()}

    def __setstate__(self, data: Dict[str, Any]) -> None:
        native_state = _to_numpy(data["state"]["native"])
        self.ordering = data["config"]["ordering"]
        self.n = data["config"]["n"]
        self.dtype = data["config"]["dtype"]
        self.unit_size = data["config"].get("unit_size", 1)
        self._units = UnitMap(self.n, self.unit_size) if self.unit_size > 1 else None
        self._lock = threading.RLock()
        self._native = _native.NativeSampler.from_state(native_state)
        self._epoch = 0
        self._generation = 0
        self._reset_cursor(None)
        self._resume = False
        self.load_state_dict(data["state"])

    @property
    def state_bytes(self) -> int:
        """Bytes of ordering state held in Rust (orders, bitmaps, running sums)."""
        return self._native.state_bytes()

    def __repr__(self) -> str:
        return f"GraBSampler(n={self.n}, ordering={self.ordering!r}, epoch={self._epoch})"
