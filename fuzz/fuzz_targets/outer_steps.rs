//! `Sampler::step_outer` (rows given by their factors, formed a chunk at a time where they are balanced)
//! against `Sampler::step` on the rows written out, on arbitrary sizes, orderings and values (NaN, Inf
//! and values whose products overflow included): no panic; both agree on success and on state, bit
//! for bit; a refused step changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ndarray::ArrayView2;
use torchgrab::batch::Batch;
use torchgrab::sampler::{Config, OrderingKind, Sampler, ORDERING_NAMES};

mod bytes;
use bytes::Bytes;

/// The rows by their definition: g_j a_c at column j q + c, then g_j with `bias`.
fn rows_of(f: &[f32], p: usize, q: usize, bias: bool) -> Vec<f32> {
    let mut out = Vec::new();
    for r in f.chunks(p + q) {
        let (g, a) = r.split_at(p);
        for &gj in g {
            out.extend(a.iter().map(|&ac| gj * ac));
        }
        if bias {
            out.extend_from_slice(g);
        }
    }
    out
}

fn run<S: torchgrab::elem::StateElem>(mut bytes: Bytes) {
    let kind = ORDERING_NAMES[bytes.u8() as usize % ORDERING_NAMES.len()];
    let n = 1 + bytes.u8() as usize % 64;
    let p = bytes.u8() as usize % 4; // 0 is refused
    let q = bytes.u8() as usize % 5;
    let bias = bytes.u8() & 1 == 1;
    let mut cfg = Config::new(OrderingKind::parse(kind).unwrap(), n, bytes.u8() as u64);
    cfg.random_signs = bytes.u8() & 1 == 1 && kind != "greedy";
    let mut by_factors = Sampler::<S>::new(cfg).unwrap();
    let mut by_rows = by_factors.clone();
    for epoch in 0..3u64 {
        let order = by_factors.begin_epoch(epoch).to_vec();
        assert_eq!(by_rows.begin_epoch(epoch), &order[..]);
        let mut at = 0;
        while at < n && !bytes.0.is_empty() {
            let b = (bytes.u8() as usize % 48).min(n - at); // past two chunks of 16 rows
            let idx: Vec<u32> = if bytes.u8().is_multiple_of(8) {
                (0..b).map(|_| bytes.u32() % (n as u32 + 2)).collect()
            } else {
                order[at..at + b].to_vec()
            };
            let f: Vec<f32> = (0..b * (p + q))
                .map(|_| match bytes.u8() % 16 {
                    0 => f32::from_bits(bytes.u32()), // NaN, Inf, subnormals
                    1 => 3e30,                        // products past f32
                    k => (k as f32 - 8.0) * 0.375,
                })
                .collect();
            let before = by_factors.clone();
            let r1 = ArrayView2::from_shape((b, p + q), &f[..])
                .map_err(|e| e.to_string())
                .and_then(|v| {
                    by_factors
                        .step_outer(v, p, bias, &idx)
                        .map_err(|e| e.to_string())
                });
            if p == 0 {
                assert!(r1.is_err(), "p = 0 must be refused");
                assert_eq!(by_factors, before);
                at += b.max(1);
                continue;
            }
            let rows = rows_of(&f, p, q, bias);
            let width = p * q + if bias { p } else { 0 };
            let r2 =
                Batch::from_slice(&rows, b, width).and_then(|batch| by_rows.step(&batch, &idx));
            assert_eq!(r1.is_ok(), r2.is_ok(), "{r1:?} vs {r2:?}");
            if r1.is_err() {
                assert_eq!(by_factors, before, "a refused step changed the state");
            }
            assert_eq!(by_factors, by_rows, "factors and rows disagree");
            at += b.max(1);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    if bytes.u8() & 1 == 0 {
        run::<f32>(bytes);
    } else {
        run::<f64>(bytes);
    }
});
