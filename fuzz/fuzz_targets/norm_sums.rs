//! `sketch_rows::norm_sums` (BatchNorm's and GroupNorm's rows in one pass) on arbitrary shapes,
//! statistics, flags and values (NaN, Inf, huge and tiny values included): no panic; a refused call
//! writes nothing; an accepted one says truly whether every value of the rows is finite and, where the
//! inputs are ordinary numbers, equals the rows' definition computed in f64.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ndarray::Array2;
use torchgrab::sketch_rows::{norm_sums, NormStats};

mod bytes;
use bytes::Bytes;

/// The rows by their definition, in f64: per row and channel sum g (x - mean) / sqrt(var + eps), then
/// sum g; and a bound on the float32 error of the kernel's form (the sum of the terms' sizes).
#[allow(clippy::too_many_arguments)]
fn definition(
    x: &[f32],
    g: &[f32],
    rows: usize,
    c: usize,
    p: usize,
    eps: f64,
    stats: NormStats<'_>,
    weight: bool,
    bias: bool,
) -> (Vec<f64>, Vec<f64>) {
    let at = |r: usize, j: usize| (r * c + j) * p..(r * c + j + 1) * p;
    let moments = |cells: &[(usize, usize)]| {
        let vals: Vec<f64> = cells
            .iter()
            .flat_map(|&(r, j)| x[at(r, j)].iter().map(|&v| v as f64))
            .collect();
        let n = vals.len().max(1) as f64;
        let mean = vals.iter().sum::<f64>() / n;
        (
            mean,
            vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n,
        )
    };
    let stat = |r: usize, j: usize| match stats {
        NormStats::Running(m, v) => (m[j] as f64, v[j] as f64),
        NormStats::Batch => moments(&(0..rows).map(|r| (r, j)).collect::<Vec<_>>()),
        NormStats::Groups(groups) => {
            let per = c / groups;
            let q = j / per;
            moments(&(q * per..(q + 1) * per).map(|j| (r, j)).collect::<Vec<_>>())
        }
    };
    let width = c * (weight as usize + bias as usize);
    let (mut want, mut size) = (vec![0.0; rows * width], vec![0.0; rows * width]);
    for r in 0..rows {
        for j in 0..c {
            let (mean, var) = stat(r, j);
            let inv = 1.0 / (var + eps).sqrt();
            let span = at(r, j);
            let terms = x[span.clone()].iter().zip(&g[span.clone()]);
            if weight {
                want[r * width + j] = terms
                    .clone()
                    .map(|(&a, &b)| b as f64 * (a as f64 - mean) * inv)
                    .sum();
                size[r * width + j] = terms
                    .map(|(&a, &b)| (b as f64 * (a as f64 - mean) * inv).abs())
                    .sum();
            }
            if bias {
                let col = r * width + if weight { c + j } else { j };
                want[col] = g[span.clone()].iter().map(|&b| b as f64).sum();
                size[col] = g[span].iter().map(|&b| (b as f64).abs()).sum();
            }
        }
    }
    (want, size)
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let rows = bytes.u8() as usize % 5;
    let c = 1 + bytes.u8() as usize % 6;
    let p = bytes.u8() as usize % 20; // past two lanes of eight
    let (weight, bias, accumulate) = {
        let f = bytes.u8();
        (f & 1 == 1, f & 2 == 2, f & 4 == 4)
    };
    let wild = bytes.u8() % 4 == 0; // NaN, Inf, huge values; otherwise a grid of ordinary numbers
    let value = |bytes: &mut Bytes| match bytes.u8() % 16 {
        0 if wild => f32::from_bits(bytes.u32()),
        1 if wild => 3e30,
        k => 100.0 + (k as f32 - 8.0) * 0.375, // a large mean: the sums must not cancel
    };
    let len = rows * c * p;
    let x: Vec<f32> = (0..len + (bytes.u8() % 8 == 0) as usize)
        .map(|_| value(&mut bytes))
        .collect();
    let g: Vec<f32> = (0..len).map(|_| value(&mut bytes) - 100.0).collect();
    let (mean, var): (Vec<f32>, Vec<f32>) = {
        let m = c + (bytes.u8() % 8 == 0) as usize;
        (
            (0..m).map(|_| value(&mut bytes)).collect(),
            (0..m).map(|_| (value(&mut bytes) - 100.0).abs()).collect(),
        )
    };
    let stats = match bytes.u8() % 3 {
        0 => NormStats::Batch,
        1 => NormStats::Running(&mean, &var),
        _ => NormStats::Groups(bytes.u8() as usize % 8),
    };
    let eps = match bytes.u8() % 8 {
        0 => f64::NAN,
        1 => -1e-5,
        2 => 0.0,
        _ => 1e-5,
    };
    let scale = if wild {
        f32::from_bits(bytes.u32())
    } else {
        0.5
    };
    let width = c * (weight as usize + bias as usize) + (bytes.u8() % 8 == 0) as usize;
    let mut out = Array2::<f32>::from_elem((rows, width), 1.0);
    let before = out.clone();
    match norm_sums(
        &x,
        &g,
        rows,
        c,
        eps,
        stats,
        weight,
        bias,
        scale,
        accumulate,
        out.view_mut(),
    ) {
        Err(_) => assert_eq!(out, before, "a refused call wrote"),
        Ok(finite) => {
            assert_eq!(finite, out.iter().all(|v| v.is_finite()), "{out:?}");
            if wild || eps.is_nan() || p == 0 {
                return;
            }
            let (want, size) = definition(&x[..len], &g, rows, c, p, eps, stats, weight, bias);
            for (i, (&got, (&w, &s))) in out.iter().zip(want.iter().zip(&size)).enumerate() {
                let w = scale as f64 * w + if accumulate { 1.0 } else { 0.0 };
                if w.is_finite() && s.is_finite() {
                    assert!(
                        (got as f64 - w).abs() <= 1e-4 * (1.0 + s),
                        "column {i}: {got} against {w} ({s})"
                    );
                }
            }
        }
    }
});
