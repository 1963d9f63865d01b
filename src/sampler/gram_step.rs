//! The on-device path's half of a step: the d-dimensional work (u = Z s0, G = Z Z^T, the running-sum
//! updates) happens wherever the gradients live (python/torchgrab/ondevice.py); only the B + B^2
//! inner products come here, where the exact sequential sign scan and the front/back assembly run.

use super::{OrderingKind, Sampler};
use crate::elem::StateElem;
use crate::error::{ErrorKind, GrabError, Result};
use crate::sign_scan::sign_scan;

impl<S: StateElem> Sampler<S> {
    /// Decide and place the rows of one step from their inner products. For `grab`, row r is unit
    /// `indices[r]` (centered gradient); for `pair`, row r is the difference of units
    /// `indices[2r]` - `indices[2r + 1]`. `also_fresh` are units the caller will hold back (an open
    /// pair's first unit): checked like `indices` but not placed. Returns (eps, scale) per row, the
    /// coefficient of that row in the running-sum update. All or nothing: a refusal changes nothing.
    pub fn step_gram(
        &mut self,
        indices: &[u32],
        u: &[f64],
        gram: &[f64],
        dim: usize,
        also_fresh: &[u32],
    ) -> Result<Vec<(f64, f64)>> {
        if self.epochs_begun == 0 {
            return Err(GrabError::call_order(
                "step() was called before any epoch began; iterate the sampler first",
            ));
        }
        let per_row = match self.cfg.kind {
            OrderingKind::MeanBalance => 1,
            OrderingKind::PairBalance => 2,
            other => {
                return Err(GrabError::new(
                    ErrorKind::State,
                    format!(
                        "the on-device path balances 'grab' and 'pair'; this sampler's ordering is {:?}",
                        other.name()
                    ),
                ))
            }
        };
        if indices.len() != per_row * u.len() {
            return Err(GrabError::shape(format!(
                "{} inner products need {} indices, got {}",
                u.len(),
                per_row * u.len(),
                indices.len()
            )));
        }
        let asm = self
            .assembler
            .as_mut()
            .ok_or_else(|| GrabError::call_order("no epoch is running"))?;
        let all: Vec<u32> = indices.iter().chain(also_fresh).copied().collect();
        asm.check_fresh(&all)?;
        let n = self.cfg.n;
        // sign_scan validates everything before it draws from the rule, so a refusal leaves it as it was.
        let decisions = sign_scan(u, gram, &mut self.rule, n, dim)?;
        for (r, &(eps, _)) in decisions.iter().enumerate() {
            if per_row == 1 {
                asm.place(indices[r], eps);
            } else {
                let (a, b) = (indices[2 * r], indices[2 * r + 1]);
                let (front, back) = if eps > 0.0 { (a, b) } else { (b, a) };
                asm.place(front, 1.0);
                asm.place(back, -1.0);
            }
        }
        Ok(decisions)
    }
}

#[cfg(test)]
mod tests {
    use crate::batch::Batch;
    use crate::sampler::{Config, OrderingKind, Sampler};

    /// On explicit vectors, the Gram step gives the same next order as the dense kernel.
    #[test]
    fn gram_step_orders_equal_the_dense_kernel() {
        let (n, d) = (8usize, 3usize);
        let g: Vec<f64> = (0..n * d)
            .map(|i| ((i * 7919) % 23) as f64 - 11.0)
            .collect();
        for kind in [OrderingKind::MeanBalance, OrderingKind::PairBalance] {
            let mut dense = Sampler::<f64>::new(Config::new(kind, n, 3)).unwrap();
            let mut gram = dense.clone();
            let order = dense.begin_epoch(0).to_vec();
            gram.begin_epoch(0);
            let rows: Vec<f64> = order
                .iter()
                .flat_map(|&i| g[i as usize * d..(i as usize + 1) * d].to_vec())
                .collect();
            dense
                .step(&Batch::from_slice(&rows, n, d).unwrap(), &order)
                .unwrap();
            // Explicit Z (first epoch: mean 0 for grab; pair differences for pair) and s0 = 0.
            let z: Vec<Vec<f64>> = match kind {
                OrderingKind::MeanBalance => rows.chunks(d).map(|r| r.to_vec()).collect(),
                _ => rows
                    .chunks(2 * d)
                    .map(|p| (0..d).map(|c| p[c] - p[d + c]).collect())
                    .collect(),
            };
            let b = z.len();
            let u = vec![0.0; b];
            let gm: Vec<f64> = (0..b * b)
                .map(|k| (0..d).map(|c| z[k / b][c] * z[k % b][c]).sum())
                .collect();
            gram.step_gram(&order, &u, &gm, d, &[]).unwrap();
            assert_eq!(dense.begin_epoch(1), gram.begin_epoch(1), "{kind:?}");
        }
    }
}
