//! The O(n d) store of the offline orderings (`herding`, `greedy`): every unit's gradient of the
//! running epoch, by unit index, plus the memory check that refuses a store which would not fit
//! (a clear error naming the bytes, instead of the OOM killer).

use crate::assembly::FrontBack;
use crate::batch::Batch;
use crate::elem::{GradElem, StateElem};
use crate::error::{ErrorKind, GrabError, Result};
use crate::recursive_balance::check_finite;

#[derive(Debug, Clone, PartialEq)]
pub struct StoredGradients<S> {
    pub d: usize,
    /// Row-major n x d; row i is unit i's gradient when the assembler marks i as taken this epoch.
    pub rows: Vec<S>,
}

/// Bytes of memory available to this process: /proc/meminfo's MemAvailable (None where unknown).
pub fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn human(bytes: u128) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.2} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// Refuse when `need` bytes exceed `max_memory` (if given) or MemAvailable.
pub fn check_memory(what: &str, need: u128, max_memory: Option<u64>) -> Result<()> {
    let (limit, source) = match max_memory {
        Some(m) => (m, "the max_memory limit"),
        None => match mem_available() {
            Some(m) => (m, "MemAvailable in /proc/meminfo"),
            None => return Ok(()),
        },
    };
    if need > limit as u128 {
        return Err(GrabError::new(
            ErrorKind::Memory,
            format!(
                "{what} would need {need} bytes ({}), more than the {limit} bytes ({}) allowed by {source}; \
                 use ordering='grab' (O(d) memory), a projection (projection=('gaussian', k)), or fewer units",
                human(need),
                human(limit as u128)
            ),
        ));
    }
    Ok(())
}

impl<S: StateElem> StoredGradients<S> {
    /// Allocate the n x d store after checking it fits; `extra` is further working memory in bytes.
    pub fn new(
        ordering: &str,
        n: usize,
        d: usize,
        extra: u128,
        max_memory: Option<u64>,
    ) -> Result<Self> {
        let need = n as u128 * d as u128 * std::mem::size_of::<S>() as u128 + extra;
        check_memory(
            &format!(
                "ordering '{ordering}' stores every unit's gradient: n = {n} x d = {d} x {} bytes (+ working memory)",
                std::mem::size_of::<S>()
            ),
            need,
            max_memory,
        )?;
        let len = n * d;
        let mut rows = Vec::new();
        rows.try_reserve_exact(len).map_err(|_| {
            GrabError::new(
                ErrorKind::Memory,
                format!(
                    "could not allocate {need} bytes for the gradients of ordering '{ordering}'"
                ),
            )
        })?;
        rows.resize(len, S::default());
        Ok(StoredGradients { d, rows })
    }

    /// Copy each row into its unit's slot and record the visit order (every unit in the front block).
    pub fn step<G: GradElem>(
        &mut self,
        batch: &Batch<G>,
        indices: &[u32],
        assembler: &mut FrontBack,
    ) -> Result<()> {
        check_finite(batch, indices)?;
        let d = self.d;
        for (r, &unit) in indices.iter().enumerate().take(batch.rows()) {
            let dst = &mut self.rows[unit as usize * d..(unit as usize + 1) * d];
            for (o, p) in batch.row(r).pieces() {
                for (x, g) in dst[o..o + p.len()].iter_mut().zip(p) {
                    *x = S::from_f64(g.to_f64());
                }
            }
            assembler.place(unit, 1.0);
        }
        Ok(())
    }

    pub fn row(&self, i: u32) -> &[S] {
        &self.rows[i as usize * self.d..(i as usize + 1) * self.d]
    }

    /// The exact (f64) mean of the rows of `units`.
    pub fn mean(&self, units: &[u32]) -> Vec<f64> {
        let mut mean = vec![0.0f64; self.d];
        for &i in units {
            for (m, x) in mean.iter_mut().zip(self.row(i)) {
                *m += x.to_f64();
            }
        }
        let inv = 1.0 / units.len().max(1) as f64;
        mean.iter_mut().for_each(|m| *m *= inv);
        mean
    }

    pub fn validate(&self, n: usize) -> Result<()> {
        if self.d == 0
            || n.checked_mul(self.d) != Some(self.rows.len())
            || !self.rows.iter().all(|x| x.to_f64().is_finite())
        {
            return Err(GrabError::state(
                "corrupted state: the stored gradients do not fit n x d or are not finite",
            ));
        }
        Ok(())
    }
}

/// The units balanced this epoch, in visit order (the offline orderings record all of them at the front).
pub fn visited(assembler: &FrontBack) -> &[u32] {
    let (next, front, _, _) = assembler.parts();
    &next[..front]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_store_over_the_limit_and_names_the_bytes() {
        let err = StoredGradients::<f32>::new("greedy", 1000, 100, 0, Some(100_000)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Memory);
        assert!(err.message.contains("400000 bytes"), "{}", err.message);
        assert!(err.message.contains("max_memory"), "{}", err.message);
        assert!(StoredGradients::<f32>::new("greedy", 1000, 100, 0, Some(400_000)).is_ok());
        // Against the machine's real memory: 2^40 x 2^20 f64 is far beyond any MemAvailable.
        if mem_available().is_some() {
            let err = check_memory("x", 1u128 << 63, None).unwrap_err();
            assert!(err.message.contains("MemAvailable"));
        }
    }
}
