//! Restoring a sampler from arbitrary bytes: the codec and `import_state` must refuse or accept,
//! never panic, and whatever they accept must work and re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use torchgrab::sampler::Sampler;
use torchgrab::state_codec::{decode, encode, seal, CodecElem};

fn check<S: CodecElem>(bytes: &[u8]) {
    let Ok(state) = decode::<S>(bytes) else {
        return;
    };
    let Ok(mut sampler) = Sampler::<S>::import_state(state) else {
        return;
    };
    assert_eq!(encode(&sampler.export_state()), bytes);
    let n = sampler.config().n;
    if n <= 1 << 16 {
        let order = sampler
            .begin_epoch(sampler.epoch().wrapping_add(1))
            .to_vec();
        assert_eq!(order.len(), n);
    }
}

fuzz_target!(|data: &[u8]| {
    // Half the time, re-seal the input with a valid checksum so the deeper checks are reached.
    let sealed = match data.split_first() {
        Some((&flag, rest)) if flag & 1 == 1 => seal(rest.to_vec()),
        _ => data.to_vec(),
    };
    check::<f32>(&sealed);
    check::<f64>(&sealed);
});
