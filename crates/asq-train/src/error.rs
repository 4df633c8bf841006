//! The one error type of `asq-train`.

use std::path::PathBuf;

/// What can go wrong while building graphs, loading data, training or checkpointing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from the quantizer math.
    #[error(transparent)]
    Core(#[from] asq_core::Error),
    /// Operand shapes that do not fit.
    #[error("shape mismatch in {op}: {detail}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// What did not fit.
        detail: String,
    },
    /// A file that cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A data or checkpoint file whose content is wrong (bad magic, truncated, mismatched).
    #[error("{path}: {detail}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A configuration that cannot work (unknown parameter, bad hyper-parameter...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A non-finite value where training cannot continue (diverged loss, NaN input).
    #[error("non-finite value in {0}")]
    NonFinite(String),
}

/// `Result` with [`Error`].
pub type Result<T> = core::result::Result<T, Error>;

pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Error {
    Error::Shape {
        op,
        detail: detail.into(),
    }
}
