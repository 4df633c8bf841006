//! Uniform min-max quantization: scale and zero point observed from the data, not learnt.
//!
//! - **Affine** (unsigned codes `0..=2^b-1`): the observed range `[min, max]` is widened to
//!   contain 0, `scale = (max - min) / (2^b - 1)`, `z = clamp(round(-min / scale), 0, 2^b - 1)`;
//!   `q = clamp(round(x / scale), -z, 2^b - 1 - z)`, code `q + z`, `x_hat = q · scale`.
//! - **Symmetric** (signed codes): `scale = max|x| / p`, `z = 0`; per tensor or per channel.
//!
//! Rounding is half to even. Gradient: straight-through inside the range, 0 outside (scale and
//! zero point are statistics, they get no gradient). A tensor of zeros gets scale 1.
//!
//! ```
//! use asq_core::quant::uniform::Uniform;
//! let u = Uniform::affine(&[-1.0, 0.0, 2.0], 2)?;          // 2 bits: scale 1, zero point 1
//! assert_eq!((u.scale(), u.grid().zero_point()), (1.0, 1));
//! let mut out = [0.0; 3];
//! u.fake_quant(&[-0.4, 0.6, 7.0], &mut out)?;
//! assert_eq!(out, [0.0, 1.0, 2.0]);
//! # Ok::<(), asq_core::Error>(())
//! ```

use super::{backward, decode, encode, fake_quant, IntGrid, Steps};
use crate::bits::QuantRange;
use crate::error::{Error, Result};
use crate::round::round_half_even;

/// Minimum and maximum of finite data, or an error naming the first non-finite value.
pub fn min_max(x: &[f32]) -> Result<(f32, f32)> {
    if x.is_empty() {
        return Err(Error::Length {
            what: "tensor to observe",
            expected: 1,
            got: 0,
        });
    }
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for (index, &v) in x.iter().enumerate() {
        if !v.is_finite() {
            return Err(Error::NonFinite {
                what: "tensor to observe",
                value: v,
                index,
            });
        }
        lo = lo.min(v);
        hi = hi.max(v);
    }
    Ok((lo, hi))
}

/// A uniform quantizer with observed scale(s) and zero point.
#[derive(Debug, Clone, PartialEq)]
pub struct Uniform {
    grid: IntGrid,
    scales: Vec<f32>,
}

impl Uniform {
    /// Affine per-tensor quantizer from the range of `x`, `bits` unsigned bits.
    pub fn affine(x: &[f32], bits: u32) -> Result<Self> {
        let (lo, hi) = min_max(x)?;
        Self::affine_from_range(lo, hi, bits)
    }

    /// Affine per-tensor quantizer from a given range (widened to contain 0).
    pub fn affine_from_range(min: f32, max: f32, bits: u32) -> Result<Self> {
        let range = QuantRange::unsigned(bits)?;
        if !(min.is_finite() && max.is_finite()) || min > max {
            return Err(Error::Unsupported(format!(
                "invalid observed range [{min}, {max}]"
            )));
        }
        let (lo, hi) = (min.min(0.0), max.max(0.0));
        let qmax = range.max();
        let mut scale = ((hi as f64 - lo as f64) / qmax as f64) as f32;
        if !(scale > 0.0 && scale.is_finite()) {
            scale = 1.0;
        }
        let z = (round_half_even(-lo / scale) as i32).clamp(0, qmax);
        Ok(Self {
            grid: IntGrid::affine(range, z)?,
            scales: vec![scale],
        })
    }

    /// Symmetric quantizer with one scale per row of `[channels, K]` (`channels = 1`: per tensor).
    pub fn symmetric(x: &[f32], channels: usize, bits: u32) -> Result<Self> {
        let range = QuantRange::signed(bits)?;
        if channels == 0 || x.is_empty() || !x.len().is_multiple_of(channels) {
            return Err(Error::Length {
                what: "tensor (channels x K)",
                expected: channels.max(1),
                got: x.len(),
            });
        }
        let scales = x
            .chunks(x.len() / channels)
            .map(|row| {
                let (lo, hi) = min_max(row)?;
                let s = lo.abs().max(hi.abs()) / range.max() as f32;
                Ok(if s > 0.0 { s } else { 1.0 })
            })
            .collect::<Result<Vec<f32>>>()?;
        Ok(Self {
            grid: IntGrid::new(range),
            scales,
        })
    }

    /// The integer grid (code range and zero point).
    pub fn grid(&self) -> &IntGrid {
        &self.grid
    }

    /// The scale of a per-tensor quantizer (the first one otherwise).
    pub fn scale(&self) -> f32 {
        self.scales[0]
    }

    /// All scales, one per row.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Fake quantization.
    pub fn fake_quant(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        fake_quant(&self.grid, x, Steps::PerRow(&self.scales), out)
    }

    /// Raw codes (`q + z`).
    pub fn encode(&self, x: &[f32], codes: &mut [u8]) -> Result<()> {
        encode(&self.grid, x, Steps::PerRow(&self.scales), codes)
    }

    /// `(code - z) · scale`.
    pub fn decode(&self, codes: &[u8], out: &mut [f32]) -> Result<()> {
        decode(&self.grid, codes, Steps::PerRow(&self.scales), out)
    }

    /// Straight-through gradient: `dx = grad_out` inside the range, 0 outside.
    pub fn backward(&self, x: &[f32], grad_out: &[f32], dx: &mut [f32]) -> Result<()> {
        let mut unused = vec![0.0; self.scales.len()];
        backward(
            &self.grid,
            x,
            Steps::PerRow(&self.scales),
            grad_out,
            None,
            dx,
            &mut unused,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affine_codes_and_ranges() {
        let u = Uniform::affine(&[0.5, 3.0], 8).unwrap(); // widened to [0, 3]
        assert_eq!(u.grid().zero_point(), 0);
        assert!((u.scale() - 3.0 / 255.0).abs() < 1e-9);
        let u = Uniform::affine(&[-2.0, 1.0], 2).unwrap(); // scale 1, z 2: values -2..=1
        let mut codes = [0u8; 4];
        u.encode(&[-5.0, -1.4, 0.5, 9.0], &mut codes).unwrap();
        assert_eq!(codes, [0, 1, 2, 3]);
        let mut back = [0.0; 4];
        u.decode(&codes, &mut back).unwrap();
        assert_eq!(back, [-2.0, -1.0, 0.0, 1.0]);
        let mut dx = [0.0; 4];
        u.backward(&[-5.0, -1.4, 0.5, 9.0], &[1.0; 4], &mut dx)
            .unwrap();
        assert_eq!(dx, [0.0, 1.0, 1.0, 0.0]);
        assert!(Uniform::affine(&[1.0, f32::NAN], 4).is_err());
        assert!(Uniform::affine(&[1.0], 9).is_err());
        assert_eq!(Uniform::affine(&[0.0, 0.0], 4).unwrap().scale(), 1.0);
    }

    #[test]
    fn symmetric_per_channel_scales() {
        let u = Uniform::symmetric(&[1.0, -2.0, 0.5, 0.25], 2, 3).unwrap();
        assert_eq!(u.scales(), &[2.0 / 3.0, 0.5 / 3.0]);
        let mut out = [0.0; 4];
        u.fake_quant(&[1.0, -2.0, 0.5, 0.25], &mut out).unwrap();
        assert!((out[1] + 2.0).abs() < 1e-6 && (out[2] - 0.5).abs() < 1e-6);
    }
}
