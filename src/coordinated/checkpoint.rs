//! Checkpoint of one rank's CD-GraB order server: the replicated state (every shard's order and
//! assembly, the shared running sum, the step cursor) plus this rank's own open-pair gradient, as
//! little-endian bytes with a magic, a version and a checksum.
//!
//! Decoding validates everything before building anything (bytes come from disk and may be anything):
//! lengths are checked against the remaining input before any allocation, orders must be permutations,
//! the assembly of every shard must hold exactly the units of its order's first `cursor - open`
//! positions, and the running sum must be finite. So a refused checkpoint never yields a replica that
//! could later emit a non-permutation, and decoding never panics.

use super::Coordinated;
use crate::assembly::FrontBack;
use crate::error::{ErrorKind, GrabError, Result};
use crate::sign::SignRule;
use crate::state_codec::checksum;

const MAGIC: &[u8; 8] = b"TGCDGRB1";
const VERSION: u32 = 1;

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

fn corrupt(what: &str) -> GrabError {
    GrabError::state(format!("corrupted CD-GraB checkpoint: {what}"))
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| corrupt(&format!("truncated while reading {what}")))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn usize(&mut self, what: &str) -> Result<usize> {
        usize::try_from(self.u64(what)?)
            .map_err(|_| corrupt(&format!("{what} does not fit this machine")))
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    /// `len` elements of `width` bytes, refused before allocating if the input is shorter.
    fn array(&mut self, len: usize, width: usize, what: &str) -> Result<&'a [u8]> {
        let bytes = len
            .checked_mul(width)
            .ok_or_else(|| corrupt(&format!("{what} is impossibly long")))?;
        self.take(bytes, what)
    }
    fn f64s(&mut self, what: &str) -> Result<Vec<f64>> {
        let len = self.usize(what)?;
        let raw = self.array(len, 8, what)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }
    fn u32s(&mut self, len: usize, what: &str) -> Result<Vec<u32>> {
        let raw = self.array(len, 4, what)?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
    fn u64s(&mut self, len: usize, what: &str) -> Result<Vec<u64>> {
        let raw = self.array(len, 8, what)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }
}

fn put_u64(out: &mut Vec<u8>, x: u64) {
    out.extend_from_slice(&x.to_le_bytes());
}

fn put_f64s(out: &mut Vec<u8>, xs: &[f64]) {
    put_u64(out, xs.len() as u64);
    for x in xs {
        out.extend_from_slice(&x.to_le_bytes());
    }
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
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        for x in [self.world, self.rank, self.shard_len, self.cursor] {
            put_u64(&mut out, x as u64);
        }
        put_u64(&mut out, self.epochs_begun);
        out.push(self.open as u8);
        out.push(self.dim.is_some() as u8);
        put_u64(&mut out, self.dim.unwrap_or(0) as u64);
        put_f64s(&mut out, &self.s);
        put_f64s(&mut out, &self.pending_grad);
        for w in 0..self.world {
            put_u64(&mut out, self.current[w].len() as u64);
            for &i in &self.current[w] {
                out.extend_from_slice(&i.to_le_bytes());
            }
            let (next, front, back, taken) = self.assembly[w].parts();
            for &i in next {
                out.extend_from_slice(&i.to_le_bytes());
            }
            put_u64(&mut out, front as u64);
            put_u64(&mut out, back as u64);
            for &t in taken {
                put_u64(&mut out, t);
            }
        }
        let sum = checksum(&out);
        put_u64(&mut out, sum);
        out
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
            pos: MAGIC.len(),
        };
        let version = u32::from_le_bytes(r.take(4, "version")?.try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(corrupt(&format!(
                "version {version}, this build reads version {VERSION}"
            )));
        }
        let world = r.usize("world")?;
        let rank = r.usize("rank")?;
        let shard_len = r.usize("shard length")?;
        let cursor = r.usize("cursor")?;
        let epochs_begun = r.u64("epochs begun")?;
        let open = match r.u8("open flag")? {
            0 => false,
            1 => true,
            _ => return Err(corrupt("open flag is neither 0 nor 1")),
        };
        let has_dim = r.u8("dim flag")?;
        let dim_value = r.usize("dim")?;
        let dim = match has_dim {
            0 if dim_value == 0 => None,
            1 => Some(dim_value),
            _ => return Err(corrupt("dim flag")),
        };
        let s = r.f64s("running sum")?;
        let pending_grad = r.f64s("open-pair gradient")?;
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
            let len = r.usize("order length")?;
            if len != if epochs_begun == 0 { 0 } else { shard_len } {
                return Err(corrupt("a shard's order has the wrong length"));
            }
            let order = r.u32s(len, "shard order")?;
            if epochs_begun > 0 && !is_permutation(&order, shard_len) {
                return Err(corrupt("a shard's order is not a permutation"));
            }
            let next = r.u32s(shard_len, "assembly")?;
            let front = r.usize("front pointer")?;
            let back = r.usize("back pointer")?;
            let taken = r.u64s(shard_len.div_ceil(64), "assembly bitmap")?;
            let fb = FrontBack::from_parts(next, front, back, taken)
                .map_err(|e| GrabError::new(ErrorKind::State, e.message))?;
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
        if r.pos != body.len() {
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
        let mut sealed = crash[1..].to_vec();
        let sum = checksum(&sealed);
        sealed.extend_from_slice(&sum.to_le_bytes());
        let err = Coordinated::from_bytes(&sealed).unwrap_err();
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
        let reseal = |mut b: Vec<u8>| {
            let n = b.len() - 8;
            let sum = checksum(&b[..n]);
            b[n..].copy_from_slice(&sum.to_le_bytes());
            b
        };
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
