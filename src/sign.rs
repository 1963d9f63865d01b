//! The sign rules of GRAB.md: deterministic (eps = +1 iff <s, z> <= 0) and the randomized
//! self-balancing walk of Alweiss, Liu and Sawhney (z scaled to norm <= 1, P(+1) = 1/2 - <s,z>/(2c)).

use crate::rng::{stream, Rng};

#[derive(Debug, Clone, PartialEq)]
pub enum SignRule {
    Deterministic,
    /// `delta` is the failure probability in c = 30 ln(n d / delta).
    SelfBalancingWalk {
        delta: f64,
        rng: Rng,
    },
}

/// A decided sign and the factor z is scaled by before it is added to the running sum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub eps: f64,
    pub scale: f64,
}

impl SignRule {
    pub fn deterministic() -> Self {
        SignRule::Deterministic
    }

    pub fn self_balancing_walk(seed: u64, delta: f64) -> Self {
        SignRule::SelfBalancingWalk {
            delta,
            rng: Rng::new(seed, stream::SIGN_RULE, 0),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            SignRule::Deterministic => "deterministic",
            SignRule::SelfBalancingWalk { .. } => "random",
        }
    }

    /// `dot` = <s, z>, `norm2` = ||z||^2, for n units of dimension d.
    pub fn decide(&mut self, dot: f64, norm2: f64, n: usize, d: usize) -> Decision {
        match self {
            SignRule::Deterministic => Decision {
                eps: if dot <= 0.0 { 1.0 } else { -1.0 },
                scale: 1.0,
            },
            SignRule::SelfBalancingWalk { delta, rng } => {
                let norm = norm2.sqrt();
                let scale = if norm > 1.0 { 1.0 / norm } else { 1.0 };
                let c = 30.0
                    * ((n.max(1) as f64) * (d.max(1) as f64) / *delta)
                        .ln()
                        .max(1.0);
                let p = (0.5 - dot * scale / (2.0 * c)).clamp(0.0, 1.0);
                let eps = if rng.next_f64() < p { 1.0 } else { -1.0 };
                Decision { eps, scale }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_ties_go_to_plus_one() {
        let mut r = SignRule::deterministic();
        assert_eq!(r.decide(0.0, 1.0, 10, 2).eps, 1.0);
        assert_eq!(r.decide(-3.0, 1.0, 10, 2).eps, 1.0);
        assert_eq!(r.decide(1e-300, 1.0, 10, 2).eps, -1.0);
    }

    #[test]
    fn walk_is_seeded_and_leans_against_the_sum() {
        let mut a = SignRule::self_balancing_walk(5, 0.1);
        let mut b = SignRule::self_balancing_walk(5, 0.1);
        let xs: Vec<f64> = (0..100)
            .map(|i| a.decide(i as f64 - 50.0, 4.0, 100, 10).eps)
            .collect();
        let ys: Vec<f64> = (0..100)
            .map(|i| b.decide(i as f64 - 50.0, 4.0, 100, 10).eps)
            .collect();
        assert_eq!(xs, ys);
        // A huge positive <s,z> forces -1, a huge negative one forces +1.
        assert_eq!(a.decide(1e9, 1.0, 100, 10).eps, -1.0);
        assert_eq!(a.decide(-1e9, 1.0, 100, 10).eps, 1.0);
    }
}
