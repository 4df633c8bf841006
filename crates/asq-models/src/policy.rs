//! Which quantization each layer of a model gets.

use asq_core::{BitWidth, LevelSet};
use asq_train::nn::{ActQuant, QuantConfig, WeightQuant};
use asq_train::Result;

/// Quantization of a model: the first layer, the last layer and everything in between.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantPolicy {
    /// The stem convolution (its input is the normalised image: signed).
    pub first: QuantConfig,
    /// Residual-block convolutions and shortcuts.
    pub body: QuantConfig,
    /// The classifier.
    pub last: QuantConfig,
}

impl QuantPolicy {
    /// Full precision everywhere.
    pub fn float() -> Self {
        Self {
            first: QuantConfig::float(),
            body: QuantConfig::float(),
            last: QuantConfig::float(),
        }
    }

    /// First and last layers at 8-bit LSQ, body as given.
    pub fn with_body(body: QuantConfig) -> Self {
        Self {
            first: QuantConfig {
                weights: WeightQuant::Lsq { bits: 8 },
                acts: ActQuant::Lsq {
                    bits: 8,
                    signed: true,
                },
            },
            body,
            last: QuantConfig {
                weights: WeightQuant::Lsq { bits: 8 },
                acts: ActQuant::Lsq {
                    bits: 8,
                    signed: false,
                },
            },
        }
    }

    /// LSQ weights and activations at `bits` in the body.
    pub fn lsq(bits: u32) -> Self {
        Self::with_body(QuantConfig {
            weights: WeightQuant::Lsq { bits },
            acts: ActQuant::Lsq {
                bits,
                signed: false,
            },
        })
    }

    /// ASQ activations and POST weights at `bits` in the body.
    pub fn asq_post(bits: u32) -> Result<Self> {
        let levels = LevelSet::post(BitWidth::new(bits)?)?;
        Ok(Self::with_body(QuantConfig {
            weights: WeightQuant::Levels(levels),
            acts: ActQuant::Asq {
                bits,
                signed: false,
            },
        }))
    }
}
