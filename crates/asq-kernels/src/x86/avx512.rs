//! AVX-512 VNNI kernels: `vpdpbusd` (64 u8 x s8 products summed into 16 i32 lanes per
//! instruction, non-saturating) on the tile layout of [`crate::tile`], whose 64 codes are
//! exactly one register with channel `j` in dword `j`.
//!
//! - GEMM micro-kernel: the plan's tile ([`crate::dispatch::vnni_shape`]: 8 rows x 2 panels of
//!   16 channels, or 4 rows x up to 4 panels) from expanded panels; one accumulator register per
//!   row and panel, so 16 independent `vpdpbusd` chains cover the latency at two per cycle, with
//!   one broadcast per row and one load per panel for every rows x panels products.
//! - GEMV with in-register expansion: 2/3/4-bit tiles become int8 levels by one 512-bit
//!   `vpshufb` (the 16-entry table in every 128-bit lane; 3-bit tiles add their bit plane with
//!   one merge-masked byte add, the plane being exactly a 64-bit mask in code order).
//!
//! Exactness: `vpdpbusd` forms each 4-product sum exactly and adds it modulo 2^32, so any
//! int8 weights (the whole table range) and unsigned 8-bit activations give the exact i32
//! sum whenever it fits in i32, which the planner checks. Signed activations are offset by
//! 128 (`a ^ 0x80` is `a + 128` as an unsigned byte) and `128 · sum_k w` is subtracted per
//! channel; the arithmetic is modulo 2^32, so the result is exact whenever the true sum fits.
//!
//! The kernels are written once, in `vnni_kernels!`, and compiled twice: with the real
//! intrinsics (module [`native`]) and, for tests, against the portable model of
//! [`super::emu512`], so their blocking and tails are checked bit for bit on every CPU, and
//! the real instructions wherever the CPU has them.

use crate::frame::GROUP_BYTES;

/// Zero-padded 16-entry copy of a code table (tables of 2/3/4-bit codes have 4, 8, 16 entries).
fn table16(table: &[i8]) -> [i8; 16] {
    let mut t = [0i8; 16];
    let n = table.len().min(16);
    t[..n].copy_from_slice(&table[..n]);
    t
}

/// The kernels, generic over where the intrinsics come from; `$feature` is the attribute the
/// functions get (the target features for the real instructions).
macro_rules! vnni_kernels {
    ($feature:meta) => {
        use super::table16;
        use crate::frame::{seg_extent, Seg, TileShape, GROUP_BYTES};
        use crate::tile::tile_bytes;
        use asq_core::BitWidth;

        /// A 16-entry table in all four 128-bit lanes.
        #[$feature]
        fn lut(table: &[i8]) -> __m512i {
            let t = table16(table);
            // SAFETY: mask 0xffff reads exactly the 16 bytes of `t`.
            let x = unsafe { _mm512_maskz_loadu_epi8(0xffff, t.as_ptr()) };
            _mm512_shuffle_i64x2::<0>(x, x)
        }

        /// The 64 codes of one tile as int8 values (byte `j` = channel `j / 4`, step `j % 4`).
        ///
        /// # Safety
        /// `p` must point at `tile_bytes(BITS)` readable bytes.
        #[$feature]
        #[inline]
        unsafe fn expand<const BITS: u32>(p: *const u8, lut: __m512i) -> __m512i {
            match BITS {
                4 => {
                    // SAFETY: a 4-bit tile is 32 bytes; the mask reads bytes 0..32 only.
                    let x = unsafe { _mm512_maskz_loadu_epi8(0xffff_ffff, p as *const i8) };
                    // Bytes 0..32 twice; the upper copy shifted by 4 yields the high nibbles.
                    let x = _mm512_shuffle_i64x2::<0b01_00_01_00>(x, x);
                    let counts = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
                    let v = _mm512_and_si512(_mm512_srlv_epi32(x, counts), _mm512_set1_epi8(0x0f));
                    _mm512_shuffle_epi8(lut, v)
                }
                2 | 3 => {
                    // SAFETY: 2- and 3-bit tiles start with 16 bytes of 2-bit fields.
                    let x = unsafe { _mm512_maskz_loadu_epi8(0xffff, p as *const i8) };
                    // Lane l holds codes 16l..16l+16 at bits 2l, 2l+1 of each byte.
                    let x = _mm512_shuffle_i64x2::<0>(x, x);
                    let counts = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
                    let mut v = _mm512_and_si512(_mm512_srlv_epi32(x, counts), _mm512_set1_epi8(3));
                    if BITS == 3 {
                        // Bit 2 of code j is bit j of the little-endian u64 at byte 16.
                        // SAFETY: a 3-bit tile is 24 bytes.
                        let plane: __mmask64 =
                            unsafe { (p.add(16) as *const u64).read_unaligned() };
                        v = _mm512_mask_add_epi8(v, plane, v, _mm512_set1_epi8(4));
                    }
                    _mm512_shuffle_epi8(lut, v)
                }
                // 8 bits with the identity table: the bytes are the values.
                // SAFETY: an 8-bit tile is 64 bytes.
                _ => unsafe { _mm512_loadu_si512(p as *const __m512i) },
            }
        }

        /// Micro-kernel over a whole tile: `acc[r · C + j] = sum_k a[r·lda + k] · b[.., j] -
        /// corr[j]` for `tile.rows` rows (`a` holds them all: padded storage) and the `C =
        /// 16 · tile.panels` channels of the expanded panels `b` (`[panels][groups][64]` int8).
        /// Signed activations are offset by 128 (`corr` then holds `128 · sum_k w`).
        ///
        /// # Safety
        /// The CPU must support the instructions (see `Isa::Avx512Vnni`).
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn tile_block(
            a: &[u8],
            lda: usize,
            signed: bool,
            tile: TileShape,
            b: &[i8],
            segs: &[Seg],
            corr: &[i32],
            acc: &mut [i32],
        ) {
            macro_rules! go {
                ($r:literal, $p:literal) => {
                    // SAFETY (both arms): features per the caller; `block` checks the slices.
                    if signed {
                        unsafe { block::<$r, $p, true>(a, lda, b, segs, corr, acc) }
                    } else {
                        unsafe { block::<$r, $p, false>(a, lda, b, segs, corr, acc) }
                    }
                };
            }
            match (tile.rows, tile.panels) {
                // The shapes `dispatch::vnni_shape` chooses.
                (8, 1) => go!(8, 1),
                (8, 2) => go!(8, 2),
                (4, 1) => go!(4, 1),
                (4, 2) => go!(4, 2),
                (4, 3) => go!(4, 3),
                (4, 4) => go!(4, 4),
                other => panic!("no VNNI kernel for tile {other:?}"),
            }
        }

        /// Exact POST's two products over one tile in one pass (`b[0]` even, `b[1]` odd
        /// expansion of the same panels): each activation broadcast feeds both, 2·R·P
        /// accumulators.
        ///
        /// # Safety
        /// The CPU must support the instructions (see `Isa::Avx512Vnni`).
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn tile_block2(
            a: &[u8],
            lda: usize,
            signed: bool,
            tile: TileShape,
            b: [&[i8]; 2],
            segs: &[Seg],
            corr: [&[i32]; 2],
            acc: [&mut [i32]; 2],
        ) {
            macro_rules! go {
                ($r:literal, $p:literal) => {
                    // SAFETY (both arms): features per the caller; `block2` checks the slices.
                    if signed {
                        unsafe { block2::<$r, $p, true>(a, lda, b, segs, corr, acc) }
                    } else {
                        unsafe { block2::<$r, $p, false>(a, lda, b, segs, corr, acc) }
                    }
                };
            }
            match (tile.rows, tile.panels) {
                (8, 1) => go!(8, 1),
                (4, 1) => go!(4, 1),
                other => panic!("no exact-POST VNNI kernel for tile {other:?}"),
            }
        }

        /// [`tile_block2`] for `R` rows and `P` panels.
        ///
        /// # Safety
        /// As [`tile_block2`].
        #[$feature]
        #[inline]
        unsafe fn block2<const R: usize, const P: usize, const SIGNED: bool>(
            a: &[u8],
            lda: usize,
            b: [&[i8]; 2],
            segs: &[Seg],
            corr: [&[i32]; 2],
            acc: [&mut [i32]; 2],
        ) {
            let (groups, end) = seg_extent(segs);
            let pb = groups * GROUP_BYTES;
            assert!(
                a.len() >= (R - 1) * lda + end
                    && b.iter().all(|b| b.len() >= P * pb)
                    && corr.iter().all(|c| c.len() >= P * 16)
                    && acc.iter().all(|c| c.len() >= R * P * 16)
            );
            let mut c = [[[_mm512_setzero_si512(); P]; R]; 2];
            let mut gb = 0;
            for seg in segs {
                // SAFETY (pointer offsets): the run lies inside `a`, its groups inside `b`
                // (checked above).
                let (ap, bp) = unsafe {
                    (
                        a.as_ptr().add(seg.off),
                        [
                            b[0].as_ptr().add(gb * GROUP_BYTES),
                            b[1].as_ptr().add(gb * GROUP_BYTES),
                        ],
                    )
                };
                gb += seg.groups;
                for g in 0..seg.groups {
                    let mut bv = [[_mm512_setzero_si512(); P]; 2];
                    for t in 0..2 {
                        for q in 0..P {
                            // SAFETY: q < P and g < the run's groups: 64 bytes at q·pb + 64g
                            // from the run's first group lie inside b[t].
                            bv[t][q] = unsafe {
                                _mm512_loadu_si512(
                                    bp[t].add(q * pb + g * GROUP_BYTES) as *const __m512i
                                )
                            };
                        }
                    }
                    for r in 0..R {
                        // SAFETY: r < R and 4g + 4 <= 4·groups of the run: inside `a` (checked).
                        let word =
                            unsafe { (ap.add(r * lda + g * 4) as *const i32).read_unaligned() };
                        let av = if SIGNED {
                            _mm512_set1_epi32(word ^ 0x8080_8080u32 as i32)
                        } else {
                            _mm512_set1_epi32(word)
                        };
                        for t in 0..2 {
                            for q in 0..P {
                                c[t][r][q] = _mm512_dpbusd_epi32(c[t][r][q], av, bv[t][q]);
                            }
                        }
                    }
                }
            }
            let [acc0, acc1] = acc;
            for (t, out) in [acc0, acc1].into_iter().enumerate() {
                for q in 0..P {
                    // SAFETY: q < P: 16 i32 at 16q lie inside corr[t] (checked).
                    let cv = unsafe {
                        _mm512_loadu_si512(corr[t].as_ptr().add(q * 16) as *const __m512i)
                    };
                    for r in 0..R {
                        let v = _mm512_sub_epi32(c[t][r][q], cv);
                        // SAFETY: (r·P + q)·16 + 16 <= R·P·16 <= out.len() (checked).
                        unsafe {
                            _mm512_storeu_si512(
                                out.as_mut_ptr().add((r * P + q) * 16) as *mut __m512i,
                                v,
                            )
                        };
                    }
                }
            }
        }

        /// [`tile_block`] for `R` rows and `P` panels: `R · P` accumulators, each a chain of one
        /// `vpdpbusd` per group of 4 steps; per group `P` panel loads and `R` broadcasts.
        ///
        /// # Safety
        /// As [`tile_block`].
        #[$feature]
        #[inline]
        unsafe fn block<const R: usize, const P: usize, const SIGNED: bool>(
            a: &[u8],
            lda: usize,
            b: &[i8],
            segs: &[Seg],
            corr: &[i32],
            acc: &mut [i32],
        ) {
            let (groups, end) = seg_extent(segs);
            let pb = groups * GROUP_BYTES;
            assert!(
                a.len() >= (R - 1) * lda + end
                    && b.len() >= P * pb
                    && corr.len() >= P * 16
                    && acc.len() >= R * P * 16
            );
            let mut c = [[_mm512_setzero_si512(); P]; R];
            // One run: `groups` groups from `ap` (activations) and `bp` (its first weight group).
            let mut run = |ap: *const u8, bp: *const i8, groups: usize| {
                for g in 0..groups {
                    let mut bv = [_mm512_setzero_si512(); P];
                    for (q, v) in bv.iter_mut().enumerate() {
                        // SAFETY: q < P and g < the run's groups: 64 bytes at q·pb + 64g from
                        // the run's first group lie inside `b`.
                        *v = unsafe {
                            _mm512_loadu_si512(bp.add(q * pb + g * GROUP_BYTES) as *const __m512i)
                        };
                    }
                    for r in 0..R {
                        // SAFETY: r < R and 4g + 4 <= 4·groups of the run: inside `a` (checked).
                        let word =
                            unsafe { (ap.add(r * lda + g * 4) as *const i32).read_unaligned() };
                        let av = if SIGNED {
                            _mm512_set1_epi32(word ^ 0x8080_8080u32 as i32)
                        } else {
                            _mm512_set1_epi32(word)
                        };
                        for q in 0..P {
                            c[r][q] = _mm512_dpbusd_epi32(c[r][q], av, bv[q]);
                        }
                    }
                }
            };
            if let [seg] = segs {
                // A GEMM row: one run from the start (the loop of a plain GEMM).
                // SAFETY: the run lies inside `a` (checked above).
                run(unsafe { a.as_ptr().add(seg.off) }, b.as_ptr(), seg.groups);
            } else {
                let mut gb = 0;
                for seg in segs {
                    // SAFETY (pointer offsets): the run lies inside `a`, its groups inside `b`
                    // (checked above).
                    let (ap, bp) =
                        unsafe { (a.as_ptr().add(seg.off), b.as_ptr().add(gb * GROUP_BYTES)) };
                    gb += seg.groups;
                    run(ap, bp, seg.groups);
                }
            }
            for q in 0..P {
                // SAFETY: q < P: 16 i32 at 16q lie inside `corr` (checked).
                let cv = unsafe { _mm512_loadu_si512(corr.as_ptr().add(q * 16) as *const __m512i) };
                for r in 0..R {
                    let v = _mm512_sub_epi32(c[r][q], cv);
                    // SAFETY: (r·P + q)·16 + 16 <= R·P·16 <= acc.len() (checked).
                    unsafe {
                        _mm512_storeu_si512(
                            acc.as_mut_ptr().add((r * P + q) * 16) as *mut __m512i,
                            v,
                        )
                    };
                }
            }
        }

        /// GEMV of `np` (1..=4) consecutive panels at once (`panels` holds them back to back):
        /// one broadcast of the activations per group feeds every panel's `vpdpbusd`, and the
        /// panels' accumulators are independent chains. `acc[16q + j]` (and `acc2` for exact
        /// POST) receive panel `q`'s sums.
        ///
        /// # Safety
        /// The CPU must support the instructions (see `Isa::Avx512Vnni`).
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn gemv_panels(
            a: &[u8],
            signed: bool,
            panels: &[u8],
            np: usize,
            bits: BitWidth,
            t1: &[i8],
            t2: Option<&[i8]>,
            groups: usize,
            acc: &mut [i32; 64],
            acc2: &mut [i32; 64],
        ) {
            assert!(
                (1..=4).contains(&np)
                    && a.len() >= groups * 4
                    && panels.len() >= np * groups * tile_bytes(bits)
            );
            macro_rules! go {
                ($b:literal, $np:literal) => {
                    match (signed, t2) {
                        // SAFETY (all arms): lengths asserted above; features per the caller.
                        (false, None) => unsafe {
                            gemv_multi::<$b, $np, false, false>(
                                a, panels, t1, t1, groups, acc, acc2,
                            )
                        },
                        (false, Some(t2)) => unsafe {
                            gemv_multi::<$b, $np, true, false>(a, panels, t1, t2, groups, acc, acc2)
                        },
                        (true, None) => unsafe {
                            gemv_multi::<$b, $np, false, true>(a, panels, t1, t1, groups, acc, acc2)
                        },
                        (true, Some(t2)) => unsafe {
                            gemv_multi::<$b, $np, true, true>(a, panels, t1, t2, groups, acc, acc2)
                        },
                    }
                };
            }
            macro_rules! width {
                ($np:literal) => {
                    match bits.get() {
                        2 => go!(2, $np),
                        3 => go!(3, $np),
                        4 => go!(4, $np),
                        8 => go!(8, $np),
                        b => panic!("GEMV planned for unsupported width {b}"),
                    }
                };
            }
            match np {
                1 => width!(1),
                2 => width!(2),
                3 => width!(3),
                _ => width!(4),
            }
        }

        /// # Safety
        /// As [`gemv_panels`]; `a` holds `4 · groups` bytes, `panels` `NP · groups` tiles.
        #[$feature]
        #[allow(clippy::too_many_arguments)]
        unsafe fn gemv_multi<
            const BITS: u32,
            const NP: usize,
            const TWO: bool,
            const SIGNED: bool,
        >(
            a: &[u8],
            panels: &[u8],
            t1: &[i8],
            t2: &[i8],
            groups: usize,
            acc: &mut [i32; 64],
            acc2: &mut [i32; 64],
        ) {
            let tb = tile_bytes(BitWidth::new(BITS).expect("2, 3, 4 or 8"));
            let stride = groups * tb;
            let (l1, l2) = (lut(t1), lut(t2));
            let flip = if SIGNED { 0x8080_8080u32 } else { 0 };
            let offset = _mm512_set1_epi8(-128);
            let mut c = [_mm512_setzero_si512(); NP];
            let mut c2 = [_mm512_setzero_si512(); NP];
            let mut k = [_mm512_setzero_si512(); NP];
            let mut k2 = [_mm512_setzero_si512(); NP];
            for g in 0..groups {
                // SAFETY: g < groups: 4 bytes of `a` are in bounds.
                let word = unsafe { (a.as_ptr().add(g * 4) as *const u32).read_unaligned() };
                let av = _mm512_set1_epi32((word ^ flip) as i32);
                for q in 0..NP {
                    // SAFETY: q < NP, g < groups: one whole tile of `panels`.
                    let p = unsafe { panels.as_ptr().add(q * stride + g * tb) };
                    // SAFETY: `p` points at a whole tile.
                    let x = unsafe { expand::<BITS>(p, l1) };
                    c[q] = _mm512_dpbusd_epi32(c[q], av, x);
                    if SIGNED {
                        k[q] = _mm512_dpbusd_epi32(k[q], offset, x);
                    }
                    if TWO {
                        // SAFETY: as above.
                        let y = unsafe { expand::<BITS>(p, l2) };
                        c2[q] = _mm512_dpbusd_epi32(c2[q], av, y);
                        if SIGNED {
                            k2[q] = _mm512_dpbusd_epi32(k2[q], offset, y);
                        }
                    }
                }
            }
            for q in 0..NP {
                // SAFETY: q < NP <= 4: 16 i32 at 16q lie inside the 64 of acc and acc2.
                unsafe {
                    _mm512_storeu_si512(
                        acc.as_mut_ptr().add(16 * q) as *mut __m512i,
                        _mm512_sub_epi32(c[q], k[q]),
                    );
                    if TWO {
                        _mm512_storeu_si512(
                            acc2.as_mut_ptr().add(16 * q) as *mut __m512i,
                            _mm512_sub_epi32(c2[q], k2[q]),
                        );
                    }
                }
            }
        }
    };
}

/// The kernels on the real instructions.
pub(crate) mod native {
    use core::arch::x86_64::*;
    vnni_kernels!(target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni"));
}

/// The same kernels on the portable model, for tests on any CPU.
#[cfg(test)]
pub(crate) mod emulated {
    use super::super::emu512::*;
    vnni_kernels!(cfg(all()));
}

/// Codes of one row for the integer grid `[lower, upper]` with zero point 0 (the activation
/// quantizers): `t = x / step`, NaN -> 0, clamped, rounded half to even through the `1.5 · 2^23`
/// addition, and the low byte of the sum's bits (the two's complement of the integer, which is
/// the code byte for unsigned and signed ranges alike). The same operations as asq-core's scalar
/// `encode`, lane-wise, so the same codes.
///
/// # Safety
/// The CPU must have AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn encode_row(x: &[f32], step: f32, lower: f32, upper: f32, out: &mut [u8]) {
    use core::arch::x86_64::*;
    assert_eq!(x.len(), out.len());
    let (s, lo, hi) = (
        _mm512_set1_ps(step),
        _mm512_set1_ps(lower),
        _mm512_set1_ps(upper),
    );
    let magic = _mm512_set1_ps(12_582_912.0);
    let zero = _mm512_setzero_ps();
    let mut i = 0;
    while i < x.len() {
        let left = x.len() - i;
        let mask: __mmask16 = if left >= 16 {
            0xffff
        } else {
            (1u16 << left) - 1
        };
        // SAFETY: the mask covers only elements i..i + 16 that exist.
        let v = unsafe { _mm512_maskz_loadu_ps(mask, x.as_ptr().add(i)) };
        let t = _mm512_div_ps(v, s);
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(t, t);
        let t = _mm512_mask_mov_ps(t, nan, zero);
        let t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
        let bits = _mm512_castps_si512(_mm512_add_ps(t, magic));
        // SAFETY: as above, for the bytes.
        unsafe { _mm512_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().add(i) as *mut i8, mask, bits) };
        i += 16;
    }
}

/// The epilogue of 16 outputs (see [`crate::frame::finish`]), lane-wise with the same operations
/// in the same order, so the same bits: `acc` (plus `odd · (1/√2)` for exact POST) converted,
/// times `a_scale · w_scale`, plus bias, plus residual, then `max(v, 0)` for ReLU.
///
/// # Safety
/// The CPU must have AVX-512 F; `out` must be valid for 16 `f32` writes.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn finish16(
    acc: &[i32; 16],
    odd: Option<&[i32; 16]>,
    a_scale: f32,
    w_scale: &[f32; 16],
    bias: Option<&[f32; 16]>,
    residual: Option<&[f32; 16]>,
    relu: bool,
    out: *mut f32,
) {
    use core::arch::x86_64::*;
    // SAFETY: every load reads one whole 16-element array.
    unsafe {
        let mut v = _mm512_cvtepi32_ps(_mm512_loadu_si512(acc.as_ptr() as *const __m512i));
        if let Some(o) = odd {
            let o = _mm512_cvtepi32_ps(_mm512_loadu_si512(o.as_ptr() as *const __m512i));
            v = _mm512_add_ps(
                v,
                _mm512_mul_ps(o, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2)),
            );
        }
        let scale = _mm512_mul_ps(_mm512_set1_ps(a_scale), _mm512_loadu_ps(w_scale.as_ptr()));
        v = _mm512_mul_ps(v, scale);
        v = _mm512_add_ps(
            v,
            bias.map_or(_mm512_setzero_ps(), |b| _mm512_loadu_ps(b.as_ptr())),
        );
        v = _mm512_add_ps(
            v,
            residual.map_or(_mm512_setzero_ps(), |r| _mm512_loadu_ps(r.as_ptr())),
        );
        if relu {
            v = _mm512_max_ps(v, _mm512_setzero_ps());
        }
        // SAFETY: the caller guarantees 16 writable floats at `out`.
        _mm512_storeu_ps(out, v);
    }
}

/// `128 · sum_k w[k, j]` per channel of an expanded panel: the correction of the signed-
/// activation offset (wrapping, like the kernels' sums).
pub(crate) fn offset_correction(b: &[i8], groups: usize) -> [i32; 16] {
    let mut corr = [0i32; 16];
    for g in b[..groups * GROUP_BYTES].chunks_exact(GROUP_BYTES) {
        for (j, c) in corr.iter_mut().enumerate() {
            let s: i32 = g[4 * j..4 * j + 4].iter().map(|&v| v as i32).sum();
            *c = c.wrapping_add(s.wrapping_mul(128));
        }
    }
    corr
}

#[cfg(test)]
mod tests {
    use asq_core::quant::{self, IntGrid, Steps};
    use asq_core::{BitWidth, LevelSet, QuantRange};
    use proptest::prelude::*;

    use crate::reference::gemm_reference;
    use crate::suite::pseudo;
    use crate::{gemm_emulated_vnni, Epilogue, PackedWeights, QuantActivations};

    /// Weights: 0..=2 exact POST, 3 POST on grid 127, 4 POT, 5 uniform (bits from the case).
    fn weights(kind: u8, bits: u32, n: usize, k: usize, seed: u64) -> PackedWeights {
        let b = BitWidth::new(bits.clamp(2, 4)).unwrap();
        let w: Vec<f32> = (0..n * k).map(|i| pseudo(seed, i)).collect();
        let alphas: Vec<f32> = (0..n).map(|c| 0.3 + pseudo(seed ^ 1, c).abs()).collect();
        let levels = match kind {
            0..=2 => LevelSet::post(b),
            3 => LevelSet::post_int(b, 127),
            4 => LevelSet::pot(b),
            _ => {
                // Full-range signed codes, the extremes included.
                let r = QuantRange::signed(bits).unwrap();
                let steps: Vec<f32> = alphas.iter().map(|a| a / r.max() as f32).collect();
                let mut codes = vec![0u8; n * k];
                quant::encode(&IntGrid::new(r), &w, Steps::PerRow(&steps), &mut codes).unwrap();
                return PackedWeights::from_uniform_codes(&codes, n, k, r, &steps).unwrap();
            }
        }
        .unwrap();
        PackedWeights::quantize_levels(&w, n, k, &levels, &alphas).unwrap()
    }

    /// Codes spread over the whole range (both ends hit), per-sample scales.
    fn activations(range: QuantRange, m: usize, k: usize, seed: u64) -> QuantActivations {
        let span = (range.max() - range.min() + 1) as f32;
        let codes: Vec<i32> = (0..m * k)
            .map(|i| range.min() + ((pseudo(seed ^ 2, i) + 1.0) * 0.5 * span) as i32)
            .map(|c| c.min(range.max()))
            .collect();
        let scales: Vec<f32> = (0..m).map(|r| 0.01 + pseudo(seed ^ 3, r).abs()).collect();
        QuantActivations::from_codes(&codes, m, k, range, &scales).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// The VNNI kernels' source, on the model of the instructions, equals the reference bit
        /// for bit: GEMM tiles (row tails, odd group counts) and GEMV (m = 1), every width and
        /// form, signed and unsigned activations, epilogues.
        #[test]
        fn emulated_vnni_matches_the_reference(
            m in prop_oneof![Just(1usize), 1usize..11, 11usize..30],
            n in prop_oneof![Just(1usize), 1usize..40, 40usize..100],
            k in prop_oneof![Just(1usize), 1usize..20, 20usize..150],
            kind in 0u8..6,
            wbits in prop_oneof![Just(2u32), Just(3), Just(4), Just(5), Just(8)],
            signed in any::<bool>(),
            abits in 2u32..=8,
            seed in any::<u64>(),
            relu in any::<bool>(),
            bias in any::<bool>(),
        ) {
            let w = weights(kind, wbits, n, k, seed);
            let range = if signed { QuantRange::signed(abits) } else { QuantRange::unsigned(abits) };
            let a = activations(range.unwrap(), m, k, seed);
            let b: Vec<f32> = (0..n).map(|c| pseudo(seed ^ 5, c)).collect();
            let epi = Epilogue { bias: bias.then_some(&b[..]), residual: None, relu };
            let mut expect = vec![0.0f32; m * n];
            gemm_reference(&a, &w, &epi, &mut expect).unwrap();
            let mut got = vec![f32::NAN; m * n];
            gemm_emulated_vnni(&a, &w, &epi, &mut got).unwrap();
            for (i, (g, e)) in got.iter().zip(&expect).enumerate() {
                prop_assert_eq!(g.to_bits(), e.to_bits(), "at {}: {} vs {}", i, g, e);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The implicit convolution (tiles cut at output-row ends, rows read in place from the
        /// padded input, one run per window row) on the model of the VNNI instructions equals
        /// the reference on im2col's rows bit for bit: odd sizes, strides 1-2, padding 0-2,
        /// every width and form, both activation kinds, multi-panel layers with channel tails.
        #[test]
        fn emulated_vnni_implicit_conv_matches_the_reference(
            batch in 1usize..3,
            h in 1usize..12,
            wd in 1usize..20,
            cq in 1usize..9,
            k in prop_oneof![Just(1usize), Just(3)],
            stride in 1usize..3,
            pad in 0usize..3,
            n in prop_oneof![1usize..17, 17usize..70],
            kind in 0u8..6,
            wbits in prop_oneof![Just(2u32), Just(3), Just(4), Just(8)],
            signed in any::<bool>(),
            seed in any::<u64>(),
        ) {
            use crate::conv::{im2col, Conv2dShape, ImplicitConv};
            let c = 4 * cq;
            prop_assume!(h + 2 * pad >= k && wd + 2 * pad >= k);
            let shape = Conv2dShape { batch, in_h: h, in_w: wd, in_c: c, kh: k, kw: k, stride, pad };
            let range = if signed { QuantRange::signed(8) } else { QuantRange::unsigned(7) };
            let x = activations(range.unwrap(), batch, h * wd * c, seed);
            let w = weights(kind, wbits, n, k * k * c, seed);
            let m = batch * shape.out_h() * shape.out_w();
            let b: Vec<f32> = (0..n).map(|c| pseudo(seed ^ 5, c)).collect();
            let res: Vec<f32> = (0..m * n).map(|i| pseudo(seed ^ 6, i)).collect();
            let epi = Epilogue { bias: Some(&b), residual: Some(&res), relu: true };
            let mut expect = vec![0.0f32; m * n];
            gemm_reference(&im2col(&x, &shape).unwrap(), &w, &epi, &mut expect).unwrap();
            let mut got = vec![f32::NAN; m * n];
            ImplicitConv::new(&x, &shape).unwrap().conv2d_emulated_vnni(&w, &epi, &mut got).unwrap();
            for (i, (g, e)) in got.iter().zip(&expect).enumerate() {
                prop_assert_eq!(g.to_bits(), e.to_bits(), "at {}: {} vs {}", i, g, e);
            }
        }
    }

    /// The AVX-512 epilogue equals the scalar one bit for bit, special values included (ReLU of
    /// -0.0 and NaN is +0.0 in both). Runs where the CPU has AVX-512 F.
    #[test]
    fn simd_epilogue_equals_the_scalar_one() {
        if !std::is_x86_feature_detected!("avx512f") {
            println!("no AVX-512 F on this CPU: the SIMD epilogue is not used here");
            return;
        }
        let specials = [0.0f32, -0.0, f32::NAN, 1e-38, -1e-38, 3.5, -2.25, f32::MAX];
        for seed in 0..200u64 {
            let pick = |i: usize, salt: u64| -> f32 {
                let v = pseudo(seed ^ salt, i) * 1e3;
                if (seed + i as u64).is_multiple_of(7) {
                    specials[(seed as usize + i) % specials.len()]
                } else {
                    v
                }
            };
            let acc: [i32; 16] = std::array::from_fn(|i| (pseudo(seed, i) * 1e6) as i32);
            let odd: [i32; 16] = std::array::from_fn(|i| (pseudo(seed ^ 9, i) * 1e6) as i32);
            let ws: [f32; 16] = std::array::from_fn(|i| pick(i, 1).abs());
            let bias: [f32; 16] = std::array::from_fn(|i| pick(i, 2));
            let res: [f32; 16] = std::array::from_fn(|i| pick(i, 3));
            let a_scale = pick(0, 4).abs();
            for (two, relu, with_bias, with_res) in [
                (false, false, false, false),
                (true, true, true, true),
                (false, true, true, false),
                (true, false, false, true),
            ] {
                let mut got = [0.0f32; 16];
                // SAFETY: AVX-512 F detected above; `got` holds 16 floats.
                unsafe {
                    super::finish16(
                        &acc,
                        two.then_some(&odd),
                        a_scale,
                        &ws,
                        with_bias.then_some(&bias),
                        with_res.then_some(&res),
                        relu,
                        got.as_mut_ptr(),
                    )
                };
                for j in 0..16 {
                    let accf = if two {
                        crate::frame::post_acc(acc[j], odd[j])
                    } else {
                        acc[j] as f32
                    };
                    let want = crate::frame::finish(
                        accf,
                        a_scale,
                        ws[j],
                        if with_bias { bias[j] } else { 0.0 },
                        if with_res { res[j] } else { 0.0 },
                        relu,
                    );
                    assert_eq!(got[j].to_bits(), want.to_bits(), "seed {seed} lane {j}");
                }
            }
        }
        let relu0 = crate::frame::finish(-0.0, 1.0, 1.0, 0.0, -0.0, true);
        assert_eq!(relu0.to_bits(), 0.0f32.to_bits());
        assert_eq!(
            crate::frame::finish(f32::NAN, 1.0, 1.0, 0.0, 0.0, true).to_bits(),
            0
        );
    }

    #[test]
    fn emulated_vnni_is_exact_at_the_i32_edge_with_signed_activations() {
        // -128 activations against -128 weights over a long K: the +128 offset sums exceed
        // i32 on the way and must wrap back to the exact result.
        let (m, n, k) = (5, 17, 2048);
        let r = QuantRange::signed(8).unwrap();
        let a = QuantActivations::from_codes(&vec![-128; m * k], m, k, r, &vec![1.0; m]).unwrap();
        let w =
            PackedWeights::from_uniform_codes(&vec![0x80; n * k], n, k, r, &vec![1.0; n]).unwrap();
        for rows in [1, m] {
            let a = if rows == 1 {
                QuantActivations::from_codes(&vec![-128; k], 1, k, r, &[1.0]).unwrap()
            } else {
                a.clone()
            };
            let mut got = vec![0.0f32; rows * n];
            gemm_emulated_vnni(&a, &w, &Epilogue::default(), &mut got).unwrap();
            assert!(
                got.iter().all(|&v| v == (128.0 * 128.0 * k as f32)),
                "{got:?}"
            );
        }
    }
}
