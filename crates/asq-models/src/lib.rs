//! # asq-models: model zoo and quantization policy
//!
//! Built so far: CIFAR-style ResNets (ResNet-20 and deeper `6n + 2` variants) on `asq-train`
//! layers, with a [`QuantPolicy`] that keeps the first and last layers at their own precision
//! (8 bits by default, as method.md recommends for fully integer inference) and quantizes every
//! residual-block convolution with the body configuration.
//!
//! Not built yet: MLP, LeNet-5, ImageNet ResNet-18/34, MobileNetV2, BN folding and export to
//! the integer engine of `asq-kernels`.

pub mod export;
pub mod policy;
pub mod resnet;

pub use policy::QuantPolicy;
pub use resnet::ResNet;
