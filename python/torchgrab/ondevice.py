"""The on-device path: balancing without moving (B, d) gradients to the host.

For a step of B rows with centered gradients Z (``grab``: Z = G - 1 m^T; ``pair``: the pair differences),
GRAB.md's Gram formulation gives the B sequential signs exactly from u = Z s0 (B numbers) and
Z Z^T (B x B numbers). Here the d-dimensional work runs with torch wherever the gradients live (a CUDA
device, or the CPU when forced): u and Z Z^T are accumulated per parameter segment (never concatenated),
in float64, column block by column block (so the float64 temporaries stay bounded by ``block_bytes``);
only those B + B^2 numbers cross to the host, where the Rust scan decides the signs and places the units
(``NativeSampler.step_gram``); then s += Z^T (eps * scale) is applied on the device. A segment may also be
a :class:`Factored` Linear gradient (the ghost form): its rows are never formed, and its part of u and
Z Z^T comes from B x B products of its factors (see the class).

Why explicit centering instead of folding m in analytically (u = G s0 - <m, s0>, Z Z^T = G G^T - ...):
the column block is converted to float64 anyway (for exact-enough products), so subtracting m from it
costs one element-wise op and avoids the cancellation the folded form suffers when ||m|| >> ||z||.

The running sums (s, m, m_next for ``grab``; s and an open pair's first gradient for ``pair``) are
per-segment tensors on the gradients' device, in the sampler's state dtype. They differ from the dense
CPU kernel only in rounding (one rounding per step instead of one per row), so orders agree with the
dense kernel wherever no inner product sits within rounding distance of 0 (tested on well-separated data).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from torchgrab._autocast import full_precision
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


class Factored:
    """A Linear layer's per-example weight gradients, held as their factors and never formed: row r is
    vec(sum_t G_t[r] A_t[r]^T), an out x in matrix (the ghost form of ../shared/design/SKETCH.md). ``terms``:
    ``(G [R, out], A [R, in])`` per call of the layer in the step (a layer called twice sums two outer
    products per example). Every product the balancing needs comes from B x B Gram matrices of the
    factors and products the size of the weight, in the precision of the sampler's state:

    - X s = sum_t rowdot(G_t, A_t S^T), with S the running sum viewed as out x in;
    - X Y^T = sum_{t, t'} (G_t H_t'^T) o (A_t C_t'^T) for the rows of another Factored Y = (H, C);
    - X^T c = sum_t G_t^T diag(c) A_t (a weight-gradient-sized product, accumulated into the state).
    """

    def __init__(self, terms: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        terms = [(g.detach(), a.detach()) for g, a in terms]
        if not terms:
            raise ShapeError("a factored gradient needs at least one (G, A) term")
        r, out_f, in_f = terms[0][0].shape[0], terms[0][0].shape[1], terms[0][1].shape[1]
        for g, a in terms:
            if g.dim() != 2 or a.dim() != 2 or g.shape != (r, out_f) or a.shape != (r, in_f):
                raise ShapeError(
                    f"factored gradient terms must be G [{r}, {out_f}] and A [{r}, {in_f}], got "
                    f"{tuple(g.shape)} and {tuple(a.shape)}"
                )
        self.terms = terms
        self.out, self.inp = int(out_f), int(in_f)
        self.dtype = torch.float64  # the precision of the products (set by the balancer: its state's)
        self._cast: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None

    def cast(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """The terms in ``dtype``, converted once per step (every product below reads them)."""
        if self._cast is None or self._cast[0][0].dtype != self.dtype:
            self._cast = [(g.to(self.dtype), a.to(self.dtype)) for g, a in self.terms]
        return self._cast

    @property
    def shape(self) -> Tuple[int, int]:
        return (int(self.terms[0][0].shape[0]), self.out * self.inp)

    @property
    def device(self) -> torch.device:
        return self.terms[0][0].device

    def rows(self, sl: slice) -> "Factored":
        return Factored([(g[sl], a[sl]) for g, a in self.terms])

    def cat(self, other: "Factored") -> "Factored":
        """These rows, then ``other``'s (a layer called a different number of times in the two: the
        missing calls are zero terms)."""
        mine, theirs = list(self.terms), list(other.terms)
        while len(mine) < len(theirs):
            mine.append((mine[0][0].new_zeros(mine[0][0].shape), mine[0][1].new_zeros(mine[0][1].shape)))
        while len(theirs) < len(mine):
            theirs.append((theirs[0][0].new_zeros(theirs[0][0].shape), theirs[0][1].new_zeros(theirs[0][1].shape)))
        return Factored([(torch.cat([g, h]), torch.cat([a, c])) for (g, a), (h, c) in zip(mine, theirs)])

    def finite(self) -> bool:
        return all(bool(torch.isfinite(g).all()) and bool(torch.isfinite(a).all()) for g, a in self.terms)

    def encode(self) -> torch.Tensor:
        """One row as one flat tensor (a pair's waiting first member, in a state dict): [G_t; A_t] per term."""
        return torch.cat([torch.cat([g[0], a[0]]) for g, a in self.terms])

    @staticmethod
    def decode(flat: torch.Tensor, out_f: int, in_f: int) -> "Factored":
        per = out_f + in_f
        if flat.dim() != 1 or flat.numel() == 0 or flat.numel() % per:
            raise ShapeError(
                f"a factored row of {out_f} x {in_f} must have a multiple of {per} numbers, got {flat.numel()}"
            )
        terms = flat.view(-1, per)
        return Factored([(t[:out_f].unsqueeze(0), t[out_f:].unsqueeze(0)) for t in terms])

    def dot(self, *vs: torch.Tensor) -> torch.Tensor:
        """X v for each flat out*in vector v: [len(vs), R] float64."""
        # rowdot(G, A V^T) per v: the inner dimension is the (long) input side.
        mats = [v.to(self.dtype).view(self.out, self.inp) for v in vs]
        total = None
        for g, a in self.cast():
            t = torch.stack([((a @ m.T) * g).sum(1) for m in mats])
            total = t if total is None else total + t
        return total.double()  # type: ignore[union-attr]

    def gram(self, other: "Factored") -> torch.Tensor:
        """X Y^T, [R, R'] float64."""
        total = None
        for g, a in self.cast():
            for h, c in other.cast():
                k = (g @ h.T).mul_(a @ c.T)
                total = k if total is None else total.add_(k)
        return total.double()  # type: ignore[union-attr]

    def add_to(self, target: torch.Tensor, coef: Optional[torch.Tensor] = None, alpha: float = 1.0) -> None:
        """target += alpha X^T coef (coef None: all ones), for a flat out*in ``target`` in ``dtype``: one
        in-place product per term, accumulated into the state (no out x in temporary)."""
        mat = target.view(self.out, self.inp)
        for g, a in self.cast():
            gc = g if coef is None else g * coef.to(g.dtype).unsqueeze(1)
            mat.addmm_(gc.T, a, alpha=alpha)


Segment = Union[torch.Tensor, Factored]


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
        # (out, in) of each segment that is a Factored Linear gradient, None for a dense one.
        self.factors: Optional[List[Optional[Tuple[int, int]]]] = None
        self.s: List[torch.Tensor] = []
        self.m: List[torch.Tensor] = []
        self.m_next: List[torch.Tensor] = []
        self.seen = 0
        self.pending_index: Optional[int] = None
        self.pending_grad: List[torch.Tensor] = []

    # ------------------------------------------------------------------ state
    def _ensure(self, segs: Sequence[Segment]) -> None:
        widths = [int(t.shape[1]) for t in segs]
        factors = [(t.out, t.inp) if isinstance(t, Factored) else None for t in segs]
        device = segs[0].device
        if self.widths is None:
            self.widths, self.factors = widths, factors
            zeros = lambda: [torch.zeros(w, dtype=self.dtype, device=device) for w in widths]  # noqa: E731
            self.s = zeros()
            if self.ordering == "grab":
                self.m, self.m_next = zeros(), zeros()
            return
        if widths != self.widths:
            raise ShapeError(
                f"expected gradient segments of widths {self.widths} (fixed by the first step), got {widths}"
            )
        if self.factors is None:
            self.factors = factors  # restored from a state dict written before factored segments existed
        if factors != self.factors:
            raise ShapeError(
                f"expected gradient segments factored as {self.factors} (fixed by the first step), got {factors}"
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
            "factors": None if self.factors is None else [None if f is None else list(f) for f in self.factors],
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
            factors = state.get("factors")  # absent before factored segments existed: all dense
            if factors is not None:
                factors = [None if f is None else (int(f[0]), int(f[1])) for f in factors]
        except (KeyError, TypeError, ValueError) as e:
            raise StateDictError(f"malformed on-device state: {e}") from None
        if widths is not None:
            for k in ("s", "m", "m_next"):
                if lists[k] and [int(t.numel()) for t in lists[k]] != list(widths):
                    raise StateDictError(f"on-device state {k!r} does not match widths {widths}")
                if any(t.dtype != self.dtype for t in lists[k]):
                    raise StateDictError(f"on-device state {k!r} is not {self.dtype}")
        if factors is not None and (widths is None or len(factors) != len(widths)):
            raise StateDictError(f"on-device state 'factors' {factors} does not match widths {widths}")
        if factors is not None and any(f is not None and f[0] * f[1] != w for f, w in zip(factors, widths)):
            raise StateDictError(f"on-device state 'factors' {factors} does not match widths {widths}")
        self.widths = list(widths) if widths is not None else None
        self.factors = factors
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
            if isinstance(rows[0][k], Factored):
                uk, gk = self._factored_products(rows, k, center)
                u += uk
                gram += gk
                continue
            for blk in _blocks(w, r, self.block_bytes):
                z = self._block(rows, k, blk, center)
                uk, gk = _products(z, self.s[k][blk].double(), self.split_cols)
                u += uk
                gram += gk
        return u, gram

    def _factored_products(
        self, rows: List[List[Any]], k: int, center: Optional[List[torch.Tensor]]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """u and Z Z^T of segment k from its factors. Pairs: Z = A - B, so Z Z^T = AA^T - AB^T - BA^T +
        BB^T. grab: Z = X - 1 m^T, centered analytically (the factors cannot be centered without forming
        the rows): u = X s - <m, s>, Z Z^T = X X^T - (X m) 1^T - 1 (X m)^T + ||m||^2, in float64."""
        s = self.s[k]
        for r in rows:
            # Products of factors in the state's precision (float64 state, float64 products). The dense
            # blocks are float64 either way; theirs are not what a step costs.
            r[k].dtype = self.dtype
        if len(rows) == 2:
            a, b = rows[0][k], rows[1][k]
            ab = a.gram(b)
            return a.dot(s)[0] - b.dot(s)[0], a.gram(a) - ab - ab.T + b.gram(b)
        x = rows[0][k]
        gram = x.gram(x)
        if center is None:
            return x.dot(s)[0], gram
        # The d-long vectors stay in the state's dtype: converting a wide layer's s and m to float64
        # every step cost more than its products.
        m = center[k]
        xs, xm = x.dot(s, m)
        gram -= xm.unsqueeze(1)
        gram -= xm.unsqueeze(0)
        return xs - float(torch.dot(m, s)), gram + float(torch.dot(m, m))

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

    def _update(
        self, rows: List[List[Any]], center: Optional[List[torch.Tensor]], coef: torch.Tensor, inv_n: float = 0.0
    ) -> None:
        """s += Z^T coef; for grab (``inv_n`` = 1/n) a factored segment's m_next too (the caller moves the
        dense segments' m_next)."""
        assert self.widths is not None
        r = coef.shape[0]
        for k, w in enumerate(self.widths):
            if isinstance(rows[0][k], Factored):
                s = self.s[k]  # updated in place in its own dtype (a wide layer's: see _factored_products)
                rows[0][k].add_to(s, coef)
                if inv_n:
                    rows[0][k].add_to(self.m_next[k], alpha=inv_n)
                if len(rows) == 2:
                    rows[1][k].add_to(s, coef, alpha=-1.0)
                elif center is not None:
                    s.add_(center[k], alpha=-float(coef.sum()))
                continue
            for blk in _blocks(w, r, self.block_bytes):
                z = self._block(rows, k, blk, center)
                s = self.s[k][blk]
                s.copy_((s.double() + coef @ z).to(self.dtype))

    def step(self, native: Any, segments: Sequence[Segment], idx: np.ndarray) -> None:
        """Balance one step. ``segments`` are (B, ...) tensors or :class:`Factored` gradients on one
        device; ``idx`` uint32 units."""
        segs: List[Segment] = [t if isinstance(t, Factored) else t.detach().reshape(t.shape[0], -1) for t in segments]
        devices = {t.device for t in segs}
        if len(devices) > 1:
            raise ShapeError(f"all gradient segments must be on one device, got {sorted(map(str, devices))}")
        b = int(segs[0].shape[0])
        with torch.no_grad(), full_precision():  # (called inside an autocast block, its products were half)
            self._ensure(segs)
            d = sum(self.widths or [])
            if self.ordering == "grab":
                self._step_grab(native, segs, idx, b, d)
            else:
                self._step_pair(native, segs, idx, b, d)

    def _step_grab(self, native: Any, segs: List[Segment], idx: np.ndarray, b: int, d: int) -> None:
        rows = [segs]
        u, gram = self._gram(rows, self.m)
        u_h, gram_h = _to_host(u, gram)
        coef_h = native.step_gram(idx, u_h, gram_h, d, np.zeros(0, np.uint32))
        coef = torch.from_numpy(coef_h).to(segs[0].device)
        inv_n = 1.0 / self.n
        self._update(rows, self.m, coef, inv_n)  # (and a factored segment's m_next)
        for k, g in enumerate(segs):
            if isinstance(g, Factored):
                continue
            mn = self.m_next[k]
            mn.copy_((mn.double() + g.double().sum(0) * inv_n).to(self.dtype))
        self.seen += b

    def _step_pair(self, native: Any, segs: List[Segment], idx: np.ndarray, b: int, d: int) -> None:
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
            if isinstance(g, Factored):
                a, bb = (
                    g.rows(slice(start, start + 2 * npairs_in, 2)),
                    g.rows(slice(start + 1, start + 2 * npairs_in, 2)),
                )
                if start:
                    a = Factored.decode(self.pending_grad[k], g.out, g.inp).cat(a)
                    bb = g.rows(slice(0, 1)).cat(bb)
            else:
                a = g[start : start + 2 * npairs_in : 2]
                bb = g[start + 1 : start + 2 * npairs_in : 2]
                if start:
                    a = torch.cat([self.pending_grad[k].unsqueeze(0), a])
                    bb = torch.cat([g[:1], bb])
            a_rows.append(a)
            b_rows.append(bb)
        hold = np.array([units[-1]] if leftover else [], dtype=np.uint32)
        last = [g.rows(slice(b - 1, b)) if isinstance(g, Factored) else g[-1] for g in segs]
        if leftover and not all(t.finite() if isinstance(t, Factored) else bool(torch.isfinite(t).all()) for t in last):
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
            self.pending_grad = [t.encode() if isinstance(t, Factored) else t.clone() for t in last]
        elif npairs:
            self.pending_index = None
            self.pending_grad = []
