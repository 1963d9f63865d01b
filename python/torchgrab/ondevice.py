"""The on-device path: balancing without moving (B, d) gradients to the host.

For a step of B rows with centered gradients Z (``grab``: Z = G - 1 m^T; ``pair``: the pair differences),
GRAB.md's Gram formulation gives the B sequential signs exactly from u = Z s0 (B numbers) and
Z Z^T (B x B numbers). Here the d-dimensional work runs with torch wherever the gradients live (a CUDA
device, or the CPU when forced): u and Z Z^T are accumulated per parameter segment (never concatenated),
in float64, column block by column block (so the float64 temporaries stay bounded by ``block_bytes``);
only those B + B^2 numbers cross to the host, where the Rust scan decides the signs and places the units
(``NativeSampler.step_gram``); then s += Z^T (eps * scale) is applied on the device.

Why explicit centering instead of folding m in analytically (u = G s0 - <m, s0>, Z Z^T = G G^T - ...):
the column block is converted to float64 anyway (for exact-enough products), so subtracting m from it
costs one element-wise op and avoids the cancellation the folded form suffers when ||m|| >> ||z||.

The running sums (s, m, m_next for ``grab``; s and an open pair's first gradient for ``pair``) are
per-segment tensors on the gradients' device, in the sampler's state dtype. They differ from the dense
CPU kernel only in rounding (one rounding per step instead of one per row), so orders agree with the
dense kernel wherever no inner product sits within rounding distance of 0 (tested on well-separated data).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from torchgrab.errors import NonFiniteGradientError, ShapeError, StateDictError, UnitIndexError

DEFAULT_BLOCK_BYTES = 64 << 20

# Columns per chunk when u and Z Z^T are formed as a batch of chunk products (see `_products`); None
# forms each column block with one product. None until a GPU measurement chooses otherwise:
# benchmarks/gpu.py ends with a table of both (the H100 figures in the README are with None).
DEFAULT_SPLIT_COLS: Optional[int] = None


def _blocks(width: int, rows: int, block_bytes: int) -> List[slice]:
    cols = max(1, block_bytes // (8 * max(rows, 1)))
    return [slice(lo, min(lo + cols, width)) for lo in range(0, width, cols)]


def _products(z: torch.Tensor, s: torch.Tensor, split_cols: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Z s, Z Z^T) of one float64 column block Z (R, K), s (K,).

    With ``split_cols``, the columns are cut into chunks of that many and the products are formed as
    one batched product over the chunks (views, no copy), then summed; the last partial chunk is added
    on its own. Why: Z Z^T is an R x R output with an inner dimension of up to millions, one output
    tile, which a GPU matrix library may leave to a few of its multiprocessors (the suspected cause of
    the slow large-d H100 figures in the README). Same numbers up to the order of the float64 sums.
    """
    r, k = z.shape
    if split_cols is None or k < 2 * split_cols:
        return z @ s, z @ z.T
    c = k // split_cols
    cut = c * split_cols
    zc = z[:, :cut].view(r, c, split_cols).transpose(0, 1)  # (c, R, split_cols)
    gram = torch.bmm(zc, zc.transpose(1, 2)).sum(0)
    u = torch.bmm(zc, s[:cut].view(c, split_cols, 1)).sum(0).squeeze(1)
    if cut < k:
        zt = z[:, cut:]
        gram = gram + zt @ zt.T
        u = u + zt @ s[cut:]
    return u, gram


def _to_host(u: torch.Tensor, gram: torch.Tensor) -> Any:
    """The only device-to-host transfer of a step: B + B^2 float64 numbers, in one copy."""
    both = torch.cat([u.unsqueeze(0), gram]).cpu().numpy()
    return np.ascontiguousarray(both[0]), np.ascontiguousarray(both[1:])


class OnDeviceBalancer:
    """The device half of ``grab`` / ``pair`` balancing. ``native`` is the sampler's ``NativeSampler``."""

    def __init__(self, ordering: str, n: int, dtype: torch.dtype, block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        if ordering not in ("grab", "pair"):
            raise ValueError(f"the on-device path balances 'grab' and 'pair', not {ordering!r}")
        self.ordering = ordering
        self.n = n
        self.dtype = dtype
        self.block_bytes = block_bytes
        self.split_cols = DEFAULT_SPLIT_COLS
        self.widths: Optional[List[int]] = None
        self.s: List[torch.Tensor] = []
        self.m: List[torch.Tensor] = []
        self.m_next: List[torch.Tensor] = []
        self.seen = 0
        self.pending_index: Optional[int] = None
        self.pending_grad: List[torch.Tensor] = []

    # ------------------------------------------------------------------ state
    def _ensure(self, segs: Sequence[torch.Tensor]) -> None:
        widths = [int(t.shape[1]) for t in segs]
        device = segs[0].device
        if self.widths is None:
            self.widths = widths
            zeros = lambda: [torch.zeros(w, dtype=self.dtype, device=device) for w in widths]  # noqa: E731
            self.s = zeros()
            if self.ordering == "grab":
                self.m, self.m_next = zeros(), zeros()
            return
        if widths != self.widths:
            raise ShapeError(
                f"expected gradient segments of widths {self.widths} (fixed by the first step), got {widths}"
            )
        if self.s[0].device != device:
            # Sums restored from a checkpoint live on the CPU until the gradients show where they belong.
            move = lambda xs: [x.to(device) for x in xs]  # noqa: E731
            self.s, self.m, self.m_next, self.pending_grad = (
                move(self.s),
                move(self.m),
                move(self.m_next),
                move(self.pending_grad),
            )

    def end_epoch(self) -> None:
        """Close the epoch as the dense kernel does: the raw mean seen becomes the stale mean."""
        if self.widths is None:
            return
        with torch.no_grad():
            if self.ordering == "grab":
                if self.seen > 0:
                    rescale = self.n / self.seen
                    self.m = [(mn.double() * rescale).to(self.dtype) for mn in self.m_next]
                for mn in self.m_next:
                    mn.zero_()
            for s in self.s:
                s.zero_()
        self.seen = 0
        self.pending_index = None
        self.pending_grad = []

    def state(self) -> Dict[str, Any]:
        cpu = lambda xs: [x.detach().to("cpu", copy=True) for x in xs]  # noqa: E731
        return {
            "ordering": self.ordering,
            "widths": list(self.widths) if self.widths is not None else None,
            "s": cpu(self.s),
            "m": cpu(self.m),
            "m_next": cpu(self.m_next),
            "seen": self.seen,
            "pending_index": self.pending_index,
            "pending_grad": cpu(self.pending_grad),
        }

    def load(self, state: Dict[str, Any]) -> None:
        try:
            if state["ordering"] != self.ordering:
                raise StateDictError(
                    f"the on-device state is for {state['ordering']!r}, this sampler balances {self.ordering!r}"
                )
            widths = state["widths"]
            lists = {k: list(state[k]) for k in ("s", "m", "m_next", "pending_grad")}
            seen = int(state["seen"])
            pending = state["pending_index"]
        except (KeyError, TypeError, ValueError) as e:
            raise StateDictError(f"malformed on-device state: {e}") from None
        if widths is not None:
            for k in ("s", "m", "m_next"):
                if lists[k] and [int(t.numel()) for t in lists[k]] != list(widths):
                    raise StateDictError(f"on-device state {k!r} does not match widths {widths}")
                if any(t.dtype != self.dtype for t in lists[k]):
                    raise StateDictError(f"on-device state {k!r} is not {self.dtype}")
        self.widths = list(widths) if widths is not None else None
        self.s, self.m, self.m_next = (
            [t.detach().clone() for t in lists["s"]],
            [t.detach().clone() for t in lists["m"]],
            [t.detach().clone() for t in lists["m_next"]],
        )
        self.pending_grad = [t.detach().clone() for t in lists["pending_grad"]]
        self.seen = seen
        self.pending_index = None if pending is None else int(pending)

    # ------------------------------------------------------------------ the step
    def _gram(self, rows: List[List[torch.Tensor]], center: Optional[List[torch.Tensor]]) -> Any:
        """u = Z s and Z Z^T (float64, on the device) of the rows given per segment as (R, w) tensors."""
        assert self.widths is not None
        r = rows[0][0].shape[0] if rows else 0
        device = self.s[0].device
        u = torch.zeros(r, dtype=torch.float64, device=device)
        gram = torch.zeros(r, r, dtype=torch.float64, device=device)
        for k, w in enumerate(self.widths):
            for blk in _blocks(w, r, self.block_bytes):
                z = self._block(rows, k, blk, center)
                uk, gk = _products(z, self.s[k][blk].double(), self.split_cols)
                u += uk
                gram += gk
        return u, gram

    @staticmethod
    def _block(
        rows: List[List[torch.Tensor]], k: int, blk: slice, center: Optional[List[torch.Tensor]]
    ) -> torch.Tensor:
        """Rows of Z for columns `blk` of segment k, in float64. `rows` is [[A_k], [B_k]] (Z = A - B)
        for pair differences, or [[G_k]] with `center` = m for grab."""
        if len(rows) == 2:
            return rows[0][k][:, blk].double() - rows[1][k][:, blk].double()
        z = rows[0][k][:, blk].double()
        if center is not None:
            z = z - center[k][blk].double()
        return z

    def _update(self, rows: List[List[torch.Tensor]], center: Optional[List[torch.Tensor]], coef: torch.Tensor) -> None:
        assert self.widths is not None
        r = coef.shape[0]
        for k, w in enumerate(self.widths):
            for blk in _blocks(w, r, self.block_bytes):
                z = self._block(rows, k, blk, center)
                s = self.s[k][blk]
                s.copy_((s.double() + coef @ z).to(self.dtype))

    def step(self, native: Any, segments: Sequence[torch.Tensor], idx: np.ndarray) -> None:
        """Balance one step. ``segments`` are (B, ...) tensors on one device; ``idx`` uint32 units."""
        segs = [t.detach().reshape(t.shape[0], -1) for t in segments]
        devices = {t.device for t in segs}
        if len(devices) > 1:
            raise ShapeError(f"all gradient segments must be on one device, got {sorted(map(str, devices))}")
        b = int(segs[0].shape[0])
        with torch.no_grad():
            self._ensure(segs)
            d = sum(self.widths or [])
            if self.ordering == "grab":
                self._step_grab(native, segs, idx, b, d)
            else:
                self._step_pair(native, segs, idx, b, d)

    def _step_grab(self, native: Any, segs: List[torch.Tensor], idx: np.ndarray, b: int, d: int) -> None:
        rows = [segs]
        u, gram = self._gram(rows, self.m)
        u_h, gram_h = _to_host(u, gram)
        coef_h = native.step_gram(idx, u_h, gram_h, d, np.zeros(0, np.uint32))
        coef = torch.from_numpy(coef_h).to(segs[0].device)
        self._update(rows, self.m, coef)
        inv_n = 1.0 / self.n
        for k, g in enumerate(segs):
            mn = self.m_next[k]
            mn.copy_((mn.double() + g.double().sum(0) * inv_n).to(self.dtype))
        self.seen += b

    def _step_pair(self, native: Any, segs: List[torch.Tensor], idx: np.ndarray, b: int, d: int) -> None:
        units = [int(i) for i in idx]
        if self.pending_index is not None and self.pending_index in units:
            raise UnitIndexError(
                f"unit {self.pending_index} already received a gradient this epoch (it waits for its pair partner)"
            )
        start = 1 if self.pending_index is not None else 0
        npairs_in = (b - start) // 2
        leftover = start + 2 * npairs_in < b
        pair_units: List[int] = []
        if start:
            pair_units += [self.pending_index, units[0]]  # type: ignore[list-item]
        for p in range(npairs_in):
            pair_units += [units[start + 2 * p], units[start + 2 * p + 1]]
        # A (first members) and B (second members) per segment, as (P, w) tensors.
        a_rows, b_rows = [], []
        for k, g in enumerate(segs):
            a = g[start : start + 2 * npairs_in : 2]
            bb = g[start + 1 : start + 2 * npairs_in : 2]
            if start:
                a = torch.cat([self.pending_grad[k].unsqueeze(0), a])
                bb = torch.cat([g[:1], bb])
            a_rows.append(a)
            b_rows.append(bb)
        hold = np.array([units[-1]] if leftover else [], dtype=np.uint32)
        if leftover and not all(bool(torch.isfinite(g[-1]).all()) for g in segs):
            raise NonFiniteGradientError(
                f"the gradient of unit {units[-1]} (row {b - 1} of this step) contains NaN or Inf; the step was refused and nothing changed"
            )
        rows = [a_rows, b_rows]
        npairs = len(pair_units) // 2
        if npairs:
            u, gram = self._gram(rows, None)
            u_h, gram_h = _to_host(u, gram)
            coef_h = native.step_gram(np.asarray(pair_units, dtype=np.uint32), u_h, gram_h, d, hold)
            self._update(rows, None, torch.from_numpy(coef_h).to(segs[0].device))
        elif leftover:
            native.step_gram(np.zeros(0, np.uint32), np.zeros(0), np.zeros((0, 0)), d, hold)
        if leftover:
            self.pending_index = units[-1]
            self.pending_grad = [g[-1].clone() for g in segs]
        elif npairs:
            self.pending_index = None
            self.pending_grad = []
