//! Code -> integer look-up tables for the integer kernels.
//!
//! - [`Int8Lut`]: every raw code of a level set on an integer grid `G` (POT up to 4 bits, the
//!   integer-grid POST, APoT up to small widths) or of a uniform signed grid, as an int8 value;
//!   a weight is `alpha · lut[code] / G`, so one int8 accumulator is exact.
//! - [`PostSplit`]: exact POST up to 4 bits. `(√2)^-i = 2^-floor(i/2) · (1/√2)^(i mod 2)`,
//!   so every level is `(even[code] + odd[code] / √2) / 2^shift` with small integers, one of
//!   them zero: two integer accumulators give an exact result.

use crate::bits::BitWidth;
use crate::error::{Error, Result};
use crate::levels::{LevelKind, LevelSet};
use crate::quant::{Grid, IntGrid};

/// Raw code -> int8 value table, with the grid that turns values back into normalised levels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Int8Lut {
    bits: BitWidth,
    grid: u32,
    table: Vec<i8>,
}

impl Int8Lut {
    /// Table of a level set on an integer grid; an error for sets without one (exact POST).
    ///
    /// ```
    /// use asq_core::{lut::Int8Lut, BitWidth, LevelSet};
    /// let lut = Int8Lut::from_levels(&LevelSet::post_int(BitWidth::new(3)?, 64)?)?;
    /// assert_eq!(lut.grid(), 64);
    /// assert_eq!(lut.table(), &[0, 32, 45, 64, 0, -32, -45, -64]);
    /// # Ok::<(), asq_core::Error>(())
    /// ```
    pub fn from_levels(levels: &LevelSet) -> Result<Self> {
        let grid = levels.integer_grid().ok_or_else(|| {
            Error::Unsupported(format!(
                "{} levels lie on no integer grid: use the exact split",
                levels.kind()
            ))
        })?;
        let table = levels
            .decode_table()
            .iter()
            .map(|&v| {
                if v.is_nan() {
                    0
                } else {
                    (v as f64 * grid as f64).round() as i8
                }
            })
            .collect();
        Ok(Self {
            bits: levels.bits(),
            grid,
            table,
        })
    }

    /// Table of a signed uniform grid with zero point 0 (`value = code`, grid 1).
    pub fn from_int_grid(grid: &IntGrid) -> Result<Self> {
        if grid.zero_point() != 0 || grid.lower() < -128.0 || grid.upper() > 127.0 {
            return Err(Error::Unsupported(
                "int8 tables need a zero point of 0 and values in i8".into(),
            ));
        }
        let bits = grid.bits();
        let table = (0..bits.code_count())
            .map(|c| grid.decode(c as u8).unwrap_or(0.0) as i8)
            .collect();
        Ok(Self {
            bits,
            grid: 1,
            table,
        })
    }

    /// Code width.
    pub fn bits(&self) -> BitWidth {
        self.bits
    }

    /// `G`: normalised level = value / `G`.
    pub fn grid(&self) -> u32 {
        self.grid
    }

    /// `2^b` values indexed by raw code.
    pub fn table(&self) -> &[i8] {
        &self.table
    }

    /// Largest `|value|`: what decides whether a saturating int16 product path is exact.
    pub fn max_abs(&self) -> u32 {
        self.table
            .iter()
            .map(|v| v.unsigned_abs() as u32)
            .max()
            .unwrap_or(0)
    }
}

/// Exact POST as two integer tables: level = `(even + odd / √2) / 2^shift`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostSplit {
    bits: BitWidth,
    shift: u32,
    even: Vec<i8>,
    odd: Vec<i8>,
}

impl PostSplit {
    /// Split tables of an exact POST level set of at most 4 bits.
    ///
    /// ```
    /// use asq_core::{lut::PostSplit, BitWidth, LevelSet};
    /// let s = PostSplit::new(&LevelSet::post(BitWidth::new(4)?)?)?;
    /// // Magnitude codes 1..=7 are (√2)^-6 .. (√2)^0: 1/8, 1/(8√2)·2, 1/4, ...
    /// assert_eq!(s.shift(), 3);
    /// assert_eq!(&s.even()[..8], &[0, 1, 0, 2, 0, 4, 0, 8]);
    /// assert_eq!(&s.odd()[..8], &[0, 0, 2, 0, 4, 0, 8, 0]);
    /// # Ok::<(), asq_core::Error>(())
    /// ```
    pub fn new(levels: &LevelSet) -> Result<Self> {
        if levels.kind() != LevelKind::Post || !levels.is_signed() {
            return Err(Error::Unsupported(format!(
                "the even/odd split needs exact POST levels, got {}",
                levels.kind()
            )));
        }
        let bits = levels.bits();
        if bits.get() > 4 {
            return Err(Error::Unsupported(format!(
                "exact POST split supports up to 4 bits (int8 tables), got {bits}"
            )));
        }
        let m = (1u32 << (bits.get() - 1)) - 1; // magnitudes; exponents i = 0..m-1
        let shift = (m - 1) / 2;
        let half = 1usize << (bits.get() - 1);
        let mut even = vec![0i8; bits.code_count()];
        let mut odd = vec![0i8; bits.code_count()];
        for j in 1..=m as usize {
            let i = m - j as u32; // magnitude code j holds (√2)^-i
            let v = 1i8 << (shift - i / 2);
            let table = if i.is_multiple_of(2) {
                &mut even
            } else {
                &mut odd
            };
            table[j] = v;
            table[j | half] = -v;
        }
        Ok(Self {
            bits,
            shift,
            even,
            odd,
        })
    }

    /// Code width.
    pub fn bits(&self) -> BitWidth {
        self.bits
    }

    /// Levels are divided by `2^shift`.
    pub fn shift(&self) -> u32 {
        self.shift
    }

    /// Even-exponent integer part per raw code.
    pub fn even(&self) -> &[i8] {
        &self.even
    }

    /// Odd-exponent integer part per raw code (multiplied by `1/√2`).
    pub fn odd(&self) -> &[i8] {
        &self.odd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QuantRange;

    #[test]
    fn split_reconstructs_every_post_level() {
        for b in 2..=4 {
            let l = LevelSet::post(BitWidth::new(b).unwrap()).unwrap();
            let s = PostSplit::new(&l).unwrap();
            for (c, v) in l.decode_table().iter().enumerate() {
                let r = (s.even()[c] as f64 + s.odd()[c] as f64 * std::f64::consts::FRAC_1_SQRT_2)
                    / (1u32 << s.shift()) as f64;
                assert!(
                    (r - *v as f64).abs() < 1e-7,
                    "{b} bits, code {c}: {r} vs {v}"
                );
                assert!(s.even()[c] == 0 || s.odd()[c] == 0);
            }
        }
        assert!(PostSplit::new(&LevelSet::post(BitWidth::new(5).unwrap()).unwrap()).is_err());
        assert!(PostSplit::new(&LevelSet::pot(BitWidth::new(4).unwrap()).unwrap()).is_err());
    }

    #[test]
    fn int8_tables() {
        assert!(Int8Lut::from_levels(&LevelSet::post(BitWidth::new(4).unwrap()).unwrap()).is_err());
        let pot = Int8Lut::from_levels(&LevelSet::pot(BitWidth::new(4).unwrap()).unwrap()).unwrap();
        assert_eq!(pot.grid(), 64);
        assert_eq!(&pot.table()[..8], &[0, 1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(pot.max_abs(), 64);
        let u = Int8Lut::from_int_grid(&IntGrid::new(QuantRange::signed(4).unwrap())).unwrap();
        assert_eq!(u.table()[15], -1);
        assert_eq!(u.table()[8], -8);
        assert_eq!(u.table()[7], 7);
    }
}
