//! CPU kernels for `watch()`'s rows (python/torchgrab/capture/layers.py), where a small model's step is
//! short enough that a few torch ops per step are most of the sketch's cost:
//!
//! - [`count_sketch`]: `out[r, h(i)] += s(i) x[r, i]`, a count sketch of each row of `x`. torch's
//!   `index_add_` along the last dimension dispatches one small add per input column (784 for MNIST);
//!   here it is one pass over `x`, gathered bucket by bucket.
//! - [`outer_rows`]: row r of `out` gets `scale * vec(g_r a_r^T)` followed by `scale * g_r` (the weight
//!   and bias blocks of a Linear layer's sketched per-example gradient), written straight into the
//!   caller's row buffer instead of an outer-product tensor, a concatenation and a multiplication.
//! - [`channel_sums`] and [`norm_sums`]: a convolution's bias rows and a BatchNorm's, GroupNorm's or
//!   InstanceNorm's rows (per channel `sum g x_hat` and `sum g`), each one pass over the layer's feature
//!   maps.
//!
//! The first two are exactly the sequential definitions (each output element is the same sum in the
//! same order as the loop written out); the sums are checked against their definitions in the tests
//! below, and every kernel against the torch path in tests/test_watch.py.

use crate::error::{GrabError, Result};
use ndarray::{Array2, ArrayView2, ArrayViewMut2};

/// A count sketch's tables grouped by bucket: bucket j's columns are `order[starts[j]..starts[j + 1]]`
/// (increasing), with signs `signs[starts[j]..starts[j + 1]]` (the caller computes them once per layer).
pub struct Buckets<'a> {
    pub order: &'a [u32],
    pub starts: &'a [u32],
    pub signs: &'a [f32],
}

impl Buckets<'_> {
    fn check(&self, n: usize) -> Result<usize> {
        let k = self.starts.len().saturating_sub(1);
        let ends_ok = self.starts.first() == Some(&0)
            && self.starts.last().map(|&e| e as usize) == Some(self.order.len())
            && self.starts.windows(2).all(|w| w[0] <= w[1]);
        if k == 0 || !ends_ok || self.signs.len() != self.order.len() {
            return Err(GrabError::shape(format!(
                "count sketch tables: {} bucket starts, {} columns, {} signs (starts must run from 0 to the \
                 number of columns)",
                self.starts.len(),
                self.order.len(),
                self.signs.len()
            )));
        }
        if let Some(&c) = self.order.iter().find(|&&c| c as usize >= n) {
            return Err(GrabError::index(format!(
                "count sketch column {c} is not below the input width {n}"
            )));
        }
        Ok(k)
    }
}

/// Count sketch of the rows of `x` (rows x n): `out[r, j] = sum of signs[c] * x[r, c]` over bucket j's
/// columns c in increasing order (the order of `out[r, h(c)] += s(c) x[r, c]` over c). Formed as
/// gathers into registers, eight rows at a time: faster than the scatter, whose every add is a store.
pub fn count_sketch(x: ArrayView2<'_, f32>, tables: &Buckets<'_>) -> Result<Array2<f32>> {
    let (rows, n) = x.dim();
    let k = tables.check(n)?;
    let x = x.as_standard_layout();
    let xs = x.as_slice().unwrap_or(&[]);
    let mut out = Array2::<f32>::zeros((rows, k));
    if rows == 0 || n == 0 {
        return Ok(out);
    }
    let o = out.as_slice_mut().unwrap_or(&mut []);
    let bucket = |j: usize| tables.starts[j] as usize..tables.starts[j + 1] as usize;
    // Eight rows at a time, transposed first so that a column's eight values are one contiguous
    // vector: each bucket member is then one multiply-add across the eight rows, in registers.
    let mut xt = vec![0f32; n * 8];
    let avx2 = has_avx2();
    let mut r = 0;
    while r + 8 <= rows {
        eight_rows(
            avx2,
            &xs[r * n..(r + 8) * n],
            tables,
            &mut xt,
            &mut o[r * k..(r + 8) * k],
        );
        r += 8;
    }
    for r in r..rows {
        let xr = &xs[r * n..(r + 1) * n];
        for j in 0..k {
            let mut acc = 0f32;
            for t in bucket(j) {
                acc += tables.signs[t] * xr[tables.order[t] as usize];
            }
            o[r * k + j] = acc;
        }
    }
    Ok(out)
}

/// Eight rows of [`count_sketch`] (`block`: 8 x n, `o`: 8 x k) with the widest instructions the CPU
/// has: the transpose is the part that gains (an 8 x 8 tile per eight loads and stores instead of 64
/// scalar moves); the sums are the same multiplications and additions in the same order in every
/// case (no fused multiply-add), so the choice never changes a bit.
fn eight_rows(avx2: bool, block: &[f32], tables: &Buckets<'_>, xt: &mut [f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: has_avx2() reported the feature on this CPU.
        unsafe { simd::eight_rows_avx2(block, tables, xt, o) };
        return;
    }
    let _ = avx2;
    transpose8_scalar(block, xt, 0);
    gather8(tables, xt, o);
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Columns `from..n` of the 8 x n `block` into `xt` (n x 8), one value at a time.
#[inline(always)]
fn transpose8_scalar(block: &[f32], xt: &mut [f32], from: usize) {
    let n = block.len() / 8;
    for (c, col) in xt.chunks_exact_mut(8).enumerate().skip(from) {
        for (q, d) in col.iter_mut().enumerate() {
            *d = block[q * n + c];
        }
    }
}

/// Each bucket's signed sum of its columns' eight values (`xt`: n x 8), in bucket order, into `o`
/// (8 x k).
#[inline(always)]
fn gather8(tables: &Buckets<'_>, xt: &[f32], o: &mut [f32]) {
    let k = tables.starts.len() - 1;
    for j in 0..k {
        let mut acc = [0f32; 8];
        let members = tables.starts[j] as usize..tables.starts[j + 1] as usize;
        for (&c, &sg) in tables.order[members.clone()]
            .iter()
            .zip(&tables.signs[members])
        {
            let c = c as usize * 8;
            if let Ok(col) = <&[f32; 8]>::try_from(&xt[c..c + 8]) {
                for (a, &v) in acc.iter_mut().zip(col) {
                    *a += sg * v;
                }
            }
        }
        for (q, &a) in acc.iter().enumerate() {
            o[q * k + j] = a;
        }
    }
}

/// Row r of `out` (rows x (p q + p) with `bias`, rows x p q without) gets `scale * g[r, j] * a[r, c]` at
/// column `j q + c` and, with `bias`, `scale * g[r, j]` at column `p q + j` (g: rows x p, a: rows x q).
/// With `accumulate` these are added to what `out` holds (a layer called twice in one step).
/// Returns whether every value written is finite, so the caller need not scan the rows again before
/// balancing them (from the inputs when the row is written afresh; false may also mean an overflow of
/// the sum of values added to a row, which only sends the caller to its own scan).
pub fn outer_rows(
    g: ArrayView2<'_, f32>,
    a: ArrayView2<'_, f32>,
    scale: f32,
    bias: bool,
    accumulate: bool,
    mut out: ArrayViewMut2<'_, f32>,
) -> Result<bool> {
    let (rows, p) = g.dim();
    let q = a.ncols();
    let width = p * q + if bias { p } else { 0 };
    if a.nrows() != rows || out.nrows() != rows || out.ncols() != width {
        return Err(GrabError::shape(format!(
            "outer rows: g is {rows} x {p}, a is {} x {q}, out is {} x {} (expected {rows} x {width})",
            a.nrows(),
            out.nrows(),
            out.ncols()
        )));
    }
    // Written afresh, every value is finite when a bound on all of them is: |scale g_j a_c| and
    // |scale g_j| are at most twice (a margin for the rounding of these sums) |scale| sum|g| sum|a| and
    // |scale| sum|g|. A NaN or infinity makes the bound non-finite; so may finite values too large to
    // add up, and false then only sends the caller to its own scan. Two passes over the inputs, not
    // one over the rows. Added to values already there (accumulate), each row is summed instead.
    let fresh_finite = {
        let bg = abs_sum(g) * scale.abs();
        let ba = abs_sum(a);
        bg.is_finite() && (q == 0 || (2.0 * bg * ba).is_finite())
    };
    let mut gs = vec![0f32; p];
    let mut av = vec![0f32; q];
    let isa = crate::kernels::isa();
    let mut finite = true;
    for ((gr, ar), mut or) in g.outer_iter().zip(a.outer_iter()).zip(out.outer_iter_mut()) {
        for (d, &v) in gs.iter_mut().zip(gr.iter()) {
            *d = scale * v;
        }
        match ar.as_slice() {
            Some(x) => av.copy_from_slice(x),
            None => av.iter_mut().zip(ar.iter()).for_each(|(d, &v)| *d = v),
        }
        let summed = match or.as_slice_mut() {
            Some(o) => write_row(isa, o, &gs, &av, bias, accumulate),
            None => {
                let mut tmp = vec![0f32; width];
                if accumulate {
                    tmp.iter_mut().zip(or.iter()).for_each(|(t, &v)| *t = v);
                }
                let sum = write_row(isa, &mut tmp, &gs, &av, bias, accumulate);
                or.iter_mut().zip(&tmp).for_each(|(o, &t)| *o = t);
                sum
            }
        };
        if accumulate {
            finite &= summed.is_finite();
        }
    }
    Ok(if accumulate { finite } else { fresh_finite })
}

/// [`outer_rows`] with `a` the [`count_sketch`] of `x` (rows x n), in one call: a lone Linear layer's
/// wide input is sketched in its backward, where its rows are written, instead of in its forward, which
/// spares a step one call from Python and the sketch's array. The same bits as the two calls. Refuses
/// `x` with another number of rows than `g` before anything is written.
#[allow(clippy::too_many_arguments)]
pub fn count_outer_rows(
    g: ArrayView2<'_, f32>,
    x: ArrayView2<'_, f32>,
    tables: &Buckets<'_>,
    scale: f32,
    bias: bool,
    accumulate: bool,
    out: ArrayViewMut2<'_, f32>,
) -> Result<bool> {
    let a = sketch_beside("count outer rows", g, x, tables)?;
    outer_rows(g, a.view(), scale, bias, accumulate, out)
}

/// The [`count_sketch`] of `x` for the rows of `g` in a fused kernel (`what`): an `x` with another number
/// of rows is refused before the sketch is formed.
fn sketch_beside(
    what: &str,
    g: ArrayView2<'_, f32>,
    x: ArrayView2<'_, f32>,
    tables: &Buckets<'_>,
) -> Result<Array2<f32>> {
    if x.nrows() != g.nrows() {
        return Err(GrabError::shape(format!(
            "{what}: g has {} rows, x has {}",
            g.nrows(),
            x.nrows()
        )));
    }
    count_sketch(x, tables)
}

/// Row r of `out` (rows x c) gets `scale` times the sum of the values of channel j of example r in `g`
/// (rows x c x positions, C-contiguous, as `g.len()` says): a convolution's exact bias rows, its output
/// gradient summed over positions. With `accumulate` these are added to what `out` holds (a layer called
/// twice in one step). Returns whether every value the rows hold afterwards is finite.
pub fn channel_sums(
    g: &[f32],
    rows: usize,
    c: usize,
    scale: f32,
    accumulate: bool,
    mut out: ArrayViewMut2<'_, f32>,
) -> Result<bool> {
    if out.nrows() != rows
        || out.ncols() != c
        || (rows * c > 0 && !g.len().is_multiple_of(rows * c))
    {
        return Err(GrabError::shape(format!(
            "channel sums: g has {} values for {rows} x {c} channels, out is {} x {} (expected {rows} x {c})",
            g.len(),
            out.nrows(),
            out.ncols()
        )));
    }
    if rows * c == 0 {
        return Ok(true);
    }
    let positions = g.len() / (rows * c);
    let avx2 = has_avx2();
    let mut finite = true;
    for (r, mut or) in out.outer_iter_mut().enumerate() {
        for (j, o) in or.iter_mut().enumerate() {
            let start = (r * c + j) * positions;
            // (no positions at all, an empty output: each sum is 0)
            let v = scale * wide_sum(avx2, &g[start..start + positions]);
            *o = if accumulate { *o + v } else { v };
            finite &= o.is_finite();
        }
    }
    Ok(finite)
}

/// Which statistics normalize the input of [`norm_sums`].
#[derive(Clone, Copy, Debug)]
pub enum NormStats<'a> {
    /// BatchNorm in training mode: per channel, the batch's biased statistics over rows and positions.
    Batch,
    /// Per channel, the given mean and variance (BatchNorm's and InstanceNorm's running statistics, in
    /// eval mode).
    Running(&'a [f32], &'a [f32]),
    /// GroupNorm: per row, its own biased statistics over each of this many equal groups of channels
    /// and their positions (InstanceNorm: as many groups as channels).
    Groups(usize),
}

/// A BatchNorm's, GroupNorm's or InstanceNorm's exact per-example contributions, in one pass over its input `x` and
/// output gradient `g` (both rows x c x positions, C-contiguous, the same length): row r of `out` gets
/// `scale` times the sum over positions of `g * x_hat` for each channel (the weight's columns, with
/// `weight`) followed by the sum of `g` (the bias's, with `bias`). `x_hat = (x - mean) / sqrt(var +
/// eps)` with the statistics `stats` names. torch's form normalizes the whole input again, multiplies
/// and sums twice: five passes over the feature map in each norm layer's backward, most of a ResNet's
/// watched step; this reads `x` and `g` once. Since `sum g x_hat = (sum g x - mean sum g) / sqrt(var +
/// eps)`, one pass gathers four sums per example and channel ([`Slab`]), and the statistics are
/// combined from them (Chan's form, in f64: no difference of two large sums). With `accumulate` the
/// values are added to what `out` holds (a layer called twice in a step). Returns whether every value
/// the rows hold afterwards is finite; refuses bad shapes before anything is written.
#[allow(clippy::too_many_arguments)]
pub fn norm_sums(
    x: &[f32],
    g: &[f32],
    rows: usize,
    c: usize,
    eps: f64,
    stats: NormStats<'_>,
    weight: bool,
    bias: bool,
    scale: f32,
    accumulate: bool,
    mut out: ArrayViewMut2<'_, f32>,
) -> Result<bool> {
    let width = c * (weight as usize + bias as usize);
    let stats_fit = match stats {
        NormStats::Batch => true,
        NormStats::Running(m, v) => m.len() == c && v.len() == c,
        NormStats::Groups(groups) => groups > 0 && c.is_multiple_of(groups),
    };
    if x.len() != g.len()
        || out.nrows() != rows
        || out.ncols() != width
        || (rows * c > 0 && !g.len().is_multiple_of(rows * c))
        || !stats_fit
    {
        let stats = match stats {
            NormStats::Running(m, v) => format!(
                "running statistics ({}, {}) (expected {c} each)",
                m.len(),
                v.len()
            ),
            NormStats::Groups(groups) => format!("{groups} groups (expected a divisor of {c})"),
            NormStats::Batch => "the batch's statistics".to_string(),
        };
        return Err(GrabError::shape(format!(
            "norm sums: x has {} values and g {} for {rows} x {c} channels, out is {} x {} (expected {rows} x \
             {width}), {stats}",
            x.len(),
            g.len(),
            out.nrows(),
            out.ncols(),
        )));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(GrabError::shape(format!(
            "norm sums: eps must be finite and >= 0, got {eps}"
        )));
    }
    if rows * c == 0 {
        return Ok(true);
    }
    let positions = g.len() / (rows * c);
    let avx2 = has_avx2();
    let sums: Vec<Slab> = (0..rows * c)
        .map(|i| {
            let span = i * positions..(i + 1) * positions;
            Slab::of(avx2, &x[span.clone()], &g[span])
        })
        .collect();
    let p = positions as f64;
    // (mean, 1 / sqrt(var + eps)) of each example's channel
    let norm = |(mean, var): (f64, f64)| (mean, 1.0 / (var + eps).sqrt());
    let mut stat = vec![(0.0, 0.0); rows * c];
    match stats {
        NormStats::Running(m, v) => {
            for (i, s) in stat.iter_mut().enumerate() {
                *s = norm((m[i % c] as f64, v[i % c] as f64));
            }
        }
        NormStats::Batch => {
            for j in 0..c {
                let pooled = norm(pooled(rows, |r| &sums[r * c + j], p));
                for r in 0..rows {
                    stat[r * c + j] = pooled;
                }
            }
        }
        NormStats::Groups(groups) => {
            let per = c / groups;
            for (i, chunk) in stat.chunks_mut(per).enumerate() {
                chunk.fill(norm(pooled(per, |k| &sums[i * per + k], p)));
            }
        }
    }
    let mut finite = true;
    for r in 0..rows {
        for j in 0..c {
            let (s, (mean, inv)) = (&sums[r * c + j], stat[r * c + j]);
            let mut put = |v: f64, col: usize| {
                let o = &mut out[(r, col)];
                let v = scale * v as f32;
                *o = if accumulate { *o + v } else { v };
                finite &= o.is_finite();
            };
            if weight {
                // sum g (x - mean) = sum g (x - k) + (k - mean) sum g
                put((s.gd + (s.k - mean) * s.g) * inv, j);
            }
            if bias {
                put(s.g, if weight { c + j } else { j });
            }
        }
    }
    Ok(finite)
}

/// The biased mean and variance of the values of `count` slabs of `p` positions each, `at(0..count)`:
/// Chan et al.'s combination of each slab's mean and squared deviations, with no difference of two
/// large sums. (0, 0) when there are no values.
fn pooled<'s>(count: usize, at: impl Fn(usize) -> &'s Slab, p: f64) -> (f64, f64) {
    let n = count as f64 * p;
    if n == 0.0 {
        return (0.0, 0.0);
    }
    let mean = (0..count).map(|i| at(i).mean(p)).sum::<f64>() * p / n;
    let m2: f64 = (0..count)
        .map(|i| {
            let s = at(i);
            let d = s.mean(p) - mean;
            s.m2(p) + p * d * d
        })
        .sum();
    (mean, m2 / n)
}

/// One example's channel of a norm layer (`norm_sums`): its values shifted by the first, `d = x - k`,
/// so the sums are of numbers of the size of the spread, not of the mean (float32 sums of `x` and `x^2`
/// would cancel to nothing under a large mean): `g` = sum g, `gd` = sum g d, `d` = sum d, `dd` = sum d^2.
struct Slab {
    k: f64,
    g: f64,
    gd: f64,
    d: f64,
    dd: f64,
}

impl Slab {
    fn of(avx2: bool, x: &[f32], g: &[f32]) -> Slab {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the caller passes has_avx2().
            return unsafe { simd::slab_avx2(x, g) };
        }
        let _ = avx2;
        slab_sums(x, g)
    }

    fn mean(&self, p: f64) -> f64 {
        if p > 0.0 {
            self.k + self.d / p
        } else {
            0.0
        }
    }

    /// The sum of squared deviations from the example's own mean.
    fn m2(&self, p: f64) -> f64 {
        if p > 0.0 {
            (self.dd - self.d * self.d / p).max(0.0)
        } else {
            0.0
        }
    }
}

/// The four sums of a [`Slab`] in eight float32 lanes each, then the lanes and the values past the last
/// whole eight in float64, in a fixed order ([`slab_finish`]; the AVX2 form makes the same operations in
/// the same order: the same bits).
fn slab_sums(x: &[f32], g: &[f32]) -> Slab {
    let k = x.first().copied().unwrap_or(0.0);
    let mut acc = [[0f32; 8]; 4];
    for (xv, gv) in x.chunks_exact(8).zip(g.chunks_exact(8)) {
        for l in 0..8 {
            let (d, b) = (xv[l] - k, gv[l]);
            acc[0][l] += b;
            acc[1][l] += b * d;
            acc[2][l] += d;
            acc[3][l] += d * d;
        }
    }
    slab_finish(k, acc, x, g)
}

fn slab_finish(k: f32, acc: [[f32; 8]; 4], x: &[f32], g: &[f32]) -> Slab {
    let mut t = [0f64; 4];
    for (t, lanes) in t.iter_mut().zip(&acc) {
        *t = lanes.iter().map(|&v| v as f64).sum();
    }
    let whole = x.len() / 8 * 8;
    for (&a, &b) in x[whole..].iter().zip(&g[whole..]) {
        let (d, b) = ((a - k) as f64, b as f64);
        t[0] += b;
        t[1] += b * d;
        t[2] += d;
        t[3] += d * d;
    }
    Slab {
        k: k as f64,
        g: t[0],
        gd: t[1],
        d: t[2],
        dd: t[3],
    }
}

/// The factors of [`outer_rows`]'s fresh rows instead of the rows: row r of `out` (rows x (p + q)) gets
/// `scale * g[r]` (p values) followed by `a[r]` (q values), from which [`expand_outer`] writes the rows,
/// the same bits as `outer_rows` writes. p + q numbers an example instead of p q + p (MNIST: 112 instead
/// of 1,030), so a lone Linear layer's step hands the balancing its factors and the rows are formed where
/// they are balanced, a few at a time in cache. Returns what `outer_rows` (not accumulating) returns:
/// whether every value of the rows is finite. Refuses bad shapes before anything is written.
pub fn outer_factors(
    g: ArrayView2<'_, f32>,
    a: ArrayView2<'_, f32>,
    scale: f32,
    mut out: ArrayViewMut2<'_, f32>,
) -> Result<bool> {
    let (rows, p) = g.dim();
    let q = a.ncols();
    if a.nrows() != rows || out.nrows() != rows || out.ncols() != p + q {
        return Err(GrabError::shape(format!(
            "outer factors: g is {rows} x {p}, a is {} x {q}, out is {} x {} (expected {rows} x {})",
            a.nrows(),
            out.nrows(),
            out.ncols(),
            p + q
        )));
    }
    // outer_rows' bound on its fresh rows, from the same sums: the same answer.
    let bg = abs_sum(g) * scale.abs();
    let ba = abs_sum(a);
    let finite = bg.is_finite() && (q == 0 || (2.0 * bg * ba).is_finite());
    for ((gr, ar), mut or) in g.outer_iter().zip(a.outer_iter()).zip(out.outer_iter_mut()) {
        for (d, &v) in or.iter_mut().zip(gr.iter()) {
            *d = scale * v; // outer_rows' gs: the same product
        }
        for (d, &v) in or.iter_mut().skip(p).zip(ar.iter()) {
            *d = v;
        }
    }
    Ok(finite)
}

/// [`outer_factors`] with `a` the [`count_sketch`] of `x` (rows x n): the factors of
/// [`count_outer_rows`]'s rows, in one call. Refuses bad shapes or tables before anything is written.
pub fn count_factors(
    g: ArrayView2<'_, f32>,
    x: ArrayView2<'_, f32>,
    tables: &Buckets<'_>,
    scale: f32,
    out: ArrayViewMut2<'_, f32>,
) -> Result<bool> {
    let a = sketch_beside("count factors", g, x, tables)?;
    outer_factors(g, a.view(), scale, out)
}

/// The width of the rows whose factors are `p + q` wide (see [`expand_outer`]).
pub fn outer_width(p: usize, q: usize, bias: bool) -> usize {
    // Saturating: a width past memory is refused by the callers' length checks, never wrapped.
    p.saturating_mul(q).saturating_add(if bias { p } else { 0 })
}

/// Row r of `out` (rows x [`outer_width`]) gets `vec(gs a^T)` followed, with `bias`, by `gs`, where
/// `gs` and `a` are row r of `f` (rows x `cols`, cols = p + q) split after column p: what
/// [`outer_rows`] writes from `g` scaled into `gs` (the same multiplications, the same bits).
pub fn expand_outer(f: &[f32], cols: usize, p: usize, bias: bool, out: &mut [f32]) -> Result<()> {
    if p == 0 || p > cols || !f.len().is_multiple_of(cols) {
        return Err(GrabError::shape(format!(
            "outer rows from factors: {} values of rows {cols} wide, split after column {p} (need 1 <= p <= {cols})",
            f.len()
        )));
    }
    let rows = f.len() / cols;
    let width = outer_width(p, cols - p, bias);
    if rows.checked_mul(width) != Some(out.len()) {
        return Err(GrabError::shape(format!(
            "outer rows from factors: {rows} rows of {width} values, the buffer has {}",
            out.len()
        )));
    }
    if width == 0 {
        return Ok(()); // nothing to write (and chunks_exact_mut(0) would panic)
    }
    let isa = crate::kernels::isa();
    for (fr, or) in f.chunks_exact(cols).zip(out.chunks_exact_mut(width)) {
        let (gs, a) = fr.split_at(p);
        write_row(isa, or, gs, a, bias, false);
    }
    Ok(())
}

/// The sum of absolute values of every element (in eight lanes where the view is contiguous).
fn abs_sum(v: ArrayView2<'_, f32>) -> f32 {
    match v.as_slice() {
        Some(x) => lane_sum_by(x, f32::abs),
        None => v.iter().map(|x| x.abs()).sum(),
    }
}

/// Writes one row with the widest instructions the CPU has (the same multiplications and additions
/// in every case: no fused multiply-add, so the choice never changes a bit); with `accumulate`,
/// returns the sum of the values the row holds afterwards (0 otherwise).
fn write_row(
    isa: crate::kernels::Isa,
    o: &mut [f32],
    gs: &[f32],
    a: &[f32],
    bias: bool,
    accumulate: bool,
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::Isa;
        // SAFETY: isa() reported the feature on this CPU.
        match isa {
            Isa::Avx512 => return unsafe { simd::write_row_avx512(o, gs, a, bias, accumulate) },
            Isa::Avx2 => return unsafe { simd::write_row_avx2(o, gs, a, bias, accumulate) },
            Isa::Scalar => {}
        }
    }
    let _ = isa;
    write_row_body(o, gs, a, bias, accumulate)
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{gather8, slab_finish, transpose8_scalar, Buckets, Slab};
    use std::arch::x86_64::*;

    /// `slab_sums` with its eight lanes in one register each (mul then add, no FMA: the same bits).
    ///
    /// # Safety
    /// The CPU must support AVX2 (checked by `has_avx2()`); `x` and `g` have the same length.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn slab_avx2(x: &[f32], g: &[f32]) -> Slab {
        let n = x.len().min(g.len()) / 8 * 8;
        let k = x.first().copied().unwrap_or(0.0);
        let kv = _mm256_set1_ps(k);
        let (mut s0, mut s1, mut s2, mut s3) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        let (px, pg) = (x.as_ptr(), g.as_ptr());
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 <= n <= x.len(), g.len(); unaligned loads.
            let d = _mm256_sub_ps(_mm256_loadu_ps(px.add(i)), kv);
            let b = _mm256_loadu_ps(pg.add(i));
            s0 = _mm256_add_ps(s0, b);
            s1 = _mm256_add_ps(s1, _mm256_mul_ps(b, d));
            s2 = _mm256_add_ps(s2, d);
            s3 = _mm256_add_ps(s3, _mm256_mul_ps(d, d));
            i += 8;
        }
        let mut acc = [[0f32; 8]; 4];
        for (a, v) in acc.iter_mut().zip([s0, s1, s2, s3]) {
            _mm256_storeu_ps(a.as_mut_ptr(), v);
        }
        slab_finish(k, acc, x, g)
    }

    /// # Safety
    /// The CPU must support AVX2 (checked by `has_avx2()`).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn wide_sum_avx2(v: &[f32]) -> f32 {
        let whole = v.len() / 32 * 32;
        let p = v.as_ptr();
        let (mut a0, mut a1, mut a2, mut a3) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        let mut i = 0;
        while i < whole {
            // SAFETY: i + 32 <= whole <= v.len().
            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p.add(i)));
            a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p.add(i + 8)));
            a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p.add(i + 16)));
            a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p.add(i + 24)));
            i += 32;
        }
        let h = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), a2), a3);
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), h);
        super::lanes_and_rest(lanes, &v[whole..])
    }

    /// # Safety
    /// The CPU must support AVX2 (checked by `has_avx2()`).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn eight_rows_avx2(
        block: &[f32],
        tables: &Buckets<'_>,
        xt: &mut [f32],
        o: &mut [f32],
    ) {
        let n = block.len() / 8;
        let tiles = n / 8;
        // count_sketch slices both to these sizes: never fails; it guards the pointer arithmetic below.
        assert!(block.len() == 8 * n && xt.len() == 8 * n);
        for t in 0..tiles {
            let c = t * 8;
            // SAFETY: rows q < 8 and columns c..c + 8 <= n lie inside `block` (8 x n), and the eight
            // stores go to xt[(c + i) * 8..][..8], inside `xt` (n x 8); unaligned loads and stores.
            unsafe {
                let p = block.as_ptr().add(c);
                let r: [__m256; 8] = std::array::from_fn(|q| _mm256_loadu_ps(p.add(q * n)));
                for (i, v) in transpose8(r).iter().enumerate() {
                    _mm256_storeu_ps(xt.as_mut_ptr().add((c + i) * 8), *v);
                }
            }
        }
        transpose8_scalar(block, xt, tiles * 8);
        gather8(tables, xt, o);
    }

    /// The 8 x 8 transpose of eight rows (the usual unpack, shuffle and lane-permute network).
    #[inline(always)]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        unsafe {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(s0, s4),
                _mm256_permute2f128_ps::<0x20>(s1, s5),
                _mm256_permute2f128_ps::<0x20>(s2, s6),
                _mm256_permute2f128_ps::<0x20>(s3, s7),
                _mm256_permute2f128_ps::<0x31>(s0, s4),
                _mm256_permute2f128_ps::<0x31>(s1, s5),
                _mm256_permute2f128_ps::<0x31>(s2, s6),
                _mm256_permute2f128_ps::<0x31>(s3, s7),
            ]
        }
    }

    /// # Safety
    /// The CPU must support AVX-512F (checked by `isa()`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn write_row_avx512(
        o: &mut [f32],
        gs: &[f32],
        a: &[f32],
        bias: bool,
        accumulate: bool,
    ) -> f32 {
        super::write_row_body(o, gs, a, bias, accumulate)
    }

    /// # Safety
    /// The CPU must support AVX2 (checked by `isa()`).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn write_row_avx2(
        o: &mut [f32],
        gs: &[f32],
        a: &[f32],
        bias: bool,
        accumulate: bool,
    ) -> f32 {
        super::write_row_body(o, gs, a, bias, accumulate)
    }
}

#[inline(always)]
fn write_row_body(o: &mut [f32], gs: &[f32], a: &[f32], bias: bool, accumulate: bool) -> f32 {
    let q = a.len();
    let (w, b) = o.split_at_mut(gs.len() * q);
    // A bias-only layer (frozen weight) has no weight block (and chunks_exact_mut(0) would panic).
    if q > 0 {
        for (block, &gj) in w.chunks_exact_mut(q).zip(gs) {
            if accumulate {
                block.iter_mut().zip(a).for_each(|(o, &v)| *o += gj * v);
            } else {
                block.iter_mut().zip(a).for_each(|(o, &v)| *o = gj * v);
            }
        }
    }
    if bias {
        if accumulate {
            b.iter_mut().zip(gs).for_each(|(o, &v)| *o += v);
        } else {
            b.copy_from_slice(gs);
        }
    }
    if accumulate {
        lane_sum_by(o, |x| x)
    } else {
        0.0
    }
}

/// A sum in 32 lanes (four vectors of eight), added up in a fixed order: a convolution's output gradient
/// is read once per step, and a single vector of lanes is one chain of dependent adds, a quarter of
/// what a core can issue. The AVX2 form makes the same additions in the same order: the same bits.
fn wide_sum(avx2: bool, v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the caller passes has_avx2().
        return unsafe { simd::wide_sum_avx2(v) };
    }
    let _ = avx2;
    let mut acc = [[0f32; 8]; 4];
    let chunks = v.chunks_exact(32);
    let rest = chunks.remainder();
    for c in chunks {
        for (k, vector) in acc.iter_mut().enumerate() {
            for (a, &x) in vector.iter_mut().zip(&c[8 * k..8 * k + 8]) {
                *a += x;
            }
        }
    }
    let mut lanes = [0f32; 8];
    for (j, l) in lanes.iter_mut().enumerate() {
        *l = ((acc[0][j] + acc[1][j]) + acc[2][j]) + acc[3][j];
    }
    lanes_and_rest(lanes, rest)
}

/// The last step of `wide_sum`, shared by its forms: the eight lanes, then the values past the last
/// whole 32, in order.
fn lanes_and_rest(lanes: [f32; 8], rest: &[f32]) -> f32 {
    let mut sum = 0f32;
    for &l in &lanes {
        sum += l;
    }
    for &x in rest {
        sum += x;
    }
    sum
}

/// A sum of f(x) in eight independent lanes (vectorized; a plain fold is one long chain of dependent
/// adds).
#[inline(always)]
fn lane_sum_by(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, s, Array2};

    /// The scatter the gathers must equal bit for bit: out[r, h(c)] += s(c) x[r, c], c increasing.
    fn scatter(x: ArrayView2<'_, f32>, h: &[u32], s: &[f32], k: usize) -> Array2<f32> {
        let mut out = Array2::<f32>::zeros((x.nrows(), k));
        for r in 0..x.nrows() {
            for c in 0..x.ncols() {
                out[[r, h[c] as usize]] += s[c] * x[[r, c]];
            }
        }
        out
    }

    /// (order, starts, signs in order) from per-column buckets and signs, as the Python side builds them.
    fn grouped(h: &[u32], s: &[f32], k: usize) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
        let mut order: Vec<u32> = (0..h.len() as u32).collect();
        order.sort_by_key(|&c| h[c as usize]); // stable: increasing columns within a bucket
        let mut starts = vec![0u32; k + 1];
        for &b in h {
            starts[b as usize + 1] += 1;
        }
        for j in 0..k {
            starts[j + 1] += starts[j];
        }
        let signs = order.iter().map(|&c| s[c as usize]).collect();
        (order, starts, signs)
    }

    /// A wide input x (rows x n), an output gradient g (rows x p) and count sketch tables into k buckets
    /// (order, starts, signs): the inputs of the fused kernels' tests.
    #[allow(clippy::type_complexity)]
    fn fused_case(
        rows: usize,
        n: usize,
        k: usize,
        p: usize,
    ) -> (Array2<f32>, Array2<f32>, (Vec<u32>, Vec<u32>, Vec<f32>)) {
        let x = Array2::from_shape_fn((rows, n), |(r, c)| {
            ((r * 31 + c * 7) % 13) as f32 * 0.37 - 2.1
        });
        let g = Array2::from_shape_fn((rows, p), |(r, j)| ((r + 3 * j) % 5) as f32 * 0.9 - 1.3);
        let h: Vec<u32> = (0..n as u32).map(|c| (c * 3 + 1) % k as u32).collect();
        let sg: Vec<f32> = (0..n)
            .map(|c| if c % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        (x, g, grouped(&h, &sg, k))
    }

    #[test]
    fn count_sketch_by_hand() {
        // Columns 0 and 2 go to bucket 1 with signs +1 and -1, column 1 to bucket 0 with sign -1.
        let x = array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]];
        let (o, st, sg) = grouped(&[1, 0, 1], &[1.0, -1.0, -1.0], 2);
        let t = Buckets {
            order: &o,
            starts: &st,
            signs: &sg,
        };
        assert_eq!(
            count_sketch(x.view(), &t).unwrap(),
            array![[-2.0f32, 1.0 - 3.0], [-5.0, 4.0 - 6.0]]
        );
    }

    #[test]
    fn count_sketch_equals_the_scatter_bit_for_bit() {
        // 43 rows (five blocks of eight and three left over), strided and contiguous, an empty bucket.
        let full = Array2::from_shape_fn((43, 26), |(r, c)| {
            ((r * 31 + c * 17) % 23) as f32 * 0.37 - 4.1
        });
        let h: Vec<u32> = (0..13).map(|c| [2u32, 0, 3, 3, 0][c % 5]).collect();
        let s: Vec<f32> = (0..13)
            .map(|c| if c % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        let (o, st, sg) = grouped(&h, &s, 5);
        let t = Buckets {
            order: &o,
            starts: &st,
            signs: &sg,
        };
        let view = full.slice(s![.., ..;2]);
        let want = scatter(view, &h, &s, 5);
        assert_eq!(count_sketch(view, &t).unwrap(), want);
        assert_eq!(count_sketch(view.to_owned().view(), &t).unwrap(), want);
        assert!(want.column(1).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn count_sketch_transposes_agree_bit_for_bit() {
        // The AVX2 tile transpose (where the CPU has it) and the scalar one, against the scatter: widths
        // of whole tiles only, tiles and a tail, and MNIST's 784 pixels to 102 buckets.
        for (n, k) in [(8usize, 3usize), (21, 4), (784, 102)] {
            let x = Array2::from_shape_fn((8, n), |(r, c)| {
                ((r * 131 + c * 71) % 97) as f32 * 0.13 - 6.2
            });
            let h: Vec<u32> = (0..n).map(|c| ((c * 37 + 5) % k) as u32).collect();
            let sg: Vec<f32> = (0..n)
                .map(|c| if (c * 7) % 3 == 0 { -1.0 } else { 1.0 })
                .collect();
            let (o, st, signs) = grouped(&h, &sg, k);
            let t = Buckets {
                order: &o,
                starts: &st,
                signs: &signs,
            };
            let want = scatter(x.view(), &h, &sg, k);
            let xs = x.as_slice().unwrap();
            for avx2 in [false, has_avx2()] {
                let mut xt = vec![0f32; n * 8];
                let mut out = vec![0f32; 8 * k];
                eight_rows(avx2, xs, &t, &mut xt, &mut out);
                assert_eq!(out, want.as_slice().unwrap(), "n = {n}, avx2 = {avx2}");
            }
        }
    }

    #[test]
    fn count_sketch_refuses_bad_tables() {
        let x = array![[1.0f32, 2.0]];
        let bad_starts = Buckets {
            order: &[0, 1],
            starts: &[0, 1],
            signs: &[1.0, 1.0],
        };
        assert!(count_sketch(x.view(), &bad_starts).is_err());
        let bad_column = Buckets {
            order: &[0, 2],
            starts: &[0, 2],
            signs: &[1.0, 1.0],
        };
        assert!(count_sketch(x.view(), &bad_column).is_err());
        let bad_signs = Buckets {
            order: &[0, 1],
            starts: &[0, 2],
            signs: &[1.0],
        };
        assert!(count_sketch(x.view(), &bad_signs).is_err());
        let unordered = Buckets {
            order: &[0, 1],
            starts: &[0, 2, 1, 2],
            signs: &[1.0, 1.0],
        };
        assert!(count_sketch(x.view(), &unordered).is_err());
    }

    #[test]
    fn outer_rows_by_hand_into_a_strided_slot() {
        let g = array![[1.0f32, 2.0], [3.0, -1.0]];
        let a = array![[10.0f32, 20.0, 30.0], [1.0, 0.0, -1.0]];
        let mut buf = Array2::<f32>::from_elem((2, 10), 7.0);
        outer_rows(
            g.view(),
            a.view(),
            2.0,
            true,
            false,
            buf.slice_mut(s![.., 1..9]),
        )
        .unwrap();
        let want = array![
            [7.0f32, 20.0, 40.0, 60.0, 40.0, 80.0, 120.0, 2.0, 4.0, 7.0],
            [7.0, 6.0, 0.0, -6.0, -2.0, 0.0, 2.0, 6.0, -2.0, 7.0],
        ];
        assert_eq!(buf, want);
        // A second call adds (a layer called twice), and the columns outside stay untouched.
        outer_rows(
            g.view(),
            a.view(),
            1.0,
            true,
            true,
            buf.slice_mut(s![.., 1..9]),
        )
        .unwrap();
        assert_eq!(buf[[0, 1]], 30.0);
        assert_eq!(buf[[1, 8]], -3.0);
        assert_eq!(buf[[0, 0]], 7.0);
        assert_eq!(buf[[1, 9]], 7.0);
    }

    #[test]
    fn count_outer_rows_equals_the_two_calls_bit_for_bit() {
        let (rows, n, k, p) = (11, 37, 5, 3); // 11 rows: a tile of eight and three more
        let (x, g, (order, starts, signs)) = fused_case(rows, n, k, p);
        let tables = Buckets {
            order: &order,
            starts: &starts,
            signs: &signs,
        };
        for (bias, accumulate) in [(true, false), (false, false), (true, true)] {
            let start = Array2::from_shape_fn((rows, p * k + p + 2), |(r, c)| (r + c) as f32 * 0.5);
            let width = p * k + if bias { p } else { 0 };
            let mut want = start.clone();
            let a = count_sketch(x.view(), &tables).unwrap();
            let want_finite = outer_rows(
                g.view(),
                a.view(),
                -1.5,
                bias,
                accumulate,
                want.slice_mut(s![.., 1..1 + width]),
            )
            .unwrap();
            let mut got = start.clone();
            let finite = count_outer_rows(
                g.view(),
                x.view(),
                &tables,
                -1.5,
                bias,
                accumulate,
                got.slice_mut(s![.., 1..1 + width]),
            )
            .unwrap();
            assert_eq!(got, want);
            assert_eq!(finite, want_finite);
        }
    }

    #[test]
    fn count_factors_then_expand_outer_equal_count_outer_rows_bit_for_bit() {
        let (rows, n, k, p) = (11, 37, 5, 3);
        let (x, g, (order, starts, signs)) = fused_case(rows, n, k, p);
        let tables = Buckets {
            order: &order,
            starts: &starts,
            signs: &signs,
        };
        for bias in [true, false] {
            for scale in [1.0f32, -2.5, 64.0] {
                let width = outer_width(p, k, bias);
                let mut want = Array2::<f32>::zeros((rows, width));
                let want_finite = count_outer_rows(
                    g.view(),
                    x.view(),
                    &tables,
                    scale,
                    bias,
                    false,
                    want.view_mut(),
                )
                .unwrap();
                // Factors into a strided slot of a wider buffer, as watch()'s block hands them out.
                let mut buf = Array2::<f32>::from_elem((rows, p + k + 2), 9.0);
                let finite = count_factors(
                    g.view(),
                    x.view(),
                    &tables,
                    scale,
                    buf.slice_mut(s![.., 1..1 + p + k]),
                )
                .unwrap();
                assert_eq!(finite, want_finite);
                assert!(buf
                    .column(0)
                    .iter()
                    .chain(buf.column(p + k + 1))
                    .all(|&v| v == 9.0));
                let f = buf.slice(s![.., 1..1 + p + k]).to_owned();
                let mut got = vec![0f32; rows * width];
                expand_outer(f.as_slice().unwrap(), p + k, p, bias, &mut got).unwrap();
                assert_eq!(got, want.as_slice().unwrap(), "bias {bias}, scale {scale}");
            }
        }
        // The finite flag is count_outer_rows' for values past f32 too.
        let huge = Array2::from_elem((rows, p), 1e30f32);
        let mut f = Array2::<f32>::zeros((rows, p + k));
        let mut r = Array2::<f32>::zeros((rows, outer_width(p, k, true)));
        assert_eq!(
            count_factors(huge.view(), x.view(), &tables, 1e9, f.view_mut()).unwrap(),
            count_outer_rows(
                huge.view(),
                x.view(),
                &tables,
                1e9,
                true,
                false,
                r.view_mut()
            )
            .unwrap()
        );
    }

    #[test]
    fn outer_factors_then_expand_outer_equal_outer_rows_bit_for_bit() {
        let (rows, p) = (9, 4);
        let g = Array2::from_shape_fn((rows, p), |(r, j)| ((r * 3 + j) % 7) as f32 * 0.31 - 0.9);
        for q in [0, 1, 6] {
            // `a` a strided view (every other column of a wider array), as a projection may be.
            let wide = Array2::from_shape_fn((rows, 2 * q), |(r, c)| {
                ((r + 5 * c) % 11) as f32 * 0.7 - 3.0
            });
            let a = wide.slice(s![.., ..;2]);
            for bias in [true, false] {
                let mut want = Array2::<f32>::zeros((rows, outer_width(p, q, bias)));
                let want_finite =
                    outer_rows(g.view(), a, 3.5, bias, false, want.view_mut()).unwrap();
                let mut f = Array2::<f32>::zeros((rows, p + q));
                assert_eq!(
                    outer_factors(g.view(), a, 3.5, f.view_mut()).unwrap(),
                    want_finite
                );
                let mut got = vec![0f32; want.len()];
                expand_outer(f.as_slice().unwrap(), p + q, p, bias, &mut got).unwrap();
                assert_eq!(got, want.as_slice().unwrap(), "q {q}, bias {bias}");
            }
        }
        let mut bad = Array2::<f32>::from_elem((rows, p + 2), 7.0);
        assert!(outer_factors(g.view(), g.view(), 1.0, bad.view_mut()).is_err()); // p + q = 8, not 6
        assert!(bad.iter().all(|&v| v == 7.0));
    }

    #[test]
    fn count_factors_and_expand_outer_refuse_bad_shapes() {
        let x = array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]];
        let g = array![[1.0f32], [2.0]];
        let (order, starts, signs) = grouped(&[0, 1, 0], &[1.0, -1.0, 1.0], 2);
        let tables = Buckets {
            order: &order,
            starts: &starts,
            signs: &signs,
        };
        let mut out = Array2::<f32>::from_elem((2, 4), 7.0); // p + k = 3, not 4
        assert!(count_factors(g.view(), x.view(), &tables, 1.0, out.view_mut()).is_err());
        let one_row = array![[1.0f32]];
        let mut out = Array2::<f32>::from_elem((2, 3), 7.0);
        assert!(count_factors(one_row.view(), x.view(), &tables, 1.0, out.view_mut()).is_err());
        assert!(out.iter().all(|&v| v == 7.0));
        let f = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // two rows of 3
        let mut rows = vec![0f32; 2 * outer_width(1, 2, true)];
        assert!(expand_outer(&f, 3, 0, true, &mut rows).is_err());
        assert!(expand_outer(&f, 3, 4, true, &mut rows).is_err());
        assert!(expand_outer(&f, 4, 1, true, &mut rows).is_err());
        assert!(expand_outer(&f, 3, 1, true, &mut rows[1..]).is_err());
        expand_outer(&f, 3, 1, true, &mut rows).unwrap();
        assert_eq!(rows, [2.0, 3.0, 1.0, 20.0, 24.0, 4.0]);
        let mut none: Vec<f32> = vec![];
        expand_outer(&[1.0, 2.0], 1, 1, false, &mut none).unwrap(); // width 0: nothing to write
    }

    #[test]
    fn count_outer_rows_refuses_bad_input_and_writes_nothing() {
        let x = array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]];
        let g = array![[1.0f32], [2.0]];
        let (order, starts, signs) = grouped(&[0, 1, 0], &[1.0, -1.0, 1.0], 2);
        let tables = Buckets {
            order: &order,
            starts: &starts,
            signs: &signs,
        };
        let mut out = Array2::<f32>::from_elem((2, 3), 9.0);
        let mut refused = |x: ArrayView2<'_, f32>, bias: bool| {
            count_outer_rows(g.view(), x, &tables, 1.0, bias, false, out.view_mut()).is_err()
        };
        // x with other rows than g; a column beyond x; out of the wrong width
        assert!(refused(array![[1.0f32, 2.0, 3.0]].view(), true));
        assert!(refused(array![[1.0f32, 2.0], [3.0, 4.0]].view(), true));
        assert!(refused(x.view(), false));
        assert_eq!(out, Array2::<f32>::from_elem((2, 3), 9.0));
        // and by hand: a = [1 + 3, -2] = [4, -2] and [4 + 6, -5] = [10, -5]
        count_outer_rows(
            g.view(),
            x.view(),
            &tables,
            1.0,
            true,
            false,
            out.view_mut(),
        )
        .unwrap();
        assert_eq!(out, array![[4.0f32, -2.0, 1.0], [20.0, -10.0, 2.0]]);
    }

    #[test]
    fn outer_rows_bias_only() {
        let g = array![[2.0f32, -1.0]];
        let a = Array2::<f32>::zeros((1, 0));
        let mut out = Array2::<f32>::zeros((1, 2));
        outer_rows(g.view(), a.view(), 3.0, true, false, out.view_mut()).unwrap();
        assert_eq!(out, array![[6.0f32, -3.0]]);
    }

    #[test]
    fn outer_rows_without_bias_and_shape_checks() {
        let g = array![[2.0f32]];
        let a = array![[1.0f32, -1.0]];
        let mut out = Array2::<f32>::zeros((1, 2));
        outer_rows(g.view(), a.view(), 1.0, false, false, out.view_mut()).unwrap();
        assert_eq!(out, array![[2.0f32, -2.0]]);
        let mut wrong = Array2::<f32>::zeros((1, 3));
        assert!(outer_rows(g.view(), a.view(), 1.0, false, false, wrong.view_mut()).is_err());
    }

    #[test]
    fn every_instruction_set_writes_the_same_bits() {
        let p = 3;
        let q = 37; // not a multiple of any vector width
        let gs: Vec<f32> = (0..p).map(|j| 0.3 * j as f32 - 0.7).collect();
        let a: Vec<f32> = (0..q).map(|c| ((c * 13) % 7) as f32 * 1.1 - 3.3).collect();
        for accumulate in [false, true] {
            let start: Vec<f32> = (0..p * q + p).map(|i| (i % 5) as f32 * 0.25).collect();
            let mut want = start.clone();
            let sum = write_row_body(&mut want, &gs, &a, true, accumulate);
            for isa in [crate::kernels::Isa::Scalar, crate::kernels::isa()] {
                let mut got = start.clone();
                assert_eq!(write_row(isa, &mut got, &gs, &a, true, accumulate), sum);
                assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn outer_rows_says_whether_what_it_wrote_is_finite() {
        let g = array![[1.0f32, 2.0], [3.0, 4.0]];
        let a = array![[1.0f32], [-1.0]];
        let mut out = Array2::<f32>::zeros((2, 4));
        assert!(outer_rows(g.view(), a.view(), 1.0, true, false, out.view_mut()).unwrap());
        let nan = array![[1.0f32], [f32::NAN]];
        assert!(!outer_rows(g.view(), nan.view(), 1.0, true, false, out.view_mut()).unwrap());
        // Finite inputs whose products overflow: not finite either.
        let big = array![[3e38f32], [1.0]];
        assert!(!outer_rows(
            g.view(),
            big.view(),
            1.0,
            false,
            false,
            out.slice_mut(s![.., ..2])
        )
        .unwrap());
        // Large but finite products are finite.
        let (gb, ab) = (array![[1e18f32]], array![[-1e18f32]]);
        let mut one = Array2::<f32>::zeros((1, 2));
        assert!(outer_rows(gb.view(), ab.view(), 1.0, true, false, one.view_mut()).unwrap());
        assert_eq!(one[[0, 0]], -1e36);
        // Accumulating onto an infinity already in the rows: the flag covers the values left there.
        out.fill(0.0);
        out[[1, 3]] = f32::INFINITY;
        assert!(!outer_rows(g.view(), a.view(), 1.0, true, true, out.view_mut()).unwrap());
    }

    #[test]
    fn wide_sum_is_the_same_bits_with_every_instruction_set() {
        // Values of mixed signs and scales, so that the order of the additions shows in the bits.
        let v: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919 % 1013) as f32 - 500.0) * 1.37f32.powi(i % 23))
            .collect();
        for n in [0, 1, 7, 31, 32, 33, 64, 95, 1000] {
            let scalar = wide_sum(false, &v[..n]);
            assert_eq!(
                scalar.to_bits(),
                wide_sum(has_avx2(), &v[..n]).to_bits(),
                "n = {n}"
            );
            let exact: f64 = v[..n].iter().map(|&x| x as f64).sum();
            assert!(
                (scalar as f64 - exact).abs()
                    <= 1e-5 * v[..n].iter().map(|&x| x.abs() as f64).sum::<f64>()
            );
        }
    }

    #[test]
    fn channel_sums_by_hand_into_a_strided_slot() {
        // 2 examples, 2 channels, 3 positions: row r, column j = scale * sum of g[r, j, :].
        let g = [
            1.0f32, 2.0, 3.0, -1.0, 0.5, 0.5, 10.0, 0.0, 0.0, 4.0, 4.0, -4.0,
        ];
        let mut buf = Array2::<f32>::from_elem((2, 5), 7.0);
        assert!(channel_sums(&g, 2, 2, 2.0, false, buf.slice_mut(s![.., 1..3])).unwrap());
        assert_eq!(
            buf,
            array![[7.0, 12.0, 0.0, 7.0, 7.0], [7.0, 20.0, 8.0, 7.0, 7.0]]
        );
        assert!(channel_sums(&g, 2, 2, 1.0, true, buf.slice_mut(s![.., 1..3])).unwrap());
        assert_eq!(
            buf,
            array![[7.0, 18.0, 0.0, 7.0, 7.0], [7.0, 30.0, 12.0, 7.0, 7.0]]
        );
    }

    #[test]
    fn channel_sums_say_whether_they_are_finite_and_check_shapes() {
        let mut g = vec![1.0f32; 2 * 3 * 17]; // 17 positions: eight lanes and a remainder
        let mut out = Array2::<f32>::zeros((2, 3));
        assert!(channel_sums(&g, 2, 3, 0.5, false, out.view_mut()).unwrap());
        assert!(out.iter().all(|&v| v == 8.5));
        g[40] = f32::NAN;
        assert!(!channel_sums(&g, 2, 3, 0.5, false, out.view_mut()).unwrap());
        g[40] = 3e38;
        g[41] = 3e38; // finite values whose sum overflows
        assert!(!channel_sums(&g, 2, 3, 1.0, false, out.view_mut()).unwrap());
        // accumulate: the sum held afterwards decides
        out.fill(f32::INFINITY);
        assert!(!channel_sums(&g[..6], 2, 3, 1.0, true, out.view_mut()).unwrap());
        assert!(channel_sums(&[], 2, 3, 1.0, false, out.view_mut()).unwrap()); // no positions: zeros
        assert!(out.iter().all(|&v| v == 0.0));
        assert!(channel_sums(&g[..7], 2, 3, 1.0, false, out.view_mut()).is_err()); // 7 % 6 != 0
        assert!(channel_sums(&g, 2, 2, 1.0, false, out.view_mut()).is_err()); // out has 3 channels
        let mut empty = Array2::<f32>::zeros((0, 3));
        assert!(channel_sums(&[], 0, 3, 1.0, false, empty.view_mut()).unwrap());
    }

    /// `n` values with a large mean (the sums must not cancel) and `n` gradients, for the definition tests.
    fn norm_case(n: usize) -> (Vec<f32>, Vec<f32>) {
        let x = (0..n)
            .map(|i| 100.0 + ((i * 37 % 23) as f32) * 0.25)
            .collect();
        let g = (0..n).map(|i| ((i * 11 % 7) as f32) - 3.0).collect();
        (x, g)
    }

    /// Row r's channel j of `norm_sums`' output (weight and bias columns, eps 1e-5) against the definition
    /// with the given statistics, in f64.
    fn assert_norm_cell(
        x: &[f32],
        g: &[f32],
        out: &Array2<f32>,
        (r, j, c, p): (usize, usize, usize, usize),
        (mean, var): (f64, f64),
    ) {
        let span = (r * c + j) * p..(r * c + j + 1) * p;
        let gx: f64 = x[span.clone()]
            .iter()
            .zip(&g[span.clone()])
            .map(|(&a, &b)| b as f64 * (a as f64 - mean) / (var + 1e-5).sqrt())
            .sum();
        let gs: f64 = g[span].iter().map(|&b| b as f64).sum();
        assert!(
            (out[(r, j)] as f64 - gx).abs() < 1e-4 * (1.0 + gx.abs()),
            "{gx} {out:?}"
        );
        assert_eq!(out[(r, c + j)] as f64, gs);
    }

    #[test]
    fn norm_sums_by_hand() {
        // 2 examples, 1 channel, 2 positions: x = [[1, 3], [5, 7]] -> batch mean 4, var 5;
        // g = [[1, -1], [2, 0.5]]. eps = 0 keeps the numbers round.
        let x = [1.0f32, 3.0, 5.0, 7.0];
        let g = [1.0f32, -1.0, 2.0, 0.5];
        let s5 = 5f64.sqrt();
        let mut out = Array2::<f32>::zeros((2, 2));
        assert!(norm_sums(
            &x,
            &g,
            2,
            1,
            0.0,
            NormStats::Batch,
            true,
            true,
            2.0,
            false,
            out.view_mut()
        )
        .unwrap());
        // row 0: sum g x_hat = (1 * -3 + -1 * -1) / sqrt 5 = -2 / sqrt 5; sum g = 0
        // row 1: (2 * 1 + 0.5 * 3) / sqrt 5 = 3.5 / sqrt 5; sum g = 2.5
        let want = [[2.0 * -2.0 / s5, 0.0], [2.0 * 3.5 / s5, 5.0]];
        for r in 0..2 {
            for k in 0..2 {
                assert!((out[(r, k)] as f64 - want[r][k]).abs() < 1e-6, "{out:?}");
            }
        }
        // running statistics (mean 2, var 4 - eps 0.5): x_hat = (x - 2) / 2
        let mut w = Array2::<f32>::from_elem((2, 1), 1.0);
        let run: (&[f32], &[f32]) = (&[2.0], &[3.5]);
        assert!(norm_sums(
            &x,
            &g,
            2,
            1,
            0.5,
            NormStats::Running(run.0, run.1),
            true,
            false,
            1.0,
            true,
            w.view_mut()
        )
        .unwrap());
        // row 0: (1 * -0.5 + -1 * 0.5) = -1, plus the 1 held; row 1: 2 * 1.5 + 0.5 * 2.5 = 4.25, plus 1
        assert_eq!(w, array![[0.0], [5.25]]);
        // the bias alone
        let mut b = Array2::<f32>::zeros((2, 1));
        assert!(norm_sums(
            &x,
            &g,
            2,
            1,
            1e-5,
            NormStats::Batch,
            false,
            true,
            1.0,
            false,
            b.view_mut()
        )
        .unwrap());
        assert_eq!(b, array![[0.0], [2.5]]);
    }

    #[test]
    fn norm_sums_of_groups_by_hand() {
        // GroupNorm: each example's own statistics over a group of channels. 1 example, 2 channels, 2
        // positions: x = [[1, 3], [5, 7]], g = [[1, -1], [2, 0.5]], eps = 0.
        let x = [1.0f32, 3.0, 5.0, 7.0];
        let g = [1.0f32, -1.0, 2.0, 0.5];
        let s5 = 5f64.sqrt();
        let mut one = Array2::<f32>::zeros((1, 4));
        let stats = NormStats::Groups(1);
        assert!(norm_sums(
            &x,
            &g,
            1,
            2,
            0.0,
            stats,
            true,
            true,
            1.0,
            false,
            one.view_mut()
        )
        .unwrap());
        // one group: mean 4, var 5; channel 0: (1 * -3 + -1 * -1) / sqrt 5, channel 1: (2 * 1 + 0.5 * 3) / sqrt 5
        let want = [-2.0 / s5, 3.5 / s5, 0.0, 2.5];
        for (k, w) in want.iter().enumerate() {
            assert!((one[(0, k)] as f64 - w).abs() < 1e-6, "{one:?}");
        }
        // a group a channel: means 2 and 6, variances 1: x_hat = [-1, 1] in both
        let mut two = Array2::<f32>::zeros((1, 2));
        let stats = NormStats::Groups(2);
        assert!(norm_sums(
            &x,
            &g,
            1,
            2,
            0.0,
            stats,
            true,
            false,
            1.0,
            false,
            two.view_mut()
        )
        .unwrap());
        assert_eq!(two, array![[-2.0, -1.5]]);
    }

    #[test]
    fn norm_sums_of_groups_match_the_definition_and_check_groups() {
        // 3 examples, 4 channels in 2 groups, 19 positions, a large mean
        let (rows, c, groups, p) = (3usize, 4usize, 2usize, 19usize);
        let (x, g) = norm_case(rows * c * p);
        let stats = NormStats::Groups(groups);
        let mut out = Array2::<f32>::zeros((rows, 2 * c));
        assert!(norm_sums(
            &x,
            &g,
            rows,
            c,
            1e-5,
            stats,
            true,
            true,
            1.0,
            false,
            out.view_mut()
        )
        .unwrap());
        let per = c / groups;
        for r in 0..rows {
            for q in 0..groups {
                let span = (r * c + q * per) * p..(r * c + (q + 1) * per) * p;
                let n = span.len() as f64;
                let mean = x[span.clone()].iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = x[span]
                    .iter()
                    .map(|&v| (v as f64 - mean).powi(2))
                    .sum::<f64>()
                    / n;
                for j in q * per..(q + 1) * per {
                    assert_norm_cell(&x, &g, &out, (r, j, c, p), (mean, var));
                }
            }
        }
        let before = out.clone();
        for groups in [0, 3, 8] {
            // none, 3 and 8 do not divide 4 channels
            let stats = NormStats::Groups(groups);
            assert!(norm_sums(
                &x,
                &g,
                rows,
                c,
                1e-5,
                stats,
                true,
                true,
                1.0,
                true,
                out.view_mut()
            )
            .is_err());
        }
        assert_eq!(out, before); // refused: nothing written
    }

    #[test]
    fn norm_slab_sums_are_the_same_bits_with_avx2() {
        let x: Vec<f32> = (0..37)
            .map(|i| 50.0 + (i * 13 % 17) as f32 * 0.37)
            .collect();
        let g: Vec<f32> = (0..37)
            .map(|i| ((i * 7 % 11) as f32) * 0.21 - 1.0)
            .collect();
        let (a, b) = (slab_sums(&x, &g), Slab::of(has_avx2(), &x, &g));
        assert_eq!([a.k, a.g, a.gd, a.d, a.dd], [b.k, b.g, b.gd, b.d, b.dd]);
        assert_eq!(a.k, 50.0);
    }

    #[test]
    fn norm_sums_match_the_definition_and_check_shapes() {
        // 3 examples, 2 channels, 19 positions (two lanes of eight and a remainder), a large mean
        let (rows, c, p) = (3usize, 2usize, 19usize);
        let (x, g) = norm_case(rows * c * p);
        let mut out = Array2::<f32>::zeros((rows, 2 * c));
        assert!(norm_sums(
            &x,
            &g,
            rows,
            c,
            1e-5,
            NormStats::Batch,
            true,
            true,
            1.0,
            false,
            out.view_mut()
        )
        .unwrap());
        for j in 0..c {
            let vals: Vec<f64> = (0..rows)
                .flat_map(|r| {
                    x[(r * c + j) * p..(r * c + j + 1) * p]
                        .iter()
                        .map(|&v| v as f64)
                })
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / vals.len() as f64;
            for r in 0..rows {
                assert_norm_cell(&x, &g, &out, (r, j, c, p), (mean, var));
            }
        }
        let mut bad = Array2::<f32>::zeros((rows, c));
        {
            let mut refused = |x: &[f32], g: &[f32], eps: f64, stats: NormStats<'_>, bias: bool| {
                norm_sums(
                    x,
                    g,
                    rows,
                    c,
                    eps,
                    stats,
                    true,
                    bias,
                    1.0,
                    false,
                    bad.view_mut(),
                )
                .is_err()
            };
            assert!(refused(&x, &g, 1e-5, NormStats::Batch, true)); // weight and bias: 2c columns, out has c
            assert!(refused(&x[1..], &g[1..], 1e-5, NormStats::Batch, false)); // not a multiple of rows x c
            assert!(refused(&x, &g[1..], 1e-5, NormStats::Batch, false)); // x and g differ in length
            let short: (&[f32], &[f32]) = (&[0.0], &[1.0, 1.0]);
            assert!(refused(
                &x,
                &g,
                1e-5,
                NormStats::Running(short.0, short.1),
                false
            )); // 1 and 2 running values for 2 channels
            assert!(refused(&x, &g, f64::NAN, NormStats::Batch, false));
        }
        assert!(bad.iter().all(|&v| v == 0.0)); // refused: nothing written
        let mut inf = g.clone();
        inf[5] = f32::INFINITY;
        assert!(!norm_sums(
            &x,
            &inf,
            rows,
            c,
            1e-5,
            NormStats::Batch,
            false,
            true,
            1.0,
            false,
            bad.view_mut()
        )
        .unwrap());
        let mut empty = Array2::<f32>::zeros((0, 2 * c));
        assert!(norm_sums(
            &[],
            &[],
            0,
            c,
            1e-5,
            NormStats::Batch,
            true,
            true,
            1.0,
            false,
            empty.view_mut()
        )
        .unwrap());
    }
}
