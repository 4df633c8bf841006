//! POST: power-of-sqrt(2) weight levels, exact and on an integer grid.
//!
//! For `b` bits the normalised levels are `{0} ∪ {±(√2)^-i : i = 0 .. M-1}`,
//! `M = 2^(b-1) - 1` (`2^b - 1` levels; sign-magnitude codes, spare code unused: see
//! [`crate::levels`]). Consecutive magnitudes differ by exactly `√2`, which fits bell-shaped
//! weights better than POT's factor 2 at the same width.
//!
//! Weights: `w_hat = alpha · P(clamp(w / alpha, -1, 1))` with a per-channel `alpha`
//! ([`super::weights::LevelQuantizer`]); `d w_hat / d alpha = P(w/alpha) - w/alpha` inside,
//! `sign(w)` outside, scaled by `1 / sqrt(weights per channel)`; STE for `w` inside.
//!
//! **Exact integer inference.** `(√2)^-i = 2^-floor(i/2) · (1/√2)^(i mod 2)`, so a dot product
//! with integer activations splits into an even-exponent and an odd-exponent integer sum:
//! `result = (E + O / √2) · scale` (see [`crate::lut::PostSplit`]).
//!
//! **Integer grid** ([`LevelSet::post_int`]). Levels `round(G · (√2)^-i) / G` make a POST level
//! set whose values are all integers over `G`, so one int8 accumulator is exact. Training must
//! use the same grid. `G = 64` keeps AVX2's saturating `vpmaddubsw` exact with 8-bit
//! activations (`2 · 255 · 64 = 32640 < 32767`); `G = 127` uses the int8 range fully.
//!
//! ```
//! use asq_core::{BitWidth, LevelSet};
//! let exact = LevelSet::post(BitWidth::new(4)?)?;
//! let grid = LevelSet::post_int(BitWidth::new(4)?, 64)?;
//! let to_int = |m: &f32| (m * 64.0).round() as i32;
//! assert_eq!(grid.magnitudes().iter().map(to_int).collect::<Vec<_>>(), [0, 8, 11, 16, 23, 32, 45, 64]);
//! assert!((exact.magnitudes()[6] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-7);
//! # Ok::<(), asq_core::Error>(())
//! ```

use crate::bits::BitWidth;
use crate::error::{Error, Result};
use crate::levels::{LevelKind, LevelSet};

/// The default integer grid of [`LevelSet::post_int`]: exact on AVX2 with 8-bit activations.
pub const DEFAULT_GRID: u8 = 64;

fn post_magnitudes(bits: BitWidth) -> impl Iterator<Item = f64> {
    let m = (1i32 << (bits.get() - 1)) - 1;
    // 2^(-i/2) computed as a power of two times 1 or 1/sqrt(2): correctly rounded either way.
    (0..m).map(|i| {
        2f64.powi(-(i / 2))
            * if i % 2 == 1 {
                std::f64::consts::FRAC_1_SQRT_2
            } else {
                1.0
            }
    })
}

impl LevelSet {
    /// Signed exact POST levels for `bits` bits.
    pub fn post(bits: BitWidth) -> Result<Self> {
        let mags: Vec<f32> = post_magnitudes(bits).map(|m| m as f32).collect();
        LevelSet::from_magnitudes(LevelKind::Post, bits, true, &mags)
    }

    /// Signed POST levels snapped to the integer grid `grid` (2..=127). Fails when two levels
    /// collapse onto one grid point or onto zero (too many bits for the grid: 4 bits is the most
    /// at `G = 64` or `G = 127`).
    pub fn post_int(bits: BitWidth, grid: u8) -> Result<Self> {
        if !(2..=127).contains(&grid) {
            return Err(Error::Levels(format!(
                "integer grid {grid} must be in 2..=127"
            )));
        }
        let g = grid as f64;
        let ints: Vec<f64> = post_magnitudes(bits)
            .map(|m| (m * g).round_ties_even())
            .collect();
        if ints.contains(&0.0) || ints.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::Levels(format!(
                "POST at {bits} bits does not fit the integer grid {grid}: levels collapse"
            )));
        }
        let mags: Vec<f32> = ints.iter().map(|&v| (v / g) as f32).collect();
        LevelSet::from_magnitudes(LevelKind::PostInt { grid }, bits, true, &mags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_int_rejects_grids_that_collapse_levels() {
        assert!(LevelSet::post_int(BitWidth::new(5).unwrap(), 64).is_err());
        assert!(LevelSet::post_int(BitWidth::new(4).unwrap(), 8).is_err());
        assert!(LevelSet::post_int(BitWidth::new(4).unwrap(), 0).is_err());
        assert!(LevelSet::post_int(BitWidth::new(4).unwrap(), 128).is_err());
        for b in 2..=4 {
            for g in [64, 127] {
                let l = LevelSet::post_int(BitWidth::new(b).unwrap(), g).unwrap();
                assert_eq!(l.magnitudes().len(), 1 << (b - 1));
                for m in l.magnitudes() {
                    let v = *m as f64 * g as f64;
                    assert!((v - v.round()).abs() < 1e-5, "{b} bits, grid {g}: {m}");
                }
            }
        }
    }

    #[test]
    fn exact_post_has_no_integer_grid() {
        for b in 3..=8 {
            assert_eq!(
                LevelSet::post(BitWidth::new(b).unwrap())
                    .unwrap()
                    .integer_grid(),
                None
            );
        }
        // 2 bits: {0, ±1}, trivially integer.
        assert_eq!(
            LevelSet::post(BitWidth::new(2).unwrap())
                .unwrap()
                .integer_grid(),
            Some(1)
        );
    }
}
