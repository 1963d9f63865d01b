//! Random projection for any balancing ordering: balance P g (k numbers) instead of g (d numbers), with
//! P a seeded k x d Johnson-Lindenstrauss sketch. P is a pure function of (seed, d, k): it is generated
//! in column blocks from the seed whenever it is needed and cached only when small, so a large sketch is
//! never stored. The running sums, stored gradients and per-unit balancing cost all drop from d to k.

use crate::batch::Batch;
use crate::elem::{GradElem, Scratch};
use crate::error::{GrabError, Result};
use crate::rng::{stream, Rng};

/// Columns generated together from one RNG stream; a block of P is k x BLOCK numbers.
const BLOCK: usize = 256;
/// A sketch of at most this many entries (32 MiB of f64) is generated once and kept.
const CACHE_ENTRIES: usize = 1 << 22;
/// The sparse sketch's non-zeros are kept up to this many (8 bytes each: 256 MiB).
const SPARSE_CACHE_NONZEROS: usize = 1 << 25;

/// Non-zeros of a sparse sketch, column by column: column c's entries are `rows[starts[c]..starts[c+1]]`
/// with signs `negative[..]` (value -v when true, +v otherwise).
#[derive(Debug, Clone, Default)]
pub struct SparseColumns {
    starts: Vec<usize>,
    rows: Vec<u32>,
    negative: Vec<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SketchKind {
    /// Entries N(0, 1/k).
    Gaussian,
    /// Li, Hastie and Church's very sparse sketch: with s = sqrt(d), entries sqrt(s/k) * (+1, 0, -1)
    /// with probabilities (1/(2s), 1 - 1/s, 1/(2s)). Only the ~k sqrt(d) non-zeros are generated (by
    /// geometric skipping) and kept, column by column; applying it costs O(k sqrt(d)) per unit.
    Sparse,
    /// P = I (k must equal d): balancing the projection is then balancing the gradient. For tests.
    Identity,
}

impl SketchKind {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "gaussian" => Ok(Self::Gaussian),
            "sparse" => Ok(Self::Sparse),
            "identity" => Ok(Self::Identity),
            other => Err(GrabError::state(format!(
                "unknown projection {other:?}; expected \"gaussian\", \"sparse\" or \"identity\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Gaussian => "gaussian",
            Self::Sparse => "sparse",
            Self::Identity => "identity",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionSpec {
    pub kind: SketchKind,
    pub k: usize,
}

/// The sketch for one (seed, d): what `project` multiplies by.
#[derive(Debug, Clone, PartialEq)]
pub struct Sketch {
    pub spec: ProjectionSpec,
    pub seed: u64,
    pub d: usize,
    /// The whole P (row-major k x d) when it is small; regenerated per block otherwise.
    cache: Scratch<Option<Vec<f64>>>,
    /// The sparse sketch's non-zeros, all columns, when not too many.
    sparse_cache: Scratch<Option<SparseColumns>>,
    /// Largest sketch (in entries) that is cached; larger ones are regenerated block by block.
    cache_limit: usize,
}

impl Sketch {
    pub fn new(spec: ProjectionSpec, seed: u64, d: usize) -> Result<Self> {
        if spec.k == 0 {
            return Err(GrabError::state(
                "the projection dimension k must be at least 1",
            ));
        }
        if spec.kind == SketchKind::Identity && spec.k != d {
            return Err(GrabError::shape(format!(
                "the identity projection needs k = d; got k = {} for gradients of dimension d = {d}",
                spec.k
            )));
        }
        Ok(Sketch {
            spec,
            seed,
            d,
            cache: Scratch(None),
            sparse_cache: Scratch(None),
            cache_limit: CACHE_ENTRIES,
        })
    }

    pub fn cached_bytes(&self) -> usize {
        self.cache.0.as_ref().map_or(0, |c| c.len() * 8)
            + self.sparse_cache.0.as_ref().map_or(0, |c| {
                c.starts.len() * 8 + c.rows.len() * 4 + c.negative.len()
            })
    }

    /// s = sqrt(d) and the non-zero magnitude sqrt(s / k) of the sparse sketch.
    fn sparse_params(&self) -> (f64, f64) {
        let s = (self.d as f64).sqrt().max(1.0);
        (s, (s / self.spec.k as f64).sqrt())
    }

    /// The non-zeros of the columns of block `b`: each of the k entries of a column is non-zero with
    /// probability 1/s, so the gaps between non-zero rows are geometric and drawn directly.
    fn sparse_block(&self, b: usize, into: &mut SparseColumns) {
        let k = self.spec.k;
        let width = BLOCK.min(self.d - b * BLOCK);
        let (s, _) = self.sparse_params();
        let log_q = (1.0 - 1.0 / s).ln(); // -inf when s = 1: every entry is non-zero
        let mut rng = Rng::new(self.seed, stream::PROJECTION, b as u64);
        if into.starts.is_empty() {
            into.starts.push(0);
        }
        for _ in 0..width {
            let mut row = 0usize;
            loop {
                // P(gap = g) = q^g (1 - q): g = floor(ln(u) / ln(q)) for u uniform in (0, 1].
                let u = 1.0 - rng.next_f64();
                let gap = (u.ln() / log_q).floor();
                if gap.is_nan() || gap >= (k - row) as f64 {
                    break;
                }
                row += gap as usize;
                into.rows.push(row as u32);
                into.negative.push(rng.next_u64() & 1 == 1);
                row += 1;
                if row >= k {
                    break;
                }
            }
            into.starts.push(into.rows.len());
        }
    }

    /// Block `b` of P: columns [b*BLOCK, min((b+1)*BLOCK, d)), row-major k x width.
    fn block(&self, b: usize) -> Vec<f64> {
        let k = self.spec.k;
        let width = BLOCK.min(self.d - b * BLOCK);
        let mut rng = Rng::new(self.seed, stream::PROJECTION, b as u64);
        let mut out = vec![0.0; k * width];
        match self.spec.kind {
            SketchKind::Identity => {
                for c in 0..width {
                    let j = b * BLOCK + c;
                    if j < k {
                        out[j * width + c] = 1.0;
                    }
                }
            }
            SketchKind::Gaussian => {
                let scale = 1.0 / (k as f64).sqrt();
                // Box-Muller: two normals per pair of uniforms; (1 - u) keeps the log argument in (0, 1].
                for pair in out.chunks_mut(2) {
                    let u1 = 1.0 - rng.next_f64();
                    let u2 = rng.next_f64();
                    let r = (-2.0 * u1.ln()).sqrt() * scale;
                    let t = std::f64::consts::TAU * u2;
                    pair[0] = r * t.cos();
                    if pair.len() > 1 {
                        pair[1] = r * t.sin();
                    }
                }
            }
            SketchKind::Sparse => {
                let (_, value) = self.sparse_params();
                let mut cols = SparseColumns::default();
                self.sparse_block(b, &mut cols);
                for c in 0..width {
                    for e in cols.starts[c]..cols.starts[c + 1] {
                        let v = if cols.negative[e] { -value } else { value };
                        out[cols.rows[e] as usize * width + c] = v;
                    }
                }
            }
        }
        out
    }

    fn blocks(&self) -> usize {
        self.d.div_ceil(BLOCK)
    }

    /// The rows of `batch` projected: B x k, row-major, f64. Each output is summed over d in column
    /// order, so the result does not depend on caching or on how the gradient is split into segments.
    pub fn project<G: GradElem>(&mut self, batch: &Batch<G>) -> Result<Vec<f64>> {
        if batch.dim() != self.d {
            return Err(GrabError::shape(format!(
                "expected gradients of dimension d = {} (fixed by the first step), got d = {}",
                self.d,
                batch.dim()
            )));
        }
        let (rows, k) = (batch.rows(), self.spec.k);
        let mut out = vec![0.0f64; rows * k];
        if self.spec.kind == SketchKind::Identity {
            for r in 0..rows {
                for (o, p) in batch.row(r).pieces() {
                    for (dst, x) in out[r * k + o..r * k + o + p.len()].iter_mut().zip(p) {
                        *dst = x.to_f64();
                    }
                }
            }
            return Ok(out);
        }
        if self.spec.kind == SketchKind::Sparse {
            self.project_sparse(batch, &mut out);
            return Ok(out);
        }
        if self.cache.0.is_none() && k.saturating_mul(self.d) <= self.cache_limit {
            let mut full = vec![0.0; k * self.d];
            for b in 0..self.blocks() {
                let width = BLOCK.min(self.d - b * BLOCK);
                for (r, row) in self.block(b).chunks(width).enumerate() {
                    full[r * self.d + b * BLOCK..r * self.d + b * BLOCK + width]
                        .copy_from_slice(row);
                }
            }
            self.cache.0 = Some(full);
        }
        let mut x = vec![0.0f64; BLOCK];
        for b in 0..self.blocks() {
            let lo = b * BLOCK;
            let width = BLOCK.min(self.d - lo);
            let generated;
            // (slice, row stride) of block b of P.
            let (p, stride, base) = match &self.cache.0 {
                Some(full) => (&full[..], self.d, lo),
                None => {
                    generated = self.block(b);
                    (&generated[..], width, 0)
                }
            };
            for r in 0..rows {
                gather(batch, r, lo, &mut x[..width]);
                let y = &mut out[r * k..(r + 1) * k];
                for (i, yi) in y.iter_mut().enumerate() {
                    let prow = &p[i * stride + base..i * stride + base + width];
                    let mut acc = 0.0;
                    for (a, b) in prow.iter().zip(&x[..width]) {
                        acc += a * b;
                    }
                    *yi += acc;
                }
            }
        }
        Ok(out)
    }
}

impl Sketch {
    /// y_i += sum over columns j (in increasing order) of P_ij x_j, visiting only P's non-zeros.
    fn project_sparse<G: GradElem>(&mut self, batch: &Batch<G>, out: &mut [f64]) {
        let (rows, k) = (batch.rows(), self.spec.k);
        let (s, value) = self.sparse_params();
        let expected_nonzeros = (k as f64 * self.d as f64 / s) as usize;
        let cache = expected_nonzeros <= SPARSE_CACHE_NONZEROS && self.cache_limit > 0;
        if self.sparse_cache.0.is_none() && cache {
            let mut all = SparseColumns::default();
            for b in 0..self.blocks() {
                self.sparse_block(b, &mut all);
            }
            self.sparse_cache.0 = Some(all);
        }
        let mut x = vec![0.0f64; BLOCK];
        let mut generated = SparseColumns::default();
        for b in 0..self.blocks() {
            let lo = b * BLOCK;
            let width = BLOCK.min(self.d - lo);
            let (cols, first) = match &self.sparse_cache.0 {
                Some(all) => (all, lo),
                None => {
                    generated.starts.clear();
                    generated.rows.clear();
                    generated.negative.clear();
                    self.sparse_block(b, &mut generated);
                    (&generated, 0)
                }
            };
            for r in 0..rows {
                gather(batch, r, lo, &mut x[..width]);
                let y = &mut out[r * k..(r + 1) * k];
                for (c, &xc) in x[..width].iter().enumerate() {
                    let col = first + c;
                    for e in cols.starts[col]..cols.starts[col + 1] {
                        let v = if cols.negative[e] { -value } else { value };
                        y[cols.rows[e] as usize] += v * xc;
                    }
                }
            }
        }
    }
}

/// Copy columns [lo, lo + out.len()) of row r (across segment boundaries) into `out` as f64.
fn gather<G: GradElem>(batch: &Batch<G>, r: usize, lo: usize, out: &mut [f64]) {
    let hi = lo + out.len();
    for (o, p) in batch.row(r).pieces() {
        let (start, end) = (lo.max(o), hi.min(o + p.len()));
        if start < end {
            for j in start..end {
                out[j - lo] = p[j - o].to_f64();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: SketchKind, k: usize) -> ProjectionSpec {
        ProjectionSpec { kind, k }
    }

    #[test]
    fn identity_projection_is_the_gradient() {
        let g = [1.5, -2.0, 0.25, 3.0, 4.0, -1.0];
        let batch = Batch::from_slice(&g, 2, 3).unwrap();
        let mut s = Sketch::new(spec(SketchKind::Identity, 3), 0, 3).unwrap();
        assert_eq!(s.project(&batch).unwrap(), g.to_vec());
        assert!(Sketch::new(spec(SketchKind::Identity, 2), 0, 3).is_err());
    }

    #[test]
    fn cached_and_blockwise_sketches_agree_and_are_seeded() {
        // d spans several blocks; a sketch over the cache limit regenerates the same blocks.
        let d = 3 * BLOCK + 17;
        let g: Vec<f64> = (0..2 * d).map(|i| ((i * 37) % 19) as f64 - 9.0).collect();
        let batch = Batch::from_slice(&g, 2, d).unwrap();
        for kind in [SketchKind::Gaussian, SketchKind::Sparse] {
            let mut cached = Sketch::new(spec(kind, 8), 7, d).unwrap();
            cached.cache_limit = usize::MAX;
            let mut streamed = Sketch::new(spec(kind, 8), 7, d).unwrap();
            let a = cached.project(&batch).unwrap();
            assert!(cached.cache.0.is_some() || cached.sparse_cache.0.is_some());
            // The product written out from the generated blocks.
            let mut expect = vec![0.0; 2 * 8];
            for b in 0..streamed.blocks() {
                let width = BLOCK.min(d - b * BLOCK);
                let p = streamed.block(b);
                for r in 0..2 {
                    for i in 0..8 {
                        let mut acc = 0.0;
                        for c in 0..width {
                            acc += p[i * width + c] * g[r * d + b * BLOCK + c];
                        }
                        expect[r * 8 + i] += acc;
                    }
                }
            }
            // The sparse path sums over non-zeros only, column by column: equal up to rounding.
            let close = |x: &[f64], y: &[f64]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-9);
            assert!(close(&a, &expect), "{kind:?}");
            if kind == SketchKind::Gaussian {
                assert_eq!(a, expect);
            }
            streamed.cache_limit = 0;
            assert_eq!(streamed.project(&batch).unwrap(), a);
            assert!(streamed.cache.0.is_none() && streamed.sparse_cache.0.is_none());
            let mut other_seed = Sketch::new(spec(kind, 8), 8, d).unwrap();
            assert_ne!(other_seed.project(&batch).unwrap(), a);
        }
    }

    #[test]
    fn sparse_sketch_has_about_k_sqrt_d_nonzeros_of_both_signs() {
        // d = 10,000, k = 64: s = 100, so each entry is non-zero with probability 1/100 and there are
        // about 64 x 10,000 / 100 = 6,400 non-zeros, half of each sign, of magnitude sqrt(100/64).
        let sk = Sketch::new(spec(SketchKind::Sparse, 64), 1, 10_000).unwrap();
        let mut all = SparseColumns::default();
        for b in 0..sk.blocks() {
            sk.sparse_block(b, &mut all);
        }
        let nnz = all.rows.len();
        assert!((5_800..7_000).contains(&nnz), "{nnz}");
        let negative = all.negative.iter().filter(|&&x| x).count();
        assert!((nnz * 2 / 5..nnz * 3 / 5).contains(&negative));
        assert!(all.rows.iter().all(|&r| r < 64));
        assert_eq!(all.starts.len(), 10_001);
        assert_eq!(sk.sparse_params().1, 1.25);
    }

    #[test]
    fn gaussian_sketch_roughly_preserves_norms() {
        // JL: E ||P x||^2 = ||x||^2; with k = 256 the ratio is within a few tens of percent.
        let d = 1000;
        let x: Vec<f64> = (0..d).map(|i| (i as f64 * 0.37).sin()).collect();
        let norm2: f64 = x.iter().map(|v| v * v).sum();
        let batch = Batch::from_slice(&x, 1, d).unwrap();
        for kind in [SketchKind::Gaussian, SketchKind::Sparse] {
            let y = Sketch::new(spec(kind, 256), 3, d)
                .unwrap()
                .project(&batch)
                .unwrap();
            let ratio = y.iter().map(|v| v * v).sum::<f64>() / norm2;
            assert!((0.6..1.4).contains(&ratio), "{kind:?}: ratio {ratio}");
        }
    }
}
