//! The herding discrepancy of an order on fixed vectors: max_k || sum_{t<=k} (v_order(t) - mean) ||,
//! in the l_inf and l2 norms. The cheapest faithful check that an ordering really balances.

use crate::error::{GrabError, Result};

/// `vectors` is row-major n x d. Returns (l_inf, l2).
pub fn herding_discrepancy(
    vectors: &[f64],
    n: usize,
    d: usize,
    order: &[u32],
) -> Result<(f64, f64)> {
    if n.checked_mul(d) != Some(vectors.len()) {
        return Err(GrabError::shape(format!(
            "expected {n} x {d} values, got {}",
            vectors.len()
        )));
    }
    if order.len() != n {
        return Err(GrabError::shape(format!(
            "the order has {} entries, expected n = {n}",
            order.len()
        )));
    }
    let mut seen = vec![false; n];
    for &i in order {
        if i as usize >= n || std::mem::replace(&mut seen[i as usize], true) {
            return Err(GrabError::index(format!(
                "the order is not a permutation of 0..{n} (bad or repeated entry {i})"
            )));
        }
    }
    let mut mean = vec![0.0f64; d];
    for row in vectors.chunks_exact(d.max(1)).take(n) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n.max(1) as f64);
    let mut prefix = vec![0.0f64; d];
    let (mut linf, mut l2) = (0.0f64, 0.0f64);
    for &i in order {
        let row = &vectors[i as usize * d..(i as usize + 1) * d];
        let mut sq = 0.0;
        for ((p, v), m) in prefix.iter_mut().zip(row).zip(&mean) {
            *p += v - m;
            linf = linf.max(p.abs());
            sq += *p * *p;
        }
        l2 = l2.max(sq.sqrt());
    }
    Ok((linf, l2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed() {
        // vectors 1, -1, 3, -3 (d = 1), mean 0; order 0,1,2,3 -> prefixes 1,0,3,0 -> 3
        let v = [1.0, -1.0, 3.0, -3.0];
        assert_eq!(
            herding_discrepancy(&v, 4, 1, &[0, 1, 2, 3]).unwrap(),
            (3.0, 3.0)
        );
        // order 2,3,0,1 -> 3,0,1,0; order 0,3,2,1 -> 1,-2,1,0 -> 2
        assert_eq!(
            herding_discrepancy(&v, 4, 1, &[0, 3, 2, 1]).unwrap(),
            (2.0, 2.0)
        );
        assert!(herding_discrepancy(&v, 4, 1, &[0, 0, 2, 1]).is_err());
    }
}
