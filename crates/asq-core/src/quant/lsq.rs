//! LSQ: learned step size quantization (Esser et al. 2019), the baseline ASQ builds on.
//!
//! - forward: `q = clamp(round(v / s), n, p)`, `v_hat = q · s` (round half to even);
//! - `d v_hat / d v = 1` if `n <= v/s <= p`, else 0;
//! - `d v_hat / d s = round(v/s) - v/s` if `n < v/s < p`, `n` if `v/s <= n`, `p` if `v/s >= p`;
//! - the gradient reaching `s` is multiplied by `g = 1 / sqrt(N · p)` ([`grad_scale`]), `N` the
//!   number of elements sharing `s` (features of one sample for activations, weights of one
//!   output channel for weights);
//! - init: `s = 2 · mean(|v|) / sqrt(p)` ([`Lsq::init_step`]).
//!
//! One step is per tensor; `C` steps over a `[C, K]` tensor are per channel.
//!
//! ```
//! use asq_core::{quant::lsq::Lsq, QuantRange};
//! let lsq = Lsq::new(QuantRange::signed(4)?);
//! let w = [0.3, -0.2, 0.05, 1.0];
//! let s = lsq.init_step(&w)?;               // 2 * 0.3875 / sqrt(7)
//! let mut out = [0.0; 4];
//! lsq.fake_quant(&w, &[s], &mut out)?;
//! assert_eq!(out[3], 3.0 * s);              // 1.0 / s = 3.41 rounds to 3
//! # Ok::<(), asq_core::Error>(())
//! ```

use super::{backward, decode, encode, fake_quant, IntGrid, Steps};
use crate::bits::QuantRange;
use crate::error::{check_len, Error, Result};

/// LSQ gradient scale `g = 1 / sqrt(N · p)` for `N` elements sharing one step.
pub fn grad_scale(elems_per_step: usize, range: QuantRange) -> f32 {
    (1.0 / ((elems_per_step.max(1) as f64) * range.max() as f64).sqrt()) as f32
}

/// An LSQ quantizer over a signed (weights) or unsigned (activations after ReLU) range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lsq {
    grid: IntGrid,
}

impl Lsq {
    /// LSQ with codes in `range`.
    pub const fn new(range: QuantRange) -> Self {
        Self {
            grid: IntGrid::new(range),
        }
    }

    /// The code range.
    pub const fn range(&self) -> QuantRange {
        self.grid.range()
    }

    /// The integer grid, for the generic engine.
    pub const fn grid(&self) -> &IntGrid {
        &self.grid
    }

    /// `2 · mean(|v|) / sqrt(p)`. Non-finite values are an error; an all-zero tensor gets step
    /// 1 (any step quantizes it exactly) so that a dead layer does not stop initialisation.
    pub fn init_step(&self, v: &[f32]) -> Result<f32> {
        if v.is_empty() {
            return Err(Error::Length {
                what: "tensor to initialise a step from",
                expected: 1,
                got: 0,
            });
        }
        let mut sum = 0.0f64;
        for (index, &x) in v.iter().enumerate() {
            if !x.is_finite() {
                return Err(Error::NonFinite {
                    what: "tensor to initialise a step from",
                    value: x,
                    index,
                });
            }
            sum += x.abs() as f64;
        }
        let s = (2.0 * sum / v.len() as f64 / (self.range().max() as f64).sqrt()) as f32;
        Ok(if s > 0.0 && s.is_finite() { s } else { 1.0 })
    }

    /// [`Lsq::init_step`] per row of a `[channels, K]` tensor.
    pub fn init_steps_per_channel(&self, w: &[f32], channels: usize) -> Result<Vec<f32>> {
        if channels == 0 || !w.len().is_multiple_of(channels) || w.is_empty() {
            return Err(Error::Length {
                what: "weights (channels x K)",
                expected: channels.max(1),
                got: w.len(),
            });
        }
        w.chunks(w.len() / channels)
            .map(|row| self.init_step(row))
            .collect()
    }

    /// Fake quantization with one step per row (`steps.len() == 1`: per tensor).
    pub fn fake_quant(&self, x: &[f32], steps: &[f32], out: &mut [f32]) -> Result<()> {
        fake_quant(&self.grid, x, Steps::PerRow(steps), out)
    }

    /// Raw codes (two's complement in `b` bits for signed ranges).
    pub fn encode(&self, x: &[f32], steps: &[f32], codes: &mut [u8]) -> Result<()> {
        encode(&self.grid, x, Steps::PerRow(steps), codes)
    }

    /// `code · step`.
    pub fn decode(&self, codes: &[u8], steps: &[f32], out: &mut [f32]) -> Result<()> {
        decode(&self.grid, codes, Steps::PerRow(steps), out)
    }

    /// Gradients: `dx` (STE) and `dsteps[r] = g · sum over row r of dL/dv_hat · dv_hat/ds`.
    pub fn backward(
        &self,
        x: &[f32],
        steps: &[f32],
        grad_out: &[f32],
        grad_scale: f32,
        dx: &mut [f32],
        dsteps: &mut [f32],
    ) -> Result<()> {
        check_len("step gradients", steps.len(), dsteps.len())?;
        let total = backward(
            &self.grid,
            x,
            Steps::PerRow(steps),
            grad_out,
            None,
            dx,
            dsteps,
        )?;
        if steps.len() == 1 {
            dsteps[0] = (total * grad_scale as f64) as f32;
        } else {
            dsteps.iter_mut().for_each(|d| *d *= grad_scale);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked_forward_and_gradients() {
        // s = 0.5, signed 3-bit: n = -4, p = 3.
        let lsq = Lsq::new(QuantRange::signed(3).unwrap());
        let x = [0.3, -0.8, 1.9, -3.0, 0.25, f32::INFINITY, f32::NAN];
        let mut out = [0.0; 7];
        lsq.fake_quant(&x, &[0.5], &mut out).unwrap();
        // v/s: 0.6 -> 1, -1.6 -> -2, 3.8 -> 3 (clip), -6 -> -4 (clip), 0.5 -> 0 (tie to even).
        assert_eq!(out, [0.5, -1.0, 1.5, -2.0, 0.0, 1.5, 0.0]);
        let go = [1.0, 2.0, 1.0, 1.0, -1.0, 1.0, 1.0];
        let mut dx = [0.0; 7];
        let mut ds = [0.0];
        lsq.backward(&x, &[0.5], &go, 1.0, &mut dx, &mut ds)
            .unwrap();
        assert_eq!(dx, [1.0, 2.0, 0.0, 0.0, -1.0, 0.0, 0.0]);
        // (1 - 0.6) + 2 (-2 + 1.6) + 3 + (-4) - (0 - 0.5) + 3 + 0
        let expect = 0.4f64 + 2.0 * (-0.4) + 3.0 - 4.0 + 0.5 + 3.0;
        assert!(
            (ds[0] as f64 - expect).abs() < 1e-6,
            "{} vs {expect}",
            ds[0]
        );
        let mut ds_scaled = [0.0];
        lsq.backward(&x, &[0.5], &go, 0.25, &mut dx, &mut ds_scaled)
            .unwrap();
        assert_eq!(ds_scaled[0], (ds[0] as f64 * 0.25) as f32);
    }

    #[test]
    fn init_and_grad_scale_follow_the_formulas() {
        let lsq = Lsq::new(QuantRange::unsigned(4).unwrap());
        let s = lsq.init_step(&[1.0, -3.0, 0.0, 2.0]).unwrap();
        assert!((s - 2.0 * 1.5 / 15f32.sqrt()).abs() < 1e-7);
        assert_eq!(lsq.init_step(&[0.0; 3]).unwrap(), 1.0);
        assert!(lsq.init_step(&[1.0, f32::NAN]).is_err());
        assert!(lsq.init_step(&[]).is_err());
        assert!((grad_scale(100, lsq.range()) - 1.0 / (1500f32).sqrt()).abs() < 1e-8);
        let per = lsq
            .init_steps_per_channel(&[1.0, 1.0, 2.0, 2.0], 2)
            .unwrap();
        assert_eq!(
            per,
            vec![
                lsq.init_step(&[1.0, 1.0]).unwrap(),
                lsq.init_step(&[2.0, 2.0]).unwrap()
            ]
        );
        assert!(lsq.init_steps_per_channel(&[1.0; 5], 2).is_err());
    }

    #[test]
    fn per_channel_gradients_sum_each_row() {
        let lsq = Lsq::new(QuantRange::signed(4).unwrap());
        let w = [0.1, 0.2, 0.3, -0.4, 5.0, -0.6];
        let steps = [0.1, 0.2];
        let go = [1.0; 6];
        let mut dx = [0.0; 6];
        let mut ds = [0.0; 2];
        lsq.backward(&w, &steps, &go, 0.5, &mut dx, &mut ds)
            .unwrap();
        let term = |v: f32, s: f32| {
            let t = v / s;
            if t <= -8.0 {
                -8.0
            } else if t >= 7.0 {
                7.0
            } else {
                t.round_ties_even() - t
            }
        };
        for c in 0..2 {
            let e: f32 = (0..3).map(|k| term(w[c * 3 + k], steps[c])).sum::<f32>() * 0.5;
            assert!((ds[c] - e).abs() < 1e-5, "channel {c}: {} vs {e}", ds[c]);
        }
        assert_eq!(dx, [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]);
    }
}
