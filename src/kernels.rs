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

#[inline(always)]
fn lanes_dot<S: GradElem, A: GradElem, B: GradElem>(
    acc_dot: &mut [f64; LANES],
    acc_norm: &mut [f64; LANES],
    base: usize,
    s: &[S],
    a: &[A],
    b: &[B],
) {
    let len = s.len();
    let (a, b) = (&a[..len], &b[..len]);
    let mut j = 0;
    while j < len && (base + j) % LANES != 0 {
        let l = (base + j) % LANES;
        let z = a[j].to_f64() - b[j].to_f64();
        acc_dot[l] += s[j].to_f64() * z;
        acc_norm[l] += z * z;
        j += 1;
    }
    let body_end = j + (len - j) / LANES * LANES;
    while j < body_end {
        for l in 0..LANES {
            let z = a[j + l].to_f64() - b[j + l].to_f64();
            acc_dot[l] += s[j + l].to_f64() * z;
            acc_norm[l] += z * z;
        }
        j += LANES;
    }
    while j < len {
        let l = (base + j) % LANES;
        let z = a[j].to_f64() - b[j].to_f64();
        acc_dot[l] += s[j].to_f64() * z;
        acc_norm[l] += z * z;
        j += 1;
    }
}

fn fold_lanes(acc: &[f64; LANES]) -> f64 {
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

fn chunk_dot<S: GradElem, A: GradElem, B: GradElem>(
    layout: &Layout,
    c: usize,
    s: &[S],
    a: &Pieces<A>,
    b: &Pieces<B>,
) -> (f64, f64) {
    let lo = c * CHUNK;
    let hi = (lo + CHUNK).min(layout.dim);
    let mut acc_dot = [0.0f64; LANES];
    let mut acc_norm = [0.0f64; LANES];
    for (k, st, en) in layout.overlaps(lo, hi) {
        let base = layout.offsets[k] + st;
        lanes_dot(
            &mut acc_dot,
            &mut acc_norm,
            base,
            &s[base..base + (en - st)],
            &a.slices[k][st..en],
            &b.slices[k][st..en],
        );
    }
    (fold_lanes(&acc_dot), fold_lanes(&acc_norm))
}

/// (<s, a - b>, ||a - b||^2), accumulated in f64 in the fixed order described above.
pub fn dot_diff<S: StateElem, A: GradElem, B: GradElem>(
    layout: &Layout,
    s: &[S],
    a: &Pieces<A>,
    b: &Pieces<B>,
) -> (f64, f64) {
    let chunks = layout.chunks();
    let mut dot = 0.0;
    let mut norm = 0.0;
    if layout.dim >= PARALLEL_MIN_DIM {
        let partials: Vec<(f64, f64)> = (0..chunks)
            .into_par_iter()
            .map(|c| chunk_dot(layout, c, s, a, b))
            .collect();
        for (d, n) in partials {
            dot += d;
            norm += n;
        }
    } else {
        for c in 0..chunks {
            let (d, n) = chunk_dot(layout, c, s, a, b);
            dot += d;
            norm += n;
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
    let apply =
        |c: usize, s_chunk: &mut [S], m_chunk: Option<&mut [S]>, g: Option<(&Pieces<G>, f64)>| {
            let lo = c * CHUNK;
            let hi = lo + s_chunk.len();
            let mut m_chunk = m_chunk;
            for (k, st, en) in layout.overlaps(lo, hi) {
                let rel = layout.offsets[k] + st - lo;
                let len = en - st;
                let (ak, bk) = (&a.slices[k][st..en], &b.slices[k][st..en]);
                let sk = &mut s_chunk[rel..rel + len];
                for j in 0..len {
                    sk[j] = S::from_f64(sk[j].to_f64() + coef * (ak[j].to_f64() - bk[j].to_f64()));
                }
                if let (Some(m), Some((g, inv_n))) = (m_chunk.as_deref_mut(), g) {
                    let gk = &g.slices[k][st..en];
                    let mk = &mut m[rel..rel + len];
                    for j in 0..len {
                        mk[j] = S::from_f64(mk[j].to_f64() + gk[j].to_f64() * inv_n);
                    }
                }
            }
        };
    let parallel = layout.dim >= PARALLEL_MIN_DIM;
    match mean {
        Some((m_next, g, inv_n)) => {
            if parallel {
                s.par_chunks_mut(CHUNK)
                    .zip(m_next.par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each(|(c, (sc, mc))| apply(c, sc, Some(mc), Some((g, inv_n))));
            } else {
                for (c, (sc, mc)) in s
                    .chunks_mut(CHUNK)
                    .zip(m_next.chunks_mut(CHUNK))
                    .enumerate()
                {
                    apply(c, sc, Some(mc), Some((g, inv_n)));
                }
            }
        }
        None => {
            if parallel {
                s.par_chunks_mut(CHUNK)
                    .enumerate()
                    .for_each(|(c, sc)| apply(c, sc, None, None));
            } else {
                for (c, sc) in s.chunks_mut(CHUNK).enumerate() {
                    apply(c, sc, None, None);
                }
            }
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
}
