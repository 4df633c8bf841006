//! A portable model of the AVX-512 intrinsics the VNNI kernels use, with the names and
//! signatures of `core::arch::x86_64`, so the kernels' source (written once, in the
//! `vnni_kernels!` macro of [`super::avx512`]) also compiles against this module and its
//! blocking, tails and code expansion are tested bit for bit on CPUs without AVX-512.
//!
//! Each function follows the operation pseudo-code of Intel's intrinsics guide for that
//! instruction; masked loads never touch bytes whose mask bit is clear, like the hardware.
//! Test-only: the real instructions run through `core::arch` wherever the CPU has them.

#![allow(non_camel_case_types)]

/// Model of a 512-bit integer register: 64 bytes, byte 0 = the least significant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(64))]
pub struct __m512i([u8; 64]);

/// A 64-bit byte mask, as in `core::arch`.
pub type __mmask64 = u64;

impl __m512i {
    fn dword(&self, j: usize) -> u32 {
        u32::from_le_bytes(self.0[4 * j..4 * j + 4].try_into().expect("4 bytes"))
    }

    fn from_dwords(f: impl Fn(usize) -> u32) -> Self {
        let mut out = [0u8; 64];
        for j in 0..16 {
            out[4 * j..4 * j + 4].copy_from_slice(&f(j).to_le_bytes());
        }
        Self(out)
    }

    fn from_bytes(f: impl Fn(usize) -> u8) -> Self {
        Self(core::array::from_fn(f))
    }
}

pub fn _mm512_setzero_si512() -> __m512i {
    __m512i([0; 64])
}

pub fn _mm512_set1_epi8(a: i8) -> __m512i {
    __m512i([a as u8; 64])
}

pub fn _mm512_set1_epi32(a: i32) -> __m512i {
    __m512i::from_dwords(|_| a as u32)
}

#[allow(clippy::too_many_arguments)]
pub fn _mm512_setr_epi32(
    e0: i32,
    e1: i32,
    e2: i32,
    e3: i32,
    e4: i32,
    e5: i32,
    e6: i32,
    e7: i32,
    e8: i32,
    e9: i32,
    e10: i32,
    e11: i32,
    e12: i32,
    e13: i32,
    e14: i32,
    e15: i32,
) -> __m512i {
    let e = [
        e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15,
    ];
    __m512i::from_dwords(|j| e[j] as u32)
}

/// # Safety
/// 64 readable bytes at `mem_addr`.
pub unsafe fn _mm512_loadu_si512(mem_addr: *const __m512i) -> __m512i {
    // SAFETY: caller contract; `read_unaligned` has no alignment requirement.
    unsafe { (mem_addr as *const [u8; 64]).read_unaligned().into() }
}

/// # Safety
/// Byte `i` at `mem_addr` readable wherever bit `i` of `k` is set (others are not read).
pub unsafe fn _mm512_maskz_loadu_epi8(k: __mmask64, mem_addr: *const i8) -> __m512i {
    __m512i::from_bytes(|i| {
        if k >> i & 1 == 1 {
            // SAFETY: caller contract for set mask bits.
            unsafe { *(mem_addr.add(i) as *const u8) }
        } else {
            0
        }
    })
}

/// # Safety
/// 64 writable bytes at `mem_addr`.
pub unsafe fn _mm512_storeu_si512(mem_addr: *mut __m512i, a: __m512i) {
    // SAFETY: caller contract.
    unsafe { (mem_addr as *mut [u8; 64]).write_unaligned(a.0) }
}

impl From<[u8; 64]> for __m512i {
    fn from(b: [u8; 64]) -> Self {
        Self(b)
    }
}

/// `vshufi64x2`: 128-bit lanes 0-1 from `a`, 2-3 from `b`, each chosen by 2 bits of `MASK`.
pub fn _mm512_shuffle_i64x2<const MASK: i32>(a: __m512i, b: __m512i) -> __m512i {
    __m512i::from_bytes(|i| {
        let lane = i / 16;
        let sel = (MASK as usize >> (2 * lane)) & 3;
        let src = if lane < 2 { &a } else { &b };
        src.0[sel * 16 + i % 16]
    })
}

/// `vpsrlvd`: per-dword logical right shift; counts above 31 give 0.
pub fn _mm512_srlv_epi32(a: __m512i, count: __m512i) -> __m512i {
    __m512i::from_dwords(|j| {
        let c = count.dword(j);
        if c > 31 {
            0
        } else {
            a.dword(j) >> c
        }
    })
}

pub fn _mm512_and_si512(a: __m512i, b: __m512i) -> __m512i {
    __m512i::from_bytes(|i| a.0[i] & b.0[i])
}

pub fn _mm512_xor_si512(a: __m512i, b: __m512i) -> __m512i {
    __m512i::from_bytes(|i| a.0[i] ^ b.0[i])
}

/// `vpshufb`: within each 128-bit lane, byte `i` = 0 if bit 7 of `b[i]` is set, else
/// `a[lane base + (b[i] & 15)]`.
pub fn _mm512_shuffle_epi8(a: __m512i, b: __m512i) -> __m512i {
    __m512i::from_bytes(|i| {
        let c = b.0[i];
        if c & 0x80 != 0 {
            0
        } else {
            a.0[(i & !15) + (c & 15) as usize]
        }
    })
}

/// `vpaddb` with merge masking: `a + b` (wrapping) where `k` is set, `src` elsewhere.
pub fn _mm512_mask_add_epi8(src: __m512i, k: __mmask64, a: __m512i, b: __m512i) -> __m512i {
    __m512i::from_bytes(|i| {
        if k >> i & 1 == 1 {
            a.0[i].wrapping_add(b.0[i])
        } else {
            src.0[i]
        }
    })
}

pub fn _mm512_add_epi32(a: __m512i, b: __m512i) -> __m512i {
    __m512i::from_dwords(|j| a.dword(j).wrapping_add(b.dword(j)))
}

pub fn _mm512_sub_epi32(a: __m512i, b: __m512i) -> __m512i {
    __m512i::from_dwords(|j| a.dword(j).wrapping_sub(b.dword(j)))
}

/// `vpdpbusd`: per dword, `src + sum of 4 products (unsigned byte of a) x (signed byte of b)`,
/// wrapping (the non-saturating form).
pub fn _mm512_dpbusd_epi32(src: __m512i, a: __m512i, b: __m512i) -> __m512i {
    __m512i::from_dwords(|j| {
        let dot: i32 = (0..4)
            .map(|t| a.0[4 * j + t] as i32 * b.0[4 * j + t] as i8 as i32)
            .sum();
        src.dword(j).wrapping_add(dot as u32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_matches_hand_computed_values() {
        let a = __m512i::from_bytes(|i| i as u8);
        let b = __m512i::from_bytes(|i| if i % 2 == 0 { 0xff } else { 2 });
        let d = _mm512_dpbusd_epi32(_mm512_set1_epi32(10), a, b);
        // Dword 0: 10 + 0·(-1) + 1·2 + 2·(-1) + 3·2 = 16.
        assert_eq!(d.dword(0), 16);
        // Dword 15: 10 - 60 + 2·61 - 62 + 2·63 = 136.
        assert_eq!(d.dword(15), 136);
        let s = _mm512_shuffle_i64x2::<0b01_00_01_00>(a, a);
        assert_eq!((s.0[16], s.0[32], s.0[48]), (16, 0, 16));
        let p = _mm512_shuffle_epi8(a, _mm512_set1_epi8(3));
        assert_eq!((p.0[0], p.0[17], p.0[63]), (3, 19, 51));
        let z = _mm512_shuffle_epi8(a, _mm512_set1_epi8(-1));
        assert_eq!(z, _mm512_setzero_si512());
        let m = _mm512_mask_add_epi8(a, 0b10, a, _mm512_set1_epi8(4));
        assert_eq!((m.0[0], m.0[1]), (0, 5));
        let r = _mm512_srlv_epi32(_mm512_set1_epi32(-1), _mm512_set1_epi32(40));
        assert_eq!(r, _mm512_setzero_si512());
        let bytes = [7u8; 3];
        // SAFETY: mask bits 0..3 cover exactly the 3 readable bytes.
        let l = unsafe { _mm512_maskz_loadu_epi8(0b111, bytes.as_ptr() as *const i8) };
        assert_eq!((l.0[2], l.0[3]), (7, 0));
    }
}
