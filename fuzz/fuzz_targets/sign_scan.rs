//! The Gram-formulation sign scan on arbitrary inner products: refuses or answers, never panics,
//! and its deterministic signs are +-1 with unit scale.
#![no_main]

use libfuzzer_sys::fuzz_target;
use torchgrab::sign::SignRule;
use torchgrab::sign_scan::sign_scan;

fuzz_target!(|data: &[u8]| {
    let vals: Vec<f64> = data
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let Some((&first, rest)) = vals.split_first() else {
        return;
    };
    let b = (first.to_bits() % 9) as usize;
    let (u, gram) = rest.split_at(b.min(rest.len()));
    for mut rule in [
        SignRule::deterministic(),
        SignRule::self_balancing_walk(1, 0.1),
    ] {
        if let Ok(signs) = sign_scan(u, gram, &mut rule, 10, 3) {
            assert_eq!(signs.len(), u.len());
            assert!(signs.iter().all(|&(e, _)| e == 1.0 || e == -1.0));
        }
    }
});
