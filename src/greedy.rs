//! `greedy`: the greedy ordering of Mohtashami, Stich and Jaggi (the paper's O(n d)-memory baseline).
//! All n gradients of the epoch are stored; at the epoch's end, with z_c = g_c - mean and S = 0, each
//! position takes the unused unit c minimizing ||S + z_c||, then S += z_c. O(n^2 d) time.
//!
//! The scan uses ||S + z_c||^2 = ||S||^2 + 2<S, z_c> + ||z_c||^2: ||S||^2 is the same for every
//! candidate, so one pass of d-long f64 dot products over the unused centered rows (kept contiguous,
//! rayon over candidates) decides each position, with ||z_c||^2 computed once per epoch.

use crate::assembly::FrontBack;
use crate::elem::StateElem;
use crate::stored_gradients::{visited, StoredGradients};
use rayon::prelude::*;

/// Candidates per rayon task: enough work (MIN_TASK x d products) to outweigh a task's overhead.
const MIN_TASK: usize = 256;

/// <a, b> in f64 with four independent accumulators (a fixed order, so the result is reproducible).
#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let mut ca = a.chunks_exact(4);
    let mut cb = b.chunks_exact(4);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Working memory of the scan beyond the store, in bytes: the centered rows (f64), one norm and one
/// position per unit. The sampler's memory check counts it.
pub fn scan_bytes(n: usize, d: usize) -> u128 {
    n as u128 * (d as u128 * 8 + 12)
}

/// The next order: the greedy order of the units seen this epoch, then the units not seen in their
/// current order (greedy has no front and back blocks to put them between).
pub fn next_order<S: StateElem>(
    store: &StoredGradients<S>,
    assembler: &FrontBack,
    current: &[u32],
) -> Vec<u32> {
    let seen = visited(assembler);
    let d = store.d;
    let mean = store.mean(seen);
    // The unused candidates' centered rows z_c, kept contiguous (a used row is swapped out), with
    // ||z_c||^2 and the candidate's position in visit order (ties go to the earlier visited unit).
    let mut work: Vec<f64> = Vec::with_capacity(seen.len() * d);
    for &c in seen {
        work.extend(store.row(c).iter().zip(&mean).map(|(g, m)| g.to_f64() - m));
    }
    let threads = crate::kernels::threads_usable();
    let mut norms: Vec<f64> = if threads {
        work.par_chunks(d).map(|z| dot(z, z)).collect()
    } else {
        work.chunks(d).map(|z| dot(z, z)).collect()
    };
    let mut positions: Vec<u32> = (0..seen.len() as u32).collect();
    let mut s = vec![0.0f64; d];
    let mut out = Vec::with_capacity(current.len());
    let better = |a: (f64, u32, usize), b: (f64, u32, usize)| {
        if b.0 < a.0 || (b.0 == a.0 && b.1 < a.1) {
            b
        } else {
            a
        }
    };
    while !positions.is_empty() {
        let score = |(r, z): (usize, &[f64])| (2.0 * dot(&s, z) + norms[r], positions[r], r);
        let none = (f64::INFINITY, u32::MAX, usize::MAX);
        // `better` is a total order (ties by position), so the reduction's grouping cannot matter.
        let (_, pos, row) = if threads {
            work.par_chunks(d)
                .with_min_len(MIN_TASK)
                .enumerate()
                .map(score)
                .reduce(|| none, better)
        } else {
            work.chunks(d).enumerate().map(score).fold(none, better)
        };
        out.push(seen[pos as usize]);
        for (x, z) in s.iter_mut().zip(&work[row * d..(row + 1) * d]) {
            *x += z;
        }
        let last = positions.len() - 1;
        if row != last {
            work.copy_within(last * d..(last + 1) * d, row * d);
        }
        work.truncate(last * d);
        norms.swap_remove(row);
        positions.swap_remove(row);
    }
    out.extend(current.iter().filter(|&&i| !assembler.is_taken(i)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;

    #[test]
    fn hand_computed() {
        // d = 1: g = [5, 1, -2, -4] (units 0..3), mean 0, z = g, norms [25, 1, 4, 16].
        // t=1, S=0: keys 2*0 + ||z||^2 -> unit 1 (1). S = 1.
        // t=2: keys 2*S*z + z^2: unit0 10+25=35, unit2 -4+4=0, unit3 -8+16=8 -> unit 2. S = -1.
        // t=3: unit0 -10+25=15, unit3 8+16=24 -> unit 0. S = 4. t=4: unit 3.  => [1, 2, 0, 3]
        let g = [5.0, 1.0, -2.0, -4.0];
        let mut store = StoredGradients::<f64>::new("greedy", 4, 1, 0, None).unwrap();
        let mut asm = FrontBack::new(4);
        store
            .step(
                &Batch::from_slice(&g, 4, 1).unwrap(),
                &[0, 1, 2, 3],
                &mut asm,
            )
            .unwrap();
        assert_eq!(next_order(&store, &asm, &[0, 1, 2, 3]), vec![1, 2, 0, 3]);
        // Ties go to the earlier visited unit: g = [1, -1, 1, -1] visited 3, 2, 1, 0 (mean 0).
        // t=1: all keys 1 -> first visited, unit 3 (S=-1). t=2: keys for z=1: -2+1=-1, z=-1: 3
        // -> unit 2 (earlier of 2, 0), S=0. t=3: tie again -> unit 1, then unit 0.
        let mut asm = FrontBack::new(4);
        store
            .step(
                &Batch::from_slice(&[-1.0, 1.0, -1.0, 1.0], 4, 1).unwrap(),
                &[3, 2, 1, 0],
                &mut asm,
            )
            .unwrap();
        assert_eq!(next_order(&store, &asm, &[3, 2, 1, 0]), vec![3, 2, 1, 0]);
    }

    #[test]
    fn unseen_units_follow_the_greedy_block() {
        let mut store = StoredGradients::<f32>::new("greedy", 5, 2, 0, None).unwrap();
        let mut asm = FrontBack::new(5);
        // Units 4 and 1 seen: mean (0, 0); both norms 2: tie -> 4 first, then 1.
        store
            .step(
                &Batch::from_slice(&[1.0f32, 1.0, -1.0, -1.0], 2, 2).unwrap(),
                &[4, 1],
                &mut asm,
            )
            .unwrap();
        assert_eq!(
            next_order(&store, &asm, &[2, 4, 1, 0, 3]),
            vec![4, 1, 2, 0, 3]
        );
    }
}
