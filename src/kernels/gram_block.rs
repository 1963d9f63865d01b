//! `grab`'s block pass: the Gram formulation of GRAB.md run on the CPU, with the sequential bits.
//!
//! For a block of b rows, one pass over d forms u_i = <s, z_i>, G_ij = <z_i, z_j> and ||s||^2 (f32
//! values, products exact in f64, sums in f64); a scalar scan then decides the b signs from them
//! (`sign_scan::certified_prefix`), and a second pass applies the decided rows to s and m_next, element
//! by element in row order, with exactly the roundings of the per-row update. The estimates are not the
//! sequential definition's inner products (those see s rounded in f32 after every row, and sum in
//! another order), so the scan keeps a sign only where a rigorous bound on the difference is smaller
//! than the estimate's magnitude; that sign is then the definition's sign. At the first row it cannot
//! certify, the caller takes that row through the exact per-row kernels and starts a new block after it.
//!
//! Why: the per-row and two-row passes sweep s and m_next (read and write) once per one or two rows;
//! here they are swept twice per b rows, and each row is read twice, the second time while the rows of
//! the block are still in the cache. So the memory traffic per gradient element falls from ~18-28
//! bytes to ~8 + 28/b, at the price of b(b+1)/2 + b products per element (cheap at b = 8).

// The AVX-512 variants are the fast ones; the plain variants (same results) are used elsewhere.
#![cfg_attr(not(target_arch = "x86_64"), allow(unused))]

use super::{isa, prefetch_at, Isa, Layout, Pieces, CHUNK, LANES, PARALLEL_MIN_DIM, PREFETCH};
use rayon::prelude::*;

/// Rows per block. More rows save sweeps over the sums but cost (b + 1)(b + 2)/2 products per element
/// and more cache for the block's rows; measured with `cargo bench --bench step_loop` (see
/// `mean_balance::BLOCK_MIN_DIM`).
pub const BLOCK_ROWS: usize = 8;

/// Elements widened into the Gram pass's buffers at a time (9 x 256 f64 = 18 KiB, in L1).
const RUN: usize = 256;

/// Elements per call of the apply pass's inner loop.
const APPLY_RUN: usize = CHUNK;

/// The Gram pass's result for a block of b rows.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockGram {
    /// u[i] = <s, z_i>.
    pub u: Vec<f64>,
    /// gram[i * b + j] = <z_i, z_j>, symmetric.
    pub gram: Vec<f64>,
    /// ||s||^2.
    pub ss: f64,
}

type Lanes = [f64; LANES];

/// Lane sums of a chunk, by tile: z_i . z_j for i, j < 4 (`t00`), i >= 4 > j (`t10`), i, j >= 4
/// (`t11`, indices less 4); s . z_i (`sz`); s . s (`ss`).
#[derive(Default)]
struct Acc {
    t00: [[Lanes; 4]; 4],
    t10: [[Lanes; 4]; 4],
    t11: [[Lanes; 4]; 4],
    sz: [[Lanes; BLOCK_ROWS]; 1],
    ss: [[Lanes; 1]; 1],
}

impl Acc {
    /// Lane sums of z_i . z_j.
    fn zz(&self, i: usize, j: usize) -> Lanes {
        let (i, j) = (i.max(j), i.min(j));
        match (i < 4, j < 4) {
            (true, _) => self.t00[i][j],
            (false, true) => self.t10[i - 4][j],
            (false, false) => self.t11[i - 4][j - 4],
        }
    }
}

type Run = [f64; RUN];

/// Lane products of A x-rows with B y-rows over one run, added to `out` (the plain version of
/// `tile_avx512`).
#[inline(always)]
fn tile<const A: usize, const B: usize>(x: [&Run; A], y: [&Run; B], out: &mut [[Lanes; B]; A]) {
    let mut acc = [[[0.0f64; LANES]; B]; A];
    for o in 0..RUN / LANES {
        let xv: [&Lanes; A] = std::array::from_fn(|a| {
            x[a][o * LANES..(o + 1) * LANES]
                .try_into()
                .expect("LANES-long block")
        });
        let yv: [&Lanes; B] = std::array::from_fn(|b| {
            y[b][o * LANES..(o + 1) * LANES]
                .try_into()
                .expect("LANES-long block")
        });
        for a in 0..A {
            for b in 0..B {
                for l in 0..LANES {
                    acc[a][b][l] += xv[a][l] * yv[b][l];
                }
            }
        }
    }
    for a in 0..A {
        for b in 0..B {
            for l in 0..LANES {
                out[a][b][l] += acc[a][b][l];
            }
        }
    }
}

/// `tile` with AVX-512 intrinsics: the accumulators stay in registers (the compiler's own
/// vectorization of `tile` spilled them, or went scalar for the 1 x 8 tile).
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const A: usize, const B: usize>(
    x: [&Run; A],
    y: [&Run; B],
    out: &mut [[Lanes; B]; A],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_pd(); B]; A];
    let mut xv = [_mm512_setzero_pd(); A];
    let mut yv = [_mm512_setzero_pd(); B];
    for o in (0..RUN).step_by(LANES) {
        for a in 0..A {
            // SAFETY: o + LANES <= RUN, the length of every run buffer.
            xv[a] = _mm512_loadu_pd(x[a].as_ptr().add(o));
        }
        for b in 0..B {
            yv[b] = _mm512_loadu_pd(y[b].as_ptr().add(o));
        }
        for a in 0..A {
            for b in 0..B {
                acc[a][b] = _mm512_fmadd_pd(xv[a], yv[b], acc[a][b]);
            }
        }
    }
    for a in 0..A {
        for b in 0..B {
            let p = out[a][b].as_mut_ptr();
            _mm512_storeu_pd(p, _mm512_add_pd(_mm512_loadu_pd(p), acc[a][b]));
        }
    }
}

/// The tiles of one run: AVX-512 intrinsics or the plain `tile`.
#[inline(always)]
fn tile_any<const A: usize, const B: usize, const X512: bool>(
    x: [&Run; A],
    y: [&Run; B],
    out: &mut [[Lanes; B]; A],
) {
    #[cfg(target_arch = "x86_64")]
    if X512 {
        // SAFETY: X512 is set only on the AVX-512 path (`gram_chunk_avx512`).
        return unsafe { tile_avx512::<A, B>(x, y, out) };
    }
    tile::<A, B>(x, y, out)
}

/// The Gram pass over the elements [lo, hi) (one chunk), into lane sums. Always eight z rows (rows
/// past the block's are zero and add nothing), as three 4 x 4 tiles, s against all eight and s
/// against itself.
#[inline(always)]
fn gram_chunk_body<const X512: bool>(
    layout: &Layout,
    (lo, hi): (usize, usize),
    s: &[f32],
    m: &[f32],
    rows: &[&Pieces<f32>],
    acc: &mut Acc,
) {
    let mut z: Box<[Run; BLOCK_ROWS]> = Box::new([[0.0; RUN]; BLOCK_ROWS]);
    let mut sv: Box<Run> = Box::new([0.0; RUN]);
    for (k, st, en) in layout.overlaps(lo, hi) {
        let f0 = layout.offsets[k] + st;
        let mut t = 0;
        while t < en - st {
            let len = RUN.min(en - st - t);
            let f = f0 + t;
            for (dst, &x) in sv.iter_mut().zip(&s[f..f + len]) {
                *dst = x as f64;
            }
            for (r, row) in rows.iter().enumerate() {
                let piece = row.slices[k];
                // The rows' first read comes from memory: ask for it ahead, as the other loops do.
                for a in (0..len).step_by(16) {
                    prefetch_at(piece.as_ptr(), st + t + a + PREFETCH);
                }
                let g = &piece[st + t..st + t + len];
                // z = g - m rounded in f32, exactly as the per-row kernels form it.
                for ((dst, &gv), &mv) in z[r].iter_mut().zip(g).zip(&m[f..f + len]) {
                    *dst = (gv - mv) as f64;
                }
            }
            if len < RUN {
                // Zeros add nothing to any product.
                sv[len..].fill(0.0);
                for zr in z.iter_mut().take(rows.len()) {
                    zr[len..].fill(0.0);
                }
            }
            let lo4: [&Run; 4] = std::array::from_fn(|r| &z[r]);
            let hi4: [&Run; 4] = std::array::from_fn(|r| &z[4 + r]);
            let all8: [&Run; 8] = std::array::from_fn(|r| &z[r]);
            tile_any::<4, 4, X512>(lo4, lo4, &mut acc.t00);
            if rows.len() > 4 {
                tile_any::<4, 4, X512>(hi4, lo4, &mut acc.t10);
                tile_any::<4, 4, X512>(hi4, hi4, &mut acc.t11);
                tile_any::<1, 8, X512>([&*sv], all8, &mut acc.sz);
            } else {
                let mut sz4: [[Lanes; 4]; 1] = [std::array::from_fn(|r| acc.sz[0][r])];
                tile_any::<1, 4, X512>([&*sv], lo4, &mut sz4);
                acc.sz[0][..4].copy_from_slice(&sz4[0]);
            }
            tile_any::<1, 1, X512>([&*sv], [&*sv], &mut acc.ss);
            t += len;
        }
    }
}

/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gram_chunk_avx512(
    layout: &Layout,
    range: (usize, usize),
    s: &[f32],
    m: &[f32],
    rows: &[&Pieces<f32>],
    acc: &mut Acc,
) {
    gram_chunk_body::<true>(layout, range, s, m, rows, acc)
}

fn gram_chunk(
    layout: &Layout,
    range: (usize, usize),
    s: &[f32],
    m: &[f32],
    rows: &[&Pieces<f32>],
    x512: bool,
) -> Box<Acc> {
    let mut acc = Box::<Acc>::default();
    #[cfg(target_arch = "x86_64")]
    if x512 {
        // SAFETY: x512 is set only when `isa()` detected AVX-512F.
        unsafe { gram_chunk_avx512(layout, range, s, m, rows, &mut acc) };
        return acc;
    }
    gram_chunk_body::<false>(layout, range, s, m, rows, &mut acc);
    acc
}

/// u = Z s, G = Z Z^T and ||s||^2 for the rows of one block, Z the rows centered by `m` (each
/// z = g - m rounded in f32). `s` and `m` are flat d-vectors in the layout's order.
pub fn block_gram(layout: &Layout, s: &[f32], m: &[f32], rows: &[&Pieces<f32>]) -> BlockGram {
    let b = rows.len();
    assert!(
        (1..=BLOCK_ROWS).contains(&b),
        "a block has 1..=BLOCK_ROWS rows"
    );
    let x512 = isa() == Isa::Avx512;
    let chunks = layout.chunks();
    let one = |c: usize| {
        let lo = c * CHUNK;
        gram_chunk(layout, (lo, (lo + CHUNK).min(layout.dim)), s, m, rows, x512)
    };
    // Partials summed in chunk order, so the estimates are the same whatever the threads (they only
    // decide certified signs, which do not depend on them, but reproducible numbers help debugging).
    let partials: Vec<Box<Acc>> = if layout.dim >= PARALLEL_MIN_DIM {
        (0..chunks).into_par_iter().map(one).collect()
    } else {
        (0..chunks).map(one).collect()
    };
    let total = |lanes: &dyn Fn(&Acc) -> Lanes| -> f64 {
        partials.iter().map(|a| lanes(a).iter().sum::<f64>()).sum()
    };
    let mut gram = vec![0.0; b * b];
    for i in 0..b {
        for j in 0..=i {
            let x = total(&|a| a.zz(i, j));
            gram[i * b + j] = x;
            gram[j * b + i] = x;
        }
    }
    BlockGram {
        u: (0..b).map(|i| total(&|a| a.sz[0][i])).collect(),
        gram,
        ss: total(&|a| a.ss[0][0]),
    }
}

/// One run of the apply pass: for each row in order, s = s + c (g - m) and mn = mn + g inv, rounded
/// in f32 exactly as the per-row update (`upd_body`'s f32 path) rounds them. The plain version of
/// `apply_run_avx512`.
fn apply_run_plain(s: &mut [f32], mn: &mut [f32], m: &[f32], rows: &[(&[f32], f32)], inv: f32) {
    let len = s.len();
    let (mn, m) = (&mut mn[..len], &m[..len]);
    for &(g, c) in rows {
        let g = &g[..len];
        for t in 0..len {
            s[t] = s[t] + c * (g[t] - m[t]);
            mn[t] = mn[t] + g[t] * inv;
        }
    }
}

/// `apply_run_plain` with AVX-512 intrinsics, 16 elements at a time through every row: s and mn stay
/// in registers while the rows go by, and the rows are read as parallel sequential streams with a
/// software prefetch ahead (short per-row runs left the hardware prefetcher cold at every page). Same
/// operations in the same order per element, so the same bits.
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn apply_run_avx512(
    s: &mut [f32],
    mn: &mut [f32],
    m: &[f32],
    rows: &[(&[f32], f32)],
    inv: f32,
) {
    use std::arch::x86_64::*;
    let len = s.len();
    assert!(mn.len() >= len && m.len() >= len && rows.iter().all(|(g, _)| g.len() >= len));
    let body = len - len % 16;
    let invv = _mm512_set1_ps(inv);
    let mut coef = [_mm512_setzero_ps(); BLOCK_ROWS];
    let mut gp = [std::ptr::null::<f32>(); BLOCK_ROWS];
    for (r, &(g, c)) in rows.iter().enumerate() {
        coef[r] = _mm512_set1_ps(c);
        gp[r] = g.as_ptr();
    }
    let nr = rows.len();
    let (sp, mnp, mp) = (s.as_mut_ptr(), mn.as_mut_ptr(), m.as_ptr());
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= len, and every operand holds len elements (asserted above).
        let mv = _mm512_loadu_ps(mp.add(i));
        let mut sv = _mm512_loadu_ps(sp.add(i));
        let mut nv = _mm512_loadu_ps(mnp.add(i));
        for r in 0..nr {
            prefetch_at(gp[r], i + PREFETCH);
            let g = _mm512_loadu_ps(gp[r].add(i));
            sv = _mm512_add_ps(sv, _mm512_mul_ps(coef[r], _mm512_sub_ps(g, mv)));
            nv = _mm512_add_ps(nv, _mm512_mul_ps(g, invv));
        }
        _mm512_storeu_ps(sp.add(i), sv);
        _mm512_storeu_ps(mnp.add(i), nv);
        i += 16;
    }
    apply_run_plain(
        &mut s[body..],
        &mut mn[body..],
        &m[body..],
        &tail(rows, body),
        inv,
    );
}

/// The rows from element `from` on.
#[cfg(target_arch = "x86_64")]
fn tail<'a>(rows: &[(&'a [f32], f32)], from: usize) -> Vec<(&'a [f32], f32)> {
    rows.iter().map(|&(g, c)| (&g[from..], c)).collect()
}

fn apply_run(
    x512: bool,
    s: &mut [f32],
    mn: &mut [f32],
    m: &[f32],
    rows: &[(&[f32], f32)],
    inv: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if x512 {
        // SAFETY: x512 is set only when `isa()` detected AVX-512F.
        return unsafe { apply_run_avx512(s, mn, m, rows, inv) };
    }
    apply_run_plain(s, mn, m, rows, inv)
}

/// Apply the decided rows of a block, in order: s += coef_r (g_r - m) and m_next += g_r / n, each
/// element rounded in f32 after every row, as the per-row update does. `src` = Some((s0, mn0)) reads
/// the old sums from there and writes the new ones into `s` and `mn` (the first rows of a step);
/// None updates `s` and `mn` in place.
pub fn block_apply(
    layout: &Layout,
    src: Option<(&[f32], &[f32])>,
    (s, mn): (&mut [f32], &mut [f32]),
    m: &[f32],
    rows: &[(&Pieces<f32>, f64)],
    inv_n: f64,
) {
    let x512 = isa() == Isa::Avx512;
    let inv = inv_n as f32;
    let work = |c: usize, sc: &mut [f32], mc: &mut [f32]| {
        let lo = c * CHUNK;
        let hi = lo + sc.len();
        let mut gs: Vec<(&[f32], f32)> = Vec::with_capacity(rows.len());
        for (k, st, en) in layout.overlaps(lo, hi) {
            let rel = layout.offsets[k] + st - lo;
            let mut t = 0;
            while t < en - st {
                let len = APPLY_RUN.min(en - st - t);
                let (a, f) = (rel + t, lo + rel + t);
                let (sr, mr) = (&mut sc[a..a + len], &mut mc[a..a + len]);
                if let Some((s0, m0)) = src {
                    sr.copy_from_slice(&s0[f..f + len]);
                    mr.copy_from_slice(&m0[f..f + len]);
                }
                gs.clear();
                gs.extend(
                    rows.iter()
                        .map(|(p, c)| (&p.slices[k][st + t..st + t + len], *c as f32)),
                );
                apply_run(x512, sr, mr, &m[f..f + len], &gs, inv);
                t += len;
            }
        }
    };
    if layout.dim >= PARALLEL_MIN_DIM {
        s.par_chunks_mut(CHUNK)
            .zip(mn.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, (sc, mc))| work(c, sc, mc));
    } else {
        for (c, (sc, mc)) in s.chunks_mut(CHUNK).zip(mn.chunks_mut(CHUNK)).enumerate() {
            work(c, sc, mc);
        }
    }
}
