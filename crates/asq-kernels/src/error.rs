//! The one error type of `asq-kernels`.

/// What can go wrong when building kernel inputs or running a kernel.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// An error from the quantizer math (bad width, bad step, bad code...).
    #[error(transparent)]
    Core(#[from] asq_core::Error),
    /// Operand shapes that do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A serialized weight buffer that is truncated, has a bad header or inconsistent fields.
    #[error("malformed packed weights: {0}")]
    Format(String),
    /// A problem too large for exact i32 accumulation.
    #[error("accumulator overflow: {0}")]
    Overflow(String),
    /// A kernel variant that this CPU cannot run.
    #[error("kernel variant {0} is not supported on this CPU")]
    UnsupportedIsa(&'static str),
}

/// `Result` with [`Error`].
pub type Result<T> = core::result::Result<T, Error>;
