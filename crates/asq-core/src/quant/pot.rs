//! POT: power-of-two weight levels.
//!
//! For `b` bits (sign + `b-1` magnitude bits) the normalised levels are
//! `{0} ∪ {±2^-i : i = 0 .. M-1}`, `M = 2^(b-1) - 1`, so `2^b - 1` levels fit `b` bits (code
//! layout: [`crate::levels`]). Quantize with [`super::weights::LevelQuantizer`] (per-channel
//! learnable `alpha`). Up to 4 bits the levels lie on the integer grid `2^(M-1)` (64 at 4 bits),
//! so the int8 kernels run them exactly.
//!
//! ```
//! use asq_core::{BitWidth, LevelSet};
//! let l = LevelSet::pot(BitWidth::new(3)?)?;
//! assert_eq!(l.levels(), vec![-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]);
//! # Ok::<(), asq_core::Error>(())
//! ```

use crate::bits::BitWidth;
use crate::error::Result;
use crate::levels::{LevelKind, LevelSet};

impl LevelSet {
    /// Signed power-of-two levels for `bits` bits.
    pub fn pot(bits: BitWidth) -> Result<Self> {
        let m = (1i32 << (bits.get() - 1)) - 1;
        let mags: Vec<f32> = (0..m).map(|i| 2f32.powi(-i)).collect();
        LevelSet::from_magnitudes(LevelKind::Pot, bits, true, &mags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pot_levels_halve_and_fit() {
        for b in 2..=8 {
            let l = LevelSet::pot(BitWidth::new(b).unwrap()).unwrap();
            let m = l.magnitudes();
            assert_eq!(m.len(), 1 << (b - 1));
            for w in m[1..].windows(2) {
                assert_eq!(w[1], 2.0 * w[0]);
            }
            assert_eq!(
                l.integer_grid(),
                if b <= 4 {
                    Some(1 << ((1 << (b - 1)) - 2))
                } else {
                    None
                }
            );
        }
    }
}
