//! Machine peak probes: tight loops of independent multiply-adds that measure what one core can
//! do, so that kernel speeds can be read as a fraction of the limit measured in the same run.

use std::time::Instant;

/// Which peak was measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// `"peak-f32-fma"`, `"peak-int8-vnni"` (AVX-512 `vpdpbusd`), `"peak-int8-avx2"`
    /// (`vpmaddubsw` + `vpmaddwd` + `vpaddd`) or `"peak-f32-scalar"` where no SIMD variant runs.
    pub name: &'static str,
    /// Billions of operations per second (a multiply-add counts 2).
    pub gops: f64,
}

/// Runs `f(iters)` (which performs `ops_per_iter · iters` operations) for about `seconds` and
/// returns the best rate of a few repetitions.
fn best_rate(seconds: f64, ops_per_iter: f64, mut f: impl FnMut(u64) -> u64) -> f64 {
    let mut iters = 1u64 << 12;
    let mut sink = 0u64;
    loop {
        let t = Instant::now();
        sink = sink.wrapping_add(f(iters));
        if t.elapsed().as_secs_f64() > seconds / 20.0 || iters > 1 << 40 {
            break;
        }
        iters *= 2;
    }
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        sink = sink.wrapping_add(f(iters));
        best = best.max(ops_per_iter * iters as f64 / t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    best / 1e9
}

/// The single-thread f32 multiply-add peak of the best variant this CPU runs.
pub fn peak_f32(seconds: f64) -> Peak {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // 64 rounds of 10 independent 8-lane FMA chains per iteration: 64 x 160 flops.
        // SAFETY: AVX2 and FMA were detected just above.
        let gops = best_rate(seconds, 160.0 * 64.0, |n| unsafe { x86::fma_loop(n) });
        return Peak {
            name: "peak-f32-fma",
            gops,
        };
    }
    let gops = best_rate(seconds, 16.0, |n| {
        let mut acc = [1.0f32; 8];
        for _ in 0..n {
            for a in acc.iter_mut() {
                *a = std::hint::black_box(*a) * 0.999_99 + 1e-7;
            }
        }
        acc.iter().sum::<f32>() as u64
    });
    Peak {
        name: "peak-f32-scalar",
        gops,
    }
}

/// The single-thread int8 multiply-add peak (u8 x s8 into i32) of the best path this CPU runs,
/// or `None` without SIMD integer dot products.
pub fn peak_int8(seconds: f64) -> Option<Peak> {
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::Avx512Vnni.available() {
        // 64 rounds of 12 independent chains of 64 u8 x s8 products per iteration: 64 x 1536 ops.
        // SAFETY: AVX-512 F/BW/VNNI were detected just above.
        let gops = best_rate(seconds, 1536.0 * 64.0, |n| unsafe { x86::vnni_loop(n) });
        return Some(Peak {
            name: "peak-int8-vnni",
            gops,
        });
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // 64 rounds of 12 independent chains of 32 u8 x s8 products per iteration: 64 x 768 ops.
        // SAFETY: AVX2 was detected just above.
        let gops = best_rate(seconds, 768.0 * 64.0, |n| unsafe { x86::int8_loop(n) });
        return Some(Peak {
            name: "peak-int8-avx2",
            gops,
        });
    }
    let _ = seconds;
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma_loop(n: u64) -> u64 {
        let c = _mm256_set1_ps(1e-7);
        let mut a = [_mm256_set1_ps(1.0); 10];
        for _ in 0..n {
            // Opaque once per 64 iterations, so the compiler cannot fold the chains.
            let m = std::hint::black_box(_mm256_set1_ps(0.999_99));
            for _ in 0..64 {
                for x in a.iter_mut() {
                    *x = _mm256_fmadd_ps(*x, m, c);
                }
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in a {
            s = _mm256_add_ps(s, x);
        }
        _mm256_cvtss_f32(s) as u64
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn int8_loop(n: u64) -> u64 {
        let ones = _mm256_set1_epi16(1);
        // Each chain feeds its own accumulator bytes back in as activations, so nothing is
        // loop-invariant; 12 chains cover the multiply latency.
        let mut acc: [__m256i; 12] = core::array::from_fn(|i| _mm256_set1_epi32(i as i32 + 1));
        for _ in 0..n {
            let b = std::hint::black_box(_mm256_set1_epi8(-2));
            for _ in 0..64 {
                for x in acc.iter_mut() {
                    *x = _mm256_add_epi32(*x, _mm256_madd_epi16(_mm256_maddubs_epi16(*x, b), ones));
                }
            }
        }
        let mut s = _mm256_setzero_si256();
        for x in acc {
            s = _mm256_add_epi32(s, x);
        }
        _mm256_extract_epi32::<0>(s) as u64
    }

    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn vnni_loop(n: u64) -> u64 {
        // As `int8_loop`: every chain feeds its accumulator back in as the unsigned operand.
        let mut acc: [__m512i; 12] = core::array::from_fn(|i| _mm512_set1_epi32(i as i32 + 1));
        for _ in 0..n {
            let b = std::hint::black_box(_mm512_set1_epi8(-2));
            for _ in 0..64 {
                for x in acc.iter_mut() {
                    *x = _mm512_dpbusd_epi32(*x, *x, b);
                }
            }
        }
        let mut s = _mm512_setzero_si512();
        for x in acc {
            s = _mm512_add_epi32(s, x);
        }
        _mm512_reduce_add_epi32(s) as u64
    }
}
