//! Restoring a CD-GraB order server from arbitrary bytes: `Coordinated::from_bytes` must refuse or
//! accept, never panic, and whatever it accepts must re-encode to the same bytes and begin its next
//! epoch with a permutation on every shard.
#![no_main]

use libfuzzer_sys::fuzz_target;
use torchgrab::coordinated::Coordinated;
use torchgrab::sampler::check_permutation;
use torchgrab::state_codec::seal;

fuzz_target!(|data: &[u8]| {
    // Half the time, re-seal the input with a valid checksum so the deeper checks are reached.
    let sealed = match data.split_first() {
        Some((&flag, rest)) if flag & 1 == 1 => seal(rest.to_vec()),
        _ => data.to_vec(),
    };
    let Ok(mut server) = Coordinated::from_bytes(&sealed) else {
        return;
    };
    assert_eq!(
        server.to_bytes(),
        sealed,
        "an accepted checkpoint must re-encode to itself"
    );
    let m = server.shard_len();
    if m <= 1 << 16 {
        server.begin_epoch();
        for w in 0..server.world() {
            check_permutation(server.shard_order(w), m, "shard order").unwrap();
        }
    }
});
