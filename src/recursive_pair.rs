//! `recursive-pair`: recursive pair balance, with one running sum per level and no stale mean.
//!
//! The exact rule. Visited units are items of level 0 (a vector g and a list of one unit). Items meet
//! like carries in a binary counter: an item arriving at level l waits there until the next item of
//! level l arrives; the two (A first, B second) are balanced against the level's running sum s_l with
//! z = v_A - v_B, `eps = sign_rule(s_l, z)`, `s_l += eps z`. Below the top level (l < D) they merge into
//! one item of level l + 1: vector v_A + v_B, unit list A ++ B if eps = +1 else B ++ A. At the top level
//! (l = D) the winner's units (A on +1, B on -1) go to the front of the next order in list order and the
//! loser's units to the back, as one block read in list order. So each group of 2^(D+1) consecutive
//! units is ordered by pair-balancing its halves at every level, and groups are front/back-assembled
//! like `pair`'s units: D = 0 is exactly `pair`. Items still waiting when the epoch ends give no sign:
//! their units go in the middle. Groups straddle steps freely, so the order does not depend on batching.

use crate::assembly::FrontBack;
use crate::batch::Batch;
use crate::elem::{GradElem, StateElem};
use crate::error::{GrabError, Result};
use crate::kernels::{dot_diff, update_diff, Layout, Pieces};
use crate::recursive_balance::check_finite;
use crate::sign::SignRule;

#[derive(Debug, Clone, PartialEq)]
pub struct RecursivePairBalance<S> {
    pub depth: u32,
    /// Running sums of levels 0..=D, d numbers each.
    pub sums: Vec<S>,
    /// The waiting item of each level: its units (empty when none waits; 2^l units otherwise).
    pub pending_units: Vec<Vec<u32>>,
    /// The waiting items' vectors (exact f64 copies), d numbers per level.
    pub pending_vecs: Vec<f64>,
}

impl<S: StateElem> RecursivePairBalance<S> {
    pub fn new(depth: u32, d: usize) -> Self {
        let levels = depth as usize + 1;
        RecursivePairBalance {
            depth,
            sums: vec![S::default(); levels * d],
            pending_units: vec![Vec::new(); levels],
            pending_vecs: vec![0.0; levels * d],
        }
    }

    pub fn dim(&self) -> usize {
        self.sums.len() / (self.depth as usize + 1)
    }

    pub fn check_not_pending(&self, indices: &[u32]) -> Result<()> {
        for units in &self.pending_units {
            if let Some(p) = indices.iter().find(|i| units.contains(i)) {
                return Err(GrabError::index(format!(
                    "unit {p} already received a gradient this epoch (it waits for its pair partner)"
                )));
            }
        }
        Ok(())
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
        check_finite(batch, indices)?;
        let d = layout.dim;
        let mut carry = vec![0.0f64; d];
        for (r, &unit) in indices.iter().enumerate().take(batch.rows()) {
            let mut level = 0usize;
            let mut units = vec![unit];
            // `carry` holds the arriving item's vector from level 1 on; at level 0 the row is used as is.
            loop {
                let off = level * d;
                if self.pending_units[level].is_empty() {
                    let dst = &mut self.pending_vecs[off..off + d];
                    if level == 0 {
                        for (o, p) in batch.row(r).pieces() {
                            for (x, g) in dst[o..o + p.len()].iter_mut().zip(p) {
                                *x = g.to_f64();
                            }
                        }
                    } else {
                        dst.copy_from_slice(&carry);
                    }
                    self.pending_units[level] = units;
                    break;
                }
                let a = Pieces::split_flat(&self.pending_vecs[off..off + d], &layout.widths);
                let s = &mut self.sums[off..off + d];
                let eps = if level == 0 {
                    let b = crate::mean_balance::row_pieces(batch, r);
                    let (dot, norm2) = dot_diff(layout, s, &a, &b);
                    let dec = rule.decide(dot, norm2, n, d);
                    update_diff::<S, f64, G, G>(layout, s, &a, &b, dec.eps * dec.scale, None);
                    if level < self.depth as usize {
                        for (o, p) in batch.row(r).pieces() {
                            for (j, g) in p.iter().enumerate() {
                                carry[o + j] = self.pending_vecs[off + o + j] + g.to_f64();
                            }
                        }
                    }
                    dec.eps
                } else {
                    let b = Pieces::split_flat(&carry, &layout.widths);
                    let (dot, norm2) = dot_diff(layout, s, &a, &b);
                    let dec = rule.decide(dot, norm2, n, d);
                    update_diff::<S, f64, f64, f64>(layout, s, &a, &b, dec.eps * dec.scale, None);
                    for (c, p) in carry.iter_mut().zip(&self.pending_vecs[off..off + d]) {
                        *c += p;
                    }
                    dec.eps
                };
                let first = std::mem::take(&mut self.pending_units[level]);
                let (win, lose) = if eps > 0.0 {
                    (first, units)
                } else {
                    (units, first)
                };
                if level == self.depth as usize {
                    for &i in &win {
                        assembler.place(i, 1.0);
                    }
                    // Placed at the back from the last unit on, so the block reads in list order.
                    for &i in lose.iter().rev() {
                        assembler.place(i, -1.0);
                    }
                    break;
                }
                units = win;
                units.extend(lose);
                level += 1;
            }
        }
        Ok(())
    }

    /// Close the epoch: waiting items stay unsigned (their units go in the middle).
    pub fn end_epoch(&mut self) {
        self.sums.iter_mut().for_each(|x| *x = S::default());
        self.pending_units.iter_mut().for_each(Vec::clear);
    }

    pub fn validate(&self, assembler: Option<&FrontBack>, n: usize) -> Result<()> {
        let levels = self.depth as usize + 1;
        let d = self.dim();
        let mut all: Vec<u32> = self.pending_units.iter().flatten().copied().collect();
        let count = all.len();
        all.sort_unstable();
        all.dedup();
        let ok = d > 0
            && self.depth <= crate::recursive_balance::MAX_DEPTH
            && self.sums.len() == levels * d
            && self.pending_vecs.len() == levels * d
            && self.pending_units.len() == levels
            && self
                .pending_units
                .iter()
                .enumerate()
                .all(|(l, u)| u.is_empty() || u.len() == 1 << l)
            && all.len() == count
            && all
                .iter()
                .all(|&i| (i as usize) < n && !assembler.is_some_and(|a| a.is_taken(i)))
            && self.sums.iter().all(|x| x.to_f64().is_finite())
            && self.pending_vecs.iter().all(|x| x.is_finite());
        if ok {
            Ok(())
        } else {
            Err(GrabError::state(
                "corrupted state: the recursive pair balance's sums or waiting items do not fit",
            ))
        }
    }
}
