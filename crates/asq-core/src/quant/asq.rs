//! ASQ: LSQ with an adaptive, per-sample activation step `s_a = s · beta_m`.
//!
//! A tiny adapter (built in `asq-train`) predicts one positive `beta_m` per sample and quantized
//! layer. Here the betas are given:
//! - forward: `q = clamp(round(x / s_a), n, p)`, `x_hat = q · s_a`;
//! - with `G = dL/dx_hat · d x_hat / d s_a` (LSQ's formula with `s_a` in place of `s`):
//!   `dL/ds = g · sum over the whole tensor of G · beta_m`,
//!   `dL/dbeta_m = s · sum over sample m of G` (no gradient scale on beta),
//!   `dL/dx` as LSQ.
//! - At inference the integer GEMM of row `m` is rescaled by `s · beta_m · alpha_c`.
//!
//! With every `beta = 1` this is LSQ bit for bit (forward and gradients; a tested property).
//!
//! ```
//! use asq_core::{quant::asq::Asq, QuantRange};
//! let asq = Asq::new(QuantRange::unsigned(4)?);
//! let x = [0.6, 1.1]; // two samples of one feature
//! let mut out = [0.0; 2];
//! asq.fake_quant(&x, 0.25, &[1.0, 2.0], &mut out)?;
//! assert_eq!(out, [0.5, 1.0]); // 0.6 / 0.25 = 2.4 -> 2; 1.1 / (0.25 * 2) = 2.2 -> 2
//! # Ok::<(), asq_core::Error>(())
//! ```

use super::{backward, encode, fake_quant, IntGrid, Steps};
use crate::bits::QuantRange;
use crate::error::{check_len, Result};

/// An ASQ activation quantizer; rows of the tensor are samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asq {
    grid: IntGrid,
}

impl Asq {
    /// ASQ with codes in `range` (unsigned after ReLU, signed otherwise).
    pub const fn new(range: QuantRange) -> Self {
        Self {
            grid: IntGrid::new(range),
        }
    }

    /// The code range.
    pub const fn range(&self) -> QuantRange {
        self.grid.range()
    }

    /// Fake quantization of `[betas.len(), features]`.
    pub fn fake_quant(&self, x: &[f32], step: f32, betas: &[f32], out: &mut [f32]) -> Result<()> {
        fake_quant(&self.grid, x, Steps::Scaled { step, betas }, out)
    }

    /// Raw codes; sample `m`'s real values are `code · step · beta_m`.
    pub fn encode(&self, x: &[f32], step: f32, betas: &[f32], codes: &mut [u8]) -> Result<()> {
        encode(&self.grid, x, Steps::Scaled { step, betas }, codes)
    }

    /// Gradients: writes `dx` and `dbetas`, returns `dL/ds` (scaled by `grad_scale`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        x: &[f32],
        step: f32,
        betas: &[f32],
        grad_out: &[f32],
        grad_scale: f32,
        dx: &mut [f32],
        dbetas: &mut [f32],
    ) -> Result<f32> {
        check_len("beta gradients", betas.len(), dbetas.len())?;
        let total = backward(
            &self.grid,
            x,
            Steps::Scaled { step, betas },
            grad_out,
            Some(betas),
            dx,
            dbetas,
        )?;
        dbetas.iter_mut().for_each(|d| *d *= step);
        Ok((total * grad_scale as f64) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked_gradients() {
        // s = 0.5, unsigned 2-bit (p = 3); sample 0 beta 1, sample 1 beta 2 (s_a = 1).
        let asq = Asq::new(QuantRange::unsigned(2).unwrap());
        let x = [0.6, 2.0, 1.2, 5.0];
        let go = [1.0, 1.0, 2.0, 1.0];
        let mut dx = [0.0; 4];
        let mut db = [0.0; 2];
        let ds = asq
            .backward(&x, 0.5, &[1.0, 2.0], &go, 1.0, &mut dx, &mut db)
            .unwrap();
        // t: 1.2 -> G = 1 - 1.2 = -0.2; 4.0 -> clip, G = 3; 1.2 -> G = 2 (1 - 1.2) = -0.4; 5 -> 3.
        let (g0, g1) = (-0.2f32 + 3.0, -0.4f32 + 3.0);
        assert!((ds - (g0 * 1.0 + g1 * 2.0)).abs() < 1e-5, "ds = {ds}");
        assert!(
            (db[0] - 0.5 * g0).abs() < 1e-5 && (db[1] - 0.5 * g1).abs() < 1e-5,
            "{db:?}"
        );
        assert_eq!(dx, [1.0, 0.0, 2.0, 0.0]);
    }

    #[test]
    fn invalid_betas_are_rejected() {
        let asq = Asq::new(QuantRange::unsigned(4).unwrap());
        let mut out = [0.0; 4];
        assert!(asq
            .fake_quant(&[0.0; 4], 0.1, &[1.0, 0.0], &mut out)
            .is_err());
        assert!(asq
            .fake_quant(&[0.0; 4], 0.1, &[1.0, f32::NAN], &mut out)
            .is_err());
        assert!(asq.fake_quant(&[0.0; 4], 0.1, &[1.0; 3], &mut out).is_err());
    }
}
