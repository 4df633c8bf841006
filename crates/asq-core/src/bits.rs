//! Bit widths and integer code ranges.

use crate::error::{Error, Result};

/// A quantization bit width, always in `2..=8`.
///
/// ```
/// use asq_core::BitWidth;
/// assert_eq!(BitWidth::new(4).unwrap().get(), 4);
/// assert!(BitWidth::new(1).is_err());
/// assert!(BitWidth::new(9).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BitWidth(u8);

impl BitWidth {
    /// Smallest supported width.
    pub const MIN: u32 = 2;
    /// Largest supported width.
    pub const MAX: u32 = 8;

    /// A width in `2..=8`, or [`Error::BitWidth`].
    pub fn new(bits: u32) -> Result<Self> {
        if (Self::MIN..=Self::MAX).contains(&bits) {
            Ok(Self(bits as u8))
        } else {
            Err(Error::BitWidth {
                bits,
                min: Self::MIN,
                max: Self::MAX,
            })
        }
    }

    /// The number of bits.
    pub const fn get(self) -> u32 {
        self.0 as u32
    }

    /// Number of distinct codes, `2^b`.
    pub const fn code_count(self) -> usize {
        1 << self.0
    }

    /// Mask of the low `b` bits.
    pub const fn mask(self) -> u8 {
        ((1u16 << self.0) - 1) as u8
    }
}

impl core::fmt::Display for BitWidth {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Whether codes carry a sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signedness {
    /// Two's complement range `[-2^(b-1), 2^(b-1) - 1]`.
    Signed,
    /// Range `[0, 2^b - 1]` (activations after ReLU).
    Unsigned,
}

/// The integer range `[n, p]` of a uniform quantizer (method.md, "Notation").
///
/// ```
/// use asq_core::{BitWidth, QuantRange, Signedness};
/// let r = QuantRange::new(BitWidth::new(4).unwrap(), Signedness::Signed);
/// assert_eq!((r.min(), r.max()), (-8, 7));
/// let u = QuantRange::new(BitWidth::new(4).unwrap(), Signedness::Unsigned);
/// assert_eq!((u.min(), u.max()), (0, 15));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantRange {
    bits: BitWidth,
    signedness: Signedness,
}

impl QuantRange {
    /// The range of `bits`-bit codes with the given signedness.
    pub const fn new(bits: BitWidth, signedness: Signedness) -> Self {
        Self { bits, signedness }
    }

    /// Shorthand for a signed range, checking the width.
    pub fn signed(bits: u32) -> Result<Self> {
        Ok(Self::new(BitWidth::new(bits)?, Signedness::Signed))
    }

    /// Shorthand for an unsigned range, checking the width.
    pub fn unsigned(bits: u32) -> Result<Self> {
        Ok(Self::new(BitWidth::new(bits)?, Signedness::Unsigned))
    }

    /// The bit width.
    pub const fn bits(self) -> BitWidth {
        self.bits
    }

    /// Signed or unsigned.
    pub const fn signedness(self) -> Signedness {
        self.signedness
    }

    /// `n`: the smallest code value.
    pub const fn min(self) -> i32 {
        match self.signedness {
            Signedness::Signed => -(1 << (self.bits.0 - 1)),
            Signedness::Unsigned => 0,
        }
    }

    /// `p`: the largest code value.
    pub const fn max(self) -> i32 {
        match self.signedness {
            Signedness::Signed => (1 << (self.bits.0 - 1)) - 1,
            Signedness::Unsigned => (1 << self.bits.0) - 1,
        }
    }

    /// Raw `b`-bit pattern of the integer `q` (two's complement truncated for signed ranges).
    /// `q` must lie in `[min, max]`.
    #[inline]
    pub fn to_raw(self, q: i32) -> u8 {
        debug_assert!(q >= self.min() && q <= self.max());
        (q as u8) & self.bits.mask()
    }

    /// The integer of a raw `b`-bit pattern (sign-extended for signed ranges).
    #[inline]
    pub fn from_raw(self, raw: u8) -> i32 {
        let b = self.bits.0 as u32;
        let raw = (raw & self.bits.mask()) as i32;
        match self.signedness {
            Signedness::Signed => (raw << (32 - b)) >> (32 - b),
            Signedness::Unsigned => raw,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_outside_2_to_8_are_rejected() {
        for b in [0, 1, 9, 16, 32] {
            assert!(matches!(BitWidth::new(b), Err(Error::BitWidth { bits, .. }) if bits == b));
        }
        for b in 2..=8 {
            assert_eq!(BitWidth::new(b).unwrap().get(), b);
        }
    }

    #[test]
    fn raw_patterns_round_trip_every_code() {
        for b in 2..=8 {
            for r in [
                QuantRange::signed(b).unwrap(),
                QuantRange::unsigned(b).unwrap(),
            ] {
                let mut seen = std::collections::HashSet::new();
                for q in r.min()..=r.max() {
                    let raw = r.to_raw(q);
                    assert!(raw <= r.bits().mask());
                    assert_eq!(r.from_raw(raw), q);
                    assert!(seen.insert(raw));
                }
                assert_eq!(seen.len(), r.bits().code_count());
            }
        }
    }
}
