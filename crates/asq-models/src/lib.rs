//! # asq-models (not built yet)
//!
//! Will hold the model zoo (MLP, LeNet-5, ResNet-20/18/34, MobileNetV2), the quantization
//! policy, BN folding and export to the integer engine of `asq-kernels`. Nothing is implemented
//! yet; the crate fixes the layering (`asq-core`, `asq-train`, `asq-kernels` <- `asq-models`).
