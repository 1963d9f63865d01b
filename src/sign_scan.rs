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

/// Unit roundoff of f32 and of f64.
const U32: f64 = 1.0 / (1u64 << 24) as f64;
const U64: f64 = f64::EPSILON / 2.0;
/// Half the smallest f32 subnormal: the absolute error bound of an f32 rounding in the subnormal range.
const SUBNORMAL_ERR: f64 = 1.0 / (1u128 << 127) as f64 / (1u64 << 23) as f64;
/// Sums this large are not certified (an element could overflow f32 on the way).
const F32_SAFE: f64 = f32::MAX as f64 / 4.0;

/// gamma_k = k u / (1 - k u): the relative error bound of a sum of k + 1 f64 terms in any order.
fn gamma(k: f64) -> f64 {
    k * U64 / (1.0 - k * U64)
}

/// The deterministic rule's signs for the leading rows of a block that the Gram estimates (see
/// `kernels::gram_block`) decide for certain; the first row they cannot decide, and all after it,
/// are left out. `d` is the number of coordinates. Each returned sign equals the sign the sequential
/// definition gives from its own inner product <s_i, z_i>: s_i rounded to f32 after every row, the
/// products formed in f64 and summed in f64 in the kernels' order.
///
/// The proof, with S_i = s_0 + sum_{j<i} eps_j z_j in exact arithmetic and s_i the f32 sequence:
/// - every f64 sum of d exact products (an f32 times an f32 is exact in f64) is within
///   gamma_{d+64} sum |terms| <= gamma ||x|| ||y|| of the exact dot, whatever the order (the estimates
///   and the definition's own sum alike);
/// - ||s_{i+1} - S_{i+1}|| <= E_{i+1} = E_i + u32 (||S_{i+1}|| + E_i) + sqrt(d) 2^-150 (the rounding
///   of s_i + eps z_i, relative in the normal range, absolute below it);
/// - ||S_i|| is bounded by both ||s_0|| + sum_{j<i} ||z_j|| and the square root of its own Gram
///   estimate plus that estimate's error bound;
/// so |definition - estimate| <= ||z_i|| (gamma (||S_i|| + E_i) + E_i + gamma T_i) + gamma_{i+1}
/// (|u_i| + sum_j |G_ji|), T_i = ||s_0|| + sum_{j<i} ||z_j||. A sign is kept only where the estimate
/// exceeds twice that bound (the factor covers the rounding in computing the bound), so the two have
/// the same sign and neither is zero. Non-finite estimates, or sums that could approach the f32 range,
/// are never certified: the exact per-row kernels then decide (and refuse) the row.
pub fn certified_prefix(est: &crate::kernels::gram_block::BlockGram, d: usize) -> Vec<f64> {
    let b = est.u.len();
    let (u, g) = (&est.u, &est.gram);
    let gd = gamma(d as f64 + 64.0);
    // An upper bound on a norm from its estimated square (sum of non-negative terms, relative error
    // at most gd), with room for the square root's rounding.
    let norm_up = |x2: f64| (x2.max(0.0) / (1.0 - gd)).sqrt() * (1.0 + 4.0 * U64);
    let sub = (d as f64).sqrt() * SUBNORMAL_ERR;
    let mut signs = Vec::with_capacity(b);
    if !est.ss.is_finite() {
        return signs;
    }
    let mut t = norm_up(est.ss); // T_i
    let mut ns = t; // bound on ||S_i|| (S_0 = s_0 exactly)
    let mut q = est.ss; // estimate of ||S_i||^2
    let mut eq = gd * est.ss; // bound on its error
    let mut e = 0.0; // E_i
    for i in 0..b {
        let gii = g[i * b + i];
        if !(u[i].is_finite() && gii.is_finite()) {
            break;
        }
        let nz = norm_up(gii);
        let mut dot = u[i];
        let mut abs = u[i].abs();
        for (j, &eps) in signs.iter().enumerate() {
            let x = g[j * b + i];
            dot += eps * x;
            abs += x.abs();
        }
        let est_err = gd * t * nz + gamma(i as f64 + 1.0) * abs;
        let bound = 2.0 * (nz * (gd * (ns + e) + e) + est_err);
        if !(dot.is_finite() && bound.is_finite()) || dot.abs() <= bound {
            break;
        }
        let eps = SignRule::Deterministic.decide(dot, gii, 0, d).eps;
        // ||S_{i+1}||^2 = ||S_i||^2 + 2 eps <S_i, z_i> + ||z_i||^2, and its error bound.
        let q1 = q + 2.0 * eps * dot + gii;
        eq += 2.0 * est_err + gd * nz * nz + gamma(3.0) * (q.abs() + 2.0 * dot.abs() + gii);
        let t1 = t + nz;
        let ns1 = t1.min(norm_up(q1 + eq));
        let e1 = e + U32 * (ns1 + e) + sub;
        if ns1 + e1 >= F32_SAFE {
            break;
        }
        (q, t, ns, e) = (q1, t1, ns1, e1);
        signs.push(eps);
    }
    signs
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
