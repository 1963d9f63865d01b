//! A small, fully specified PRNG (xoshiro256**, seeded through SplitMix64). Its whole state is four
//! u64 words, so it goes into a checkpoint as plain integers and restores bit for bit on any platform.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Stream tags keep the random streams of different purposes independent for one user seed.
pub mod stream {
    pub const EPOCH_ORDER: u64 = 1;
    pub const SIGN_RULE: u64 = 2;
    pub const PROJECTION: u64 = 3;
}

impl Rng {
    /// A generator for (seed, stream, counter): e.g. the order of epoch 7 for seed 0.
    pub fn new(seed: u64, stream: u64, counter: u64) -> Self {
        let mut x = seed
            ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03)
            ^ counter.wrapping_mul(0xABC9_8388_FB8F_AC03);
        let mut s = [0u64; 4];
        for w in s.iter_mut() {
            *w = splitmix64(&mut x);
        }
        if s == [0; 4] {
            s[0] = 1; // the all-zero state is the one fixed point of xoshiro
        }
        Rng { s }
    }

    pub fn from_state(s: [u64; 4]) -> Option<Self> {
        if s == [0; 4] {
            None
        } else {
            Some(Rng { s })
        }
    }

    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, bound) without modulo bias (Lemire's multiply-and-reject).
    pub fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0);
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let m = (self.next_u64() as u128) * (bound as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// A uniformly random permutation of 0..n as compact u32 (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<u32> {
        let mut p: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            p.swap(i, j);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation_and_reproducible() {
        let a = Rng::new(3, stream::EPOCH_ORDER, 0).permutation(1000);
        let b = Rng::new(3, stream::EPOCH_ORDER, 0).permutation(1000);
        assert_eq!(a, b);
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..1000).collect::<Vec<u32>>());
        let c = Rng::new(3, stream::EPOCH_ORDER, 1).permutation(1000);
        assert_ne!(a, c);
    }

    #[test]
    fn below_stays_in_range_and_state_restores() {
        let mut r = Rng::new(9, 0, 0);
        for b in 1..200u64 {
            assert!(r.below(b) < b);
        }
        let saved = r.state();
        let x: Vec<u64> = (0..5).map(|_| r.next_u64()).collect();
        let mut r2 = Rng::from_state(saved).unwrap();
        let y: Vec<u64> = (0..5).map(|_| r2.next_u64()).collect();
        assert_eq!(x, y);
    }
}
