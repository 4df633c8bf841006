//! Portable kernels: panel expansion and the i32 micro-kernel in plain Rust.

use asq_core::BitWidth;

use crate::frame::{Seg, GROUP_BYTES, MR};
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

/// `acc[r][8·half + j] = sum over the runs' groups g, steps t of a[r·lda + off(g) + t] ·
/// b[64g + 32·half + 4j + t]` for `j < 8` (`off(g)`: the byte of group `g` in its run, see
/// [`Seg`]).
pub(crate) fn tile(
    a: &[u8],
    lda: usize,
    signed_a: bool,
    b: &[i8],
    half: usize,
    segs: &[Seg],
    acc: &mut [[i32; 16]; MR],
) {
    for (r, row) in acc.iter_mut().enumerate() {
        let row = &mut row[half * 8..half * 8 + 8];
        for (j, out) in row.iter_mut().enumerate() {
            let mut s = 0i32;
            let mut g = 0;
            for seg in segs {
                let ar = &a[r * lda + seg.off..r * lda + seg.off + seg.groups * 4];
                for (i, a4) in ar.chunks_exact(4).enumerate() {
                    let bg = &b[(g + i) * GROUP_BYTES + half * 32 + j * 4..][..4];
                    for t in 0..4 {
                        let av = if signed_a {
                            a4[t] as i8 as i32
                        } else {
                            a4[t] as i32
                        };
                        s += av * bg[t] as i32;
                    }
                }
                g += seg.groups;
            }
            *out = s;
        }
    }
}
