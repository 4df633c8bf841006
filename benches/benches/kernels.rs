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

criterion_group!(benches, gemm_shapes);
criterion_main!(benches);
