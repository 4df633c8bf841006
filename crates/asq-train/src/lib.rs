//! # asq-train: quantization-aware training on the CPU
//!
//! A light reverse-mode autodiff engine on ndarray and everything around it needed to train
//! full-precision and quantization-aware CNNs on real data:
//!
//! - [`Graph`]: the tape. Ops record their output and a [`graph::Backward`] rule; the tape
//!   knows nothing about specific ops.
//! - [`ops`]: differentiable ops (arithmetic, matmul/linear, conv2d with groups, batch norm,
//!   pooling, activations, dropout, softmax cross-entropy) and fake-quant ops built on
//!   `asq-core` (LSQ, ASQ with per-sample beta, POT/APoT/POST weights, uniform).
//! - [`nn`]: layers with stable parameter names; quantized conv/linear with LSQ or ASQ inputs
//!   (adapter included) and LSQ or level-set (POT/APoT/POST) weights.
//! - [`ParamStore`]: named parameters and buffers, the unit of optimizers and checkpoints.
//! - [`optim`]: SGD (momentum, Nesterov) and AdamW with parameter groups; LR schedules.
//! - [`data`]: IDX (plain and gzip) and CIFAR-10 readers, normalisation, augmentation, seeded
//!   batches. [`checkpoint`]: bounded, checksummed, atomically written checkpoints.
//! - [`train`]: the loop, with callbacks for progress and exact resumption.
//!
//! Deliberately left out: GPU backends, dynamic shapes beyond what CNNs need, model
//! definitions (the zoo is `asq-models`) and integer inference (`asq-kernels`).

pub mod buffers;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod framed;
pub mod graph;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod params;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
pub use graph::{Graph, Var};
pub use params::{Param, ParamId, ParamKind, ParamStore};
pub use rng::Rng;

/// The tensor type: a dynamic-rank f32 array.
pub type Tensor = ndarray::ArrayD<f32>;
