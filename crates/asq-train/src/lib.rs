//! # asq-train (not built yet)
//!
//! Will hold the tape autograd on ndarray, layers, fake-quant ops over `asq-core`, optimizers,
//! data loaders and checkpoints. Nothing is implemented yet; this crate exists so that the
//! workspace layering (`asq-core` <- `asq-train`) is fixed from the start.
