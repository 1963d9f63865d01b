//! The sampler's state machine: which order each epoch gets, and where a step's gradients go.
//! Every refusal happens before any field changes, so a refused call leaves the state as it was.

use crate::assembly::FrontBack;
use crate::batch::Batch;
use crate::elem::{GradElem, StateElem};
use crate::error::{ErrorKind, GrabError, Result};
use crate::kernels::{on_workers, Layout};
use crate::mean_balance::MeanBalance;
use crate::pair_balance::PairBalance;
use crate::permutations;
use crate::projection::{ProjectionSpec, Sketch};
use crate::recursive_balance::{RecursiveBalance, MAX_DEPTH};
use crate::recursive_pair::RecursivePairBalance;
use crate::sign::SignRule;
use crate::stored_gradients::StoredGradients;
use crate::{greedy, herding};
use ndarray::ArrayView2;

/// The on-device path's step (inner products in, signs out).
mod gram_step;

/// Names accepted by `OrderingKind::parse`, in the order `torchgrab.orderings()` lists them.
#[rustfmt::skip]
pub const ORDERING_NAMES: &[&str] = &[
    "rr", "so", "wr", "fixed", "flipflop", "grab", "mean", "pair",
    "recursive", "recursive-pair", "herding", "greedy",
];

/// The largest n: orders are kept as compact u32 (and exported as int32).
pub const MAX_UNITS: usize = i32::MAX as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderingKind {
    RandomReshuffle,
    ShuffleOnce,
    WithReplacement,
    Fixed,
    FlipFlop,
    MeanBalance,
    PairBalance,
    RecursiveBalance,
    RecursivePairBalance,
    Herding,
    Greedy,
}

impl OrderingKind {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "rr" => Self::RandomReshuffle,
            "so" => Self::ShuffleOnce,
            "wr" => Self::WithReplacement,
            "fixed" => Self::Fixed,
            "flipflop" => Self::FlipFlop,
            "grab" | "mean" => Self::MeanBalance,
            "pair" => Self::PairBalance,
            "recursive" => Self::RecursiveBalance,
            "recursive-pair" => Self::RecursivePairBalance,
            "herding" => Self::Herding,
            "greedy" => Self::Greedy,
            other => {
                return Err(GrabError::state(format!(
                    "unknown ordering {other:?}; expected one of {}",
                    ORDERING_NAMES.join(", ")
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::RandomReshuffle => "rr",
            Self::ShuffleOnce => "so",
            Self::WithReplacement => "wr",
            Self::Fixed => "fixed",
            Self::FlipFlop => "flipflop",
            Self::MeanBalance => "grab",
            Self::PairBalance => "pair",
            Self::RecursiveBalance => "recursive",
            Self::RecursivePairBalance => "recursive-pair",
            Self::Herding => "herding",
            Self::Greedy => "greedy",
        }
    }

    /// Whether this ordering uses gradients at all.
    pub fn balances(self) -> bool {
        !matches!(
            self,
            Self::RandomReshuffle
                | Self::ShuffleOnce
                | Self::WithReplacement
                | Self::Fixed
                | Self::FlipFlop
        )
    }
}

/// Herding passes per epoch at most. Each pass reads all n stored gradients, so more than a handful
/// is already a long epoch end; the bound also keeps a damaged or hand-edited checkpoint from asking for
/// millions of passes (the codec's mutation test decoded one that took a minute).
pub const MAX_ROUNDS: u32 = 1000;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub kind: OrderingKind,
    pub n: usize,
    pub seed: u64,
    /// First epoch of a balancing ordering: seeded random (true) or identity (false).
    pub first_epoch_random: bool,
    /// The self-balancing walk instead of the deterministic sign rule.
    pub random_signs: bool,
    pub delta: f64,
    /// `fixed`: the order to use (identity when None).
    pub fixed_order: Option<Vec<u32>>,
    /// `recursive`, `recursive-pair`: tree depth D.
    pub depth: u32,
    /// `herding`: passes over the stored gradients per epoch.
    pub rounds: u32,
    /// Balance a random projection of each gradient instead of the gradient (balancing orderings).
    pub projection: Option<ProjectionSpec>,
    /// Refuse balancing state larger than this many bytes (default: MemAvailable, for the O(n d) stores).
    pub max_memory: Option<u64>,
}

impl Config {
    pub fn new(kind: OrderingKind, n: usize, seed: u64) -> Self {
        Config {
            kind,
            n,
            seed,
            first_epoch_random: true,
            random_signs: false,
            delta: 0.1,
            fixed_order: None,
            depth: 5,
            rounds: 1,
            projection: None,
            max_memory: None,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.n == 0 {
            return Err(GrabError::state(
                "n must be at least 1 (the data set is empty)",
            ));
        }
        if self.n > MAX_UNITS {
            return Err(GrabError::new(
                ErrorKind::Memory,
                format!(
                    "n = {} exceeds the supported maximum of {MAX_UNITS} units",
                    self.n
                ),
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(GrabError::state(format!(
                "delta must be in (0, 1), got {}",
                self.delta
            )));
        }
        if let Some(o) = &self.fixed_order {
            check_permutation(o, self.n, "the fixed order")?;
        }
        if self.depth > MAX_DEPTH {
            return Err(GrabError::state(format!(
                "depth must be at most {MAX_DEPTH} (the tree holds 2^(depth+1) - 1 sums), got {}",
                self.depth
            )));
        }
        if !(1..=MAX_ROUNDS).contains(&self.rounds) {
            return Err(GrabError::state(format!(
                "rounds must be between 1 and {MAX_ROUNDS} (herding passes over the stored epoch per epoch), got {}",
                self.rounds
            )));
        }
        if self.kind == OrderingKind::Greedy && self.random_signs {
            return Err(GrabError::state(
                "ordering 'greedy' picks units by norm, not by signs; balance='random' does not apply to it",
            ));
        }
        if let Some(p) = &self.projection {
            if !self.kind.balances() {
                return Err(GrabError::state(format!(
                    "a projection only applies to orderings that use gradients, not {:?}",
                    self.kind.name()
                )));
            }
            if p.k == 0 {
                return Err(GrabError::state(
                    "the projection dimension k must be at least 1",
                ));
            }
        }
        Ok(())
    }
}

pub fn check_permutation(order: &[u32], n: usize, what: &str) -> Result<()> {
    if order.len() != n {
        return Err(GrabError::state(format!(
            "{what} has {} entries, expected n = {n}",
            order.len()
        )));
    }
    let mut seen = vec![0u64; n.div_ceil(64)];
    for &i in order {
        let (w, b) = ((i / 64) as usize, i % 64);
        if i as usize >= n || (seen[w] >> b) & 1 == 1 {
            return Err(GrabError::state(format!(
                "{what} is not a permutation of 0..{n} (bad or repeated entry {i})"
            )));
        }
        seen[w] |= 1 << b;
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
pub enum Balance<S> {
    Mean(MeanBalance<S>),
    Pair(PairBalance<S>),
    Recursive(RecursiveBalance<S>),
    RecursivePair(RecursivePairBalance<S>),
    /// `herding` and `greedy` (which one is the config's kind).
    Stored(StoredGradients<S>),
}

impl<S: StateElem> Balance<S> {
    fn new(cfg: &Config, d: usize) -> Result<Self> {
        let size = std::mem::size_of::<S>() as u128;
        Ok(match cfg.kind {
            OrderingKind::PairBalance => Balance::Pair(PairBalance::new(d)),
            OrderingKind::RecursiveBalance => {
                let need =
                    (crate::recursive_balance::nodes(cfg.depth) as u128 + 2) * d as u128 * size;
                crate::stored_gradients::check_memory(
                    &format!(
                        "ordering 'recursive' with depth {} (2^(depth+1) + 1 sums of d = {d})",
                        cfg.depth
                    ),
                    need,
                    cfg.max_memory,
                )?;
                Balance::Recursive(RecursiveBalance::new(cfg.depth, d))
            }
            OrderingKind::RecursivePairBalance => {
                Balance::RecursivePair(RecursivePairBalance::new(cfg.depth, d))
            }
            OrderingKind::Herding | OrderingKind::Greedy => {
                // Greedy's scan also keeps a centered f64 copy, one norm and one position per unit.
                let extra = if cfg.kind == OrderingKind::Greedy {
                    greedy::scan_bytes(cfg.n, d)
                } else {
                    0
                };
                Balance::Stored(StoredGradients::new(
                    cfg.kind.name(),
                    cfg.n,
                    d,
                    extra,
                    cfg.max_memory,
                )?)
            }
            _ => Balance::Mean(MeanBalance::new(d)),
        })
    }

    fn dim(&self) -> usize {
        match self {
            Balance::Mean(b) => b.s.len(),
            Balance::Pair(b) => b.s.len(),
            Balance::Recursive(b) => b.dim(),
            Balance::RecursivePair(b) => b.dim(),
            Balance::Stored(b) => b.d,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sampler<S> {
    cfg: Config,
    epochs_begun: u64,
    epoch: u64,
    current: Vec<u32>,
    assembler: Option<FrontBack>,
    balance: Option<Balance<S>>,
    rule: SignRule,
    /// The projection's sketch, once the first step has fixed the gradients' dimension.
    sketch: Option<Sketch>,
}

impl<S: StateElem> Sampler<S> {
    pub fn new(cfg: Config) -> Result<Self> {
        cfg.validate()?;
        let rule = if cfg.random_signs {
            SignRule::self_balancing_walk(cfg.seed, cfg.delta)
        } else {
            SignRule::deterministic()
        };
        Ok(Sampler {
            cfg,
            epochs_begun: 0,
            epoch: 0,
            current: Vec::new(),
            assembler: None,
            balance: None,
            rule,
            sketch: None,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn epochs_begun(&self) -> u64 {
        self.epochs_begun
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The running epoch's order (empty before the first epoch).
    pub fn current(&self) -> &[u32] {
        &self.current
    }

    /// d, once the first step has fixed it (the gradients' dimension, before any projection).
    pub fn dim(&self) -> Option<usize> {
        match &self.sketch {
            Some(sk) => Some(sk.d),
            None => self.balance.as_ref().map(|b| b.dim()),
        }
    }

    pub fn balance(&self) -> Option<&Balance<S>> {
        self.balance.as_ref()
    }

    /// Bytes held by the projection's cached sketch (0 without one, or when it is regenerated).
    pub fn sketch_bytes(&self) -> usize {
        self.sketch.as_ref().map_or(0, |sk| sk.cached_bytes())
    }

    /// Close the running epoch (if any) and start epoch number `epoch`; returns its order.
    pub fn begin_epoch(&mut self, epoch: u64) -> &[u32] {
        let n = self.cfg.n;
        let seed = self.cfg.seed;
        let order = match self.cfg.kind {
            OrderingKind::RandomReshuffle => permutations::random_reshuffle(seed, epoch, n),
            OrderingKind::ShuffleOnce => permutations::shuffle_once(seed, n),
            OrderingKind::WithReplacement => permutations::with_replacement(seed, epoch, n),
            OrderingKind::Fixed => permutations::fixed(self.cfg.fixed_order.as_deref(), n),
            OrderingKind::FlipFlop => permutations::flipflop(seed, epoch, n),
            _ => match self.assembler.take() {
                None if self.cfg.first_epoch_random => {
                    permutations::random_permutation(seed, epoch, n)
                }
                None => (0..n as u32).collect(),
                Some(asm) => {
                    let current = &self.current;
                    let rule = &mut self.rule;
                    let next = match &self.balance {
                        Some(Balance::Recursive(b)) => b.next_order(&asm, current),
                        Some(Balance::Stored(b)) if self.cfg.kind == OrderingKind::Greedy => {
                            greedy::next_order(b, &asm, current)
                        }
                        Some(Balance::Stored(b)) => {
                            herding::next_order(b, &asm, current, self.cfg.rounds, rule, n)
                        }
                        _ => asm.finish(current),
                    };
                    match &mut self.balance {
                        Some(Balance::Mean(b)) => b.end_epoch(n),
                        Some(Balance::Pair(b)) => b.end_epoch(),
                        Some(Balance::Recursive(b)) => b.end_epoch(n),
                        Some(Balance::RecursivePair(b)) => b.end_epoch(),
                        Some(Balance::Stored(_)) | None => {}
                    }
                    next
                }
            },
        };
        if self.cfg.kind.balances() {
            self.assembler = Some(FrontBack::new(n));
        }
        self.current = order;
        self.epochs_begun += 1;
        self.epoch = epoch;
        &self.current
    }

    /// Feed the gradients of the units `indices` (row r belongs to unit indices[r]).
    pub fn step<G: GradElem>(&mut self, batch: &Batch<G>, indices: &[u32]) -> Result<()> {
        if !self.check_step(batch.rows(), batch.dim(), indices)? || batch.rows() == 0 {
            return Ok(());
        }
        self.step_checked(batch, indices)
    }

    /// `step` once `check_step` has passed on these rows (at least one): the balancing itself.
    fn step_checked<G: GradElem>(&mut self, batch: &Batch<G>, indices: &[u32]) -> Result<()> {
        let d = batch.dim();
        let asm = self
            .assembler
            .as_mut()
            .expect("check_step found an epoch running");
        // With a projection, the balance sees the B x k rows P g instead of the gradients.
        match self.cfg.projection {
            None => on_workers(d, || {
                balance_rows(
                    &self.cfg,
                    &mut self.balance,
                    &mut self.rule,
                    asm,
                    batch,
                    indices,
                )
            })?,
            Some(spec) => {
                // Checked on the gradients themselves: a sketch column of zeros could hide an Inf.
                crate::recursive_balance::check_finite(batch, indices)?;
                let mut fresh_sketch = None;
                let sketch = match self.sketch.as_mut() {
                    Some(sk) => sk,
                    None => fresh_sketch.insert(Sketch::new(spec, self.cfg.seed, d)?),
                };
                let projected = sketch.project(batch)?;
                let projected = Batch::from_slice(&projected, batch.rows(), spec.k)?;
                balance_rows(
                    &self.cfg,
                    &mut self.balance,
                    &mut self.rule,
                    asm,
                    &projected,
                    indices,
                )?;
                if fresh_sketch.is_some() {
                    self.sketch = fresh_sketch;
                }
            }
        }
        Ok(())
    }
}

impl<S: StateElem> Sampler<S> {
    /// What `step` refuses, checked before anything is touched, for `rows` rows of width `d`: Ok(false)
    /// when the ordering takes no gradients (the step then changes nothing).
    fn check_step(&self, rows: usize, d: usize, indices: &[u32]) -> Result<bool> {
        if self.epochs_begun == 0 {
            return Err(GrabError::call_order(
                "step() was called before any epoch began; iterate the sampler first",
            ));
        }
        if indices.len() != rows {
            return Err(GrabError::shape(format!(
                "the gradients have {rows} rows but {} indices were given",
                indices.len()
            )));
        }
        let n = self.cfg.n;
        if let Some(&bad) = indices.iter().find(|&&i| i as usize >= n) {
            return Err(GrabError::index(format!(
                "index {bad} is out of range for a sampler of n = {n} units"
            )));
        }
        if !self.cfg.kind.balances() {
            return Ok(false);
        }
        if d == 0 {
            return Err(GrabError::shape(
                "the gradients have width d = 0; there is nothing to balance",
            ));
        }
        if let Some(expected) = self.dim() {
            if expected != d {
                return Err(GrabError::shape(format!(
                    "expected gradients of dimension d = {expected} (fixed by the first step), got d = {d}"
                )));
            }
        }
        let asm = self
            .assembler
            .as_ref()
            .ok_or_else(|| GrabError::call_order("no epoch is running"))?;
        asm.check_fresh(indices)?;
        if let Some(Balance::Pair(p)) = &self.balance {
            p.check_not_pending(indices)?;
        }
        if let Some(Balance::RecursivePair(p)) = &self.balance {
            p.check_not_pending(indices)?;
        }
        Ok(true)
    }

    /// `step` on the rows whose factors are the rows of `f` (rows x (p + q)): row r is
    /// `vec(f[r, ..p] f[r, p..]^T)` followed, with `bias`, by `f[r, ..p]`
    /// ([`crate::sketch_rows::expand_outer`]; `count_factors` writes such factors for a lone Linear
    /// layer). For `grab` and `pair` without a projection the rows are formed `OUTER_CHUNK` at a time in a
    /// small buffer that the balancing reads while it is in cache, so a block of rows is never written
    /// to memory; the other orderings get the rows formed whole. The same bits as `step` on the formed
    /// rows (rows are balanced in order, so chunks change nothing), and all or nothing like it: a chunk
    /// refused after others were balanced (a running sum overflowing) puts back the state they changed.
    pub fn step_outer(
        &mut self,
        f: ArrayView2<'_, f32>,
        p: usize,
        bias: bool,
        indices: &[u32],
    ) -> Result<()> {
        let (rows, cols) = f.dim();
        let flat = f.to_slice().ok_or_else(|| {
            GrabError::shape("the factors of outer rows must be a C-contiguous array")
        })?;
        if p == 0 || p > cols {
            return Err(GrabError::shape(format!(
                "outer rows from factors {cols} wide split after column {p} (need 1 <= p <= {cols})"
            )));
        }
        let width = crate::sketch_rows::outer_width(p, cols - p, bias);
        if !self.check_step(rows, width, indices)? || rows == 0 {
            return Ok(());
        }
        let chunked = matches!(
            self.cfg.kind,
            OrderingKind::MeanBalance | OrderingKind::PairBalance
        ) && self.cfg.projection.is_none();
        if !chunked || rows <= OUTER_CHUNK {
            let mut buf = zeros(rows, width)?;
            crate::sketch_rows::expand_outer(flat, cols, p, bias, &mut buf)?;
            return self.step_checked(&Batch::from_slice(&buf, rows, width)?, indices);
        }
        // What the chunks change, to put back if a later one is refused: the balance (d-sized sums for
        // these two orderings), the sign rule and the assembly's pointers and marks.
        let saved_balance = self.balance.clone();
        let saved_rule = self.rule.clone();
        let saved_ends = self.assembler.as_ref().map(|a| a.ends());
        let mut buf = zeros(OUTER_CHUNK, width)?;
        let mut done = 0;
        // Pair balancing keeps a row waiting for its partner between calls (in a buffer that is state):
        // chunks end at a pair's end, as the call's rows pair up, so a row waits only where it would
        // after the whole call.
        let mut next_chunk = match &self.balance {
            Some(Balance::Pair(b)) if b.pending.is_some() => OUTER_CHUNK - 1,
            _ => OUTER_CHUNK,
        };
        while done < rows {
            let take = next_chunk.min(rows - done);
            next_chunk = OUTER_CHUNK;
            let out = &mut buf[..take * width];
            let result = crate::sketch_rows::expand_outer(
                &flat[done * cols..(done + take) * cols],
                cols,
                p,
                bias,
                out,
            )
            .and_then(|()| {
                self.step_checked(
                    &Batch::from_slice(out, take, width)?,
                    &indices[done..done + take],
                )
            });
            if let Err(e) = result {
                self.rule = saved_rule;
                // Placed since: the rows balanced, and a pair's waiting unit from before this call.
                let waiting = match &saved_balance {
                    Some(Balance::Pair(b)) => b.pending,
                    _ => None,
                };
                self.balance = saved_balance;
                if let (Some(asm), Some(ends)) = (self.assembler.as_mut(), saved_ends) {
                    asm.take_back(ends, &indices[..done]);
                    if let Some(u) = waiting {
                        asm.take_back(ends, &[u]);
                    }
                }
                return Err(e);
            }
            done += take;
        }
        Ok(())
    }
}

/// Rows of outer products formed per call of `Sampler::step_outer` when they are formed in chunks:
/// 16 rows of MNIST's 1,030 columns are 66 KB, which the balancing reads back from the core's L2.
/// Even, so that chunks end at the end of a pair (`pair` balancing).
pub const OUTER_CHUNK: usize = 16;

/// A zeroed buffer of rows x width f32, or an error where that does not fit in memory (never an abort).
pub(crate) fn zeros(rows: usize, width: usize) -> Result<Vec<f32>> {
    let n = rows.checked_mul(width).ok_or_else(|| {
        GrabError::shape(format!(
            "{rows} rows of {width} values do not fit in memory"
        ))
    })?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        GrabError::new(
            ErrorKind::Memory,
            format!("could not allocate {rows} rows of {width} float32 to form outer rows"),
        )
    })?;
    v.resize(n, 0f32);
    Ok(v)
}

/// Balance the rows of `batch` (already projected, if the config asks for it). A first step works on a
/// fresh state that is kept only if the step succeeds.
fn balance_rows<S: StateElem, G: GradElem>(
    cfg: &Config,
    slot: &mut Option<Balance<S>>,
    rule: &mut SignRule,
    asm: &mut FrontBack,
    batch: &Batch<G>,
    indices: &[u32],
) -> Result<()> {
    let n = cfg.n;
    let layout = Layout::new(batch_widths(batch));
    let mut fresh = None;
    let balance = match slot.as_mut() {
        Some(b) => b,
        None => fresh.insert(Balance::new(cfg, batch.dim())?),
    };
    match balance {
        Balance::Mean(b) => b.step(&layout, batch, indices, asm, rule, n)?,
        Balance::Pair(b) => b.step(&layout, batch, indices, asm, rule, n)?,
        Balance::Recursive(b) => b.step(&layout, batch, indices, asm, rule, n)?,
        Balance::RecursivePair(b) => b.step(&layout, batch, indices, asm, rule, n)?,
        Balance::Stored(b) => b.step(batch, indices, asm)?,
    }
    if fresh.is_some() {
        *slot = fresh;
    }
    Ok(())
}

fn batch_widths<G: GradElem>(batch: &Batch<G>) -> Vec<usize> {
    batch.row(0).pieces().map(|(_, p)| p.len()).collect()
}

/// Everything a sampler is, as plain vectors and numbers: what a checkpoint stores.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerState<S> {
    pub config: Config,
    pub epochs_begun: u64,
    pub epoch: u64,
    pub current: Vec<u32>,
    /// (next, front, back, taken bitmap) while a balancing epoch runs.
    pub assembly: Option<(Vec<u32>, u64, u64, Vec<u64>)>,
    pub balance: Option<Balance<S>>,
    pub sign_rng: Option<[u64; 4]>,
    /// With a projection: the gradients' dimension d (the balance holds k), once fixed.
    pub input_dim: Option<u64>,
}

/// `SamplerState` by reference (see `Sampler::state_parts`).
pub struct StateParts<'a, S> {
    pub config: &'a Config,
    pub epochs_begun: u64,
    pub epoch: u64,
    pub current: &'a [u32],
    pub assembly: Option<&'a FrontBack>,
    pub balance: Option<&'a Balance<S>>,
    pub sign_rng: Option<[u64; 4]>,
    pub input_dim: Option<u64>,
}

impl<S: StateElem> Sampler<S> {
    pub fn export_state(&self) -> SamplerState<S> {
        SamplerState {
            config: self.cfg.clone(),
            epochs_begun: self.epochs_begun,
            epoch: self.epoch,
            current: self.current.clone(),
            assembly: self.assembler.as_ref().map(|a| {
                let (next, f, b, taken) = a.parts();
                (next.to_vec(), f as u64, b as u64, taken.to_vec())
            }),
            balance: self.balance.clone(),
            sign_rng: match &self.rule {
                SignRule::Deterministic => None,
                SignRule::SelfBalancingWalk { rng, .. } => Some(rng.state()),
            },
            input_dim: self.sketch.as_ref().map(|sk| sk.d as u64),
        }
    }

    /// The pieces of `export_state`, borrowed: the bindings export the O(n) buffers (orders, bitmap,
    /// leaf codes) from their own per-epoch cache instead of copying them on every checkpoint.
    pub fn state_parts(&self) -> StateParts<'_, S> {
        StateParts {
            config: &self.cfg,
            epochs_begun: self.epochs_begun,
            epoch: self.epoch,
            current: &self.current,
            assembly: self.assembler.as_ref(),
            balance: self.balance.as_ref(),
            sign_rng: match &self.rule {
                SignRule::Deterministic => None,
                SignRule::SelfBalancingWalk { rng, .. } => Some(rng.state()),
            },
            input_dim: self.sketch.as_ref().map(|sk| sk.d as u64),
        }
    }

    /// Rebuild a sampler from a state, checking that it is internally consistent; a corrupted state is
    /// refused rather than trusted.
    pub fn import_state(state: SamplerState<S>) -> Result<Self> {
        let cfg = state.config;
        cfg.validate()?;
        let n = cfg.n;
        let kind = cfg.kind;
        if state.epochs_begun == 0 {
            if !state.current.is_empty() || state.assembly.is_some() || state.balance.is_some() {
                return Err(GrabError::state(
                    "corrupted state: no epoch has begun, yet it holds orders or sums",
                ));
            }
        } else if kind == OrderingKind::WithReplacement {
            if state.current.len() != n || state.current.iter().any(|&i| i as usize >= n) {
                return Err(GrabError::state(
                    "corrupted state: the current order does not fit n",
                ));
            }
        } else {
            check_permutation(&state.current, n, "the current order")?;
        }
        let assembler = match state.assembly {
            Some((next, f, b, taken)) => {
                if !kind.balances() || state.epochs_begun == 0 || next.len() != n {
                    return Err(GrabError::state(
                        "corrupted state: assembly state does not fit this ordering",
                    ));
                }
                Some(FrontBack::from_parts(next, f as usize, b as usize, taken)?)
            }
            None if kind.balances() && state.epochs_begun > 0 => {
                return Err(GrabError::state(
                    "corrupted state: a running balancing epoch has no assembly state",
                ))
            }
            None => None,
        };
        if let Some(bal) = &state.balance {
            let ok_kind = matches!(
                (kind, bal),
                (OrderingKind::MeanBalance, Balance::Mean(_))
                    | (OrderingKind::PairBalance, Balance::Pair(_))
                    | (OrderingKind::RecursiveBalance, Balance::Recursive(_))
                    | (
                        OrderingKind::RecursivePairBalance,
                        Balance::RecursivePair(_)
                    )
                    | (
                        OrderingKind::Herding | OrderingKind::Greedy,
                        Balance::Stored(_)
                    )
            );
            if !ok_kind {
                return Err(GrabError::state(
                    "corrupted state: the balancing state belongs to another ordering",
                ));
            }
            let d = bal.dim();
            let finite = |v: &[S]| v.iter().all(|x| x.to_f64().is_finite());
            let good = match bal {
                Balance::Mean(b) => {
                    d > 0
                        && b.m.len() == d
                        && b.m_next.len() == d
                        && finite(&b.s)
                        && finite(&b.m)
                        && finite(&b.m_next)
                        && b.seen <= n as u64
                }
                Balance::Pair(b) => {
                    d > 0
                        && b.pending_grad.len() == d
                        && finite(&b.s)
                        && b.pending.map(|p| (p as usize) < n).unwrap_or(true)
                }
                Balance::Recursive(b) => {
                    b.validate(assembler.as_ref(), n)?;
                    b.depth == cfg.depth
                }
                Balance::RecursivePair(b) => {
                    b.validate(assembler.as_ref(), n)?;
                    b.depth == cfg.depth
                }
                Balance::Stored(b) => {
                    b.validate(n)?;
                    // Every unit recorded this epoch went to the front (visit order); none to the back.
                    assembler.as_ref().is_none_or(|a| a.parts().2 == 0)
                }
            };
            let k = cfg.projection.map(|p| p.k);
            if k.is_some_and(|k| k != d) {
                return Err(GrabError::state(
                    "corrupted state: the balancing state's dimension is not the projection's k",
                ));
            }
            if !good {
                return Err(GrabError::state(
                    "corrupted state: running sums have inconsistent lengths or non-finite values",
                ));
            }
            if let (Balance::Pair(b), Some(asm)) = (bal, &assembler) {
                if let Some(p) = b.pending {
                    if asm.is_taken(p) {
                        return Err(GrabError::state(
                            "corrupted state: the open pair's unit is already placed",
                        ));
                    }
                }
            }
        }
        let rule =
            match (cfg.random_signs, state.sign_rng) {
                (false, None) => SignRule::deterministic(),
                (true, Some(s)) => SignRule::SelfBalancingWalk {
                    delta: cfg.delta,
                    rng: crate::rng::Rng::from_state(s)
                        .ok_or_else(|| GrabError::state("corrupted state: all-zero RNG state"))?,
                },
                _ => return Err(GrabError::state(
                    "corrupted state: the sign rule's RNG state does not match the balance setting",
                )),
            };
        let sketch = match (cfg.projection, state.input_dim, &state.balance) {
            (None, None, _) => None,
            (Some(spec), Some(d), Some(_)) => Some(
                Sketch::new(spec, cfg.seed, d as usize)
                    .map_err(|e| GrabError::state(format!("corrupted state: {}", e.message)))?,
            ),
            (Some(_), None, None) => None,
            _ => {
                return Err(GrabError::state(
                    "corrupted state: the projection's input dimension does not match the configuration",
                ))
            }
        };
        Ok(Sampler {
            cfg,
            epochs_begun: state.epochs_begun,
            epoch: state.epoch,
            current: state.current,
            assembler,
            balance: state.balance,
            rule,
            sketch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sampler(kind: &str, n: usize, identity: bool) -> Sampler<f64> {
        let mut cfg = Config::new(OrderingKind::parse(kind).unwrap(), n, 0);
        cfg.first_epoch_random = !identity;
        Sampler::new(cfg).unwrap()
    }

    /// Run one epoch feeding the fixed `vectors` (n x d row-major) in visit order, `per_step` rows a step.
    fn run_epoch(
        s: &mut Sampler<f64>,
        epoch: u64,
        vectors: &[f64],
        d: usize,
        per_step: usize,
    ) -> Vec<u32> {
        let order = s.begin_epoch(epoch).to_vec();
        for chunk in order.chunks(per_step) {
            let rows: Vec<f64> = chunk
                .iter()
                .flat_map(|&i| vectors[i as usize * d..(i as usize + 1) * d].to_vec())
                .collect();
            let batch = Batch::from_slice(&rows, chunk.len(), d).unwrap();
            s.step(&batch, chunk).unwrap();
        }
        order
    }

    const HAND: [f64; 8] = [1.0, 0.0, 1.0, 1.0, -1.0, 0.0, 0.0, -2.0];

    #[test]
    fn grab_hand_computed() {
        // Epoch 0 (identity, m = 0): signs +, -, +, -  -> next [0, 2, 3, 1]; m = (1/4, -1/4).
        // Epoch 1 over [0, 2, 3, 1] centered by m: <s,z> = 0, -0.875, -0.75, -2.125 -> all +.
        let mut s = sampler("grab", 4, true);
        assert_eq!(run_epoch(&mut s, 0, &HAND, 2, 4), vec![0, 1, 2, 3]);
        assert_eq!(run_epoch(&mut s, 1, &HAND, 2, 4), vec![0, 2, 3, 1]);
        match s.balance().unwrap() {
            Balance::Mean(b) => assert_eq!(b.m, vec![0.25, -0.25]),
            _ => unreachable!(),
        }
        assert_eq!(s.begin_epoch(2), &[0, 2, 3, 1]);
    }

    #[test]
    fn pair_hand_computed() {
        // Epoch 0: pairs (0,1): z=(0,-1) -> +; (2,3): z=(-1,2), <s,z> = -2 -> +  => [0, 2, 3, 1]
        // Epoch 1: (0,2): z=(2,0) -> +; (3,1): z=(-1,-3), <s,z> = -2 -> + => [0, 3, 1, 2]
        // Epoch 2: (0,3): z=(1,2) -> +; (1,2): z=(2,1), <s,z> = 4 > 0 -> - => [0, 2, 1, 3]
        let mut s = sampler("pair", 4, true);
        run_epoch(&mut s, 0, &HAND, 2, 1);
        assert_eq!(run_epoch(&mut s, 1, &HAND, 2, 3), vec![0, 2, 3, 1]);
        assert_eq!(run_epoch(&mut s, 2, &HAND, 2, 4), vec![0, 3, 1, 2]);
        assert_eq!(s.begin_epoch(3), &[0, 2, 1, 3]);
    }

    #[test]
    fn unseen_units_go_in_the_middle_in_current_order() {
        let mut s = sampler("grab", 4, true);
        let order = s.begin_epoch(0).to_vec();
        let rows = [HAND[0], HAND[1], HAND[2], HAND[3]];
        s.step(&Batch::from_slice(&rows, 2, 2).unwrap(), &order[..2])
            .unwrap();
        // 0 -> front, 1 -> back; 2 and 3 unseen, in current order between them.
        assert_eq!(s.begin_epoch(1), &[0, 2, 3, 1]);
    }

    /// Factors (rows x (p + q)) and the rows they stand for, written out by the definition: row r is
    /// g_j a_c at column j q + c, then g_j with `bias` (g = the first p values, a = the other q).
    fn outer_case(
        rows: usize,
        p: usize,
        q: usize,
        bias: bool,
        salt: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let f: Vec<f32> = (0..rows * (p + q))
            .map(|i| ((i * 7919 + salt * 31) % 23) as f32 * 0.173 - 1.9)
            .collect();
        let mut rows_out = Vec::new();
        for r in f.chunks(p + q) {
            let (g, a) = r.split_at(p);
            for &gj in g {
                for &ac in a {
                    rows_out.push(gj * ac);
                }
            }
            if bias {
                rows_out.extend_from_slice(g);
            }
        }
        (f, rows_out)
    }

    fn gather(v: &[f32], width: usize, idx: &[u32]) -> Vec<f32> {
        idx.iter()
            .flat_map(|&i| v[i as usize * width..(i as usize + 1) * width].to_vec())
            .collect()
    }

    #[test]
    fn step_outer_equals_step_on_the_formed_rows() {
        // Steps of 0, 1, OUTER_CHUNK + 1 and more than two chunks, in every ordering; odd sizes leave
        // a pair waiting across calls. Three epochs, so that the means and the orders feed back.
        let (p, q, n) = (3, 5, 91);
        for kind in [
            "grab",
            "pair",
            "recursive",
            "recursive-pair",
            "herding",
            "greedy",
            "rr",
        ] {
            for bias in [true, false] {
                let width = p * q + if bias { p } else { 0 };
                let (f, rows) = outer_case(n, p, q, bias, kind.len());
                let cfg = Config::new(OrderingKind::parse(kind).unwrap(), n, 3);
                let mut by_factors = Sampler::<f32>::new(cfg.clone()).unwrap();
                let mut by_rows = Sampler::<f32>::new(cfg).unwrap();
                for epoch in 0..3 {
                    let order = by_factors.begin_epoch(epoch).to_vec();
                    assert_eq!(by_rows.begin_epoch(epoch), &order[..]);
                    let mut at = 0;
                    for size in [0, 1, OUTER_CHUNK + 1, 2 * OUTER_CHUNK + 3, 1, 37] {
                        let idx = &order[at..at + size];
                        let fs = gather(&f, p + q, idx);
                        let view = ArrayView2::from_shape((size, p + q), &fs).unwrap();
                        by_factors.step_outer(view, p, bias, idx).unwrap();
                        let rs = gather(&rows, width, idx);
                        by_rows
                            .step(&Batch::from_slice(&rs, size, width).unwrap(), idx)
                            .unwrap();
                        at += size;
                        assert_eq!(by_factors, by_rows, "{kind}, bias {bias}, epoch {epoch}");
                    }
                    assert_eq!(at, n);
                }
            }
        }
    }

    #[test]
    fn step_outer_refusals_change_nothing() {
        let (p, q, n) = (2, 4, 80);
        for kind in ["grab", "pair"] {
            let (mut f, _) = outer_case(n, p, q, true, 5);
            let cfg = Config::new(OrderingKind::parse(kind).unwrap(), n, 1);
            let mut s = Sampler::<f32>::new(cfg).unwrap();
            let view = |f: &[f32], rows: usize| {
                ArrayView2::from_shape((rows, p + q), f).unwrap().to_owned()
            };
            let order = s.begin_epoch(0).to_vec();
            // A pair left waiting, so that a refused call must not place it either.
            s.step_outer(view(&f[..p + q], 1).view(), p, true, &order[..1])
                .unwrap();
            let before = s.clone();
            let rest = &order[1..];
            // A NaN in the third chunk: two chunks are balanced before the kernel meets it.
            let bad_row = 2 * OUTER_CHUNK + 4;
            f[(1 + bad_row) * (p + q)] = f32::NAN;
            let fs = &f[(p + q)..(p + q) * n];
            let err = s
                .step_outer(view(fs, n - 1).view(), p, true, rest)
                .unwrap_err();
            assert_eq!(err.kind, ErrorKind::NonFinite, "{kind}");
            assert_eq!(
                s, before,
                "{kind}: a refused chunk puts back what earlier chunks changed"
            );
            // Checked before anything: a repeated unit in a later chunk, p out of range, a width of 0.
            let mut twice = rest[..40].to_vec();
            twice[35] = twice[2];
            let ok_rows = view(&fs[..40 * (p + q)], 40);
            assert_eq!(
                s.step_outer(ok_rows.view(), p, true, &twice)
                    .unwrap_err()
                    .kind,
                ErrorKind::Index
            );
            for bad_p in [0, p + q + 1] {
                assert_eq!(
                    s.step_outer(ok_rows.view(), bad_p, true, &rest[..40])
                        .unwrap_err()
                        .kind,
                    ErrorKind::Shape
                );
            }
            let no_q = ndarray::Array2::<f32>::ones((40, p));
            assert_eq!(
                s.step_outer(no_q.view(), p, false, &rest[..40])
                    .unwrap_err()
                    .kind,
                ErrorKind::Shape
            );
            assert_eq!(s, before, "{kind}");
            // The same rows without the NaN are then taken, as from a fresh copy.
            f[(1 + bad_row) * (p + q)] = 0.5;
            let fs = &f[(p + q)..(p + q) * n];
            let mut copy = before.clone();
            s.step_outer(view(fs, n - 1).view(), p, true, rest).unwrap();
            copy.step_outer(view(fs, n - 1).view(), p, true, rest)
                .unwrap();
            assert_eq!(s, copy);
        }
    }

    #[test]
    fn refused_steps_change_nothing() {
        let mut s = sampler("grab", 4, false);
        assert_eq!(
            s.step(&Batch::from_slice(&[1.0, 2.0], 1, 2).unwrap(), &[0])
                .unwrap_err()
                .kind,
            ErrorKind::CallOrder
        );
        let order = s.begin_epoch(0).to_vec();
        s.step(&Batch::from_slice(&[1.0, 2.0], 1, 2).unwrap(), &order[..1])
            .unwrap();
        let before = s.clone();
        let bad = [1.0, 2.0, f64::NAN, 0.0];
        assert_eq!(
            s.step(&Batch::from_slice(&bad, 2, 2).unwrap(), &order[1..3])
                .unwrap_err()
                .kind,
            ErrorKind::NonFinite
        );
        assert_eq!(s, before);
        assert_eq!(
            s.step(
                &Batch::from_slice(&[1.0, 2.0, 3.0], 1, 3).unwrap(),
                &order[1..2]
            )
            .unwrap_err()
            .kind,
            ErrorKind::Shape
        );
        assert_eq!(
            s.step(&Batch::from_slice(&[1.0, 2.0], 1, 2).unwrap(), &order[..1])
                .unwrap_err()
                .kind,
            ErrorKind::Index
        );
        assert_eq!(
            s.step(&Batch::from_slice(&[1.0, 2.0], 1, 2).unwrap(), &[9])
                .unwrap_err()
                .kind,
            ErrorKind::Index
        );
        assert_eq!(s, before);
    }

    #[test]
    fn state_round_trips_mid_epoch() {
        let vectors: Vec<f64> = (0..40).map(|i| ((i * 37) % 11) as f64 - 5.0).collect();
        for kind in ["grab", "pair"] {
            let mut a = sampler(kind, 10, false);
            run_epoch(&mut a, 0, &vectors, 4, 3);
            let order = a.begin_epoch(1).to_vec();
            let rows: Vec<f64> = order[..3]
                .iter()
                .flat_map(|&i| vectors[i as usize * 4..i as usize * 4 + 4].to_vec())
                .collect();
            a.step(&Batch::from_slice(&rows, 3, 4).unwrap(), &order[..3])
                .unwrap();
            let b = Sampler::import_state(a.export_state()).unwrap();
            assert_eq!(a, b);
        }
    }

    fn vectors_strategy() -> impl Strategy<Value = (usize, usize, Vec<f64>)> {
        (1usize..40, 1usize..12).prop_flat_map(|(n, d)| {
            (
                Just(n),
                Just(d),
                proptest::collection::vec(-10.0f64..10.0, n * d),
            )
        })
    }

    proptest! {
        #[test]
        fn orders_are_permutations_and_batching_does_not_matter(
            (n, d, vectors) in vectors_strategy(), per_step in 1usize..7, kind in prop::sample::select(vec!["grab", "pair", "rr", "so", "flipflop", "fixed"]),
            stop in 0usize..40,
        ) {
            let mut one = sampler(kind, n, false);
            let mut many = sampler(kind, n, false);
            for epoch in 0..3 {
                let o1 = run_epoch(&mut one, epoch, &vectors, d, 1);
                let o2 = run_epoch(&mut many, epoch, &vectors, d, per_step);
                prop_assert_eq!(&o1, &o2);
                prop_assert!(check_permutation(&o1, n, "order").is_ok());
            }
            // An early break: only a prefix gets gradients; the next order is still a permutation.
            let order = many.begin_epoch(3).to_vec();
            let k = stop.min(n);
            let rows: Vec<f64> = order[..k].iter().flat_map(|&i| vectors[i as usize * d..(i as usize + 1) * d].to_vec()).collect();
            many.step(&Batch::from_slice(&rows, k, d).unwrap(), &order[..k]).unwrap();
            let next = many.begin_epoch(4).to_vec();
            prop_assert!(check_permutation(&next, n, "order").is_ok());
            let restored = Sampler::import_state(many.export_state()).unwrap();
            prop_assert_eq!(restored, many);
        }
    }
}
