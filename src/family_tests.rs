//! Sampler-level tests of the ordering family (issue 4): hand-computed orders for `recursive` and
//! `recursive-pair`, their exact reductions to `grab` and `pair`, the identity projection, the
//! randomized sign rule, memory refusal, and the permutation / batching / checkpoint properties.

use crate::batch::Batch;
use crate::error::ErrorKind;
use crate::projection::{ProjectionSpec, SketchKind};
use crate::sampler::{check_permutation, Config, OrderingKind, Sampler};
use proptest::prelude::*;

fn config(kind: &str, n: usize, identity: bool) -> Config {
    let mut cfg = Config::new(OrderingKind::parse(kind).unwrap(), n, 0);
    cfg.first_epoch_random = !identity;
    cfg
}

fn rows_of(vectors: &[f64], d: usize, units: &[u32]) -> Vec<f64> {
    units
        .iter()
        .flat_map(|&i| vectors[i as usize * d..(i as usize + 1) * d].to_vec())
        .collect()
}

/// Run one epoch feeding the fixed `vectors` (n x d) in visit order, `per_step` rows a step; stop
/// after `limit` units (an early break) when given.
fn run_epoch(
    s: &mut Sampler<f64>,
    epoch: u64,
    vectors: &[f64],
    d: usize,
    per_step: usize,
    limit: Option<usize>,
) -> Vec<u32> {
    let order = s.begin_epoch(epoch).to_vec();
    let fed = limit.unwrap_or(order.len()).min(order.len());
    for chunk in order[..fed].chunks(per_step) {
        let rows = rows_of(vectors, d, chunk);
        s.step(&Batch::from_slice(&rows, chunk.len(), d).unwrap(), chunk)
            .unwrap();
    }
    order
}

fn with_depth(kind: &str, n: usize, depth: u32) -> Sampler<f64> {
    let mut cfg = config(kind, n, true);
    cfg.depth = depth;
    Sampler::new(cfg).unwrap()
}

#[test]
fn recursive_hand_computed_depth_one() {
    // d = 1, g = [2, 1, 1, -1, -3], m = 0 in epoch 0. Tree: root, leaf 0 (left, +1), leaf 1 (right).
    // u0 z=2: root s=0 -> +, root=2; leaf0 s=0 -> +, leaf0=2.         leaf0 front [0]
    // u1 z=1: root <2,1>=2 > 0 -> -, root=1; leaf1 s=0 -> +, leaf1=1.  leaf1 front [1]
    // u2 z=1: root <1,1> > 0 -> -, root=0; leaf1 <1,1> > 0 -> -, =0.   leaf1 back  [2]
    // u3 z=-1: root <0,-1>=0 -> +, root=-1; leaf0 <2,-1> < 0 -> +.     leaf0 front [0, 3]
    // u4 z=-3: root <-1,-3>=3 > 0 -> -, root=2; leaf1 <0,-3>=0 -> +.   leaf1 front [1, 4]
    // next = leaf0 [0, 3] ++ leaf1 ([1, 4] ++ reversed [2]) = [0, 3, 1, 4, 2]
    let g = [2.0, 1.0, 1.0, -1.0, -3.0];
    let mut s = with_depth("recursive", 5, 1);
    assert_eq!(run_epoch(&mut s, 0, &g, 1, 2, None), vec![0, 1, 2, 3, 4]);
    assert_eq!(s.begin_epoch(1), &[0, 3, 1, 4, 2]);
    // An early break after u0..u2: leaf0 [0], leaf1 [1] + back [2]; unseen 3, 4 (in current order)
    // go at the root's centre, between the left and the right subtree.
    let mut s = with_depth("recursive", 5, 1);
    run_epoch(&mut s, 0, &g, 1, 3, Some(3));
    assert_eq!(s.begin_epoch(1), &[0, 3, 4, 1, 2]);
}

#[test]
fn recursive_pair_hand_computed_depth_one() {
    // d = 1, g = [3, 1, 0, 1, 4, -1, 2, 2, 5], visit order 0..8.
    // u0 waits at level 0. u1: z = 3-1 = 2, s0=0 -> +, s0=2; item [0,1] (v=4) waits at level 1.
    // u2 waits. u3: z = 0-1 = -1, <2,-1> < 0 -> +, s0=1; item [2,3] (v=1) meets [0,1] at level 1:
    //   z = 4-1 = 3, s1=0 -> +, s1=3: [0,1] to the front, [2,3] to the back (as a block).
    // u4 waits. u5: z = 4-(-1) = 5, <1,5> > 0 -> -, s0=-4; item [5,4] (v=3) waits at level 1.
    // u6 waits. u7: z = 0, <-4,0> = 0 -> +; item [6,7] (v=4) meets [5,4]: z = 3-4 = -1, <3,-1> < 0
    //   -> +: [5,4] to the front, [6,7] to the back. u8 waits at level 0 when the epoch ends: middle.
    // next = front [0,1,5,4] ++ [8] ++ back blocks in reverse placement order [6,7], [2,3].
    let g = [3.0, 1.0, 0.0, 1.0, 4.0, -1.0, 2.0, 2.0, 5.0];
    let mut s = with_depth("recursive-pair", 9, 1);
    run_epoch(&mut s, 0, &g, 1, 4, None);
    assert_eq!(s.begin_epoch(1), &[0, 1, 5, 4, 8, 6, 7, 2, 3]);
}

#[test]
fn depth_zero_is_grab_and_pair_exactly() {
    let vectors: Vec<f64> = (0..37 * 5)
        .map(|i| ((i * 7919) % 101) as f64 / 13.0 - 3.0 + 0.001 * i as f64)
        .collect();
    for (rec, base) in [("recursive", "grab"), ("recursive-pair", "pair")] {
        for random in [false, true] {
            let mut a = config(rec, 37, false);
            a.depth = 0;
            a.random_signs = random;
            let mut b = config(base, 37, false);
            b.random_signs = random;
            let (mut a, mut b) = (Sampler::new(a).unwrap(), Sampler::new(b).unwrap());
            for epoch in 0..4 {
                let limit = (epoch == 2).then_some(20);
                assert_eq!(
                    run_epoch(&mut a, epoch, &vectors, 5, 3, limit),
                    run_epoch(&mut b, epoch, &vectors, 5, 3, limit)
                );
            }
            assert_eq!(a.begin_epoch(4), b.begin_epoch(4));
        }
    }
}

#[test]
fn identity_projection_equals_no_projection() {
    let d = 6;
    let vectors: Vec<f64> = (0..23 * d).map(|i| ((i * 31) % 17) as f64 - 7.5).collect();
    for kind in [
        "grab",
        "pair",
        "recursive",
        "recursive-pair",
        "herding",
        "greedy",
    ] {
        let plain = config(kind, 23, false);
        let mut projected = plain.clone();
        projected.projection = Some(ProjectionSpec {
            kind: SketchKind::Identity,
            k: d,
        });
        let (mut a, mut b) = (
            Sampler::new(plain).unwrap(),
            Sampler::new(projected).unwrap(),
        );
        for epoch in 0..3 {
            assert_eq!(
                run_epoch(&mut a, epoch, &vectors, d, 4, None),
                run_epoch(&mut b, epoch, &vectors, d, 4, None),
                "{kind}"
            );
        }
        assert_eq!(a.begin_epoch(3), b.begin_epoch(3), "{kind}");
    }
}

#[test]
fn projection_refuses_a_changed_dimension_and_identity_needs_k_equal_d() {
    let mut cfg = config("grab", 4, true);
    cfg.projection = Some(ProjectionSpec {
        kind: SketchKind::Gaussian,
        k: 2,
    });
    let mut s = Sampler::<f64>::new(cfg.clone()).unwrap();
    s.begin_epoch(0);
    s.step(&Batch::from_slice(&[1.0, 2.0, 3.0], 1, 3).unwrap(), &[0])
        .unwrap();
    assert_eq!(s.dim(), Some(3));
    let before = s.clone();
    let err = s
        .step(&Batch::from_slice(&[1.0, 2.0], 1, 2).unwrap(), &[1])
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Shape);
    assert_eq!(s, before);
    cfg.projection = Some(ProjectionSpec {
        kind: SketchKind::Identity,
        k: 2,
    });
    let mut s = Sampler::<f64>::new(cfg).unwrap();
    s.begin_epoch(0);
    let before = s.clone();
    assert_eq!(
        s.step(&Batch::from_slice(&[1.0, 2.0, 3.0], 1, 3).unwrap(), &[0])
            .unwrap_err()
            .kind,
        ErrorKind::Shape
    );
    assert_eq!(s, before);
}

#[test]
fn greedy_refuses_a_store_over_max_memory_and_changes_nothing() {
    let mut cfg = config("greedy", 100, true);
    cfg.max_memory = Some(1000);
    let mut s = Sampler::<f32>::new(cfg).unwrap();
    s.begin_epoch(0);
    let before = s.clone();
    let rows = vec![1.0f64; 10];
    let err = s
        .step(&Batch::from_slice(&rows, 1, 10).unwrap(), &[0])
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Memory);
    // Store: 100 units x 10 x 4 bytes = 4000; scan: 100 x (10 x 8 + 12) = 9200; total 13200 bytes.
    assert!(err.message.contains("13200 bytes"), "{}", err.message);
    assert_eq!(s, before);
    let mut cfg = config("greedy", 4, true);
    cfg.random_signs = true;
    assert_eq!(Sampler::<f32>::new(cfg).unwrap_err().kind, ErrorKind::State);
}

#[test]
fn random_signs_are_seeded_for_every_balancing_ordering() {
    let vectors: Vec<f64> = (0..30 * 3).map(|i| ((i * 13) % 7) as f64 - 2.9).collect();
    for kind in ["grab", "pair", "recursive", "recursive-pair", "herding"] {
        let make = |seed| {
            let mut cfg = config(kind, 30, false);
            cfg.random_signs = true;
            cfg.seed = seed;
            cfg.depth = 2;
            Sampler::<f64>::new(cfg).unwrap()
        };
        let (mut a, mut b, mut c) = (make(1), make(1), make(2));
        let mut differs = false;
        for epoch in 0..3 {
            let oa = run_epoch(&mut a, epoch, &vectors, 3, 4, None);
            assert_eq!(oa, run_epoch(&mut b, epoch, &vectors, 3, 4, None), "{kind}");
            differs |= oa != run_epoch(&mut c, epoch, &vectors, 3, 4, None);
        }
        assert!(differs, "{kind}: seeds 1 and 2 gave the same orders");
    }
}

fn vectors_strategy() -> impl Strategy<Value = (usize, usize, Vec<f64>)> {
    (1usize..30, 1usize..7).prop_flat_map(|(n, d)| {
        (
            Just(n),
            Just(d),
            proptest::collection::vec(-10.0f64..10.0, n * d),
        )
    })
}

const FAMILY: [&str; 4] = ["recursive", "recursive-pair", "herding", "greedy"];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn family_orders_are_permutations_batching_free_and_restorable(
        (n, d, vectors) in vectors_strategy(), per_step in 1usize..7,
        kind in prop::sample::select(FAMILY.to_vec()), depth in 0u32..4, random in any::<bool>(),
        project in any::<bool>(), stop in 0usize..30,
    ) {
        let mut cfg = config(kind, n, false);
        cfg.depth = depth;
        cfg.rounds = 1 + depth;
        cfg.random_signs = random && kind != "greedy";
        if project {
            cfg.projection = Some(ProjectionSpec { kind: SketchKind::Gaussian, k: 3 });
        }
        let mut one = Sampler::<f64>::new(cfg.clone()).unwrap();
        let mut many = Sampler::<f64>::new(cfg).unwrap();
        for epoch in 0..3 {
            let o1 = run_epoch(&mut one, epoch, &vectors, d, 1, None);
            let o2 = run_epoch(&mut many, epoch, &vectors, d, per_step, None);
            prop_assert_eq!(&o1, &o2);
            prop_assert!(check_permutation(&o1, n, "order").is_ok());
        }
        // An early break (or drop_last): only a prefix gets gradients; a checkpoint taken mid-epoch
        // restores to an equal sampler, and both continue to the same permutation.
        run_epoch(&mut many, 3, &vectors, d, per_step, Some(stop.min(n)));
        let restored = Sampler::import_state(many.export_state()).unwrap();
        prop_assert_eq!(&restored, &many);
        let mut restored = restored;
        let next = many.begin_epoch(4).to_vec();
        prop_assert_eq!(restored.begin_epoch(4).to_vec(), next.clone());
        prop_assert!(check_permutation(&next, n, "order").is_ok());
        let restored = Sampler::import_state(many.export_state()).unwrap();
        prop_assert_eq!(restored, many);
    }
}

#[test]
fn a_non_finite_gradient_is_refused_and_changes_nothing() {
    for kind in FAMILY {
        for project in [false, true] {
            let mut cfg = config(kind, 6, true);
            cfg.depth = 1;
            if project {
                cfg.projection = Some(ProjectionSpec {
                    kind: SketchKind::Sparse,
                    k: 2,
                });
            }
            let mut s = Sampler::<f32>::new(cfg).unwrap();
            s.begin_epoch(0);
            s.step(&Batch::from_slice(&[1.0, 2.0, 3.0], 1, 3).unwrap(), &[0])
                .unwrap();
            let before = s.clone();
            let bad = [1.0, 2.0, 3.0, 4.0, f64::INFINITY, 0.0];
            let err = s
                .step(&Batch::from_slice(&bad, 2, 3).unwrap(), &[1, 2])
                .unwrap_err();
            assert_eq!(err.kind, ErrorKind::NonFinite, "{kind}");
            assert_eq!(s, before, "{kind}");
        }
    }
}
