//! GEMM throughput of every integer path against f32 `matrixmultiply::sgemm`, one thread, on
//! the suite's shapes. Throughput is set to 2·M·K·N elements, so criterion's `Gelem/s` reads as
//! GOP/s. `asq bench kernels` prints the same comparison as JSON with machine peaks.

#![allow(missing_docs)] // criterion_group! generates undocumented functions

use std::time::Duration;

use asq_kernels::suite::{pseudo, KERNELS, SHAPES};
use asq_kernels::{gemm, Epilogue};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn gemm_shapes(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    for &(shape, m, k, n) in SHAPES {
        let mut g = c.benchmark_group(format!("gemm/{shape}"));
        g.throughput(Throughput::Elements(2 * (m * k * n) as u64));
        g.sample_size(10)
            .measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(300));
        let a: Vec<f32> = (0..m * k).map(|i| pseudo(1, i)).collect();
        let b: Vec<f32> = (0..k * n).map(|i| pseudo(2, i)).collect();
        let mut out = vec![0.0f32; m * n];
        g.bench_function(
            BenchmarkId::new("sgemm-f32", format!("{m}x{k}x{n}")),
            |bch| {
                bch.iter(|| {
                    asq_kernels::baseline::sgemm(m, k, n, black_box(&a), &b, &mut out).unwrap()
                })
            },
        );
        for case in KERNELS {
            let w = case.weights(n, k).unwrap();
            let qa = case.activations(m, k).unwrap();
            g.bench_function(BenchmarkId::new(case.name, format!("{m}x{k}x{n}")), |bch| {
                pool.install(|| {
                    bch.iter(|| gemm(black_box(&qa), &w, &Epilogue::default(), &mut out).unwrap())
                })
            });
        }
        g.finish();
    }
}

/// Depthwise 3x3 convolutions of MobileNetV2 (batch 1, W4 POST on grid 64, A8), every variant
/// this CPU runs: the SIMD kernel against the portable one in the same run.
fn depthwise_shapes(c: &mut Criterion) {
    use asq_core::{quant::Steps, BitWidth, LevelSet, QuantRange};
    use asq_kernels::conv::{depthwise_conv2d_with, Conv2dShape, DepthwiseWeights};
    use asq_kernels::{Isa, PackedWeights, QuantActivations};
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    for (hw, ch, stride) in [(112, 32, 1), (56, 144, 2), (14, 384, 1), (7, 960, 1)] {
        let s = Conv2dShape {
            batch: 1,
            in_h: hw,
            in_w: hw,
            in_c: ch,
            kh: 3,
            kw: 3,
            stride,
            pad: 1,
        };
        let len = hw * hw * ch;
        let x: Vec<f32> = (0..len).map(|i| pseudo(3, i).abs()).collect();
        let range = QuantRange::unsigned(8).unwrap();
        let a =
            QuantActivations::quantize(&x, 1, len, range, Steps::PerRow(&[1.0 / 255.0])).unwrap();
        let wf: Vec<f32> = (0..ch * 9).map(|i| pseudo(4, i)).collect();
        let levels = LevelSet::post_int(BitWidth::new(4).unwrap(), 64).unwrap();
        let w = PackedWeights::quantize_levels(&wf, ch, 9, &levels, &vec![1.0; ch]).unwrap();
        let w = DepthwiseWeights::new(&w, 3, 3).unwrap();
        let outs = s.out_h() * s.out_w() * ch;
        let mut out = vec![0.0f32; outs];
        let mut g = c.benchmark_group(format!("depthwise/{hw}x{hw}x{ch}-s{stride}"));
        g.throughput(Throughput::Elements(2 * 9 * outs as u64));
        g.sample_size(10)
            .measurement_time(Duration::from_secs(1))
            .warm_up_time(Duration::from_millis(200));
        for isa in Isa::available_all() {
            g.bench_function(isa.name(), |bch| {
                pool.install(|| {
                    bch.iter(|| {
                        depthwise_conv2d_with(
                            isa,
                            black_box(&a),
                            &w,
                            &s,
                            &Epilogue::default(),
                            &mut out,
                        )
                        .unwrap()
                    })
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, gemm_shapes, depthwise_shapes);
criterion_main!(benches);
