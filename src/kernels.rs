//! The d-dimensional work of balancing: the centered inner product <s, a - b> (with ||a - b||^2), and the
//! updates s += c (a - b) and m_next += g / n. Operands are given as pieces aligned to the gradient
//! segments, so nothing is concatenated.
//!
//! Reduction order is a function of the flat index alone: fixed chunks of CHUNK elements, eight f64
//! lanes by (flat index mod 8) inside a chunk, chunk partials summed in chunk order. So the result is
//! the same bit for bit whatever the number of threads, whether rows come batched or one by one, and
//! however the d coordinates are split into segments.

use crate::elem::{GradElem, StateElem};
use rayon::prelude::*;

/// Elements per reduction chunk (also the unit of parallel work).
pub const CHUNK: usize = 1 << 14;
/// Below this many coordinates, one thread is faster than rayon's fork/join.
pub const PARALLEL_MIN_DIM: usize = 1 << 17;

const LANES: usize = 8;

/// One operand of a kernel as per-segment pieces. All operands of one call share the same segment
/// widths; `offsets[k]` is the flat position of piece k.
pub struct Pieces<'a, T> {
    pub slices: Vec<&'a [T]>,
}

impl<'a, T> Pieces<'a, T> {
    /// Cut a flat d-vector into pieces of the given widths.
    pub fn split_flat(flat: &'a [T], widths: &[usize]) -> Self {
        let mut slices = Vec::with_capacity(widths.len());
        let mut o = 0;
        for &w in widths {
            slices.push(&flat[o..o + w]);
            o += w;
        }
        Pieces { slices }
    }
}

/// Segment layout: widths and flat offsets.
#[derive(Debug, Clone)]
pub struct Layout {
    pub widths: Vec<usize>,
    pub offsets: Vec<usize>,
    pub dim: usize,
}

impl Layout {
    pub fn new(widths: Vec<usize>) -> Self {
        let mut offsets = Vec::with_capacity(widths.len());
        let mut o = 0;
        for &w in &widths {
            offsets.push(o);
            o += w;
        }
        Layout {
            widths,
            offsets,
            dim: o,
        }
    }

    /// For the chunk [lo, hi): (piece k, start within piece, end within piece) of each overlapping piece.
    fn overlaps(&self, lo: usize, hi: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        self.offsets
            .iter()
            .zip(&self.widths)
            .enumerate()
            .filter_map(move |(k, (&o, &w))| {
                let start = lo.max(o);
                let end = hi.min(o + w);
                (start < end).then(|| (k, start - o, end - o))
            })
    }

    fn chunks(&self) -> usize {
        self.dim.div_ceil(CHUNK)
    }
}

/// Per-lane partial sums: (<s, z> lanes, ||z||^2 lanes).
type Acc = ([f64; LANES], [f64; LANES]);

/// The instruction set the element loops run with, detected once at run time. The loops never use
/// fused multiply-add (Rust does not contract `a * b + c`), so every variant computes the same IEEE
/// operations in the same order: the choice changes speed only, never a bit of the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

/// The widest instruction set this CPU offers to the kernels.
pub fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

#[inline(always)]
fn block<T>(x: &[T], o: usize) -> &[T; LANES] {
    x[o..o + LANES]
        .try_into()
        .expect("a block is LANES long by construction")
}

/// Number of leading elements before the flat index `base + j` reaches a lane-0 position.
#[inline(always)]
fn head_len(base: usize, len: usize) -> usize {
    ((LANES - base % LANES) % LANES).min(len)
}

/// acc += (<s, a - b>, ||a - b||^2) over one piece, lane = flat index mod LANES.
#[inline(always)]
fn dot_body<S: GradElem, A: GradElem, B: GradElem>(
    base: usize,
    s: &[S],
    a: &[A],
    b: &[B],
    acc: &mut Acc,
) {
    let len = s.len();
    let (a, b) = (&a[..len], &b[..len]);
    let (mut dot, mut nrm) = *acc;
    let head = head_len(base, len);
    let body_end = head + (len - head) / LANES * LANES;
    let one = |j: usize, dot: &mut [f64; LANES], nrm: &mut [f64; LANES]| {
        let l = (base + j) % LANES;
        let z = a[j].to_f64() - b[j].to_f64();
        dot[l] += s[j].to_f64() * z;
        nrm[l] += z * z;
    };
    for j in 0..head {
        one(j, &mut dot, &mut nrm);
    }
    let mut o = head;
    while o < body_end {
        let (sc, ac, bc) = (block(s, o), block(a, o), block(b, o));
        for l in 0..LANES {
            let z = ac[l].to_f64() - bc[l].to_f64();
            dot[l] += sc[l].to_f64() * z;
            nrm[l] += z * z;
        }
        o += LANES;
    }
    for j in body_end..len {
        one(j, &mut dot, &mut nrm);
    }
    *acc = (dot, nrm);
}

/// Operands of one piece of the update pass (all sliced to the piece's range).
struct UpdPiece<'x, S, A, B, G, C, D> {
    base: usize,
    s: &'x mut [S],
    a: &'x [A],
    b: &'x [B],
    coef: f64,
    /// (m_next, g, 1/n) when MEAN.
    m: &'x mut [S],
    g: &'x [G],
    inv_n: f64,
    /// (c, d) of the next dot when DOT.
    c: &'x [C],
    d: &'x [D],
    /// When given, the old values of s (and m) are read from here instead of from s (and m) itself:
    /// the update writes into a second buffer and leaves the source untouched.
    src: Option<(&'x [S], &'x [S])>,
}

/// Elements per sub-block of the fused pass: small enough that the sub-block of every operand stays in
/// L1 between the update loop and the dot loop that re-reads it.
const SUB: usize = 512;

/// s += coef (a - b); if MEAN, m += g inv_n; if DOT, acc += (<s_new, c - d>, ||c - d||^2).
/// Done sub-block by sub-block as plain element loops (which the compiler vectorizes) followed by the
/// lane-ordered dot, so memory is walked once and the per-lane accumulation order is unchanged.
#[inline(always)]
fn upd_body<
    S: StateElem,
    A: GradElem,
    B: GradElem,
    G: GradElem,
    C: GradElem,
    D: GradElem,
    const MEAN: bool,
    const DOT: bool,
>(
    p: UpdPiece<S, A, B, G, C, D>,
    acc: &mut Acc,
) {
    let UpdPiece {
        base,
        s,
        a,
        b,
        coef,
        m,
        g,
        inv_n,
        c,
        d,
        src,
    } = p;
    let len = s.len();
    let mut o = 0;
    while o < len {
        let e = (o + SUB).min(len);
        match src {
            Some((s0, _)) => {
                for (((x, x0), ai), bi) in s[o..e]
                    .iter_mut()
                    .zip(&s0[o..e])
                    .zip(&a[o..e])
                    .zip(&b[o..e])
                {
                    *x = S::from_f64(x0.to_f64() + coef * (ai.to_f64() - bi.to_f64()));
                }
            }
            None => {
                for ((x, ai), bi) in s[o..e].iter_mut().zip(&a[o..e]).zip(&b[o..e]) {
                    *x = S::from_f64(x.to_f64() + coef * (ai.to_f64() - bi.to_f64()));
                }
            }
        }
        if MEAN {
            match src {
                Some((_, m0)) => {
                    for ((x, x0), gi) in m[o..e].iter_mut().zip(&m0[o..e]).zip(&g[o..e]) {
                        *x = S::from_f64(x0.to_f64() + gi.to_f64() * inv_n);
                    }
                }
                None => {
                    for (x, gi) in m[o..e].iter_mut().zip(&g[o..e]) {
                        *x = S::from_f64(x.to_f64() + gi.to_f64() * inv_n);
                    }
                }
            }
        }
        if DOT {
            dot_body(base + o, &s[o..e], &c[o..e], &d[o..e], acc);
        }
        o = e;
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    //! The same element loops compiled for wider vector units. Callers check the feature first.
    use super::*;

    /// # Safety
    /// The CPU must support AVX-512F (checked by `isa()`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_avx512<S: GradElem, A: GradElem, B: GradElem>(
        base: usize,
        s: &[S],
        a: &[A],
        b: &[B],
        acc: &mut Acc,
    ) {
        dot_body(base, s, a, b, acc)
    }

    /// # Safety
    /// The CPU must support AVX2 (checked by `isa()`).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_avx2<S: GradElem, A: GradElem, B: GradElem>(
        base: usize,
        s: &[S],
        a: &[A],
        b: &[B],
        acc: &mut Acc,
    ) {
        dot_body(base, s, a, b, acc)
    }

    /// # Safety
    /// The CPU must support AVX-512F (checked by `isa()`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn upd_avx512<
        S: StateElem,
        A: GradElem,
        B: GradElem,
        G: GradElem,
        C: GradElem,
        D: GradElem,
        const MEAN: bool,
        const DOT: bool,
    >(
        p: UpdPiece<S, A, B, G, C, D>,
        acc: &mut Acc,
    ) {
        upd_body::<S, A, B, G, C, D, MEAN, DOT>(p, acc)
    }

    /// # Safety
    /// The CPU must support AVX2 (checked by `isa()`).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn upd_avx2<
        S: StateElem,
        A: GradElem,
        B: GradElem,
        G: GradElem,
        C: GradElem,
        D: GradElem,
        const MEAN: bool,
        const DOT: bool,
    >(
        p: UpdPiece<S, A, B, G, C, D>,
        acc: &mut Acc,
    ) {
        upd_body::<S, A, B, G, C, D, MEAN, DOT>(p, acc)
    }
}

#[inline]
fn dot_piece<S: GradElem, A: GradElem, B: GradElem>(
    isa: Isa,
    base: usize,
    s: &[S],
    a: &[A],
    b: &[B],
    acc: &mut Acc,
) {
    match isa {
        // SAFETY: `isa` comes from `isa()`, which returns Avx512 only when the CPU reports avx512f.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { simd::dot_avx512(base, s, a, b, acc) },
        // SAFETY: `isa` comes from `isa()`, which returns Avx2 only when the CPU reports avx2.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { simd::dot_avx2(base, s, a, b, acc) },
        _ => dot_body(base, s, a, b, acc),
    }
}

#[inline]
fn upd_piece<
    S: StateElem,
    A: GradElem,
    B: GradElem,
    G: GradElem,
    C: GradElem,
    D: GradElem,
    const MEAN: bool,
    const DOT: bool,
>(
    isa: Isa,
    p: UpdPiece<S, A, B, G, C, D>,
    acc: &mut Acc,
) {
    match isa {
        // SAFETY: `isa` comes from `isa()`, which returns Avx512 only when the CPU reports avx512f.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { simd::upd_avx512::<S, A, B, G, C, D, MEAN, DOT>(p, acc) },
        // SAFETY: `isa` comes from `isa()`, which returns Avx2 only when the CPU reports avx2.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { simd::upd_avx2::<S, A, B, G, C, D, MEAN, DOT>(p, acc) },
        _ => upd_body::<S, A, B, G, C, D, MEAN, DOT>(p, acc),
    }
}

fn fold_lanes(acc: &[f64; LANES]) -> f64 {
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

const ZERO: Acc = ([0.0; LANES], [0.0; LANES]);

fn chunk_dot<S: GradElem, A: GradElem, B: GradElem>(
    isa: Isa,
    layout: &Layout,
    c: usize,
    s: &[S],
    a: &Pieces<A>,
    b: &Pieces<B>,
) -> (f64, f64) {
    let lo = c * CHUNK;
    let hi = (lo + CHUNK).min(layout.dim);
    let mut acc = ZERO;
    for (k, st, en) in layout.overlaps(lo, hi) {
        let base = layout.offsets[k] + st;
        dot_piece(
            isa,
            base,
            &s[base..base + (en - st)],
            &a.slices[k][st..en],
            &b.slices[k][st..en],
            &mut acc,
        );
    }
    (fold_lanes(&acc.0), fold_lanes(&acc.1))
}

/// (<s, a - b>, ||a - b||^2), accumulated in f64 in the fixed order described above.
pub fn dot_diff<S: StateElem, A: GradElem, B: GradElem>(
    layout: &Layout,
    s: &[S],
    a: &Pieces<A>,
    b: &Pieces<B>,
) -> (f64, f64) {
    let isa = isa();
    let chunks = layout.chunks();
    let mut dot = 0.0;
    let mut norm = 0.0;
    if layout.dim >= PARALLEL_MIN_DIM {
        let partials: Vec<(f64, f64)> = (0..chunks)
            .into_par_iter()
            .map(|c| chunk_dot(isa, layout, c, s, a, b))
            .collect();
        for (d, n) in partials {
            dot += d;
            norm += n;
        }
    } else {
        for c in 0..chunks {
            let (d, n) = chunk_dot(isa, layout, c, s, a, b);
            dot += d;
            norm += n;
        }
    }
    (dot, norm)
}

/// The update pass, optionally fused with the next dot product (see `update_then_dot`).
#[allow(clippy::too_many_arguments)]
fn run_update<
    S: StateElem,
    A: GradElem,
    B: GradElem,
    G: GradElem,
    C: GradElem,
    D: GradElem,
    const MEAN: bool,
    const DOT: bool,
>(
    layout: &Layout,
    s: &mut [S],
    a: &Pieces<A>,
    b: &Pieces<B>,
    coef: f64,
    mean: Option<(&mut [S], &Pieces<G>, f64)>,
    next: Option<(&Pieces<C>, &Pieces<D>)>,
    src: Option<(&[S], &[S])>,
) -> (f64, f64) {
    let isa = isa();
    let (m_next, g, inv_n) = match mean {
        Some((m, g, inv_n)) => (Some(m), Some(g), inv_n),
        None => (None, None, 0.0),
    };
    let work = |c: usize, sc: &mut [S], mc: &mut [S]| -> (f64, f64) {
        let lo = c * CHUNK;
        let hi = lo + sc.len();
        let mut acc = ZERO;
        for (k, st, en) in layout.overlaps(lo, hi) {
            let rel = layout.offsets[k] + st - lo;
            let len = en - st;
            let p = UpdPiece {
                base: lo + rel,
                s: &mut sc[rel..rel + len],
                a: &a.slices[k][st..en],
                b: &b.slices[k][st..en],
                coef,
                m: if MEAN {
                    &mut mc[rel..rel + len]
                } else {
                    &mut []
                },
                g: g.map_or(&[][..], |g| &g.slices[k][st..en]),
                inv_n,
                c: next.map_or(&[][..], |(c, _)| &c.slices[k][st..en]),
                d: next.map_or(&[][..], |(_, d)| &d.slices[k][st..en]),
                src: src.map(|(s0, m0)| {
                    let f = lo + rel;
                    (
                        &s0[f..f + len],
                        if MEAN { &m0[f..f + len] } else { &[][..] },
                    )
                }),
            };
            upd_piece::<S, A, B, G, C, D, MEAN, DOT>(isa, p, &mut acc);
        }
        (fold_lanes(&acc.0), fold_lanes(&acc.1))
    };
    let mut dot = 0.0;
    let mut norm = 0.0;
    if layout.dim >= PARALLEL_MIN_DIM {
        let partials: Vec<(f64, f64)> = match m_next {
            Some(m) => s
                .par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .enumerate()
                .map(|(c, (sc, mc))| work(c, sc, mc))
                .collect(),
            None => s
                .par_chunks_mut(CHUNK)
                .enumerate()
                .map(|(c, sc)| work(c, sc, &mut []))
                .collect(),
        };
        for (d, n) in partials {
            dot += d;
            norm += n;
        }
    } else {
        let mut add = |(d, n): (f64, f64)| {
            dot += d;
            norm += n;
        };
        match m_next {
            Some(m) => {
                for (c, (sc, mc)) in s.chunks_mut(CHUNK).zip(m.chunks_mut(CHUNK)).enumerate() {
                    add(work(c, sc, mc));
                }
            }
            None => {
                for (c, sc) in s.chunks_mut(CHUNK).enumerate() {
                    add(work(c, sc, &mut []));
                }
            }
        }
    }
    (dot, norm)
}

/// s += coef * (a - b); and, when `mean` is given as (m_next, g, 1/n), m_next += g / n in the same pass.
pub fn update_diff<S: StateElem, A: GradElem, B: GradElem, G: GradElem>(
    layout: &Layout,
    s: &mut [S],
    a: &Pieces<A>,
    b: &Pieces<B>,
    coef: f64,
    mean: Option<(&mut [S], &Pieces<G>, f64)>,
) {
    if mean.is_some() {
        run_update::<S, A, B, G, A, B, true, false>(layout, s, a, b, coef, mean, None, None);
    } else {
        run_update::<S, A, B, G, A, B, false, false>(layout, s, a, b, coef, mean, None, None);
    }
}

/// One pass over memory for two steps of the sequential rule: `update_diff(s, a, b, coef, mean)`, then
/// `dot_diff(s, c, d)` on the updated s. Each element of s is read once, updated, and used for the next
/// dot while it is still in a register, so the result is bit for bit that of the two separate calls
/// (same per-element operations, same lanes, same chunk order).
#[allow(clippy::too_many_arguments)]
pub fn update_then_dot<
    S: StateElem,
    A: GradElem,
    B: GradElem,
    G: GradElem,
    C: GradElem,
    D: GradElem,
>(
    layout: &Layout,
    s: &mut [S],
    a: &Pieces<A>,
    b: &Pieces<B>,
    coef: f64,
    mean: Option<(&mut [S], &Pieces<G>, f64)>,
    c: &Pieces<C>,
    d: &Pieces<D>,
) -> (f64, f64) {
    if mean.is_some() {
        run_update::<S, A, B, G, C, D, true, true>(layout, s, a, b, coef, mean, Some((c, d)), None)
    } else {
        run_update::<S, A, B, G, C, D, false, true>(layout, s, a, b, coef, mean, Some((c, d)), None)
    }
}

/// `update_diff` / `update_then_dot` reading the old running sums from `src` = (s0, m0) and writing
/// the updated ones into `s` (and the mean's m_next): the same values bit for bit, but the source is
/// left untouched, so a step that fails later can be dropped without a snapshot copy (the first row of
/// a step moves the sums into a second buffer; the buffers are swapped when the step succeeds).
/// `next` = Some((c, d)) fuses the next dot product as `update_then_dot` does; m0 is ignored (may be
/// empty) when `mean` is None.
#[allow(clippy::too_many_arguments)]
pub fn update_from<
    S: StateElem,
    A: GradElem,
    B: GradElem,
    G: GradElem,
    C: GradElem,
    D: GradElem,
>(
    layout: &Layout,
    src: (&[S], &[S]),
    s: &mut [S],
    a: &Pieces<A>,
    b: &Pieces<B>,
    coef: f64,
    mean: Option<(&mut [S], &Pieces<G>, f64)>,
    next: Option<(&Pieces<C>, &Pieces<D>)>,
) -> Option<(f64, f64)> {
    let src = Some(src);
    match (mean.is_some(), next.is_some()) {
        (true, true) => Some(run_update::<S, A, B, G, C, D, true, true>(
            layout, s, a, b, coef, mean, next, src,
        )),
        (false, true) => Some(run_update::<S, A, B, G, C, D, false, true>(
            layout, s, a, b, coef, mean, next, src,
        )),
        (true, false) => {
            run_update::<S, A, B, G, C, D, true, false>(layout, s, a, b, coef, mean, None, src);
            None
        }
        (false, false) => {
            run_update::<S, A, B, G, C, D, false, false>(layout, s, a, b, coef, mean, None, src);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(s: &[f64], a: &[f64], b: &[f64]) -> (f64, f64) {
        let mut d = 0.0;
        let mut n = 0.0;
        for i in 0..s.len() {
            let z = a[i] - b[i];
            d += s[i] * z;
            n += z * z;
        }
        (d, n)
    }

    #[test]
    fn dot_diff_is_segmentation_invariant_and_close_to_naive() {
        let d = 3 * CHUNK + 37;
        let s: Vec<f64> = (0..d)
            .map(|i| ((i * 7919) % 113) as f64 / 50.0 - 1.0)
            .collect();
        let a: Vec<f64> = (0..d)
            .map(|i| ((i * 104729) % 97) as f64 / 40.0 - 1.2)
            .collect();
        let b: Vec<f64> = (0..d).map(|i| ((i * 31) % 17) as f64 / 9.0).collect();
        let one = Layout::new(vec![d]);
        let r1 = dot_diff(
            &one,
            &s,
            &Pieces {
                slices: vec![&a[..]],
            },
            &Pieces {
                slices: vec![&b[..]],
            },
        );
        let widths = vec![
            5,
            CHUNK - 3,
            1,
            2 * CHUNK,
            d - 5 - (CHUNK - 3) - 1 - 2 * CHUNK,
        ];
        let many = Layout::new(widths.clone());
        let r2 = dot_diff(
            &many,
            &s,
            &Pieces::split_flat(&a, &widths),
            &Pieces::split_flat(&b, &widths),
        );
        assert_eq!(r1, r2);
        let r3 = naive(&s, &a, &b);
        assert!((r1.0 - r3.0).abs() < 1e-9 * r3.1.max(1.0));
        assert!((r1.1 - r3.1).abs() < 1e-9 * r3.1);
    }

    fn data(d: usize, salt: usize) -> Vec<f32> {
        (0..d)
            .map(|i| (((i + salt) * 2654435761) % 1009) as f32 / 300.0 - 1.7)
            .collect()
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        // Odd bases and lengths exercise the head, body and tail of the lane loops.
        let here = isa();
        for (base, len) in [(0, 1000), (3, 1001), (7, 5), (13, 64)] {
            let s = data(len, 1);
            let (a, b, c, e) = (data(len, 2), data(len, 3), data(len, 4), data(len, 5));
            let mut r1 = ZERO;
            let mut r2 = ZERO;
            dot_piece(Isa::Scalar, base, &s, &a, &b, &mut r1);
            dot_piece(here, base, &s, &a, &b, &mut r2);
            assert_eq!(r1, r2);
            let run = |isa: Isa| {
                let mut s1 = s.clone();
                let mut m1 = data(len, 6);
                let mut acc = ZERO;
                let p = UpdPiece {
                    base,
                    s: &mut s1[..],
                    a: &a[..],
                    b: &b[..],
                    coef: -0.75,
                    m: &mut m1[..],
                    g: &a[..],
                    inv_n: 1.0 / 3.0,
                    c: &c[..],
                    d: &e[..],
                    src: None,
                };
                upd_piece::<f32, f32, f32, f32, f32, f32, true, true>(isa, p, &mut acc);
                (s1, m1, acc)
            };
            assert_eq!(run(Isa::Scalar), run(here));
        }
    }

    #[test]
    fn fused_update_then_dot_equals_the_two_separate_passes() {
        for d in [37, 3 * CHUNK + 11, PARALLEL_MIN_DIM + 5] {
            let widths = vec![5, d / 3, d - 5 - d / 3];
            let layout = Layout::new(widths.clone());
            let (a, m, c) = (data(d, 1), data(d, 2), data(d, 3));
            let (ap, mp, cp) = (
                Pieces::split_flat(&a, &widths),
                Pieces::split_flat(&m, &widths),
                Pieces::split_flat(&c, &widths),
            );
            let s0 = data(d, 4);
            let mn0 = data(d, 5);
            let (mut s1, mut mn1) = (s0.clone(), mn0.clone());
            update_diff(
                &layout,
                &mut s1,
                &ap,
                &mp,
                -1.0,
                Some((&mut mn1[..], &ap, 0.01)),
            );
            let sep = dot_diff(&layout, &s1, &cp, &mp);
            let (mut s2, mut mn2) = (s0.clone(), mn0.clone());
            let fused = update_then_dot(
                &layout,
                &mut s2,
                &ap,
                &mp,
                -1.0,
                Some((&mut mn2[..], &ap, 0.01)),
                &cp,
                &mp,
            );
            assert_eq!(sep, fused);
            assert_eq!(s1, s2);
            assert_eq!(mn1, mn2);
            // Without the mean update (pair balance).
            let mut s3 = s0.clone();
            update_diff::<f32, f32, f32, f32>(&layout, &mut s3, &ap, &cp, 1.0, None);
            let sep = dot_diff(&layout, &s3, &mp, &ap);
            let mut s4 = s0.clone();
            let fused = update_then_dot::<f32, f32, f32, f32, f32, f32>(
                &layout, &mut s4, &ap, &cp, 1.0, None, &mp, &ap,
            );
            assert_eq!(sep, fused);
            assert_eq!(s3, s4);
        }
    }

    #[test]
    fn update_from_equals_in_place_and_leaves_the_source() {
        let d = 3 * CHUNK + 11;
        let widths = vec![7, d - 7];
        let layout = Layout::new(widths.clone());
        let (a, m, c) = (data(d, 1), data(d, 2), data(d, 3));
        let (ap, mp, cp) = (
            Pieces::split_flat(&a, &widths),
            Pieces::split_flat(&m, &widths),
            Pieces::split_flat(&c, &widths),
        );
        let (s0, mn0) = (data(d, 4), data(d, 5));
        let (mut s1, mut mn1) = (s0.clone(), mn0.clone());
        let r1 = update_then_dot(
            &layout,
            &mut s1,
            &ap,
            &mp,
            1.0,
            Some((&mut mn1[..], &ap, 0.5)),
            &cp,
            &mp,
        );
        let (mut s2, mut mn2) = (vec![0.0f32; d], vec![0.0f32; d]);
        let r2 = update_from(
            &layout,
            (&s0, &mn0),
            &mut s2,
            &ap,
            &mp,
            1.0,
            Some((&mut mn2[..], &ap, 0.5)),
            Some((&cp, &mp)),
        );
        assert_eq!(Some(r1), r2);
        assert_eq!((s1, mn1), (s2, mn2));
        assert_eq!((data(d, 4), data(d, 5)), (s0, mn0));
    }
}
