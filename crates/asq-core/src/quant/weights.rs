//! Non-uniform weight quantization with a learnable per-channel scale `alpha`.
//!
//! `w_hat = alpha_c · P(clamp(w / alpha_c, -1, 1))` for any [`LevelSet`] (POT, APoT, POST, the
//! integer-grid POST): the engine of [`super`] with the level set as grid and `alpha` as step.
//! Gradients: STE for `w` inside `[-alpha, alpha]`; `d w_hat / d alpha = P(t) - t` inside,
//! `sign(w)` outside (the clip bound), times `1 / sqrt(weights per channel)` ([`grad_scale`]).
//! Init: `alpha_c` = 0.99 quantile of `|w|` in channel `c` ([`LevelQuantizer::init_alphas`]).
//!
//! ```
//! use asq_core::{quant::weights::LevelQuantizer, BitWidth, LevelSet};
//! let q = LevelQuantizer::new(LevelSet::post(BitWidth::new(4)?)?);
//! let w = [0.5, -0.36, 0.02, 1.3];             // one channel
//! let mut out = [0.0; 4];
//! q.fake_quant(&w, &[1.0], &mut out)?;
//! assert_eq!(out[0], 0.5);                       // (√2)^-2
//! assert_eq!(out[1], -std::f32::consts::FRAC_1_SQRT_2 * 0.5); // (√2)^-3
//! assert_eq!(out[2], 0.0);                       // below the midpoint 0.0625
//! assert_eq!(out[3], 1.0);                       // clipped
//! # Ok::<(), asq_core::Error>(())
//! ```

use super::{backward, decode, encode, fake_quant, Steps};
use crate::error::{check_len, Error, Result};
use crate::levels::LevelSet;

/// Gradient scale of `alpha`: `1 / sqrt(weights per channel)`.
pub fn grad_scale(weights_per_channel: usize) -> f32 {
    (1.0 / (weights_per_channel.max(1) as f64).sqrt()) as f32
}

/// The `q`-quantile of `values` by linear interpolation between order statistics (numpy's
/// default). `values` is reordered.
pub fn quantile_in_place(values: &mut [f32], q: f64) -> Option<f32> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    values.sort_unstable_by(f32::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (values.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(values.len() - 1);
    let frac = pos - lo as f64;
    Some((values[lo] as f64 + frac * (values[hi] as f64 - values[lo] as f64)) as f32)
}

/// A per-channel weight quantizer over a level set.
#[derive(Debug, Clone, PartialEq)]
pub struct LevelQuantizer {
    levels: LevelSet,
}

impl LevelQuantizer {
    /// Quantizer over `levels`.
    pub fn new(levels: LevelSet) -> Self {
        Self { levels }
    }

    /// The level set.
    pub fn levels(&self) -> &LevelSet {
        &self.levels
    }

    /// `alpha_c` = 0.99 quantile of `|w|` over each row of `[channels, K]`. A channel whose
    /// quantile is 0 falls back to its largest `|w|`, and an all-zero channel to 1 (any alpha
    /// quantizes it exactly). Non-finite weights are an error.
    pub fn init_alphas(&self, w: &[f32], channels: usize) -> Result<Vec<f32>> {
        if channels == 0 || w.is_empty() || !w.len().is_multiple_of(channels) {
            return Err(Error::Length {
                what: "weights (channels x K)",
                expected: channels.max(1),
                got: w.len(),
            });
        }
        if let Some(index) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "weights",
                value: w[index],
                index,
            });
        }
        let k = w.len() / channels;
        let mut scratch = vec![0.0f32; k];
        Ok(w.chunks(k)
            .map(|row| {
                scratch.iter_mut().zip(row).for_each(|(s, v)| *s = v.abs());
                let q = quantile_in_place(&mut scratch, 0.99).expect("finite and non-empty");
                let max = scratch[k - 1];
                if q > 0.0 {
                    q
                } else if max > 0.0 {
                    max
                } else {
                    1.0
                }
            })
            .collect())
    }

    /// Fake quantization of `[alphas.len(), K]`.
    pub fn fake_quant(&self, w: &[f32], alphas: &[f32], out: &mut [f32]) -> Result<()> {
        fake_quant(&self.levels, w, Steps::PerRow(alphas), out)
    }

    /// Raw codes (layout: [`crate::levels`]).
    pub fn encode(&self, w: &[f32], alphas: &[f32], codes: &mut [u8]) -> Result<()> {
        encode(&self.levels, w, Steps::PerRow(alphas), codes)
    }

    /// `alpha_c · level(code)`; unknown codes are an error.
    pub fn decode(&self, codes: &[u8], alphas: &[f32], out: &mut [f32]) -> Result<()> {
        decode(&self.levels, codes, Steps::PerRow(alphas), out)
    }

    /// Gradients: `dw` (STE) and `dalphas[c] = grad_scale · sum over channel c`.
    pub fn backward(
        &self,
        w: &[f32],
        alphas: &[f32],
        grad_out: &[f32],
        grad_scale: f32,
        dw: &mut [f32],
        dalphas: &mut [f32],
    ) -> Result<()> {
        check_len("alpha gradients", alphas.len(), dalphas.len())?;
        backward(
            &self.levels,
            w,
            Steps::PerRow(alphas),
            grad_out,
            None,
            dw,
            dalphas,
        )?;
        dalphas.iter_mut().for_each(|d| *d *= grad_scale);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BitWidth;

    #[test]
    fn quantile_matches_numpy_linear() {
        // numpy.quantile([1, 2, 3, 4, 5], 0.99) = 4.96
        let mut v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert!((quantile_in_place(&mut v, 0.99).unwrap() - 4.96).abs() < 1e-6);
        assert_eq!(quantile_in_place(&mut [], 0.5), None);
        assert_eq!(quantile_in_place(&mut [f32::NAN], 0.5), None);
    }

    #[test]
    fn alpha_init_per_channel_with_fallbacks() {
        let q = LevelQuantizer::new(LevelSet::post(BitWidth::new(3).unwrap()).unwrap());
        let mut w = vec![0.0f32; 300];
        for (i, v) in w[..100].iter_mut().enumerate() {
            *v = if i % 2 == 0 { i as f32 } else { -(i as f32) };
        }
        w[299] = -2.0; // channel 2: one nonzero, quantile 0.99 of 99 zeros and a 2 = 0.02
        let a = q.init_alphas(&w, 3).unwrap();
        assert!((a[0] - 98.01).abs() < 1e-4, "{a:?}");
        assert_eq!(a[1], 1.0);
        assert!((a[2] - 0.02).abs() < 1e-6);
        assert!(q.init_alphas(&[1.0, f32::INFINITY], 1).is_err());
        assert!(q.init_alphas(&[1.0; 3], 2).is_err());
    }

    #[test]
    fn hand_worked_alpha_gradient() {
        let q = LevelQuantizer::new(LevelSet::post(BitWidth::new(3).unwrap()).unwrap());
        // Levels {0, 0.5, 0.7071, 1}; alpha 2.
        let w = [1.2, -3.0, 0.1];
        let mut dw = [0.0; 3];
        let mut da = [0.0];
        q.backward(&w, &[2.0], &[1.0, 1.0, 1.0], 0.5, &mut dw, &mut da)
            .unwrap();
        // t = 0.6 -> P = 0.5: -0.1; t = -1.5 -> clip: -1; t = 0.05 -> 0: -0.05.
        assert!((da[0] - 0.5 * (-0.1 - 1.0 - 0.05)).abs() < 1e-6, "{da:?}");
        assert_eq!(dw, [1.0, 0.0, 1.0]);
    }
}
