//! AVX2 kernels: `vpshufb` table expansion of 2/3/4-bit codes, the `vpmaddubsw` micro-kernel
//! with i16 accumulation depth, the widening `vpmaddwd` micro-kernel, and GEMV with in-register
//! expansion. Shapes are checked with `assert!` before the first unchecked load.

use core::arch::x86_64::*;

use asq_core::BitWidth;

use crate::frame::{seg_extent, Seg, GROUP_BYTES, MR};
use crate::tile::tile_bytes;

/// A 16-entry table (shorter tables zero-padded) broadcast to both 128-bit lanes.
#[target_feature(enable = "avx2")]
fn lut16(table: &[i8]) -> __m256i {
    let mut t = [0i8; 16];
    let n = table.len().min(16);
    t[..n].copy_from_slice(&table[..n]);
    // SAFETY: `t` is 16 readable bytes.
    _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(t.as_ptr() as *const __m128i) })
}

/// The 64 codes of one tile as int8 values, channels 0-7 then 8-15 (see [`crate::tile`]).
///
/// # Safety
/// `p` must point at `tile_bytes(BITS)` readable bytes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn expand_tile<const BITS: u32>(p: *const u8, lut: __m256i) -> (__m256i, __m256i) {
    match BITS {
        4 => {
            // SAFETY: a 4-bit tile is 32 bytes (caller contract).
            let x = unsafe { _mm256_loadu_si256(p as *const __m256i) };
            let m = _mm256_set1_epi8(0x0f);
            let lo = _mm256_and_si256(x, m);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), m);
            (_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi))
        }
        2 | 3 => {
            // SAFETY: 2- and 3-bit tiles start with 16 bytes of 2-bit fields (caller contract).
            let x = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p as *const __m128i) });
            let m = _mm256_set1_epi8(3);
            let mut v0 = _mm256_and_si256(
                _mm256_srlv_epi32(x, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)),
                m,
            );
            let mut v1 = _mm256_and_si256(
                _mm256_srlv_epi32(x, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)),
                m,
            );
            if BITS == 3 {
                // Bit 2 of code j sits at bit j % 8 of byte 16 + j / 8.
                let idx = _mm256_setr_epi8(
                    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                    3, 3, 3, 3, 3, 3,
                );
                let bit = _mm256_setr_epi8(
                    1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32,
                    64, -128, 1, 2, 4, 8, 16, 32, 64, -128,
                );
                let four = _mm256_set1_epi8(4);
                let plane = |off: usize| {
                    // SAFETY: a 3-bit tile is 24 bytes; off + 4 <= 24.
                    let word = unsafe { (p.add(off) as *const i32).read_unaligned() };
                    let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(word), idx);
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), four)
                };
                v0 = _mm256_or_si256(v0, plane(16));
                v1 = _mm256_or_si256(v1, plane(20));
            }
            (_mm256_shuffle_epi8(lut, v0), _mm256_shuffle_epi8(lut, v1))
        }
        // 8 bits with the identity table: the bytes are the values.
        // SAFETY: an 8-bit tile is 64 bytes (caller contract).
        _ => unsafe {
            (
                _mm256_loadu_si256(p as *const __m256i),
                _mm256_loadu_si256(p.add(32) as *const __m256i),
            )
        },
    }
}

/// Expands a packed panel (2, 3, 4 bits, or 8 bits with the identity table) into int8 groups.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn expand_panel(packed: &[u8], bits: BitWidth, table: &[i8], out: &mut [i8]) {
    let tb = tile_bytes(bits);
    let groups = packed.len() / tb;
    assert!(out.len() >= groups * GROUP_BYTES && packed.len() == groups * tb);
    let lut = lut16(table);
    macro_rules! run {
        ($b:literal) => {
            for g in 0..groups {
                // SAFETY: tile g lies inside `packed` (length asserted above).
                let (x, y) = unsafe { expand_tile::<$b>(packed.as_ptr().add(g * tb), lut) };
                // SAFETY: group g's 64 bytes lie inside `out` (asserted above).
                unsafe {
                    let o = out.as_mut_ptr().add(g * GROUP_BYTES) as *mut __m256i;
                    _mm256_storeu_si256(o, x);
                    _mm256_storeu_si256(o.add(1), y);
                }
            }
        };
    }
    match bits.get() {
        2 => run!(2),
        3 => run!(3),
        4 => run!(4),
        _ => run!(8),
    }
}

/// Checks a tile's operands: `MR` rows `lda` bytes apart whose runs `segs` stay inside `a`
/// (rows may overlap: an implicit convolution's do), and the expanded panel `b` holding every
/// group. Returns the groups.
fn check_tile(a: &[u8], lda: usize, b: &[i8], half: usize, segs: &[Seg]) -> usize {
    let (groups, end) = seg_extent(segs);
    assert!(half < 2 && a.len() >= (MR - 1) * lda + end && b.len() >= groups * GROUP_BYTES);
    groups
}

/// Calls `run(activations, first weight group, groups)` for every run of `segs` (a GEMM row's
/// single run directly, the plain loop of a GEMM). `a` and `b` must hold the runs (checked by
/// the caller with [`check_tile`]).
#[inline(always)]
fn for_runs(a: &[u8], b: &[i8], segs: &[Seg], run: &mut impl FnMut(*const u8, *const i8, usize)) {
    if let [seg] = segs {
        run(a[seg.off..].as_ptr(), b.as_ptr(), seg.groups);
        return;
    }
    let mut gb = 0;
    for seg in segs {
        run(
            a[seg.off..].as_ptr(),
            b[gb * GROUP_BYTES..].as_ptr(),
            seg.groups,
        );
        gb += seg.groups;
    }
}

/// `vpmaddubsw` micro-kernel, MR rows x the 8 channels of `half` (into `acc[..][8·half..]`),
/// `depth` pair sums added in i16 before widening (within a run of `segs`). Exact when
/// `depth · 2 · max|a| · max|b| <= 32767` (the planner's contract).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn tile_maddubs(
    a: &[u8],
    lda: usize,
    b: &[i8],
    half: usize,
    segs: &[Seg],
    depth: usize,
    acc: &mut [[i32; 16]; MR],
) {
    check_tile(a, lda, b, half, segs);
    assert!(depth >= 1);
    let ones = _mm256_set1_epi16(1);
    let mut c = [_mm256_setzero_si256(); MR];
    // One run: `groups` groups from `ap` (activations) and `bp` (its first weight group).
    let mut run = |ap: *const u8, bp: *const i8, groups: usize| {
        let load_b = |g: usize| {
            // SAFETY: g < the run's groups, whose 64-byte groups lie inside `b` (checked).
            unsafe { _mm256_loadu_si256(bp.add(g * GROUP_BYTES) as *const __m256i) }
        };
        let load_a = |r: usize, g: usize| {
            // SAFETY: r < MR and g < the run's groups: 4 bytes at r·lda + off + 4g lie inside
            // `a` (checked).
            _mm256_set1_epi32(unsafe { (ap.add(r * lda + g * 4) as *const i32).read_unaligned() })
        };
        if depth == 1 {
            for g in 0..groups {
                let bv = load_b(g);
                for (r, cr) in c.iter_mut().enumerate() {
                    *cr = _mm256_add_epi32(
                        *cr,
                        _mm256_madd_epi16(_mm256_maddubs_epi16(load_a(r, g), bv), ones),
                    );
                }
            }
        } else {
            let mut g = 0;
            while g < groups {
                let end = (g + depth).min(groups);
                let bv = load_b(g);
                let mut s = [_mm256_setzero_si256(); MR];
                for (r, sr) in s.iter_mut().enumerate() {
                    *sr = _mm256_maddubs_epi16(load_a(r, g), bv);
                }
                g += 1;
                while g < end {
                    let bv = load_b(g);
                    for (r, sr) in s.iter_mut().enumerate() {
                        *sr = _mm256_add_epi16(*sr, _mm256_maddubs_epi16(load_a(r, g), bv));
                    }
                    g += 1;
                }
                for (cr, sr) in c.iter_mut().zip(&s) {
                    *cr = _mm256_add_epi32(*cr, _mm256_madd_epi16(*sr, ones));
                }
            }
        }
    };
    for_runs(a, &b[half * 32..], segs, &mut run);
    for (row, cr) in acc.iter_mut().zip(&c) {
        // SAFETY: a row of `acc` is 16 i32; half < 2 (checked), so 8 i32 at 8·half fit.
        unsafe { _mm256_storeu_si256(row.as_mut_ptr().add(half * 8) as *mut __m256i, *cr) };
    }
}

/// Broadcast of the 4 activation codes at `p` widened to i16: `[a0, a1, a2, a3]` four times.
/// One broadcast load and one in-lane `vpshufb` (plus xor/sub to sign-extend signed codes).
///
/// # Safety
/// `p` must point at 4 readable bytes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn widen_a(p: *const u8, signed: bool) -> __m256i {
    // SAFETY: 4 readable bytes at `p` (caller contract).
    let d = _mm256_set1_epi32(unsafe { (p as *const i32).read_unaligned() });
    let zx = _mm256_setr_epi8(
        0, -1, 1, -1, 2, -1, 3, -1, 0, -1, 1, -1, 2, -1, 3, -1, 0, -1, 1, -1, 2, -1, 3, -1, 0, -1,
        1, -1, 2, -1, 3, -1,
    );
    let v = _mm256_shuffle_epi8(d, zx);
    if signed {
        // (x ^ 128) - 128 turns a zero-extended byte into its sign-extended value.
        let k = _mm256_set1_epi16(128);
        _mm256_sub_epi16(_mm256_xor_si256(v, k), k)
    } else {
        v
    }
}

/// Sums adjacent dword pairs of `x` (channels 0-3) and `y` (channels 4-7) into 8 channel sums.
#[target_feature(enable = "avx2")]
#[inline]
fn pair_sums(x: __m256i, y: __m256i) -> __m256i {
    _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(x, y))
}

/// Widening micro-kernel: both operands as i16, `vpmaddwd`; exact for all int8 values.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn tile_widen(
    a: &[u8],
    lda: usize,
    signed_a: bool,
    b: &[i8],
    half: usize,
    segs: &[Seg],
    acc: &mut [[i32; 16]; MR],
) {
    check_tile(a, lda, b, half, segs);
    let mut c = [[_mm256_setzero_si256(); 2]; MR];
    let mut run = |ap: *const u8, bp: *const i8, groups: usize| {
        for g in 0..groups {
            // SAFETY: 32 bytes at 64g + 32·half of the run's groups lie inside `b` (checked).
            let (b0, b1) = unsafe {
                let p = bp.add(g * GROUP_BYTES) as *const __m128i;
                (
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(p)),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(1))),
                )
            };
            for (r, cr) in c.iter_mut().enumerate() {
                // SAFETY: 4 bytes at r·lda + off + 4g lie inside `a` (checked).
                let av = unsafe { widen_a(ap.add(r * lda + g * 4), signed_a) };
                cr[0] = _mm256_add_epi32(cr[0], _mm256_madd_epi16(av, b0));
                cr[1] = _mm256_add_epi32(cr[1], _mm256_madd_epi16(av, b1));
            }
        }
    };
    for_runs(a, &b[half * 32..], segs, &mut run);
    for (row, cr) in acc.iter_mut().zip(&c) {
        // SAFETY: a row of `acc` is 16 i32; half < 2 (checked), so 8 i32 at 8·half fit.
        unsafe {
            _mm256_storeu_si256(
                row.as_mut_ptr().add(half * 8) as *mut __m256i,
                pair_sums(cr[0], cr[1]),
            )
        };
    }
}

/// GEMV of one panel with in-register expansion. `depth = Some(d)`: `vpmaddubsw` path (unsigned
/// activations, planner-checked ranges); `None`: widening path. `t2` is the odd table of exact
/// POST (then `acc2` receives the odd sums).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv(
    a: &[u8],
    signed_a: bool,
    panel: &[u8],
    bits: BitWidth,
    t1: &[i8],
    t2: Option<&[i8]>,
    groups: usize,
    depth: Option<usize>,
    acc: &mut [i32; 16],
    acc2: &mut [i32; 16],
) {
    assert!(a.len() >= groups * 4 && panel.len() >= groups * tile_bytes(bits));
    macro_rules! go {
        ($b:literal) => {
            match (depth, t2) {
                // SAFETY (all arms): lengths asserted above; AVX2 per the caller.
                (Some(d), None) => unsafe {
                    gemv_maddubs::<$b, false>(a, panel, t1, t1, groups, d, acc, acc2)
                },
                (Some(d), Some(t2)) => unsafe {
                    gemv_maddubs::<$b, true>(a, panel, t1, t2, groups, d, acc, acc2)
                },
                (None, None) => unsafe {
                    gemv_widen::<$b, false>(a, signed_a, panel, t1, t1, groups, acc, acc2)
                },
                (None, Some(t2)) => unsafe {
                    gemv_widen::<$b, true>(a, signed_a, panel, t1, t2, groups, acc, acc2)
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
/// AVX2; `a` holds `4 · groups` bytes and `panel` `groups` tiles of `BITS` bits.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_maddubs<const BITS: u32, const TWO: bool>(
    a: &[u8],
    panel: &[u8],
    t1: &[i8],
    t2: &[i8],
    groups: usize,
    depth: usize,
    acc: &mut [i32; 16],
    acc2: &mut [i32; 16],
) {
    let tb = tile_bytes(BitWidth::new(BITS).expect("2, 3, 4 or 8"));
    let (l1, l2) = (lut16(t1), lut16(t2));
    let ones = _mm256_set1_epi16(1);
    let mut c = [_mm256_setzero_si256(); 4];
    // The 32 products of one expanded vector pair, as i16 pair sums: [x, y] per table.
    let step = |g: usize| {
        // SAFETY: g < groups: 4 bytes of `a` and one tile of `panel` are in bounds.
        let (av, p) = unsafe {
            (
                _mm256_set1_epi32((a.as_ptr().add(g * 4) as *const i32).read_unaligned()),
                panel.as_ptr().add(g * tb),
            )
        };
        // SAFETY: `p` points at a whole tile.
        let (x, y) = unsafe { expand_tile::<BITS>(p, l1) };
        let mut out = [
            _mm256_maddubs_epi16(av, x),
            _mm256_maddubs_epi16(av, y),
            x,
            y,
        ];
        if TWO {
            // SAFETY: as above.
            let (x, y) = unsafe { expand_tile::<BITS>(p, l2) };
            out[2] = _mm256_maddubs_epi16(av, x);
            out[3] = _mm256_maddubs_epi16(av, y);
        }
        out
    };
    let used = if TWO { 4 } else { 2 };
    if depth == 1 {
        for g in 0..groups {
            let s = step(g);
            for i in 0..used {
                c[i] = _mm256_add_epi32(c[i], _mm256_madd_epi16(s[i], ones));
            }
        }
    } else {
        for start in (0..groups).step_by(depth) {
            let mut s = [_mm256_setzero_si256(); 4];
            for g in start..(start + depth).min(groups) {
                let t = step(g);
                for i in 0..used {
                    s[i] = _mm256_add_epi16(s[i], t[i]);
                }
            }
            for i in 0..used {
                c[i] = _mm256_add_epi32(c[i], _mm256_madd_epi16(s[i], ones));
            }
        }
    }
    // SAFETY: acc and acc2 are 16 i32 = two vectors each.
    unsafe {
        _mm256_storeu_si256(acc.as_mut_ptr() as *mut __m256i, c[0]);
        _mm256_storeu_si256(acc.as_mut_ptr().add(8) as *mut __m256i, c[1]);
        if TWO {
            _mm256_storeu_si256(acc2.as_mut_ptr() as *mut __m256i, c[2]);
            _mm256_storeu_si256(acc2.as_mut_ptr().add(8) as *mut __m256i, c[3]);
        }
    }
}

/// # Safety
/// AVX2; `a` holds `4 · groups` bytes and `panel` `groups` tiles of `BITS` bits.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_widen<const BITS: u32, const TWO: bool>(
    a: &[u8],
    signed_a: bool,
    panel: &[u8],
    t1: &[i8],
    t2: &[i8],
    groups: usize,
    acc: &mut [i32; 16],
    acc2: &mut [i32; 16],
) {
    let tb = tile_bytes(BitWidth::new(BITS).expect("2, 3, 4 or 8"));
    let (l1, l2) = (lut16(t1), lut16(t2));
    let mut c = [[_mm256_setzero_si256(); 4]; 2];
    let lo = |v: __m256i| _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
    let hi = |v: __m256i| _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(v));
    for g in 0..groups {
        // SAFETY: g < groups: 4 bytes of `a` and one tile of `panel` are in bounds.
        let (av, p) = unsafe {
            (
                widen_a(a.as_ptr().add(g * 4), signed_a),
                panel.as_ptr().add(g * tb),
            )
        };
        for (t, ct) in c.iter_mut().enumerate().take(if TWO { 2 } else { 1 }) {
            // SAFETY: `p` points at a whole tile.
            let (x, y) = unsafe { expand_tile::<BITS>(p, if t == 0 { l1 } else { l2 }) };
            ct[0] = _mm256_add_epi32(ct[0], _mm256_madd_epi16(av, lo(x)));
            ct[1] = _mm256_add_epi32(ct[1], _mm256_madd_epi16(av, hi(x)));
            ct[2] = _mm256_add_epi32(ct[2], _mm256_madd_epi16(av, lo(y)));
            ct[3] = _mm256_add_epi32(ct[3], _mm256_madd_epi16(av, hi(y)));
        }
    }
    for (t, out) in [acc, acc2]
        .into_iter()
        .enumerate()
        .take(if TWO { 2 } else { 1 })
    {
        // SAFETY: each output is 16 i32 = two vectors.
        unsafe {
            _mm256_storeu_si256(
                out.as_mut_ptr() as *mut __m256i,
                pair_sums(c[t][0], c[t][1]),
            );
            _mm256_storeu_si256(
                out.as_mut_ptr().add(8) as *mut __m256i,
                pair_sums(c[t][2], c[t][3]),
            );
        }
    }
}

/// Depthwise sums of the first `blocks` blocks of 16 channels: `s[c] = sum over (wi, ai) in
/// offs of a[ai + c] · v[wi + c]` for `c < 16 · blocks`. Activations (u8, or i8 when `signed`)
/// and weights are taken as i16; taps go in pairs, interleaved so that one `vpmaddwd` adds two
/// taps' products (each at most 255 · 128 in magnitude) into i32: exact.
///
/// # Safety
/// The CPU must support AVX2. (Bounds are checked here.)
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn depthwise_blocks(
    a: &[u8],
    offs: &[(usize, usize)],
    blocks: usize,
    v: &[i16],
    signed: bool,
    s: &mut [i32],
) {
    let span = blocks * 16;
    assert!(s.len() >= span);
    for &(wi, ai) in offs {
        assert!(wi + span <= v.len() && ai + span <= a.len());
    }
    let load = |(wi, ai): (usize, usize), c0: usize| {
        // SAFETY: c0 + 16 <= span: 16 bytes at `ai + c0` and 16 i16 at `wi + c0` are in
        // bounds (asserted above).
        unsafe {
            let x = _mm_loadu_si128(a.as_ptr().add(ai + c0) as *const __m128i);
            let av = if signed {
                _mm256_cvtepi8_epi16(x)
            } else {
                _mm256_cvtepu8_epi16(x)
            };
            (
                av,
                _mm256_loadu_si256(v.as_ptr().add(wi + c0) as *const __m256i),
            )
        }
    };
    for c0 in (0..span).step_by(16) {
        // lo: channels 0-3 and 8-11, hi: 4-7 and 12-15 (the in-lane order of unpack).
        let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let mut pairs = offs.chunks_exact(2);
        for p in &mut pairs {
            let (a0, w0) = load(p[0], c0);
            let (a1, w1) = load(p[1], c0);
            lo = _mm256_add_epi32(
                lo,
                _mm256_madd_epi16(_mm256_unpacklo_epi16(a0, a1), _mm256_unpacklo_epi16(w0, w1)),
            );
            hi = _mm256_add_epi32(
                hi,
                _mm256_madd_epi16(_mm256_unpackhi_epi16(a0, a1), _mm256_unpackhi_epi16(w0, w1)),
            );
        }
        if let [p] = pairs.remainder() {
            let (a0, w0) = load(*p, c0);
            let z = _mm256_setzero_si256();
            lo = _mm256_add_epi32(
                lo,
                _mm256_madd_epi16(_mm256_unpacklo_epi16(a0, z), _mm256_unpacklo_epi16(w0, z)),
            );
            hi = _mm256_add_epi32(
                hi,
                _mm256_madd_epi16(_mm256_unpackhi_epi16(a0, z), _mm256_unpackhi_epi16(w0, z)),
            );
        }
        // SAFETY: c0 + 16 <= span <= s.len() (asserted above).
        unsafe {
            let o = s.as_mut_ptr().add(c0) as *mut __m256i;
            _mm256_storeu_si256(o, _mm256_permute2x128_si256::<0x20>(lo, hi));
            _mm256_storeu_si256(o.add(1), _mm256_permute2x128_si256::<0x31>(lo, hi));
        }
    }
}
