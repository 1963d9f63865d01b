//! `pair`: pair balance. Visited units are taken two at a time; the difference of their gradients is
//! signed against the running sum and decides which of the two goes to the front. No stale mean.
//! A pair may straddle steps: the first unit's gradient is copied (never kept as a view into a buffer
//! the caller will overwrite, the bug that zeroed the reference code's differences).

use crate::assembly::FrontBack;
use crate::batch::Batch;
use crate::elem::{GradElem, Scratch, StateElem};
use crate::error::{GrabError, Result};
use crate::kernels::{dot_diff, update_diff, update_from, update_then_dot, Layout, Pieces};
use crate::mean_balance::{non_finite, row_pieces};
use crate::sign::SignRule;

#[derive(Debug, Clone, PartialEq)]
pub struct PairBalance<S> {
    pub s: Vec<S>,
    /// The first unit of an open pair and its gradient (exact f64 copy), if any.
    pub pending: Option<u32>,
    pub pending_grad: Vec<f64>,
    snapshot: Scratch<Vec<S>>,
}

/// One pair's update of the running sum, fused with the next pair's dot when `next` is given. With
/// `in_place`, s is updated directly; otherwise the first call moves s into `sb` (`update_from`) and
/// later calls update `sb`.
#[allow(clippy::too_many_arguments)]
fn apply<S: StateElem, A: GradElem, B: GradElem, C: GradElem, D: GradElem>(
    layout: &Layout,
    moved: &mut bool,
    in_place: bool,
    s: &mut [S],
    sb: &mut [S],
    a: &Pieces<A>,
    b: &Pieces<B>,
    coef: f64,
    next: Option<(&Pieces<C>, &Pieces<D>)>,
) -> Option<(f64, f64)> {
    if !*moved {
        *moved = true;
        return update_from::<S, A, B, A, C, D>(layout, (s, &[]), sb, a, b, coef, None, next);
    }
    let target = if in_place { s } else { sb };
    match next {
        Some((c, d)) => Some(update_then_dot::<S, A, B, A, C, D>(
            layout, target, a, b, coef, None, c, d,
        )),
        None => {
            update_diff::<S, A, B, A>(layout, target, a, b, coef, None);
            None
        }
    }
}

impl<S: StateElem> PairBalance<S> {
    pub fn new(d: usize) -> Self {
        PairBalance {
            s: vec![S::default(); d],
            pending: None,
            pending_grad: vec![0.0; d],
            snapshot: Scratch::default(),
        }
    }

    pub fn from_parts(s: Vec<S>, pending: Option<u32>, pending_grad: Vec<f64>) -> Self {
        PairBalance {
            s,
            pending,
            pending_grad,
            snapshot: Scratch::default(),
        }
    }

    pub fn check_not_pending(&self, indices: &[u32]) -> Result<()> {
        match self.pending {
            Some(p) if indices.contains(&p) => Err(GrabError::index(format!(
                "unit {p} already received a gradient this epoch (it waits for its pair partner)"
            ))),
            _ => Ok(()),
        }
    }

    pub fn step<G: GradElem>(
        &mut self,
        layout: &Layout,
        batch: &Batch<G>,
        indices: &[u32],
        assembler: &mut FrontBack,
        rule: &mut SignRule,
        n: usize,
    ) -> Result<()> {
        let rows = batch.rows();
        let d = layout.dim;
        let saved_rule = rule.clone();
        let fail = |rule: &mut SignRule, unit: u32, r: usize| {
            *rule = saved_rule.clone();
            Err(non_finite(unit, r))
        };
        let has_pending = self.pending.is_some() && rows > 0;
        let first_in_batch = usize::from(has_pending);
        let pairs = usize::from(has_pending) + (rows - first_in_batch) / 2;
        let opens = rows > first_in_batch && (rows - first_in_batch) % 2 == 1;
        // An unpaired last row is checked first, so that nothing below can fail after an update.
        if opens {
            let r = rows - 1;
            if batch
                .row(r)
                .pieces()
                .any(|(_, p)| p.iter().any(|x| !x.to_f64().is_finite()))
            {
                return fail(rule, indices[r], r);
            }
        }
        // All or nothing without a snapshot copy (see MeanBalance::step): with two or more pairs, the
        // first update moves s into the scratch buffer, later ones update it in place, and the buffers
        // are swapped only at the end. A single pair cannot fail after its dot product.
        let PairBalance {
            s,
            pending,
            pending_grad,
            snapshot,
        } = self;
        let sb = &mut snapshot.0;
        let mut moved = pairs <= 1;
        let target_in_place = pairs <= 1;
        if !target_in_place {
            sb.resize(d, S::default());
        }
        // (first unit, second unit, sign) for each closed pair.
        let mut closed: Vec<(u32, u32, f64)> = Vec::with_capacity(pairs);
        let mut r = 0;
        // The dot of the next pair, when the update by the previous pair already computed it in the
        // same pass over memory (bit for bit what separate passes give).
        let mut next_dot: Option<(f64, f64)> = None;
        if let (Some(first), true) = (*pending, has_pending) {
            let a = Pieces::split_flat(pending_grad, &layout.widths);
            let b = row_pieces(batch, 0);
            let (dot, norm2) = dot_diff(layout, s, &a, &b);
            if !(dot.is_finite() && norm2.is_finite()) {
                return fail(rule, indices[0], 0);
            }
            let dec = rule.decide(dot, norm2, n, d);
            let coef = dec.eps * dec.scale;
            let nx = (rows >= 3).then(|| (row_pieces(batch, 1), row_pieces(batch, 2)));
            next_dot = apply(
                layout,
                &mut moved,
                target_in_place,
                s,
                sb,
                &a,
                &b,
                coef,
                nx.as_ref().map(|(c, e)| (c, e)),
            );
            closed.push((first, indices[0], dec.eps));
            r = 1;
        }
        while r + 1 < rows {
            let a = row_pieces(batch, r);
            let b = row_pieces(batch, r + 1);
            let (dot, norm2) = match next_dot.take() {
                Some(x) => x,
                None => dot_diff(
                    layout,
                    if moved && !target_in_place {
                        &sb[..]
                    } else {
                        &s[..]
                    },
                    &a,
                    &b,
                ),
            };
            if !(dot.is_finite() && norm2.is_finite()) {
                return fail(rule, indices[r], r);
            }
            let dec = rule.decide(dot, norm2, n, d);
            let coef = dec.eps * dec.scale;
            let nx = (r + 3 < rows).then(|| (row_pieces(batch, r + 2), row_pieces(batch, r + 3)));
            next_dot = apply(
                layout,
                &mut moved,
                target_in_place,
                s,
                sb,
                &a,
                &b,
                coef,
                nx.as_ref().map(|(c, e)| (c, e)),
            );
            closed.push((indices[r], indices[r + 1], dec.eps));
            r += 2;
        }
        if !target_in_place {
            std::mem::swap(s, sb);
        }
        // Nothing can fail from here on. Any earlier open pair was closed by row 0.
        if rows > 0 {
            *pending = if opens {
                for (o, p) in batch.row(r).pieces() {
                    for (dst, src) in pending_grad[o..o + p.len()].iter_mut().zip(p) {
                        *dst = src.to_f64();
                    }
                }
                Some(indices[r])
            } else {
                None
            };
        }
        for (i1, i2, eps) in closed {
            if eps > 0.0 {
                assembler.place(i1, 1.0);
                assembler.place(i2, -1.0);
            } else {
                assembler.place(i2, 1.0);
                assembler.place(i1, -1.0);
            }
        }
        Ok(())
    }

    /// Close the epoch: an open pair's first unit stays unsigned (it goes in the middle).
    pub fn end_epoch(&mut self) {
        self.s.iter_mut().for_each(|x| *x = S::default());
        self.pending = None;
    }
}
