//! The storage layout of one weight tile: 16 output channels x 4 reduction steps = 64 codes.
//!
//! Code `j` of a tile is channel `j / 4`, reduction index `j % 4` (the order the int8 kernels
//! consume: 4 consecutive bytes per channel, one dword per channel in a vector register). The
//! bytes of a tile depend on the width, chosen so that AVX2 expands them with a few shifts and
//! one `vpshufb` table lookup per 32 codes:
//!
//! | bits | bytes | byte `i` holds |
//! |---|---|---|
//! | 2 | 16 | codes `i`, `16+i`, `32+i`, `48+i` in bits 0-1, 2-3, 4-5, 6-7 |
//! | 3 | 24 | bytes 0-15: the low two bits as in the 2-bit layout; bytes 16-23: bit 2 of code `j` at bit `j % 8` of byte `16 + j / 8` |
//! | 4 | 32 | codes `i` (low nibble) and `32+i` (high nibble) |
//! | 5..=8 | 64 | code `i` |

use asq_core::BitWidth;

/// Codes per tile.
pub const TILE_CODES: usize = 64;

/// Bytes of one tile at `bits`.
pub const fn tile_bytes(bits: BitWidth) -> usize {
    match bits.get() {
        2 => 16,
        3 => 24,
        4 => 32,
        _ => 64,
    }
}

/// Packs 64 codes (each `< 2^bits`) into `out` (`tile_bytes(bits)` long).
pub fn pack_tile(codes: &[u8; TILE_CODES], bits: BitWidth, out: &mut [u8]) {
    debug_assert_eq!(out.len(), tile_bytes(bits));
    match bits.get() {
        2 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = codes[i] | codes[16 + i] << 2 | codes[32 + i] << 4 | codes[48 + i] << 6;
            }
        }
        3 => {
            for i in 0..16 {
                out[i] = (codes[i] & 3)
                    | (codes[16 + i] & 3) << 2
                    | (codes[32 + i] & 3) << 4
                    | (codes[48 + i] & 3) << 6;
            }
            for (j, hi) in out[16..24].iter_mut().enumerate() {
                *hi = (0..8).fold(0, |acc, b| acc | ((codes[j * 8 + b] >> 2) & 1) << b);
            }
        }
        4 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = codes[i] | codes[32 + i] << 4;
            }
        }
        _ => out.copy_from_slice(codes),
    }
}

/// Inverse of [`pack_tile`].
pub fn unpack_tile(bytes: &[u8], bits: BitWidth, codes: &mut [u8; TILE_CODES]) {
    debug_assert_eq!(bytes.len(), tile_bytes(bits));
    match bits.get() {
        2 | 3 => {
            for i in 0..16 {
                let b = bytes[i];
                codes[i] = b & 3;
                codes[16 + i] = (b >> 2) & 3;
                codes[32 + i] = (b >> 4) & 3;
                codes[48 + i] = b >> 6;
            }
            if bits.get() == 3 {
                for (j, c) in codes.iter_mut().enumerate() {
                    *c |= ((bytes[16 + j / 8] >> (j % 8)) & 1) << 2;
                }
            }
        }
        4 => {
            for i in 0..32 {
                codes[i] = bytes[i] & 0x0f;
                codes[32 + i] = bytes[i] >> 4;
            }
        }
        _ => codes.copy_from_slice(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_round_trip_every_width() {
        for b in 2..=8 {
            let bits = BitWidth::new(b).unwrap();
            let mut codes = [0u8; TILE_CODES];
            for (j, c) in codes.iter_mut().enumerate() {
                *c = ((j * 37 + 11) % 251) as u8 & bits.mask();
            }
            let mut bytes = vec![0u8; tile_bytes(bits)];
            pack_tile(&codes, bits, &mut bytes);
            let mut back = [0u8; TILE_CODES];
            unpack_tile(&bytes, bits, &mut back);
            assert_eq!(codes, back, "{b} bits");
        }
    }
}
