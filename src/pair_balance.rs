//! `pair`: pair balance. Visited units are taken two at a time; the difference of their gradients is
//! signed against the running sum and decides which of the two goes to the front. No stale mean.
//! A pair may straddle steps: the first unit's gradient is copied (never kept as a view into a buffer
//! the caller will overwrite, the bug that zeroed the reference code's differences).

use crate::assembly::FrontBack;
use crate::batch::Batch;
use crate::elem::{GradElem, Scratch, StateElem};
use crate::error::{GrabError, Result};
use crate::kernels::{dot_diff, update_diff, update_then_dot, Layout, Pieces};
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
        self.snapshot.0.clone_from(&self.s);
        // (first unit, second unit, sign) for each closed pair.
        let mut closed: Vec<(u32, u32, f64)> = Vec::with_capacity(rows / 2 + 1);
        let fail = |this: &mut Self, rule: &mut SignRule, unit: u32, r: usize| {
            std::mem::swap(&mut this.s, &mut this.snapshot.0);
            *rule = saved_rule.clone();
            Err(non_finite(unit, r))
        };
        let mut r = 0;
        // The dot of the next pair, when the update by the previous pair already computed it in the
        // same pass over memory (`update_then_dot`: bit for bit what separate passes give).
        let mut next_dot: Option<(f64, f64)> = None;
        if let (Some(first), true) = (self.pending, rows > 0) {
            let a = Pieces::split_flat(&self.pending_grad, &layout.widths);
            let b = row_pieces(batch, 0);
            let (dot, norm2) = dot_diff(layout, &self.s, &a, &b);
            if !(dot.is_finite() && norm2.is_finite()) {
                return fail(self, rule, indices[0], 0);
            }
            let dec = rule.decide(dot, norm2, n, d);
            let coef = dec.eps * dec.scale;
            if rows >= 3 {
                let (c, e) = (row_pieces(batch, 1), row_pieces(batch, 2));
                next_dot = Some(update_then_dot::<S, f64, G, G, G, G>(
                    layout,
                    &mut self.s,
                    &a,
                    &b,
                    coef,
                    None,
                    &c,
                    &e,
                ));
            } else {
                update_diff::<S, f64, G, G>(layout, &mut self.s, &a, &b, coef, None);
            }
            closed.push((first, indices[0], dec.eps));
            r = 1;
        }
        while r + 1 < rows {
            let a = row_pieces(batch, r);
            let b = row_pieces(batch, r + 1);
            let (dot, norm2) = match next_dot.take() {
                Some(x) => x,
                None => dot_diff(layout, &self.s, &a, &b),
            };
            if !(dot.is_finite() && norm2.is_finite()) {
                return fail(self, rule, indices[r], r);
            }
            let dec = rule.decide(dot, norm2, n, d);
            let coef = dec.eps * dec.scale;
            if r + 3 < rows {
                let (c, e) = (row_pieces(batch, r + 2), row_pieces(batch, r + 3));
                next_dot = Some(update_then_dot::<S, G, G, G, G, G>(
                    layout,
                    &mut self.s,
                    &a,
                    &b,
                    coef,
                    None,
                    &c,
                    &e,
                ));
            } else {
                update_diff::<S, G, G, G>(layout, &mut self.s, &a, &b, coef, None);
            }
            closed.push((indices[r], indices[r + 1], dec.eps));
            r += 2;
        }
        let opens = r < rows;
        if opens {
            let last = batch.row(r);
            if last
                .pieces()
                .any(|(_, p)| p.iter().any(|x| !x.to_f64().is_finite()))
            {
                return fail(self, rule, indices[r], r);
            }
        }
        // Nothing can fail from here on. Any earlier open pair was closed by row 0.
        if rows > 0 {
            self.pending = if opens {
                for (o, p) in batch.row(r).pieces() {
                    for (dst, src) in self.pending_grad[o..o + p.len()].iter_mut().zip(p) {
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
