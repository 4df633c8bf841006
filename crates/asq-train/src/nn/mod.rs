//! Layers: parameter-owning building blocks with stable names.
//!
//! A layer registers its parameters in a [`ParamStore`] under a dotted prefix at construction
//! and records ops on a [`Graph`] in `forward`. Quantized layers ([`quant`]) wrap the float ones
//! with a weight quantizer and an input (activation) quantizer, ASQ's adapter included.

pub mod init;
pub mod layers;
pub mod quant;

pub use init::{Init, InitScheme};
pub use layers::{BatchNorm2d, Conv2d, Linear};
pub use quant::{ActQuant, Adapter, QConv2d, QLinear, QuantConfig, StepGradScale, WeightQuant};

use crate::error::Result;
use crate::graph::{Graph, Var};
use crate::params::ParamStore;

/// Something with a forward pass.
pub trait Module: Send + Sync {
    /// Records the forward pass of `x` on `g`. Training-mode side effects (batch-norm running
    /// statistics, first-batch quantizer initialisation) update `ps`.
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var>;
}
