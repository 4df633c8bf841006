//! The one rounding rule of asq: round half to even.
//!
//! Training (fake-quant) and the integer kernels must agree bit for bit, so every place that
//! turns a real number into an integer code goes through [`round_half_even`]. Half-to-even is
//! what PyTorch's `torch.round` does, it is odd-symmetric (`round(-x) == -round(x)`), and it is
//! unbiased on ties.

/// `1.5 * 2^23`: adding and subtracting it leaves an f32 whose fraction bits are gone, rounded
/// by the FPU's default mode (nearest, ties to even).
pub(crate) const MAGIC: f32 = 12_582_912.0;

/// Rounds `x` to the nearest integer, ties to even, for `|x| <= 2^22`.
///
/// Branch-free and vectorisable on baseline x86-64 (no SSE4.1 `roundps` needed). Callers clamp
/// into the code range first, so the precondition always holds; outside it the result is
/// still an integer-valued float close to `x` but ties are not guaranteed to go to even.
///
/// ```
/// use asq_core::round_half_even;
/// assert_eq!(round_half_even(2.5), 2.0);
/// assert_eq!(round_half_even(3.5), 4.0);
/// assert_eq!(round_half_even(-2.5), -2.0);
/// assert_eq!(round_half_even(-0.7), -1.0);
/// ```
#[inline(always)]
pub fn round_half_even(x: f32) -> f32 {
    (x + MAGIC) - MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ties_go_to_even() {
        for k in -300..300 {
            let x = k as f32 + 0.5;
            let r = round_half_even(x);
            assert_eq!(r, x.round_ties_even(), "x = {x}");
            assert_eq!(r as i64 % 2, 0);
        }
    }

    proptest! {
        #[test]
        fn equals_std_round_ties_even(x in -4_194_304.0f32..4_194_304.0) {
            prop_assert_eq!(round_half_even(x), x.round_ties_even());
        }
    }
}
