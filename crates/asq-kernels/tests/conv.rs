//! Convolution, depthwise convolution and pooling against naive loops over the codes.

#![allow(clippy::too_many_arguments, clippy::needless_range_loop)] // naive reference loops mirror the math

use asq_core::quant::Steps;
use asq_core::{BitWidth, LevelSet, QuantRange};
use asq_kernels::conv::{
    conv2d, conv2d_with, depthwise_conv2d, depthwise_conv2d_with, global_avg_pool, im2col,
    im2col_rows, max_pool2d, Conv2dShape, DepthwiseWeights, ImplicitConv,
};
use asq_kernels::reference::gemm_reference;
use asq_kernels::suite::pseudo;
use asq_kernels::{Epilogue, Isa, PackedWeights, QuantActivations, WeightForm};
use proptest::prelude::*;

fn input(shape: &Conv2dShape, seed: u64, signed: bool) -> QuantActivations {
    let len = shape.in_h * shape.in_w * shape.in_c;
    let x: Vec<f32> = (0..shape.batch * len)
        .map(|i| pseudo(seed, i) * 2.0 + if signed { 0.0 } else { 1.0 })
        .collect();
    let betas: Vec<f32> = (0..shape.batch)
        .map(|n| 0.5 + pseudo(seed ^ 1, n).abs())
        .collect();
    let range = if signed {
        QuantRange::signed(8).unwrap()
    } else {
        QuantRange::unsigned(8).unwrap()
    };
    QuantActivations::quantize(
        &x,
        shape.batch,
        len,
        range,
        Steps::Scaled {
            step: 0.02,
            betas: &betas,
        },
    )
    .unwrap()
}

fn weights(n: usize, k: usize, seed: u64, exact: bool) -> PackedWeights {
    let w: Vec<f32> = (0..n * k).map(|i| pseudo(seed ^ 9, i)).collect();
    let b = BitWidth::new(4).unwrap();
    let levels = if exact {
        LevelSet::post(b).unwrap()
    } else {
        LevelSet::post_int(b, 64).unwrap()
    };
    PackedWeights::quantize_levels(&w, n, k, &levels, &vec![0.7; n]).unwrap()
}

/// Integer value(s) of weight (row, col).
fn wval(w: &PackedWeights, r: usize, c: usize) -> (i32, i32) {
    let code = w.code(r, c) as usize;
    match w.form() {
        WeightForm::Int8 { table } => (table[code] as i32, 0),
        WeightForm::PostExact { even, odd } => (even[code] as i32, odd[code] as i32),
    }
}

fn finish(
    w: &PackedWeights,
    s1: i32,
    s2: i32,
    sa: f32,
    c: usize,
    bias: f32,
    res: f32,
    relu: bool,
) -> f32 {
    let acc = match w.form() {
        WeightForm::Int8 { .. } => s1 as f32,
        WeightForm::PostExact { .. } => s1 as f32 + s2 as f32 * std::f32::consts::FRAC_1_SQRT_2,
    };
    let v = acc * (sa * w.scales()[c]) + bias + res;
    if relu {
        v.max(0.0)
    } else {
        v
    }
}

fn shape() -> impl Strategy<Value = Conv2dShape> {
    (
        1usize..3,
        1usize..9,
        1usize..9,
        1usize..7,
        1usize..4,
        1usize..4,
        1usize..3,
        0usize..2,
    )
        .prop_filter_map(
            "window fits",
            |(batch, in_h, in_w, in_c, kh, kw, stride, pad)| {
                let s = Conv2dShape {
                    batch,
                    in_h,
                    in_w,
                    in_c,
                    kh,
                    kw,
                    stride,
                    pad,
                };
                (in_h + 2 * pad >= kh && in_w + 2 * pad >= kw).then_some(s)
            },
        )
}

/// The code at (n, y, x, c) with padding as 0.
fn code(x: &QuantActivations, s: &Conv2dShape, n: usize, y: isize, xx: isize, c: usize) -> i32 {
    if y < 0 || xx < 0 || y as usize >= s.in_h || xx as usize >= s.in_w {
        0
    } else {
        x.code(n, (y as usize * s.in_w + xx as usize) * s.in_c + c)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn conv2d_matches_naive(s in shape(), out_c in 1usize..20, seed in any::<u64>(), exact in any::<bool>(), signed in any::<bool>(), relu in any::<bool>()) {
        let x = input(&s, seed, signed);
        let k = s.kh * s.kw * s.in_c;
        let w = weights(out_c, k, seed, exact);
        let bias: Vec<f32> = (0..out_c).map(|c| pseudo(seed ^ 4, c)).collect();
        let (oh, ow) = (s.out_h(), s.out_w());
        let res: Vec<f32> = (0..s.batch * oh * ow * out_c).map(|i| pseudo(seed ^ 5, i)).collect();
        let mut out = vec![0.0; res.len()];
        conv2d(&x, &w, &s, &Epilogue { bias: Some(&bias), residual: Some(&res), relu }, &mut out).unwrap();
        for n in 0..s.batch { for oy in 0..oh { for ox in 0..ow { for co in 0..out_c {
            let (mut s1, mut s2) = (0, 0);
            for ky in 0..s.kh { for kx in 0..s.kw { for ci in 0..s.in_c {
                let y = (oy * s.stride + ky) as isize - s.pad as isize;
                let xx = (ox * s.stride + kx) as isize - s.pad as isize;
                let a = code(&x, &s, n, y, xx, ci);
                let (v1, v2) = wval(&w, co, (ky * s.kw + kx) * s.in_c + ci);
                s1 += a * v1;
                s2 += a * v2;
            }}}
            let i = ((n * oh + oy) * ow + ox) * out_c + co;
            let e = finish(&w, s1, s2, x.scales()[n], co, bias[co], res[i], relu);
            prop_assert_eq!(out[i].to_bits(), e.to_bits(), "at {}: {} vs {}", i, out[i], e);
        }}}}
    }

    #[test]
    fn depthwise_matches_naive(s in shape(), seed in any::<u64>(), exact in any::<bool>(), signed in any::<bool>()) {
        let x = input(&s, seed, signed);
        let w = weights(s.in_c, s.kh * s.kw, seed, exact);
        let (oh, ow) = (s.out_h(), s.out_w());
        let mut out = vec![0.0; s.batch * oh * ow * s.in_c];
        depthwise_conv2d(&x, &w, &s, &Epilogue { relu: true, ..Default::default() }, &mut out).unwrap();
        for n in 0..s.batch { for oy in 0..oh { for ox in 0..ow { for c in 0..s.in_c {
            let (mut s1, mut s2) = (0, 0);
            for ky in 0..s.kh { for kx in 0..s.kw {
                let y = (oy * s.stride + ky) as isize - s.pad as isize;
                let xx = (ox * s.stride + kx) as isize - s.pad as isize;
                let a = code(&x, &s, n, y, xx, c);
                let (v1, v2) = wval(&w, c, ky * s.kw + kx);
                s1 += a * v1;
                s2 += a * v2;
            }}
            let i = ((n * oh + oy) * ow + ox) * s.in_c + c;
            let e = finish(&w, s1, s2, x.scales()[n], c, 0.0, 0.0, true);
            prop_assert_eq!(out[i].to_bits(), e.to_bits());
        }}}}
    }

    /// Every variant on MobileNet-like shapes: channel counts around and above the 16-channel
    /// block (odd ones too), full-range int8 weights (-128 included), both activation kinds,
    /// bias, residual and ReLU.
    #[test]
    fn depthwise_variants_match_naive(
        batch in 1usize..3, hw in 1usize..8, in_c in prop_oneof![1usize..20, 20usize..70],
        k in prop_oneof![Just(1usize), Just(3), Just(5)], stride in 1usize..3, pad in 0usize..3,
        form in 0u8..3, seed in any::<u64>(), signed in any::<bool>(), relu in any::<bool>(),
    ) {
        let s = Conv2dShape { batch, in_h: hw, in_w: hw + 1, in_c, kh: k, kw: k, stride, pad };
        prop_assume!(hw + 2 * pad >= k);
        let x = input(&s, seed, signed);
        let taps = k * k;
        let w = match form {
            0 | 1 => weights(in_c, taps, seed, form == 0),
            _ => {
                let r = QuantRange::signed(8).unwrap();
                let codes: Vec<u8> = (0..in_c * taps).map(|i| (pseudo(seed ^ 7, i) * 128.0) as i8 as u8).collect();
                PackedWeights::from_uniform_codes(&codes, in_c, taps, r, &vec![0.01; in_c]).unwrap()
            }
        };
        let (oh, ow) = (s.out_h(), s.out_w());
        let len = batch * oh * ow * in_c;
        let bias: Vec<f32> = (0..in_c).map(|c| pseudo(seed ^ 4, c)).collect();
        let res: Vec<f32> = (0..len).map(|i| pseudo(seed ^ 5, i)).collect();
        let epi = Epilogue { bias: Some(&bias), residual: Some(&res), relu };
        let mut expect = vec![0.0f32; len];
        for n in 0..batch { for oy in 0..oh { for ox in 0..ow { for c in 0..in_c {
            let (mut s1, mut s2) = (0, 0);
            for ky in 0..k { for kx in 0..k {
                let y = (oy * stride + ky) as isize - pad as isize;
                let xx = (ox * stride + kx) as isize - pad as isize;
                let a = code(&x, &s, n, y, xx, c);
                let (v1, v2) = wval(&w, c, ky * k + kx);
                s1 += a * v1;
                s2 += a * v2;
            }}
            let i = ((n * oh + oy) * ow + ox) * in_c + c;
            expect[i] = finish(&w, s1, s2, x.scales()[n], c, bias[c], res[i], relu);
        }}}}
        for isa in Isa::available_all() {
            let mut out = vec![f32::NAN; len];
            let dw = DepthwiseWeights::new(&w, k, k).unwrap();
            depthwise_conv2d_with(isa, &x, &dw, &s, &epi, &mut out).unwrap();
            for (i, (o, e)) in out.iter().zip(&expect).enumerate() {
                prop_assert_eq!(o.to_bits(), e.to_bits(), "{} at {}: {} vs {}", isa.name(), i, o, e);
            }
        }
    }

    /// The implicit convolution (no im2col; `KW·C` a multiple of 4) on every variant of this
    /// CPU equals the reference GEMM on im2col's rows bit for bit: odd widths (tiles cut at
    /// output-row ends), strides, padding, channel tails over several panels, 2-8-bit and exact
    /// POST weights, both activation kinds. Names the variants it ran.
    #[test]
    fn implicit_conv_matches_im2col_on_every_variant(
        batch in 1usize..3, h in 1usize..10, wd in 1usize..19, cq in 1usize..10,
        k in prop_oneof![Just(1usize), Just(3)], stride in 1usize..3, pad in 0usize..3,
        out_c in prop_oneof![1usize..17, 17usize..70], form in 0u8..3,
        seed in any::<u64>(), signed in any::<bool>(), relu in any::<bool>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let c = 4 * cq;
        prop_assume!(h + 2 * pad >= k && wd + 2 * pad >= k);
        let s = Conv2dShape { batch, in_h: h, in_w: wd, in_c: c, kh: k, kw: k, stride, pad };
        prop_assert!(ImplicitConv::applies(&s));
        let x = input(&s, seed, signed);
        let kk = k * k * c;
        let w = match form {
            0 | 1 => weights(out_c, kk, seed, form == 0),
            _ => {
                let r = QuantRange::signed(8).unwrap();
                let codes: Vec<u8> = (0..out_c * kk).map(|i| (pseudo(seed ^ 7, i) * 128.0) as i8 as u8).collect();
                PackedWeights::from_uniform_codes(&codes, out_c, kk, r, &vec![0.01; out_c]).unwrap()
            }
        };
        let m = batch * s.out_h() * s.out_w();
        let bias: Vec<f32> = (0..out_c).map(|c| pseudo(seed ^ 4, c)).collect();
        let res: Vec<f32> = (0..m * out_c).map(|i| pseudo(seed ^ 5, i)).collect();
        let epi = Epilogue { bias: Some(&bias), residual: Some(&res), relu };
        let mut expect = vec![0.0f32; m * out_c];
        gemm_reference(&im2col(&x, &s).unwrap(), &w, &epi, &mut expect).unwrap();
        let input = ImplicitConv::new(&x, &s).unwrap();
        for isa in Isa::available_all() {
            let mut out = vec![f32::NAN; m * out_c];
            input.conv2d_with(isa, &w, &epi, &mut out).unwrap();
            for (i, (o, e)) in out.iter().zip(&expect).enumerate() {
                prop_assert_eq!(o.to_bits(), e.to_bits(), "{} at {}: {} vs {}", isa.name(), i, o, e);
            }
            let mut out2 = vec![f32::NAN; m * out_c];
            conv2d_with(isa, &x, &w, &s, &epi, &mut out2).unwrap();
            prop_assert_eq!(&out, &out2);
            // Split by output rows (as the engine's threads do): the same bits per output.
            let at = cut.index(m + 1);
            let mut parts = vec![f32::NAN; m * out_c];
            let (lo, hi) = parts.split_at_mut(at * out_c);
            let (r_lo, r_hi) = res.split_at(at * out_c);
            input.conv2d_rows_with(isa, &w, 0..at, &Epilogue { residual: Some(r_lo), ..epi }, lo).unwrap();
            input.conv2d_rows_with(isa, &w, at..m, &Epilogue { residual: Some(r_hi), ..epi }, hi).unwrap();
            prop_assert!(parts.iter().zip(&expect).all(|(o, e)| o.to_bits() == e.to_bits()), "{} split at {}", isa.name(), at);
        }
        let mut none = vec![0.0f32; out_c];
        prop_assert!(input.conv2d_rows_with(Isa::Scalar, &w, m..m + 1, &epi, &mut none).is_err());
    }

    #[test]
    fn pooling_matches_naive(s in shape(), seed in any::<u64>(), signed in any::<bool>()) {
        let s = Conv2dShape { pad: 0, ..s };
        prop_assume!(s.in_h >= s.kh && s.in_w >= s.kw);
        let x = input(&s, seed, signed);
        let p = max_pool2d(&x, &s).unwrap();
        let (oh, ow) = (s.out_h(), s.out_w());
        for n in 0..s.batch {
            prop_assert_eq!(p.scales()[n], x.scales()[n]);
            for oy in 0..oh { for ox in 0..ow { for c in 0..s.in_c {
                let mut best = i32::MIN;
                for ky in 0..s.kh { for kx in 0..s.kw {
                    best = best.max(code(&x, &s, n, (oy * s.stride + ky) as isize, (ox * s.stride + kx) as isize, c));
                }}
                prop_assert_eq!(p.code(n, (oy * ow + ox) * s.in_c + c), best);
            }}}
        }
        let mut g = vec![0.0; s.batch * s.in_c];
        global_avg_pool(&x, s.in_h, s.in_w, s.in_c, &mut g).unwrap();
        for n in 0..s.batch { for c in 0..s.in_c {
            let sum: i64 = (0..s.in_h * s.in_w).map(|p| x.code(n, p * s.in_c + c) as i64).sum();
            prop_assert_eq!(g[n * s.in_c + c], sum as f32 * x.scales()[n] / (s.in_h * s.in_w) as f32);
        }}
    }
}

#[test]
fn im2col_rows_keep_their_sample_scale_and_bad_shapes_fail() {
    let s = Conv2dShape {
        batch: 2,
        in_h: 3,
        in_w: 3,
        in_c: 2,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    };
    let x = input(&s, 3, false);
    let cols = im2col(&x, &s).unwrap();
    assert_eq!((cols.rows(), cols.cols()), (18, 18));
    // Any row range is those rows of the whole (codes and scales).
    for (a, b) in [(0, 1), (3, 12), (8, 18), (17, 18)] {
        let part = im2col_rows(&x, &s, a..b).unwrap();
        assert_eq!(part.rows(), b - a);
        for r in a..b {
            assert_eq!(part.scales()[r - a], cols.scales()[r]);
            for k in 0..18 {
                assert_eq!(part.code(r - a, k), cols.code(r, k), "row {r} col {k}");
            }
        }
    }
    assert!(im2col_rows(&x, &s, 5..5).is_err() && im2col_rows(&x, &s, 17..19).is_err());
    assert!(cols.scales()[..9].iter().all(|&v| v == x.scales()[0]));
    assert!(cols.scales()[9..].iter().all(|&v| v == x.scales()[1]));
    let w = weights(4, 17, 1, false);
    let mut out = vec![0.0; 2 * 9 * 4];
    assert!(conv2d(&x, &w, &s, &Epilogue::default(), &mut out).is_err());
    let bad = Conv2dShape { in_c: 3, ..s };
    assert!(im2col(&x, &bad).is_err());
    let huge = Conv2dShape { kh: 6, pad: 1, ..s };
    assert!(im2col(&x, &huge).is_err());
    // Depthwise: a non-finite bias or a short residual is an error, not garbage.
    let dw = weights(2, 9, 1, true);
    let mut out = vec![0.0; 2 * 9 * 2];
    let nan_bias = [0.0, f32::NAN];
    assert!(depthwise_conv2d(
        &x,
        &dw,
        &s,
        &Epilogue {
            bias: Some(&nan_bias),
            ..Default::default()
        },
        &mut out
    )
    .is_err());
    let short = [0.0; 3];
    assert!(depthwise_conv2d(
        &x,
        &dw,
        &s,
        &Epilogue {
            residual: Some(&short),
            ..Default::default()
        },
        &mut out
    )
    .is_err());
    assert!(depthwise_conv2d(&x, &dw, &s, &Epilogue::default(), &mut out).is_ok());
}

/// ResNet-sized implicit convolutions (stride 1 and 2, 28-wide planes so tiles are cut at
/// output-row ends) are large enough to be split across threads: the result still equals the
/// reference bit for bit, on every variant, for 1 and 2 threads.
#[test]
fn threaded_implicit_conv_matches_the_reference() {
    for (c, out_c, stride, hw) in [
        (16, 16, 1, 28),
        (16, 32, 2, 28),
        (32, 64, 2, 14),
        (64, 64, 1, 7),
    ] {
        let s = Conv2dShape {
            batch: 6,
            in_h: hw,
            in_w: hw,
            in_c: c,
            kh: 3,
            kw: 3,
            stride,
            pad: 1,
        };
        let x = input(&s, c as u64, false);
        let w = weights(out_c, 9 * c, 3, true);
        let m = s.batch * s.out_h() * s.out_w();
        let res: Vec<f32> = (0..m * out_c).map(|i| pseudo(8, i)).collect();
        let epi = Epilogue {
            bias: None,
            residual: Some(&res),
            relu: true,
        };
        let mut expect = vec![0.0f32; m * out_c];
        gemm_reference(&im2col(&x, &s).unwrap(), &w, &epi, &mut expect).unwrap();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for isa in Isa::available_all() {
                let mut out = vec![f32::NAN; m * out_c];
                pool.install(|| conv2d_with(isa, &x, &w, &s, &epi, &mut out))
                    .unwrap();
                assert!(
                    out.iter()
                        .zip(&expect)
                        .all(|(o, e)| o.to_bits() == e.to_bits()),
                    "{} with {threads} threads, {s:?}",
                    isa.name()
                );
            }
        }
    }
}
