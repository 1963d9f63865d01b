"""Feeding a watched model's rows to its sampler (the second half of ``GraBSampler.watch``).

:class:`~torchgrab.capture.watch.WatchHandle` forms each step's [B, K] rows in the hooks; a
:class:`RowFeeder` keeps the rows of consecutive steps in one block buffer, ships the block to the host
(asynchronously from a GPU) and hands it to ``sampler.step`` every ``FEED_EVERY`` steps, in the
background when a core is free for it, with steps whose rows are not finite skipped.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from typing import Any, Deque, List, Optional, Tuple

import numpy as np
import torch

from torchgrab._segments import OuterRows

# Steps whose rows go to the sampler together: one host transfer and one sampler.step per 8 steps
# instead of per step (the kernels take rows in order, so the orders are the same).
FEED_EVERY = 8


class RowFeeder:
    """The rows of one watch() on their way to its sampler.

    Attributes:
        ready: steps whose rows are in the block: (the rows, or True when written into their slot
            directly, or None for a step without rows; B; whether the rows are known finite).
        inflight: shipped blocks not yet fed: (CUDA event or None, host rows or None, step sizes, finite).
        exchange: the RowExchange of ``all_ranks=True`` (every rank's rows to every replica), or None.
        skipped_steps: steps whose rows were not finite; their units got no row.
        dropped_steps: steps whose forward or backward raised (the loop went on); their units got no row.
    """

    def __init__(
        self, sampler: Any, width: int, granularity: str, non_blocking: Optional[bool], scaler: Optional[Any]
    ) -> None:
        self.sampler = sampler
        self.width = width  # the columns of a row
        self.granularity = granularity
        self.non_blocking = non_blocking
        self.scaler = scaler
        self.exchange: Optional[Any] = None
        self.skipped_steps = 0
        self.dropped_steps = 0
        self._cores = _cores()
        self._cpu_rows = True  # the last block shipped was formed on the CPU
        self.ready: List[Tuple[Any, int, bool]] = []
        # A block holds rows, or (a lone Linear layer's steps, slot_out's outer) their factors: (p, bias)
        # of OuterRows, the block then being p + q wide. One kind a block; a step of the other kind ships it.
        self._outer: Optional[Tuple[int, bool]] = None
        # The ready steps' rows live in one block buffer, written step by step (by torch.cat(out=) or
        # a kernel into its NumPy view), so a block ships without another copy. On the CPU, blocks the
        # sampler is done with are reused: a fresh block's first writes fault its pages in, a cost a
        # small model's step notices (benchmarks/out/watch_speed_mnist_blocks.txt).
        self._block: Optional[torch.Tensor] = None
        self._block_np: Any = None  # the CPU block's NumPy view (see slot_out)
        self._block_used = 0
        self._lent: Deque[torch.Tensor] = deque()  # CPU blocks handed to the sampler, oldest first
        self._spare: List[torch.Tensor] = []  # CPU blocks free to reuse
        self.inflight: Deque[Tuple[Any, Optional[torch.Tensor], List[int], bool, Optional[Tuple[int, bool]]]] = deque()

    def add(self, rows: Any, b: int, known_finite: bool) -> None:
        """One ended step (see ``ready``); every FEED_EVERY steps the block ships."""
        self.ready.append((rows, b, known_finite))
        if len(self.ready) >= FEED_EVERY:
            self.ship()

    def give_back(self, b: int) -> None:
        """The last ``b`` rows taken by ``slot_out`` go back unwritten."""
        self._block_used -= b

    def flush(self) -> None:
        """Ship the ready steps and feed every shipped block, waiting for rows still on their way."""
        self.ship()
        self.feed(block=True)

    def discard(self) -> None:
        """Drop what is gathered and not yet fed (the sampler's state was replaced by a load)."""
        self.ready = []
        self.inflight.clear()
        self._block, self._block_used, self._outer = None, 0, None

    def drop(self, b: int) -> None:
        """A step whose forward or backward raised and that the loop went past: its units get no row and
        go to the middle of the next order, as unseen ones do, fed in their place among the steps."""
        self.ship()
        self.inflight.append((None, None, [b], False, None))
        self.dropped_steps += 1

    def skip_non_finite(self, b: int) -> None:
        """A step whose gradients were not finite (a GradScaler step skipped for inf/NaN, or a diverging
        run): its units get no row and go to the middle of the next order, as unseen ones do."""
        self.sampler._skip(self.units_of(b))
        self.skipped_steps += 1
        if self.scaler is None:
            warnings.warn(
                "watch(): a step's gradients were not finite; its examples were left unbalanced "
                "(pass scaler= when training with a GradScaler)",
                RuntimeWarning,
                stacklevel=3,
            )

    def rows_out(
        self, b: int, device: torch.device, outer: Optional[Tuple[int, bool]] = None, width: Optional[int] = None
    ) -> torch.Tensor:
        """The next ``b`` rows of the block buffer, shipping the block first when they do not fit (or it
        holds the other kind: rows, or factors of ``outer`` = (p, bias), ``width`` wide)."""
        block = self._block
        width = self.width if width is None else width
        if block is None or block.device != device or not self._takes(block, b, outer, width):
            if self.ready:
                self.ship()
            block = self._block = self._new_block(max(b, FEED_EVERY * b), device, width)
            self._block_np = block.numpy() if block.is_cpu else None
            self._block_used = 0
            self._outer = outer
        rows = block[self._block_used : self._block_used + b]
        self._block_used += b
        return rows

    def slot_out(self, b: int, outer: Optional[Tuple[int, bool]] = None, width: Optional[int] = None) -> np.ndarray:
        """``rows_out`` on the CPU as a NumPy view: a torch slice and its ``numpy()`` cost a few
        microseconds of a small model's step, a NumPy slice of the block's view a fraction of one."""
        block = self._block
        if (
            block is None
            or not block.is_cpu
            or not self._takes(block, b, outer, self.width if width is None else width)
        ):
            self.rows_out(b, torch.device("cpu"), outer, width)  # a new block; its first b rows taken
            return self._block_np[:b]
        used = self._block_used
        self._block_used = used + b
        return self._block_np[used : used + b]

    def _takes(self, block: torch.Tensor, b: int, outer: Optional[Tuple[int, bool]], width: int) -> bool:
        """The current block has room for ``b`` more rows of this kind (rows, or factors of ``outer``)."""
        return self._block_used + b <= block.shape[0] and self._outer == outer and block.shape[1] == width

    def densify(self, slot: np.ndarray) -> np.ndarray:
        """The open step's slot of factors (the last slot taken) as a slot of rows, the rows written: for
        a step whose rows turn out not to be one outer product (the layer called again, or a loss scale
        to divide by). The same bits as rows written as rows."""
        assert self._outer is not None
        p, bias = self._outer
        factors = slot.copy()  # the slot goes back to the block, which a new block may ship
        self.give_back(slot.shape[0])
        rows = self.slot_out(slot.shape[0])
        rows[...] = OuterRows(factors, p, bias).expand()
        return rows

    def _new_block(self, n: int, device: torch.device, width: int) -> torch.Tensor:
        if device.type == "cpu":
            # A block lent to the sampler is free once its step is done: every step but the last one
            # started has finished (each waits for the one before), and the last one when none is running.
            keep = 1 if self.sampler._lock.busy else 0
            while len(self._lent) > keep:
                self._spare.append(self._lent.popleft())
            for i, spare in enumerate(self._spare):
                if spare.shape[0] >= n and spare.shape[1] == width:
                    return self._spare.pop(i)
            del self._spare[:]  # too small for this block size: let them go
        return torch.empty(n, width, dtype=torch.float32, device=device)

    def ship(self) -> None:
        """Send the ready steps' rows to the host as one [sum B, K] block (asynchronously from a GPU)."""
        ready, self.ready = self.ready, []
        if not ready:
            return
        sizes = [b for _, b, _ in ready]
        finite = all(known for _, _, known in ready)
        if ready[0][0] is None:
            self.inflight.append((None, None, sizes, False, None))
            return
        # The ready rows are consecutive rows of the block buffer: the block is shipped as it is.
        assert self._block is not None and self._block_used == sum(sizes)
        rows = self._block[: self._block_used]
        outer = self._outer
        self._block, self._block_used, self._outer = None, 0, None
        self._cpu_rows = rows.device.type == "cpu"
        if self._cpu_rows:
            self.inflight.append((None, rows, sizes, finite, outer))
            return
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=torch.cuda.is_available())
        host.copy_(rows, non_blocking=True)
        event = torch.cuda.Event() if rows.device.type == "cuda" else None
        if event is not None:
            event.record()
        self.inflight.append((event, host, sizes, finite, None))  # (factors are CPU blocks only)

    def feed(self, block: bool) -> None:
        while self.inflight:
            event, host, sizes, finite, outer = self.inflight[0]
            if event is not None:
                if not event.query():  # query() never waits: no device synchronization per step
                    if not block and self.exchange is None:  # ranks must feed at the same points
                        return
                    event.synchronize()
            self.inflight.popleft()
            self._step_sampler(None if host is None else host.numpy(), sizes, finite, outer)
            if event is None and host is not None:  # a CPU block: reusable once the sampler is done with it
                self._lent.append(host if host._base is None else host._base)

    def _step_sampler(
        self,
        rows: Optional[np.ndarray],
        sizes: List[int],
        finite: bool = False,
        outer: Optional[Tuple[int, bool]] = None,
    ) -> None:
        """Feed the steps of one block in order: runs of finite steps in one ``step`` call each (the
        kernels process rows in order, so this equals one call per step), non-finite steps skipped.
        ``finite``: the kernels that wrote every row said they are finite; no scan is needed.
        ``outer``: the block holds the rows' factors (see ``_outer``), handed on as they are where the
        rows are known finite and stay on this rank, and formed here otherwise."""
        s = self.sampler
        if outer is not None and rows is not None:
            if finite and self.exchange is None and s.balances:
                self._feed_rows(rows, outer)
                return
            rows = OuterRows(rows, *outer).expand()
        if self.exchange is not None:
            # Every rank runs this sampler: every rank's rows, in the order the sampler yielded them.
            rows, sizes = self.exchange.combine(rows, sizes, s)
            finite = False  # other ranks' rows: not known here
            if not sizes:
                return
        if rows is None or not s.balances:
            s._skip(sum(self.units_of(b) for b in sizes))
            return
        if finite or np.isfinite(rows.sum()):  # the common case: no scan, or one pass over the block
            self._feed_rows(rows)
            return
        run_start = 0  # first row of the current run of finite steps
        at = 0
        for b in sizes:
            seg = rows[at : at + b]
            if not (np.isfinite(seg.sum()) or np.isfinite(seg).all()):
                self._feed_rows(rows[run_start:at])
                self.skip_non_finite(b)
                run_start = at + b
            at += b
        self._feed_rows(rows[run_start:])

    def _feed_rows(self, rows: np.ndarray, outer: Optional[Tuple[int, bool]] = None) -> None:
        if not len(rows):
            return
        s = self.sampler
        grads: Any = rows if outer is None else OuterRows(rows, *outer)
        if self.granularity == "batch" and s.unit_size > 1:
            s.step(rows if outer is None else grads.expand(), per_unit=True)
        else:
            s.step(grads, non_blocking=self._background())

    def _background(self) -> bool:
        """Whether to balance in the background: as asked, or (None) when a core is free for it. With
        torch's threads on every core, a background step competes with them (their OpenMP threads wait
        spinning between ops) and costs more than it saves (docs: Performance, the arms "watch
        background" and "watch blocking" of benchmarks/watch_speed.py)."""
        if self.non_blocking is not None:
            return self.non_blocking
        return not self._cpu_rows or torch.get_num_threads() < self._cores

    def units_of(self, b: int) -> int:
        if self.granularity == "batch":
            return b * self.sampler.unit_size if self.sampler.unit_size > 1 else b
        return b


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1
