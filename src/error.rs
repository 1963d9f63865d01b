//! The one error type of the core. Every refusal says what was expected and what came, and is
//! raised before any state is touched, so a refused call leaves the sampler exactly as it was.

use std::fmt;

/// What kind of refusal this is; the bindings map each kind onto one Python exception class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Wrong number of rows, wrong width, mismatched segments.
    Shape,
    /// A NaN or infinite gradient value.
    NonFinite,
    /// Indices out of range, repeated, or already balanced this epoch.
    Index,
    /// A call that does not fit the sampler's lifecycle (e.g. a step before any epoch began).
    CallOrder,
    /// A configuration or a state dict that does not fit this sampler.
    State,
    /// A request that would need more memory than is sane to allocate.
    Memory,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrabError {
    pub kind: ErrorKind,
    pub message: String,
}

impl GrabError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        GrabError {
            kind,
            message: message.into(),
        }
    }
    pub fn shape(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Shape, message)
    }
    pub fn index(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Index, message)
    }
    pub fn call_order(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::CallOrder, message)
    }
    pub fn state(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::State, message)
    }
}

impl fmt::Display for GrabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for GrabError {}

pub type Result<T> = std::result::Result<T, GrabError>;
