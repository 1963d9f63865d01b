"""One GraB order for several ranks: every rank runs the same ``GraBSampler`` and takes every W-th batch.

This is how accelerate shards a custom sampler (``BatchSamplerShard``: batch j of the whole order goes
to rank j mod W, the last round padded with indices from the epoch's start), and how
:class:`RankShard` shards it for frameworks that want a ``DistributedSampler``. For the replicas to stay
equal, each one must be fed every rank's rows in the order the sampler yielded them:
:class:`RowExchange` all-gathers the rows of each step (rank 0's batch, then rank 1's, ...) and drops
the rows of padded repeats, so the orders are those of one process fed batches of W x B.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from torchgrab.errors import CallOrderError, ShapeError, UnsupportedInputError


def world(group: Optional[Any] = None) -> Tuple[int, int]:
    """(world size, rank) of the process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


class RowExchange:
    """All-gathers each rank's watch() rows so that every rank's sampler gets all of them, in the order
    the shared sampler yielded them. Called by ``WatchHandle`` at its feeding points, which every rank
    reaches together (the next forward, an epoch's start, a checkpoint); a rank whose steps or row width
    differ makes every rank raise instead of leaving the others waiting."""

    def __init__(self, group: Optional[Any] = None) -> None:
        self.group = group
        self.size, self.rank = world(group)

    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":  # NCCL collectives take CUDA tensors only
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _gather(self, t: torch.Tensor) -> List[torch.Tensor]:
        t = t.to(self._device())
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t, group=self.group)
        return [o.cpu() for o in out]

    def combine(
        self, rows: Optional[np.ndarray], sizes: List[int], sampler: Any
    ) -> Tuple[Optional[np.ndarray], List[int]]:
        """This rank's block of steps (rows [sum(sizes), K] or None for orderings without gradients) ->
        every rank's, step by step in rank order, cut at the end of the sampler's epoch."""
        if self.size == 1:
            return rows, sizes
        width = -1 if rows is None else int(rows.shape[1])
        header = torch.tensor([len(sizes), width], dtype=torch.int64)
        headers = torch.stack(self._gather(header)).tolist()
        if any(h != headers[0] for h in headers):
            raise ShapeError(
                "the ranks fed different numbers of steps or row widths to their samplers "
                f"(steps, width per rank: {headers}); every rank must watch the same model with the same "
                "settings and run the same number of training steps"
            )
        counts = torch.stack(self._gather(torch.tensor(sizes, dtype=torch.int64))).numpy()  # [W, steps]
        if rows is None:
            combined = None
        else:
            most = int(counts.sum(axis=1).max())
            buf = np.zeros((most, width), dtype=np.float32)
            buf[: len(rows)] = rows
            parts = [p.numpy() for p in self._gather(torch.from_numpy(buf))]
            pieces = []
            starts = np.zeros(self.size, dtype=np.int64)
            for t in range(len(sizes)):
                step = [parts[r][starts[r] : starts[r] + counts[r, t]] for r in range(self.size)]
                starts += counts[:, t]
                if not all(np.isfinite(p).all() for p in step):
                    # One optimizer step for all ranks: if any rank's rows overflowed (GradScaler), the
                    # step was skipped everywhere, so no rank's examples of it are balanced.
                    step = [np.full_like(p, np.nan) for p in step]
                pieces += step
            combined = np.concatenate(pieces) if pieces else np.zeros((0, width), dtype=np.float32)
        out_sizes = [int(b) for t in range(len(sizes)) for b in counts[:, t]]
        # Rows past the epoch's last index belong to repeats that pad the last round (even batches).
        order = sampler._order
        if order is None:
            raise CallOrderError("watch() rows arrived before the sampler was iterated")
        left = len(order) - sampler._stepped
        kept: List[int] = []
        for b in out_sizes:
            if left <= 0:
                break
            kept.append(min(b, left))
            left -= b
        if combined is not None:
            keep = np.concatenate(
                [np.arange(a, a + k) for a, k in zip(np.cumsum([0] + out_sizes[:-1]), kept)]
                or [np.zeros(0, dtype=np.int64)]
            )
            combined = np.ascontiguousarray(combined[keep])
        return combined, kept


class RankShard(DistributedSampler):
    """Rank ``rank``'s batches of a ``GraBSampler`` that every rank runs the same way: batches rank,
    rank + W, rank + 2W, ... of the whole order (each ``batch_size`` indices), the last round padded with
    indices from the epoch's start like ``DistributedSampler`` pads (or cut with ``drop_last``).

    A ``DistributedSampler`` (without calling its constructor) so that frameworks that shard any other
    sampler themselves (Lightning's ``DistributedSamplerWrapper``) leave it alone.
    """

    def __init__(self, sampler: Any, batch_size: int, num_replicas: int, rank: int, drop_last: bool = False) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UnsupportedInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not 0 <= rank < num_replicas:
            raise UnsupportedInputError(f"rank {rank} is outside [0, {num_replicas})")
        self.sampler = sampler
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.seed = getattr(sampler, "seed", 0)
        self.epoch = 0
        self.shuffle = False  # the order is the inner sampler's
        n = len(sampler)
        rounds = n // (batch_size * num_replicas) if drop_last else math.ceil(n / (batch_size * num_replicas))
        self.rounds = rounds
        self.num_samples = rounds * batch_size
        self.total_size = self.num_samples * num_replicas
        if self.num_samples == 0:
            raise ShapeError(
                f"{n} examples give no full round of {num_replicas} batches of {batch_size} with drop_last=True"
            )

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        it = iter(self.sampler)
        b, w = self.batch_size, self.num_replicas
        head: List[int] = []  # the epoch's first indices, to pad the last round with
        for _ in range(self.rounds):
            got: List[int] = []
            for i in it:
                got.append(i)
                if len(got) == b * w:
                    break
            if len(head) < b * w:
                head += got[: b * w - len(head)]
            if len(got) < b * w:
                if self.drop_last:
                    return
                order = getattr(self.sampler, "_order", None)
                if order is not None:  # a resumed epoch's iterator did not see the epoch's first indices
                    head = order[: b * w].tolist()
                while len(head) < b * w:  # fewer examples than one round
                    head = head + head
                got += head[: b * w - len(got)]
            yield from got[self.rank * b : (self.rank + 1) * b]

    def state_dict(self) -> Any:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.sampler.load_state_dict(state)
