//! ResNet-20 inference (1x28x28 inputs) on one thread: the integer engine (W4A4 ASQ+POST,
//! exported with BN folded) against the float forward pass of asq-train (FP32) in the same run.
//! Throughput is in images, so `elem/s` reads as images/s.

#![allow(missing_docs)] // criterion_group! generates undocumented functions

use std::time::Duration;

use asq_models::{QuantPolicy, ResNet};
use asq_train::nn::Module;
use asq_train::{Graph, ParamStore, Rng, Tensor};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn resnet20_inference(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut rng = Rng::new(1);
    for batch in [1usize, 64] {
        let mut g = c.benchmark_group(format!("infer/resnet20-b{batch}"));
        g.throughput(Throughput::Elements(batch as u64));
        g.sample_size(10)
            .measurement_time(Duration::from_secs(3))
            .warm_up_time(Duration::from_millis(500));
        let images = Tensor::from_shape_fn(ndarray::IxDyn(&[batch, 1, 28, 28]), |_| rng.normal());
        // FP32 on asq-train's graph (evaluation mode).
        let mut ps = ParamStore::new();
        let float = ResNet::cifar(&mut ps, 20, 1, 10, &QuantPolicy::float(), 1).unwrap();
        g.bench_function(BenchmarkId::new("fp32-graph", batch), |b| {
            pool.install(|| {
                b.iter(|| {
                    let mut gr = Graph::new(false);
                    let x = gr.input(images.clone());
                    black_box(float.forward(&mut gr, &mut ps, x).unwrap());
                })
            })
        });
        // W4A4 ASQ+POST on the integer engine (scales initialised by one forward pass).
        let mut qps = ParamStore::new();
        let quant =
            ResNet::cifar(&mut qps, 20, 1, 10, &QuantPolicy::asq_post(4).unwrap(), 1).unwrap();
        let mut gr = Graph::new(true);
        let x = gr.input(images.clone());
        quant.forward(&mut gr, &mut qps, x).unwrap();
        drop(gr);
        let input = asq_models::engine::InputSpec {
            channels: 1,
            height: 28,
            width: 28,
            mean: vec![0.0],
            std: vec![1.0],
        };
        let int = quant.export(&qps, input).unwrap();
        let flat = images.as_slice().unwrap();
        g.bench_function(BenchmarkId::new("int-w4a4-asq-post", batch), |b| {
            pool.install(|| b.iter(|| black_box(int.forward(flat, batch).unwrap())))
        });
        g.finish();
    }
}

criterion_group!(benches, resnet20_inference);
criterion_main!(benches);
