"""``DistributedGraBSampler``: CD-GraB (Cooper et al., NeurIPS 2023) as a drop-in replacement for
``torch.utils.data.DistributedSampler``.

Each rank owns a fixed shard of the data set (rank 0's seeded permutation, broadcast, padded or cut like
``DistributedSampler``). The shards' orders are coordinated through one shared running sum: every rank
holds a replica of the order server (``torchgrab._native.NativeCoordinated``, Rust) and feeds it the same
numbers, gathered with torch.distributed collectives, so the replicas stay bitwise identical and no
order is ever sent. Three protocols (numbers per rank per step; W ranks, B rows per step, P = B/2 pairs,
d parameters):

``mode="exact"``
    all_gather of the P x d pair differences (float64): CD-GraB's signs exactly (rank order, then
    visit order), the same signs a single process computes on all W*P differences.
``mode="pipelined"``
    W broadcast rounds per step; in round a, rank a signs its pairs by ``sign_scan`` (u = Z s, G = Z Z^T)
    against the s that already holds ranks 0..a-1's signed sums of this step, and broadcasts its P signs
    and its signed sum Z^T eps (P + d numbers, float64). The same signs as exact CD-GraB in exact
    arithmetic (the Gram formulation is an identity); in floating point only an inner product within
    rounding of 0 could differ. P times fewer bytes than ``exact``, at the cost of W sequential rounds.
``mode="efficient"``
    all_gather of u = Z s (P numbers) and the shard's own Gram matrix Z Z^T (P^2 numbers), then one
    all_reduce of the signed sum Z^T eps (d numbers), which :meth:`DistributedGraBSampler.backward`
    packs into the gradient all-reduce. An approximation: a shard's pairs are signed against the sum
    at the start of the step plus that shard's own earlier pairs of the step; the other ranks' pairs
    of the same step are only seen from the next step on (cross-rank inner products would need d-sized
    data). Exact when W = 1.

All three also all-gather an 8-number header per step so that a rank with a wrongly shaped batch, or a
local error, makes every rank raise instead of leaving the others waiting in a collective.
``sampler.bytes_sent`` counts the payload bytes this rank has put into the sampler's collectives.

``ordering="rr"`` and ``ordering="so"`` are the baselines behind the same interface (no order server,
no gradients read): ``rr`` is ``DistributedSampler(shuffle=True)`` index for index (a fresh global
permutation from ``seed + epoch`` every epoch, drawn by every rank without communication), ``so``
repeats the pair mode's first epoch (rank 0's permutation, broadcast) every epoch.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sized, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from torchgrab import _native
from torchgrab._cursor import Yielded
from torchgrab._segments import as_segments
from torchgrab.errors import (
    CallOrderError,
    GraBError,
    NonFiniteGradientError,
    ShapeError,
    StateDictError,
    UnsupportedInputError,
)
from torchgrab.gradients import batch_size, call_model, capture

_MODES = {"exact": 0, "efficient": 1, "pipelined": 2}
_ORDERINGS = ("pair", "rr", "so")
_DTYPES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}
_HEADER = ("ok", "rows", "d", "dtype", "mode", "cursor", "epoch", "payload")
_YIELD_CHUNK = 1 << 13
_STATE_FORMAT = "torchgrab.DistributedGraBSampler"


class CollectiveError(RuntimeError):
    """A torch.distributed collective of the sampler failed: a peer died, or did not reach the
    collective within the process group's timeout. The replicas can no longer be trusted."""


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DistributedDataParallel (and DataParallel) keep the real module in .module.
    return (
        model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else model
    )


@torch.no_grad()
def _add_to_grads(params: List[torch.Tensor], flat: torch.Tensor) -> None:
    """Add consecutive slices of ``flat`` (the reduced mean gradient) to each parameter's ``.grad``."""
    o = 0
    for p in params:
        k = p.numel()
        mean = flat[o : o + k].view_as(p).to(p.dtype)
        o += k
        if p.grad is None:
            p.grad = mean.clone()
        else:
            p.grad += mean


class DistributedGraBSampler(Sampler[int]):
    """``DistributedSampler``'s contract with CD-GraB orders.

    Args:
        dataset: the data set (only its ``len`` is used).
        num_replicas: as ``DistributedSampler`` (default: the process group's world size).
        rank: as ``DistributedSampler`` (default: this process's rank in the group).
        ordering: ``"pair"`` (CD-GraB's pair balance, the default), or one of the baselines
            ``"rr"`` and ``"so"`` below.
        seed: seeds rank 0's initial permutation, which is broadcast to every rank (``rr``: each
            rank draws epoch e's permutation from ``seed + e``; ``shards`` then holds epoch 0's).
        drop_last: as ``DistributedSampler``: cut to equal shards instead of padding with repeats.
        mode: ``"exact"`` (default), ``"pipelined"`` or ``"efficient"``; see the module docstring.
            Ignored by ``rr`` and ``so``.
        group: the process group (default: the world).
        n: the number of examples, instead of ``dataset``.

    With ``pair``, each rank keeps the same shard every epoch (CD-GraB orders within fixed shards); only
    the order inside a shard changes. Every rank must call ``step``/``backward`` with the same number of
    rows at the same time, as DDP training does.

    The baselines take the same calls, so switching arms is a change of one string:

    - ``"rr"`` (random reshuffling) is ``DistributedSampler(shuffle=True, seed=seed)``, index for
      index: each epoch, a fresh permutation of the whole (padded) data set drawn from
      ``seed + epoch`` and dealt ``indices[rank::W]``, so shards change between epochs. Every rank
      draws it itself; nothing is sent. As with ``DistributedSampler``, the epoch number comes from
      ``set_epoch``: without it every epoch repeats one order (a warning says so).
    - ``"so"`` (shuffle once) repeats the first epoch's order every epoch: rank 0's seeded
      permutation, broadcast at construction exactly as for ``pair``, so ``so`` and ``pair`` share
      their shards and their first epoch.

    For both, ``step(grads)`` only counts rows (the leading dimension of a tensor, or of each entry of
    a dict or list; the batch's inputs will do), on this rank, without a collective: it moves the
    cursor that a checkpoint resumes from. ``backward(model, loss_fn, x, y)`` is an ordinary backward
    pass of ``loss_fn(model(x), y)`` (a mean-reducing loss) followed by one all_reduce of the mean
    gradient, leaving in ``.grad`` what the pair mode's ``backward`` leaves (and DDP's
    ``loss.backward()``), and counts the rows.
    """

    # Indices handed out this epoch, most by a list iterator and counted when read (torchgrab._cursor).
    _yielded = Yielded()

    def __init__(
        self,
        dataset: Optional[Sized] = None,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        ordering: str = "pair",
        seed: int = 0,
        drop_last: bool = False,
        *,
        mode: str = "exact",
        group: Optional[Any] = None,
        n: Optional[int] = None,
    ) -> None:
        if num_replicas is None:
            if not dist.is_available():
                raise RuntimeError("Requires distributed package to be available")
            num_replicas = dist.get_world_size(group)
        if rank is None:
            if not dist.is_available():
                raise RuntimeError("Requires distributed package to be available")
            rank = dist.get_rank(group)
        if rank >= num_replicas or rank < 0:
            raise ValueError(f"Invalid rank {rank}, rank should be in the interval [0, {num_replicas - 1}]")
        if ordering not in _ORDERINGS:
            raise UnsupportedInputError(
                "DistributedGraBSampler takes ordering 'pair' (CD-GraB) or the baselines 'rr' and 'so', "
                f"got {ordering!r}"
            )
        if mode not in _MODES:
            raise UnsupportedInputError(f"mode must be 'exact', 'pipelined' or 'efficient', got {mode!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UnsupportedInputError(f"seed must be a non-negative integer, got {seed!r}")
        size = len(dataset) if dataset is not None else n
        if size is None or size < 1:
            raise ShapeError("give a non-empty data set (or its size as n=...)")
        self.dataset = dataset
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.ordering = ordering
        self.mode = mode
        self.seed = int(seed)
        self.drop_last = drop_last
        self.group = group
        self.epoch = 0
        self.n = int(size)
        if self.drop_last and self.n % self.num_replicas != 0:
            self.num_samples = math.ceil((self.n - self.num_replicas) / self.num_replicas)
        else:
            self.num_samples = math.ceil(self.n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        if self.num_samples < 1:
            raise ShapeError(f"{self.n} examples cannot give each of {self.num_replicas} ranks one with drop_last=True")
        if self._distributed() and (self.num_replicas, self.rank) != (dist.get_world_size(group), dist.get_rank(group)):
            raise UnsupportedInputError(
                f"num_replicas={self.num_replicas}, rank={self.rank} do not match the process group "
                f"(size {dist.get_world_size(group)}, this rank {dist.get_rank(group)}); the coordinated orders are "
                "exchanged over the group, so they must match (pass group= for a subgroup)"
            )
        self.bytes_sent = 0  # payload bytes this rank has put into the sampler's collectives
        self._lock = threading.RLock()
        # rr draws every epoch's permutation from seed + epoch on each rank, as DistributedSampler does;
        # pair and so broadcast rank 0's once.
        first = self._permutation(self.seed) if ordering == "rr" else self._initial_permutation()
        # shards[w] = DistributedSampler's indices[w::W]: rank w's fixed units, by local id (rr: epoch 0's).
        self.shards = self._deal(self._padded(first))
        self._native = (
            _native.NativeCoordinated(self.num_replicas, self.rank, self.num_samples) if ordering == "pair" else None
        )
        # rr and so keep their own cursor (rows stepped this epoch) and the epoch whose order is out.
        self._stepped = 0
        self._begun = False
        self._order_epoch = 0
        self._warned_same_epoch = False
        self._order: Optional[np.ndarray] = None
        self._yielded = 0
        self._generation = 0
        # Set by load_state_dict: where the next __iter__ continues the saved epoch (None: begin a new one).
        self._resume_at: Optional[int] = None
        self._loaded: Optional[Tuple[int, int]] = None  # (saved epoch, its cursor) until the next __iter__

    # ---------------------------------------------------------------- set-up
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _device(self) -> torch.device:
        # NCCL collectives need CUDA tensors; gloo (and mpi) take CPU tensors.
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _permutation(self, seed: int) -> np.ndarray:
        # DistributedSampler's draw, literally: torch.randperm under a generator seeded with seed (+ epoch).
        g = torch.Generator()
        g.manual_seed(seed)
        return torch.randperm(self.n, generator=g).numpy().astype(np.int64)

    def _deal(self, indices: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(indices.reshape(self.num_samples, self.num_replicas).T)

    def _initial_permutation(self) -> np.ndarray:
        perm = torch.from_numpy(self._permutation(self.seed))
        if self._distributed() and self.num_replicas > 1:
            # Rank 0's permutation is the truth; the others take it rather than trusting their seeds.
            buf = perm.to(self._device())
            src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            self._collective("broadcast of the initial permutation", dist.broadcast, buf, src, group=self.group)
            self.bytes_sent += buf.numel() * 8 if self.rank == 0 else 0
            perm = buf.cpu()
        return perm.numpy().astype(np.int64)

    def _padded(self, indices: np.ndarray) -> np.ndarray:
        # DistributedSampler's rules, literally: repeat from the front to pad, or cut the tail.
        if not self.drop_last:
            pad = self.total_size - len(indices)
            if pad <= len(indices):
                indices = np.concatenate([indices, indices[:pad]])
            else:
                indices = np.concatenate([indices, np.tile(indices, math.ceil(pad / len(indices)))[:pad]])
        else:
            indices = indices[: self.total_size]
        return indices

    # ---------------------------------------------------------------- Sampler contract
    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Number the next epoch (torch's convention); with ``pair`` and ``so`` the order itself does not
        depend on it, with ``rr`` it is drawn from ``seed + epoch``. After ``load_state_dict``, the saved
        epoch's own number continues it and any other number begins a new epoch."""
        with self._lock:
            if self._loaded is not None:  # loaded, not iterated since: the number decides
                saved_epoch, cursor = self._loaded
                self._resume_at = cursor if int(epoch) == saved_epoch else None
            self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        with self._lock:
            start = 0
            self._loaded = None
            if self._native is None:
                if self._resume_at is not None:
                    start, self._resume_at = self._resume_at, None
                else:
                    self._begin_baseline_epoch()
                self._order = self._baseline_order(self.rank, self._order_epoch)
            else:
                if self._resume_at is not None:
                    start, self._resume_at = self._resume_at, None
                    local = self._native.shard_order(self.rank)
                else:
                    local = self._native.begin_epoch()
                self._order = self.shards[self.rank][local]
            self._yielded = start
            self._generation += 1
            return self._yield_from(self._generation, start)

    def _yield_from(self, generation: int, start: int = 0) -> Iterator[int]:
        order = self._order
        assert order is not None

        def chunks() -> Iterator[Iterator[int]]:
            for lo in range(start, len(order), _YIELD_CHUNK):
                if generation != self._generation:
                    return  # a newer __iter__ or a load moved the cursor (and cut the chunk in hand)
                yield self._cursor.hand_out(order[lo : lo + _YIELD_CHUNK].tolist())

        # No Python code per index (torchgrab._cursor).
        return itertools.chain.from_iterable(chunks())

    def _begin_baseline_epoch(self) -> None:
        if self.ordering == "rr" and self._begun and self._order_epoch == self.epoch and not self._warned_same_epoch:
            self._warned_same_epoch = True
            warnings.warn(
                f"DistributedGraBSampler(ordering='rr') begins another epoch numbered {self.epoch}: its order "
                "is drawn from seed + epoch, so it repeats the last one. Call set_epoch(epoch) before each "
                "epoch, as with DistributedSampler.",
                stacklevel=3,
            )
        self._begun, self._order_epoch, self._stepped = True, self.epoch, 0

    def _baseline_order(self, rank: int, epoch: int) -> np.ndarray:
        """rr/so: rank ``rank``'s order in epoch ``epoch``, as data set indices."""
        if self.ordering == "so":
            return self.shards[rank]
        return self._padded(self._permutation(self.seed + epoch))[rank :: self.num_replicas]

    def shard_order(self, rank: int) -> np.ndarray:
        """Rank ``rank``'s order this epoch, as data set indices (every replica knows every shard's)."""
        if self._native is None:
            return self._baseline_order(rank, self._order_epoch if self._begun else self.epoch)
        return self.shards[rank][self._native.shard_order(rank)]

    def _server(self, what: str) -> Any:
        if self._native is None:
            raise UnsupportedInputError(f"ordering={self.ordering!r} has no order server, so no {what}")
        return self._native

    def replica_bytes(self) -> bytes:
        """The replicated order-server state as bytes; equal on every rank after every step (``pair``)."""
        return bytes(self._server("replica bytes").replica_bytes())

    @property
    def running_sum(self) -> np.ndarray:
        """The shared running sum s (float64; ``pair``)."""
        return self._server("running sum").running_sum()

    @property
    def stepped(self) -> int:
        """Rows stepped (``step``/``backward``) so far in this epoch."""
        return self._native.cursor if self._native is not None else self._stepped

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """This rank's sampler state: plain ints, strings and tensors (``torch.load(weights_only=True)``
        reads it). Every rank saves its own: the order server is replicated, but an open pair's first
        gradient is rank-local. Can be taken anywhere, mid-epoch included. ``rr``/``so`` states hold,
        instead of the order server, the epoch their order was drawn for (``order_epoch``), whether an
        epoch has begun (``begun``) and the rows stepped in it (``stepped``)."""
        with self._lock:
            if self._native is None:
                own: Dict[str, Any] = {"begun": self._begun, "order_epoch": self._order_epoch, "stepped": self._stepped}
            else:
                own = {"server": torch.frombuffer(bytearray(self._native.to_bytes()), dtype=torch.uint8)}
            return {
                "format": _STATE_FORMAT,
                "version": 1,
                "n": self.n,
                "num_replicas": self.num_replicas,
                "rank": self.rank,
                "ordering": self.ordering,
                "mode": self.mode,
                "seed": self.seed,
                "drop_last": bool(self.drop_last),
                "epoch": self.epoch,
                "iterated": self._order is not None or self._resume_at is not None,
                "yielded": self._yielded if self._resume_at is None else self._resume_at,
                "shards": torch.from_numpy(self.shards.copy()),
                **own,
                "bytes_sent": self.bytes_sent,
            }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``state_dict()`` output of this rank. A collective call when a process group is
        initialized: every rank loads its own state at the same time, and every rank refuses (with
        ``StateDictError``, nothing changed) if any rank's state is refused or the ranks' replicated
        states differ. The next ``__iter__`` continues the saved epoch at its first unit that was
        yielded but not stepped (units a DataLoader had prefetched are handed out again); if every unit
        was stepped and the epoch's iteration had reached its end, a new epoch begins. ``set_epoch(e)``
        after loading decides explicitly: the saved epoch's number continues it, another begins anew.
        ``rr``/``so`` follow the same rules with their row cursor (moved by ``step``/``backward``; a
        run that never steps resumes at the start of the saved epoch); the ranks compare (epoch,
        order_epoch, begun, stepped) instead of the replicated order."""
        with self._lock:
            before = self._native.to_bytes() if self._native is not None else b""
            error: Optional[BaseException] = None
            digest = 0
            order_epoch = 0
            try:
                epoch, yielded, iterated, own = self._check_state(state)
                if self._native is not None:
                    self._native.load_bytes(own)  # validated by the Rust decoder; refused bytes change nothing
                    cursor, begun = self._native.cursor, self._native.epochs_begun > 0
                    agreed = self._native.replica_bytes()
                else:
                    begun, order_epoch, cursor = own
                    agreed = repr((epoch, order_epoch, begun, cursor)).encode()
                if begun and yielded < cursor:
                    raise StateDictError(f"yielded={yielded} is behind the {cursor} units already stepped")
                # The saved epoch continues unless every unit was stepped and its iteration had ended.
                resume = iterated and begun and (cursor < yielded or yielded < self.num_samples)
                digest = int.from_bytes(hashlib.blake2b(agreed, digest_size=7).digest(), "little")
            except GraBError as e:
                error = e
            except Exception as e:  # anything else local must not leave the other ranks waiting below
                error = StateDictError(f"malformed DistributedGraBSampler state dict: {e!r}")
            if self._distributed() and self.num_replicas > 1:
                flags = torch.tensor([0 if error is None else 1, digest], dtype=torch.int64)
                everyone = self._all_gather("all_gather of the loaded checkpoints' digests", flags)
                refused = [r for r, t in enumerate(everyone) if int(t[0]) != 0]
                if error is None and refused:
                    error = StateDictError(f"rank(s) {refused} refused their state dicts; no rank loaded")
                elif error is None and len({int(t[1]) for t in everyone}) > 1:
                    what = "replicated orders" if self._native is not None else "epochs or stepped rows"
                    error = StateDictError(
                        f"the ranks' state dicts hold different {what} (checkpoints of different "
                        "steps or runs?); no rank loaded"
                    )
            if error is not None:
                if self._native is not None:
                    self._native.load_bytes(before)
                raise error
            if self._native is None:
                self._begun, self._order_epoch, self._stepped = begun, order_epoch, cursor
            self.epoch = epoch
            self._loaded = (epoch, cursor) if begun else None
            self.bytes_sent = int(state.get("bytes_sent", self.bytes_sent))
            self._order = None
            self._yielded = 0
            self._generation += 1  # iterators of the replaced state stop
            self._resume_at = cursor if resume else None

    def _check_state(self, state: Dict[str, Any]) -> Tuple[int, int, bool, Any]:
        """Refuse a state dict whose Python-side entries do not fit this sampler, before anything
        changes; returns (epoch, units yielded, whether it was iterated, own) with own the order
        server's bytes (``pair``) or (begun, order_epoch, stepped) (``rr``/``so``)."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise StateDictError("not a DistributedGraBSampler state dict (format entry missing or different)")
        if state.get("version") != 1:
            raise StateDictError(f"state dict version {state.get('version')!r}; this build reads version 1")
        # (A state without an "ordering" entry is refused below: every version-1 dict has one.)
        keys = ("ordering", "n", "num_replicas", "rank", "seed", "drop_last")
        for key in keys + (("mode",) if self.ordering == "pair" else ()):
            if key not in state:
                raise StateDictError(f"the state dict has no entry {key!r}")
            if state[key] != getattr(self, key):
                raise StateDictError(
                    f"the state dict is for {key}={state[key]!r}, this sampler has {key}={getattr(self, key)!r}"
                )
        try:
            epoch, yielded, iterated = int(state["epoch"]), int(state["yielded"]), bool(state["iterated"])
            shards = state["shards"]
            if self._native is None:
                begun, order_epoch, stepped = bool(state["begun"]), int(state["order_epoch"]), int(state["stepped"])
            else:
                server = state["server"]
        except (KeyError, TypeError, ValueError) as e:
            raise StateDictError(f"malformed DistributedGraBSampler state dict: {e!r}") from None
        if not isinstance(shards, torch.Tensor) or not np.array_equal(shards.cpu().numpy(), self.shards):
            raise StateDictError("the state dict's shards differ from this sampler's (another data set order?)")
        if not 0 <= yielded <= self.num_samples:
            raise StateDictError(f"yielded={yielded} is outside the shard of {self.num_samples} units")
        if self._native is None:
            if not 0 <= stepped <= self.num_samples:
                raise StateDictError(f"stepped={stepped} is outside the shard of {self.num_samples} units")
            if not begun and stepped:
                raise StateDictError(f"stepped={stepped} rows in a state that has begun no epoch")
            return epoch, yielded, iterated, (begun, order_epoch, stepped)
        if not isinstance(server, torch.Tensor) or server.dtype != torch.uint8 or server.dim() != 1:
            raise StateDictError("the state dict's 'server' entry must be a 1-D uint8 tensor")
        return epoch, yielded, iterated, bytes(server.cpu().numpy().tobytes())

    # ---------------------------------------------------------------- collectives
    def _collective(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # DistBackendError, gloo's connection errors and timeouts
            raise CollectiveError(
                f"DistributedGraBSampler on rank {self.rank}: the {what} failed; a peer rank died or did not "
                f"reach this collective within the process group's timeout. ({type(e).__name__}: {e})"
            ) from e

    def _all_gather(self, what: str, t: torch.Tensor) -> List[torch.Tensor]:
        dev = self._device()
        t = t.to(dev)
        out = [torch.empty_like(t) for _ in range(self.num_replicas)]
        self._collective(what, dist.all_gather, out, t, group=self.group)
        self.bytes_sent += t.numel() * t.element_size()
        return [o.cpu() for o in out]

    def _all_reduce(self, what: str, t: torch.Tensor) -> torch.Tensor:
        dev = self._device()
        buf = t.to(dev)
        self._collective(what, dist.all_reduce, buf, group=self.group)
        self.bytes_sent += buf.numel() * buf.element_size()
        return buf.cpu() if buf.device != t.device else buf

    def _agree(self, rows: int, d: int, kind: str, payload: int, error: Optional[BaseException]) -> None:
        """All-gather a header; every rank raises the same way if any rank failed locally or disagrees."""
        mine = [
            0 if error is None else 1,
            rows,
            d,
            _DTYPES.get(kind, -1),
            _MODES[self.mode],
            self._native.cursor,
            self._native.epochs_begun,
            payload,
        ]
        if not self._distributed() or self.num_replicas == 1:
            if error is not None:
                raise error
            return
        rows_all = torch.stack(
            self._all_gather("all_gather of step headers", torch.tensor(mine, dtype=torch.int64))
        ).tolist()
        if error is not None:
            raise error
        bad = [w for w, h in enumerate(rows_all) if h[0]]
        if bad:
            raise GraBError(
                f"rank {bad[0]} refused its step (see that rank's error); this step was refused on every rank and changed nothing"
            )
        ref = rows_all[0]
        for w, h in enumerate(rows_all):
            diff = [f"{name}={h[k]} (rank 0: {ref[k]})" for k, name in enumerate(_HEADER) if h[k] != ref[k]]
            if diff:
                raise ShapeError(
                    f"rank {w} stepped with {', '.join(diff)}; every rank must step with the same number of rows, "
                    "gradient width and dtype at the same time. This step was refused on every rank and changed nothing."
                )

    # ---------------------------------------------------------------- gradients in
    def _prepare(self, grads: Any) -> Tuple[List[np.ndarray], str, int, int]:
        segments, kind, rows = as_segments(grads)
        d = sum(s.shape[1] for s in segments)
        return segments, kind, rows, d

    def step(self, grads: Any) -> None:
        """Feed this rank's per-example gradients of the next ``B`` yielded indices (a tensor [B, ...] or a
        dict/list of per-parameter [B, ...]). A collective call: every rank must call it together.
        ``rr``/``so``: only the rows are counted (any tensor or array with B rows will do), on this rank
        alone, without a collective."""
        if self._native is None:
            self._count(_rows(grads))
            return
        self._step(grads, None)

    def _count(self, rows: int) -> None:
        """rr/so: advance the cursor of stepped rows, after the checks the pair mode's step makes."""
        with self._lock:
            if self._order is None:
                raise CallOrderError(
                    "step() was called before the sampler was iterated; iterate it (or the DataLoader) first"
                )
            if rows > self._yielded - self._stepped:
                raise ShapeError(
                    f"got {rows} rows but only {self._yielded - self._stepped} yielded indices wait to be stepped"
                )
            self._stepped += rows

    def _step(self, grads: Any, extra: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """One step; in efficient mode ``extra`` (a 1-D float tensor, e.g. the summed mean gradient)
        rides in the same all_reduce as the signed sum and comes back reduced."""
        with self._lock:
            if self._order is None:
                raise CallOrderError(
                    "step() was called before the sampler was iterated; iterate it (or the DataLoader) first"
                )
            if self.num_replicas > 1 and not self._distributed():
                raise CallOrderError(
                    f"this sampler has num_replicas={self.num_replicas} but no torch.distributed process group is "
                    "initialized; call dist.init_process_group(...) before stepping (iterating works without one)"
                )
            error: Optional[BaseException] = None
            local = None
            segments: List[np.ndarray] = []
            kind, rows, d = "", 0, 0
            try:
                segments, kind, rows, d = self._prepare(grads)
                if rows > self._yielded - self._native.cursor:
                    raise ShapeError(
                        f"got {rows} gradient rows but only {self._yielded - self._native.cursor} yielded indices wait for gradients"
                    )
                if self.mode == "pipelined":
                    self._native.validate(segments, kind)
                    local = torch.empty(self._native.pair_count(rows) + d, dtype=torch.float64)
                elif self.mode == "exact":
                    local = torch.from_numpy(self._native.local_diffs(segments, kind))
                else:
                    local = torch.from_numpy(self._native.local_stats(segments, kind))
            except GraBError as e:
                error = e
            self._agree(rows, d, kind, 0 if local is None else local.numel(), error)
            assert local is not None
            if self.mode == "pipelined":
                self._rounds(segments, kind, rows, d)
                return None if extra is None else self._reduce_extra(extra)
            if self._distributed() and self.num_replicas > 1 and local.numel() > 0:
                # (A step that closes no pair has nothing to gather; the header made every rank agree.)
                gathered = torch.cat(self._all_gather(f"all_gather of the {self.mode} step data", local)).numpy()
            else:
                gathered = local.numpy()
            if self.mode == "exact":
                self._native.step_exact(segments, kind, np.ascontiguousarray(gathered))
                if extra is not None:
                    return self._reduce_extra(extra)
                return None
            v = torch.from_numpy(self._native.decide(segments, kind, np.ascontiguousarray(gathered)))
            if extra is not None:
                packed = torch.cat([extra.reshape(-1), v.to(extra.dtype)])
                if self._distributed() and self.num_replicas > 1:
                    packed = self._all_reduce("all_reduce of the gradient and the signed sum", packed)
                total_v = packed[extra.numel() :].to(torch.float64)
                self._native.add_sum(np.ascontiguousarray(total_v.numpy()))
                return packed[: extra.numel()]
            if self._distributed() and self.num_replicas > 1:
                v = self._all_reduce("all_reduce of the signed sum", v)
            self._native.add_sum(np.ascontiguousarray(v.numpy()))
            return None

    def _rounds(self, segments: List[np.ndarray], kind: str, rows: int, d: int) -> None:
        """Pipelined mode: W broadcast rounds; in round a, rank a signs its pairs against the s that
        already holds ranks 0..a-1's signed sums of this step and broadcasts [signs | signed sum]."""
        p = self._native.pair_count(rows)
        saved = self._native.running_sum().copy()
        signs = np.empty(self.num_replicas * p)
        try:
            for a in range(self.num_replicas):
                if a == self.rank:
                    try:
                        buf = torch.from_numpy(self._native.own_round(segments, kind))
                    except GraBError:  # e.g. inner products overflowing: make every rank refuse
                        buf = torch.full((p + d,), float("nan"), dtype=torch.float64)
                else:
                    buf = torch.empty(p + d, dtype=torch.float64)
                if self._distributed() and self.num_replicas > 1:
                    buf = self._broadcast(f"broadcast of round {a}", buf, a)
                if not bool(torch.isfinite(buf).all()):
                    raise NonFiniteGradientError(
                        f"rank {a}'s signs or signed sum are not finite (overflowing inner products?); the step was refused on every rank"
                    )
                signs[a * p : (a + 1) * p] = buf[:p].numpy()
                self._native.add_sum(np.ascontiguousarray(buf[p:].numpy()))
            self._native.place_step(segments, kind, signs)
        except GraBError:
            self._native.restore_running_sum(saved)
            raise

    def _broadcast(self, what: str, t: torch.Tensor, src: int) -> torch.Tensor:
        buf = t.to(self._device())
        root = dist.get_global_rank(self.group, src) if self.group is not None else src
        self._collective(what, dist.broadcast, buf, root, group=self.group)
        if src == self.rank:
            self.bytes_sent += buf.numel() * buf.element_size()
        return buf.cpu()

    def _reduce_extra(self, extra: torch.Tensor) -> torch.Tensor:
        if self._distributed() and self.num_replicas > 1:
            return self._all_reduce("all_reduce of the gradient", extra)
        return extra

    def backward(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        inputs: Any,
        targets: Any,
        *,
        chunk_size: Optional[int] = None,
        method: str = "vmap",
    ) -> torch.Tensor:
        """The DDP training step's backward: per-example gradients of this rank's batch -> the sampler;
        the mean gradient over all ranks -> each parameter's ``.grad`` (one all_reduce, which in efficient
        mode also carries the signed sum); returns this rank's mean loss. ``model`` may be wrapped in
        ``DistributedDataParallel`` (its own gradient hooks are not used: no ``loss.backward()`` runs).
        ``method`` picks the capture, as in ``GraBSampler.backward``. ``rr``/``so``: one ordinary
        backward pass of ``loss_fn(model(inputs), targets)`` (no per-example gradients; ``chunk_size``
        and ``method`` are not used), the same all_reduce and ``.grad``, and the batch's rows counted."""
        if self._native is None:
            return self._plain_backward(_unwrap(model), loss_fn, inputs, targets)
        module = _unwrap(model)
        grads, losses, mean_of = capture(module, loss_fn, inputs, targets, chunk_size=chunk_size, method=method)
        means = [mean_of[k].reshape(-1) for k in grads]
        flat = torch.cat(means) if means else torch.zeros(0)
        total = self._step(grads, flat)
        assert total is not None
        total = total / self.num_replicas
        params = dict(module.named_parameters())
        _add_to_grads([params[name] for name in grads], total)
        return losses.mean()

    def _plain_backward(
        self, module: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], inputs: Any, targets: Any
    ) -> torch.Tensor:
        rows = batch_size(inputs)
        with self._lock:  # refuse before anything runs, as the pair mode's step does
            if self._order is None:
                raise CallOrderError(
                    "backward() was called before the sampler was iterated; iterate it (or the DataLoader) first"
                )
            if rows > self._yielded - self._stepped:
                raise ShapeError(
                    f"got a batch of {rows} but only {self._yielded - self._stepped} yielded indices wait to be stepped"
                )
        if self.num_replicas > 1 and not self._distributed():
            raise CallOrderError(
                f"this sampler has num_replicas={self.num_replicas} but no torch.distributed process group is "
                "initialized; call dist.init_process_group(...) before backward (it all-reduces the gradient)"
            )
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        loss = loss_fn(call_model(module, inputs), targets)
        # autograd.grad rather than loss.backward(): it leaves .grad alone until the reduced mean is
        # written, and never triggers DDP's reducer hooks (the all_reduce below replaces them).
        found = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True) if named else ()
        flat = (
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, (_, p) in zip(found, named)])
            if named
            else torch.zeros(0)
        )
        total = self._reduce_extra(flat.detach()) / self.num_replicas
        self._count(rows)
        _add_to_grads([p for _, p in named], total)
        return loss.detach()

    def __repr__(self) -> str:
        return (
            f"DistributedGraBSampler(n={self.n}, num_replicas={self.num_replicas}, rank={self.rank}, "
            f"ordering={self.ordering!r}, mode={self.mode!r}, num_samples={self.num_samples})"
        )


def _rows(grads: Any) -> int:
    """The number of rows of a step's gradients (rr/so read nothing else): the leading dimension of a
    tensor or array, or of every entry of a dict, list or tuple (they must agree)."""
    items = list(grads.values()) if isinstance(grads, dict) else grads
    if isinstance(items, (list, tuple)):
        if not items:
            raise ShapeError("step() got no gradient entries (an empty dict or list)")
        sizes = {_rows(g) for g in items}
        if len(sizes) != 1:
            raise ShapeError(f"the gradient entries have different numbers of rows: {sorted(sizes)}")
        return sizes.pop()
    shape = getattr(items, "shape", None)
    if shape is None or len(shape) == 0:
        raise ShapeError(
            f"step() takes a tensor or array with one row per example (or a dict/list of them), got {type(grads).__name__}"
        )
    return int(shape[0])
