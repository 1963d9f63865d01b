//! Checkpoint of one rank's CD-GraB order server: the replicated state (every shard's order and
//! assembly, the shared running sum, the step cursor) plus this rank's own open-pair gradient, as
//! little-endian bytes with a magic, a version and a checksum.
//!
//! The fields go through the state codec's `Writer`/`Reader` (length-prefixed, little endian).
//! Decoding validates everything before building anything (bytes come from disk and may be anything):
//! lengths are checked against the remaining input before any allocation, orders must be permutations,
//! the assembly of every shard must hold exactly the units of its order's first `cursor - open`
//! positions, and the running sum must be finite. So a refused checkpoint never yields a replica that
//! could later emit a non-permutation, and decoding never panics.

use super::Coordinated;
use crate::assembly::FrontBack;
use crate::error::{GrabError, Result};
use crate::sign::SignRule;
use crate::state_codec::{checksum, seal, Reader, Writer};

const MAGIC: &[u8; 8] = b"TGCDGRB1";
const VERSION: u32 = 1;

fn corrupt(what: &str) -> GrabError {
    GrabError::state(format!("corrupted CD-GraB checkpoint: {what}"))
}

fn usize_of(x: u64, what: &str) -> Result<usize> {
    usize::try_from(x).map_err(|_| corrupt(&format!("{what} does not fit this machine")))
}

fn is_permutation(order: &[u32], n: usize) -> bool {
    let mut seen = vec![false; n];
    order.len() == n
        && order.iter().all(|&i| {
            let i = i as usize;
            i < n && !std::mem::replace(&mut seen[i], true)
        })
}

impl Coordinated {
    /// This rank's order server as bytes (see the module docs); `from_bytes` restores it exactly.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer(MAGIC.to_vec());
        w.0.extend_from_slice(&VERSION.to_le_bytes());
        for x in [self.world, self.rank, self.shard_len, self.cursor] {
            w.u64(x as u64);
        }
        w.u64(self.epochs_begun);
        w.u8(self.open as u8);
        w.u8(self.dim.is_some() as u8);
        w.u64(self.dim.unwrap_or(0) as u64);
        w.elems(&self.s);
        w.elems(&self.pending_grad);
        for k in 0..self.world {
            w.u32s(&self.current[k]);
            let (next, front, back, taken) = self.assembly[k].parts();
            w.u32s(next);
            w.u64(front as u64);
            w.u64(back as u64);
            w.u64s(taken);
        }
        seal(w.0)
    }

    /// Restore an order server from `to_bytes` output, refusing (never panicking on) anything else.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < MAGIC.len() + 4 + 8 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(corrupt("not a CD-GraB order-server checkpoint (bad magic)"));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 8);
        if checksum(body) != u64::from_le_bytes(tail.try_into().expect("8 bytes")) {
            return Err(corrupt("checksum mismatch (truncated or modified)"));
        }
        let mut r = Reader {
            bytes: body,
            at: MAGIC.len(),
        };
        let version = u32::from_le_bytes(r.take(4, "version")?.try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(corrupt(&format!(
                "version {version}, this build reads version {VERSION}"
            )));
        }
        let world = usize_of(r.u64("world")?, "world")?;
        let rank = usize_of(r.u64("rank")?, "rank")?;
        let shard_len = usize_of(r.u64("shard length")?, "shard length")?;
        let cursor = usize_of(r.u64("cursor")?, "cursor")?;
        let epochs_begun = r.u64("epochs begun")?;
        let open = r.flag("open flag")?;
        let has_dim = r.u8("dim flag")?;
        let dim_value = usize_of(r.u64("dim")?, "dim")?;
        let dim = match has_dim {
            0 if dim_value == 0 => None,
            1 => Some(dim_value),
            _ => return Err(corrupt("dim flag")),
        };
        let s: Vec<f64> = r.elems("running sum")?;
        let pending_grad: Vec<f64> = r.elems("open-pair gradient")?;
        // Validate the scalars before anything is allocated from them: every shard takes at least 8
        // bytes (its order length), so a world larger than the input is corrupt, not an allocation.
        if world > body.len() {
            return Err(corrupt("more shards than the checkpoint has bytes"));
        }
        let mut base = Coordinated::new(world, rank, 0).map_err(|e| corrupt(&e.message))?;
        if shard_len > u32::MAX as usize {
            return Err(corrupt("shard length does not fit 32-bit unit ids"));
        }
        if cursor > shard_len || (epochs_begun == 0 && (cursor != 0 || open)) {
            return Err(corrupt("cursor outside the epoch"));
        }
        if open && (cursor == 0 || dim.is_none_or(|d| pending_grad.len() != d)) {
            return Err(corrupt("open pair without its gradient"));
        }
        if !open && !pending_grad.is_empty() && dim.is_none_or(|d| pending_grad.len() != d) {
            return Err(corrupt("stale open-pair gradient of the wrong width"));
        }
        if !(s.is_empty() || dim.is_some_and(|d| s.len() == d)) {
            return Err(corrupt("running sum of the wrong width"));
        }
        if s.iter().chain(&pending_grad).any(|x| !x.is_finite()) {
            return Err(corrupt(
                "NaN or Inf in the running sum or the open-pair gradient",
            ));
        }
        let placed = cursor - open as usize;
        let mut current = Vec::with_capacity(world);
        let mut assembly = Vec::with_capacity(world);
        for _ in 0..world {
            let order = r.u32s("shard order")?;
            if order.len() != if epochs_begun == 0 { 0 } else { shard_len } {
                return Err(corrupt("a shard's order has the wrong length"));
            }
            if epochs_begun > 0 && !is_permutation(&order, shard_len) {
                return Err(corrupt("a shard's order is not a permutation"));
            }
            let next = r.u32s("assembly")?;
            if next.len() != shard_len {
                return Err(corrupt("a shard's assembly has the wrong length"));
            }
            let front = usize_of(r.u64("front pointer")?, "front pointer")?;
            let back = usize_of(r.u64("back pointer")?, "back pointer")?;
            let taken = r.u64s("assembly bitmap")?;
            let fb = FrontBack::from_parts(next, front, back, taken)?;
            // Exactly the units of the first `placed` positions got a sign this epoch.
            let marked_ok = front + back == placed
                && order
                    .iter()
                    .enumerate()
                    .all(|(k, &i)| fb.is_taken(i) == (k < placed));
            if epochs_begun > 0 && !marked_ok {
                return Err(corrupt(
                    "a shard's assembly does not match its order and cursor",
                ));
            }
            if epochs_begun == 0 && front + back != 0 {
                return Err(corrupt("units placed before the first epoch"));
            }
            current.push(order);
            assembly.push(fb);
        }
        if r.at != body.len() {
            return Err(corrupt("trailing bytes"));
        }
        base.shard_len = shard_len;
        base.epochs_begun = epochs_begun;
        base.current = current;
        base.assembly = assembly;
        base.cursor = cursor;
        base.open = open;
        base.s = s;
        base.dim = dim;
        base.rule = SignRule::deterministic();
        base.pending_grad = pending_grad;
        Ok(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;
    use crate::error::ErrorKind;

    fn stepped(world: usize, rank: usize, m: usize, steps: &[usize], d: usize) -> Vec<Coordinated> {
        // One replica per checkpoint point: fresh, after begin_epoch, after each step, after a 2nd epoch.
        let mut c = Coordinated::new(world, rank, m).unwrap();
        let mut out = vec![c.clone()];
        c.begin_epoch();
        out.push(c.clone());
        for (k, &rows) in steps.iter().enumerate() {
            let data: Vec<f64> = (0..rows * d)
                .map(|i| ((((i + k) as u64) * 2_654_435_761) % 17) as f64 - 8.0)
                .collect();
            let batch = Batch::from_slice(&data, rows, d).unwrap();
            let diffs = c.local_diffs(&batch).unwrap();
            c.step_exact(&batch, &vec![diffs; world].concat()).unwrap();
            out.push(c.clone());
        }
        c.begin_epoch();
        out.push(c.clone());
        out
    }

    /// Writes valid checkpoints (checksum stripped, flag byte 1: the target re-seals) as fuzz seeds.
    #[test]
    #[ignore]
    fn write_fuzz_seeds() {
        let Ok(dir) = std::env::var("TORCHGRAB_FUZZ_SEEDS") else {
            return;
        };
        std::fs::create_dir_all(&dir).unwrap();
        for (k, c) in stepped(3, 1, 6, &[1, 2, 2], 3).iter().enumerate() {
            let bytes = c.to_bytes();
            let mut seed = vec![1u8];
            seed.extend_from_slice(&bytes[..bytes.len() - 8]);
            std::fs::write(format!("{dir}/point-{k}"), seed).unwrap();
        }
    }

    /// fuzz/artifacts/coordinated_from_bytes/crash-78f608dc…: a world of 0x01ffff0000000003 shards was
    /// handed to `Coordinated::new`, which allocated per-shard vectors before the size check.
    #[test]
    fn regression_huge_world_is_refused_before_allocating() {
        let crash = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/regressions/coordinated_from_bytes-crash-78f608dc7a269b7f54a9dcd4b466441852651a9a"
        ))
        .unwrap();
        let err = Coordinated::from_bytes(&seal(crash[1..].to_vec())).unwrap_err();
        assert!(err.message.contains("more shards"), "{}", err.message);
    }

    #[test]
    fn round_trip_is_exact_at_every_point() {
        for c in stepped(2, 1, 7, &[3, 3, 1], 4) {
            let bytes = c.to_bytes();
            let back = Coordinated::from_bytes(&bytes).unwrap();
            assert_eq!(back.to_bytes(), bytes);
            assert_eq!(back.replica_bytes(), c.replica_bytes());
            assert_eq!(back.pending_grad, c.pending_grad);
        }
    }

    #[test]
    fn every_truncation_and_every_single_bit_flip_is_refused() {
        let points = stepped(2, 0, 5, &[3, 2], 3);
        let bytes = points[3].to_bytes();
        for len in 0..bytes.len() {
            assert!(
                Coordinated::from_bytes(&bytes[..len]).is_err(),
                "truncated to {len}"
            );
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(Coordinated::from_bytes(&b).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    /// Re-checksummed corruptions (what a fuzzer or a buggy writer produces) are refused by validation.
    #[test]
    fn inconsistent_contents_with_a_valid_checksum_are_refused() {
        let good = stepped(2, 0, 5, &[3], 3)[2].to_bytes();
        let reseal = |b: Vec<u8>| seal(b[..b.len() - 8].to_vec());
        assert!(Coordinated::from_bytes(&reseal(good.clone())).is_ok());
        let header = MAGIC.len() + 4;
        let field = |k: usize| header + 8 * k; // world, rank, shard_len, cursor, epochs_begun
        let cases: Vec<(usize, u8)> = vec![
            (field(0), 0),     // world 0
            (field(1), 7),     // rank out of range
            (field(3), 5),     // cursor 5 with one step of 3: assembly does not match
            (field(4), 0),     // epochs_begun 0 with a cursor
            (field(5), 0),     // open flag cleared while an odd row is pending
            (field(5) + 1, 7), // dim flag garbage
        ];
        for (pos, value) in cases {
            let mut b = good.clone();
            b[pos] = value;
            let err = Coordinated::from_bytes(&reseal(b)).unwrap_err();
            assert_eq!(err.kind, ErrorKind::State, "position {pos}");
        }
        // A shard order that is no longer a permutation (two entries equal).
        let mut b = good.clone();
        let order0 = field(5) + 2 + 8 + (8 + 3 * 8) + (8 + 3 * 8) + 8; // after s and pending_grad (d = 3)
        b.copy_within(order0..order0 + 4, order0 + 4);
        assert!(Coordinated::from_bytes(&reseal(b)).is_err());
        // NaN in the running sum.
        let mut b = good;
        let s0 = field(5) + 2 + 8 + 8;
        b[s0..s0 + 8].copy_from_slice(&f64::NAN.to_le_bytes());
        assert!(Coordinated::from_bytes(&reseal(b)).is_err());
    }
}
