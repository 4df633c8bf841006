//! The standard benchmark problems of asq's kernels, shared by the criterion benches and
//! `asq bench kernels` so that both measure the same thing.

use asq_core::quant::{IntGrid, Steps};
use asq_core::{BitWidth, LevelSet, QuantRange};

use crate::error::Result;
use crate::{PackedWeights, QuantActivations};

/// GEMM shapes `(name, M, K, N)` from real layers.
pub const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("gemv", 1, 1024, 1024),
    ("fc-64", 64, 576, 1024),
    ("fc-256", 256, 1024, 1024),
    ("square-1024", 1024, 1024, 1024),
    // ResNet-20 3x3 convs on 28x28 inputs as im2col GEMMs: M = batch·H·W, K = 9·C_in, N = C_out.
    ("resnet20-conv16-b1", 784, 144, 16),
    ("resnet20-conv32-b1", 196, 288, 32),
    ("resnet20-conv64-b1", 49, 576, 64),
    ("resnet20-conv16-b64", 50176, 144, 16),
    ("resnet20-conv32-b64", 12544, 288, 32),
    ("resnet20-conv64-b64", 3136, 576, 64),
];

/// Weight families of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightKind {
    /// Uniform signed 8-bit.
    Int8,
    /// POST on the integer grid 64 (one accumulator), at the given width.
    PostInt(u32),
    /// Exact POST (two accumulators), at the given width.
    PostExact(u32),
}

/// One kernel of the suite: a name, its weights and its activation width (unsigned).
#[derive(Debug, Clone, Copy)]
pub struct KernelCase {
    /// Report name (`int8`, `post-w4a8`, ...).
    pub name: &'static str,
    /// Weight family.
    pub weights: WeightKind,
    /// Activation bits (unsigned codes, as after ReLU).
    pub act_bits: u32,
}

/// The kernels of the suite.
pub const KERNELS: &[KernelCase] = &[
    KernelCase {
        name: "int8",
        weights: WeightKind::Int8,
        act_bits: 8,
    },
    KernelCase {
        name: "post-w4a8",
        weights: WeightKind::PostInt(4),
        act_bits: 8,
    },
    KernelCase {
        name: "post-exact-w4a8",
        weights: WeightKind::PostExact(4),
        act_bits: 8,
    },
    KernelCase {
        name: "post-w3a8",
        weights: WeightKind::PostInt(3),
        act_bits: 8,
    },
    KernelCase {
        name: "post-w2a8",
        weights: WeightKind::PostInt(2),
        act_bits: 8,
    },
    KernelCase {
        name: "post-w4a4",
        weights: WeightKind::PostInt(4),
        act_bits: 4,
    },
];

/// Deterministic values in `[-1, 1)` (splitmix64 of seed and index).
pub fn pseudo(seed: u64, i: usize) -> f32 {
    let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

impl KernelCase {
    /// Packed `[n, k]` weights of this case (deterministic).
    pub fn weights(&self, n: usize, k: usize) -> Result<PackedWeights> {
        let w: Vec<f32> = (0..n * k).map(|i| pseudo(7, i) * 0.5).collect();
        let alphas = vec![0.5f32; n];
        let bits = |b| BitWidth::new(b);
        match self.weights {
            WeightKind::Int8 => {
                let r = QuantRange::signed(8)?;
                let steps = vec![0.5 / 127.0; n];
                let mut codes = vec![0u8; n * k];
                asq_core::quant::encode(&IntGrid::new(r), &w, Steps::PerRow(&steps), &mut codes)?;
                PackedWeights::from_uniform_codes(&codes, n, k, r, &steps)
            }
            WeightKind::PostInt(b) => PackedWeights::quantize_levels(
                &w,
                n,
                k,
                &LevelSet::post_int(bits(b)?, 64)?,
                &alphas,
            ),
            WeightKind::PostExact(b) => {
                PackedWeights::quantize_levels(&w, n, k, &LevelSet::post(bits(b)?)?, &alphas)
            }
        }
    }

    /// `[m, k]` activations with per-sample (ASQ) scales (deterministic).
    pub fn activations(&self, m: usize, k: usize) -> Result<QuantActivations> {
        let range = QuantRange::unsigned(self.act_bits)?;
        let x: Vec<f32> = (0..m * k).map(|i| pseudo(3, i).abs()).collect();
        let betas: Vec<f32> = (0..m).map(|r| 0.5 + pseudo(4, r).abs()).collect();
        let step = 1.0 / range.max() as f32;
        QuantActivations::quantize(
            &x,
            m,
            k,
            range,
            Steps::Scaled {
                step,
                betas: &betas,
            },
        )
    }
}
