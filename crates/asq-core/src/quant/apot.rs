//! APoT: additive powers of two (Li et al. 2020), two terms.
//!
//! With `m = b - 1` magnitude bits split as `m1 = ceil(m/2)`, `m2 = floor(m/2)`, each magnitude
//! is `(t1 + t2) / Z` where `t1 ∈ {0} ∪ {2^-(2j) : j < 2^m1 - 1}` and
//! `t2 ∈ {0} ∪ {2^-(2j+1) : j < 2^m2 - 1}` (the even and odd exponents interleave, as in the
//! paper's construction), and `Z` normalises the largest sum to 1. Every sum is distinct (one
//! bit at an even position plus one at an odd position), so there are exactly `2^m - 1`
//! nonzero magnitudes: `2^b - 1` signed levels fit `b` bits. Widths 2..=7: at 8 bits the
//! smallest term (`2^-28`) is below f32 resolution next to 1, and levels would collapse.
//!
//! ```
//! use asq_core::{BitWidth, LevelSet};
//! let l = LevelSet::apot(BitWidth::new(3)?)?;
//! // {0, 1/2, 1, 3/2} / (3/2)
//! assert_eq!(l.magnitudes(), &[0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0]);
//! # Ok::<(), asq_core::Error>(())
//! ```

use crate::bits::BitWidth;
use crate::error::{Error, Result};
use crate::levels::{LevelKind, LevelSet};

impl LevelSet {
    /// Signed two-term APoT levels for `bits` bits.
    pub fn apot(bits: BitWidth) -> Result<Self> {
        if bits.get() > 7 {
            return Err(Error::Levels(format!(
                "two-term APoT supports 2..=7 bits: at {bits} bits its levels are not distinct in f32"
            )));
        }
        let m = bits.get() - 1;
        let (m1, m2) = (m.div_ceil(2), m / 2);
        let terms = |count_bits: u32, parity: i32| -> Vec<f64> {
            let mut t = vec![0.0];
            t.extend((0..(1i32 << count_bits) - 1).map(|j| 2f64.powi(-(2 * j + parity))));
            t
        };
        let (a, b) = (terms(m1, 0), terms(m2, 1));
        let mut sums: Vec<f64> = a
            .iter()
            .flat_map(|x| b.iter().map(move |y| x + y))
            .filter(|&s| s > 0.0)
            .collect();
        let z = sums.iter().cloned().fold(0.0, f64::max);
        sums.iter_mut().for_each(|s| *s /= z);
        let mags: Vec<f32> = sums.iter().map(|&s| s as f32).collect();
        LevelSet::from_magnitudes(LevelKind::Apot, bits, true, &mags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apot_fills_every_code() {
        assert!(LevelSet::apot(BitWidth::new(8).unwrap()).is_err());
        for b in 2..=7 {
            let l = LevelSet::apot(BitWidth::new(b).unwrap()).unwrap();
            assert_eq!(l.magnitudes().len(), 1 << (b - 1), "bits {b}");
        }
        // 4 bits: t1 in {0, 1, 1/4, 1/16}, t2 in {0, 1/2}; sums / (3/2) lie on the grid of 24ths.
        let l = LevelSet::apot(BitWidth::new(4).unwrap()).unwrap();
        assert_eq!(l.integer_grid(), Some(24));
    }
}
