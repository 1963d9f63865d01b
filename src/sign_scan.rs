//! The Gram formulation of GRAB.md: the B sequential signs of a step follow exactly from
//! u = Z s0 (B numbers) and G = Z Z^T (B x B numbers) by an O(B^2) scalar scan, because
//! <s_{i-1}, z_i> = u_i + sum_{j<i} eps_j c_j G_{ji} (c_j the scale the rule applied to z_j).
//! This is what lets the d-dimensional work stay on an accelerator (or in one cache-friendly pass),
//! with only B + B^2 numbers reaching this scan.

use crate::error::{GrabError, Result};
use crate::sign::SignRule;

/// Signs and scales for rows 0..B given u (len B) and the row-major Gram matrix (B x B).
/// `n` and `d` parameterize the randomized rule's constant; the deterministic rule ignores them.
pub fn sign_scan(
    u: &[f64],
    gram: &[f64],
    rule: &mut SignRule,
    n: usize,
    d: usize,
) -> Result<Vec<(f64, f64)>> {
    let b = u.len();
    if gram.len() != b * b {
        return Err(GrabError::shape(format!(
            "the Gram matrix must be {b} x {b} for {b} inner products, got {} values",
            gram.len()
        )));
    }
    if u.iter().chain(gram).any(|x| !x.is_finite()) {
        return Err(GrabError::new(
            crate::error::ErrorKind::NonFinite,
            "inner products contain NaN or Inf",
        ));
    }
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(b);
    for i in 0..b {
        let mut dot = u[i];
        for (j, &(eps, scale)) in out.iter().enumerate() {
            dot += eps * scale * gram[j * b + i];
        }
        let dec = rule.decide(dot, gram[i * b + i], n, d);
        out.push((dec.eps, dec.scale));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_the_sequential_rule_on_explicit_vectors() {
        // z rows in 3-D; s0 = (0.5, -1, 2).
        let z = [
            [1.0, 0.0, 2.0],
            [-1.0, 1.0, 0.5],
            [0.0, -3.0, 1.0],
            [2.0, 2.0, -1.0],
        ];
        let s0 = [0.5, -1.0, 2.0];
        let dot = |a: &[f64; 3], b: &[f64; 3]| a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
        let u: Vec<f64> = z.iter().map(|r| dot(r, &s0)).collect();
        let gram: Vec<f64> = z
            .iter()
            .flat_map(|a| z.iter().map(move |b| dot(a, b)))
            .collect();
        let got = sign_scan(&u, &gram, &mut SignRule::deterministic(), 4, 3).unwrap();
        let mut s = s0;
        for (k, r) in z.iter().enumerate() {
            let eps = if dot(&s, r) <= 0.0 { 1.0 } else { -1.0 };
            assert_eq!(got[k].0, eps);
            for c in 0..3 {
                s[c] += eps * r[c];
            }
        }
        assert!(sign_scan(&u, &gram[..15], &mut SignRule::deterministic(), 4, 3).is_err());
    }
}
