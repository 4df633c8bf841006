//! Bit packing of `b`-bit codes.
//!
//! Layout: a little-endian bit stream. Code `i` occupies bits `[i·b, (i+1)·b)`, bit 0 being the
//! least significant bit of byte 0. So 2-bit codes go four to a byte starting at the low bits,
//! 4-bit codes two to a byte low nibble first, 3-bit codes eight to three bytes (crossing byte
//! boundaries), 8-bit codes one to a byte. Padding bits of the last byte are zero; unpacking
//! rejects nonzero padding as corruption.
//!
//! ```
//! use asq_core::{pack::{pack_codes, packed_len, unpack_codes}, BitWidth};
//! let b = BitWidth::new(3)?;
//! let codes = [1, 2, 3, 4, 5, 6, 7, 0, 5];
//! let mut packed = vec![0u8; packed_len(codes.len(), b)];
//! pack_codes(&codes, b, &mut packed)?;
//! assert_eq!(packed.len(), 4);
//! let mut back = [0u8; 9];
//! unpack_codes(&packed, b, &mut back)?;
//! assert_eq!(back, codes);
//! # Ok::<(), asq_core::Error>(())
//! ```

use crate::bits::BitWidth;
use crate::error::{check_len, Error, Result};

/// Bytes needed for `count` codes of `bits` bits.
pub const fn packed_len(count: usize, bits: BitWidth) -> usize {
    (count * bits.get() as usize).div_ceil(8)
}

/// Packs `codes` (each `< 2^b`) into `out` (exactly [`packed_len`] bytes).
pub fn pack_codes(codes: &[u8], bits: BitWidth, out: &mut [u8]) -> Result<()> {
    check_len("packed buffer", packed_len(codes.len(), bits), out.len())?;
    let mask = bits.mask();
    if let Some(index) = codes.iter().position(|&c| c > mask) {
        return Err(Error::Code {
            code: codes[index] as u32,
            bits: bits.get(),
            index,
        });
    }
    match bits.get() {
        8 => out.copy_from_slice(codes),
        4 => {
            for (o, c) in out.iter_mut().zip(codes.chunks(2)) {
                *o = c[0] | c.get(1).map_or(0, |h| h << 4);
            }
        }
        2 => {
            for (o, c) in out.iter_mut().zip(codes.chunks(4)) {
                *o = c
                    .iter()
                    .enumerate()
                    .fold(0, |acc, (j, &v)| acc | (v << (2 * j)));
            }
        }
        3 => {
            let full = codes.len() / 8;
            for (o, c) in out.chunks_exact_mut(3).zip(codes.chunks_exact(8)) {
                let word = c
                    .iter()
                    .enumerate()
                    .fold(0u32, |acc, (j, &v)| acc | ((v as u32) << (3 * j)));
                o.copy_from_slice(&word.to_le_bytes()[..3]);
            }
            pack_generic(&codes[full * 8..], 3, &mut out[full * 3..]);
        }
        b => pack_generic(codes, b, out),
    }
    Ok(())
}

fn pack_generic(codes: &[u8], bits: u32, out: &mut [u8]) {
    out.iter_mut().for_each(|o| *o = 0);
    let mut acc = 0u32;
    let mut filled = 0u32;
    let mut pos = 0;
    for &c in codes {
        acc |= (c as u32) << filled;
        filled += bits;
        while filled >= 8 {
            out[pos] = acc as u8;
            pos += 1;
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out[pos] = acc as u8;
    }
}

/// Unpacks `out.len()` codes from `packed` (exactly [`packed_len`] bytes, zero padding).
pub fn unpack_codes(packed: &[u8], bits: BitWidth, out: &mut [u8]) -> Result<()> {
    check_len("packed buffer", packed_len(out.len(), bits), packed.len())?;
    let b = bits.get();
    let used = out.len() * b as usize % 8;
    if used != 0 {
        let last = packed[packed.len() - 1];
        if last >> used != 0 {
            return Err(Error::Corrupt(format!(
                "nonzero padding bits in the last byte ({last:#04x})"
            )));
        }
    }
    let mask = bits.mask();
    match b {
        8 => out.copy_from_slice(packed),
        4 => {
            for (c, &p) in out.chunks_mut(2).zip(packed) {
                c[0] = p & 0x0f;
                if let Some(h) = c.get_mut(1) {
                    *h = p >> 4;
                }
            }
        }
        2 => {
            for (c, &p) in out.chunks_mut(4).zip(packed) {
                for (j, v) in c.iter_mut().enumerate() {
                    *v = (p >> (2 * j)) & 3;
                }
            }
        }
        3 => {
            let full = out.len() / 8;
            for (c, p) in out.chunks_exact_mut(8).zip(packed.chunks_exact(3)) {
                let word = u32::from_le_bytes([p[0], p[1], p[2], 0]);
                for (j, v) in c.iter_mut().enumerate() {
                    *v = ((word >> (3 * j)) & 7) as u8;
                }
            }
            unpack_generic(&packed[full * 3..], 3, mask, &mut out[full * 8..]);
        }
        _ => unpack_generic(packed, b, mask, out),
    }
    Ok(())
}

fn unpack_generic(packed: &[u8], bits: u32, mask: u8, out: &mut [u8]) {
    let mut acc = 0u32;
    let mut filled = 0u32;
    let mut bytes = packed.iter();
    for o in out.iter_mut() {
        while filled < bits {
            acc |= (*bytes.next().expect("length checked") as u32) << filled;
            filled += 8;
        }
        *o = acc as u8 & mask;
        acc >>= bits;
        filled -= bits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_packed_layouts() {
        let b2 = BitWidth::new(2).unwrap();
        let mut out = [0u8; 2];
        pack_codes(&[1, 2, 3, 0, 3], b2, &mut out).unwrap();
        assert_eq!(out, [0b00_11_10_01, 0b11]);
        let b4 = BitWidth::new(4).unwrap();
        let mut out = [0u8; 2];
        pack_codes(&[0xa, 0x5, 0xf], b4, &mut out).unwrap();
        assert_eq!(out, [0x5a, 0x0f]);
        let b3 = BitWidth::new(3).unwrap();
        let mut out = [0u8; 1];
        pack_codes(&[0b101, 0b011], b3, &mut out).unwrap();
        assert_eq!(out, [0b011_101]);
        let mut out = [0u8; 3];
        pack_codes(&[7, 0, 0, 0, 0, 0, 0, 7], b3, &mut out).unwrap();
        assert_eq!(out, [0x07, 0x00, 0xe0]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let b3 = BitWidth::new(3).unwrap();
        assert!(matches!(
            pack_codes(&[8], b3, &mut [0]),
            Err(Error::Code { code: 8, .. })
        ));
        assert!(matches!(
            pack_codes(&[1, 2], b3, &mut [0, 0]),
            Err(Error::Length { .. })
        ));
        assert!(matches!(
            unpack_codes(&[0, 0], b3, &mut [0; 2]),
            Err(Error::Length { .. })
        ));
        // Two 3-bit codes use 6 bits: the top two bits must be zero.
        assert!(matches!(
            unpack_codes(&[0xc0], b3, &mut [0; 2]),
            Err(Error::Corrupt(_))
        ));
    }
}
