//! `grab` (alias `mean`): online mean balance. Each unit's gradient is centered by the previous epoch's
//! mean, signed against the running sum, and placed front or back; the raw gradient feeds next
//! epoch's mean.

use crate::assembly::FrontBack;
use crate::batch::Batch;
use crate::elem::{GradElem, Scratch, StateElem};
use crate::error::{ErrorKind, GrabError, Result};
use crate::kernels::{
    dot_diff, on_workers, update_diff, update_from, update_then_dot, Layout, Pieces,
};
use crate::sign::SignRule;

#[derive(Debug, Clone, PartialEq)]
pub struct MeanBalance<S> {
    /// Signed running sum of centered gradients.
    pub s: Vec<S>,
    /// Stale mean: mean of the raw gradients of the last epoch that saw any.
    pub m: Vec<S>,
    /// Sum of raw gradients / n over this epoch so far.
    pub m_next: Vec<S>,
    /// Units balanced this epoch.
    pub seen: u64,
    snapshot: Scratch<(Vec<S>, Vec<S>)>,
}

pub(crate) fn row_pieces<'a, G: GradElem>(batch: &Batch<'a, G>, r: usize) -> Pieces<'a, G> {
    Pieces {
        slices: batch.row(r).pieces().map(|(_, p)| p).collect(),
    }
}

pub(crate) fn non_finite(unit: u32, row: usize) -> GrabError {
    GrabError::new(
        ErrorKind::NonFinite,
        format!("the gradient of unit {unit} (row {row} of this step) contains NaN or Inf, or takes the running sum beyond the state dtype's range (dtype=torch.float64 holds more); the step was refused and nothing changed"),
    )
}

impl<S: StateElem> MeanBalance<S> {
    pub fn new(d: usize) -> Self {
        MeanBalance {
            s: vec![S::default(); d],
            m: vec![S::default(); d],
            m_next: vec![S::default(); d],
            seen: 0,
            snapshot: Scratch::default(),
        }
    }

    pub fn from_parts(s: Vec<S>, m: Vec<S>, m_next: Vec<S>, seen: u64) -> Self {
        MeanBalance {
            s,
            m,
            m_next,
            seen,
            snapshot: Scratch::default(),
        }
    }

    /// Balance the rows of `batch` (unit `indices[r]` for row r) in row order. All or nothing: on a
    /// non-finite row, the running sums and the sign rule are restored and nothing is placed.
    pub fn step<G: GradElem>(
        &mut self,
        layout: &Layout,
        batch: &Batch<G>,
        indices: &[u32],
        assembler: &mut FrontBack,
        rule: &mut SignRule,
        n: usize,
    ) -> Result<()> {
        on_workers(layout.dim, || {
            self.step_rows(layout, batch, indices, assembler, rule, n)
        })
    }

    fn step_rows<G: GradElem>(
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
        let inv_n = 1.0 / n as f64;
        let saved_rule = rule.clone();
        let MeanBalance {
            s,
            m,
            m_next,
            snapshot,
            ..
        } = self;
        // All or nothing without a snapshot copy: in a multi-row step, the first update reads the sums
        // and writes them into the scratch buffers (`update_from`); later rows update the scratch in
        // place; the buffers are swapped only when every row succeeded. A one-row step cannot fail
        // after its (only) dot product, so it updates in place.
        let in_place = rows == 1;
        let (sb, mb) = &mut snapshot.0;
        if !in_place {
            sb.resize(d, S::default());
            mb.resize(d, S::default());
        }
        let mut signs = Vec::with_capacity(rows);
        let mp = Pieces::split_flat(m, &layout.widths);
        let mut g = row_pieces(batch, 0);
        // The dot of row r + 1 is computed in the same pass as the update by row r, bit for bit what
        // separate passes give, so batching changes speed and nothing else.
        let (mut dot, mut norm2) = dot_diff(layout, s, &g, &mp);
        for (r, &unit) in indices.iter().enumerate().take(rows) {
            if !(dot.is_finite() && norm2.is_finite()) {
                *rule = saved_rule;
                return Err(non_finite(unit, r));
            }
            let decision = rule.decide(dot, norm2, n, d);
            let coef = decision.eps * decision.scale;
            let next = (r + 1 < rows).then(|| row_pieces(batch, r + 1));
            let fused = next.as_ref().map(|c| (c, &mp));
            let result = if in_place {
                update_diff(layout, s, &g, &mp, coef, Some((&mut m_next[..], &g, inv_n)));
                None
            } else if r == 0 {
                update_from(
                    layout,
                    (&s[..], &m_next[..]),
                    sb,
                    &g,
                    &mp,
                    coef,
                    Some((&mut mb[..], &g, inv_n)),
                    fused,
                )
            } else if let Some((c, e)) = fused {
                Some(update_then_dot(
                    layout,
                    sb,
                    &g,
                    &mp,
                    coef,
                    Some((&mut mb[..], &g, inv_n)),
                    c,
                    e,
                ))
            } else {
                update_diff(layout, sb, &g, &mp, coef, Some((&mut mb[..], &g, inv_n)));
                None
            };
            if let Some(x) = result {
                (dot, norm2) = x;
            }
            if let Some(c) = next {
                g = c;
            }
            signs.push(decision.eps);
        }
        if !in_place {
            std::mem::swap(s, sb);
            std::mem::swap(m_next, mb);
        }
        for (&i, &eps) in indices.iter().zip(&signs) {
            assembler.place(i, eps);
        }
        self.seen += rows as u64;
        Ok(())
    }

    /// Close the epoch: the mean of the raw gradients seen becomes the stale mean (when none were seen,
    /// the old mean stays), and the running sums restart from zero.
    pub fn end_epoch(&mut self, n: usize) {
        if self.seen > 0 {
            let rescale = n as f64 / self.seen as f64;
            for (m, mn) in self.m.iter_mut().zip(&self.m_next) {
                *m = S::from_f64(mn.to_f64() * rescale);
            }
        }
        self.m_next.iter_mut().for_each(|x| *x = S::default());
        self.s.iter_mut().for_each(|x| *x = S::default());
        self.seen = 0;
    }
}
