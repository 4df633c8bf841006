//! Every kernel variant this CPU runs equals the scalar reference bit for bit, on random shapes
//! (M, N, K of 1, odd, not multiples of the tile), every weight form and width, unsigned and
//! signed activations, with and without bias and ReLU; and the integer result equals the float
//! fake-quant result of asq-core within a stated tolerance.

use asq_core::quant::{self, IntGrid, Steps};
use asq_core::{BitWidth, LevelSet, QuantRange};
use asq_kernels::reference::gemm_reference;
use asq_kernels::{describe, gemm_with, Epilogue, Isa, PackedWeights, QuantActivations};
use proptest::prelude::*;

/// Weight kinds: (name, builder of the packed matrix from float weights).
#[derive(Debug, Clone, Copy)]
enum Kind {
    Post(u32),
    PostInt(u32, u8),
    Pot(u32),
    Apot(u32),
    Uniform(u32),
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        (2u32..=4).prop_map(Kind::Post),
        (2u32..=4, prop_oneof![Just(64u8), Just(127u8)]).prop_map(|(b, g)| Kind::PostInt(b, g)),
        (2u32..=4).prop_map(Kind::Pot),
        (2u32..=4).prop_map(Kind::Apot),
        prop_oneof![Just(2u32), Just(3), Just(4), Just(5), Just(8)].prop_map(Kind::Uniform),
    ]
}

fn act_range() -> impl Strategy<Value = QuantRange> {
    prop_oneof![
        (2u32..=8).prop_map(|b| QuantRange::unsigned(b).unwrap()),
        prop_oneof![Just(4u32), Just(8)].prop_map(|b| QuantRange::signed(b).unwrap()),
    ]
}

/// Deterministic values in [-1, 1).
fn pseudo(seed: u64, i: usize) -> f32 {
    let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Packed weights plus their float fake-quant values.
fn weights(kind: Kind, n: usize, k: usize, seed: u64) -> (PackedWeights, Vec<f32>) {
    let w: Vec<f32> = (0..n * k).map(|i| pseudo(seed, i) * 0.8).collect();
    let alphas: Vec<f32> = (0..n)
        .map(|c| 0.3 + 0.5 * pseudo(seed ^ 1, c).abs())
        .collect();
    let mut fq = vec![0.0; n * k];
    let levels = |k: Kind| {
        let b = |x| BitWidth::new(x).unwrap();
        match k {
            Kind::Post(x) => LevelSet::post(b(x)),
            Kind::PostInt(x, g) => LevelSet::post_int(b(x), g),
            Kind::Pot(x) => LevelSet::pot(b(x)),
            Kind::Apot(x) => LevelSet::apot(b(x)),
            Kind::Uniform(_) => unreachable!(),
        }
        .unwrap()
    };
    match kind {
        Kind::Uniform(bits) => {
            let r = QuantRange::signed(bits).unwrap();
            let steps: Vec<f32> = alphas.iter().map(|a| a / r.max() as f32).collect();
            let mut codes = vec![0u8; n * k];
            quant::encode(&IntGrid::new(r), &w, Steps::PerRow(&steps), &mut codes).unwrap();
            quant::fake_quant(&IntGrid::new(r), &w, Steps::PerRow(&steps), &mut fq).unwrap();
            (
                PackedWeights::from_uniform_codes(&codes, n, k, r, &steps).unwrap(),
                fq,
            )
        }
        other => {
            let l = levels(other);
            quant::fake_quant(&l, &w, Steps::PerRow(&alphas), &mut fq).unwrap();
            (
                PackedWeights::quantize_levels(&w, n, k, &l, &alphas).unwrap(),
                fq,
            )
        }
    }
}

fn activations(range: QuantRange, m: usize, k: usize, seed: u64) -> (QuantActivations, Vec<f32>) {
    let x: Vec<f32> = (0..m * k).map(|i| pseudo(seed ^ 2, i) * 3.0).collect();
    let betas: Vec<f32> = (0..m).map(|r| 0.5 + pseudo(seed ^ 3, r).abs()).collect();
    let step = 3.0 / range.max() as f32;
    let steps = Steps::Scaled {
        step,
        betas: &betas,
    };
    let mut fq = vec![0.0; m * k];
    quant::fake_quant(&IntGrid::new(range), &x, steps, &mut fq).unwrap();
    (
        QuantActivations::quantize(&x, m, k, range, steps).unwrap(),
        fq,
    )
}

fn check_all_variants(
    a: &QuantActivations,
    w: &PackedWeights,
    epi: &Epilogue<'_>,
) -> Result<Vec<f32>, TestCaseError> {
    let mut expect = vec![0.0f32; a.rows() * w.rows()];
    gemm_reference(a, w, epi, &mut expect).unwrap();
    for isa in Isa::available_all() {
        let mut got = vec![f32::NAN; expect.len()];
        gemm_with(isa, a, w, epi, &mut got).unwrap();
        for (i, (g, e)) in got.iter().zip(&expect).enumerate() {
            prop_assert_eq!(
                g.to_bits(),
                e.to_bits(),
                "{} ({}) differs at {}: {} vs {}",
                isa.name(),
                describe(isa, a, w).unwrap(),
                i,
                g,
                e
            );
        }
    }
    Ok(expect)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]

    #[test]
    fn every_variant_matches_the_reference(
        m in prop_oneof![Just(1usize), 1usize..12, 12usize..40],
        n in prop_oneof![Just(1usize), 1usize..40, 40usize..100],
        k in prop_oneof![Just(1usize), 1usize..20, 20usize..200],
        kind in kind(),
        range in act_range(),
        seed in any::<u64>(),
        bias in any::<bool>(),
        relu in any::<bool>(),
        residual in any::<bool>(),
    ) {
        let (w, _) = weights(kind, n, k, seed);
        let (a, _) = activations(range, m, k, seed);
        let b: Vec<f32> = (0..n).map(|c| pseudo(seed ^ 5, c)).collect();
        let res: Vec<f32> = (0..m * n).map(|i| pseudo(seed ^ 6, i)).collect();
        let epi = Epilogue { bias: bias.then_some(&b[..]), residual: residual.then_some(&res[..]), relu };
        check_all_variants(&a, &w, &epi)?;
    }

    #[test]
    fn integer_result_equals_float_fake_quant(
        m in 1usize..9, n in 1usize..30, k in 1usize..150, kind in kind(), range in act_range(), seed in any::<u64>(),
    ) {
        let (w, wq) = weights(kind, n, k, seed);
        let (a, aq) = activations(range, m, k, seed);
        let out = check_all_variants(&a, &w, &Epilogue::default())?;
        for r in 0..m {
            for c in 0..n {
                let (mut dot, mut mag) = (0.0f64, 0.0f64);
                for kk in 0..k {
                    let t = aq[r * k + kk] as f64 * wq[c * k + kk] as f64;
                    dot += t;
                    mag += t.abs();
                }
                // f32 rounding of the scales, levels and the final rescale: a few ulps of the
                // magnitude of the sum.
                let tol = 4e-6 * mag + 1e-30;
                prop_assert!((out[r * n + c] as f64 - dot).abs() <= tol, "[{r}, {c}] {} vs {dot} (tol {tol})", out[r * n + c]);
            }
        }
    }
}

#[test]
fn threaded_large_problem_matches_the_reference() {
    // Above the parallel threshold; run inside a two-thread pool so the split is exercised:
    // many panels (split by channels) and a single panel (split by rows).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for kind in [Kind::Post(4), Kind::PostInt(4, 64), Kind::Uniform(8)] {
        // 203 x 301 x 80 = 4.9M multiply-adds (one task per thread), x 300 = 18M (four per
        // thread); 16 x 450 x 600 = 4.3M with a single panel (split by rows).
        for (n, k, ms) in [(203, 301, &[1, 80, 300][..]), (16, 450, &[1, 600][..])] {
            let (w, _) = weights(kind, n, k, 11);
            for &m in ms {
                let (a, _) = activations(QuantRange::unsigned(8).unwrap(), m, k, 12);
                pool.install(|| {
                    check_all_variants(
                        &a,
                        &w,
                        &Epilogue {
                            relu: true,
                            ..Default::default()
                        },
                    )
                })
                .unwrap();
            }
        }
    }
}

#[test]
fn variants_that_ran() {
    let names: Vec<&str> = Isa::available_all().iter().map(|i| i.name()).collect();
    println!("kernel variants checked on this CPU: {}", names.join(", "));
    assert!(names.contains(&"scalar"));
}

#[test]
fn bad_operands_are_errors() {
    let (w, _) = weights(Kind::Post(4), 5, 7, 1);
    let (a, _) = activations(QuantRange::unsigned(8).unwrap(), 3, 6, 1);
    let mut out = vec![0.0; 15];
    assert!(gemm_with(Isa::Scalar, &a, &w, &Epilogue::default(), &mut out).is_err());
    let (a, _) = activations(QuantRange::unsigned(8).unwrap(), 3, 7, 1);
    assert!(gemm_with(Isa::Scalar, &a, &w, &Epilogue::default(), &mut out[..14]).is_err());
    let bias = [0.0; 4];
    assert!(gemm_with(
        Isa::Scalar,
        &a,
        &w,
        &Epilogue {
            bias: Some(&bias),
            ..Default::default()
        },
        &mut out
    )
    .is_err());
    let bias = [0.0, 0.0, f32::NAN, 0.0, 0.0];
    assert!(gemm_with(
        Isa::Scalar,
        &a,
        &w,
        &Epilogue {
            bias: Some(&bias),
            ..Default::default()
        },
        &mut out
    )
    .is_err());
    assert!(QuantActivations::quantize(
        &[0.0; 5],
        2,
        3,
        QuantRange::unsigned(8).unwrap(),
        Steps::PerRow(&[1.0, 1.0])
    )
    .is_err());
    assert!(QuantActivations::quantize(
        &[0.0; 6],
        2,
        3,
        QuantRange::unsigned(8).unwrap(),
        Steps::PerRow(&[1.0, 0.0])
    )
    .is_err());
}

#[test]
fn every_path_is_exercised_against_the_reference() {
    let u8r = QuantRange::unsigned(8).unwrap();
    let s8r = QuantRange::signed(8).unwrap();
    let u4r = QuantRange::unsigned(4).unwrap();
    let cases = [
        (Kind::PostInt(4, 64), u8r),
        (Kind::PostInt(3, 64), u8r),
        (Kind::PostInt(2, 64), u8r),
        (Kind::Post(4), u8r),
        (Kind::Post(3), u4r),
        (Kind::Uniform(8), u8r),
        (Kind::Uniform(8), s8r),
        (Kind::Uniform(4), s8r),
        (Kind::PostInt(4, 127), u8r),
        (Kind::Pot(4), u4r),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (i, (kind, range)) in cases.into_iter().enumerate() {
        for m in [1, 6] {
            let (w, _) = weights(kind, 37, 203, i as u64);
            let (a, _) = activations(range, m, 203, i as u64);
            check_all_variants(
                &a,
                &w,
                &Epilogue {
                    relu: false,
                    ..Default::default()
                },
            )
            .unwrap();
            for isa in Isa::available_all() {
                seen.insert(format!(
                    "{}:{}:w{}",
                    isa.name(),
                    describe(isa, &a, &w).unwrap(),
                    w.bits().get()
                ));
            }
        }
    }
    println!("paths checked: {seen:?}");
    if Isa::Avx2.available() {
        for must in [
            "avx2:avx2-maddubs-d1:w4",
            "avx2:avx2-maddubs-d1+gemv:w4",
            "avx2:avx2-maddubs-d1+gemv:w3",
            "avx2:avx2-maddubs-d32+gemv:w2",
            "avx2:avx2-maddubs-d8+gemv:w4",
            "avx2:avx2-widen:w8",
            "avx2:avx2-widen+gemv:w8",
            "avx2:avx2-widen+gemv:w4",
        ] {
            assert!(seen.contains(must), "{must} not exercised: {seen:?}");
        }
    }
    if Isa::Avx512Vnni.available() {
        for must in [
            "avx512-vnni:avx512-vnni:w4",
            "avx512-vnni:avx512-vnni:w8",
            "avx512-vnni:avx512-vnni+gemv:w2",
            "avx512-vnni:avx512-vnni+gemv:w3",
            "avx512-vnni:avx512-vnni+gemv:w4",
            "avx512-vnni:avx512-vnni+gemv:w8",
        ] {
            assert!(seen.contains(must), "{must} not exercised: {seen:?}");
        }
    }
}
