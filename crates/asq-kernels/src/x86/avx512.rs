//! AVX-512 VNNI kernels: `vpdpbusd` (64 u8 x s8 products summed into 16 i32 lanes per
//! instruction, non-saturating) on the tile layout of [`crate::tile`], whose 64 codes are
//! exactly one register with channel `j` in dword `j`.
//!
//! - GEMM micro-kernel: [`MR`] rows x 16 channels from an expanded panel; two accumulator sets
//!   (even and odd groups) so eight independent `vpdpbusd` chains cover its latency.
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

use crate::frame::{GROUP_BYTES, MR};

/// Checks the GEMM micro-kernel's slices before its unchecked loads.
fn check_tile(a: &[u8], lda: usize, b: &[i8], groups: usize) {
    assert!(
        lda >= groups * 4
            && a.len() >= (MR - 1) * lda + groups * 4
            && b.len() >= groups * GROUP_BYTES
    );
}

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
        use super::{check_tile, table16};
        use crate::frame::{GROUP_BYTES, MR};
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

        /// Micro-kernel: `acc[r][j] = sum_k a[r·lda + k] · b[.., channel j] - corr[j]`, MR rows x
        /// 16 channels over an expanded panel `b` (`groups` x 64 int8). `flip` is `0x80808080`
        /// for signed activations (then `corr` holds `128 · sum_k w`), else 0 (and `corr` 0).
        ///
        /// # Safety
        /// The CPU must support the instructions (see `Isa::Avx512Vnni`).
        #[$feature]
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn tile(
            a: &[u8],
            lda: usize,
            flip: u32,
            b: &[i8],
            groups: usize,
            corr: &[i32; 16],
            acc: &mut [[i32; 16]; MR],
        ) {
            check_tile(a, lda, b, groups);
            let (ap, bp) = (a.as_ptr(), b.as_ptr());
            let bcast = |r: usize, g: usize| {
                // SAFETY: r < MR and g < groups: 4 bytes at r·lda + 4g lie inside `a` (checked).
                let word = unsafe { (ap.add(r * lda + g * 4) as *const u32).read_unaligned() };
                _mm512_set1_epi32((word ^ flip) as i32)
            };
            let load_b = |g: usize| {
                // SAFETY: g < groups: 64 bytes at 64g lie inside `b` (checked).
                unsafe { _mm512_loadu_si512(bp.add(g * GROUP_BYTES) as *const __m512i) }
            };
            let mut c0 = [_mm512_setzero_si512(); MR];
            let mut c1 = [_mm512_setzero_si512(); MR];
            let mut g = 0;
            while g + 2 <= groups {
                let (b0, b1) = (load_b(g), load_b(g + 1));
                for r in 0..MR {
                    c0[r] = _mm512_dpbusd_epi32(c0[r], bcast(r, g), b0);
                    c1[r] = _mm512_dpbusd_epi32(c1[r], bcast(r, g + 1), b1);
                }
                g += 2;
            }
            if g < groups {
                let b0 = load_b(g);
                for r in 0..MR {
                    c0[r] = _mm512_dpbusd_epi32(c0[r], bcast(r, g), b0);
                }
            }
            // SAFETY: `corr` is 16 i32 = 64 bytes.
            let cv = unsafe { _mm512_loadu_si512(corr.as_ptr() as *const __m512i) };
            for r in 0..MR {
                let v = _mm512_sub_epi32(_mm512_add_epi32(c0[r], c1[r]), cv);
                // SAFETY: a row of `acc` is 16 i32 = 64 bytes.
                unsafe { _mm512_storeu_si512(acc[r].as_mut_ptr() as *mut __m512i, v) };
            }
        }

        /// GEMV of one panel with in-register expansion; `t2` is the odd table of exact POST
        /// (then `acc2` receives the odd sums). `signed`: activations are int8 (offset by 128,
        /// corrected with `128 · sum_k w` measured by extra `vpdpbusd`s).
        ///
        /// # Safety
        /// The CPU must support the instructions (see `Isa::Avx512Vnni`).
        #[$feature]
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn gemv(
            a: &[u8],
            signed: bool,
            panel: &[u8],
            bits: BitWidth,
            t1: &[i8],
            t2: Option<&[i8]>,
            groups: usize,
            acc: &mut [i32; 16],
            acc2: &mut [i32; 16],
        ) {
            assert!(a.len() >= groups * 4 && panel.len() >= groups * tile_bytes(bits));
            macro_rules! go {
                ($b:literal) => {
                    match (signed, t2) {
                        // SAFETY (all arms): lengths asserted above; features per the caller.
                        (false, None) => unsafe {
                            gemv_bits::<$b, false, false>(a, panel, t1, t1, groups, acc, acc2)
                        },
                        (false, Some(t2)) => unsafe {
                            gemv_bits::<$b, true, false>(a, panel, t1, t2, groups, acc, acc2)
                        },
                        (true, None) => unsafe {
                            gemv_bits::<$b, false, true>(a, panel, t1, t1, groups, acc, acc2)
                        },
                        (true, Some(t2)) => unsafe {
                            gemv_bits::<$b, true, true>(a, panel, t1, t2, groups, acc, acc2)
                        },
                    }
                };
            }
            match bits.get() {
                2 => go!(2),
                3 => go!(3),
                4 => go!(4),
                8 => go!(8),
                b => panic!("GEMV planned for unsupported width {b}"),
            }
        }

        /// # Safety
        /// Features as for [`gemv`]; `a` holds `4 · groups` bytes, `panel` `groups` tiles.
        #[$feature]
        #[allow(clippy::too_many_arguments)]
        unsafe fn gemv_bits<const BITS: u32, const TWO: bool, const SIGNED: bool>(
            a: &[u8],
            panel: &[u8],
            t1: &[i8],
            t2: &[i8],
            groups: usize,
            acc: &mut [i32; 16],
            acc2: &mut [i32; 16],
        ) {
            let tb = tile_bytes(BitWidth::new(BITS).expect("2, 3, 4 or 8"));
            let (l1, l2) = (lut(t1), lut(t2));
            let flip = if SIGNED { 0x8080_8080u32 } else { 0 };
            let offset = _mm512_set1_epi8(-128);
            // Slots: [table 1, table 2] x [even group, odd group], then the offset sums.
            let mut c = [_mm512_setzero_si512(); 4];
            let mut k = [_mm512_setzero_si512(); 4];
            for g in 0..groups {
                let s = g & 1;
                // SAFETY: g < groups: 4 bytes of `a` and one tile of `panel` are in bounds.
                let (word, p) = unsafe {
                    (
                        (a.as_ptr().add(g * 4) as *const u32).read_unaligned(),
                        panel.as_ptr().add(g * tb),
                    )
                };
                let av = _mm512_set1_epi32((word ^ flip) as i32);
                // SAFETY: `p` points at a whole tile.
                let x = unsafe { expand::<BITS>(p, l1) };
                c[s] = _mm512_dpbusd_epi32(c[s], av, x);
                if SIGNED {
                    k[s] = _mm512_dpbusd_epi32(k[s], offset, x);
                }
                if TWO {
                    // SAFETY: as above.
                    let y = unsafe { expand::<BITS>(p, l2) };
                    c[2 + s] = _mm512_dpbusd_epi32(c[2 + s], av, y);
                    if SIGNED {
                        k[2 + s] = _mm512_dpbusd_epi32(k[2 + s], offset, y);
                    }
                }
            }
            let sum = |t: usize| {
                _mm512_sub_epi32(
                    _mm512_add_epi32(c[2 * t], c[2 * t + 1]),
                    _mm512_add_epi32(k[2 * t], k[2 * t + 1]),
                )
            };
            // SAFETY: acc and acc2 are 16 i32 = 64 bytes each.
            unsafe {
                _mm512_storeu_si512(acc.as_mut_ptr() as *mut __m512i, sum(0));
                if TWO {
                    _mm512_storeu_si512(acc2.as_mut_ptr() as *mut __m512i, sum(1));
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
            m in prop_oneof![Just(1usize), 1usize..11],
            n in prop_oneof![Just(1usize), 1usize..40],
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
