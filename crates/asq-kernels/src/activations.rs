//! Quantized activations: integer codes with one scale per sample (row).
//!
//! ASQ gives each sample its own step `s · beta_m`, so the scale is per row. Rows are stored
//! with `K` padded to a multiple of 4 and `M` padded (see [`padded_rows`]) with zero
//! codes, the layout the GEMM kernels read without bounds checks.

use asq_core::quant::{self, IntGrid, Steps};
use asq_core::{QuantRange, Signedness};

use crate::error::{Error, Result};
use crate::frame::{KGROUP, MAX_TILE_ROWS, MR};

/// Whether activation codes are computed with AVX-512 (the same codes as the portable path).
#[cfg(target_arch = "x86_64")]
fn simd_encode() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"))
}

/// Rows of zero-padded storage for `m` rows: a multiple of [`MR`] (4) up to 4 rows, of
/// [`MAX_TILE_ROWS`] beyond, so every micro-kernel reads whole tiles of its own height.
pub fn padded_rows(m: usize) -> usize {
    if m <= MR {
        MR
    } else {
        m.div_ceil(MAX_TILE_ROWS) * MAX_TILE_ROWS
    }
}

/// Largest `|code|` of `range`.
pub(crate) fn range_max_abs(range: QuantRange) -> u32 {
    range.min().unsigned_abs().max(range.max().unsigned_abs())
}

/// Codes of `x` with step `s` into `out` (same length): the AVX-512 encoder when `simd` (the
/// CPU must have AVX-512 F and BW), else the portable one; both give the same codes, element by
/// element, so a row may be encoded in pieces.
pub(crate) fn encode_run(
    x: &[f32],
    s: f32,
    range: QuantRange,
    simd: bool,
    out: &mut [u8],
) -> Result<()> {
    debug_assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if simd {
        let (lower, upper) = (range.min() as f32, range.max() as f32);
        // SAFETY: `simd` is set only when AVX-512 F and BW were detected.
        unsafe { crate::x86::avx512::encode_row(x, s, lower, upper, out) };
        return Ok(());
    }
    let _ = simd;
    let grid = IntGrid::new(range);
    quant::encode(&grid, x, Steps::PerRow(&[s]), out)?;
    if matches!(range.signedness(), Signedness::Signed) {
        // Raw b-bit two's complement -> i8 bit pattern.
        out.iter_mut()
            .for_each(|c| *c = range.from_raw(*c) as i8 as u8);
    }
    Ok(())
}

/// Whether this CPU runs the AVX-512 encoder.
pub(crate) fn encode_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    return simd_encode();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `[M, K]` activation codes (u8 for unsigned ranges, i8 bit patterns for signed ones) and
/// per-row scales.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantActivations {
    m: usize,
    k: usize,
    kp: usize,
    range: QuantRange,
    codes: Vec<u8>,
    scales: Vec<f32>,
}

impl QuantActivations {
    /// Quantizes `x` (`[m, k]` row-major) with row `r` using step `steps.get(r)` (per tensor:
    /// one step per row repeated; ASQ: `Steps::Scaled`), rounding half to even exactly like
    /// `asq_core`'s fake-quant.
    pub fn quantize(
        x: &[f32],
        m: usize,
        k: usize,
        range: QuantRange,
        steps: Steps<'_>,
    ) -> Result<Self> {
        if x.len() != m * k {
            return Err(Error::Shape(format!(
                "activations: {} values for [{m}, {k}]",
                x.len()
            )));
        }
        if steps.rows() != m {
            return Err(Error::Shape(format!(
                "activations: {} steps for {m} rows",
                steps.rows()
            )));
        }
        Self::quantize_on(x, m, k, range, steps, encode_simd())
    }

    /// [`QuantActivations::quantize`] on the AVX-512 path (`simd`, the CPU must have AVX-512 F
    /// and BW) or the portable one; both give the same codes.
    fn quantize_on(
        x: &[f32],
        m: usize,
        k: usize,
        range: QuantRange,
        steps: Steps<'_>,
        simd: bool,
    ) -> Result<Self> {
        let mut out = Self::zeroed(m, k, range)?;
        steps.validate()?;
        for r in 0..m {
            let s = steps.get(r);
            out.scales[r] = s;
            let row = &mut out.codes[r * out.kp..r * out.kp + k];
            encode_run(&x[r * k..(r + 1) * k], s, range, simd, row)?;
        }
        Ok(out)
    }

    /// Builds from integer codes given as i32 values in `range` and per-row scales.
    pub fn from_codes(
        codes: &[i32],
        m: usize,
        k: usize,
        range: QuantRange,
        scales: &[f32],
    ) -> Result<Self> {
        if codes.len() != m * k || scales.len() != m {
            return Err(Error::Shape(format!(
                "activations: {} codes and {} scales for [{m}, {k}]",
                codes.len(),
                scales.len()
            )));
        }
        asq_core::error::check_positive("activation scale", scales)?;
        let mut out = Self::zeroed(m, k, range)?;
        for (i, &c) in codes.iter().enumerate() {
            if c < range.min() || c > range.max() {
                return Err(Error::Core(asq_core::Error::Code {
                    code: c as u32,
                    bits: range.bits().get(),
                    index: i,
                }));
            }
            out.codes[(i / k) * out.kp + i % k] = c as i8 as u8;
        }
        out.scales.copy_from_slice(scales);
        Ok(out)
    }

    /// All-zero codes of shape `[m, k]` with zero scales, to be filled by the crate's layout
    /// transforms (im2col, pooling).
    pub(crate) fn zeroed(m: usize, k: usize, range: QuantRange) -> Result<Self> {
        if m == 0 || k == 0 {
            return Err(Error::Shape(format!("activations: empty shape [{m}, {k}]")));
        }
        let kp = k.div_ceil(KGROUP) * KGROUP;
        let mp = padded_rows(m);
        Ok(Self {
            m,
            k,
            kp,
            range,
            codes: vec![0; mp * kp],
            scales: vec![0.0; m],
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Columns (the reduction length).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Padded row stride (multiple of 4).
    pub fn stride(&self) -> usize {
        self.kp
    }

    /// The code range.
    pub fn range(&self) -> QuantRange {
        self.range
    }

    /// Whether codes are i8 bit patterns.
    pub fn is_signed(&self) -> bool {
        matches!(self.range.signedness(), Signedness::Signed)
    }

    /// Largest `|code|` the range allows.
    pub fn max_abs(&self) -> u32 {
        range_max_abs(self.range)
    }

    /// Padded code storage ([`padded_rows`] rows of `stride` bytes).
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// Code of row `r`, column `c` as an integer.
    #[inline]
    pub fn code(&self, r: usize, c: usize) -> i32 {
        let b = self.codes[r * self.kp + c];
        if self.is_signed() {
            b as i8 as i32
        } else {
            b as i32
        }
    }

    /// Per-row scales.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Raw byte of row `r`, column `c` (i8 bit pattern for signed ranges).
    #[inline]
    pub(crate) fn byte(&self, r: usize, c: usize) -> u8 {
        self.codes[r * self.kp + c]
    }

    /// Row `r` (the `k` valid bytes).
    #[inline]
    pub(crate) fn row(&self, r: usize) -> &[u8] {
        &self.codes[r * self.kp..r * self.kp + self.k]
    }

    /// Mutable row `r` (the `k` valid bytes) and the scale vector, for layout transforms.
    pub(crate) fn row_mut(&mut self, r: usize) -> &mut [u8] {
        let (kp, k) = (self.kp, self.k);
        &mut self.codes[r * kp..r * kp + k]
    }

    pub(crate) fn set_scale(&mut self, r: usize, s: f32) {
        self.scales[r] = s;
    }

    /// The row storage (`stride()` bytes a row, the first `rows()` rows) and the scales,
    /// mutably, for layout transforms.
    pub(crate) fn rows_and_scales_mut(&mut self) -> (&mut [u8], &mut [f32]) {
        (&mut self.codes[..self.m * self.kp], &mut self.scales)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 codes equal the portable ones (NaN, infinities, ties and the range ends
    /// included), signed and unsigned, every width, any row length (masked tails).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_codes_equal_the_portable_codes() {
        if !simd_encode() {
            println!("no AVX-512 F/BW on this CPU: the SIMD encoder is not used here");
            return;
        }
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.5,
            1.5,
            -2.5,
            -0.0,
            1e30,
            -1e-30,
        ];
        for seed in 0..300u64 {
            let (m, k) = (1 + (seed % 3) as usize, 1 + (seed * 7 % 53) as usize);
            let bits = 2 + (seed % 7) as u32;
            let range = if seed % 2 == 0 {
                QuantRange::unsigned(bits)
            } else {
                QuantRange::signed(bits)
            }
            .unwrap();
            let step = 0.05 + (seed % 11) as f32 * 0.1;
            let x: Vec<f32> = (0..m * k)
                .map(|i| {
                    if (i as u64 + seed).is_multiple_of(5) {
                        specials[(i + seed as usize) % specials.len()] * step
                    } else {
                        crate::suite::pseudo(seed, i) * 40.0 * step
                    }
                })
                .collect();
            let betas: Vec<f32> = (0..m).map(|r| 0.5 + r as f32 * 0.25).collect();
            let steps = Steps::Scaled {
                step,
                betas: &betas,
            };
            let a = QuantActivations::quantize_on(&x, m, k, range, steps, true).unwrap();
            let b = QuantActivations::quantize_on(&x, m, k, range, steps, false).unwrap();
            assert_eq!(a.codes, b.codes, "seed {seed}");
            assert_eq!(a.scales, b.scales);
        }
    }
}
