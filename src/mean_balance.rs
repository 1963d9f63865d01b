//! `grab` (alias `mean`): online mean balance. Each unit's gradient is centered by the previous epoch's
//! mean, signed against the running sum, and placed front or back; the raw gradient feeds next
//! epoch's mean.

use crate::assembly::FrontBack;
use crate::batch::Batch;
use crate::elem::{as_f32, as_f32_mut, GradElem, Scratch, StateElem};
use crate::error::{ErrorKind, GrabError, Result};
use crate::kernels::{
    advance, dot_diff, update_diff, update_from, update_then_dot, Advance, Layout, Pieces,
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
        self.step_rows(layout, batch, indices, assembler, rule, n, true)
    }

    /// `step`; `two_row` = false keeps the per-row pass whatever the shape (tests compare the two).
    #[allow(clippy::too_many_arguments)]
    fn step_rows<G: GradElem>(
        &mut self,
        layout: &Layout,
        batch: &Batch<G>,
        indices: &[u32],
        assembler: &mut FrontBack,
        rule: &mut SignRule,
        n: usize,
        two_row: bool,
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
        if !in_place && two_row && two_row_pass(layout, rule) {
            if let (Some(sv), Some(mv), Some(mnv), Some(sbv), Some(mbv), Some(g32)) = (
                as_f32_mut(s),
                as_f32(m),
                as_f32_mut(m_next),
                as_f32_mut(sb),
                as_f32_mut(mb),
                batch.as_f32(),
            ) {
                let signs =
                    two_row_step(layout, (sv, mv, mnv), (sbv, mbv), &g32, indices, rule, n)?;
                std::mem::swap(s, sb);
                std::mem::swap(m_next, mb);
                for (&i, &eps) in indices.iter().zip(&signs) {
                    assembler.place(i, eps);
                }
                self.seen += rows as u64;
                return Ok(());
            }
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

/// Below this many coordinates the per-row pass is used. Measured with `cargo bench --bench step_loop`
/// (2 cores, load ~1, two runs each, G elements/s per-row -> two-row): d = 1e3 1.6-1.9 -> 1.3 (the
/// pass's fixed costs dominate); 1e4 mixed (1.7-2.0 -> 1.9-2.3); 3e4 1.9-2.0 -> 1.9-2.3; 1e5 2.9-3.3
/// -> 3.3-3.6; 2.5e5 2.0-2.3 -> 2.7-2.8; 5e5 (B = 32) 1.9-2.2 -> 2.6-2.8; 1e6 (B = 16) 1.7-1.8 ->
/// 2.3-2.4; 1e7 (B = 4) 1.0 -> 1.3.
pub const TWO_ROW_MIN_DIM: usize = 1 << 14;

/// Whether this step may use the two-row pass (`kernels::advance`): deterministic signs (their scale, 1,
/// is known before the dot), the AVX-512 loop, and a dimension where it pays. Results are the same
/// either way, bit for bit.
fn two_row_pass(layout: &Layout, rule: &SignRule) -> bool {
    matches!(rule, SignRule::Deterministic)
        && crate::kernels::advance::available()
        && layout.dim >= TWO_ROW_MIN_DIM
}

/// The rows of one step through `kernels::advance`: row 0's dot from the sums, then passes that each
/// apply the decided rows (one, then two at a time), form the next row's dot and, for the row after
/// it, the dots for both possible signs; the sign decided in between selects one. Reads `cur` = (s, m,
/// m_next), writes the new sums into `out` (all or nothing: the caller swaps them in on success).
/// Returns the signs in row order; on a non-finite row, restores nothing itself (it changed only `out`
/// and the rule, which the caller restores) and reports the row.
#[allow(clippy::too_many_arguments)]
fn two_row_step(
    layout: &Layout,
    cur: (&[f32], &[f32], &[f32]),
    out: (&mut [f32], &mut [f32]),
    batch: &Batch<f32>,
    indices: &[u32],
    rule: &mut SignRule,
    n: usize,
) -> Result<Vec<f64>> {
    let (s, m, m_next) = cur;
    let (sb, mb) = out;
    let rows = batch.rows();
    let d = layout.dim;
    let saved_rule = rule.clone();
    let mp = Pieces::split_flat(m, &layout.widths);
    let rp: Vec<Pieces<f32>> = (0..rows).map(|r| row_pieces(batch, r)).collect();
    let mut signs = Vec::with_capacity(rows);
    let mut pending: Vec<(usize, f64)> = Vec::with_capacity(2);
    let decide = |r: usize, (dot, norm2): (f64, f64), rule: &mut SignRule| {
        if !(dot.is_finite() && norm2.is_finite()) {
            *rule = saved_rule.clone();
            return Err(non_finite(indices[r], r));
        }
        let dec = rule.decide(dot, norm2, n, d);
        Ok((dec.eps, dec.eps * dec.scale))
    };
    let (eps, coef) = decide(0, dot_diff(layout, s, &rp[0], &mp), rule)?;
    signs.push(eps);
    pending.push((0, coef));
    let mut q = 1;
    let mut first = true;
    loop {
        let apply: Vec<(&Pieces<f32>, f64)> = pending.iter().map(|&(r, c)| (&rp[r], c)).collect();
        let op = Advance {
            apply: &apply,
            m: &mp,
            inv_n: 1.0 / n as f64,
            dot: (q < rows).then(|| &rp[q]),
            spec: (q + 1 < rows).then(|| (&rp[q + 1], 1.0)),
        };
        let src = first.then_some((s, m_next));
        let res = advance(layout, src, sb, mb, &op);
        first = false;
        pending.clear();
        if q >= rows {
            break;
        }
        let (eps, coef) = decide(q, res.dot, rule)?;
        signs.push(eps);
        pending.push((q, coef));
        if q + 1 < rows {
            let dot = if eps > 0.0 { res.spec.0 } else { res.spec.1 };
            let (eps1, coef1) = decide(q + 1, (dot, res.spec.2), rule)?;
            signs.push(eps1);
            pending.push((q + 1, coef1));
            q += 2;
        } else {
            q += 1;
        }
    }
    Ok(signs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::CHUNK;

    use crate::kernels::wild as values;

    /// One (rows x w) array per segment of the layout.
    fn segments(layout: &Layout, rows: usize, salt: u64) -> Vec<ndarray::Array2<f32>> {
        layout
            .widths
            .iter()
            .enumerate()
            .map(|(k, &w)| {
                ndarray::Array2::from_shape_vec((rows, w), values(rows * w, salt + k as u64))
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn two_row_pass_equals_the_per_row_pass_bit_for_bit() {
        if !crate::kernels::advance::available() {
            return;
        }
        let n = 40;
        for widths in [
            vec![37],
            vec![3, 5, 1, 29, 200],
            vec![5, CHUNK - 3, 1, 2 * CHUNK + 13],
        ] {
            let layout = Layout::new(widths);
            let d = layout.dim;
            for rows in 1..=7 {
                let salt = (d * 10 + rows) as u64;
                let start = MeanBalance::from_parts(
                    values(d, salt),
                    values(d, salt + 1),
                    values(d, salt + 2),
                    3,
                );
                let segs = segments(&layout, rows, salt + 3);
                let views: Vec<_> = segs.iter().map(|a| a.view()).collect();
                let batch = Batch::from_views(&views).unwrap();
                let idx: Vec<u32> = (0..rows as u32).collect();
                let mut per_row = start.clone();
                let mut asm = FrontBack::new(n);
                let mut rule = SignRule::deterministic();
                per_row
                    .step_rows(&layout, &batch, &idx, &mut asm, &mut rule, n, false)
                    .unwrap();
                let (mut sb, mut mb) = (vec![0.0f32; d], vec![0.0f32; d]);
                let signs = two_row_step(
                    &layout,
                    (&start.s, &start.m, &start.m_next),
                    (&mut sb, &mut mb),
                    &batch,
                    &idx,
                    &mut SignRule::deterministic(),
                    n,
                )
                .unwrap();
                assert_eq!(sb, per_row.s, "s: widths {:?} rows {rows}", layout.widths);
                assert_eq!(mb, per_row.m_next, "m_next: rows {rows}");
                let mut asm2 = FrontBack::new(n);
                for (&i, &e) in idx.iter().zip(&signs) {
                    asm2.place(i, e);
                }
                assert_eq!(asm2.parts(), asm.parts(), "signs: rows {rows}");
                if rows >= 4 {
                    assert!(signs.iter().any(|&e| e > 0.0) && signs.iter().any(|&e| e < 0.0));
                }
            }
        }
    }

    #[test]
    fn two_row_pass_refuses_the_first_non_finite_row() {
        if !crate::kernels::advance::available() {
            return;
        }
        let layout = Layout::new(vec![3, 61]);
        let d = layout.dim;
        for bad in 0..5 {
            let mut segs = segments(&layout, 5, 7);
            segs[1][[bad, 14]] = f32::NAN;
            let views: Vec<_> = segs.iter().map(|a| a.view()).collect();
            let batch = Batch::from_views(&views).unwrap();
            let idx: Vec<u32> = (10..15).collect();
            let z = vec![0.0f32; d];
            let (mut sb, mut mb) = (vec![0.0f32; d], vec![0.0f32; d]);
            let err = two_row_step(
                &layout,
                (&z, &z, &z),
                (&mut sb, &mut mb),
                &batch,
                &idx,
                &mut SignRule::deterministic(),
                20,
            )
            .unwrap_err();
            assert_eq!(err.kind, ErrorKind::NonFinite);
            assert!(
                err.message
                    .contains(&format!("unit {} (row {bad} ", 10 + bad)),
                "{}",
                err.message
            );
        }
    }
}
