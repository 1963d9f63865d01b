"""Seeded random projections for the sketches of :mod:`torchgrab.capture.watch`.

Every matrix is regenerated from (seed, layer name, role, shape) with a CPU generator and then moved to
the gradients' device, so a resumed run rebuilds the same projections bit for bit and a checkpoint
stores seeds, not matrices. Gaussian entries are N(0, 1/k), so E<Px, Py> = <x, y>.
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from torchgrab import _native

# The Rust CPU kernels of watch()'s Linear rows (src/sketch_rows.rs); False: torch ops only, as before
# they existed (benchmarks/watch_speed.py measures both in one run).
_CPU_KERNELS = True


def cpu_kernel_input(t: torch.Tensor) -> bool:
    """Whether the Rust CPU kernels may read ``t`` in place: they are on, and ``t`` is a float32 CPU tensor
    with a NumPy view (no autograd history to detach, no lazy negation)."""
    return _CPU_KERNELS and t.is_cpu and t.dtype == torch.float32 and not t.requires_grad and not t.is_neg()


def derived_seed(seed: int, *key: object) -> int:
    """A 63-bit seed for one projection, stable across processes and Python versions (no ``hash()``)."""
    text = "/".join([str(int(seed))] + [str(k) for k in key]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _buckets_and_signs(seed: int, n: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A count sketch's tables on the CPU: a bucket in [0, k) (int64) and a sign (float32) per coordinate."""
    g = _generator(seed)
    buckets = torch.randint(0, k, (n,), generator=g)
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return buckets, signs


class Factor:
    """One side of a Kronecker sketch: ``x -> x @ P^T`` over the last dimension, with P (k x n) seeded
    Gaussian, or the identity when ``n <= k`` (a factor no larger than its sketch stays exact).

    ``count=True``: P is a count sketch instead (one seeded bucket and sign per coordinate; the same
    E<Px, Py> = <x, y> and, for random buckets, the same variance as the Gaussian), applied as one
    ``index_add_``: O(n) per vector instead of O(n k), for wide inputs sketched to many columns."""

    def __init__(self, n: int, k: Optional[int], seed: int, *key: object, count: bool = False) -> None:
        self.n = int(n)
        self.identity = k is None or self.n <= k
        self.k = self.n if self.identity else int(k)  # type: ignore[arg-type]
        self.count = count and not self.identity
        self._seed = derived_seed(seed, *key, self.n, self.k, *(("count",) if self.count else ()))
        self._on: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._tables: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}
        # (columns grouped by bucket, bucket starts, their signs), for the Rust count sketch on the CPU.
        self._np_tables: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None

    def _count_tables(self, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        t = self._tables.get(key)
        if t is None:
            buckets, signs = _buckets_and_signs(self._seed, self.n, self.k)
            t = self._tables[key] = (buckets.to(device), signs.to(device=device, dtype=dtype))
        return t

    def count_tables(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A count sketch's tables for the Rust kernels (``_native.count_sketch``): the columns grouped by
        bucket, the buckets' starts and the columns' signs (made once)."""
        if self._np_tables is None:
            b, sg = (t.numpy() for t in _buckets_and_signs(self._seed, self.n, self.k))
            order = np.argsort(b, kind="stable")  # increasing columns within a bucket
            starts = np.concatenate([[0], np.cumsum(np.bincount(b, minlength=self.k))])
            self._np_tables = (order.astype(np.uint32), starts.astype(np.uint32), sg[order].copy())
        return self._np_tables

    def matrix_t(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """P^T, [n, k], on ``device`` (made once per device and dtype)."""
        key = (device, dtype)
        m = self._on.get(key)
        if m is None:
            # Only Gaussian factors are ever used as a matrix (the grouped output side); a count sketch is
            # applied by __call__ alone.
            assert not self.count, "a count-sketch factor has no dense matrix here"
            cpu = torch.randn(self.k, self.n, generator=_generator(self._seed), dtype=torch.float32)
            m = (cpu / math.sqrt(self.k)).t().contiguous().to(device=device, dtype=dtype)
            self._on[key] = m
        return m

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        if x.dim() >= 3 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
            # A sequence-first layer's [T, B, n] seen batch first (watch(batch_first=False)): flattening the
            # view would copy all of it (a decoder's output gradient over its vocabulary: more time than
            # the sketch itself); the projection acts on the last dimension alone, so project in place.
            return self(x.transpose(0, 1)).transpose(0, 1)
        if self.count:
            if cpu_kernel_input(x):
                # One pass in Rust: torch's index_add_ along the last dimension dispatches one small add per
                # input column, most of a small model's sketch cost (src/sketch_rows.rs).
                flat = x.reshape(-1, self.n) if x.dim() != 2 else x
                out = torch.from_numpy(_native.count_sketch(flat.numpy(), *self.count_tables()))
                return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.k)
            buckets, signs = self._count_tables(x.device, x.dtype)
            out = x.new_zeros(*x.shape[:-1], self.k)
            return out.index_add_(x.dim() - 1, buckets, x * signs)
        return torch.matmul(x, self.matrix_t(x.device, x.dtype))


def stacked_t(
    cache: Dict[object, torch.Tensor], factors: "list[Factor]", device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The factors' P^T stacked, [L, n, k], for one batched product over a group of layers; made once per
    (factors, device, dtype) into ``cache``, which is emptied past 64 entries (groups that vary from step
    to step)."""
    key = (tuple(id(f) for f in factors), device, dtype)
    p = cache.get(key)
    if p is None:
        if len(cache) > 64:
            cache.clear()
        p = cache[key] = torch.stack([f.matrix_t(device, dtype) for f in factors])
    return p


class CountSketch:
    """``i -> (bucket h(i), sign s(i))`` for ids in [0, n): E<Sx, Sy> = <x, y>, with no n x k matrix.
    The identity (bucket i, sign +1) when ``n <= k``."""

    def __init__(self, n: int, k: int, seed: int, *key: object) -> None:
        self.n = int(n)
        self.identity = self.n <= k
        self.k = self.n if self.identity else int(k)
        self._seed = derived_seed(seed, *key, self.n, self.k)
        self._on: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(buckets [n] int64, signs [n] float32) on ``device``."""
        t = self._on.get(device)
        if t is None:
            if self.identity:
                buckets, signs = torch.arange(self.n), torch.ones(self.n)
            else:
                buckets, signs = _buckets_and_signs(self._seed, self.n, self.k)
            t = (buckets.to(device), signs.to(device))
            self._on[device] = t
        return t


class FoldSketch:
    """A sparse JL transform of a flat vector of length n to k numbers: random signs, then coordinate i
    goes to bucket i mod k (a count sketch with a structured hash; the signs make it unbiased). For the
    whole-batch gradients of parameters no layer hook covers. The identity when ``n <= k``."""

    def __init__(self, n: int, k: int, seed: int, *key: object) -> None:
        self.n = int(n)
        self.identity = self.n <= k
        self.k = self.n if self.identity else int(k)
        self._seed = derived_seed(seed, *key, self.n, self.k)
        self._on: Dict[torch.device, torch.Tensor] = {}

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return flat
        signs = self._on.get(flat.device)
        padded = -(-self.n // self.k) * self.k
        if signs is None:
            s = torch.randint(0, 2, (padded,), generator=_generator(self._seed)).float() * 2 - 1
            s[self.n :] = 0.0
            signs = self._on[flat.device] = s.to(flat.device)
        if padded != self.n:
            flat = torch.nn.functional.pad(flat, (0, padded - self.n))
        return (flat * signs).view(-1, self.k).sum(0)
