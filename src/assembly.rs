//! Front/back assembly of the next order: +1 units fill from the front in visit order, -1 units from
//! the back; units that got no sign this epoch keep their current relative order in the middle.

use crate::error::{GrabError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct FrontBack {
    next: Vec<u32>,
    front: usize,
    back: usize,
    /// One bit per unit: got a sign this epoch (so it has a place in the front or back block).
    taken: Vec<u64>,
}

impl FrontBack {
    pub fn new(n: usize) -> Self {
        FrontBack {
            next: vec![0; n],
            front: 0,
            back: 0,
            taken: vec![0; n.div_ceil(64)],
        }
    }

    pub fn n(&self) -> usize {
        self.next.len()
    }

    pub fn is_taken(&self, i: u32) -> bool {
        (self.taken[(i / 64) as usize] >> (i % 64)) & 1 == 1
    }

    fn mark(&mut self, i: u32) {
        self.taken[(i / 64) as usize] |= 1 << (i % 64);
    }

    /// Refuse indices out of range, repeated in `indices`, or already taken this epoch; touches nothing.
    pub fn check_fresh(&self, indices: &[u32]) -> Result<()> {
        let n = self.n();
        for &i in indices {
            if i as usize >= n {
                return Err(GrabError::index(format!(
                    "index {i} is out of range for a sampler of n = {n} units"
                )));
            }
            if self.is_taken(i) {
                return Err(GrabError::index(format!(
                    "unit {i} already received a gradient this epoch; each unit can be balanced once per epoch"
                )));
            }
        }
        let mut sorted = indices.to_vec();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(GrabError::index(format!(
                "unit {} appears twice in one step",
                w[0]
            )));
        }
        Ok(())
    }

    /// The front and back pointers: with [`FrontBack::take_back`], undoes the placements made since.
    pub fn ends(&self) -> (usize, usize) {
        (self.front, self.back)
    }

    /// Undo the placements of `placed` made since `ends()` returned `ends`: their marks are cleared, the
    /// pointers put back and the slots between zeroed, as they were (a slot is written once an epoch,
    /// when its unit is placed; unplaced slots hold zero, in a new buffer and in `buffer_from_blocks`).
    pub fn take_back(&mut self, ends: (usize, usize), placed: &[u32]) {
        for &i in placed {
            self.taken[(i / 64) as usize] &= !(1 << (i % 64));
        }
        let n = self.next.len();
        let (front, back) = ends;
        if front <= self.front && back <= self.back {
            self.next[front..self.front].fill(0);
            self.next[n - self.back..n - back].fill(0);
        }
        (self.front, self.back) = ends;
    }

    pub fn place(&mut self, i: u32, eps: f64) {
        self.mark(i);
        if eps > 0.0 {
            self.next[self.front] = i;
            self.front += 1;
        } else {
            self.back += 1;
            let n = self.next.len();
            self.next[n - self.back] = i;
        }
    }

    /// The next order: front block, then units with no sign in `current`'s order, then the back block.
    pub fn finish(&self, current: &[u32]) -> Vec<u32> {
        let n = self.next.len();
        let mut out = Vec::with_capacity(n);
        out.extend_from_slice(&self.next[..self.front]);
        for &i in current {
            if !self.is_taken(i) {
                out.push(i);
            }
        }
        out.extend_from_slice(&self.next[n - self.back..]);
        out
    }

    pub fn parts(&self) -> (&[u32], usize, usize, &[u64]) {
        (&self.next, self.front, self.back, &self.taken)
    }

    /// The buffer and bitmap of `from_parts` from just the placed blocks (what a state dict stores):
    /// `front_block` in order, then `back_block` as it sits at the end of the buffer. The bitmap is
    /// the placed units; `from_parts` still checks that they are distinct and in range.
    pub fn buffer_from_blocks(
        n: usize,
        front_block: &[u32],
        back_block: &[u32],
    ) -> Result<(Vec<u32>, Vec<u64>)> {
        if front_block.len() + back_block.len() > n {
            return Err(GrabError::state(
                "corrupted assembly state: pointers do not fit n (more placed units than units)",
            ));
        }
        let mut next = vec![0u32; n];
        next[..front_block.len()].copy_from_slice(front_block);
        next[n - back_block.len()..].copy_from_slice(back_block);
        let mut taken = vec![0u64; n.div_ceil(64)];
        for &i in front_block.iter().chain(back_block) {
            if (i as usize) < n {
                taken[(i / 64) as usize] |= 1 << (i % 64);
            }
        }
        Ok((next, taken))
    }

    pub fn from_parts(next: Vec<u32>, front: usize, back: usize, taken: Vec<u64>) -> Result<Self> {
        let n = next.len();
        // checked_add: pointers come from a checkpoint and may be anything (the fuzzer found a wrapping sum).
        if front.checked_add(back).is_none_or(|placed| placed > n) || taken.len() != n.div_ceil(64)
        {
            return Err(GrabError::state(
                "corrupted assembly state: pointers or bitmap do not fit n",
            ));
        }
        let fb = FrontBack {
            next,
            front,
            back,
            taken,
        };
        // The placed units must be exactly the marked ones, each once, or `finish` would not give a permutation.
        let placed = fb.next[..front].iter().chain(&fb.next[n - back..]);
        let mut seen = vec![0u64; n.div_ceil(64)];
        let mut count = 0usize;
        for &i in placed {
            if i as usize >= n || (seen[(i / 64) as usize] >> (i % 64)) & 1 == 1 || !fb.is_taken(i)
            {
                return Err(GrabError::state(
                    "corrupted assembly state: placed units are not distinct marked units",
                ));
            }
            seen[(i / 64) as usize] |= 1 << (i % 64);
            count += 1;
        }
        let marked: usize = fb.taken.iter().map(|w| w.count_ones() as usize).sum();
        if marked != count {
            return Err(GrabError::state(
                "corrupted assembly state: bitmap does not match the placed units",
            ));
        }
        Ok(fb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state dict stores only the placed blocks; rebuilding buffer and bitmap from them gives back
    /// the same assembly (the unplaced middle of the buffer is never read).
    #[test]
    fn blocks_rebuild_the_assembly() {
        let n = 70;
        let mut fb = FrontBack::new(n);
        for (k, i) in (0..n as u32).rev().step_by(3).enumerate() {
            fb.place(i, if k % 3 == 0 { -1.0 } else { 1.0 });
        }
        let (next, f, b, taken) = fb.parts();
        let (buf, bits) = FrontBack::buffer_from_blocks(n, &next[..f], &next[n - b..]).unwrap();
        assert_eq!(bits, taken);
        let back = FrontBack::from_parts(buf, f, b, bits).unwrap();
        assert_eq!(back.parts().3, taken);
        let current: Vec<u32> = (0..n as u32).collect();
        assert_eq!(back.finish(&current), fb.finish(&current));
    }

    #[test]
    fn bad_blocks_are_refused() {
        let err = FrontBack::buffer_from_blocks(3, &[0, 1], &[2, 0]).unwrap_err();
        assert!(err.message.contains("pointers"), "{}", err.message);
        // A unit placed twice, or out of range: the bitmap then disagrees with the blocks.
        for (front, back) in [(vec![1u32, 1], vec![]), (vec![0], vec![7u32])] {
            let (buf, bits) = FrontBack::buffer_from_blocks(4, &front, &back).unwrap();
            let err = FrontBack::from_parts(buf, front.len(), back.len(), bits).unwrap_err();
            assert!(err.message.contains("placed units"), "{}", err.message);
        }
    }
}
