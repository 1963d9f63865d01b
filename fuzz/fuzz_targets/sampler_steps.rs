//! The kernels through `Sampler::step` on arbitrary sizes, segment layouts, element types and values
//! (NaN and Inf included): no panic; a refused step changes nothing; splitting the gradient into
//! segments does not change a single bit of the result; every order is a permutation.
#![no_main]

use half::{bf16, f16};
use libfuzzer_sys::fuzz_target;
use ndarray::ArrayView2;
use torchgrab::batch::Batch;
use torchgrab::elem::GradElem;
use torchgrab::sampler::{check_permutation, Config, OrderingKind, Sampler, ORDERING_NAMES};

mod bytes;
use bytes::Bytes;

/// Feed `rows` (row-major, width `widths.iter().sum()`) as one segment to `one` and as `widths`
/// segments to `split`; both must agree on success and on state.
fn step_both<G: GradElem, S: torchgrab::elem::StateElem>(
    one: &mut Sampler<S>,
    split: &mut Sampler<S>,
    rows: &[G],
    b: usize,
    widths: &[usize],
    idx: &[u32],
) {
    let d: usize = widths.iter().sum();
    let before = one.clone();
    let r1 = Batch::from_slice(rows, b, d).and_then(|batch| one.step(&batch, idx));
    // The same values laid out per segment (B x w_k each), as the Python side passes parameters.
    let mut segs: Vec<Vec<G>> = Vec::new();
    let mut off = 0;
    for &w in widths {
        segs.push(
            (0..b)
                .flat_map(|r| rows[r * d + off..r * d + off + w].to_vec())
                .collect(),
        );
        off += w;
    }
    let views: Vec<ArrayView2<G>> = segs
        .iter()
        .zip(widths)
        .map(|(s, &w)| ArrayView2::from_shape((b, w), s).unwrap())
        .collect();
    let r2 = Batch::from_views(&views).and_then(|batch| split.step(&batch, idx));
    assert_eq!(r1.is_ok(), r2.is_ok(), "{r1:?} vs {r2:?}");
    if r1.is_err() {
        assert_eq!(*one, before, "a refused step changed the state");
    }
    assert_eq!(one, split, "segmentation changed the result");
}

fn run<S: torchgrab::elem::StateElem>(mut bytes: Bytes) {
    let kind = ORDERING_NAMES[bytes.u8() as usize % ORDERING_NAMES.len()];
    let n = 1 + bytes.u8() as usize % 24;
    let nseg = 1 + bytes.u8() as usize % 4;
    let mut widths: Vec<usize> = (0..nseg).map(|_| bytes.u8() as usize % 6).collect();
    // Sometimes one wide segment (d >= 16,384: `grab`'s two-row pass and the two-thread passes) among
    // the small ones; its values come from a PRNG seeded by the input, not from the input itself.
    let wide = if bytes.u8().is_multiple_of(4) {
        let at = bytes.u8() as usize % (nseg + 1);
        let w = (1 << 14) + bytes.u8() as usize * 37;
        widths.insert(at, w);
        Some((widths[..at].iter().sum::<usize>(), w, bytes.u32() | 1))
    } else {
        None
    };
    let d: usize = widths.iter().sum();
    let mut cfg = Config::new(OrderingKind::parse(kind).unwrap(), n, bytes.u8() as u64);
    cfg.random_signs = bytes.u8() & 1 == 1 && kind != "greedy"; // greedy has no signs
    cfg.first_epoch_random = bytes.u8() & 1 == 1;
    let mut one = Sampler::<S>::new(cfg).unwrap();
    let mut split = one.clone();
    for epoch in 0..3u64 {
        let order = one.begin_epoch(epoch).to_vec();
        assert_eq!(split.begin_epoch(epoch), &order[..]);
        if kind != "wr" {
            check_permutation(&order, n, "order").unwrap();
        }
        let mut at = 0;
        while at < n && !bytes.0.is_empty() {
            let b = (bytes.u8() as usize % 5).min(n - at);
            // Mostly the next indices in order; sometimes arbitrary (repeats, out of range).
            let idx: Vec<u32> = if bytes.u8().is_multiple_of(8) {
                (0..b).map(|_| bytes.u32() % (n as u32 + 2)).collect()
            } else {
                order[at..at + b].to_vec()
            };
            let elem = bytes.u8() % 4;
            let mut x = wide.map_or(1, |(_, _, seed)| seed as u64 ^ (at as u64) << 32);
            let raw: Vec<u32> = (0..b * d)
                .map(|i| match wide {
                    Some((lo, w, _)) if (lo..lo + w).contains(&(i % d)) => {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0).to_bits()
                    }
                    _ => match bytes.u8() % 8 {
                        0 => bytes.u32(), // any bit pattern: NaN, Inf, subnormals
                        k => ((k as f32 - 4.0) * 0.75).to_bits(),
                    },
                })
                .collect();
            match elem {
                0 => {
                    let v: Vec<f32> = raw.iter().map(|&x| f32::from_bits(x)).collect();
                    step_both(&mut one, &mut split, &v, b, &widths, &idx);
                }
                1 => {
                    let v: Vec<f64> = raw.iter().map(|&x| f32::from_bits(x) as f64).collect();
                    step_both(&mut one, &mut split, &v, b, &widths, &idx);
                }
                2 => {
                    let v: Vec<f16> = raw.iter().map(|&x| f16::from_bits(x as u16)).collect();
                    step_both(&mut one, &mut split, &v, b, &widths, &idx);
                }
                _ => {
                    let v: Vec<bf16> = raw.iter().map(|&x| bf16::from_bits(x as u16)).collect();
                    step_both(&mut one, &mut split, &v, b, &widths, &idx);
                }
            }
            at += b.max(1);
        }
    }
    let restored =
        Sampler::import_state(one.export_state()).expect("an exported state is importable");
    assert_eq!(restored, one);
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    if bytes.u8() & 1 == 0 {
        run::<f32>(bytes);
    } else {
        run::<f64>(bytes);
    }
});
