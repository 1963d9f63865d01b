//! A compact, versioned binary form of `SamplerState`: what a checkpoint holds, as bytes. Decoding
//! trusts nothing: every length is checked against the bytes left before anything is allocated, a
//! checksum catches corruption, and the result still goes through `Sampler::import_state`'s checks.
//! It never panics, whatever the input (the `fuzz/` targets and the proptests below hold it to that).
//!
//! Layout (little-endian): magic "TGST", u16 version, u8 state element width (4 or 8), the fields
//! in `SamplerState` order (vectors as u64 length + elements, options as a u8 tag), then a u64
//! FNV-1a checksum of everything before it.

use crate::elem::StateElem;
use crate::error::{GrabError, Result};
use crate::mean_balance::MeanBalance;
use crate::pair_balance::PairBalance;
use crate::projection::{ProjectionSpec, SketchKind};
use crate::recursive_balance::RecursiveBalance;
use crate::recursive_pair::RecursivePairBalance;
use crate::sampler::{Balance, Config, OrderingKind, SamplerState, ORDERING_NAMES};
use crate::stored_gradients::StoredGradients;

pub const MAGIC: &[u8; 4] = b"TGST";
pub const VERSION: u16 = 1;

/// FNV-1a over `bytes`: cheap, and enough to tell a truncated or bit-flipped checkpoint from a good one.
/// `body` followed by its checksum: the framing every checkpoint (sampler state, CD-GraB order server)
/// ends with.
pub fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let sum = checksum(&body);
    body.extend_from_slice(&sum.to_le_bytes());
    body
}

pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The state element types the codec knows, by their width in bytes.
pub trait CodecElem: StateElem {
    const WIDTH: u8;
    fn put(self, out: &mut Vec<u8>);
    fn take(bytes: &[u8]) -> Self;
}

impl CodecElem for f32 {
    const WIDTH: u8 = 4;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn take(bytes: &[u8]) -> Self {
        let mut b = [0u8; 4];
        b.copy_from_slice(&bytes[..4]);
        f32::from_le_bytes(b)
    }
}

impl CodecElem for f64 {
    const WIDTH: u8 = 8;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn take(bytes: &[u8]) -> Self {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[..8]);
        f64::from_le_bytes(b)
    }
}

fn kind_tag(kind: OrderingKind) -> u8 {
    ORDERING_NAMES
        .iter()
        .position(|&n| n == kind.name())
        .map_or(u8::MAX, |p| p as u8)
}

/// Little-endian, length-prefixed field writer; shared with the CD-GraB checkpoint (`coordinated::checkpoint`).
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    pub(crate) fn u8(&mut self, x: u8) {
        self.0.push(x);
    }
    pub(crate) fn u64(&mut self, x: u64) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    pub(crate) fn u32s(&mut self, v: &[u32]) {
        self.u64(v.len() as u64);
        v.iter()
            .for_each(|x| self.0.extend_from_slice(&x.to_le_bytes()));
    }
    pub(crate) fn u64s(&mut self, v: &[u64]) {
        self.u64(v.len() as u64);
        v.iter().for_each(|&x| self.u64(x));
    }
    pub(crate) fn elems<S: CodecElem>(&mut self, v: &[S]) {
        self.u64(v.len() as u64);
        v.iter().for_each(|&x| x.put(&mut self.0));
    }
    fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            Some(x) => {
                self.u8(1);
                self.u64(x);
            }
            None => self.u8(0),
        }
    }
}

fn sketch_tag(kind: SketchKind) -> u8 {
    match kind {
        SketchKind::Gaussian => 0,
        SketchKind::Sparse => 1,
        SketchKind::Identity => 2,
    }
}

/// The state as bytes.
pub fn encode<S: CodecElem>(st: &SamplerState<S>) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64 + 4 * st.current.len()));
    w.0.extend_from_slice(MAGIC);
    w.0.extend_from_slice(&VERSION.to_le_bytes());
    w.u8(S::WIDTH);
    let c = &st.config;
    w.u8(kind_tag(c.kind));
    w.u64(c.n as u64);
    w.u64(c.seed);
    w.u8(c.first_epoch_random as u8 | (c.random_signs as u8) << 1);
    w.u64(c.delta.to_bits());
    match &c.fixed_order {
        Some(o) => {
            w.u8(1);
            w.u32s(o);
        }
        None => w.u8(0),
    }
    w.u64(st.epochs_begun);
    w.u64(st.epoch);
    w.u32s(&st.current);
    match &st.assembly {
        Some((next, front, back, taken)) => {
            w.u8(1);
            w.u32s(next);
            w.u64(*front);
            w.u64(*back);
            w.u64s(taken);
        }
        None => w.u8(0),
    }
    match &st.balance {
        None => w.u8(0),
        Some(Balance::Mean(b)) => {
            w.u8(1);
            w.elems(&b.s);
            w.elems(&b.m);
            w.elems(&b.m_next);
            w.u64(b.seen);
        }
        Some(Balance::Pair(b)) => {
            w.u8(2);
            w.elems(&b.s);
            match b.pending {
                Some(p) => {
                    w.u8(1);
                    w.0.extend_from_slice(&p.to_le_bytes());
                }
                None => w.u8(0),
            }
            w.elems(&b.pending_grad);
        }
        Some(Balance::Recursive(b)) => {
            w.u8(3);
            w.u64(b.depth as u64);
            w.elems(&b.sums);
            w.elems(&b.m);
            w.elems(&b.m_next);
            w.u64(b.seen);
            w.u32s(&b.codes);
        }
        Some(Balance::RecursivePair(b)) => {
            w.u8(4);
            w.u64(b.depth as u64);
            w.elems(&b.sums);
            w.u64(b.pending_units.len() as u64);
            b.pending_units.iter().for_each(|u| w.u32s(u));
            w.elems(&b.pending_vecs);
        }
        Some(Balance::Stored(b)) => {
            w.u8(5);
            w.u64(b.d as u64);
            w.elems(&b.rows);
        }
    }
    match st.sign_rng {
        Some(words) => {
            w.u8(1);
            words.iter().for_each(|&x| w.u64(x));
        }
        None => w.u8(0),
    }
    // The ordering family's configuration (issue 4) and the projection's input dimension.
    w.u64(c.depth as u64);
    w.u64(c.rounds as u64);
    match c.projection {
        Some(p) => {
            w.u8(1);
            w.u8(sketch_tag(p.kind));
            w.u64(p.k as u64);
        }
        None => w.u8(0),
    }
    w.opt_u64(c.max_memory);
    w.opt_u64(st.input_dim);
    seal(w.0)
}

fn corrupt(what: &str) -> GrabError {
    GrabError::state(format!("corrupted state bytes: {what}"))
}

/// The reading side of `Writer`: every length is checked against the bytes left before anything is
/// allocated. Shared with the CD-GraB checkpoint.
pub(crate) struct Reader<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, k: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(k)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| corrupt(&format!("truncated in {what}")))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    pub(crate) fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    pub(crate) fn u64(&mut self, what: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(b))
    }
    fn opt_u64(&mut self, what: &str) -> Result<Option<u64>> {
        Ok(if self.flag(what)? {
            Some(self.u64(what)?)
        } else {
            None
        })
    }
    /// A u32-sized count stored as u64 (depth, rounds).
    fn small(&mut self, what: &str) -> Result<u32> {
        u32::try_from(self.u64(what)?).map_err(|_| corrupt(&format!("{what} is out of range")))
    }
    pub(crate) fn flag(&mut self, what: &str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            t => Err(corrupt(&format!("{what} has tag {t}, expected 0 or 1"))),
        }
    }
    /// A length prefix, refused unless `len * width` bytes are actually there (no huge allocations).
    fn len(&mut self, width: usize, what: &str) -> Result<usize> {
        let len = self.u64(what)?;
        let left = (self.bytes.len() - self.at) as u64;
        if len.checked_mul(width as u64).is_none_or(|b| b > left) {
            return Err(corrupt(&format!(
                "{what} claims {len} entries but only {left} bytes are left"
            )));
        }
        Ok(len as usize)
    }
    pub(crate) fn u32s(&mut self, what: &str) -> Result<Vec<u32>> {
        let len = self.len(4, what)?;
        let raw = self.take(4 * len, what)?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    pub(crate) fn u64s(&mut self, what: &str) -> Result<Vec<u64>> {
        let len = self.len(8, what)?;
        (0..len).map(|_| self.u64(what)).collect()
    }
    pub(crate) fn elems<S: CodecElem>(&mut self, what: &str) -> Result<Vec<S>> {
        let w = S::WIDTH as usize;
        let len = self.len(w, what)?;
        let raw = self.take(w * len, what)?;
        Ok(raw.chunks_exact(w).map(S::take).collect())
    }
}

/// Bytes back to a state. Checks the framing (magic, version, element width, lengths, checksum,
/// tags); whether the state makes sense is `Sampler::import_state`'s job.
pub fn decode<S: CodecElem>(bytes: &[u8]) -> Result<SamplerState<S>> {
    if bytes.len() < 4 + 2 + 1 + 8 || &bytes[..4] != MAGIC {
        return Err(corrupt("not a torchgrab state (bad magic or too short)"));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 8);
    let mut sum = [0u8; 8];
    sum.copy_from_slice(tail);
    let version = u16::from_le_bytes([body[4], body[5]]);
    if version != VERSION {
        return Err(GrabError::state(format!(
            "state bytes of version {version} are not supported (expected {VERSION})"
        )));
    }
    if u64::from_le_bytes(sum) != checksum(body) {
        return Err(corrupt("checksum mismatch (truncated or modified)"));
    }
    let mut r = Reader { bytes: body, at: 6 };
    let width = r.u8("element width")?;
    if width != S::WIDTH {
        return Err(GrabError::state(format!(
            "the state holds {}-byte sums; this sampler uses {}-byte sums",
            width,
            S::WIDTH
        )));
    }
    let tag = r.u8("ordering")? as usize;
    let name = ORDERING_NAMES
        .get(tag)
        .ok_or_else(|| corrupt(&format!("unknown ordering tag {tag}")))?;
    let kind = OrderingKind::parse(name)?;
    if kind_tag(kind) as usize != tag {
        // An alias ("mean" for "grab"): one state, one encoding (found by the fuzzer).
        return Err(corrupt(&format!(
            "ordering tag {tag} is an alias, not a canonical tag"
        )));
    }
    let n = usize::try_from(r.u64("n")?).map_err(|_| corrupt("n does not fit this platform"))?;
    let mut config = Config::new(kind, n, r.u64("seed")?);
    let flags = r.u8("flags")?;
    if flags > 3 {
        return Err(corrupt(&format!("unknown flag bits {flags:#x}")));
    }
    config.first_epoch_random = flags & 1 == 1;
    config.random_signs = flags & 2 == 2;
    config.delta = f64::from_bits(r.u64("delta")?);
    config.fixed_order = if r.flag("fixed order")? {
        Some(r.u32s("fixed order")?)
    } else {
        None
    };
    let epochs_begun = r.u64("epochs begun")?;
    let epoch = r.u64("epoch")?;
    let current = r.u32s("current order")?;
    let assembly = if r.flag("assembly")? {
        Some((
            r.u32s("assembly order")?,
            r.u64("front pointer")?,
            r.u64("back pointer")?,
            r.u64s("taken bitmap")?,
        ))
    } else {
        None
    };
    let balance = match r.u8("balance")? {
        0 => None,
        1 => Some(Balance::Mean(MeanBalance::from_parts(
            r.elems("running sum")?,
            r.elems("stale mean")?,
            r.elems("next mean")?,
            r.u64("seen")?,
        ))),
        2 => {
            let s = r.elems("running sum")?;
            let pending = if r.flag("open pair")? {
                let b = r.take(4, "open pair")?;
                Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            } else {
                None
            };
            Some(Balance::Pair(PairBalance::from_parts(
                s,
                pending,
                r.elems("open pair gradient")?,
            )))
        }
        3 => Some(Balance::Recursive(RecursiveBalance {
            depth: r.small("recursive depth")?,
            sums: r.elems("node sums")?,
            m: r.elems("stale mean")?,
            m_next: r.elems("next mean")?,
            seen: r.u64("seen")?,
            codes: r.u32s("leaf codes")?,
        })),
        4 => {
            let depth = r.small("recursive-pair depth")?;
            let sums = r.elems("level sums")?;
            let levels = r.len(8, "waiting items")?;
            let pending_units = (0..levels)
                .map(|_| r.u32s("waiting units"))
                .collect::<Result<Vec<_>>>()?;
            Some(Balance::RecursivePair(RecursivePairBalance {
                depth,
                sums,
                pending_units,
                pending_vecs: r.elems("waiting vectors")?,
            }))
        }
        5 => Some(Balance::Stored(StoredGradients {
            d: usize::try_from(r.u64("stored dimension")?)
                .map_err(|_| corrupt("stored dimension does not fit this platform"))?,
            rows: r.elems("stored gradients")?,
        })),
        t => return Err(corrupt(&format!("unknown balance tag {t}"))),
    };
    let sign_rng = if r.flag("sign rng")? {
        Some([
            r.u64("sign rng")?,
            r.u64("sign rng")?,
            r.u64("sign rng")?,
            r.u64("sign rng")?,
        ])
    } else {
        None
    };
    config.depth = r.small("depth")?;
    config.rounds = r.small("rounds")?;
    config.projection = if r.flag("projection")? {
        let kind = match r.u8("sketch kind")? {
            0 => SketchKind::Gaussian,
            1 => SketchKind::Sparse,
            2 => SketchKind::Identity,
            t => return Err(corrupt(&format!("unknown sketch tag {t}"))),
        };
        let k = usize::try_from(r.u64("sketch k")?)
            .map_err(|_| corrupt("sketch k does not fit this platform"))?;
        Some(ProjectionSpec { kind, k })
    } else {
        None
    };
    config.max_memory = r.opt_u64("max memory")?;
    let input_dim = r.opt_u64("input dimension")?;
    if r.at != body.len() {
        return Err(corrupt(&format!("{} trailing bytes", body.len() - r.at)));
    }
    Ok(SamplerState {
        config,
        epochs_begun,
        epoch,
        current,
        assembly,
        balance,
        sign_rng,
        input_dim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;
    use crate::sampler::Sampler;
    use proptest::prelude::*;

    /// A sampler of `kind` driven `steps` rows into its second epoch, fed deterministic vectors.
    fn driven(kind: &str, n: usize, d: usize, steps: usize, random_signs: bool) -> Sampler<f32> {
        let mut cfg = Config::new(OrderingKind::parse(kind).unwrap(), n, 7);
        cfg.random_signs = random_signs && kind != "greedy"; // greedy has no signs
        let mut s = Sampler::<f32>::new(cfg).unwrap();
        let v: Vec<f64> = (0..n * d).map(|i| ((i * 31) % 17) as f64 - 8.0).collect();
        for epoch in 0..2u64 {
            let order = s.begin_epoch(epoch).to_vec();
            let take = if epoch == 0 { n } else { steps.min(n) };
            for &i in &order[..take] {
                let row = &v[i as usize * d..(i as usize + 1) * d];
                s.step(&Batch::from_slice(row, 1, d).unwrap(), &[i])
                    .unwrap();
            }
        }
        s
    }

    #[test]
    fn every_ordering_round_trips_through_bytes() {
        for kind in ORDERING_NAMES {
            for random_signs in [false, true] {
                let s = driven(kind, 13, 3, 5, random_signs);
                let bytes = encode(&s.export_state());
                let back = Sampler::import_state(decode::<f32>(&bytes).unwrap()).unwrap();
                assert_eq!(back, s, "{kind}");
                assert_eq!(encode(&back.export_state()), bytes);
            }
        }
    }

    #[test]
    fn a_checkpoint_asking_for_too_many_herding_rounds_is_refused() {
        // The mutation test once decoded rounds = 3,080,193: a valid-looking checkpoint whose next
        // epoch end took a minute. Such a state is refused on import, as the constructor refuses it.
        let mut st = driven("herding", 11, 2, 5, false).export_state();
        st.config.rounds = crate::sampler::MAX_ROUNDS + 1;
        let decoded = decode::<f32>(&encode(&st)).unwrap();
        let err = Sampler::import_state(decoded).unwrap_err();
        assert!(
            err.message.contains("rounds must be between 1 and"),
            "{}",
            err.message
        );
        st.config.rounds = crate::sampler::MAX_ROUNDS;
        assert!(Sampler::import_state(decode::<f32>(&encode(&st)).unwrap()).is_ok());
    }

    #[test]
    fn framing_errors_are_refused() {
        let bytes = encode(&driven("pair", 9, 2, 3, false).export_state());
        assert!(decode::<f64>(&bytes)
            .unwrap_err()
            .message
            .contains("4-byte"));
        for cut in 0..bytes.len() {
            assert!(decode::<f32>(&bytes[..cut]).is_err());
        }
        for k in 0..bytes.len() {
            let mut b = bytes.clone();
            b[k] ^= 0x10;
            assert!(decode::<f32>(&b).is_err(), "flipped byte {k}");
        }
    }

    /// Re-seal a body with a valid checksum so that the decoder's deeper checks get exercised (the
    /// proptests name a flag `seal`, hence the alias).
    use super::seal as sealed;

    #[test]
    fn huge_length_claims_do_not_allocate() {
        let bytes = encode(&driven("rr", 5, 1, 0, false).export_state());
        let mut body = bytes[..bytes.len() - 8].to_vec();
        // The current order's length prefix sits after the header, config and two counters.
        let at = 4 + 2 + 1 + 1 + 8 + 8 + 1 + 8 + 1 + 8 + 8;
        body[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = decode::<f32>(&sealed(body)).unwrap_err();
        assert!(err.message.contains("claims"), "{}", err.message);
    }

    /// Seeds for the `state_from_bytes` fuzz target (scripts/fuzz.sh runs this): one encoded state per
    /// ordering and sign rule, mid-epoch, each behind the target's "re-seal" flag byte.
    #[test]
    #[ignore]
    fn write_fuzz_seeds() {
        let Ok(dir) = std::env::var("TORCHGRAB_FUZZ_SEEDS") else {
            return;
        };
        std::fs::create_dir_all(&dir).unwrap();
        for kind in ORDERING_NAMES {
            for random_signs in [false, true] {
                let bytes = encode(&driven(kind, 13, 3, 5, random_signs).export_state());
                let mut seed = vec![1u8];
                seed.extend_from_slice(&bytes[..bytes.len() - 8]);
                std::fs::write(format!("{dir}/{kind}-{random_signs}"), seed).unwrap();
            }
        }
    }

    /// fuzz/artifacts/state_from_bytes/crash-f70c355e…: tag 6 ("mean", an alias of "grab") decoded
    /// to a state that re-encoded with tag 5. Aliases are now refused.
    #[test]
    fn regression_alias_tag_is_refused() {
        let crash: [u8; 62] = [
            0x03, 0x54, 0x47, 0x53, 0x54, 0x01, 0x00, 0x08, 0x06, 0x1b, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0x3f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xf6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
            0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let sealed = sealed(crash[1..].to_vec());
        let err = decode::<f64>(&sealed).unwrap_err();
        assert!(err.message.contains("alias"), "{}", err.message);
    }

    /// fuzz/regressions/state_from_bytes-wrapping-pointers: front + back of the assembly overflowed
    /// usize, passed the bounds check by wrapping, and a slice index panicked. Now refused.
    #[test]
    fn regression_wrapping_assembly_pointers_are_refused() {
        let crash = include_bytes!("../fuzz/regressions/state_from_bytes-wrapping-pointers");
        let sealed = sealed(crash[1..].to_vec());
        let st = decode::<f32>(&sealed).expect("the framing is valid");
        let err = Sampler::import_state(st).unwrap_err();
        assert!(err.message.contains("pointers"), "{}", err.message);
    }

    proptest! {
        #[test]
        fn codec_round_trips_random_runs(kind in prop::sample::select(ORDERING_NAMES.to_vec()), n in 1usize..30, d in 1usize..6, steps in 0usize..30, random_signs in any::<bool>()) {
            let s = driven(kind, n, d, steps, random_signs);
            let back = Sampler::import_state(decode::<f32>(&encode(&s.export_state())).unwrap()).unwrap();
            prop_assert_eq!(back, s);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), seal in any::<bool>()) {
            let input = if seal { sealed(bytes) } else { bytes };
            if let Ok(st) = decode::<f32>(&input) {
                let _ = Sampler::import_state(st);
            }
            let _ = decode::<f64>(&input);
        }

        #[test]
        fn mutated_states_never_panic(kind in prop::sample::select(ORDERING_NAMES.to_vec()), steps in 0usize..12, at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let s = driven(kind, 11, 2, steps, false);
            let bytes = encode(&s.export_state());
            let mut body = bytes[..bytes.len() - 8].to_vec();
            let k = at.index(body.len());
            body[k] = byte;
            if let Ok(st) = decode::<f32>(&sealed(body)) {
                if let Ok(back) = Sampler::import_state(st) {
                    // Whatever is accepted is a sampler that works: it can finish an epoch.
                    let mut back = back;
                    let order = back.begin_epoch(5).to_vec();
                    prop_assert_eq!(order.len(), 11);
                }
            }
        }
    }
}
