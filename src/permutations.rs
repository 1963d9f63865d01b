//! The orderings that ignore gradients: `rr`, `so`, `wr`, `fixed`, `flipflop`. Each epoch's order is
//! a pure function of (seed, epoch), as torch's samplers do, so nothing but the epoch number is state.

use crate::rng::{stream, Rng};

pub fn random_permutation(seed: u64, epoch: u64, n: usize) -> Vec<u32> {
    Rng::new(seed, stream::EPOCH_ORDER, epoch).permutation(n)
}

/// `rr`: a fresh seeded permutation every epoch.
pub fn random_reshuffle(seed: u64, epoch: u64, n: usize) -> Vec<u32> {
    random_permutation(seed, epoch, n)
}

/// `so`: one seeded permutation, the same every epoch.
pub fn shuffle_once(seed: u64, n: usize) -> Vec<u32> {
    random_permutation(seed, 0, n)
}

/// `wr`: n indices drawn uniformly with replacement (plain SGD).
pub fn with_replacement(seed: u64, epoch: u64, n: usize) -> Vec<u32> {
    let mut rng = Rng::new(seed, stream::EPOCH_ORDER, epoch);
    (0..n).map(|_| rng.below(n as u64) as u32).collect()
}

/// `fixed`: the given order, or the identity.
pub fn fixed(order: Option<&[u32]>, n: usize) -> Vec<u32> {
    match order {
        Some(o) => o.to_vec(),
        None => (0..n as u32).collect(),
    }
}

/// `flipflop` (Rajput et al.): epochs 0, 2, 4, ... draw a fresh permutation; epochs 1, 3, ... replay
/// the previous epoch's order reversed.
pub fn flipflop(seed: u64, epoch: u64, n: usize) -> Vec<u32> {
    if epoch.is_multiple_of(2) {
        random_permutation(seed, epoch, n)
    } else {
        let mut p = random_permutation(seed, epoch - 1, n);
        p.reverse();
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flipflop_reverses_on_odd_epochs() {
        let e0 = flipflop(1, 0, 10);
        let mut e1 = flipflop(1, 1, 10);
        e1.reverse();
        assert_eq!(e0, e1);
        assert_ne!(flipflop(1, 2, 10), e0);
    }

    #[test]
    fn wr_draws_in_range() {
        let w = with_replacement(4, 3, 50);
        assert_eq!(w.len(), 50);
        assert!(w.iter().all(|&i| i < 50));
    }
}
