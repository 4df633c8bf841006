//! Non-uniform level sets (POT, APoT, POST and the integer-grid POST) as first-class values.
//!
//! A [`LevelSet`] holds normalised levels in `[-1, 1]` (or `[0, 1]` for unsigned sets): zero plus
//! `M` nonzero magnitudes `0 < m_1 < ... < m_M = 1`, mirrored for signed sets. A quantizer scales
//! it by a learnable `alpha` (per output channel for weights).
//!
//! # Projection
//! `project(t)` returns the level nearest to `t` by value. It compares `|t|` against the
//! midpoints between adjacent magnitudes (`thresholds`), so it costs a short branch-free count for
//! up to 16 magnitudes and a binary search beyond. A value exactly on a midpoint goes to the
//! larger magnitude (ties away from zero), which keeps projection odd-symmetric.
//!
//! # Code layout
//! Codes are `b`-bit raw patterns (`u8`).
//! - **Signed sets** use sign-magnitude: bit `b-1` is the sign, the low `b-1` bits are the
//!   magnitude index `j` (0 = the zero level, `j` = the `j`-th smallest magnitude). With
//!   `M = 2^(b-1) - 1` magnitudes this uses `2^b - 1` codes; the spare pattern `1 << (b-1)`
//!   ("negative zero") is never produced by encoding and decodes to 0.
//! - **Unsigned sets** use the magnitude index directly: up to `2^b - 1` magnitudes.
//!
//! Because magnitude codes grow with the magnitude, the code order matches the level order
//! within each sign, which the LUT kernels rely on only through [`LevelSet::decode_table`].

use crate::bits::BitWidth;
use crate::error::{Error, Result};

/// Which family a level set belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LevelKind {
    /// Powers of two: `{0, ±2^-i}`.
    Pot,
    /// Additive powers of two (Li et al. 2020), two terms.
    Apot,
    /// Powers of sqrt(2), exact: `{0, ±(√2)^-i}`.
    Post,
    /// Powers of sqrt(2) snapped to the integer grid `round(grid · (√2)^-i) / grid`, so that the
    /// integer kernels are exact with one int8 accumulator.
    PostInt {
        /// The grid `G`: every level times `G` is an integer (64 keeps AVX2's `vpmaddubsw` from
        /// saturating with 8-bit activations; 127 uses the full int8 range).
        grid: u8,
    },
    /// Any other user-supplied magnitudes.
    Custom,
}

impl core::fmt::Display for LevelKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LevelKind::Pot => write!(f, "pot"),
            LevelKind::Apot => write!(f, "apot"),
            LevelKind::Post => write!(f, "post"),
            LevelKind::PostInt { grid } => write!(f, "post-int{grid}"),
            LevelKind::Custom => write!(f, "custom"),
        }
    }
}

/// Largest number of magnitudes for which projection uses a linear branch-free count.
const LINEAR_PROJECTION_MAX: usize = 16;

/// A normalised, sorted, b-bit level set with its projection thresholds and code layout.
#[derive(Debug, Clone, PartialEq)]
pub struct LevelSet {
    kind: LevelKind,
    bits: BitWidth,
    signed: bool,
    /// `[0, m_1, ..., m_M]`: index = magnitude code.
    mags: Vec<f32>,
    /// `thresholds[j] = (mags[j] + mags[j + 1]) / 2`, length `M`.
    thresholds: Vec<f32>,
    /// Smallest integer `G <= 127` with every level times `G` an integer, if any.
    grid: Option<u32>,
}

impl LevelSet {
    /// Builds a level set from nonzero magnitudes (any order). They must be finite, positive,
    /// distinct, have maximum exactly 1 (normalised) and fit `bits`: at most `2^(b-1) - 1` for
    /// signed sets, `2^b - 1` for unsigned ones.
    ///
    /// ```
    /// use asq_core::{BitWidth, LevelKind, LevelSet};
    /// let l = LevelSet::from_magnitudes(LevelKind::Custom, BitWidth::new(3)?, true, &[0.25, 0.5, 1.0])?;
    /// assert_eq!(l.project(0.3), 0.25);
    /// assert_eq!(l.project(-0.8), -1.0);
    /// # Ok::<(), asq_core::Error>(())
    /// ```
    pub fn from_magnitudes(
        kind: LevelKind,
        bits: BitWidth,
        signed: bool,
        magnitudes: &[f32],
    ) -> Result<Self> {
        let capacity = if signed {
            (1usize << (bits.get() - 1)) - 1
        } else {
            (1usize << bits.get()) - 1
        };
        if magnitudes.is_empty() {
            return Err(Error::Levels("no nonzero magnitudes".into()));
        }
        if magnitudes.len() > capacity {
            return Err(Error::Levels(format!(
                "{} magnitudes do not fit {bits} bits ({} signed: at most {capacity})",
                magnitudes.len(),
                if signed { "" } else { "un" },
            )));
        }
        if let Some(bad) = magnitudes.iter().find(|m| !(m.is_finite() && **m > 0.0)) {
            return Err(Error::Levels(format!(
                "magnitude {bad} is not finite and positive"
            )));
        }
        let mut sorted = magnitudes.to_vec();
        sorted.sort_by(f32::total_cmp);
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::Levels("magnitudes are not distinct".into()));
        }
        if *sorted.last().expect("non-empty") != 1.0 {
            return Err(Error::Levels(format!(
                "largest magnitude is {}, must be 1 (normalised)",
                sorted.last().expect("non-empty")
            )));
        }
        let mut mags = Vec::with_capacity(sorted.len() + 1);
        mags.push(0.0);
        mags.extend_from_slice(&sorted);
        let thresholds: Vec<f32> = mags.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let grid = (1..=127u32).find(|&g| {
            mags.iter().all(|&m| {
                let v = m as f64 * g as f64;
                // f32 levels carry relative error 2^-24; G <= 127 keeps it below 1e-5.
                (v - v.round()).abs() < 1e-4
            })
        });
        Ok(Self {
            kind,
            bits,
            signed,
            mags,
            thresholds,
            grid,
        })
    }

    /// The family.
    pub fn kind(&self) -> LevelKind {
        self.kind
    }

    /// The code width.
    pub fn bits(&self) -> BitWidth {
        self.bits
    }

    /// Whether levels are mirrored around zero.
    pub fn is_signed(&self) -> bool {
        self.signed
    }

    /// `[0, m_1, ..., m_M]`, ascending; the index is the magnitude code.
    pub fn magnitudes(&self) -> &[f32] {
        &self.mags
    }

    /// Midpoints between adjacent magnitudes (`M` of them).
    pub fn thresholds(&self) -> &[f32] {
        &self.thresholds
    }

    /// All levels in ascending order (`2M + 1` for signed sets, `M + 1` for unsigned ones).
    pub fn levels(&self) -> Vec<f32> {
        let mut out: Vec<f32> = Vec::with_capacity(2 * self.mags.len());
        if self.signed {
            out.extend(self.mags[1..].iter().rev().map(|m| -m));
        }
        out.extend_from_slice(&self.mags);
        out
    }

    /// Smallest integer `G <= 127` such that every level times `G` is an integer, or `None`
    /// (exact POST: sqrt(2) is irrational).
    pub fn integer_grid(&self) -> Option<u32> {
        self.grid
    }

    /// Lower clip bound of the normalised domain (-1 or 0).
    pub fn lower(&self) -> f32 {
        if self.signed {
            -1.0
        } else {
            0.0
        }
    }

    /// Magnitude code of the level nearest to `a`, for `a` in `[0, 1]`.
    #[inline]
    pub fn magnitude_code(&self, a: f32) -> usize {
        if self.thresholds.len() <= LINEAR_PROJECTION_MAX {
            self.thresholds.iter().map(|&t| (a >= t) as usize).sum()
        } else {
            self.thresholds.partition_point(|&t| t <= a)
        }
    }

    /// The level nearest to `t`, for finite `t` already clamped into `[lower, 1]`.
    #[inline]
    pub fn project(&self, t: f32) -> f32 {
        // copysign instead of a branch on the sign: no mispredictions on mixed-sign data.
        self.mags[self.magnitude_code(t.abs())].copysign(t)
    }

    /// Raw code of the level nearest to `t` (see the module docs for the layout).
    #[inline]
    pub fn encode(&self, t: f32) -> u8 {
        let j = self.magnitude_code(t.abs()) as u8;
        if self.signed && t < 0.0 && j != 0 {
            j | (1 << (self.bits.get() - 1))
        } else {
            j
        }
    }

    /// The normalised level of a raw code, or `None` if the code names no level.
    #[inline]
    pub fn decode(&self, code: u8) -> Option<f32> {
        if code > self.bits.mask() {
            return None;
        }
        if self.signed {
            let half = 1u8 << (self.bits.get() - 1);
            let m = *self.mags.get((code & (half - 1)) as usize)?;
            Some(if code & half != 0 { -m } else { m })
        } else {
            self.mags.get(code as usize).copied()
        }
    }

    /// `2^b` entries: the normalised level of every raw code, `NaN` for codes that name no level.
    /// This is the code -> level LUT of the kernels.
    pub fn decode_table(&self) -> Vec<f32> {
        (0..self.bits.code_count())
            .map(|c| self.decode(c as u8).unwrap_or(f32::NAN))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn custom(mags: &[f32], bits: u32, signed: bool) -> Result<LevelSet> {
        LevelSet::from_magnitudes(
            LevelKind::Custom,
            BitWidth::new(bits).unwrap(),
            signed,
            mags,
        )
    }

    #[test]
    fn invalid_magnitudes_are_rejected() {
        assert!(custom(&[], 3, true).is_err());
        assert!(custom(&[0.5, 0.5, 1.0], 3, true).is_err());
        assert!(custom(&[0.5, 2.0], 3, true).is_err());
        assert!(custom(&[0.5, 0.9], 3, true).is_err());
        assert!(custom(&[f32::NAN, 1.0], 3, true).is_err());
        assert!(custom(&[-0.5, 1.0], 3, true).is_err());
        // 4 magnitudes need 4 bits signed, fit 3 bits unsigned.
        assert!(custom(&[0.125, 0.25, 0.5, 1.0], 3, true).is_err());
        assert!(custom(&[0.125, 0.25, 0.5, 1.0], 3, false).is_ok());
    }

    #[test]
    fn hand_worked_projection_and_codes() {
        let l = custom(&[0.25, 0.5, 1.0], 3, true).unwrap();
        assert_eq!(l.thresholds(), &[0.125, 0.375, 0.75]);
        // Ties away from zero.
        assert_eq!(l.project(0.125), 0.25);
        assert_eq!(l.project(-0.375), -0.5);
        assert_eq!(l.project(0.1), 0.0);
        assert_eq!(l.encode(0.9), 0b011);
        assert_eq!(l.encode(-0.9), 0b111);
        assert_eq!(l.encode(-0.01), 0);
        assert_eq!(l.decode(0b100), Some(-0.0));
        assert_eq!(l.decode(0b101), Some(-0.25));
        assert_eq!(l.decode(8), None);
        assert_eq!(l.levels(), vec![-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]);
        assert_eq!(l.integer_grid(), Some(4));
    }

    #[test]
    fn binary_search_agrees_with_linear_count() {
        let mags: Vec<f32> = (0..100).map(|i| 0.99f32.powi(i)).collect();
        let l = custom(&mags, 8, true).unwrap();
        for k in 0..=2000 {
            let a = k as f32 / 2000.0;
            let linear: usize = l.thresholds().iter().map(|&t| (a >= t) as usize).sum();
            assert_eq!(l.magnitude_code(a), linear, "a = {a}");
        }
    }
}
