//! torchgrab's core: GraB example orderings (Lu, Guo, De Sa, NeurIPS 2022) as pure Rust, with no
//! Python in sight. `python.rs` (feature "python") is the only place PyO3 appears.

pub mod assembly;
pub mod batch;
pub mod coordinated;
pub mod discrepancy;
pub mod elem;
pub mod error;
pub mod greedy;
pub mod herding;
pub mod kernels;
pub mod mean_balance;
pub mod pair_balance;
pub mod permutations;
pub mod projection;
pub mod recursive_balance;
pub mod recursive_pair;
pub mod rng;
pub mod sampler;
pub mod sign;
pub mod sign_scan;
pub mod sketch_rows;
pub mod state_codec;
pub mod stored_gradients;

#[cfg(feature = "python")]
mod python;

pub use batch::Batch;
pub use error::{ErrorKind, GrabError, Result};
pub use sampler::{Config, OrderingKind, Sampler, SamplerState, ORDERING_NAMES};

#[cfg(test)]
mod family_tests;
