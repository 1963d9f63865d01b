//! The d-dimensional work of balancing: the centered inner product <s, a - b> (with ||a - b||^2), and the
//! updates s += c (a - b) and m_next += g / n. Operands are given as pieces aligned to the gradient
//! segments, so nothing is concatenated.
//!
//! Reduction order is a function of the flat index alone: fixed chunks of CHUNK elements, eight f64
//! lanes by (flat index mod 8) inside a chunk, chunk partials summed in chunk order. So the result is
//! the same bit for bit whatever the number of threads, whether rows come batched or one by one, and
//! however the d coordinates are split into segments.
//!
//! Elementwise arithmetic (see `elem`): with float32 state and gradients of at most 32 bits, z = a - b,
//! s + coef z and m + g / n are rounded in f32 and only the dot products are formed in f64; otherwise
//! everything is f64. On AVX-512 the all-f32 update runs as hand-written intrinsics (`simd::
//! upd_f32_avx512`) doing the same operations in the same order, so the instruction set never changes
//! a bit of the result.

use crate::elem::{GradElem, StateElem};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};

pub mod advance;
pub use advance::{advance, Advance, Advanced};

/// Elements per reduction chunk (also the unit of parallel work).
pub const CHUNK: usize = 1 << 14;
/// Below this many coordinates a pass runs on one thread: two chunks and more are split between
/// threads. Measured with the float32 loops run from a worker (see `on_workers`; `cargo bench --bench
/// step_loop`, 2 cores, load ~1, B = 64), two threads against one: `grab` at d = 30,000 even (below
/// the threshold), 45,000 1.25x, 62,006 (LeNet-5) 1.3-1.5x; `pair` at 45,000 1.3x, 1e5 2.4x. Results
/// do not depend on it: the reduction order is fixed by CHUNK alone.
pub const PARALLEL_MIN_DIM: usize = 2 * CHUNK;

/// The process that first used rayon's thread pools. A process forked from it afterwards (a
/// DataLoader worker, Lightning's `ddp_fork`, a notebook's `ddp_notebook`) inherits pools whose threads
/// did not survive the fork, and a job sent to them would never run: there every pass runs on the
/// calling thread instead. The results are the same (passes are chunked, and their partial sums added,
/// the same way on one thread as on many).
static POOL_PID: AtomicU32 = AtomicU32::new(0);

/// Whether this process may use rayon's thread pools (see `POOL_PID`); the first caller claims them.
pub fn threads_usable() -> bool {
    let me = std::process::id();
    match POOL_PID.compare_exchange(0, me, AtomicOrdering::Relaxed, AtomicOrdering::Relaxed) {
        Ok(_) => true,
        Err(owner) => owner == me,
    }
}

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

/// Whether every operand type is f32 (the AVX-512 f32 loop then applies).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn all_f32<S: 'static, A: 'static, B: 'static, G: 'static, C: 'static, D: 'static>() -> bool {
    use std::any::TypeId;
    let f = TypeId::of::<f32>();
    [
        TypeId::of::<S>(),
        TypeId::of::<A>(),
        TypeId::of::<B>(),
        TypeId::of::<G>(),
        TypeId::of::<C>(),
        TypeId::of::<D>(),
    ]
    .iter()
    .all(|&x| x == f)
}

/// Number of leading elements before the flat index `base + j` reaches a lane-0 position.
#[inline(always)]
fn head_len(base: usize, len: usize) -> usize {
    ((LANES - base % LANES) % LANES).min(len)
}

/// Whether the difference of an `A` and a `B` next to a state of type `S` is rounded in f32 (see the
/// doc of `elem`): all three at most f32 wide. A compile-time constant for each instantiation.
#[inline(always)]
fn narrow<S: GradElem, A: GradElem, B: GradElem>() -> bool {
    S::NARROW && A::NARROW && B::NARROW
}

/// z = a - b as the kernels define it: rounded to f32 when `n32`, else computed in f64.
#[inline(always)]
fn diff<A: GradElem, B: GradElem>(n32: bool, a: A, b: B) -> f64 {
    if n32 {
        (a.to_f32() - b.to_f32()) as f64
    } else {
        a.to_f64() - b.to_f64()
    }
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
    let n32 = narrow::<S, A, B>();
    let len = s.len();
    let (a, b) = (&a[..len], &b[..len]);
    let (mut dot, mut nrm) = *acc;
    let head = head_len(base, len);
    let body_end = head + (len - head) / LANES * LANES;
    let one = |j: usize, dot: &mut [f64; LANES], nrm: &mut [f64; LANES]| {
        let l = (base + j) % LANES;
        let z = diff(n32, a[j], b[j]);
        dot[l] += s[j].to_f64() * z;
        nrm[l] += z * z;
    };
    for j in 0..head {
        one(j, &mut dot, &mut nrm);
    }
    let mut o = head;
    while o < body_end {
        prefetch(s, o + PREFETCH);
        prefetch(a, o + PREFETCH);
        prefetch(b, o + PREFETCH);
        let (sc, ac, bc) = (block(s, o), block(a, o), block(b, o));
        for l in 0..LANES {
            let z = diff(n32, ac[l], bc[l]);
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

/// How far ahead (in elements) the element loops prefetch their input streams. The hardware prefetcher
/// alone left the loops waiting on the gradient stream (a third of the samples of `perf annotate` sat
/// on its load); prefetching every input 512 elements ahead gave 1.2-1.4x on 2 shared cores.
const PREFETCH: usize = 512;

/// A hint to fetch the cache line holding x[i] (nothing when i is out of range). No effect on results.
#[inline(always)]
fn prefetch<T>(x: &[T], i: usize) {
    prefetch_at(x.as_ptr(), i)
}

/// `prefetch` for a raw pointer (the intrinsic loops).
#[inline(always)]
fn prefetch_at<T>(p: *const T, i: usize) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, i); // no prefetch instruction used elsewhere
                    // A prefetch never faults, so past the end it is merely wasted: no bounds check in the loops.
                    // `wrapping_add` forms the address without claiming it is in bounds.
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch only hints the cache; the address is never dereferenced.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            p.wrapping_add(i).cast::<i8>(),
        )
    }
}

/// Prefetch the first PREFETCH elements (at most `len`) of x, one request per 64-byte line.
#[inline(always)]
fn prefetch_start<T>(x: &[T], len: usize) {
    let line = (64 / std::mem::size_of::<T>().max(1)).max(1);
    let mut q = 0;
    while q < len.min(PREFETCH) {
        prefetch(x, q);
        q += line;
    }
}

/// The old values of one block of a running sum: from the source buffer when there is one, else
/// from the buffer about to be overwritten.
#[inline(always)]
fn old_block<S: StateElem>(src: Option<&[S]>, dst: &[S], o: usize) -> [S; LANES] {
    *match src {
        Some(s0) => block(s0, o),
        None => block(dst, o),
    }
}

/// The precision the elementwise updates are rounded in (see the doc of `elem`): f32 or f64.
trait Work:
    Copy + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> + std::ops::Mul<Output = Self>
{
    fn of<T: GradElem>(x: T) -> Self;
    fn to_state<S: StateElem>(self) -> S;
    fn wide(self) -> f64;
}

impl Work for f32 {
    #[inline(always)]
    fn of<T: GradElem>(x: T) -> Self {
        x.to_f32()
    }
    #[inline(always)]
    fn to_state<S: StateElem>(self) -> S {
        S::from_f32(self)
    }
    #[inline(always)]
    fn wide(self) -> f64 {
        self as f64
    }
}

impl Work for f64 {
    #[inline(always)]
    fn of<T: GradElem>(x: T) -> Self {
        x.to_f64()
    }
    #[inline(always)]
    fn to_state<S: StateElem>(self) -> S {
        S::from_f64(self)
    }
    #[inline(always)]
    fn wide(self) -> f64 {
        self
    }
}

/// One LANES-wide block of `upd_body` at a lane-0 position `o`, every operand of the update rounded in
/// W: s = old + coef (a - b); if MEAN, m = old + g inv; if DOT, lane l += s (c - d) and (c - d)^2 in
/// f64, s being the stored (state-typed) value. `shared` = (g is a, d is b).
#[inline(always)]
#[allow(clippy::type_complexity)]
fn block8<
    W: Work,
    S: StateElem,
    A: GradElem,
    B: GradElem,
    G: GradElem,
    C: GradElem,
    D: GradElem,
    const MEAN: bool,
    const DOT: bool,
>(
    o: usize,
    (s, s0): (&mut [S], Option<&[S]>),
    (m, m0): (&mut [S], Option<&[S]>),
    (a, b, g, c, d): (&[A], &[B], &[G], &[C], &[D]),
    (ga, db): (bool, bool),
    (coef, inv): (W, W),
    (vdot, vnrm): (&mut [f64; LANES], &mut [f64; LANES]),
) {
    let (ab, bb) = (block(a, o), block(b, o));
    let aw: [W; LANES] = std::array::from_fn(|l| W::of(ab[l]));
    let bw: [W; LANES] = std::array::from_fn(|l| W::of(bb[l]));
    let sv = old_block(s0, s, o);
    let sn: [S; LANES] =
        std::array::from_fn(|l| (W::of(sv[l]) + coef * (aw[l] - bw[l])).to_state());
    s[o..o + LANES].copy_from_slice(&sn);
    if MEAN {
        let gw: [W; LANES] = if ga {
            aw
        } else {
            let gb = block(g, o);
            std::array::from_fn(|l| W::of(gb[l]))
        };
        let mv = old_block(m0, m, o);
        let mn: [S; LANES] = std::array::from_fn(|l| (W::of(mv[l]) + gw[l] * inv).to_state());
        m[o..o + LANES].copy_from_slice(&mn);
    }
    if DOT {
        let cb = block(c, o);
        let dw: [W; LANES] = if db {
            bw
        } else {
            let dk = block(d, o);
            std::array::from_fn(|l| W::of(dk[l]))
        };
        for l in 0..LANES {
            let z = (W::of(cb[l]) - dw[l]).wide();
            vdot[l] += sn[l].to_f64() * z;
            vnrm[l] += z * z;
        }
    }
}

/// s += coef (a - b); if MEAN, m += g inv_n; if DOT, acc += (<s_new, c - d>, ||c - d||^2).
///
/// One loop over the elements does all of it: each element is loaded and widened once, updated, and
/// its new (rounded) value goes straight into the next dot product, so every operand is read once per
/// row. The operations per element are exactly those of the separate definitions (same formulas,
/// same roundings, dot lanes by flat index), so the result does not depend on this fusion.
///
/// SHARED (the layout of `grab`): `g` is `a` (the mean is fed the row that updates s) and, when DOT,
/// `d` is `b` (the next dot is centered by the same stale mean), so each of them is loaded and widened
/// once. The caller sets it only when the slices are the same memory of the same type, so reading `a`
/// for `g` and `b` for `d` reads the very same numbers.
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
    const SHARED: bool,
    const X512: bool,
>(
    p: UpdPiece<S, A, B, G, C, D>,
    acc: &mut Acc,
) {
    let (ga, db) = (MEAN && SHARED, DOT && SHARED);
    // Where each result is rounded (see the doc of `elem`); constants of the instantiation.
    let (s32, m32, z32) = (
        narrow::<S, A, B>(),
        S::F32 && G::NARROW,
        narrow::<S, C, D>(),
    );
    let all32 = s32 && (!MEAN || m32) && (!DOT || z32);
    let none32 = !s32 && (!MEAN || !m32) && (!DOT || !z32);
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
    let (coef32, inv32) = (coef as f32, inv_n as f32);
    let len = s.len();
    let (a, b) = (&a[..len], &b[..len]);
    let (s0, m0) = match src {
        Some((s0, m0)) => (Some(&s0[..len]), if MEAN { Some(&m0[..len]) } else { None }),
        None => (None, None),
    };
    let m = if MEAN { &mut m[..len] } else { &mut m[..0] };
    let g = if MEAN && !ga { &g[..len] } else { &g[..0] };
    let c = if DOT { &c[..len] } else { &c[..0] };
    let d = if DOT && !db { &d[..len] } else { &d[..0] };
    // The arithmetic of one element, on values already loaded: (new s, new m, z of the next dot). Both
    // widths of each operand are offered; the compiler drops the conversions a path does not use.
    let elem =
        |a: (f32, f64), b: (f32, f64), old_s: S, g: (f32, f64), old_m: S, cd: [(f32, f64); 2]| {
            let sn = if s32 {
                S::from_f32(old_s.to_f32() + coef32 * (a.0 - b.0))
            } else {
                S::from_f64(old_s.to_f64() + coef * (a.1 - b.1))
            };
            let mn = if !MEAN {
                old_m
            } else if m32 {
                S::from_f32(old_m.to_f32() + g.0 * inv32)
            } else {
                S::from_f64(old_m.to_f64() + g.1 * inv_n)
            };
            let z = if !DOT {
                0.0
            } else if z32 {
                (cd[0].0 - cd[1].0) as f64
            } else {
                cd[0].1 - cd[1].1
            };
            (sn, mn, z)
        };
    let both = |x: f32, y: f64| (x, y);
    let (mut dot, mut nrm) = *acc;
    // One element, for the unaligned head and the tail.
    let one =
        |j: usize, s: &mut [S], m: &mut [S], dot: &mut [f64; LANES], nrm: &mut [f64; LANES]| {
            let av = both(a[j].to_f32(), a[j].to_f64());
            let bv = both(b[j].to_f32(), b[j].to_f64());
            let gv = if ga || !MEAN {
                av
            } else {
                both(g[j].to_f32(), g[j].to_f64())
            };
            let dv = if db || !DOT {
                bv
            } else {
                both(d[j].to_f32(), d[j].to_f64())
            };
            let cv = if DOT {
                both(c[j].to_f32(), c[j].to_f64())
            } else {
                dv
            };
            let old_s = s0.map_or(s[j], |s0| s0[j]);
            let old_m = if MEAN {
                m0.map_or(m[j], |m0| m0[j])
            } else {
                old_s
            };
            let (sn, mn, z) = elem(av, bv, old_s, gv, old_m, [cv, dv]);
            s[j] = sn;
            if MEAN {
                m[j] = mn;
            }
            if DOT {
                let l = (base + j) % LANES;
                dot[l] += sn.to_f64() * z;
                nrm[l] += z * z;
            }
        };
    // The loop prefetches PREFETCH elements ahead; the start of the next row's gradient is requested
    // here, all lines at once, so that short rows do not wait on one miss after another.
    if DOT {
        prefetch_start(c, len);
        if !db {
            prefetch_start(d, len);
        }
    }
    // Per lane, elements are accumulated in increasing flat index: head, aligned body, tail.
    let head = head_len(base, len);
    let body_end = head + (len - head) / LANES * LANES;
    for j in 0..head {
        one(j, s, m, &mut dot, &mut nrm);
    }
    // The lane sums of the aligned body live in their own (register) arrays: the head and tail index
    // lanes at run time, which would otherwise pin the accumulators to memory.
    let (mut vdot, mut vnrm) = (dot, nrm);
    let mut o = head;
    #[cfg(target_arch = "x86_64")]
    if X512 && all_f32::<S, A, B, G, C, D>() {
        let s_dst = s.as_mut_ptr().cast::<f32>();
        let m_dst = m.as_mut_ptr().cast::<f32>();
        let f = |x: *const u8| x.cast::<f32>();
        let ops = simd::F32Ops {
            s_src: s0.map_or(s_dst.cast_const(), |x| f(x.as_ptr().cast())),
            s_dst,
            a: f(a.as_ptr().cast()),
            b: f(b.as_ptr().cast()),
            coef: coef32,
            m_src: m0.map_or(m_dst.cast_const(), |x| f(x.as_ptr().cast())),
            m_dst,
            g: if ga {
                f(a.as_ptr().cast())
            } else {
                f(g.as_ptr().cast())
            },
            inv: inv32,
            c: f(c.as_ptr().cast()),
            d: if db {
                f(b.as_ptr().cast())
            } else {
                f(d.as_ptr().cast())
            },
        };
        let n16 = (body_end - o) / 16 * 16;
        // SAFETY: X512 is set only by the AVX-512 wrapper (the CPU has AVX-512F); every type is f32
        // (checked above), so the casts are identity casts; [o, o + n16) lies within every operand in
        // use (s, a, b: len elements; m, g when MEAN; c, d when DOT), and s/m may alias their sources
        // only index for index, which the loop allows (each element is read before it is written).
        unsafe { simd::upd_f32_avx512::<MEAN, DOT>(&ops, o, o + n16, &mut vdot, &mut vnrm) };
        o += n16;
    }
    while o < body_end {
        prefetch(a, o + PREFETCH);
        prefetch(b, o + PREFETCH);
        prefetch(s0.unwrap_or(s), o + PREFETCH);
        if MEAN {
            prefetch(m0.unwrap_or(m), o + PREFETCH);
        }
        if DOT {
            prefetch(c, o + PREFETCH);
            if !db {
                prefetch(d, o + PREFETCH);
            }
        }
        if all32 {
            block8::<f32, S, A, B, G, C, D, MEAN, DOT>(
                o,
                (s, s0),
                (m, m0),
                (a, b, g, c, d),
                (ga, db),
                (coef32, inv32),
                (&mut vdot, &mut vnrm),
            );
        } else if none32 {
            block8::<f64, S, A, B, G, C, D, MEAN, DOT>(
                o,
                (s, s0),
                (m, m0),
                (a, b, g, c, d),
                (ga, db),
                (coef, inv_n),
                (&mut vdot, &mut vnrm),
            );
        } else {
            // Mixed widths (not produced by the samplers, which read one dtype per step): element by
            // element, the same arithmetic.
            for j in o..o + LANES {
                one(j, s, m, &mut vdot, &mut vnrm);
            }
        }
        o += LANES;
    }
    (dot, nrm) = (vdot, vnrm);
    for j in body_end..len {
        one(j, s, m, &mut dot, &mut nrm);
    }
    *acc = (dot, nrm);
}

#[cfg(target_arch = "x86_64")]
mod simd {
    //! The same element loops compiled for wider vector units. Callers check the feature first.
    use super::*;

    /// Both halves of 16 f32 as 8 f64 each (exact).
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn widen(
        v: std::arch::x86_64::__m512,
    ) -> (std::arch::x86_64::__m512d, std::arch::x86_64::__m512d) {
        use std::arch::x86_64::*;
        (
            _mm512_cvtps_pd(_mm512_castps512_ps256(v)),
            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(v),
            ))),
        )
    }

    /// The operands of the f32 update loop, as raw pointers: s and m are updated from s_src / m_src,
    /// which may be the same memory (in place). Unused operands may be dangling: they are not read.
    pub(super) struct F32Ops {
        pub s_src: *const f32,
        pub s_dst: *mut f32,
        pub a: *const f32,
        pub b: *const f32,
        pub coef: f32,
        pub m_src: *const f32,
        pub m_dst: *mut f32,
        pub g: *const f32,
        pub inv: f32,
        pub c: *const f32,
        pub d: *const f32,
    }

    /// The all-f32 update (see `upd_body`) over [lo, hi), 16 elements per iteration, written with
    /// intrinsics because the compiler's vectorization of the generic loop was fragile (it spilled,
    /// split vectors and kept per-8 bounds checks). The operations are those of the generic loop in the
    /// same order: z = a - b, s + coef z, m + g inv in f32; then per 8 elements, widened to f64, lane l
    /// += s * z, then lane l += z * z, the lower 8 elements before the upper 8. No FMA. `lo` must be at
    /// a lane-0 position and hi - lo a multiple of 16.
    ///
    /// # Safety
    /// AVX-512F; [lo, hi) in bounds of every operand the flags use; s_dst (m_dst) may equal s_src
    /// (m_src) but must not overlap any other operand.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn upd_f32_avx512<const MEAN: bool, const DOT: bool>(
        x: &F32Ops,
        lo: usize,
        hi: usize,
        dot: &mut [f64; LANES],
        nrm: &mut [f64; LANES],
    ) {
        use std::arch::x86_64::*;
        let coef = _mm512_set1_ps(x.coef);
        let inv = _mm512_set1_ps(x.inv);
        let mut vd = _mm512_loadu_pd(dot.as_ptr());
        let mut vn = _mm512_loadu_pd(nrm.as_ptr());
        let pf = |p: *const f32, i: usize| prefetch_at(p, i + PREFETCH);
        let mut i = lo;
        while i < hi {
            pf(x.a, i);
            pf(x.b, i);
            pf(x.s_src, i);
            let a = _mm512_loadu_ps(x.a.add(i));
            let b = _mm512_loadu_ps(x.b.add(i));
            let s_old = _mm512_loadu_ps(x.s_src.add(i));
            let sn = _mm512_add_ps(s_old, _mm512_mul_ps(coef, _mm512_sub_ps(a, b)));
            _mm512_storeu_ps(x.s_dst.add(i), sn);
            if MEAN {
                pf(x.m_src, i);
                let g = _mm512_loadu_ps(x.g.add(i));
                let m_old = _mm512_loadu_ps(x.m_src.add(i));
                _mm512_storeu_ps(x.m_dst.add(i), _mm512_add_ps(m_old, _mm512_mul_ps(g, inv)));
            }
            if DOT {
                pf(x.c, i);
                if x.d != x.b {
                    pf(x.d, i);
                }
                let z = _mm512_sub_ps(_mm512_loadu_ps(x.c.add(i)), _mm512_loadu_ps(x.d.add(i)));
                let (s_lo, s_hi) = widen(sn);
                let (z_lo, z_hi) = widen(z);
                vd = _mm512_add_pd(vd, _mm512_mul_pd(s_lo, z_lo));
                vn = _mm512_add_pd(vn, _mm512_mul_pd(z_lo, z_lo));
                vd = _mm512_add_pd(vd, _mm512_mul_pd(s_hi, z_hi));
                vn = _mm512_add_pd(vn, _mm512_mul_pd(z_hi, z_hi));
            }
            i += 16;
        }
        _mm512_storeu_pd(dot.as_mut_ptr(), vd);
        _mm512_storeu_pd(nrm.as_mut_ptr(), vn);
    }

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
        const SHARED: bool,
    >(
        p: UpdPiece<S, A, B, G, C, D>,
        acc: &mut Acc,
    ) {
        upd_body::<S, A, B, G, C, D, MEAN, DOT, SHARED, true>(p, acc)
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
        const SHARED: bool,
    >(
        p: UpdPiece<S, A, B, G, C, D>,
        acc: &mut Acc,
    ) {
        upd_body::<S, A, B, G, C, D, MEAN, DOT, SHARED, false>(p, acc)
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
    const SHARED: bool,
>(
    isa: Isa,
    p: UpdPiece<S, A, B, G, C, D>,
    acc: &mut Acc,
) {
    match isa {
        // SAFETY: `isa` comes from `isa()`, which returns Avx512 only when the CPU reports avx512f.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { simd::upd_avx512::<S, A, B, G, C, D, MEAN, DOT, SHARED>(p, acc) },
        // SAFETY: `isa` comes from `isa()`, which returns Avx2 only when the CPU reports avx2.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { simd::upd_avx2::<S, A, B, G, C, D, MEAN, DOT, SHARED>(p, acc) },
        _ => upd_body::<S, A, B, G, C, D, MEAN, DOT, SHARED, false>(p, acc),
    }
}

/// The lanes summed pairwise: ((0 + 1) + (2 + 3)) + ..., a balanced tree in lane order.
fn fold_lanes(acc: &[f64; LANES]) -> f64 {
    let mut v = *acc;
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            v[l] = v[2 * l] + v[2 * l + 1];
        }
    }
    v[0]
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
    if layout.dim >= PARALLEL_MIN_DIM && threads_usable() {
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

/// Whether two operands are the same memory holding the same element type (so one load serves both).
fn same<X: 'static, Y: 'static>(x: &[X], y: &[Y]) -> bool {
    std::any::TypeId::of::<X>() == std::any::TypeId::of::<Y>()
        && x.len() == y.len()
        && std::ptr::eq(x.as_ptr().cast::<u8>(), y.as_ptr().cast::<u8>())
}

/// Whether a piece has the layout of `grab` (see `upd_body`): the mean's gradient is `a`, and the
/// next dot's centering vector is `b`. Only the operands in use are compared.
fn shared<S, A: 'static, B: 'static, G: 'static, C, D: 'static>(
    p: &UpdPiece<S, A, B, G, C, D>,
) -> bool {
    !p.m.is_empty() && same(p.a, p.g) && (p.c.is_empty() || same(p.b, p.d))
}

/// Run `f`, a step whose passes over `dim` coordinates fork once per row, on a rayon worker when they
/// fork at all (dim >= PARALLEL_MIN_DIM) and the caller is not a worker already. From outside the pool
/// every fork/join injects a job and puts the caller to sleep until it is done, and waking it cost
/// ~10 us per row; from a worker, the other half of a row is stolen by a worker that is usually still
/// spinning from the last row. Measured (`cargo bench --bench step_loop`, float32, 2 cores): `grab`
/// 1.2-1.3x faster at d = 62,006 and 1e5 (B = 64), unchanged at d = 1e6; `recursive` at d = 40,000,
/// 16 rows a step, 1.35-2x in two runs. `Sampler::step` runs every ordering's step through it.
/// Results are the same either way.
pub fn on_workers<R: Send>(dim: usize, f: impl FnOnce() -> R + Send) -> R {
    if dim >= PARALLEL_MIN_DIM && rayon::current_thread_index().is_none() && threads_usable() {
        rayon::scope(|_| f())
    } else {
        f()
    }
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
            if shared(&p) {
                upd_piece::<S, A, B, G, C, D, MEAN, DOT, true>(isa, p, &mut acc);
            } else {
                upd_piece::<S, A, B, G, C, D, MEAN, DOT, false>(isa, p, &mut acc);
            }
        }
        (fold_lanes(&acc.0), fold_lanes(&acc.1))
    };
    let mut dot = 0.0;
    let mut norm = 0.0;
    if layout.dim >= PARALLEL_MIN_DIM && threads_usable() {
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

/// Test data: numbers whose magnitudes span 1e-6 to 1e6, so that any change in the order of a sum or
/// in a rounding shows in its bits (data of one scale often rounds the same whatever the order).
#[cfg(test)]
pub(crate) fn wild(d: usize, salt: u64) -> Vec<f32> {
    let mut x = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..d)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mant = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let scale = 10f32.powi((x % 13) as i32 - 6);
            mant * scale
        })
        .collect()
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

    /// The reduction order of the module doc, written out plainly: lane = flat index mod 8, lanes
    /// folded pairwise per chunk, chunk partials summed in chunk order. z = c - d exactly as given
    /// (the caller rounds it to f32 first where the definition does).
    fn reference_dot(s: &[f64], c: &[f64], d: &[f64]) -> (f64, f64) {
        let (mut dot, mut nrm) = (0.0, 0.0);
        for lo in (0..s.len()).step_by(CHUNK) {
            let (mut dl, mut nl) = ([0.0f64; LANES], [0.0f64; LANES]);
            for i in lo..(lo + CHUNK).min(s.len()) {
                let z = c[i] - d[i];
                dl[i % LANES] += s[i] * z;
                nl[i % LANES] += z * z;
            }
            dot += fold_lanes(&dl);
            nrm += fold_lanes(&nl);
        }
        (dot, nrm)
    }

    fn f64s(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    #[test]
    fn kernels_equal_a_plain_reference_bit_for_bit() {
        // Layouts with pieces that start and end off the lane grid and straddle chunks; one of them
        // above the parallel threshold. Checked for the grab layout (the mean fed by the updating row,
        // the next dot centered by the same mean: the fast shared path) and for distinct operands.
        for widths in [
            vec![37],
            vec![3, 5, 1, 29, 200],
            vec![5, CHUNK - 3, 1, 2 * CHUNK + 13],
            vec![11, PARALLEL_MIN_DIM / 2 + 5],
            vec![11, PARALLEL_MIN_DIM + 5],
        ] {
            let dim: usize = widths.iter().sum();
            let layout = Layout::new(widths.clone());
            let (s0, m, mn0) = (wild(dim, 1), wild(dim, 2), wild(dim, 3));
            let (g, gn) = (wild(dim, 4), wild(dim, 5));
            let coef = -1.0;
            let inv_n = 1.0 / 7.0;
            // The definition, element by element: float32 state and gradients, so every elementwise
            // result is rounded in f32 and only the dot product runs in f64.
            let s_ref: Vec<f32> = (0..dim)
                .map(|i| s0[i] + coef as f32 * (g[i] - m[i]))
                .collect();
            let mn_ref: Vec<f32> = (0..dim).map(|i| mn0[i] + g[i] * inv_n as f32).collect();
            let z_next: Vec<f64> = (0..dim).map(|i| (gn[i] - m[i]) as f64).collect();
            let dot_ref = reference_dot(&f64s(&s_ref), &z_next, &vec![0.0; dim]);
            assert_eq!(
                dot_diff(
                    &layout,
                    &s_ref,
                    &Pieces::split_flat(&gn, &widths),
                    &Pieces::split_flat(&m, &widths)
                ),
                dot_ref
            );
            let g_copy = g.clone();
            let m_copy = m.clone();
            let (gp, gcp, mp, mcp, gnp) = (
                Pieces::split_flat(&g, &widths),
                Pieces::split_flat(&g_copy, &widths),
                Pieces::split_flat(&m, &widths),
                Pieces::split_flat(&m_copy, &widths),
                Pieces::split_flat(&gn, &widths),
            );
            for (mean_g, dot_m) in [(&gp, &mp), (&gcp, &mcp), (&gp, &mcp)] {
                let (mut s1, mut mn1) = (s0.clone(), mn0.clone());
                let r = update_then_dot(
                    &layout,
                    &mut s1,
                    &gp,
                    &mp,
                    coef,
                    Some((&mut mn1[..], mean_g, inv_n)),
                    &gnp,
                    dot_m,
                );
                assert_eq!((r, &s1, &mn1), (dot_ref, &s_ref, &mn_ref));
                let (mut s2, mut mn2) = (vec![0.0f32; dim], vec![0.0f32; dim]);
                let r = update_from(
                    &layout,
                    (&s0, &mn0),
                    &mut s2,
                    &gp,
                    &mp,
                    coef,
                    Some((&mut mn2[..], mean_g, inv_n)),
                    Some((&gnp, dot_m)),
                );
                assert_eq!((r, &s2, &mn2), (Some(dot_ref), &s_ref, &mn_ref));
                let (mut s3, mut mn3) = (s0.clone(), mn0.clone());
                update_diff(
                    &layout,
                    &mut s3,
                    &gp,
                    &mp,
                    coef,
                    Some((&mut mn3[..], mean_g, inv_n)),
                );
                assert_eq!((&s3, &mn3), (&s_ref, &mn_ref));
            }
            // Pair layout: no mean, four distinct rows, float64 state.
            let s64: Vec<f64> = f64s(&s0);
            let s_ref: Vec<f64> = (0..dim)
                .map(|i| s64[i] + 0.5 * (g[i] as f64 - gn[i] as f64))
                .collect();
            let dot_ref = reference_dot(&s_ref, &f64s(&m), &f64s(&mn0));
            let mut s1 = s64.clone();
            let r = update_then_dot::<f64, f32, f32, f32, f32, f32>(
                &layout,
                &mut s1,
                &gp,
                &gnp,
                0.5,
                None,
                &mp,
                &Pieces::split_flat(&mn0, &widths),
            );
            assert_eq!((r, &s1), (dot_ref, &s_ref));
            // The same from a source buffer (pair's first update of a step), which stays untouched.
            let mut s2 = vec![0.0f64; dim];
            let r = update_from::<f64, f32, f32, f32, f32, f32>(
                &layout,
                (&s64, &[]),
                &mut s2,
                &gp,
                &gnp,
                0.5,
                None,
                Some((&mp, &Pieces::split_flat(&mn0, &widths))),
            );
            assert_eq!((r, &s2), (Some(dot_ref), &s_ref));
            assert_eq!(s64, f64s(&s0));
        }
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
                upd_piece::<f32, f32, f32, f32, f32, f32, true, true, false>(isa, p, &mut acc);
                (s1, m1, acc)
            };
            assert_eq!(run(Isa::Scalar), run(here));
            // The shared (grab) layout: g is a and d is b.
            let run_shared = |isa: Isa| {
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
                    d: &b[..],
                    src: None,
                };
                assert!(shared(&p));
                upd_piece::<f32, f32, f32, f32, f32, f32, true, true, true>(isa, p, &mut acc);
                (s1, m1, acc)
            };
            assert_eq!(run_shared(Isa::Scalar), run_shared(here));
        }
    }

    /// One update pass at the given ISA for flags (MEAN, DOT), in place or from a source buffer.
    fn run_flags<const MEAN: bool, const DOT: bool>(
        isa: Isa,
        base: usize,
        len: usize,
        from_src: bool,
    ) -> (Vec<f32>, Vec<f32>, Acc) {
        let (s0, m0) = (data(len, 1), data(len, 6));
        let (a, b, c, e) = (data(len, 2), data(len, 3), data(len, 4), data(len, 5));
        let (mut s1, mut m1) = if from_src {
            (vec![0.0f32; len], vec![0.0f32; len])
        } else {
            (s0.clone(), m0.clone())
        };
        let mut acc = ZERO;
        let p = UpdPiece {
            base,
            s: &mut s1[..],
            a: &a[..],
            b: &b[..],
            coef: 1.0,
            m: if MEAN { &mut m1[..] } else { &mut [] },
            g: &e[..],
            inv_n: 0.1,
            c: &c[..],
            d: &e[..],
            src: from_src.then_some((&s0[..], &m0[..])),
        };
        upd_piece::<f32, f32, f32, f32, f32, f32, MEAN, DOT, false>(isa, p, &mut acc);
        (s1, m1, acc)
    }

    #[test]
    fn every_update_variant_gives_the_same_bits_on_every_instruction_set() {
        // The AVX-512 float32 loop serves all four (MEAN, DOT) variants, in place and from a source
        // buffer; it runs on lengths with a 16-wide body plus 8-wide and scalar remainders.
        let here = isa();
        for (base, len) in [(0, 1000), (5, 1003), (8, 40), (1, 7), (0, 4096 + 24)] {
            for from_src in [false, true] {
                let go = |isa| {
                    (
                        run_flags::<true, true>(isa, base, len, from_src),
                        run_flags::<true, false>(isa, base, len, from_src),
                        run_flags::<false, true>(isa, base, len, from_src),
                        run_flags::<false, false>(isa, base, len, from_src),
                    )
                };
                assert_eq!(
                    go(Isa::Scalar),
                    go(here),
                    "base {base} len {len} src {from_src}"
                );
            }
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
