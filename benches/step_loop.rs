//! The balancing kernels without Python: `MeanBalance::step` / `PairBalance::step` on float32 rows, in
//! a loop, for a given (d, B). Prints G elements/s (gradient elements balanced per second) and GB/s of
//! float32 gradient, the best of three timed runs.
//!
//!     cargo bench --bench step_loop -- grab 1e4 64 [seconds]
//!
//! Rows come from a 160 MiB pool, so large shapes read from main memory. Used to profile the kernels
//! (`perf record` on target/release/deps/step_loop-*) apart from the Python side of `step`.

use std::time::Instant;
use torchgrab::assembly::FrontBack;
use torchgrab::batch::Batch;
use torchgrab::kernels::{on_workers, Layout};
use torchgrab::mean_balance::MeanBalance;
use torchgrab::pair_balance::PairBalance;
use torchgrab::sign::SignRule;

fn main() {
    // `cargo bench` appends "--bench"; keep only the positional arguments.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let ordering = args.first().map_or("grab", |s| s.as_str()).to_string();
    let num = |i: usize, default: f64| {
        args.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(default)
    };
    let (d, b, secs) = (num(1, 1e4) as usize, num(2, 64.0) as usize, num(3, 1.0));
    assert!(
        ordering == "grab" || ordering == "pair",
        "ordering must be grab or pair"
    );
    let pool_rows = ((160usize << 20) / (4 * d * b)).max(2);
    let mut x = 12345u64;
    let pool: Vec<f32> = (0..pool_rows * b * d)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let layout = Layout::new(vec![d]);
    let n = 1000;
    let mut best = 0.0f64;
    for _ in 0..3 {
        let mut mean = MeanBalance::<f32>::new(d);
        let mut pair = PairBalance::<f32>::new(d);
        let mut rule = SignRule::deterministic();
        let (mut steps, mut k) = (0usize, 0usize);
        let mut assembler = FrontBack::new(n);
        let t0 = Instant::now();
        while t0.elapsed().as_secs_f64() < secs {
            if (k + 1) * b > n {
                // A new epoch's assembly (indices must be fresh within an epoch).
                assembler = FrontBack::new(n);
                mean.end_epoch(n);
                pair.end_epoch();
                k = 0;
            }
            let slot = steps % pool_rows;
            let batch = Batch::from_slice(&pool[slot * b * d..(slot + 1) * b * d], b, d).unwrap();
            let idx: Vec<u32> = ((k * b) as u32..((k + 1) * b) as u32).collect();
            // From a rayon worker, as `Sampler::step` runs it (see `kernels::on_workers`).
            on_workers(d, || {
                if ordering == "grab" {
                    mean.step(&layout, &batch, &idx, &mut assembler, &mut rule, n)
                } else {
                    pair.step(&layout, &batch, &idx, &mut assembler, &mut rule, n)
                }
            })
            .unwrap();
            k += 1;
            steps += 1;
        }
        best = best.max((steps * b * d) as f64 / t0.elapsed().as_secs_f64());
    }
    println!(
        "{ordering} d={d} B={b}: {:.3} G elements/s, {:.2} GB/s of float32 gradient",
        best / 1e9,
        best * 4.0 / 1e9
    );
}
