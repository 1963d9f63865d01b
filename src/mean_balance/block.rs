//! A `grab` step through the block pass (`kernels::gram_block`): per block of up to BLOCK_ROWS rows,
//! one pass for the inner products, the certified sign scan, one pass applying the decided rows. A row
//! the scan cannot decide for certain goes through the exact per-row kernels, and the next block
//! starts after it, so the signs and the sums are the per-row pass's, bit for bit.

use super::{non_finite, row_pieces};
use crate::batch::Batch;
use crate::error::Result;
use crate::kernels::gram_block::{block_apply, block_gram, BLOCK_ROWS};
use crate::kernels::{dot_diff, update_diff, update_from, Layout, Pieces};
use crate::sign::SignRule;
use crate::sign_scan::certified_prefix;

/// The rows of one step. Reads `cur` = (s, m, m_next), writes the new sums into `out` (all or nothing:
/// the caller swaps them in on success). Returns the signs in row order; on a non-finite row, changes
/// only `out`, and reports the row.
pub(super) fn block_step(
    layout: &Layout,
    cur: (&[f32], &[f32], &[f32]),
    out: (&mut [f32], &mut [f32]),
    batch: &Batch<f32>,
    indices: &[u32],
    rule: &mut SignRule,
    n: usize,
) -> Result<Vec<f64>> {
    debug_assert!(matches!(rule, SignRule::Deterministic));
    let (s, m, m_next) = cur;
    let (sb, mb) = out;
    let rows = batch.rows();
    let d = layout.dim;
    let inv_n = 1.0 / n as f64;
    let mp = Pieces::split_flat(m, &layout.widths);
    let rp: Vec<Pieces<f32>> = (0..rows).map(|r| row_pieces(batch, r)).collect();
    let mut signs = Vec::with_capacity(rows);
    // Until the first row is applied, the sums are read from `cur` and first written into `out`.
    let mut fresh = true;
    let mut r = 0;
    while r < rows {
        let end = (r + BLOCK_ROWS).min(rows);
        let block: Vec<&Pieces<f32>> = rp[r..end].iter().collect();
        let est = block_gram(layout, if fresh { s } else { sb }, m, &block);
        let certain = certified_prefix(&est, d);
        if !certain.is_empty() {
            let apply: Vec<(&Pieces<f32>, f64)> = certain
                .iter()
                .enumerate()
                .map(|(k, &eps)| (&rp[r + k], eps))
                .collect();
            block_apply(
                layout,
                fresh.then_some((s, m_next)),
                (sb, mb),
                m,
                &apply,
                inv_n,
            );
            fresh = false;
            signs.extend_from_slice(&certain);
            r += certain.len();
        }
        if r < end {
            // The estimates cannot decide row r: the definition's own inner product does.
            let (dot, norm2) = dot_diff(layout, if fresh { s } else { sb }, &rp[r], &mp);
            if !(dot.is_finite() && norm2.is_finite()) {
                return Err(non_finite(indices[r], r));
            }
            let dec = rule.decide(dot, norm2, n, d);
            let coef = dec.eps * dec.scale;
            let mean = Some((&mut mb[..], &rp[r], inv_n));
            if fresh {
                let next: Option<(&Pieces<f32>, &Pieces<f32>)> = None;
                update_from(layout, (s, m_next), sb, &rp[r], &mp, coef, mean, next);
                fresh = false;
            } else {
                update_diff(layout, sb, &rp[r], &mp, coef, mean);
            }
            signs.push(dec.eps);
            r += 1;
        }
    }
    Ok(signs)
}

#[cfg(test)]
mod tests {
    use super::super::{MeanBalance, Pass};
    use crate::assembly::FrontBack;
    use crate::batch::Batch;
    use crate::kernels::gram_block::block_gram;
    use crate::kernels::{wild, Layout, Pieces, CHUNK};
    use crate::sign::SignRule;
    use crate::sign_scan::certified_prefix;

    fn run(
        start: &MeanBalance<f32>,
        layout: &Layout,
        rows: &[f32],
        b: usize,
        pass: Pass,
    ) -> (MeanBalance<f32>, Vec<Vec<u32>>) {
        let mut st = start.clone();
        let mut asm = FrontBack::new(64);
        let idx: Vec<u32> = (0..b as u32).collect();
        let batch = Batch::from_slice(rows, b, layout.dim).unwrap();
        st.step_with(
            layout,
            &batch,
            &idx,
            &mut asm,
            &mut SignRule::deterministic(),
            64,
            pass,
        )
        .unwrap();
        let p = asm.parts();
        (st, vec![p.0.to_vec(), vec![p.1 as u32, p.2 as u32]])
    }

    #[test]
    fn block_pass_equals_the_per_row_pass_bit_for_bit() {
        for d in [37usize, 300, 2 * CHUNK + 13] {
            let layout = Layout::new(vec![d]);
            for b in [1usize, 2, 5, 8, 9, 19] {
                let salt = (d * 100 + b) as u64;
                for zero_s in [false, true] {
                    let s = if zero_s { vec![0.0; d] } else { wild(d, salt) };
                    let start = MeanBalance::from_parts(s, wild(d, salt + 1), wild(d, salt + 2), 3);
                    let mut rows = wild(b * d, salt + 3);
                    // Rows equal to the mean (z = 0) cannot be certified: the exact kernels take them.
                    if b > 3 {
                        rows[2 * d..3 * d].copy_from_slice(&start.m);
                    }
                    let a = run(&start, &layout, &rows, b, Pass::PerRow);
                    let c = run(&start, &layout, &rows, b, Pass::Block);
                    assert_eq!(a.0.s, c.0.s, "d {d} b {b}");
                    assert_eq!(a.0.m_next, c.0.m_next, "d {d} b {b}");
                    assert_eq!(a.1, c.1, "d {d} b {b}");
                }
            }
        }
    }

    /// s_1 = fl32(2^24 + 1) = 2^24 loses the 1, so <s_1, z_1> = 0 (sign +1) while the exact-arithmetic
    /// Gram estimate is 1 (sign -1): the bound must refuse to certify row 1.
    #[test]
    fn a_sign_flipped_by_rounding_is_not_certified() {
        let layout = Layout::new(vec![2]);
        let s0 = vec![16_777_216.0f32, 8192.0];
        let m = vec![0.0f32; 2];
        let rows = vec![1.0f32, -4096.0, 1.0, -4096.0];
        let p: Vec<Pieces<f32>> = rows
            .chunks(2)
            .map(|r| Pieces::split_flat(r, &layout.widths))
            .collect();
        let est = block_gram(&layout, &s0, &m, &p.iter().collect::<Vec<_>>());
        let naive = est.u[1] + est.gram[1];
        assert_eq!(naive, 1.0);
        assert_eq!(certified_prefix(&est, 2), vec![1.0]);
        let start = MeanBalance::from_parts(s0, m.clone(), m.clone(), 0);
        let a = run(&start, &layout, &rows, 2, Pass::PerRow);
        let c = run(&start, &layout, &rows, 2, Pass::Block);
        assert_eq!(a.1, c.1);
        assert_eq!(
            a.1[1][0], 2,
            "both rows go to the front (+1) in the sequential definition"
        );
        assert_eq!(a.0.s, c.0.s);
    }
}
