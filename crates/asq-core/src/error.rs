//! The one error type of `asq-core`.

/// Everything that can go wrong in `asq-core`: every variant names the offending value so that a
/// caller can report it without extra context.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A bit width outside the supported range.
    #[error("bit width {bits} is out of range: supported widths are {min}..={max}")]
    BitWidth {
        /// The width that was asked for.
        bits: u32,
        /// Smallest supported width.
        min: u32,
        /// Largest supported width.
        max: u32,
    },
    /// Two buffers whose lengths must agree do not.
    #[error("length mismatch for {what}: expected {expected}, got {got}")]
    Length {
        /// Which buffer is wrong.
        what: &'static str,
        /// The length the other arguments imply.
        expected: usize,
        /// The length that was passed.
        got: usize,
    },
    /// A step size (or scale alpha) that is not a finite positive number.
    #[error("invalid {what} {value} at index {index}: must be finite and > 0")]
    Step {
        /// "step size", "alpha", "beta", ...
        what: &'static str,
        /// The offending value.
        value: f32,
        /// Its index (channel or sample).
        index: usize,
    },
    /// A non-finite value where only finite values are allowed.
    #[error("non-finite value {value} in {what} at index {index}")]
    NonFinite {
        /// Which input.
        what: &'static str,
        /// The offending value.
        value: f32,
        /// Its index.
        index: usize,
    },
    /// A code that does not fit the bit width, or names no level.
    #[error("code {code} at index {index} is out of range for {bits}-bit codes")]
    Code {
        /// The offending code.
        code: u32,
        /// The bit width in force.
        bits: u32,
        /// Its index.
        index: usize,
    },
    /// A level set that cannot be built or does not fit its bit width.
    #[error("invalid level set: {0}")]
    Levels(String),
    /// A packed buffer that cannot hold what its header or length claims.
    #[error("corrupt packed data: {0}")]
    Corrupt(String),
    /// A combination of options that is not supported, with the reason.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// `Result` with [`Error`].
pub type Result<T> = core::result::Result<T, Error>;

/// Checks that `got == expected`, naming the buffer otherwise.
pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::Length {
            what,
            expected,
            got,
        })
    }
}

/// Checks that every value is finite and > 0 (step sizes, alphas, betas, scales), naming the
/// first offending index.
pub fn check_positive(what: &'static str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
        None => Ok(()),
        Some(index) => Err(Error::Step {
            what,
            value: values[index],
            index,
        }),
    }
}
