//! Portable kernels: panel expansion and the i32 micro-kernel in plain Rust.

use asq_core::BitWidth;

use crate::frame::{GROUP_BYTES, MR};
use crate::tile::{tile_bytes, unpack_tile, TILE_CODES};

/// Expands packed tiles into `[groups][64]` int8 values through `table`.
pub(crate) fn expand_panel(packed: &[u8], bits: BitWidth, table: &[i8], out: &mut [i8]) {
    let tb = tile_bytes(bits);
    let mut codes = [0u8; TILE_CODES];
    for (tile, dst) in packed
        .chunks_exact(tb)
        .zip(out.chunks_exact_mut(GROUP_BYTES))
    {
        unpack_tile(tile, bits, &mut codes);
        for (d, &c) in dst.iter_mut().zip(&codes) {
            *d = table[c as usize];
        }
    }
}

/// `acc[r][8·half + j] = sum over groups g, steps t of a[r·lda + 4g + t] · b[64g + 32·half + 4j + t]`
/// for `j < 8`.
pub(crate) fn tile(
    a: &[u8],
    lda: usize,
    signed_a: bool,
    b: &[i8],
    half: usize,
    groups: usize,
    acc: &mut [[i32; 16]; MR],
) {
    for (r, row) in acc.iter_mut().enumerate() {
        let row = &mut row[half * 8..half * 8 + 8];
        let ar = &a[r * lda..r * lda + groups * 4];
        for (j, out) in row.iter_mut().enumerate() {
            let mut s = 0i32;
            for g in 0..groups {
                let bg = &b[g * GROUP_BYTES + half * 32 + j * 4..][..4];
                for t in 0..4 {
                    let av = if signed_a {
                        ar[g * 4 + t] as i8 as i32
                    } else {
                        ar[g * 4 + t] as i32
                    };
                    s += av * bg[t] as i32;
                }
            }
            *out = s;
        }
    }
}
