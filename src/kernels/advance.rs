//! `grab`'s two-row pass: fewer sweeps over the running sums for the same bits.
//!
//! The per-row pass (`update_then_dot`) reads the gradient row, the stale mean, s and m_next and writes
//! s and m_next for every row: about 28 bytes of memory traffic per 4-byte gradient element, which
//! bounds it once the sums leave the caches (d >= 1e6). The sign of row q needs <s_{q-1}, z_q> over all
//! d coordinates, so rows cannot simply be batched; but the dot of row q + 1 can be formed for *both*
//! possible signs of row q in the same pass: <fl(s_{q-1} + c z_q), z_{q+1}> for c = +scale and
//! -scale. Each is the sequential definition's own value (same roundings, same lanes, same order), so
//! once row q's sign is decided the matching one is simply selected. A pass then applies two decided
//! rows, forms one dot and two speculative dots, and sweeps s and m_next once per two rows.
//!
//! Only for float32 state and gradients on AVX-512 (`available`), with the deterministic sign rule,
//! whose scale (1) is known before the dot; other cases keep the per-row pass.

// The pass is written for AVX-512; elsewhere `available()` is false, it is never called, and its
// operands go unused.
#![cfg_attr(not(target_arch = "x86_64"), allow(unused))]

#[cfg(target_arch = "x86_64")]
use super::simd::widen;
use super::{
    fold_lanes, isa, prefetch_at, Isa, Layout, Pieces, CHUNK, LANES, PARALLEL_MIN_DIM, PREFETCH,
};
use rayon::prelude::*;

/// What one `advance` pass does.
pub struct Advance<'p, 'a> {
    /// Rows whose signs are decided, applied to s in this order, with their coefficients (one or
    /// two). Each is also added to m_next (times 1/n), in the same order.
    pub apply: &'p [(&'p Pieces<'a, f32>, f64)],
    /// The stale mean: every row is centered by it.
    pub m: &'p Pieces<'a, f32>,
    pub inv_n: f64,
    /// The row whose dot with the updated s is wanted (and its squared norm).
    pub dot: Option<&'p Pieces<'a, f32>>,
    /// The row after `dot`, dotted with s + c z_dot for c = +scale (first) and -scale (second).
    pub spec: Option<(&'p Pieces<'a, f32>, f64)>,
}

/// (dot, norm2) of the `dot` row; (dot with +scale, dot with -scale, norm2) of the `spec` row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Advanced {
    pub dot: (f64, f64),
    pub spec: (f64, f64, f64),
}

/// Whether the two-row pass can run here (the float32 loop is written for AVX-512).
pub fn available() -> bool {
    isa() == Isa::Avx512
}

/// Five lane accumulators: dot, norm of the `dot` row; dot+, dot-, norm of the `spec` row.
type Acc5 = [[f64; LANES]; 5];

/// One element of the pass, written plainly: the definition the vector loop reproduces bit for bit
/// (the f32 path of `upd_body`: z = g - m and s + c z rounded in f32, products and sums in f64).
#[inline(always)]
fn element(x: &ElemIn, acc: &mut Acc5, l: usize) -> (f32, f32) {
    let mut s = x.s;
    let mut mn = x.mn;
    for k in 0..x.napply {
        s += x.coef[k] * (x.g[k] - x.m);
        mn += x.g[k] * x.inv;
    }
    if let Some(q) = x.q {
        let z = q - x.m;
        let zw = z as f64;
        acc[0][l] += s as f64 * zw;
        acc[1][l] += zw * zw;
        if let Some(q1) = x.q1 {
            let sp = s + x.scale * z;
            let sm = s + (-x.scale) * z;
            let z1 = (q1 - x.m) as f64;
            acc[2][l] += sp as f64 * z1;
            acc[3][l] += sm as f64 * z1;
            acc[4][l] += z1 * z1;
        }
    }
    (s, mn)
}

struct ElemIn {
    s: f32,
    mn: f32,
    m: f32,
    g: [f32; 2],
    coef: [f32; 2],
    napply: usize,
    inv: f32,
    q: Option<f32>,
    q1: Option<f32>,
    scale: f32,
}

/// The operands of one piece as raw pointers (see `simd::F32Ops` for the aliasing rules: s and m_next
/// may be updated in place from their sources).
struct Ptrs {
    s_src: *const f32,
    s_dst: *mut f32,
    mn_src: *const f32,
    mn_dst: *mut f32,
    m: *const f32,
    g: [*const f32; 2],
    q: *const f32,
    q1: *const f32,
}

/// The pass over one piece: elements [0, len) at flat positions base.., scalar head and tail, the
/// aligned body 16 at a time with AVX-512.
///
/// # Safety
/// AVX-512F; every pointer valid for `len` elements (g[k] for k < napply, q when DOT, q1 when SPEC);
/// destinations may equal their sources but overlap nothing else.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn piece<const N: usize, const DOT: bool, const SPEC: bool>(
    p: &Ptrs,
    base: usize,
    len: usize,
    coef: [f32; 2],
    inv: f32,
    scale: f32,
    acc: &mut Acc5,
) {
    use std::arch::x86_64::*;
    let scalar = |j: usize, acc: &mut Acc5| {
        let x = ElemIn {
            s: *p.s_src.add(j),
            mn: *p.mn_src.add(j),
            m: *p.m.add(j),
            g: [*p.g[0].add(j), if N > 1 { *p.g[1].add(j) } else { 0.0 }],
            coef,
            napply: N,
            inv,
            q: DOT.then(|| *p.q.add(j)),
            q1: SPEC.then(|| *p.q1.add(j)),
            scale,
        };
        let (s, mn) = element(&x, acc, (base + j) % LANES);
        *p.s_dst.add(j) = s;
        *p.mn_dst.add(j) = mn;
    };
    let head = ((LANES - base % LANES) % LANES).min(len);
    let body_end = head + (len - head) / 16 * 16;
    for j in 0..head {
        scalar(j, acc);
    }
    let pf = |x: *const f32, i: usize| prefetch_at(x, i + PREFETCH);
    let ld = |a: &[f64; LANES]| _mm512_loadu_pd(a.as_ptr());
    let (mut d0, mut n0, mut dp, mut dm, mut n1) = (
        ld(&acc[0]),
        ld(&acc[1]),
        ld(&acc[2]),
        ld(&acc[3]),
        ld(&acc[4]),
    );
    let c0 = _mm512_set1_ps(coef[0]);
    let c1 = _mm512_set1_ps(coef[1]);
    let vinv = _mm512_set1_ps(inv);
    let (vsp, vsm) = (_mm512_set1_ps(scale), _mm512_set1_ps(-scale));
    let mut i = head;
    while i < body_end {
        pf(p.s_src, i);
        pf(p.mn_src, i);
        pf(p.m, i);
        pf(p.g[0], i);
        let m = _mm512_loadu_ps(p.m.add(i));
        let g0 = _mm512_loadu_ps(p.g[0].add(i));
        let mut s = _mm512_loadu_ps(p.s_src.add(i));
        let mut mn = _mm512_loadu_ps(p.mn_src.add(i));
        s = _mm512_add_ps(s, _mm512_mul_ps(c0, _mm512_sub_ps(g0, m)));
        mn = _mm512_add_ps(mn, _mm512_mul_ps(g0, vinv));
        if N > 1 {
            pf(p.g[1], i);
            let g1 = _mm512_loadu_ps(p.g[1].add(i));
            s = _mm512_add_ps(s, _mm512_mul_ps(c1, _mm512_sub_ps(g1, m)));
            mn = _mm512_add_ps(mn, _mm512_mul_ps(g1, vinv));
        }
        _mm512_storeu_ps(p.s_dst.add(i), s);
        _mm512_storeu_ps(p.mn_dst.add(i), mn);
        if DOT {
            pf(p.q, i);
            let z = _mm512_sub_ps(_mm512_loadu_ps(p.q.add(i)), m);
            let (s_lo, s_hi) = widen(s);
            let (z_lo, z_hi) = widen(z);
            d0 = _mm512_add_pd(d0, _mm512_mul_pd(s_lo, z_lo));
            n0 = _mm512_add_pd(n0, _mm512_mul_pd(z_lo, z_lo));
            d0 = _mm512_add_pd(d0, _mm512_mul_pd(s_hi, z_hi));
            n0 = _mm512_add_pd(n0, _mm512_mul_pd(z_hi, z_hi));
            if SPEC {
                pf(p.q1, i);
                let sp = _mm512_add_ps(s, _mm512_mul_ps(vsp, z));
                let sm = _mm512_add_ps(s, _mm512_mul_ps(vsm, z));
                let z1 = _mm512_sub_ps(_mm512_loadu_ps(p.q1.add(i)), m);
                let (p_lo, p_hi) = widen(sp);
                let (m_lo, m_hi) = widen(sm);
                let (y_lo, y_hi) = widen(z1);
                dp = _mm512_add_pd(dp, _mm512_mul_pd(p_lo, y_lo));
                dm = _mm512_add_pd(dm, _mm512_mul_pd(m_lo, y_lo));
                n1 = _mm512_add_pd(n1, _mm512_mul_pd(y_lo, y_lo));
                dp = _mm512_add_pd(dp, _mm512_mul_pd(p_hi, y_hi));
                dm = _mm512_add_pd(dm, _mm512_mul_pd(m_hi, y_hi));
                n1 = _mm512_add_pd(n1, _mm512_mul_pd(y_hi, y_hi));
            }
        }
        i += 16;
    }
    for (k, v) in [d0, n0, dp, dm, n1].into_iter().enumerate() {
        _mm512_storeu_pd(acc[k].as_mut_ptr(), v);
    }
    for j in body_end..len {
        scalar(j, acc);
    }
}

/// Apply `op.apply` to s and m_next (reading the old values from `src` when given, else in place) and
/// form the requested dots, in the fixed reduction order of the module `kernels` (lanes by flat index
/// mod 8 within chunks of CHUNK, chunk partials summed in chunk order), so every value equals the
/// per-row kernels' bit for bit.
///
/// Panics if `available()` is false or `op.apply` has no rows or more than two (caller bugs).
pub fn advance(
    layout: &Layout,
    src: Option<(&[f32], &[f32])>,
    s: &mut [f32],
    m_next: &mut [f32],
    op: &Advance,
) -> Advanced {
    assert!(available(), "advance needs AVX-512");
    assert!(
        (1..=2).contains(&op.apply.len()),
        "advance applies one or two rows"
    );
    assert!(op.spec.is_none() || op.dot.is_some(), "spec needs dot");
    let coef = [
        op.apply[0].1 as f32,
        op.apply.get(1).map_or(0.0, |r| r.1 as f32),
    ];
    let (inv, scale) = (op.inv_n as f32, op.spec.map_or(0.0, |x| x.1 as f32));
    let work = |c: usize, sc: &mut [f32], mc: &mut [f32]| -> [f64; 5] {
        let lo = c * CHUNK;
        let mut acc: Acc5 = [[0.0; LANES]; 5];
        for (k, st, en) in layout.overlaps(lo, lo + sc.len()) {
            let rel = layout.offsets[k] + st - lo;
            let len = en - st;
            let at = |x: &Pieces<f32>| x.slices[k][st..en].as_ptr();
            let s_dst = sc[rel..rel + len].as_mut_ptr();
            let mn_dst = mc[rel..rel + len].as_mut_ptr();
            let f = lo + rel;
            let p = Ptrs {
                s_src: src.map_or(s_dst.cast_const(), |(s0, _)| s0[f..f + len].as_ptr()),
                s_dst,
                mn_src: src.map_or(mn_dst.cast_const(), |(_, m0)| m0[f..f + len].as_ptr()),
                mn_dst,
                m: at(op.m),
                g: [
                    at(op.apply[0].0),
                    op.apply.get(1).map_or(at(op.m), |r| at(r.0)),
                ],
                q: op.dot.map_or(at(op.m), at),
                q1: op.spec.map_or(at(op.m), |x| at(x.0)),
            };
            // SAFETY: `available()` was asserted; every pointer covers [0, len) of its own piece
            // (slices cut to [st, en) or to the chunk's [rel, rel + len)); unused ones point at the
            // stale mean's piece and are not read; destinations are this chunk's own sub-slices.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                match (op.apply.len(), op.dot.is_some(), op.spec.is_some()) {
                    (1, false, _) => {
                        piece::<1, false, false>(&p, f, len, coef, inv, scale, &mut acc)
                    }
                    (1, true, false) => {
                        piece::<1, true, false>(&p, f, len, coef, inv, scale, &mut acc)
                    }
                    (1, true, true) => {
                        piece::<1, true, true>(&p, f, len, coef, inv, scale, &mut acc)
                    }
                    (_, false, _) => {
                        piece::<2, false, false>(&p, f, len, coef, inv, scale, &mut acc)
                    }
                    (_, true, false) => {
                        piece::<2, true, false>(&p, f, len, coef, inv, scale, &mut acc)
                    }
                    (_, true, true) => {
                        piece::<2, true, true>(&p, f, len, coef, inv, scale, &mut acc)
                    }
                }
            }
        }
        std::array::from_fn(|k| fold_lanes(&acc[k]))
    };
    let partials: Vec<[f64; 5]> = if layout.dim >= PARALLEL_MIN_DIM && super::threads_usable() {
        s.par_chunks_mut(CHUNK)
            .zip(m_next.par_chunks_mut(CHUNK))
            .enumerate()
            .map(|(c, (sc, mc))| work(c, sc, mc))
            .collect()
    } else {
        s.chunks_mut(CHUNK)
            .zip(m_next.chunks_mut(CHUNK))
            .enumerate()
            .map(|(c, (sc, mc))| work(c, sc, mc))
            .collect()
    };
    let mut t = [0.0f64; 5];
    for p in partials {
        for k in 0..5 {
            t[k] += p[k];
        }
    }
    Advanced {
        dot: (t[0], t[1]),
        spec: (t[2], t[3], t[4]),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{dot_diff, update_diff};
    use super::*;

    use crate::kernels::wild as values;

    #[test]
    fn every_output_equals_the_per_row_kernels() {
        if !available() {
            return;
        }
        for widths in [
            vec![40],
            vec![3, 5, 1, 29, 200],
            vec![7, CHUNK + 9, 2 * CHUNK + 3],
        ] {
            let layout = Layout::new(widths.clone());
            let d = layout.dim;
            let v: Vec<Vec<f32>> = (0..7).map(|k| values(d, (d * 7 + k) as u64)).collect();
            let p = |k: usize| Pieces::split_flat(&v[k], &widths);
            let (s0, m, mn0, g1, g2, q, q1) = (&v[0], p(1), &v[2], p(3), p(4), p(5), p(6));
            let inv = 1.0 / 13.0;
            for (c1, c2) in [(1.0, -1.0), (-1.0, -1.0)] {
                // The per-row definition.
                let (mut s, mut mn) = (s0.clone(), mn0.clone());
                update_diff(&layout, &mut s, &g1, &m, c1, Some((&mut mn[..], &g1, inv)));
                update_diff(&layout, &mut s, &g2, &m, c2, Some((&mut mn[..], &g2, inv)));
                let dq = dot_diff(&layout, &s, &q, &m);
                let branch = |c: f64| {
                    let mut sc = s.clone();
                    update_diff::<f32, f32, f32, f32>(&layout, &mut sc, &q, &m, c, None);
                    dot_diff(&layout, &sc, &q1, &m)
                };
                let ((dp, n1), (dm, n1b)) = (branch(1.0), branch(-1.0));
                assert_eq!(n1, n1b);
                let (mut sb, mut mb) = (vec![0.0f32; d], vec![0.0f32; d]);
                let out = advance(
                    &layout,
                    Some((s0, mn0)),
                    &mut sb,
                    &mut mb,
                    &Advance {
                        apply: &[(&g1, c1), (&g2, c2)],
                        m: &m,
                        inv_n: inv,
                        dot: Some(&q),
                        spec: Some((&q1, 1.0)),
                    },
                );
                assert_eq!((&sb, &mb), (&s, &mn));
                assert_eq!(out.dot, dq);
                assert_eq!(out.spec, (dp, dm, n1));
            }
        }
    }
}
