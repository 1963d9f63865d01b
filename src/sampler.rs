//! The sampler's state machine: which order each epoch gets, and where a step's gradients go.
//! Every refusal happens before any field changes, so a refused call leaves the state as it was.

use crate::assembly::FrontBack;
use crate::batch::Batch;
use crate::elem::{GradElem, StateElem};
use crate::error::{ErrorKind, GrabError, Result};
use crate::kernels::Layout;
use crate::mean_balance::MeanBalance;
use crate::pair_balance::PairBalance;
use crate::permutations;
use crate::sign::SignRule;

/// The on-device path's step (inner products in, signs out).
mod gram_step;

/// Names accepted by `OrderingKind::parse`, in the order `torchgrab.orderings()` lists them.
pub const ORDERING_NAMES: &[&str] = &[
    "rr", "so", "wr", "fixed", "flipflop", "grab", "mean", "pair",
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
        }
    }

    /// Whether this ordering uses gradients at all.
    pub fn balances(self) -> bool {
        matches!(self, Self::MeanBalance | Self::PairBalance)
    }
}

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
}

impl<S: StateElem> Balance<S> {
    fn new(kind: OrderingKind, d: usize) -> Self {
        match kind {
            OrderingKind::PairBalance => Balance::Pair(PairBalance::new(d)),
            _ => Balance::Mean(MeanBalance::new(d)),
        }
    }

    fn dim(&self) -> usize {
        match self {
            Balance::Mean(b) => b.s.len(),
            Balance::Pair(b) => b.s.len(),
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

    /// d, once the first step has fixed it.
    pub fn dim(&self) -> Option<usize> {
        self.balance.as_ref().map(|b| b.dim())
    }

    pub fn balance(&self) -> Option<&Balance<S>> {
        self.balance.as_ref()
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
            OrderingKind::MeanBalance | OrderingKind::PairBalance => match self.assembler.take() {
                None if self.cfg.first_epoch_random => {
                    permutations::random_permutation(seed, epoch, n)
                }
                None => (0..n as u32).collect(),
                Some(asm) => {
                    let next = asm.finish(&self.current);
                    match &mut self.balance {
                        Some(Balance::Mean(b)) => b.end_epoch(n),
                        Some(Balance::Pair(b)) => b.end_epoch(),
                        None => {}
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
        if self.epochs_begun == 0 {
            return Err(GrabError::call_order(
                "step() was called before any epoch began; iterate the sampler first",
            ));
        }
        if indices.len() != batch.rows() {
            return Err(GrabError::shape(format!(
                "the gradients have {} rows but {} indices were given",
                batch.rows(),
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
            return Ok(());
        }
        let d = batch.dim();
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
            .as_mut()
            .ok_or_else(|| GrabError::call_order("no epoch is running"))?;
        asm.check_fresh(indices)?;
        if let Some(Balance::Pair(p)) = &self.balance {
            p.check_not_pending(indices)?;
        }
        if batch.rows() == 0 {
            return Ok(());
        }
        let layout = Layout::new(batch_widths(batch));
        // A first step works on a fresh state that is kept only if the step succeeds.
        let mut fresh = None;
        let balance = match self.balance.as_mut() {
            Some(b) => b,
            None => fresh.insert(Balance::new(self.cfg.kind, d)),
        };
        match balance {
            Balance::Mean(b) => b.step(&layout, batch, indices, asm, &mut self.rule, n)?,
            Balance::Pair(b) => b.step(&layout, batch, indices, asm, &mut self.rule, n)?,
        }
        if fresh.is_some() {
            self.balance = fresh;
        }
        Ok(())
    }
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
            };
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
        Ok(Sampler {
            cfg,
            epochs_begun: state.epochs_begun,
            epoch: state.epoch,
            current: state.current,
            assembler,
            balance: state.balance,
            rule,
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
