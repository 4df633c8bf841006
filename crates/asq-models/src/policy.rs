//! Which quantization each layer of a model gets.

use asq_core::{BitWidth, LevelSet};
use asq_train::nn::{ActQuant, QuantConfig, StepGradScale, WeightQuant};
use asq_train::{Error, Result};

/// The quantization methods [`QuantPolicy::named`] knows, for help texts.
pub const POLICY_NAMES: &str =
    "fp32, lsq, asq, lsq-pot, lsq-apot, lsq-post, asq-pot, asq-apot, asq-post";

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
                step_grad: Default::default(),
            },
            body,
            last: QuantConfig {
                weights: WeightQuant::Lsq { bits: 8 },
                acts: ActQuant::Lsq {
                    bits: 8,
                    signed: false,
                },
                step_grad: Default::default(),
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
            step_grad: Default::default(),
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
            step_grad: Default::default(),
        }))
    }

    /// The same body with the first and last layers in full precision (the protocol of the
    /// paper's code and of the published accuracy tables; such a model has no integer export).
    pub fn float_ends(self) -> Self {
        Self {
            first: QuantConfig::float(),
            last: QuantConfig::float(),
            ..self
        }
    }

    /// The same policy with `mode` as every layer's activation-step gradient scale.
    pub fn with_step_grad(mut self, mode: StepGradScale) -> Self {
        for c in [&mut self.first, &mut self.body, &mut self.last] {
            c.step_grad = mode;
        }
        self
    }

    /// A policy by name: `fp32`, or `<acts>[-<weights>]` with activations `lsq` or `asq` and
    /// weights `lsq` (uniform, the default), `pot`, `apot`, `post` (exact powers of sqrt(2):
    /// the two-accumulator integer kernel) or `post64` / `post127` (POST snapped to the integer
    /// grid G = 64 / 127, up to 4 bits: the one-accumulator int8 kernel, faster), all at `bits`
    /// in the body (first and last layers at 8-bit LSQ). `asq-post` is the paper's method.
    pub fn named(name: &str, bits: u32) -> Result<Self> {
        if name == "fp32" {
            return Ok(Self::float());
        }
        let (acts, weights) = name.split_once('-').unwrap_or((name, "lsq"));
        let b = BitWidth::new(bits)?;
        let acts = match acts {
            "lsq" => ActQuant::Lsq {
                bits,
                signed: false,
            },
            "asq" => ActQuant::Asq {
                bits,
                signed: false,
            },
            _ => {
                return Err(Error::Config(format!(
                    "unknown quantization {name:?}; known: {POLICY_NAMES}"
                )))
            }
        };
        let weights = match weights {
            "lsq" => WeightQuant::Lsq { bits },
            "pot" => WeightQuant::Levels(LevelSet::pot(b)?),
            "apot" => WeightQuant::Levels(LevelSet::apot(b)?),
            "post" => WeightQuant::Levels(LevelSet::post(b)?),
            "post64" => WeightQuant::Levels(LevelSet::post_int(b, 64)?),
            "post127" => WeightQuant::Levels(LevelSet::post_int(b, 127)?),
            _ => {
                return Err(Error::Config(format!(
                    "unknown weight quantizer in {name:?}; known: {POLICY_NAMES}"
                )))
            }
        };
        Ok(Self::with_body(QuantConfig::new(weights, acts)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_quantizers() {
        assert_eq!(QuantPolicy::named("fp32", 4).unwrap(), QuantPolicy::float());
        assert_eq!(QuantPolicy::named("lsq", 4).unwrap(), QuantPolicy::lsq(4));
        assert_eq!(
            QuantPolicy::named("asq-post", 3).unwrap(),
            QuantPolicy::asq_post(3).unwrap()
        );
        let p = QuantPolicy::named("asq-apot", 4).unwrap();
        assert!(matches!(p.body.acts, ActQuant::Asq { bits: 4, .. }));
        assert!(matches!(&p.body.weights, WeightQuant::Levels(l) if l.bits().get() == 4));
        for bad in ["asq-foo", "xyz", "lsq-post-2"] {
            assert!(QuantPolicy::named(bad, 4).is_err(), "{bad}");
        }
        assert!(QuantPolicy::named("lsq", 9).is_err());
        assert!(
            QuantPolicy::named("asq-apot", 8).is_err(),
            "APoT stops at 7 bits"
        );
    }
}
