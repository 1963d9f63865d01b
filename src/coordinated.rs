//! CD-GraB's order server (Cooper et al., NeurIPS 2023) as a replicated state machine: W shards, one
//! shared running sum s, pair balance of every shard's pair differences against s in rank order, and a
//! front/back assembly per shard. Every rank of a torch.distributed job holds one replica and feeds it
//! the same gathered numbers, so the replicas stay bitwise identical and no order ever travels.
//!
//! Two ways to feed it (see README "Distributed"):
//! - exact: every rank contributes its pair differences (P x d, f64); all replicas run the sequential
//!   sign rule over all W*P differences in rank order: CD-GraB's signs, bit for bit on every rank.
//! - efficient: every rank contributes u = Z s0 and its own Gram matrix Z Z^T (P + P^2 numbers); each
//!   shard's signs come from `sign_scan` against s0 plus that shard's own earlier pairs of the step
//!   (cross-rank terms inside one step are not known: an approximation), and s advances by the
//!   all-reduced signed sum, which can travel with the gradient all-reduce.
//!
//! A rank's open pair (its first unit's gradient, when B is odd) is local: only its owner can form that
//! difference, so `pending_grad` is not part of the replica.

use crate::assembly::FrontBack;
use crate::batch::Batch;
use crate::elem::GradElem;
use crate::error::{ErrorKind, GrabError, Result};
use crate::kernels::{dot_diff, update_diff, Layout, Pieces};
use crate::sign::SignRule;
use crate::sign_scan::sign_scan;

#[derive(Debug, Clone)]
pub struct Coordinated {
    world: usize,
    rank: usize,
    shard_len: usize,
    epochs_begun: u64,
    /// Per shard: this epoch's order of its local unit ids 0..shard_len.
    current: Vec<Vec<u32>>,
    assembly: Vec<FrontBack>,
    /// Rows stepped this epoch; the same on every shard because ranks step in lockstep with equal B.
    cursor: usize,
    /// Whether every shard has an open pair whose first unit is current[w][cursor - 1].
    open: bool,
    s: Vec<f64>,
    dim: Option<usize>,
    rule: SignRule,
    // Local, not replicated: this rank's open pair's first gradient (exact f64 copy).
    pending_grad: Vec<f64>,
}

fn pieces_of<'a, G: GradElem>(batch: &Batch<'a, G>, r: usize) -> Pieces<'a, G> {
    Pieces {
        slices: batch.row(r).pieces().map(|(_, p)| p).collect(),
    }
}

fn widths_of<G: GradElem>(batch: &Batch<'_, G>) -> Vec<usize> {
    batch.row(0).pieces().map(|(_, p)| p.len()).collect()
}

/// Run `$body` with `$a`, `$b` bound to the pieces of local pair `$p` (a = first unit, b = second).
/// The first unit of pair 0 is the pending gradient (f64) when a pair was left open, hence two arms.
macro_rules! with_pair {
    ($this:expr, $layout:expr, $batch:expr, $p:expr, $a:ident, $b:ident => $body:expr) => {{
        let (first, second) = $this.pair_rows($p);
        let $b = pieces_of($batch, second);
        match first {
            None => {
                let $a = Pieces::split_flat(&$this.pending_grad, &$layout.widths);
                $body
            }
            Some(r) => {
                let $a = pieces_of($batch, r);
                $body
            }
        }
    }};
}

impl Coordinated {
    pub fn new(world: usize, rank: usize, shard_len: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(GrabError::state(format!(
                "rank must lie in [0, {}) for {world} replicas, got {rank}",
                world.max(1)
            )));
        }
        if shard_len > u32::MAX as usize {
            return Err(GrabError::new(
                ErrorKind::Memory,
                format!("a shard of {shard_len} units does not fit 32-bit unit ids"),
            ));
        }
        Ok(Coordinated {
            world,
            rank,
            shard_len,
            epochs_begun: 0,
            current: vec![Vec::new(); world],
            assembly: (0..world).map(|_| FrontBack::new(shard_len)).collect(),
            cursor: 0,
            open: false,
            s: Vec::new(),
            dim: None,
            rule: SignRule::deterministic(),
            pending_grad: Vec::new(),
        })
    }

    pub fn world(&self) -> usize {
        self.world
    }
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn shard_len(&self) -> usize {
        self.shard_len
    }
    pub fn epochs_begun(&self) -> u64 {
        self.epochs_begun
    }
    pub fn cursor(&self) -> usize {
        self.cursor
    }
    pub fn is_open(&self) -> bool {
        self.open
    }
    pub fn dim(&self) -> Option<usize> {
        self.dim
    }
    pub fn running_sum(&self) -> &[f64] {
        &self.s
    }
    pub fn shard_order(&self, w: usize) -> &[u32] {
        &self.current[w]
    }

    /// Close the running epoch (each shard's next order from its assembly, unsigned units in the
    /// middle) and start the next; the first epoch is each shard's identity (the shards themselves come
    /// from rank 0's random permutation). Returns this rank's order.
    pub fn begin_epoch(&mut self) -> &[u32] {
        let m = self.shard_len;
        for w in 0..self.world {
            let next = if self.epochs_begun == 0 {
                (0..m as u32).collect()
            } else {
                self.assembly[w].finish(&self.current[w])
            };
            self.current[w] = next;
            self.assembly[w] = FrontBack::new(m);
        }
        self.s.iter_mut().for_each(|x| *x = 0.0);
        self.cursor = 0;
        self.open = false;
        self.epochs_begun += 1;
        &self.current[self.rank]
    }

    /// Pairs closed by a step of `rows` rows per shard.
    pub fn pair_count(&self, rows: usize) -> usize {
        (rows + self.open as usize) / 2
    }

    /// Batch rows of local pair p: (first, second); first is None for the pending gradient.
    fn pair_rows(&self, p: usize) -> (Option<usize>, usize) {
        if self.open {
            if p == 0 {
                (None, 0)
            } else {
                (Some(2 * p - 1), 2 * p)
            }
        } else {
            (Some(2 * p), 2 * p + 1)
        }
    }

    /// Positions (in the shard's current order) of pair p's two units.
    fn pair_positions(&self, p: usize) -> (usize, usize) {
        let start = self.cursor - self.open as usize;
        (start + 2 * p, start + 2 * p + 1)
    }

    fn check_step<G: GradElem>(&self, batch: &Batch<'_, G>) -> Result<Layout> {
        if self.epochs_begun == 0 {
            return Err(GrabError::call_order(
                "step() was called before any epoch began; iterate the sampler first",
            ));
        }
        let rows = batch.rows();
        if rows == 0 {
            return Err(GrabError::shape("a step needs at least one gradient row"));
        }
        if self.cursor + rows > self.shard_len {
            return Err(GrabError::index(format!(
                "{rows} rows would step past the end of the shard ({} of {} units already stepped this epoch)",
                self.cursor, self.shard_len
            )));
        }
        let d = batch.dim();
        if d == 0 {
            return Err(GrabError::shape(
                "the gradients have width d = 0; there is nothing to balance",
            ));
        }
        if let Some(expected) = self.dim {
            if expected != d {
                return Err(GrabError::shape(format!(
                    "expected gradients of dimension d = {expected} (fixed by the first step), got d = {d}"
                )));
            }
        }
        Ok(Layout::new(widths_of(batch)))
    }

    fn check_finite<G: GradElem>(batch: &Batch<'_, G>) -> Result<()> {
        for r in 0..batch.rows() {
            if batch
                .row(r)
                .pieces()
                .any(|(_, p)| p.iter().any(|x| !x.to_f64().is_finite()))
            {
                return Err(GrabError::new(
                    ErrorKind::NonFinite,
                    format!("row {r} of this step's gradients contains NaN or Inf; the step was refused"),
                ));
            }
        }
        Ok(())
    }

    fn running_sum_or_zero(&self, d: usize) -> Vec<f64> {
        if self.s.is_empty() {
            vec![0.0; d]
        } else {
            self.s.clone()
        }
    }

    /// Exact mode, local part: this rank's P pair differences (P x d, row-major f64). a - b is formed
    /// in f64 exactly as the kernels form it, so the replicas see the very numbers a single process would.
    pub fn local_diffs<G: GradElem>(&self, batch: &Batch<'_, G>) -> Result<Vec<f64>> {
        let layout = self.check_step(batch)?;
        Self::check_finite(batch)?;
        let d = layout.dim;
        let p_count = self.pair_count(batch.rows());
        let mut out = vec![0.0f64; p_count * d];
        for p in 0..p_count {
            let z = &mut out[p * d..(p + 1) * d];
            with_pair!(self, layout, batch, p, a, b => update_diff::<f64, _, _, G>(&layout, z, &a, &b, 1.0, None));
        }
        Ok(out)
    }

    /// Exact mode, replicated part: sign all W*P gathered differences in rank order against s, place
    /// each shard's pairs, then keep this rank's new open gradient (if any). `gathered` is W x P x d.
    pub fn step_exact<G: GradElem>(
        &mut self,
        batch: &Batch<'_, G>,
        gathered: &[f64],
    ) -> Result<()> {
        let layout = self.check_step(batch)?;
        let d = layout.dim;
        let p_count = self.pair_count(batch.rows());
        let want = self.world * p_count * d;
        if gathered.len() != want {
            return Err(GrabError::shape(format!(
                "expected {} x {p_count} x {d} = {want} gathered differences, got {}",
                self.world,
                gathered.len()
            )));
        }
        if let Some(k) = gathered.iter().position(|x| !x.is_finite()) {
            return Err(GrabError::new(
                ErrorKind::NonFinite,
                format!(
                    "the pair differences gathered from rank {} contain NaN or Inf; the step was refused on every rank",
                    k / (p_count * d).max(1)
                ),
            ));
        }
        // Nothing can fail from here on.
        let flat = Layout::new(vec![d]);
        let zeros = vec![0.0f64; d];
        let zero = Pieces::split_flat(&zeros, &flat.widths);
        let mut s = self.running_sum_or_zero(d);
        let mut signs = Vec::with_capacity(self.world * p_count);
        for k in 0..self.world * p_count {
            let z = Pieces::split_flat(&gathered[k * d..(k + 1) * d], &flat.widths);
            let (dot, norm2) = dot_diff(&flat, &s, &z, &zero);
            let dec = self.rule.decide(dot, norm2, self.shard_len * self.world, d);
            update_diff::<f64, f64, f64, f64>(&flat, &mut s, &z, &zero, dec.eps * dec.scale, None);
            signs.push(dec.eps);
        }
        self.s = s;
        self.commit(batch, &signs, p_count);
        Ok(())
    }

    /// Efficient mode, local part: [u (P) | G (P x P, row-major)] with u_p = <s, z_p> and
    /// G_pq = <z_p, z_q>. One d-vector of scratch; the rows are read in place.
    pub fn local_stats<G: GradElem>(&self, batch: &Batch<'_, G>) -> Result<Vec<f64>> {
        let layout = self.check_step(batch)?;
        Self::check_finite(batch)?;
        let d = layout.dim;
        let p_count = self.pair_count(batch.rows());
        let s = self.running_sum_or_zero(d);
        let mut out = vec![0.0f64; p_count + p_count * p_count];
        let mut z = vec![0.0f64; d];
        for p in 0..p_count {
            z.iter_mut().for_each(|x| *x = 0.0);
            with_pair!(self, layout, batch, p, a, b => {
                out[p] = dot_diff(&layout, &s, &a, &b).0;
                update_diff::<f64, _, _, G>(&layout, &mut z, &a, &b, 1.0, None);
            });
            for q in p..p_count {
                let g = with_pair!(self, layout, batch, q, a, b => dot_diff(&layout, &z, &a, &b).0);
                out[p_count + p * p_count + q] = g;
                out[p_count + q * p_count + p] = g;
            }
        }
        Ok(out)
    }

    /// Efficient mode, replicated part: each shard's signs from its gathered (u, G) by `sign_scan`,
    /// pairs placed, this rank's open gradient kept. Returns this rank's signed sum sum_p eps_p z_p
    /// (d numbers), which the caller all-reduces and hands to `add_sum`.
    pub fn decide<G: GradElem>(
        &mut self,
        batch: &Batch<'_, G>,
        gathered: &[f64],
    ) -> Result<Vec<f64>> {
        let layout = self.check_step(batch)?;
        let d = layout.dim;
        let p_count = self.pair_count(batch.rows());
        let per = p_count + p_count * p_count;
        if gathered.len() != self.world * per {
            return Err(GrabError::shape(format!(
                "expected {} x ({p_count} + {p_count}^2) = {} gathered inner products, got {}",
                self.world,
                self.world * per,
                gathered.len()
            )));
        }
        let mut signs = Vec::with_capacity(self.world * p_count);
        for w in 0..self.world {
            let block = &gathered[w * per..(w + 1) * per];
            let mut rule = self.rule.clone();
            let shard = sign_scan(
                &block[..p_count],
                &block[p_count..],
                &mut rule,
                self.shard_len,
                d,
            )
            .map_err(|e| {
                GrabError::new(e.kind, format!("rank {w}'s inner products: {}", e.message))
            })?;
            signs.extend(shard.into_iter().map(|(eps, _)| eps));
        }
        let mine = &signs[self.rank * p_count..(self.rank + 1) * p_count];
        let mut v = vec![0.0f64; d];
        for (p, &eps) in mine.iter().enumerate() {
            with_pair!(self, layout, batch, p, a, b => update_diff::<f64, _, _, G>(&layout, &mut v, &a, &b, eps, None));
        }
        if self.s.is_empty() {
            self.s = vec![0.0; d];
        }
        self.commit(batch, &signs, p_count);
        Ok(v)
    }

    /// Refuse a step that `local_diffs`, `local_stats` or `own_round` would refuse; cheap (one pass).
    pub fn validate<G: GradElem>(&self, batch: &Batch<'_, G>) -> Result<()> {
        self.check_step(batch)?;
        Self::check_finite(batch)
    }

    /// Pipelined mode, this rank's round: its signs against the current s (which already holds the
    /// signed sums of the ranks before it in this step), by `sign_scan` on u = Z s and G = Z Z^T, and
    /// its signed sum. Returns [signs (P) | signed sum (d)] for the broadcast; changes nothing.
    pub fn own_round<G: GradElem>(&self, batch: &Batch<'_, G>) -> Result<Vec<f64>> {
        let layout = self.check_step(batch)?;
        let d = layout.dim;
        let p_count = self.pair_count(batch.rows());
        let stats = self.local_stats(batch)?;
        let mut rule = self.rule.clone();
        let signs = sign_scan(
            &stats[..p_count],
            &stats[p_count..],
            &mut rule,
            self.shard_len,
            d,
        )?;
        let mut out = vec![0.0f64; p_count + d];
        for (p, &(eps, _)) in signs.iter().enumerate() {
            out[p] = eps;
            let v = &mut out[p_count..];
            with_pair!(self, layout, batch, p, a, b => update_diff::<f64, _, _, G>(&layout, v, &a, &b, eps, None));
        }
        Ok(out)
    }

    /// Pipelined mode, after all W rounds: place every shard's pairs with the broadcast signs
    /// (rank-major, W x P, each +1 or -1) and keep this rank's open gradient.
    pub fn place_step<G: GradElem>(&mut self, batch: &Batch<'_, G>, signs: &[f64]) -> Result<()> {
        let layout = self.check_step(batch)?;
        let p_count = self.pair_count(batch.rows());
        if signs.len() != self.world * p_count {
            return Err(GrabError::shape(format!(
                "expected {} x {p_count} signs, got {}",
                self.world,
                signs.len()
            )));
        }
        if signs.iter().any(|&e| e != 1.0 && e != -1.0) {
            return Err(GrabError::new(
                ErrorKind::NonFinite,
                "a broadcast sign is neither +1 nor -1",
            ));
        }
        if self.s.is_empty() {
            self.s = vec![0.0; layout.dim];
        }
        self.commit(batch, signs, p_count);
        Ok(())
    }

    /// Put back a running sum saved before a step whose rounds failed half way.
    pub fn restore_running_sum(&mut self, s: &[f64]) -> Result<()> {
        if !s.is_empty() && !self.s.is_empty() && s.len() != self.s.len() {
            return Err(GrabError::shape(format!(
                "the running sum has d = {} values, got {}",
                self.s.len(),
                s.len()
            )));
        }
        self.s = s.to_vec();
        Ok(())
    }

    /// Efficient mode, last part: s += the all-reduced signed sum of every rank.
    pub fn add_sum(&mut self, total: &[f64]) -> Result<()> {
        if self.s.is_empty() && self.dim.is_none() {
            self.s = vec![0.0; total.len()];
        }
        if total.len() != self.s.len() {
            return Err(GrabError::shape(format!(
                "the signed sum must have d = {} values, got {}",
                self.s.len(),
                total.len()
            )));
        }
        if total.iter().any(|x| !x.is_finite()) {
            return Err(GrabError::new(
                ErrorKind::NonFinite,
                "the all-reduced signed sum contains NaN or Inf",
            ));
        }
        for (s, t) in self.s.iter_mut().zip(total) {
            *s += t;
        }
        Ok(())
    }

    /// Place every shard's closed pairs (signs in rank-major order), advance the cursor, and keep this
    /// rank's last row when it opens a pair.
    fn commit<G: GradElem>(&mut self, batch: &Batch<'_, G>, signs: &[f64], p_count: usize) {
        let d = batch.dim();
        for w in 0..self.world {
            for p in 0..p_count {
                let (x, y) = self.pair_positions(p);
                let (i1, i2) = (self.current[w][x], self.current[w][y]);
                let (front, back) = if signs[w * p_count + p] > 0.0 {
                    (i1, i2)
                } else {
                    (i2, i1)
                };
                self.assembly[w].place(front, 1.0);
                self.assembly[w].place(back, -1.0);
            }
        }
        let rows = batch.rows();
        self.open = (rows + self.open as usize) % 2 == 1;
        if self.open {
            self.pending_grad.resize(d, 0.0);
            for (o, piece) in batch.row(rows - 1).pieces() {
                for (dst, src) in self.pending_grad[o..o + piece.len()].iter_mut().zip(piece) {
                    *dst = src.to_f64();
                }
            }
        }
        self.cursor += rows;
        self.dim = Some(d);
    }

    /// The replicated state as bytes (little endian), for checking that replicas agree bit for bit.
    pub fn replica_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for x in [
            self.world,
            self.shard_len,
            self.cursor,
            self.open as usize,
            self.dim.unwrap_or(0),
        ] {
            out.extend_from_slice(&(x as u64).to_le_bytes());
        }
        out.extend_from_slice(&self.epochs_begun.to_le_bytes());
        for x in &self.s {
            out.extend_from_slice(&x.to_le_bytes());
        }
        for w in 0..self.world {
            for &i in &self.current[w] {
                out.extend_from_slice(&i.to_le_bytes());
            }
            let (next, front, back, taken) = self.assembly[w].parts();
            for &i in next {
                out.extend_from_slice(&i.to_le_bytes());
            }
            out.extend_from_slice(&(front as u64).to_le_bytes());
            out.extend_from_slice(&(back as u64).to_le_bytes());
            for &t in taken {
                out.extend_from_slice(&t.to_le_bytes());
            }
        }
        out
    }
}

mod checkpoint;

#[cfg(test)]
mod tests;
