//! # asq-models: model zoo, quantization policy, export to the integer engine
//!
//! - [`zoo`]: MLP, LeNet-5, ResNets (CIFAR `6n + 2` such as ResNet-20; ResNet-18/34 with a
//!   small-image stem) and MobileNetV2 (any width), built by name as a [`Model`] on
//!   `asq-train` layers.
//! - [`QuantPolicy`]: which quantizer each layer gets. First and last layers stay at 8-bit LSQ
//!   (as method.md recommends for fully integer inference); the body takes any combination of
//!   LSQ/ASQ activations and uniform/POT/APoT/POST weights ([`QuantPolicy::named`]).
//! - [`export`]: a trained layer becomes a node of an [`IntModel`]: batch norm folded into the
//!   per-channel scales and bias of the integer epilogue, residual additions and ReLU/ReLU6
//!   fused, ASQ adapters kept in float.
//! - [`engine`]: [`IntModel`], the exported graph running on `asq-kernels`, and its validated
//!   file format (`.asqm`).

pub mod engine;
pub mod export;
pub mod policy;
pub mod resnet;
pub mod torch;
pub mod zoo;

pub use engine::IntModel;
pub use policy::QuantPolicy;
pub use resnet::ResNet;
pub use zoo::Model;
