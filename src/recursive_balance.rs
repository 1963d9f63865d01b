//! `recursive`: recursive balance. A full binary tree of depth D of running sums; each unit's centered
//! gradient z = g - m (stale mean, as in `grab`) walks from the root, taking at every node the sign the
//! rule gives against that node's sum (left on +1, right on -1); at depth D the sign places it at the
//! front or back of that leaf's list. The next order is the leaves' lists in tree order, so D = 0 is
//! exactly `grab`.

use crate::assembly::FrontBack;
use crate::batch::Batch;
use crate::elem::{GradElem, StateElem};
use crate::error::{GrabError, Result};
use crate::kernels::{dot_diff, update_diff, Layout, Pieces};
use crate::mean_balance::{non_finite, row_pieces};
use crate::sign::SignRule;

/// Depth limit: the tree holds 2^(D+1) - 1 running sums of dimension d.
pub const MAX_DEPTH: u32 = 16;

#[derive(Debug, Clone, PartialEq)]
pub struct RecursiveBalance<S> {
    pub depth: u32,
    /// Node sums in heap order (root 0, children of k at 2k+1 and 2k+2), d numbers each.
    pub sums: Vec<S>,
    pub m: Vec<S>,
    pub m_next: Vec<S>,
    pub seen: u64,
    /// For each unit balanced this epoch, in visit order: leaf * 2 + (1 if it went to the back).
    /// The units themselves are the assembler's front block (every unit is recorded there with +1).
    pub codes: Vec<u32>,
}

pub fn nodes(depth: u32) -> usize {
    (1usize << (depth + 1)) - 1
}

/// Refuse rows holding NaN or Inf before anything changes (a tree walk cannot be undone cheaply).
pub(crate) fn check_finite<G: GradElem>(batch: &Batch<G>, indices: &[u32]) -> Result<()> {
    for (r, &unit) in indices.iter().enumerate().take(batch.rows()) {
        if batch
            .row(r)
            .pieces()
            .any(|(_, p)| p.iter().any(|x| !x.to_f64().is_finite()))
        {
            return Err(non_finite(unit, r));
        }
    }
    Ok(())
}

impl<S: StateElem> RecursiveBalance<S> {
    pub fn new(depth: u32, d: usize) -> Self {
        RecursiveBalance {
            depth,
            sums: vec![S::default(); nodes(depth) * d],
            m: vec![S::default(); d],
            m_next: vec![S::default(); d],
            seen: 0,
            codes: Vec::new(),
        }
    }

    pub fn dim(&self) -> usize {
        self.m.len()
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
        let inv_n = 1.0 / n as f64;
        let leaves_start = nodes(self.depth) / 2; // heap index of the first leaf
        for (r, &unit) in indices.iter().enumerate().take(batch.rows()) {
            let g = row_pieces(batch, r);
            let m = Pieces::split_flat(&self.m, &layout.widths);
            let mut node = 0usize;
            loop {
                let s = &mut self.sums[node * d..(node + 1) * d];
                let (dot, norm2) = dot_diff(layout, s, &g, &m);
                let dec = rule.decide(dot, norm2, n, d);
                // The raw gradient feeds next epoch's mean once, at the root (as in `grab`).
                let mean = (node == 0).then_some((&mut self.m_next[..], &g, inv_n));
                update_diff(layout, s, &g, &m, dec.eps * dec.scale, mean);
                if node >= leaves_start {
                    let leaf = (node - leaves_start) as u32;
                    self.codes.push(leaf * 2 + u32::from(dec.eps < 0.0));
                    assembler.place(unit, 1.0);
                    break;
                }
                node = 2 * node + if dec.eps > 0.0 { 1 } else { 2 };
            }
        }
        self.seen += batch.rows() as u64;
        Ok(())
    }

    /// The next order: each leaf's list (its +1 units in visit order, then its -1 units reversed), leaves
    /// left to right. Units with no gradient this epoch keep their current order at the root's centre:
    /// between the left and right subtrees (for D = 0, between the front and back block, as in `grab`).
    pub fn next_order(&self, assembler: &FrontBack, current: &[u32]) -> Vec<u32> {
        let (visited, front, _, _) = assembler.parts();
        let visited = &visited[..front];
        let leaves = 1usize << self.depth;
        let mut out = Vec::with_capacity(current.len());
        let unseen = |out: &mut Vec<u32>| {
            out.extend(current.iter().filter(|&&i| !assembler.is_taken(i)));
        };
        for leaf in 0..leaves as u32 {
            if self.depth > 0 && leaf as usize == leaves / 2 {
                unseen(&mut out);
            }
            let of = |back: u32| {
                visited
                    .iter()
                    .zip(&self.codes)
                    .filter(move |(_, &c)| c == leaf * 2 + back)
                    .map(|(&i, _)| i)
            };
            out.extend(of(0));
            if self.depth == 0 {
                unseen(&mut out);
            }
            let backs: Vec<u32> = of(1).collect();
            out.extend(backs.iter().rev());
        }
        out
    }

    /// Close the epoch as `grab` does: the raw mean seen becomes the stale mean; the sums restart.
    pub fn end_epoch(&mut self, n: usize) {
        if self.seen > 0 {
            let rescale = n as f64 / self.seen as f64;
            for (m, mn) in self.m.iter_mut().zip(&self.m_next) {
                *m = S::from_f64(mn.to_f64() * rescale);
            }
        }
        self.m_next.iter_mut().for_each(|x| *x = S::default());
        self.sums.iter_mut().for_each(|x| *x = S::default());
        self.codes.clear();
        self.seen = 0;
    }

    /// Check a restored state against the assembler it comes with.
    pub fn validate(&self, assembler: Option<&FrontBack>, n: usize) -> Result<()> {
        let d = self.dim();
        let (front, back) = assembler.map_or((0, 0), |a| {
            let (_, f, b, _) = a.parts();
            (f, b)
        });
        let ok = d > 0
            && self.depth <= MAX_DEPTH
            && self.sums.len() == nodes(self.depth) * d
            && self.m_next.len() == d
            && self.seen <= n as u64
            && self.codes.len() == front
            && back == 0
            && self
                .codes
                .iter()
                .all(|&c| (c as usize) < (2usize << self.depth))
            && [&self.sums, &self.m, &self.m_next]
                .iter()
                .all(|v| v.iter().all(|x| x.to_f64().is_finite()));
        if ok {
            Ok(())
        } else {
            Err(GrabError::state(
                "corrupted state: the recursive balance's sums, depth or leaf codes do not fit",
            ))
        }
    }
}
