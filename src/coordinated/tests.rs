//! The order server against plain single-process simulations of CD-GraB (GRAB.md).

use super::*;

/// A plain single-process CD-GraB: shards in rank order, pairs in visit order, one running sum.
/// `efficient`: each shard signs against the step's starting sum plus its own earlier pairs.
fn simulate(
    grads: &[Vec<Vec<f64>>],
    steps: &[usize],
    efficient: bool,
) -> (Vec<Vec<u32>>, Vec<f64>) {
    let w_count = grads.len();
    let m = grads[0].len();
    let d = grads[0][0].len();
    let mut s = vec![0.0; d];
    let mut front: Vec<Vec<u32>> = vec![Vec::new(); w_count];
    let mut back: Vec<Vec<u32>> = vec![Vec::new(); w_count];
    let mut visited = 0;
    let mut pending = false;
    for &rows in steps {
        let start = visited - pending as usize;
        let len = rows + pending as usize;
        let s0 = s.clone();
        for w in 0..w_count {
            let mut local = s0.clone();
            for p in 0..len / 2 {
                let (x, y) = (start + 2 * p, start + 2 * p + 1);
                let z: Vec<f64> = (0..d).map(|c| grads[w][x][c] - grads[w][y][c]).collect();
                let against = if efficient { &local } else { &s };
                let dot: f64 = (0..d).map(|c| against[c] * z[c]).sum();
                let eps = if dot <= 0.0 { 1.0 } else { -1.0 };
                (0..d).for_each(|c| s[c] += eps * z[c]);
                (0..d).for_each(|c| local[c] += eps * z[c]);
                let (f, b) = if eps > 0.0 { (x, y) } else { (y, x) };
                front[w].push(f as u32);
                back[w].push(b as u32);
            }
        }
        pending = len % 2 == 1;
        visited += rows;
    }
    let orders = (0..w_count)
        .map(|w| {
            let mut o = front[w].clone();
            let taken: std::collections::HashSet<u32> =
                front[w].iter().chain(&back[w]).copied().collect();
            o.extend((0..m as u32).filter(|i| !taken.contains(i)));
            o.extend(back[w].iter().rev());
            o
        })
        .collect();
    (orders, s)
}

#[test]
fn exact_mode_equals_the_single_process_simulation() {
    check_against_simulation(Mode::Exact);
}

#[test]
fn efficient_mode_equals_its_simulation() {
    check_against_simulation(Mode::Efficient);
}

#[test]
fn pipelined_rounds_equal_the_exact_simulation() {
    check_against_simulation(Mode::Pipelined);
}

fn test_grads(w_count: usize, m: usize, d: usize) -> Vec<Vec<Vec<f64>>> {
    let val = |w: usize, i: usize, c: usize| {
        (((w * 131 + i * 31 + c * 7) * 2654435761usize) % 1000) as f64 / 100.0 - 5.0
    };
    (0..w_count)
        .map(|w| {
            (0..m)
                .map(|i| (0..d).map(|c| val(w, i, c)).collect())
                .collect()
        })
        .collect()
}

/// Three replicas through one epoch of odd steps (pairs straddle steps) against the simulation;
/// pipelined rounds are exact CD-GraB, so they meet the exact simulation.
fn check_against_simulation(mode: Mode) {
    let grads = test_grads(3, 9, 5);
    let steps = [3usize, 2, 3];
    let mut reps = run_steps(&grads, &steps, mode);
    let efficient = matches!(mode, Mode::Efficient);
    let (want, s) = simulate(&grads, &steps, efficient);
    // The data tell the modes apart, so these tests can fail.
    assert_ne!(simulate(&grads, &steps, !efficient).0, want);
    for (a, b) in reps[0].running_sum().iter().zip(&s) {
        assert!((a - b).abs() < 1e-9);
    }
    for r in reps.iter_mut() {
        r.begin_epoch();
    }
    for (w, order) in want.iter().enumerate() {
        assert_eq!(reps[0].shard_order(w), &order[..]);
    }
}

#[test]
fn refuses_mismatched_gathers_without_changing_state() {
    let mut r = Coordinated::new(2, 0, 4).unwrap();
    r.begin_epoch();
    let g = [1.0, 2.0, 3.0, 4.0];
    let batch = Batch::from_slice(&g, 2, 2).unwrap();
    let before = r.replica_bytes();
    assert!(r.step_exact(&batch, &[0.0; 3]).is_err());
    assert!(r.decide(&batch, &[0.0; 3]).is_err());
    assert_eq!(r.replica_bytes(), before);
    assert!(Coordinated::new(2, 2, 4).is_err());
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Exact,
    Pipelined,
    Efficient,
}

/// One epoch of `steps` through W in-process replicas (what W ranks compute), then the next orders.
fn run_epoch(grads: &[Vec<Vec<f64>>], steps: &[usize], mode: Mode) -> Vec<Coordinated> {
    let mut reps = run_steps(grads, steps, mode);
    reps.iter_mut().for_each(|r| {
        r.begin_epoch();
    });
    reps
}

/// The steps of one epoch through W in-process replicas; checks after every step that they agree.
fn run_steps(grads: &[Vec<Vec<f64>>], steps: &[usize], mode: Mode) -> Vec<Coordinated> {
    let (w_count, m, d) = (grads.len(), grads[0].len(), grads[0][0].len());
    let mut reps: Vec<Coordinated> = (0..w_count)
        .map(|r| Coordinated::new(w_count, r, m).unwrap())
        .collect();
    reps.iter_mut().for_each(|r| {
        r.begin_epoch();
    });
    let mut visited = 0;
    for &rows in steps {
        let flats: Vec<Vec<f64>> = (0..w_count)
            .map(|w| grads[w][visited..visited + rows].concat())
            .collect();
        let batch = |w: usize| Batch::from_slice(&flats[w], rows, d).unwrap();
        let p_count = reps[0].pair_count(rows);
        match mode {
            Mode::Exact => {
                let gathered: Vec<f64> = (0..w_count)
                    .flat_map(|w| reps[w].local_diffs(&batch(w)).unwrap())
                    .collect();
                for (w, r) in reps.iter_mut().enumerate() {
                    r.step_exact(&batch(w), &gathered).unwrap();
                }
            }
            Mode::Pipelined => {
                let mut signs = Vec::new();
                for a in 0..w_count {
                    let payload = reps[a].own_round(&batch(a)).unwrap();
                    signs.extend_from_slice(&payload[..p_count]);
                    reps.iter_mut()
                        .for_each(|r| r.add_sum(&payload[p_count..]).unwrap());
                }
                for (w, r) in reps.iter_mut().enumerate() {
                    r.place_step(&batch(w), &signs).unwrap();
                }
            }
            Mode::Efficient => {
                let gathered: Vec<f64> = (0..w_count)
                    .flat_map(|w| reps[w].local_stats(&batch(w)).unwrap())
                    .collect();
                let sums: Vec<Vec<f64>> = reps
                    .iter_mut()
                    .enumerate()
                    .map(|(w, r)| r.decide(&batch(w), &gathered).unwrap())
                    .collect();
                let total: Vec<f64> = (0..d).map(|c| sums.iter().map(|v| v[c]).sum()).collect();
                reps.iter_mut().for_each(|r| r.add_sum(&total).unwrap());
            }
        }
        let first = reps[0].replica_bytes();
        assert!(reps.iter().all(|r| r.replica_bytes() == first));
        visited += rows;
    }
    reps
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn case() -> impl Strategy<Value = (Vec<Vec<Vec<f64>>>, Vec<usize>)> {
        (1usize..=4, 1usize..=10, 1usize..=4).prop_flat_map(|(w, m, d)| {
            // Quarter integers: every sum and product is exact in f64, so even ties must agree.
            let grads = proptest::collection::vec(
                proptest::collection::vec(
                    proptest::collection::vec((-12i32..=12).prop_map(|x| x as f64 / 4.0), d),
                    m,
                ),
                w,
            );
            // Step sizes that may stop before the end of the shard (unsigned units go to the middle).
            let steps = proptest::collection::vec(1usize..=4, 0..=m).prop_map(move |v| {
                let mut left = m;
                v.into_iter()
                    .filter_map(|k| {
                        let k = k.min(left);
                        left -= k;
                        (k > 0).then_some(k)
                    })
                    .collect::<Vec<_>>()
            });
            (grads, steps)
        })
    }

    proptest! {
        #[test]
        fn every_mode_gives_permutations_and_matches_its_simulation((grads, steps) in case()) {
            let m = grads[0].len();
            let (exact, _) = simulate(&grads, &steps, false);
            let (efficient, _) = simulate(&grads, &steps, true);
            for (mode, want) in [(Mode::Exact, &exact), (Mode::Pipelined, &exact), (Mode::Efficient, &efficient)] {
                let reps = run_epoch(&grads, &steps, mode);
                for (w, order) in want.iter().enumerate() {
                    let got = reps[0].shard_order(w);
                    let mut sorted = got.to_vec();
                    sorted.sort_unstable();
                    prop_assert_eq!(sorted, (0..m as u32).collect::<Vec<_>>());
                    prop_assert_eq!(got, &order[..], "mode {:?}, shard {}", mode, w);
                }
            }
        }
    }
}
