"""``GraBSampler``: a ``torch.utils.data.Sampler`` whose next epoch's order comes from balancing this
epoch's per-example gradients (GraB). The ordering itself runs in Rust (``torchgrab._native``).

Indices are matched to gradients first in first out: the sampler remembers how far it has yielded and
how far it has been stepped, so DataLoader prefetching (``num_workers > 0``) needs nothing special.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Sized, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Sampler

from torchgrab import _native
from torchgrab._background import StepLock
from torchgrab._cursor import Yielded
from torchgrab._segments import OuterRows, as_segments, gradient_items
from torchgrab._units import UnitMap
from torchgrab.capture.defaults import DEFAULT_BUDGET, DEFAULT_SKETCH
from torchgrab.errors import CallOrderError, ShapeError, StateDictError, UnitIndexError, UnsupportedInputError
from torchgrab.gradients import batch_size, call_model, capture
from torchgrab.ondevice import Factored, OnDeviceBalancer

if TYPE_CHECKING:
    from torchgrab.capture.watch import WatchHandle

_BALANCING = {"grab", "mean", "pair", "recursive", "recursive-pair", "herding", "greedy"}
_STATE_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
# How state-dict arrays are stored as torch tensors (torch.load(weights_only=True) reads tensors, not
# NumPy arrays): unsigned buffers travel as same-width signed tensors, bit for bit.
_UNSIGNED_KEYS = {"current": np.uint32, "next": np.uint32, "fixed_order": np.uint32, "taken": np.uint64}
_UNSIGNED_KEYS.update({"codes": np.uint32, "pending_units": np.uint32, "pending_lens": np.uint32})
_UNSIGNED_KEYS["next_back"] = np.uint32
_YIELD_CHUNK = 1 << 13
# Herding passes per epoch at most: the Rust core's MAX_ROUNDS.
_MAX_ROUNDS = 1000
# depth=None: each tree ordering's own default, from benchmarks/depth.py (docs/orderings.md, "Choosing
# depth"; 3 seeds, Gaussian vectors and MNIST logistic-regression gradients, B = 32). recursive: any
# D >= 1 balances the first epochs better than D = 0 (= grab), and deeper trees gain nothing more while
# holding 2^(D+1) - 1 sums of d. recursive-pair: discrepancy grows with D in every setting (a group of
# 2^D units is placed as one block), so the shallowest tree that is recursive at all.
DEFAULT_DEPTH = {"recursive": 1, "recursive-pair": 1}
_NATIVE_DEPTH = 5  # what the orderings without a tree pass (unused by them; their state dicts keep it)
# non_blocking steps with fewer gradient elements (B x d) run blocking: handing a step to the
# background thread and back costs 25-50 us (benchmarks/non_blocking.py, last table), more than the
# kernel takes for such a step, so there is nothing to gain by overlapping it.
_BACKGROUND_MIN_ELEMENTS = 1 << 16


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


def _copy_dicts(obj: Any) -> Any:
    """Fresh dicts and lists around the same tensors: callers may edit keys without touching the cache."""
    if isinstance(obj, dict):
        return {k: _copy_dicts(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return list(obj)
    return obj


def _to_numpy(obj: Any, key: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: _to_numpy(v, k) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        a = obj.detach().cpu().contiguous().numpy()
        want = _UNSIGNED_KEYS.get(key)
        if want is None and a.dtype in (np.int32, np.int64):
            # The native state holds no signed integer arrays: an integer array under a key not listed
            # above (a field a newer ordering exports) is an unsigned buffer, stored bit for bit.
            want = np.uint32 if a.dtype == np.int32 else np.uint64
        if want is not None:
            if a.dtype.itemsize != np.dtype(want).itemsize or a.dtype.kind not in "iu":
                raise StateDictError(
                    f"state dict entry {key!r} has dtype {obj.dtype}; expected a {np.dtype(want).itemsize * 8}-bit integer tensor"
                )
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
            ``"pair"`` exactly); ``None`` (default): the ordering's own default, ``DEFAULT_DEPTH``.
        rounds: herding passes per epoch for ``"herding"``.
        projection: ``(kind, k)`` with kind ``"gaussian"`` or ``"sparse"`` (or ``"identity"`` with k = d,
            for tests): balance a seeded k-dimensional random projection of each gradient instead of the
            gradient; the balancing state and per-unit cost drop from d to k.
        unit_size: order fixed groups of ``unit_size`` consecutive dataset indices as one unit (the paper's
            micro-batches); the sampler still yields example indices, and ``step`` takes one gradient per
            example (averaged per unit) or, with ``per_unit=True``, one per unit.
        max_memory: refuse balancing state over this many bytes (default: the machine's available
            memory, checked for the O(n d) orderings ``"herding"`` and ``"greedy"``).
        device_path: where ``grab``/``pair`` do the d-dimensional work. ``"auto"`` (default): on the
            gradients' device for non-CPU tensors (u = Z s0 and Z Z^T there, only B + B^2 numbers to the
            host, see :mod:`torchgrab.ondevice`), the Rust kernel for CPU tensors and arrays; ``"always"``:
            the on-device path for every input (also CPU tensors); ``"never"``: the Rust kernel only
            (non-CPU tensors are refused rather than copied).
    """

    # Indices handed out this epoch, most by a list iterator and counted when read (torchgrab._cursor).
    _yielded = Yielded()

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
        depth: Optional[int] = None,
        rounds: int = 1,
        projection: Optional[Tuple[str, int]] = None,
        unit_size: int = 1,
        max_memory: Optional[int] = None,
        device_path: str = "auto",
    ) -> None:
        if data_source is not None:
            size = len(data_source)
            if n is not None and n != size:
                raise ShapeError(f"n = {n} was given but len(data_source) = {size}")
            n = size
        if n is None:
            raise ShapeError("give the data set (GraBSampler(dataset)) or its size (GraBSampler(n=...))")
        if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n == 0:
            raise ShapeError("the data set is empty (n = 0); a sampler needs at least one example to order")
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ShapeError(f"n must be a positive integer, got {n!r}")
        if ordering not in _native.orderings():
            raise UnsupportedInputError(
                f"unknown ordering {ordering!r}; expected one of {', '.join(_native.orderings())}"
            )
        if first_epoch not in ("random", "identity"):
            raise UnsupportedInputError(f"first_epoch must be 'random' or 'identity', got {first_epoch!r}")
        if balance not in ("deterministic", "random"):
            raise UnsupportedInputError(f"balance must be 'deterministic' or 'random', got {balance!r}")
        if dtype not in _STATE_DTYPES:
            raise UnsupportedInputError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if device_path not in ("auto", "always", "never"):
            raise UnsupportedInputError(f"device_path must be 'auto', 'always' or 'never', got {device_path!r}")
        if device_path == "always" and not (
            ordering in ("grab", "mean", "pair") and projection is None and unit_size == 1
        ):
            raise UnsupportedInputError(
                "device_path='always' supports ordering 'grab' or 'pair' without projection or unit_size; "
                f"got ordering={ordering!r}, projection={projection!r}, unit_size={unit_size}"
            )
        if order is not None and ordering != "fixed":
            raise UnsupportedInputError("order= is only meaningful with ordering='fixed'")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UnsupportedInputError(f"seed must be a non-negative integer, got {seed!r}")
        for name, value, low in (
            ("depth", 0 if depth is None else depth, 0),
            ("rounds", rounds, 1),
            ("unit_size", unit_size, 1),
        ):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise UnsupportedInputError(f"{name} must be an integer >= {low}, got {value!r}")
        if rounds > _MAX_ROUNDS:
            raise UnsupportedInputError(
                f"rounds must be at most {_MAX_ROUNDS} (herding passes per epoch), got {rounds!r}"
            )
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
                raise UnsupportedInputError(
                    f"projection= only applies to orderings that use gradients, not {ordering!r}"
                )
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
        self._lock = StepLock()
        self._native = _native.NativeSampler(
            "grab" if ordering == "mean" else ordering,
            self._units.units if self._units is not None else int(n),
            int(seed),
            first_epoch == "random",
            balance == "random",
            float(delta),
            _STATE_DTYPES[dtype],
            fixed,
            depth=int(DEFAULT_DEPTH.get(ordering, _NATIVE_DEPTH) if depth is None else depth),
            rounds=int(rounds),
            projection=projection,
            max_memory=None if max_memory is None else int(max_memory),
        )
        self.unit_size = int(unit_size)
        self.ordering = ordering
        self.seed = int(seed)
        self._depth_asked = None if depth is None else int(depth)  # checked against a loaded state
        self._watchers: List[Any] = []  # WatchHandles feeding this sampler (see watch())
        self.n = int(n)
        self.dtype = dtype
        self._native_cache: Optional[Tuple[int, Dict[str, Any]]] = None
        self._held: Optional[Tuple[int, int, int, int]] = None  # see load_state_dict(newer_than_loader=)
        # A newer_than_loader state was kept over the loader's snapshot of the same epoch ("same") or
        # of the time before that epoch began ("before"); False otherwise.
        self._kept_over_loader: Any = False
        self._replay_from: Optional[int] = None  # the loader replays (and discards) from here, see _EpochIterator
        self._epoch = 0
        self._reset_cursor(None)
        self._resume = self._resumable = self._epoch_set = False
        self._late = False  # set_epoch numbered the running epoch (see _next_number)
        self.device_path = device_path
        # The on-device path implements grab and pair on raw gradients (no sketch, no unit averaging).
        self._device_capable = ordering in ("grab", "mean", "pair") and projection is None and unit_size == 1
        self._ondevice: Optional[OnDeviceBalancer] = None
        self._dense_used = False

    # ---------------------------------------------------------------- Sampler contract
    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        """Number the next epoch (torch's convention). Without it, each ``__iter__`` advances by one.

        Called while an epoch runs with that epoch's own number (a loader with workers begins an epoch when
        its iterator is made, and Lightning calls set_epoch after that), it numbers the running epoch: once
        that epoch has been iterated to its end, the next is numbered after it. An epoch left before its end
        and begun again (a Trainer retrying with a smaller batch) keeps the number."""
        if epoch < 0:
            raise UnsupportedInputError(f"epoch must be non-negative, got {epoch}")
        with self._lock:
            self._late = (
                self._native.epochs_begun > 0
                and not self._resumable
                and not self._finished
                and epoch == self._native.epoch
                and (self._epoch == epoch + 1 or (self._late and self._epoch == epoch))  # (or again)
            )
            self._epoch = int(epoch)
            self._epoch_set = True

    def _next_number(self) -> int:
        """The number the next epoch begins with (without set_epoch): after a set_epoch that numbered the
        running epoch, the one after it once that epoch was iterated to its end."""
        return self._native.epoch + 1 if self._late and self._finished else self._epoch

    def __iter__(self) -> Iterator[int]:
        # The epoch begins on the first next(), not here: a loader that calls iter() and then
        # load_state_dict() (torchdata's StatefulDataLoader does) wastes no O(n) epoch on the way.
        return _EpochIterator(self)

    def _start(self, continue_saved: bool) -> int:
        """Begin (or, after load_state_dict, resume) an epoch for a new iterator; returns its generation."""
        resume = self._resume or (continue_saved and self._resumable)
        if self._resumable and self._epoch_set:
            # After a load, set_epoch says which: the saved epoch's own number continues it (even if
            # nothing is left of it), any other number begins that epoch.
            resume = self._epoch == self._native.epoch
        self._epoch = self._next_number()
        self._resume = self._resumable = self._epoch_set = self._late = False
        self._kept_over_loader = False
        if resume:
            # Resuming a checkpoint taken mid-epoch: continue after the last stepped index.
            self._yielded = self._stepped if self._replay_from is None else self._replay_from
            self._replay_from = None
            self._epoch = self._native.epoch + 1
        else:
            self._replay_from = None
            self._reset_cursor(self._examples(self._native.begin_epoch(self._epoch)))
            self._native_cache = None
            self._epoch += 1
            if self._ondevice is not None:
                self._ondevice.end_epoch()
        self._generation += 1
        return self._generation

    def _examples(self, order: np.ndarray) -> np.ndarray:
        """The example order of a native (unit) order."""
        return order if self._units is None else self._units.expand(order)

    def _reset_cursor(self, order: Optional[np.ndarray]) -> None:
        if getattr(self, "_units", None) is not None:
            self._units.reset()
        self._order = order
        self._yielded = 0  # indices handed out this epoch
        self._finished = False  # an iterator of this epoch has reached its end
        self._stepped = 0  # of those, how many have received their gradient
        self._generation = getattr(self, "_generation", 0)

    @property
    def _native(self) -> Any:
        """The Rust sampler, once a step still running in the background (``non_blocking``) is done."""
        if self._lock.busy:
            self._lock.wait()
        return self._core

    @_native.setter
    def _native(self, core: Any) -> None:
        self._core = core

    # ---------------------------------------------------------------- gradients in
    @property
    def balances(self) -> bool:
        """Whether this ordering uses gradients (otherwise ``step`` only advances the queue)."""
        return self.ordering in _BALANCING

    @property
    def pending(self) -> int:
        """Indices yielded this epoch that have not been stepped yet (after feeding what :meth:`watch`
        has gathered)."""
        if self._watchers:
            self._drain_watchers()
        return self._unstepped

    @property
    def _unstepped(self) -> int:
        # What `pending` reports, without feeding watch() rows first: the count step() itself checks
        # (feeding there would step later rows before the ones being stepped).
        return self._yielded - self._stepped

    def _take(self, rows: int, indices: Optional[Any]) -> np.ndarray:
        if indices is not None:
            idx = np.asarray(indices.detach().cpu() if isinstance(indices, torch.Tensor) else indices)
            if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
                raise UnitIndexError(
                    f"indices must be a 1-D sequence of integers, got shape {idx.shape} dtype {idx.dtype}"
                )
            if idx.size != rows:
                raise ShapeError(f"the gradients have {rows} rows but {idx.size} indices were given")
            if idx.size and (idx.min() < 0 or idx.max() >= self.n):
                raise UnitIndexError(f"indices must lie in [0, {self.n}), got range [{idx.min()}, {idx.max()}]")
            return np.ascontiguousarray(idx, dtype=np.uint32)
        if self._order is None:
            raise CallOrderError(
                "step() was called before the sampler was iterated; iterate it (or the DataLoader) first"
            )
        if rows > self._unstepped:
            raise ShapeError(
                f"got {rows} gradient rows but only {self._unstepped} indices are pending "
                f"(yielded {self._yielded}, stepped {self._stepped} this epoch)"
            )
        return self._order[self._stepped : self._stepped + rows]

    def step(
        self, grads: Any, indices: Optional[Any] = None, *, per_unit: bool = False, non_blocking: bool = False
    ) -> None:
        """Feed per-example gradients: a tensor/array [B, ...] or a dict/list of per-parameter [B, ...]
        (where a Linear layer's may be a :class:`torchgrab.Factored`, its factors: ``grab`` and ``pair``).

        Row r belongs to the r-th pending index (first in, first out), unless ``indices`` says otherwise.
        With ``unit_size > 1``, rows are per example and averaged per unit (``indices``, if given, are
        example indices and must cover whole units), or with ``per_unit=True`` one row per unit
        (``indices``, if given, are unit indices). Refused input raises a :class:`torchgrab.GraBError`
        and changes nothing.

        ``non_blocking=True`` (as in torch's ``Tensor.to``): once the input is checked, the Rust kernel
        balances on a background thread and ``step`` returns, so the training loop computes the next
        batch meanwhile (on a core torch leaves free). Do not write to ``grads`` until the next call on
        the sampler: every call waits for the step first (:meth:`synchronize` waits explicitly), and a
        step the kernel refuses (a non-finite gradient) raises at that call, the sampler then being as
        before it. The orders are those of blocking steps. The gradients stay referenced until the
        step is done: with ``backward``, two batches of per-example gradients exist at peak. Steps of
        fewer than 65,536 gradient elements (B x d), with ``unit_size > 1`` or on the on-device path
        are blocking.
        """
        if not isinstance(non_blocking, bool):
            raise UnsupportedInputError(f"non_blocking must be True or False, got {non_blocking!r}")
        if isinstance(grads, OuterRows) and self._units is not None:
            grads = grads.expand()  # (watch()'s rows by their factors) units are averaged from rows
        if self._units is not None:
            with self._lock:
                return self._step_units(grads, indices, per_unit)
        if per_unit:
            raise UnsupportedInputError("per_unit=True needs unit_size > 1")
        with self._lock:
            if isinstance(grads, OuterRows):
                # The on-device path takes rows; where the factors' host array would go there, so do they.
                device = self._wants_device_path(grads.factors)
                grads = grads.expand() if device else grads
            else:
                device = self._wants_device_path(grads)
            if device:
                tensors, rows = self._device_segments(grads)
                idx = self._take(rows, indices)
                if self._ondevice is None:
                    self._ondevice = OnDeviceBalancer(
                        "grab" if self.ordering == "mean" else self.ordering, self.n, self.dtype
                    )
                self._ondevice.step(self._native, tensors, idx)
                self._native_cache = None
                if indices is None:
                    self._stepped += rows
                return
            self._step_dense(grads, indices, background=non_blocking)

    def _step_dense(self, grads: Any, indices: Optional[Any], background: bool) -> None:
        """The Rust kernel's step (lock held); ``background``: started on a rayon worker, see _background."""
        outer = grads if isinstance(grads, OuterRows) else None
        if outer is not None:
            rows, width = outer.rows, outer.width
        else:
            segments, kind, rows = as_segments(grads)
            width = sum(seg.shape[1] for seg in segments)
        idx = self._take(rows, indices)
        if background and rows * width < _BACKGROUND_MIN_ELEMENTS:
            background = False
        native, dense_used = self._native, self._dense_used
        # In the background: checked now (a refusal raises here and lends nothing); the Rust side keeps
        # the arrays alive and copies the indices, the caller promises not to write the arrays meanwhile.
        if outer is not None:
            native.step_outer(outer.factors, outer.p, outer.bias, idx, background)
        elif not background:
            native.step(segments, kind, idx)
        else:
            native.step_start(segments, kind, idx)
        if background:

            def undo() -> None:  # the kernel refused the step: take back the bookkeeping below
                self._dense_used = dense_used
                if indices is None:
                    self._stepped -= rows

            self._lock.started(native, undo)
        if self.balances:
            self._native_cache = None
        self._dense_used = self._dense_used or self.balances
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
                    raise UnitIndexError(
                        f"per_unit indices must be {rows} unit ids, got shape {idx.shape} dtype {idx.dtype}"
                    )
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
            if end > self._unstepped:
                raise ShapeError(
                    f"got {rows} unit gradients, but their {end} examples are not all yielded yet "
                    f"({self._unstepped} pending)"
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

    def _wants_device_path(self, grads: Any) -> bool:
        """Which path a step takes (see ``device_path``); one sampler never mixes the two."""
        # A factored gradient (a Linear layer's, never formed) is balanced by its Gram products only.
        if self.balances and any(isinstance(g, Factored) for g in gradient_items(grads)):
            if self.device_path == "never" or not self._device_capable or self._dense_used:
                raise UnsupportedInputError(
                    "factored gradients (a Linear layer's, balanced by their Gram products) need ordering "
                    "'grab' or 'pair' without projection or unit_size, device_path other than 'never', and a "
                    f"sampler that has not balanced dense rows with the Rust kernel this run (ordering "
                    f"{self.ordering!r}, device_path {self.device_path!r})"
                )
            return True
        if not self.balances or self.device_path == "never" or not self._device_capable:
            return False  # device tensors then get the Rust kernel's clear refusal
        if self._ondevice is not None:
            return True
        items = gradient_items(grads)
        first = items[0] if items else None
        on_device = isinstance(first, torch.Tensor) and first.device.type != "cpu"
        wants = self.device_path == "always" or on_device
        if wants and self._dense_used:
            raise UnsupportedInputError(
                "this sampler has balanced CPU gradients with the Rust kernel this run; gradients on "
                f"{first.device if isinstance(first, torch.Tensor) else 'the host'} would need the on-device path. Use one device per sampler."
            )
        return wants

    @staticmethod
    def _device_segments(grads: Any) -> "tuple[list, int]":
        items = gradient_items(grads)
        if not items:
            raise ShapeError("step() got an empty collection of gradients")
        tensors = []
        for k, g in enumerate(items):
            if isinstance(g, Factored):
                tensors.append(g)
                continue
            if isinstance(g, np.ndarray):
                g = torch.from_numpy(g)  # shares memory
            if not isinstance(g, torch.Tensor):
                raise UnsupportedInputError(
                    f"gradient segment {k} is a {type(g).__name__}; expected a torch.Tensor or numpy.ndarray"
                )
            if not g.is_floating_point():
                raise UnsupportedInputError(
                    f"gradient segment {k} has dtype {g.dtype}; expected a floating-point tensor"
                )
            if g.device.type == "meta":
                raise UnsupportedInputError(
                    f"gradient segment {k} is on the meta device: it holds no values to balance"
                )
            if g.dim() == 0:
                raise ShapeError(f"gradient segment {k} is a scalar; expected a leading batch dimension [B, ...]")
            tensors.append(g)
        rows = {int(t.shape[0]) for t in tensors}
        if len(rows) > 1:
            raise ShapeError(f"every gradient segment must have the same leading dimension B, got {sorted(rows)}")
        b = rows.pop()
        if b == 0:
            raise ShapeError("step() got a batch of 0 rows; a step needs at least one example")
        # Zero-width segments hold nothing to balance (a Factored one is out x in, never empty).
        tensors = [t for t in tensors if isinstance(t, Factored) or t[0].numel() > 0]
        if not tensors:
            raise ShapeError("the gradients have width d = 0; there is nothing to balance")
        return tensors, b

    def synchronize(self) -> None:
        """Wait for a step left running in the background (``non_blocking=True``), if any, and raise its
        error if the kernel refused it. Every other call does this first, so it is only needed to time
        a loop, or to see a refused step at a point of one's choosing. Rows gathered by :meth:`watch`
        and not yet fed are fed first."""
        self._drain_watchers()
        with self._lock:
            pass

    def _drain_watchers(self, epoch_ends: bool = False) -> None:
        for w in list(getattr(self, "_watchers", ())):
            if epoch_ends:
                w._drop_failed()  # a batch of this epoch that raised and was given up on is this epoch's
            w.flush()

    def skip(self, rows: int) -> None:
        """Mark ``rows`` pending indices as consumed without gradients (they go to the middle of the next order).

        With :meth:`watch`, this is the call for a batch the loop gives up on, ``sampler.skip(len(y))``:
        one never given to the model (after the rows gathered so far, so that they keep their indices),
        or one whose forward, loss or backward raised (its step is dropped, and skipped once). An error
        in the model's forward or backward needs no call: such a step is dropped at the next forward;
        one in the loss does, since a forward whose graph is dropped on purpose (a loss logged with grad
        on) looks the same and takes nothing from the sampler.
        """
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 0:
            raise UnsupportedInputError(f"skip(rows): rows must be a non-negative integer, got {rows!r}")
        rows = int(rows)
        if self._order is not None and rows > self._unstepped:  # (before feeding anything: refused as it is)
            raise ShapeError(
                f"skip({rows}): only {self._unstepped} indices are pending "
                f"(yielded {self._yielded}, stepped {self._stepped} this epoch)"
            )
        watchers = getattr(self, "_watchers", ())
        if watchers:
            if any(w._gives_up(rows) for w in watchers):
                return
            self._drain_watchers()
        self._skip(rows)

    def _skip(self, rows: int) -> None:
        """``skip`` without feeding watch() rows first (the feeder's own skips, in their place)."""
        with self._lock:
            examples = self._take(rows, None)
            if self._units is not None:
                self._units.cut(examples)
            self._stepped += rows

    def watch(
        self,
        model: torch.nn.Module,
        *,
        sketch: Union[int, str, None] = DEFAULT_SKETCH,
        per_layer: Optional[Dict[str, Any]] = None,
        budget: Optional[float] = DEFAULT_BUDGET,
        loss_reduction: str = "mean",
        granularity: str = "example",
        exclude: Sequence[str] = (),
        scaler: Optional[Any] = None,
        seed: Optional[int] = None,
        non_blocking: Optional[bool] = None,
        all_ranks: bool = False,
        batch_first: bool = True,
    ) -> "WatchHandle":
        """Feed this sampler from an ordinary ``loss.backward()``: layer hooks sketch each example's gradient.

        After ``sampler.watch(model)``, the usual loop needs no change::

            for x, y in DataLoader(ds, batch_size=64, sampler=sampler):
                loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()

        Hooks on the model's ``nn.Linear``, ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, ``Embedding``,
        ``EmbeddingBag`` (``[B, L]`` ids, or ids end to end with ``offsets``: the batch is then the number of
        bags), ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and ``BatchNorm`` layers form, inside the backward, a K-dimensional row per example
        from the layer's input and output gradient (a seeded Kronecker projection P_out (x) P_in per layer;
        per-example gradients are never formed), and the rows go to :meth:`step`, matched to the yielded
        indices first in first out. A factor no larger than ``sketch`` stays exact, so small layers lose
        nothing; ``sketch=None`` makes every factor exact (the rows are then the per-example gradients).
        ``nn.MultiheadAttention`` (packed weights) runs, while watched, the same ops as torch's with its
        two projections recorded as Linear layers (``<name>.in_proj`` and ``out_proj``). ``nn.LSTM``,
        ``nn.GRU``, ``nn.RNN`` and their cells are replayed step by step in the backward (one with dropout
        between its stacked layers runs them one at a time while watched, drawing that dropout itself). A
        Linear or convolution layer whose weight a parametrization computes (``weight_norm``,
        ``spectral_norm``) gets its rows from each example's exact weight gradient, pulled back to the
        originals. BatchNorm in training mode gives each example's contribution to the batch gradient
        (they add up to it exactly), a proxy for the undefined per-example gradient. Anything else that
        trains and has no per-example rows is refused by name (see docs/capturing-gradients.md).

        ``sketch="ghost"`` balances exactly without forming anything per example: each ``nn.Linear``
        layer on ``[B, in]`` inputs goes to the sampler as the factors of its per-example weight
        gradients g_b a_b^T, whose inner products are (g_b . g_c)(a_b . a_c) (the ghost form; B x B numbers
        per step, and products the size of the weight), every other layer as exact rows. It needs
        ordering ``grab`` or ``pair`` (balanced one step at a time on the sampler's on-device path, on
        the CPU too) and pays where a layer's out x in is large against B (in + out): wide MLPs.

        Args:
            sketch: the per-factor sketch size k; None: exact rows; ``"ghost"``: exact, Linear layers from
                their factors (see above).
            per_layer: sketch sizes for named modules, overriding ``sketch``: an int or None for both
                factors, a ``(k_out, k_in)`` pair, or ``"ghost"`` for a Linear layer.
            budget: per Linear or convolution layer, the sketch may cost at most this fraction of the
                layer's own forward pass per position (Linear layers: plus 2^17 multiply-adds); a layer
                over it gets a smaller input-side k (a net's first convolutions: few output channels,
                many positions), and a Linear layer whose Gaussian output side alone is over it (a
                decoder over a vocabulary) a count sketch on that side. None: ``sketch`` everywhere.
            loss_reduction: how the batch loss was reduced over examples, ``"mean"`` or ``"sum"``
                (Opacus's name), so each row is its example's own gradient. A loss further divided by a
                constant (gradient accumulation) changes no order: the sign rule is scale-free.
            granularity: ``"example"`` (one row per example; every trainable parameter must belong to a
                hooked layer or be excluded) or ``"batch"``: one row per backward from the parameters'
                gradients (any model), for loops where a step is one unit (a batch of one, or
                ``unit_size`` equal to the batch size); not checked: a backward of B > 1 examples with
                ``unit_size=1`` would take one index instead of B.
            exclude: module or parameter names whose gradients are left out of the rows, or shell-style
                patterns of them (``"*.relative_position_bias_table"``: every block's table).
            scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop: rows are unscaled, and a step
                it skips for inf/NaN gives no rows (its examples count as unseen).
            seed: seeds the projections (default: the sampler's seed); a resumed run must use the same.
            non_blocking: balance each step on a background thread (see :meth:`step`). None (the
                default): when a core is free for it, that is when the rows come from a GPU or torch
                runs on fewer threads than this process has cores. Training on the CPU with torch's
                threads on every core (torch's default), a background step would compete with them and
                cost more than it saves, so the rows are balanced on the training thread.
            all_ranks: every process runs an identical copy of this sampler (same arguments and seed)
                and trains on its own share of the batches: batches r, r + W, r + 2W, ... of the
                shared order on rank r, as accelerate's ``BatchSamplerShard`` and
                :class:`torchgrab.integrations.RankShard` deal them. The ranks all-gather their rows
                (torch.distributed, the default group) whenever rows are fed, which every rank does at
                the same points, and every copy is fed all of them in the order it yielded them, so all
                copies build the same next order; rows of repeats that pad the epoch's last round are
                dropped.
            batch_first: False for a sequence model that takes ``[T, B, ...]`` inputs throughout (torch's
                transformer layers with their default ``batch_first=False``, the layout of PyTorch's
                language-modeling tutorial): the batch is then dimension 1 of the model's first input, of
                an embedding's ids and of a Linear or norm layer's inputs of 3 or more dimensions (2-D
                inputs, pooled, are taken as ``[B, features]``). Linear, Embedding, LayerNorm, RMSNorm and
                attention layers only.

        Rows of a step are fed when the model's next forward begins, when the sampler begins an epoch, on
        :meth:`state_dict`, :meth:`synchronize`, or ``handle.flush()``; forwards in eval mode or under
        ``no_grad`` are ignored, recomputed forwards of gradient checkpointing are not counted twice, and
        a module called several times in a forward contributes the sum. Returns a handle;
        ``handle.remove()`` (or leaving a ``with`` block) detaches it. Watching the same model again (a
        notebook cell run twice) replaces the earlier handle, which feeds what it gathered and detaches;
        a sampler takes one model's rows, so watching another model while one is watched is refused.
        """
        from torchgrab.capture.watch import WatchHandle

        others = [w for w in self._watchers if w.model is not model]
        if others:
            raise UnsupportedInputError(
                f"this sampler is already fed by watch() on another model ({type(others[0].model).__name__}): "
                "each example would get a row from each model. Call remove() on the handle watch() returned "
                "for it first"
            )
        return WatchHandle(
            self,
            model,
            sketch=sketch,
            per_layer=per_layer,
            budget=budget,
            loss_reduction=loss_reduction,
            granularity=granularity,
            exclude=exclude,
            scaler=scaler,
            seed=seed,
            non_blocking=non_blocking,
            all_ranks=all_ranks,
            batch_first=batch_first,
        )

    def backward(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        inputs: Any,
        targets: Any,
        *,
        indices: Optional[Any] = None,
        chunk_size: Optional[int] = None,
        method: str = "vmap",
        non_blocking: bool = False,
    ) -> torch.Tensor:
        """Per-example gradients -> the sampler; their mean -> each parameter's ``.grad``; returns the mean loss.

        Replaces ``loss.backward()`` in a training loop. For orderings that do not use gradients
        (``rr``, ``so``, ...), it runs an ordinary backward pass and only advances the queue.
        ``method`` picks how per-example gradients are captured (``"vmap"``, or the cheaper ``"hooks"``
        for Linear/Conv2d models; see :func:`torchgrab.gradients.per_example_gradients`).
        ``non_blocking=True``: balance in the background while the loop goes on (see :meth:`step`; the
        gradients are this call's own, so nothing writes to them meanwhile).
        """
        if not self.balances:
            loss = loss_fn(call_model(model, inputs), targets)
            loss.backward()
            b = batch_size(inputs)
            if indices is None:
                self.skip(b)
            return loss.detach()
        grads, losses, means = capture(model, loss_fn, inputs, targets, chunk_size=chunk_size, method=method)
        self.step(grads, indices=indices, non_blocking=non_blocking)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in grads:
                p = params[name]
                mean = means[name]
                if p.grad is None:
                    p.grad = mean
                else:
                    p.grad += mean
        return losses.mean()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly: plain ints, strings, lists and tensors
        (``torch.load(weights_only=True)`` reads it)."""
        self._drain_watchers()
        with self._lock:
            # Cached until the native state changes (a step, a new epoch, a load: the native sampler
            # counts them). A fresh export is O(d + B), not O(n): the native side keeps the epoch's
            # order and the placed part of the next order in buffers that later steps never
            # overwrite, and hands out views of them. Like Module.state_dict(), tensors are shared
            # between calls (torch.save copies them); do not write into them.
            mutations = self._native.mutations
            if self._native_cache is None or self._native_cache[0] != mutations:
                self._native_cache = (mutations, _to_torch(self._native.state()))
            return {
                "native": _copy_dicts(self._native_cache[1]),
                "epoch": self._next_number(),
                "in_epoch": self._order is not None,
                "finished": self._finished,
                "yielded": self._yielded,
                "stepped": self._stepped,
                "unit_carry": None if self._units is None else self._units.state(),
                "ondevice": self._ondevice.state() if self._ondevice is not None else None,
            }

    def load_state_dict(
        self, state: Dict[str, Any], *, newer_than_loader: bool = False, replay_epoch: bool = False
    ) -> None:
        """Restore from :meth:`state_dict`. A state of another ordering, n or dtype, or a corrupted one,
        raises :class:`torchgrab.StateDictError` and leaves this sampler as it was.

        ``newer_than_loader=True``: this state was saved at the checkpoint, after the training loop's
        last step, while the snapshot inside a ``StatefulDataLoader``'s state (``num_workers > 0``)
        was taken earlier, when the batch was dispatched. The loader restores that older snapshot
        when iteration starts; with this flag the sampler keeps the newer state instead (the
        snapshot must be an earlier point of the same epoch), which makes the resume bit-exact.

        ``replay_epoch=True``: the loader will iterate the saved epoch again from its start and drop the
        batches trained before the checkpoint itself (the Hugging Face Trainer's ``skip_first_batches``):
        the saved epoch is handed out again from its first index, and the indices stepped before the
        checkpoint are not pending again.
        """
        if not isinstance(replay_epoch, bool):
            raise UnsupportedInputError(f"replay_epoch must be True or False, got {replay_epoch!r}")
        if replay_epoch and newer_than_loader:
            raise UnsupportedInputError(
                "replay_epoch=True and newer_than_loader=True describe different loaders; pass one"
            )
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
        widths = {w.width for w in getattr(self, "_watchers", ()) if self.balances}
        if native.dim is not None and widths and widths != {native.dim}:
            raise StateDictError(
                f"the state dict holds rows of dimension d = {native.dim}, but this sampler's watch() gives "
                f"K = {sorted(widths)[0]}: watch the model with the settings (sketch, per_layer, budget, "
                "exclude, granularity) of the run that saved it"
            )
        if self._native.dim is not None and native.dim is not None and native.dim != self._native.dim:
            raise StateDictError(
                f"the state dict holds gradients of dimension d = {native.dim}; this sampler's are d = {self._native.dim}"
            )
        saved_depth, asked = native_state.get("depth"), getattr(self, "_depth_asked", None)
        if (
            asked is not None
            and self.ordering in ("recursive", "recursive-pair")
            and saved_depth is not None
            and int(saved_depth) != asked
        ):
            # depth=None takes the checkpoint's depth (a run saved under the old default keeps it); an
            # explicit depth that disagrees is a mistake worth a refusal, as a different ordering is.
            raise StateDictError(
                f"the state dict is for depth={int(saved_depth)}; this sampler was built with depth={asked} "
                "(build it with that depth, or depth=None to take the checkpoint's)"
            )
        if native_state.get("state_dtype") != _STATE_DTYPES[self.dtype]:
            raise StateDictError(
                f"the state dict holds {native_state.get('state_dtype')} sums; this sampler uses {self.dtype}"
            )
        try:
            epoch, yielded, stepped = int(state["epoch"]), int(state["yielded"]), int(state["stepped"])
            in_epoch = bool(state["in_epoch"])
            finished = bool(state.get("finished", True))  # absent in older dicts: resume iff unstepped left
        except (KeyError, TypeError, ValueError) as e:
            raise StateDictError(f"the state dict is missing or has a malformed cursor entry: {e}") from None
        ondevice = None
        if state.get("ondevice") is not None:
            ondevice = OnDeviceBalancer(ordering, self.n, self.dtype)
            ondevice.load(state["ondevice"])
        order = self._examples(native.current_order()) if in_epoch else None
        if order is not None and not (0 <= stepped <= yielded <= len(order)):
            raise StateDictError(f"inconsistent cursors: stepped={stepped}, yielded={yielded}, n={len(order)}")
        carry = None
        if self._units is not None:
            carry = UnitMap(self._units.n, self._units.u)
            carry.load(state.get("unit_carry") if order is not None else None)
        for w in getattr(self, "_watchers", ()):
            w.discard()  # rows gathered for the state being replaced
        with self._lock:
            held, self._held = getattr(self, "_held", None), None
            if held is not None and held == self._held_token():
                # A newer state was loaded just before (newer_than_loader=True) and nothing has
                # happened since: this is the loader's older snapshot of the same run; keep ours.
                self._kept_over_loader = self._check_earlier_point(native, order, yielded, stepped)
                return
            self._native = native
            self._native_cache = None
            self._ondevice = ondevice
            self._dense_used = ondevice is None and native_state.get("balance") is not None
            self._epoch, self._late = epoch, False
            self._reset_cursor(order)
            self._generation += 1
            self._yielded, self._stepped = (yielded, stepped) if order is not None else (0, 0)
            if self._units is not None:
                self._units.carry = carry.carry
            # Continue the saved epoch if units are left to step, or if its iteration had not reached
            # its end (the checkpoint was taken inside the loop: what is left of the epoch is empty).
            self._resumable = order is not None
            self._resume = order is not None and (stepped < len(order) or not finished)
            self._finished = finished if order is not None else False
            self._epoch_set = False
            self._kept_over_loader = False
            self._replay_from = 0 if replay_epoch and order is not None else None
            if newer_than_loader:
                self._held = self._held_token()

    def _held_token(self) -> Tuple[int, int, int, int]:
        """What must not have changed between a newer_than_loader load and the loader's own load."""
        return (self._generation, self._native.mutations, self._yielded, self._stepped)

    def _check_earlier_point(self, native: Any, order: Optional[np.ndarray], yielded: int, stepped: int) -> str:
        """How the loader's snapshot precedes the held state: "same" epoch, or "before" it began (a
        loader snapshots when its epoch starts; with snapshot_every_n_steps > 1 that may be the latest)."""
        held_order = self._order
        same_epoch = (
            order is not None
            and held_order is not None
            and native.epochs_begun == self._native.epochs_begun
            and np.array_equal(native.current_order(), self._native.current_order())
        )
        if same_epoch and stepped <= self._stepped and yielded <= self._yielded:
            return "same"
        if held_order is not None and native.epochs_begun + 1 == self._native.epochs_begun:
            return "before"
        raise StateDictError(
            "the data loader restored a sampler snapshot "
            f"(epochs begun {native.epochs_begun}, yielded {yielded}, stepped {stepped}) that is not an "
            "earlier point of the epoch of the state loaded with newer_than_loader=True "
            f"(epochs begun {self._native.epochs_begun}, yielded {self._yielded}, stepped {self._stepped}); "
            "save both states at the same checkpoint, or load the loader's state alone (the resume then "
            "loses and repeats nothing but is not bit-exact)"
        )

    def __getstate__(self) -> Dict[str, Any]:
        config = {k: getattr(self, k) for k in ("ordering", "n", "dtype", "unit_size", "device_path", "seed")}
        config["device_capable"] = self._device_capable
        return {"config": config, "state": self.state_dict()}

    def __setstate__(self, data: Dict[str, Any]) -> None:
        native_state = _to_numpy(data["state"]["native"])
        self.ordering = data["config"]["ordering"]
        self.n = data["config"]["n"]
        self.dtype = data["config"]["dtype"]
        self.unit_size = data["config"].get("unit_size", 1)
        self._units = UnitMap(self.n, self.unit_size) if self.unit_size > 1 else None
        self.device_path = data["config"].get("device_path", "auto")
        self.seed = data["config"].get("seed", 0)
        self._depth_asked = None  # the pickled state carries its depth
        self._watchers = []
        self._device_capable = data["config"].get("device_capable", False)
        self._ondevice = None
        self._dense_used = False
        self._lock = StepLock()
        self._native = _native.NativeSampler.from_state(native_state)
        self._native_cache = None
        self._epoch = 0
        self._generation = 0
        self._reset_cursor(None)
        self._resume = self._resumable = self._epoch_set = self._late = False
        self.load_state_dict(data["state"])

    @property
    def state_bytes(self) -> int:
        """Bytes of ordering state held in Rust (orders, bitmaps, running sums)."""
        return self._native.state_bytes()

    def __repr__(self) -> str:
        return f"GraBSampler(n={self.n}, ordering={self.ordering!r}, epoch={self._epoch})"


class _IterState:
    __slots__ = ("sampler", "generation", "continue_saved")

    def __init__(self, sampler: GraBSampler) -> None:
        self.sampler = sampler
        self.generation: Optional[int] = None  # set when the epoch begins
        self.continue_saved = False  # load_state_dict placed it inside the saved epoch


def _chunks(st: _IterState) -> Iterator[Iterator[int]]:
    """The chunks of an epoch's indices, each a list iterator; the first ``next`` begins the epoch.
    Runs between chunks only: the sampler's ``_yielded`` counts the indices taken within one. An error
    (a background step the kernel refused, raised when the lock is taken) is raised by that ``next``,
    and the next one tries again, as a sampler call after a refused input does: a chain whose source
    raised would have ended the epoch instead."""
    while True:
        try:
            chunk = _next_chunk(st)
        except BaseException as error:
            yield _raising(error)
            continue
        if chunk is None:
            return
        yield chunk


def _next_chunk(st: _IterState) -> Optional[Iterator[int]]:
    s = st.sampler
    if st.generation is None:
        s._drain_watchers(epoch_ends=True)  # the last step of the previous epoch belongs to that epoch
        with s._lock:
            st.generation = s._start(st.continue_saved)
    with s._lock:
        order, at = s._order, s._yielded  # the chunk before is all taken
        if st.generation != s._generation or order is None or at >= len(order):
            if st.generation == s._generation and order is not None:
                s._finished = True
            return None
        # Python ints in chunks: never a list of n ints, and no stall before the first index.
        return s._cursor.hand_out(order[at : at + _YIELD_CHUNK].tolist())


def _raising(error: BaseException) -> Iterator[int]:
    """An iterator that raises ``error`` at its first ``next`` and is then exhausted."""
    raise error
    yield 0  # pragma: no cover (makes this a generator)


class _EpochIterator(itertools.chain):
    """One pass over a :class:`GraBSampler`'s epoch. It begins the epoch lazily (first ``next``), stops
    when a newer epoch begins or a state is loaded (it is then stale), and is itself stateful: its
    ``state_dict`` records how far its consumer has taken indices, which torchdata's
    ``StatefulDataLoader`` (through its ``BatchSampler``) saves next to the sampler's own state.

    An ``itertools.chain`` over the epoch's chunks, so that ``next`` runs no Python code within a chunk.
    """

    _st: _IterState

    def __new__(cls, sampler: GraBSampler) -> "_EpochIterator":
        st = _IterState(sampler)
        self = super().from_iterable(_chunks(st))
        self._st = st
        return self

    def state_dict(self) -> Dict[str, Any]:
        """How far this iterator's consumer has taken indices in its epoch (-1: not begun)."""
        st = self._st
        s = st.sampler
        with s._lock:
            live = st.generation is not None and st.generation == s._generation
            return {
                "epochs_begun": s._native.epochs_begun if live else -1,
                "yielded": s._yielded if live else 0,
            }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Called by a stateful loader after ``sampler.load_state_dict``, before the first ``next``: the
        consumer already holds the epoch's first ``yielded`` indices, so they are not handed out again."""
        st = self._st
        s = st.sampler
        try:
            begun, yielded = int(state["epochs_begun"]), int(state["yielded"])
        except (KeyError, TypeError, ValueError) as e:
            raise StateDictError(f"malformed sampler-iterator state {state!r}: {e}") from None
        if st.generation is not None:
            raise CallOrderError("load_state_dict() on a sampler iterator that has already begun")
        with s._lock:
            if begun < 0 and s._kept_over_loader:
                # Snapshot taken when the loader's epoch began (before its first index); the loader
                # replays (and discards) the batches it delivered since, from the epoch's start, and
                # they are stepped already.
                s._replay_from = 0
                s._resume = True
                st.continue_saved = True
                return
            if s._kept_over_loader == "before":
                raise StateDictError(
                    f"the data loader's iterator state (epochs begun {begun}, yielded {yielded}) is from an "
                    "earlier epoch than the sampler state loaded with newer_than_loader=True "
                    f"(epochs begun {s._native.epochs_begun}); they are not from one checkpoint"
                )
            if begun < 0 or not s._resumable or begun != s._native.epochs_begun:
                return  # taken before its epoch began, or for another epoch: nothing to skip
            if s._kept_over_loader == "same" and 0 <= yielded < s._stepped:
                # The sampler holds a newer state than the loader's snapshot (newer_than_loader=True)
                # and the loader will replay the batches after its snapshot and discard them
                # (snapshot_every_n_steps > 1): hand those indices out again; they are stepped already.
                s._replay_from = yielded
                s._resume = True
                st.continue_saved = True
                return
            if not (s._stepped <= yielded <= len(s._order)):
                raise StateDictError(
                    f"iterator state yielded={yielded} does not fit the sampler state "
                    f"(stepped={s._stepped}, n={len(s._order)})"
                )
            # The consumer already holds the first `yielded` indices and the loader will not deliver
            # them again: the in-flight ones (yielded, not stepped) are dropped unstepped, and this
            # iterator continues the saved epoch after them, even if nothing is left of it.
            s._yielded = s._stepped = yielded
            s._resume = yielded < len(s._order) or not s._finished
            st.continue_saved = True
